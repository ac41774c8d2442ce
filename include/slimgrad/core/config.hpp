// slimgrad/core/config.hpp — version and the one host/device annotation macro.
//
// Per-element and per-block math is written once and marked SLIMGRAD_HOST_DEVICE so that the
// CPU backend and the CUDA backend compile the same function. The macro changes annotations
// only, never layouts or behaviour (design.md §2 rule 6).
#pragma once

#define SLIMGRAD_VERSION_MAJOR 0
#define SLIMGRAD_VERSION_MINOR 1
#define SLIMGRAD_VERSION_PATCH 0

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SLIMGRAD_HOST_DEVICE __host__ __device__
#else
#define SLIMGRAD_HOST_DEVICE
#endif

// True inside a device compilation pass (nvcc's device side); host code paths stay identical.
#if defined(__CUDA_ARCH__)
#define SLIMGRAD_DEVICE_PASS 1
#else
#define SLIMGRAD_DEVICE_PASS 0
#endif

namespace slimgrad {

/// Index type of every shape and view: signed, the same as Eigen::Index and std::ptrdiff_t.
using index_t = long;

}  // namespace slimgrad
