// slimgrad/core/backend.hpp — backend tags, memory spaces and backend traits.
//
// A backend is a tag type chosen at compile time (design.md §2). Its traits name the memory
// space its views live in; views of different spaces are different types, so handing a host
// buffer to the CUDA backend (or the reverse) does not compile.
#pragma once

#include <type_traits>

namespace slimgrad {

/// Memory spaces. A view carries its space in its type.
struct host_space {};
struct device_space {};

namespace backend {
/// CPU backend: Eigen for dense linear algebra, OpenMP over rows where available.
struct cpu {};
/// CUDA backend: kernels, cuBLAS, cuSOLVER; caller-owned streams and workspace.
struct cuda {};
}  // namespace backend

/// Traits of a backend. The primary template is left undefined on purpose: an unknown backend
/// fails at compile time (see concepts.hpp for the readable message).
template <class Backend>
struct backend_traits;

template <>
struct backend_traits<backend::cpu> {
  using memory_space = host_space;
  static constexpr const char* name = "cpu";
};

template <>
struct backend_traits<backend::cuda> {
  using memory_space = device_space;
  static constexpr const char* name = "cuda";
};

/// The implementation of a policy (a transform, a state store, a rule, a codec) on a backend.
/// Backends specialise this in backend/<name>/; the primary template only explains what is
/// missing.
template <class Policy, class Backend>
struct impl {
  static_assert(std::is_void_v<Policy> && !std::is_void_v<Policy>,
                "slimgrad: this policy has no implementation for this backend. For backend::cpu "
                "include <slimgrad/slimgrad.hpp>; for backend::cuda include <slimgrad/cuda.cuh> in "
                "a .cu translation unit.");
};

}  // namespace slimgrad
