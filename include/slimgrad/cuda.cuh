// slimgrad/cuda.cuh — umbrella for CUDA translation units: core, the host/device math of every
// policy and the CUDA backend (backend/cuda/*.cuh, declared in backend/cuda/api.hpp). Eigen
// never enters here (design.md §3). Include it in the one .cu file that instantiates what a
// program uses, e.g.
//   template class slimgrad::cuda::MultiTensorAdam<slimgrad::state::Q8Block<256>>;
//   template class slimgrad::cuda::MultiTensorGwt<slimgrad::transforms::Haar, 2>;
//   template class slimgrad::cuda::MultiTensorLowRank<slimgrad::transforms::SvdProjection>;
// and call those from any .cpp through <slimgrad/backend/cuda/api.hpp>.
#pragma once

#if !defined(__CUDACC__)
#error \
    "slimgrad/cuda.cuh is for CUDA translation units compiled by nvcc; C++ translation units include <slimgrad/slimgrad.hpp>, or call the CUDA backend through host declarations and one .cu file that instantiates it."
#endif

// Core and the host/device math of the policies (no Eigen, nothing host-only).
#include "activation/codecs.hpp"
#include "core/backend.hpp"
#include "core/concepts.hpp"
#include "core/config.hpp"
#include "core/error.hpp"
#include "core/numeric.hpp"
#include "core/orientation.hpp"
#include "core/philox.hpp"
#include "core/view.hpp"
#include "optim/adam.hpp"
#include "state/q8_math.hpp"
#include "state/stores.hpp"
#include "transforms/compact_projection.hpp"
#include "transforms/dwt.hpp"
#include "transforms/grassmann.hpp"
#include "transforms/random_projection.hpp"

// The CUDA backend.
#include "backend/cuda/activation.cuh"
#include "backend/cuda/activation.hpp"
#include "backend/cuda/adam.cuh"
#include "backend/cuda/api.hpp"
#include "backend/cuda/common.cuh"
#include "backend/cuda/gwt.cuh"
#include "backend/cuda/lowrank.cuh"
#include "backend/cuda/memory.cuh"
#include "backend/cuda/random.cuh"
