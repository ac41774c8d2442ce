// slimgrad/backend/cuda/common.cuh — what every CUDA kernel of the backend needs: error checks,
// workspace carving, the multi-tensor launch table and 4-wide loads/stores of parameters in each
// precision. No Eigen (design.md §3).
#pragma once

#if !defined(__CUDACC__)
#error \
    "slimgrad/backend/cuda/*.cuh is for CUDA translation units compiled by nvcc; a .cpp includes <slimgrad/backend/cuda/api.hpp> and links the one .cu that instantiates the backend."
#endif

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "../../core/error.hpp"
#include "../../core/numeric.hpp"
#include "api.hpp"

namespace slimgrad::cuda::detail {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(std::string("slimgrad cuda: ") + what + ": " + cudaGetErrorString(e));
}
/// After a launch: the launch's own error (bad configuration), without synchronising.
inline void check_launch(const char* what) {
  check(cudaGetLastError(), what);
}

/// Carves aligned regions out of a workspace in order; with a null base it only counts bytes,
/// so workspace_bytes() and the constructor run the same code.
struct Carver {
  char* base = nullptr;
  std::size_t offset = 0;
  static std::size_t round_up(std::size_t n) {
    return (n + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
  }
  template <class T>
  T* take(std::size_t count) {
    offset = round_up(offset);
    T* p = base ? reinterpret_cast<T*>(base + offset) : nullptr;
    offset += count * sizeof(T);
    return p;
  }
  std::size_t bytes() const { return round_up(offset); }
};

inline void check_workspace(void* ws, std::size_t have, std::size_t need, const char* who) {
  require(ws != nullptr || need == 0, std::string(who) + ": the workspace pointer is null");
  require(reinterpret_cast<std::uintptr_t>(ws) % workspace_alignment == 0,
          std::string(who) + ": the workspace must be aligned to " +
              std::to_string(workspace_alignment) + " bytes");
  require(have >= need, std::string(who) + ": the workspace holds " + std::to_string(have) +
                            " bytes, " + std::to_string(need) + " are needed");
}

inline void check_tensor(const Tensor& t, Precision p, std::size_t k, const char* who) {
  const std::string where = std::string(who) + ": tensor " + std::to_string(k);
  require(t.rows >= 0 && t.cols >= 0, where + " has a negative dimension");
  require(t.size() == 0 || (t.weight != nullptr && t.grad != nullptr),
          where + " has a null weight or gradient pointer");
  require(p == Precision::fp32_master || t.weight_bf16 == nullptr,
          where + ": weight_bf16 is only written in fp32_master mode");
}

inline int sm_count() {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute");
  return sms;
}

/// Unit u of a multi-tensor launch belongs to the last tensor whose first unit is <= u
/// (`begin` holds count + 1 ascending prefix sums).
__device__ inline int find_tensor(const index_t* begin, int count, index_t u) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (begin[mid] <= u)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// ---- check_finite's per-tensor step counts (MultiTensorAdam and MultiTensorGwt) ---------------
// A tensor whose gradient was not finite skips the step and keeps its own count, so after skips[k]
// skipped steps it takes the bias corrections (and stochastic-rounding epoch) of its own step
// t − skips[k], as on the CPU. No host synchronisation: the counts live on the device.

/// One thread per tensor, before the step kernel reads `out`. With `bad` (MultiTensorAdam, after
/// its finite pass) it also decides the tensor's skip: bad[k] is cleared for the next step,
/// skipped[k] set and the skip counted (mode 1); without it (MultiTensorGwt: the step kernel
/// counts a skip its first pass found) no tensor skips here. Otherwise mode 0 (the step kernel's
/// own arguments) or, for a tensor that lags, mode 2 with optim::Adam::step_scalars on the
/// device. device_scalars (graph replays): t = epoch + 1 and lr from there.
__global__ void tensor_step_kernel(std::int32_t* __restrict__ bad,
                                   std::int32_t* __restrict__ skipped,
                                   std::int32_t* __restrict__ skips,
                                   AdamTensorStep* __restrict__ out, int ntensors,
                                   optim::Adam::Options rule, long long t,
                                   const StepScalars* __restrict__ device_scalars) {
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k >= ntensors) return;
  if (device_scalars != nullptr) {
    t = static_cast<long long>(device_scalars->epoch) + 1;
    rule.lr = device_scalars->lr;
  }
  if (bad != nullptr) {
    const std::int32_t skip = bad[k] != 0 ? 1 : 0;
    bad[k] = 0;
    skipped[k] = skip;
    if (skip) {
      ++skips[k];
      out[k].mode = 1;
      return;
    }
  }
  if (skips[k] == 0) {
    out[k].mode = 0;
    return;
  }
  const long long own = t - skips[k];
  out[k].mode = 2;
  out[k].adam = optim::Adam::step_scalars(rule, own);
  out[k].epoch = static_cast<std::uint32_t>(own - 1);
}

/// Launches tensor_step_kernel for n tensors on `stream`.
inline void launch_tensor_step(std::int32_t* bad, std::int32_t* skipped, std::int32_t* skips,
                               AdamTensorStep* out, int n, const optim::Adam::Options& rule,
                               long long t, const StepScalars* device_scalars, cudaStream_t stream,
                               const char* what) {
  tensor_step_kernel<<<static_cast<unsigned>((n + 127) / 128), 128, 0, stream>>>(
      bad, skipped, skips, out, n, rule, t, device_scalars);
  check_launch(what);
}

/// In a step kernel, tensor k's scalars: its own step's when it lags (mode 2; `own` null without
/// check_finite), else the kernel's `s`.
__device__ inline void own_scalars(const AdamTensorStep* own, int k, optim::AdamStep& s) {
  if (own != nullptr && own[k].mode == 2) s = own[k].adam;
}

// ---- 4 consecutive elements [i, i+4) of a tensor of n elements --------------------------------
// `vec`: the pointer is aligned for one 16-byte (fp32) or 8-byte (bf16) access at i (i % 4 == 0)
// and i + 4 <= n; otherwise element by element, masked at n. Masked lanes read as 0.

__device__ inline void load4(const float* p, index_t i, index_t n, bool vec, float (&x)[4]) {
  if (vec) {
    const float4 q = __ldcs(reinterpret_cast<const float4*>(p + i));
    x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    x[l] = i + l < n ? p[i + l] : 0.0f;
}
__device__ inline void load4(const std::uint16_t* p, index_t i, index_t n, bool vec,
                             float (&x)[4]) {
  if (vec) {
    const uint2 q = __ldcs(reinterpret_cast<const uint2*>(p + i));
    x[0] = numeric::float_from_bits(q.x << 16), x[1] = numeric::float_from_bits(q.x & 0xFFFF0000u);
    x[2] = numeric::float_from_bits(q.y << 16), x[3] = numeric::float_from_bits(q.y & 0xFFFF0000u);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    x[l] = i + l < n ? numeric::bf16_to_float(p[i + l]) : 0.0f;
}
__device__ inline void store4(float* p, index_t i, index_t n, bool vec, const float (&x)[4]) {
  if (vec) {
    __stcs(reinterpret_cast<float4*>(p + i), make_float4(x[0], x[1], x[2], x[3]));
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (i + l < n) p[i + l] = x[l];
}
/// Rounds to bf16, nearest even.
__device__ inline void store4(std::uint16_t* p, index_t i, index_t n, bool vec,
                              const float (&x)[4]) {
  std::uint16_t h[4];
#pragma unroll
  for (int l = 0; l < 4; ++l)
    h[l] = numeric::bf16_bits_rne(x[l]);
  if (vec) {
    __stcs(reinterpret_cast<uint2*>(p + i),
           make_uint2(h[0] | (std::uint32_t{h[1]} << 16), h[2] | (std::uint32_t{h[3]} << 16)));
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (i + l < n) p[i + l] = h[l];
}

/// Parameters and gradients of one precision: the pointer types and whether a 4-wide access at
/// element 0 is aligned.
template <Precision P>
struct Params {
  using W = std::conditional_t<P == Precision::bf16, std::uint16_t, float>;
  using G = std::conditional_t<P == Precision::fp32, float, std::uint16_t>;
  static bool aligned(const Tensor& t) {
    auto ok = [](const void* p, std::size_t a) {
      return reinterpret_cast<std::uintptr_t>(p) % a == 0;
    };
    return ok(t.weight, 4 * sizeof(W)) && ok(t.grad, 4 * sizeof(G)) &&
           ok(t.weight_bf16, 4 * sizeof(std::uint16_t));
  }
};

}  // namespace slimgrad::cuda::detail
