// slimgrad/backend/cuda/lowrank.cuh — MultiTensorLowRank (api.hpp): GaLore's projected Adam
// (transforms::SvdProjection) and SubTrack-Grad's tracked projection (transforms::Grassmann) on
// cuBLAS and cuSOLVER.
//
// Column-major view of the row-major buffers (what cuBLAS sees): G (m×n row-major) is Gc = Gᵀ
// (n×m, ld n). Right side (m ≥ n under std): P (r×n) is Pc = S (n×r, ld n), R = G Pᵀ (m×r) is
// Rc = P Gᵀ (r×m). Left side: S (m×r) is Sc = Sᵀ (r×m, ld r), R = Sᵀ G (r×n) is Rc = Gᵀ S
// (n×r). So both GEMMs of a step need no transposed copy, and the coefficient buffers hold the
// CPU's row-major coefficients bit for bit in layout.
#pragma once

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../core/orientation.hpp"
#include "../../optim/adam.hpp"
#include "../../optim/residual.hpp"
#include "../../transforms/grassmann.hpp"
#include "../../transforms/svd_projection.hpp"
#include "blas.cuh"
#include "common.cuh"
#include "random.cuh"

namespace slimgrad::cuda {

namespace detail {

inline void check_solver(cusolverStatus_t s, const char* what) {
  if (s != CUSOLVER_STATUS_SUCCESS)
    throw Error(std::string("slimgrad cuda: ") + what + ": cuSOLVER status " +
                std::to_string(static_cast<int>(s)));
}

inline transforms::SvdProjection::Options svd_options_of(
    const transforms::SvdProjection::Options& o) {
  return o;
}
inline transforms::SvdProjection::Options svd_options_of(const transforms::Grassmann::Options& o) {
  return transforms::Grassmann::initial_svd(o);
}

/// C ← alpha·op(A)·op(B) + beta·C, fp32 data; tf32 picks the tensor-core compute type.
inline void gemm(cublasHandle_t h, bool ta, bool tb, index_t m, index_t n, index_t k, float alpha,
                 const float* a, index_t lda, const float* b, index_t ldb, float beta, float* c,
                 index_t ldc, bool tf32) {
  check_cublas(
      cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
                   CUDA_R_32F, static_cast<int>(lda), b, CUDA_R_32F, static_cast<int>(ldb), &beta,
                   c, CUDA_R_32F, static_cast<int>(ldc),
                   tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx");
}

/// Per-tensor scalars of the Adam kernel: the denominator's divisor and ε of the tensor's own
/// step, and its step size over the shared one (the update GEMM's α' is shared by a group).
struct TensorScalars {
  float denom_divisor, eps, ratio;
};

/// Adam on every coefficient at once (all tensors' coefficients are one contiguous array whose
/// length is a multiple of 4, each tensor's range a multiple of 64): x ← N = M / D, the CPU's
/// update() element math. A tensor flagged in `skip` keeps its moments and gets N = 0.
__global__ void __launch_bounds__(256)
    lowrank_adam_kernel(float4* __restrict__ x, float4* __restrict__ m, float4* __restrict__ v,
                        index_t n4, optim::AdamStep s, const index_t* __restrict__ offsets,
                        int tensors, const int* __restrict__ skip,
                        const TensorScalars* __restrict__ ts,
                        const StepScalars* __restrict__ device_scalars) {
  if (device_scalars != nullptr) s = device_scalars->adam;  // a graph's replay
  index_t lo = 0, hi = 0;  // the current tensor's range of float4s (found by bisection)
  int k = 0;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    if (i < lo || i >= hi) {
      int a = 0, b = tensors;  // offsets[a] <= 4i < offsets[b]
      while (b - a > 1) {
        const int c = (a + b) / 2;
        if (offsets[c] <= 4 * i)
          a = c;
        else
          b = c;
      }
      k = a;
      lo = offsets[k] / 4;
      hi = offsets[k + 1] / 4;
    }
    if (skip[k]) {
      x[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      continue;
    }
    optim::AdamStep sk = s;
    sk.denom_divisor = ts[k].denom_divisor;
    sk.eps = ts[k].eps;
    const float ratio = ts[k].ratio;
    float4 g = x[i], mm = m[i], vv = v[i];
    float* gp = &g.x;
    float* mp = &mm.x;
    float* vp = &vv.x;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      optim::adam_moments(gp[l], mp[l], vp[l], sk);
      gp[l] = mp[l] / optim::adam_denominator(vp[l], sk) * ratio;
    }
    x[i] = g;
    m[i] = mm;
    v[i] = vv;
  }
}

/// flags[k] ← 1 where one of the `counts[k]` floats at ptrs[k] (stride `stride`) is a NaN or
/// an infinity (blockIdx.y is the tensor; the flags were zeroed before); with `amax` (the
/// refresh's scan of whole gradients, zeroed before), amax[k] ← the bits of the largest finite
/// |x| (0: all ±0; non-negative floats order as their bits). A NaN or an infinity in G makes
/// every coefficient that sums over it non-finite (NaN and ±Inf propagate through every product,
/// ±Inf·0 included, and every sum), so the steady step checks one coefficient per gradient row
/// (right side: R[:, 0]) or column (left side: R[0, :]): 1/(r·dim0) of G's reads.
__global__ void __launch_bounds__(256)
    nonfinite_kernel(const float* const* __restrict__ ptrs, const index_t* __restrict__ counts,
                     index_t stride_right, const int* __restrict__ left, int* __restrict__ flags,
                     unsigned* __restrict__ amax) {
  const int k = static_cast<int>(blockIdx.y);
  const float* p = ptrs[k];
  const index_t n = counts[k];
  const index_t stride = left != nullptr && !left[k] ? stride_right : 1;
  bool bad = false;
  unsigned mx = 0;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const float x = p[i * stride];
    const bool finite = isfinite(x);
    bad = bad || !finite;
    if (finite) mx = max(mx, __float_as_uint(fabsf(x)));
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flags[k] = 1;
  if (amax == nullptr) return;
  for (int o = 16; o > 0; o /= 2)
    mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0 && mx != 0) atomicMax(amax + k, mx);
}

/// The power of two 2^e by which an SVD refresh scales every product with Ĝ (the sketch Y = ĜΩ,
/// the power iterations' ĜᵀQ and ĜZ, Bᵀ = ĜᵀQ) so that the Grams formed from them neither
/// underflow (|G| ~ 1e-30: YᵀY ~ 1e-60 flushes to 0, and the Cholesky-QR breaks down) nor
/// overflow (|G| ~ 1e25: YᵀY = Inf); the CPU's randomized SVD scales the same way
/// (cpu::refresh_exponent).
/// amax: the bits of the gradient's largest |x| (nonfinite_kernel). e is a multiple of 20,
/// −20·floor((⌊log2 amax⌋ + 10)/20): 0 for every gradient whose largest |x| is in [2^-10, 2^10), so
/// those refreshes run on the very numbers they ran on before (scaling by 2^0 = 1 is the
/// identity), and the scaled products of any other gradient are brought within 2^±10 of 1.
/// Scaling by a power of two is exact (no rounding, barring subnormal results), and the products
/// of G·2^(20j) scaled by 2^(−20j) are therefore bit-identical to those of G: the refresh of a
/// gradient scaled by a power of 2^20 installs the same basis as the refresh of the gradient.
__device__ inline int refresh_exponent(unsigned amax) {
  if (amax == 0) return 0;
  int e = 0;
  frexpf(__uint_as_float(amax), &e);  // amax = f·2^e, f in [1/2, 1): log2(amax) in [e−1, e)
  const int q = (e - 1 + 10 >= 0) ? (e - 1 + 10) / 20 : -((-(e - 1 + 10) + 19) / 20);
  return -20 * q;  // q = floor((log2(amax) + 10) / 20)
}

/// y[i] ← y[i]·2^refresh_exponent(*amax) for i < n (exact; nothing when the exponent is 0).
__global__ void __launch_bounds__(256)
    pow2_scale_kernel(float* __restrict__ y, index_t n, const unsigned* __restrict__ amax) {
  const int e = refresh_exponent(*amax);
  if (e == 0) return;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    y[i] = ldexpf(y[i], e);
}

/// The scalars of step t of Adam::step_scalars (same formulas; device pow, so equal to the
/// host's to float rounding): only for a tensor whose count lags after a skip.
struct RuleScalars {
  double lr, beta1, beta2, eps;
  int convention;  // optim::AdamConvention
};
__device__ inline void device_step_scalars(const RuleScalars& o, long long t, float& divisor,
                                           float& eps, float& step) {
  const double bc1 = 1.0 - pow(o.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - pow(o.beta2, static_cast<double>(t));
  eps = static_cast<float>(o.eps);
  divisor = 1.0f;
  if (o.convention == static_cast<int>(optim::AdamConvention::torch)) {
    divisor = static_cast<float>(sqrt(bc2));
    step = static_cast<float>(o.lr / bc1);
  } else if (o.convention == static_cast<int>(optim::AdamConvention::bnb)) {
    const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2);
    const float tf = static_cast<float>(t), lr = static_cast<float>(o.lr);
    const float c1 = 1.0f - powf(b1, tf);
    const float c2 = sqrtf(1.0f - powf(b2, tf));
    eps = c2 * static_cast<float>(o.eps);
    step = (lr * c2) / c1;
  } else {
    step = static_cast<float>(o.lr * sqrt(bc2) / bc1);
  }
}

/// One thread per tensor, after the flags: counts a skip, and sets the tensor's scalars for
/// step t (the shared ones while it never skipped; else its own t's, the step size as a ratio
/// to step t's, computed with lr = 1 since lr cancels); with a sink, points the update GEMM of
/// a skipped tensor at the sink so that the decay (β ≠ 1) leaves its weight alone.
/// device_scalars (graph replays): t = epoch + 1 and the shared scalars from there.
__global__ void tensor_scalars_kernel(const int* __restrict__ skip, int* __restrict__ skips,
                                      TensorScalars* __restrict__ ts, int tensors, long long t,
                                      RuleScalars rule, float divisor, float eps,
                                      const StepScalars* __restrict__ device_scalars,
                                      float** const* __restrict__ slots,
                                      float* const* __restrict__ weights, float* sink) {
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k >= tensors) return;
  if (device_scalars != nullptr) {
    t = static_cast<long long>(device_scalars->epoch) + 1;
    divisor = device_scalars->adam.denom_divisor;
    eps = device_scalars->adam.eps;
  }
  if (skip[k]) ++skips[k];
  if (sink) *slots[k] = skip[k] ? sink : weights[k];
  if (skip[k]) return;
  if (skips[k] == 0) {
    ts[k] = {divisor, eps, 1.0f};
    return;
  }
  float d, e, st, st_shared;
  device_step_scalars(rule, t - skips[k], d, e, st);
  device_step_scalars(rule, t, divisor, eps, st_shared);
  ts[k] = {d, e, st / st_shared};
}

/// The update GEMM's {α', β} from a graph replay's scalars (the host's update_scalars()).
__global__ void update_scalars_kernel(const StepScalars* __restrict__ ds, double scale,
                                      float* __restrict__ out) {
  if (threadIdx.x != 0) return;
  const optim::WeightUpdate& wu = ds->adam.weight;
  const double decay =
      static_cast<double>(wu.decay_multiplier) * (1.0 + static_cast<double>(wu.decay_alpha));
  const double step = -static_cast<double>(wu.step_size) * scale;
  out[0] = static_cast<float>(wu.decay_before ? step : step * decay);
  out[1] = static_cast<float>(decay);
}

/// Block-wide argmax of |x| over a column (first index on ties, as canonical_sign_flip).
__device__ inline void block_argmax_abs(const float* x, index_t n, float& best_abs, index_t& best) {
  __shared__ float sa[256];
  __shared__ index_t si[256];
  float ba = -1.0f;
  index_t bi = 0;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float a = fabsf(x[i]);
    if (a > ba) ba = a, bi = i;
  }
  sa[threadIdx.x] = ba;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float oa = sa[threadIdx.x + s];
      const index_t oi = si[threadIdx.x + s];
      if (oa > sa[threadIdx.x] || (oa == sa[threadIdx.x] && oi < si[threadIdx.x]))
        sa[threadIdx.x] = oa, si[threadIdx.x] = oi;
    }
    __syncthreads();
  }
  best_abs = sa[0];
  best = si[0];
}

/// Decision codes of verdict_kernel (Lane::info[2]).
enum : int { install_candidate = 0, keep_basis = 1, install_identity = 2 };

/// After a refresh's candidate (dim0×width col-major) is computed: decides what to install, as
/// the CPU's refresh does, and records the outcome in status[2k], status[2k+1]
/// (transforms::RefreshStatus, RefreshFailure). info[1] ≠ 0: a factorisation or eigensolver
/// reported a breakdown; info[3] ≠ 0: an intermediate was non-finite (as a non-finite candidate).
/// skip: the gradient is non-finite, so the step skips the tensor (a tensor with a basis keeps it
/// and its status; one without gets the identity basis, as the CPU's refresh of a non-finite
/// gradient). provisional (BasisState::provisional): 1 while the basis is the identity of a failed
/// first refresh (Grassmann then retries the SVD instead of tracking), 0 once a candidate is
/// installed; a kept basis keeps it. amax (an SVD refresh's; null for a tracking step): 0
/// when the finite gradient is all zeros, which installs the identity basis as a success (the
/// CPU's refresh_now: every direction is a singular vector), whatever the factorisations said
/// (the Cholesky-QR of a zero sketch breaks down). One block.
__global__ void __launch_bounds__(256)
    verdict_kernel(const float* __restrict__ cand, index_t n, int* __restrict__ info,
                   const int* __restrict__ skip, const unsigned* __restrict__ amax, bool ready,
                   int* __restrict__ status, int* __restrict__ provisional) {
  bool bad = false;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x)
    bad = bad || !isfinite(cand[i]);
  bad = __syncthreads_or(bad) || info[3] != 0;
  if (threadIdx.x != 0) return;
  using transforms::RefreshFailure;
  using transforms::RefreshStatus;
  int decision = install_candidate;
  RefreshStatus st = RefreshStatus::ok;
  RefreshFailure fail = RefreshFailure::none;
  if (*skip) {
    fail = RefreshFailure::non_finite_gradient;
  } else if (amax != nullptr && *amax == 0) {
    decision = install_identity;
  } else if (info[1] != 0) {
    fail = RefreshFailure::no_convergence;
  } else if (bad) {
    fail = RefreshFailure::non_finite_result;
  }
  if (fail != RefreshFailure::none) {
    decision = ready ? keep_basis : install_identity;
    st = ready ? RefreshStatus::kept_previous : RefreshStatus::identity_basis;
  }
  info[2] = decision;
  if (*skip && ready) return;  // the CPU skips the tensor before its refresh
  if (decision != keep_basis) *provisional = st == RefreshStatus::identity_basis ? 1 : 0;
  status[0] = static_cast<int>(st);
  status[1] = static_cast<int>(fail);
}

/// info[1] |= (info[0] ≠ 0): accumulates cuSOLVER's info over the calls of one refresh.
__global__ void accumulate_info_kernel(int* info) {
  if (threadIdx.x == 0 && info[0] != 0) info[1] = 1;
}

/// Writes basis column j (0 = largest) from u (dim0 × width, col-major; the columns in
/// ascending eigenvalue order, so column j is u[:, width − 1 − j]) into the stored basis with
/// the canonical sign: right side P (r×n row-major: row j = column j of S), left side S (m×r
/// row-major). One block of 256 threads per column. Follows verdict_kernel's decision.
__global__ void __launch_bounds__(256)
    install_basis_kernel(const float* __restrict__ u, index_t dim0, index_t width, index_t r,
                         bool left, const int* __restrict__ decision, float* __restrict__ out) {
  const int what = *decision;
  if (what == keep_basis) return;
  const index_t j = blockIdx.x;
  if (what == install_identity) {
    for (index_t i = threadIdx.x; i < dim0; i += blockDim.x)
      out[left ? i * r + j : j * dim0 + i] = i == j ? 1.0f : 0.0f;
    return;
  }
  const float* col = u + (width - 1 - j) * dim0;
  float ba;
  index_t bi;
  block_argmax_abs(col, dim0, ba, bi);
  const bool flip = dim0 > 0 && col[bi] < 0.0f;
  for (index_t i = threadIdx.x; i < dim0; i += blockDim.x) {
    const float x = flip ? -col[i] : col[i];
    if (left)
      out[i * r + j] = x;
    else
      out[j * dim0 + i] = x;
  }
}

/// The tracked S (dim0×r col-major) into the stored basis (right: the same layout; left: its
/// transpose, m×r row-major), unless the verdict keeps the previous one.
__global__ void store_tracked_kernel(const float* __restrict__ s, index_t dim0, index_t r,
                                     bool left, const int* __restrict__ decision,
                                     float* __restrict__ out) {
  if (*decision != install_candidate) return;
  const index_t n = dim0 * r;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = q % dim0, j = q / dim0;
    out[left ? i * r + j : q] = s[q];
  }
}

/// y ← x / ‖x‖_F over n floats (one block; x = 0 stays 0, a non-finite x gives NaN). In place
/// allowed. The squarings of the tracking's power iteration keep their scale with it.
__global__ void __launch_bounds__(1024) normalise_kernel(const float* x, float* y, index_t n) {
  __shared__ float part[32];
  float s = 0.0f;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x)
    s += x[i] * x[i];
  for (int o = 16; o > 0; o >>= 1)
    s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
      s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) part[0] = s;
  }
  __syncthreads();
  const float total = part[0];
  const float scale = total > 0.0f ? 1.0f / sqrtf(total) : (total == 0.0f ? 0.0f : NAN);
  for (index_t i = threadIdx.x; i < n; i += blockDim.x)
    y[i] = x[i] * scale;
}

/// v ← the column of X (r×r, symmetric, ≈ v₁v₁ᵀ after the squarings) with the largest
/// diagonal entry: the one least tilted away from v₁. One block.
__global__ void __launch_bounds__(256)
    top_column_kernel(const float* __restrict__ x, index_t r, float* __restrict__ v) {
  __shared__ float sa[256];
  __shared__ index_t si[256];
  float ba = -1.0f;
  index_t bi = 0;
  for (index_t i = threadIdx.x; i < r; i += blockDim.x) {
    const float a = x[i * r + i];
    if (a > ba) ba = a, bi = i;
  }
  sa[threadIdx.x] = ba;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s &&
        (sa[threadIdx.x + s] > sa[threadIdx.x] ||
         (sa[threadIdx.x + s] == sa[threadIdx.x] && si[threadIdx.x + s] < si[threadIdx.x])))
      sa[threadIdx.x] = sa[threadIdx.x + s], si[threadIdx.x] = si[threadIdx.x + s];
    __syncthreads();
  }
  const index_t j = si[0];
  for (index_t i = threadIdx.x; i < r; i += blockDim.x)
    v[i] = x[j * r + i];
}

/// H_c (n×n col-major, H_c = h + c·n², c = blockIdx.y) += shift·I with shift =
/// factor·trace(H_c): keeps the Cholesky factorisation of a rank-deficient Gram matrix defined
/// (shifted Cholesky-QR). One block per matrix.
__global__ void __launch_bounds__(256) shift_diagonal_kernel(float* h, index_t n, float factor) {
  h += static_cast<index_t>(blockIdx.y) * n * n;
  __shared__ float part[256];
  float s = 0.0f;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x)
    s += h[i * n + i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) part[threadIdx.x] += part[threadIdx.x + k];
    __syncthreads();
  }
  const float shift = factor * part[0];
  for (index_t i = threadIdx.x; i < n; i += blockDim.x)
    h[i * n + i] += shift;
}

/// out[c] = base + c·stride (c < count): the pointer arrays of the batched cuSOLVER/cuBLAS calls.
__global__ void strided_ptrs_kernel(float** out, float* base, index_t stride, int count) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c < count) out[c] = base + c * stride;
}

/// slot_info[4c + 1] ← 1 where infos[c] ≠ 0 (c < count): a batched factorisation's or
/// eigensolver's breakdown, per matrix, into the per-tensor info that verdict_kernel reads.
__global__ void batch_info_kernel(const int* __restrict__ infos, int count,
                                  int* __restrict__ slot_info) {
  const int c = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (c < count && infos[c] != 0) slot_info[4 * c + 1] = 1;
}

/// H_c (n×n, c = blockIdx.x) ← I, recorded as a non-finite result in slot_info[4c + 3], when it
/// holds a NaN or an infinity (a non-finite gradient, or an overflowing Gram): the batched
/// eigensolver then only sees finite matrices, and the verdict keeps the previous basis.
__global__ void __launch_bounds__(1024)
    sanitize_kernel(float* __restrict__ h, index_t n, int* __restrict__ slot_info) {
  const int c = static_cast<int>(blockIdx.x);
  float* a = h + static_cast<index_t>(c) * n * n;
  bool bad = false;
  for (index_t i = threadIdx.x; i < n * n; i += blockDim.x)
    bad = bad || !isfinite(a[i]);
  if (!__syncthreads_or(bad)) return;
  for (index_t i = threadIdx.x; i < n * n; i += blockDim.x)
    a[i] = i % (n + 1) == 0 ? 1.0f : 0.0f;
  if (threadIdx.x == 0) slot_info[4 * c + 3] = 1;
}

/// The geodesic coefficients of one tracking step (one block): from bv = B v, sv = S v and
/// ‖W‖_F, with the CPU's rule: no rotation when ‖Bv‖ is under the round-off floor of W or η = 0;
/// else w_i = geodesic_row(sv_i, u_i, cos θ − 1, sin θ) with u = −Bv/‖Bv‖, θ = η·2‖Bv‖.
/// w = 0 when the basis stays. info ← {σ, θ}.
__global__ void __launch_bounds__(256)
    geodesic_kernel(const float* __restrict__ bv, const float* __restrict__ sv,
                    const float* __restrict__ wnorm, index_t dim0, index_t dim1, double eta,
                    float* __restrict__ w, double* __restrict__ info) {
  __shared__ float part[256];
  float s = 0.0f;
  for (index_t i = threadIdx.x; i < dim0; i += blockDim.x)
    s += bv[i] * bv[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) part[threadIdx.x] += part[threadIdx.x + k];
    __syncthreads();
  }
  const double nb = static_cast<double>(sqrtf(part[0]));
  const double floor = 4.0 * static_cast<double>(FLT_EPSILON) * sqrt(static_cast<double>(dim1)) *
                       static_cast<double>(*wnorm);
  const double sigma = 2.0 * nb;
  const bool move = nb > floor && eta != 0.0 && isfinite(nb);
  const double theta = move ? eta * sigma : 0.0;
  if (threadIdx.x == 0) info[0] = sigma, info[1] = theta;
  const double half = sin(0.5 * theta);
  const double cos_minus_one = -2.0 * half * half;
  const double sin_theta = sin(theta);
  const float scale = static_cast<float>(-1.0 / nb);
  for (index_t i = threadIdx.x; i < dim0; i += blockDim.x)
    w[i] = move
               ? transforms::Grassmann::geodesic_row(sv[i], bv[i] * scale, cos_minus_one, sin_theta)
               : 0.0f;
}

// ---- SubTrack++ recovery scaling (residual::Recovery, algorithms.md §2.3(b)) -----------------

/// φ per channel of the non-projected side: ‖N‖/(‖C‖ + 1e-8) over the rank, N = x / ratio (the
/// Adam kernel's output carries a lagging tensor's step-size ratio; the CPU's N does not). Right
/// side (coefficients m×r row-major): a warp per row; left (r×n): a thread per column.
__global__ void __launch_bounds__(256)
    recovery_phi_kernel(const float* __restrict__ x, const float* __restrict__ c, index_t channels,
                        index_t r, bool left, const TensorScalars* __restrict__ ts,
                        float* __restrict__ phi) {
  const double ratio = static_cast<double>(ts->ratio);
  if (left) {
    const index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= channels) return;
    double nn = 0, cc = 0;
    for (index_t i = 0; i < r; ++i) {
      const double a = static_cast<double>(x[i * channels + j]) / ratio;
      const double b = c[i * channels + j];
      nn += a * a;
      cc += b * b;
    }
    phi[j] = static_cast<float>(sqrt(nn) / (sqrt(cc) + 1e-8));
    return;
  }
  const index_t i = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const unsigned lane = threadIdx.x & 31u;
  if (i >= channels) return;  // whole warps leave together
  double nn = 0, cc = 0;
  for (index_t q = lane; q < r; q += 32) {
    const double a = static_cast<double>(x[i * r + q]) / ratio;
    const double b = c[i * r + q];
    nn += a * a;
    cc += b * b;
  }
  for (int o = 16; o > 0; o >>= 1) {
    nn += __shfl_xor_sync(0xffffffffu, nn, o);
    cc += __shfl_xor_sync(0xffffffffu, cc, o);
  }
  if (lane == 0) phi[i] = static_cast<float>(sqrt(nn) / (sqrt(cc) + 1e-8));
}

/// Λ (rows×cols row-major) ⊙= φ (per row on the right, per column on the left), and
/// norm2 += ‖Λ‖²_F (double; zeroed before).
__global__ void __launch_bounds__(256)
    recovery_scale_kernel(float* __restrict__ lam, const float* __restrict__ phi, index_t rows,
                          index_t cols, bool left, double* __restrict__ norm2) {
  __shared__ double part[8];
  double s = 0;
  const index_t n = rows * cols;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const float v = lam[q] * phi[left ? q % cols : q / cols];
    lam[q] = v;
    s += static_cast<double>(v) * v;
  }
  for (int o = 16; o > 0; o >>= 1)
    s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w)
      t += part[w];
    atomicAdd(norm2, t);
  }
}

/// One thread: the limiter divisor ρ of Λ (tensor k's remembered norm, as the CPU's limit()),
/// and the factor of W += coef·Λ: the step of tensor k's own t with the convention's decay
/// (the update GEMM already applied β to W): coef = −step·(decay unless before)·ratio / ρ. A
/// skipped tensor keeps its limiter. ds: a graph replay's scalars.
__global__ void recovery_limiter_kernel(const double* __restrict__ norm2,
                                        float* __restrict__ limiter, double gamma,
                                        const int* __restrict__ skip,
                                        const TensorScalars* __restrict__ ts,
                                        optim::WeightUpdate wu, const StepScalars* __restrict__ ds,
                                        float* __restrict__ coef) {
  if (threadIdx.x != 0) return;
  if (*skip) {
    *coef = 0.0f;
    return;
  }
  if (ds != nullptr) wu = ds->adam.weight;
  const float rho = static_cast<float>(residual::limiter_divisor(sqrt(*norm2), gamma, *limiter));
  const double decay =
      static_cast<double>(wu.decay_multiplier) * (1.0 + static_cast<double>(wu.decay_alpha));
  const double step = -static_cast<double>(wu.step_size) * (wu.decay_before ? 1.0 : decay);
  *coef = static_cast<float>(step * static_cast<double>(ts->ratio)) / rho;
}

/// W += coef·Λ over n floats, unless the tensor is skipped.
__global__ void __launch_bounds__(256)
    recovery_apply_kernel(float* __restrict__ w, const float* __restrict__ lam, index_t n,
                          const float* __restrict__ coef, const int* __restrict__ skip) {
  if (*skip) return;
  const float a = *coef;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x)
    w[q] += a * lam[q];
}

// ---- SubTrack++ projection-aware moments (residual::Recovery, algorithms.md §2.3(a)) ----------

/// d ← V − M² over n floats (the raw-moment form of cpu::rotate_moments: b1 = b2 = 1).
__global__ void __launch_bounds__(256)
    variance_term_kernel(const float* __restrict__ m, const float* __restrict__ v,
                         float* __restrict__ d, index_t n) {
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x)
    d[q] = transforms::Grassmann::variance_term(m[q], v[q], 1.0f, 1.0f);
}

/// cc ← C ⊙ C over n floats.
__global__ void __launch_bounds__(256)
    square_kernel(const float* __restrict__ c, float* __restrict__ cc, index_t n) {
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x)
    cc[q] = c[q] * c[q];
}

/// M ← rotated M, V ← |rotated D + (rotated M)²|, only where the tracking step installed a
/// basis that turned (the verdict's decision and θ ≠ 0: the CPU rotates only when refresh()
/// reports a change, so a kept or unturned basis leaves the moments bit for bit). A retried SVD
/// passes no θ: its decision alone says whether the new basis was installed.
__global__ void __launch_bounds__(256)
    rotate_finish_kernel(float* __restrict__ m, float* __restrict__ v, const float* __restrict__ rm,
                         const float* __restrict__ rd, index_t n, const int* __restrict__ decision,
                         const double* __restrict__ theta) {
  if (*decision != install_candidate || (theta != nullptr && *theta == 0.0)) return;
  for (index_t q = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < n;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    m[q] = rm[q];
    v[q] = transforms::Grassmann::rotated_second_moment(rd[q], rm[q], 1.0f, 1.0f);
  }
}

// ---- bf16 and fp32-master parameters (Options::precision) ------------------------------------

/// One conversion of a tensor's n values from src to dst (bf16 bits ↔ fp32); vec: both pointers
/// allow common.cuh's 4-wide accesses.
struct ConvertEntry {
  const void* src;
  void* dst;
  index_t n;
  int vec;
};

/// dst ← src for table[blockIdx.y], with common.cuh's loads and stores: S = bf16 widens exactly,
/// D = bf16 rounds once to nearest even (as MultiTensorAdam and MultiTensorGwt store weights).
template <class S, class D>
__global__ void __launch_bounds__(256) convert_kernel(const ConvertEntry* __restrict__ table) {
  const ConvertEntry c = table[blockIdx.y];
  const auto* src = static_cast<const S*>(c.src);
  auto* dst = static_cast<D*>(c.dst);
  for (index_t i = 4 * (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x); i < c.n;
       i += 4 * static_cast<index_t>(gridDim.x) * blockDim.x) {
    const bool vec = c.vec != 0 && i + 4 <= c.n;
    float x[4];
    load4(src, i, c.n, vec, x);
    store4(dst, i, c.n, vec, x);
  }
}

/// C (r×r col-major) ← S_newᵀ S_old with S_old the identity basis (the first r coordinate
/// vectors, what a failed first refresh installs): the top r×r block of the stored S_new,
/// transposed. One block.
__global__ void __launch_bounds__(256)
    identity_overlap_kernel(const float* __restrict__ basis, index_t dim0, index_t r, bool left,
                            float* __restrict__ c) {
  for (index_t q = threadIdx.x; q < r * r; q += blockDim.x) {
    const index_t i = q % r, j = q / r;  // C[i][j] = S_new[j][i]
    c[q] = left ? basis[j * r + i] : basis[i * dim0 + j];
  }
}

/// Refresh scratch of one lane (internal stream): sized for the largest tensor.
struct Lane {
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  float *z = nullptr, *h = nullptr, *u = nullptr, *s = nullptr;
  float *eig = nullptr, *vec = nullptr, *work = nullptr;
  float* sq = nullptr;   // Grassmann: two r×r buffers of the power iteration's squarings
  float* rot = nullptr;  // projection-aware moments: C M and (C⊙C)(V − M²), 2·r·dim1
  int* info = nullptr;   // [0] cuSOLVER's, [1] any breakdown, [2] verdict_kernel's decision,
                         // [3] a non-finite intermediate
  int lwork = 0;
};

/// Scratch of the batched randomized refresh (on the caller's stream): up to `bs` tensors of one
/// sketch width ℓ per batched eigensolver call, their range finders orthonormalised in runs of
/// up to `bq` tensors of one shape (batched Cholesky-QR).
struct RefreshBatch {
  int bs = 0, bq = 0;
  index_t q_stride = 0, z_stride = 0;  // floats between slots of q and z
  float* omega = nullptr;              // Philox Ω (dim1×ℓ row-major), one tensor at a time
  float* q = nullptr;                  // bs slots: Y, then Q (dim0×ℓ)
  float* z = nullptr;                  // bq slots: Z, then Bᵀ = ĜᵀQ (dim1×ℓ)
  float* h = nullptr;        // bs matrices ℓ×ℓ, contiguous: Grams, then BBᵀ, then V
  float* eig = nullptr;      // bs·ℓ eigenvalues
  float* u = nullptr;        // U = Q·V (dim0×r), one tensor at a time
  float** hp = nullptr;      // bq pointers to the Grams
  float** xp = nullptr;      // bq pointers to the factors' right-hand sides
  int* pinfo = nullptr;      // bq infos of potrfBatched
  int* sinfo = nullptr;      // bs infos of the eigensolver
  int* slot_info = nullptr;  // bs × 4: each tensor's Lane::info
  void* syev_work = nullptr;
  std::size_t syev_bytes = 0, syev_host_bytes = 0;
};

/// The refresh's tensors per batched Cholesky-QR (a run of one shape).
inline constexpr int refresh_qr_batch = 16;

}  // namespace detail

template <class Transform>
struct MultiTensorLowRank<Transform>::State {
  static constexpr bool grassmann = std::is_same_v<Transform, transforms::Grassmann>;
  struct Entry {
    Tensor t;
    Side side;
    index_t dim0, dim1, ell;
    float* basis;
    float* coeff;
    float* m;
    float* v;
    index_t count;
    bool ready = false;
    float** c2 = nullptr;  // this tensor's slot in its group's update table (device)
    std::size_t group = 0, slot = 0;
  };
  struct Group {
    index_t rows, cols;
    Side side;
    int count;
    const float** a1;  // device pointer arrays of the two batched GEMMs
    const float** b1;
    float** c1;
    const float** a2;
    const float** b2;
    float** c2;
  };
  Options options;
  transforms::SvdProjection::Options svd;
  index_t rank = 0;
  std::vector<Entry> entries;
  std::vector<Group> groups;
  std::vector<const void*> host_table;  // kept alive for the asynchronous table upload
  float* coeff = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  index_t total = 0;             // coefficients, padded to multiples of 64 per tensor
  double* track_info = nullptr;  // Grassmann: {σ, θ} per tensor
  // Robustness (device, per tensor): skip flags of the current step, skip counts, refresh
  // outcomes, the Adam kernel's scalars; tables of the checks (coefficient and gradient
  // pointers and counts, coefficient offsets) and of the sink redirection.
  int* skip = nullptr;
  int* skips = nullptr;
  int* status = nullptr;
  int* provisional = nullptr;      // per tensor: the identity basis of a failed first refresh
  bool maybe_provisional = false;  // host: an SVD refresh ran (or a checkpoint set a flag)
                                   // since the flags were last read
  unsigned* amax = nullptr;  // per tensor: the bits of the refresh's largest finite |G| (0: zero)
  detail::TensorScalars* tscal = nullptr;
  index_t* offsets_d = nullptr;  // tensors + 1
  const float** coeff_ptrs = nullptr;
  index_t* coeff_counts = nullptr;  // dim1: one coefficient per gradient row or column
  int* left_d = nullptr;
  const float** grad_ptrs = nullptr;
  index_t* grad_counts = nullptr;
  float*** slots = nullptr;  // where each tensor's C pointer of the update GEMM lives
  float** weights = nullptr;
  // Recovery scaling: the raw coefficients C (as coeff), Λ of one tensor (max rows×cols), φ
  // (max dim1), ‖Λ‖² and the apply factor, the limiter's remembered norm per tensor (NaN:
  // unset).
  float* raw = nullptr;
  float* lam = nullptr;
  float* phi = nullptr;
  double* lam_norm = nullptr;
  float* lam_coef = nullptr;
  float* limiter = nullptr;
  // bf16 / fp32_master: the conversions around a step (device tables) into and out of the fp32
  // copies that the entries' Tensor pointers name.
  detail::ConvertEntry* widen = nullptr;   // bf16 gradients (and bf16 weights) → fp32 copies
  detail::ConvertEntry* narrow = nullptr;  // fp32 weights → bf16 weights or model copies
  std::vector<detail::ConvertEntry> h_widen, h_narrow;
  index_t convert_max = 0;  // the largest tensor
  float* upd = nullptr;     // {α', β} of the update GEMM (graph replays)
  float* sink = nullptr;    // max rows×cols floats when weight decay is on (β ≠ 1), else null
  // Host copies of the tables, uploaded at construction.
  std::vector<index_t> h_offsets, h_coeff_counts, h_grad_counts;
  std::vector<int> h_left;
  std::vector<const void*> h_coeff_ptrs, h_grad_ptrs, h_slots, h_weights;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;  // the batched refresh's (caller's stream)
  cusolverDnParams_t solver_params = nullptr;
  detail::RefreshBatch batch;
  std::vector<char> syev_host;  // the batched eigensolver's host workspace
  cudaEvent_t fork = nullptr;
  std::vector<detail::Lane> lanes;
  std::int64_t t = 0;
  std::int64_t tracking_steps = 0;
  std::size_t state_bytes = 0;
  double eta = 0.0;  // Grassmann's η and reorth_every (0 for GaLore)
  index_t reorth_every = 0;

  // ---- sizes -------------------------------------------------------------------------------
  struct Sizes {
    // Lanes (exact refresh, tracking), per lane.
    index_t z = 0, h = 0, u = 0, s = 0, eig = 0, vec = 0, sq = 0, rot = 0, sink = 0;
    int lwork = 0;
    // The batched randomized refresh.
    int bs = 0, bq = 0;
    index_t b_omega = 0, q_stride = 0, z_stride = 0, b_h = 0, b_eig = 0, b_u = 0;
    std::size_t syev_bytes = 0, syev_host_bytes = 0;
  };

  static void shapes_of(const Tensor& tn, const transforms::SvdProjection::Options& o, Side& side,
                        index_t& dim0, index_t& dim1, index_t& ell) {
    side = side_for(Shape{tn.rows, tn.cols}, o.proj_type);
    dim0 = projected_dim(Shape{tn.rows, tn.cols}, side);
    dim1 = side == Side::left ? tn.cols : tn.rows;
    ell = transforms::SvdProjection::sketch_width(Shape{tn.rows, tn.cols}, o.rank, o.oversampling);
  }

  // cuSOLVER workspace sizes need a handle: a temporary one (construction and the static
  // workspace query only).
  static Sizes sizes(std::span<const Tensor> tensors, const Options& options) {
    const auto o = detail::svd_options_of(options.transform);
    const index_t r = o.rank;
    const bool exact = o.method == transforms::SvdMethod::exact;
    Sizes z;
    if (!exact) {
      z.bs = static_cast<int>(
          std::min<std::size_t>(static_cast<std::size_t>(options.refresh_batch), tensors.size()));
      z.bq = std::min(z.bs, detail::refresh_qr_batch);
    }
    cusolverDnHandle_t h = nullptr;
    cusolverDnParams_t prm = nullptr;
    detail::check_solver(cusolverDnCreate(&h), "cusolverDnCreate");
    std::map<std::tuple<index_t, index_t>, bool> seen;
    std::map<index_t, bool> seen_ell;
    try {
      detail::check_solver(cusolverDnCreateParams(&prm), "cusolverDnCreateParams");
      for (const Tensor& tn : tensors) {
        if (options.rule.weight_decay != 0.0) z.sink = std::max(z.sink, tn.rows * tn.cols);
        Side side;
        index_t dim0, dim1, ell;
        shapes_of(tn, o, side, dim0, dim1, ell);
        if (seen.contains({dim0, dim1})) continue;
        seen[{dim0, dim1}] = true;
        int lw = 0;
        if (!exact) {
          z.b_omega = std::max(z.b_omega, dim1 * ell);
          z.q_stride = std::max(z.q_stride, dim0 * ell);
          z.z_stride = std::max(z.z_stride, dim1 * ell);
          z.b_h = std::max(z.b_h, ell * ell);
          z.b_eig = std::max(z.b_eig, ell);
          z.b_u = std::max(z.b_u, dim0 * r);
          if (!seen_ell.contains(ell)) {
            seen_ell[ell] = true;
            std::size_t dev = 0, host = 0;
            detail::check_solver(
                cusolverDnXsyevBatched_bufferSize(
                    h, prm, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell, CUDA_R_32F,
                    nullptr, ell, CUDA_R_32F, nullptr, CUDA_R_32F, &dev, &host, z.bs),
                "XsyevBatched_bufferSize");
            z.syev_bytes = std::max(z.syev_bytes, dev);
            z.syev_host_bytes = std::max(z.syev_host_bytes, host);
          }
        }
        if (!exact && !grassmann) continue;  // no lane work
        // Lanes: the exact refresh (ĜĜᵀ and its eigenvectors) and the tracking step.
        z.z = std::max(z.z, dim1 * r);
        z.h = std::max(z.h, std::max(r * r, exact ? dim0 * dim0 : index_t{0}));
        z.u = std::max(z.u, dim0 * r);
        z.s = std::max(z.s, dim0 * r);
        z.eig = std::max(z.eig, exact ? dim0 : index_t{0});
        z.vec = std::max(z.vec, 4 * dim0 + r + 8);
        const int ir = static_cast<int>(r);
        detail::check_solver(
            cusolverDnSpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, ir, nullptr, ir, &lw),
            "potrf_bufferSize");
        z.lwork = std::max(z.lwork, lw);
        if (exact) {
          const int ne = static_cast<int>(dim0);
          detail::check_solver(
              cusolverDnSsyevd_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ne,
                                          nullptr, ne, nullptr, &lw),
              "syevd_bufferSize");
          z.lwork = std::max(z.lwork, lw);
        }
        if constexpr (grassmann) {
          z.sq = 2 * r * r;
          if (options.projection_aware) z.rot = std::max(z.rot, 2 * r * dim1);
        }
      }
    } catch (...) {
      if (prm) cusolverDnDestroyParams(prm);
      cusolverDnDestroy(h);
      throw;
    }
    cusolverDnDestroyParams(prm);
    cusolverDnDestroy(h);
    return z;
  }

  static constexpr std::size_t blas_workspace = std::size_t{32} << 20;  // the steady handle
  static constexpr std::size_t lane_blas_workspace = std::size_t{4} << 20;

  /// Carves everything; with a null base it only counts. Fills `self` when given.
  static std::size_t carve(std::span<const Tensor> tensors, const Options& options, const Sizes& z,
                           char* base, State* self) {
    detail::Carver c{base};
    const auto o = detail::svd_options_of(options.transform);
    std::map<std::tuple<index_t, index_t, int>, int> group_count;
    index_t total = 0;
    std::vector<index_t> offsets;
    for (const Tensor& tn : tensors) {
      Side side;
      index_t dim0, dim1, ell;
      shapes_of(tn, o, side, dim0, dim1, ell);
      ++group_count[{tn.rows, tn.cols, static_cast<int>(side)}];
      offsets.push_back(total);
      total += (o.rank * dim1 + 63) / 64 * 64;
    }
    float* coeff = c.take<float>(static_cast<std::size_t>(total));
    float* m = c.take<float>(static_cast<std::size_t>(total));
    float* v = c.take<float>(static_cast<std::size_t>(total));
    std::vector<float*> bases;
    for (const Tensor& tn : tensors) {
      Side side;
      index_t dim0, dim1, ell;
      shapes_of(tn, o, side, dim0, dim1, ell);
      bases.push_back(c.take<float>(static_cast<std::size_t>(o.rank * dim0)));
    }
    std::vector<void*> tables;
    for (const auto& [key, n] : group_count)
      tables.push_back(c.take<const float*>(6 * static_cast<std::size_t>(n)));
    double* info = c.take<double>(2 * tensors.size());
    void* blas_ws = c.take<char>(blas_workspace);
    const int nl = std::max(1, options.lanes);
    std::vector<detail::Lane> lanes(static_cast<std::size_t>(nl));
    std::vector<void*> lane_ws;
    const bool lane_work = z.vec > 0;
    for (detail::Lane& l : lanes) {
      if (!lane_work) continue;  // GaLore's randomized refresh runs batched, without lanes
      auto f = [&](index_t n) { return c.take<float>(static_cast<std::size_t>(n)); };
      l.z = f(z.z);
      l.h = f(z.h);
      l.u = f(z.u);
      l.s = f(z.s);
      l.eig = f(z.eig);
      l.vec = f(z.vec);
      l.work = f(z.lwork);
      l.sq = f(z.sq);
      if (z.rot > 0) l.rot = f(z.rot);
      l.info = c.take<int>(4);
      l.lwork = z.lwork;
      lane_ws.push_back(c.take<char>(lane_blas_workspace));
    }
    detail::RefreshBatch rb;
    if (z.bs > 0) {
      auto f = [&](index_t n) { return c.take<float>(static_cast<std::size_t>(n)); };
      const auto bs = static_cast<index_t>(z.bs), bq = static_cast<index_t>(z.bq);
      rb.bs = z.bs;
      rb.bq = z.bq;
      rb.q_stride = z.q_stride;
      rb.z_stride = z.z_stride;
      rb.omega = f(z.b_omega);
      rb.q = f(bs * z.q_stride);
      rb.z = f(bq * z.z_stride);
      rb.h = f(bs * z.b_h);
      rb.eig = f(bs * z.b_eig);
      rb.u = f(z.b_u);
      rb.hp = c.take<float*>(static_cast<std::size_t>(bq));
      rb.xp = c.take<float*>(static_cast<std::size_t>(bq));
      rb.pinfo = c.take<int>(static_cast<std::size_t>(bq));
      rb.sinfo = c.take<int>(static_cast<std::size_t>(bs));
      rb.slot_info = c.take<int>(4 * static_cast<std::size_t>(bs));
      rb.syev_work = c.take<char>(z.syev_bytes);
      rb.syev_bytes = z.syev_bytes;
      rb.syev_host_bytes = z.syev_host_bytes;
    }
    const std::size_t nt = tensors.size();
    int* skip = c.take<int>(nt);
    int* skips = c.take<int>(nt);
    int* status = c.take<int>(2 * nt);
    int* provisional = c.take<int>(nt);
    auto* amax = c.take<unsigned>(nt);
    auto* tscal = c.take<detail::TensorScalars>(nt);
    auto* offsets_d = c.take<index_t>(nt + 1);
    auto* coeff_ptrs = c.take<const float*>(nt);
    auto* coeff_counts = c.take<index_t>(nt);
    auto* left_d = c.take<int>(nt);
    auto* grad_ptrs = c.take<const float*>(nt);
    auto* grad_counts = c.take<index_t>(nt);
    auto* slots = c.take<float**>(nt);
    auto* weights = c.take<float*>(nt);
    float* upd = c.take<float>(2);
    float* sink = z.sink > 0 ? c.take<float>(static_cast<std::size_t>(z.sink)) : nullptr;
    float *raw = nullptr, *lam = nullptr, *phi = nullptr, *lam_coef = nullptr, *limiter = nullptr;
    double* lam_norm = nullptr;
    if (options.recovery_scaling) {
      index_t big = 0, chans = 0;
      for (const Tensor& tn : tensors) {
        big = std::max(big, tn.rows * tn.cols);
        chans = std::max(chans, std::max(tn.rows, tn.cols));
      }
      raw = c.take<float>(static_cast<std::size_t>(total));
      lam = c.take<float>(static_cast<std::size_t>(big));
      phi = c.take<float>(static_cast<std::size_t>(chans));
      lam_norm = c.take<double>(1);
      lam_coef = c.take<float>(1);
      limiter = c.take<float>(nt);
    }
    // bf16 / fp32_master: fp32 copies of the gradients (and of bf16 weights), which the
    // entries' pointers name, and the conversion tables.
    const Precision prec = options.precision;
    std::vector<float*> gstage(nt, nullptr), wstage(nt, nullptr);
    std::vector<detail::ConvertEntry> h_widen, h_narrow;
    detail::ConvertEntry *widen = nullptr, *narrow = nullptr;
    if (prec != Precision::fp32) {
      auto aligned = [](const void* p, std::size_t a) {
        return reinterpret_cast<std::uintptr_t>(p) % a == 0;
      };
      for (std::size_t k = 0; k < nt; ++k) {
        const Tensor& tn = tensors[k];
        const auto n = static_cast<std::size_t>(tn.size());
        gstage[k] = c.take<float>(n);
        if (prec == Precision::bf16) wstage[k] = c.take<float>(n);
        h_widen.push_back({tn.grad, gstage[k], tn.size(), aligned(tn.grad, 8) ? 1 : 0});
        if (prec == Precision::bf16) {
          h_widen.push_back({tn.weight, wstage[k], tn.size(), aligned(tn.weight, 8) ? 1 : 0});
          h_narrow.push_back({wstage[k], tn.weight, tn.size(), aligned(tn.weight, 8) ? 1 : 0});
        } else if (tn.weight_bf16 != nullptr) {
          h_narrow.push_back({tn.weight, tn.weight_bf16, tn.size(),
                              aligned(tn.weight, 16) && aligned(tn.weight_bf16, 8) ? 1 : 0});
        }
      }
      widen = c.take<detail::ConvertEntry>(h_widen.size());
      narrow = c.take<detail::ConvertEntry>(h_narrow.size());
    }
    if (self == nullptr) return c.bytes();

    State& s = *self;
    s.widen = widen;
    s.narrow = narrow;
    s.h_widen = std::move(h_widen);
    s.h_narrow = std::move(h_narrow);
    for (const Tensor& tn : tensors)
      s.convert_max = std::max(s.convert_max, tn.size());
    s.skip = skip;
    s.skips = skips;
    s.status = status;
    s.provisional = provisional;
    s.amax = amax;
    s.tscal = tscal;
    s.offsets_d = offsets_d;
    s.coeff_ptrs = coeff_ptrs;
    s.coeff_counts = coeff_counts;
    s.left_d = left_d;
    s.grad_ptrs = grad_ptrs;
    s.grad_counts = grad_counts;
    s.slots = slots;
    s.weights = weights;
    s.upd = upd;
    s.sink = sink;
    s.raw = raw;
    s.lam = lam;
    s.phi = phi;
    s.lam_norm = lam_norm;
    s.lam_coef = lam_coef;
    s.limiter = limiter;
    s.coeff = coeff;
    s.m = m;
    s.v = v;
    s.total = total;
    s.track_info = info;
    if (lane_work) s.lanes = lanes;
    s.batch = rb;
    s.entries.resize(tensors.size());
    for (std::size_t k = 0; k < tensors.size(); ++k) {
      Entry& e = s.entries[k];
      e.t = tensors[k];
      if (gstage[k]) e.t.grad = gstage[k];  // the step reads and writes the fp32 copies
      if (wstage[k]) e.t.weight = wstage[k];
      e.t.weight_bf16 = nullptr;
      shapes_of(e.t, o, e.side, e.dim0, e.dim1, e.ell);
      e.basis = bases[k];
      e.coeff = coeff + offsets[k];
      e.m = m + offsets[k];
      e.v = v + offsets[k];
      e.count = o.rank * e.dim1;
    }
    // Group tables: [a1 b1 c1 a2 b2 c2] × count, in tensor order within a group.
    std::size_t g = 0;
    for (const auto& [key, n] : group_count) {
      const auto [rows, cols, side] = key;
      Group gr{rows,    cols,   static_cast<Side>(side), n, nullptr, nullptr, nullptr, nullptr,
               nullptr, nullptr};
      auto* tab = static_cast<const float**>(tables[g++]);
      gr.a1 = tab;
      gr.b1 = tab + n;
      gr.c1 = const_cast<float**>(tab + 2 * n);
      gr.a2 = tab + 3 * n;
      gr.b2 = tab + 4 * n;
      gr.c2 = const_cast<float**>(tab + 5 * n);
      std::vector<const void*> host(6 * static_cast<std::size_t>(n));
      int i = 0;
      for (Entry& e : s.entries) {
        if (e.t.rows != rows || e.t.cols != cols || static_cast<int>(e.side) != side) continue;
        const auto nn = static_cast<std::size_t>(n);
        const auto ii = static_cast<std::size_t>(i);
        e.c2 = gr.c2 + ii;
        e.group = g - 1;
        e.slot = ii;
        if (e.side == Side::right) {
          host[ii] = e.basis, host[nn + ii] = e.t.grad, host[2 * nn + ii] = e.coeff;
          host[3 * nn + ii] = e.basis, host[4 * nn + ii] = e.coeff, host[5 * nn + ii] = e.t.weight;
        } else {
          host[ii] = e.t.grad, host[nn + ii] = e.basis, host[2 * nn + ii] = e.coeff;
          host[3 * nn + ii] = e.coeff, host[4 * nn + ii] = e.basis, host[5 * nn + ii] = e.t.weight;
        }
        ++i;
      }
      s.host_table.insert(s.host_table.end(), host.begin(), host.end());
      s.groups.push_back(gr);
    }
    for (std::size_t k = 0; k < nt; ++k) {
      const Entry& e = s.entries[k];
      s.h_offsets.push_back(offsets[k]);
      s.h_coeff_ptrs.push_back(e.coeff);
      s.h_coeff_counts.push_back(e.dim1);
      s.h_left.push_back(e.side == Side::left ? 1 : 0);
      s.h_grad_ptrs.push_back(e.t.grad);
      s.h_grad_counts.push_back(e.t.rows * e.t.cols);
      s.h_slots.push_back(e.c2);
      s.h_weights.push_back(e.t.weight);
    }
    s.h_offsets.push_back(total);
    s.blas_ws = blas_ws;
    s.lane_ws = lane_ws;
    return c.bytes();
  }
  void* blas_ws = nullptr;
  std::vector<void*> lane_ws;

  ~State() {
    for (detail::Lane& l : lanes) {
      if (l.blas) cublasDestroy(l.blas);
      if (l.solver) cusolverDnDestroy(l.solver);
      if (l.done) cudaEventDestroy(l.done);
      if (l.stream) cudaStreamDestroy(l.stream);
    }
    if (blas) cublasDestroy(blas);
    if (solver_params) cusolverDnDestroyParams(solver_params);
    if (solver) cusolverDnDestroy(solver);
    if (fork) cudaEventDestroy(fork);
  }

  // ---- refresh -----------------------------------------------------------------------------
  // Ĝ = G (left) or Gᵀ (right), dim0×dim1; X, Y col-major.
  static void ghat_times(cublasHandle_t hb, const Entry& e, const float* x, float* y, index_t w,
                         bool tf32) {  // Y (dim0×w) = Ĝ X (dim1×w)
    const auto* g = static_cast<const float*>(e.t.grad);
    const index_t n = e.t.cols, mm = e.t.rows;
    if (e.side == Side::right)
      detail::gemm(hb, false, false, n, w, mm, 1.0f, g, n, x, mm, 0.0f, y, n, tf32);
    else
      detail::gemm(hb, true, false, mm, w, n, 1.0f, g, n, x, n, 0.0f, y, mm, tf32);
  }
  static void ghatT_times(cublasHandle_t hb, const Entry& e, const float* x, float* y, index_t w,
                          bool tf32) {  // Y (dim1×w) = Ĝᵀ X (dim0×w)
    const auto* g = static_cast<const float*>(e.t.grad);
    const index_t n = e.t.cols, mm = e.t.rows;
    if (e.side == Side::right)
      detail::gemm(hb, true, false, mm, w, n, 1.0f, g, n, x, n, 0.0f, y, mm, tf32);
    else
      detail::gemm(hb, false, false, n, w, mm, 1.0f, g, n, x, mm, 0.0f, y, n, tf32);
  }
  /// The randomized refresh's products with Ĝ of tensor i, scaled by 2^refresh_exponent (see
  /// there): Y (dim0×w) = 2^e Ĝ X, or (transposed) Y (dim1×w) = 2^e Ĝᵀ X.
  void scaled_ghat_times(cudaStream_t stream, std::size_t i, const float* x, float* y, index_t w,
                         bool transposed) const {
    const Entry& e = entries[i];
    if (transposed)
      ghatT_times(blas, e, x, y, w, options.tf32);
    else
      ghat_times(blas, e, x, y, w, options.tf32);
    const index_t n = (transposed ? e.dim1 : e.dim0) * w;
    detail::pow2_scale_kernel<<<static_cast<unsigned>(std::min<index_t>((n + 255) / 256, 256)), 256,
                                0, stream>>>(y, n, amax + i);
    detail::check_launch("pow2_scale_kernel");
  }

  /// X (rows×w, col-major) ← an orthonormal basis of its span: R from the Cholesky factor of
  /// XᵀX, X ← X R⁻¹. R has a positive diagonal.
  void cholesky_qr(const detail::Lane& l, float* x, index_t rows, index_t w) const {
    detail::gemm(l.blas, true, false, w, w, rows, 1.0f, x, rows, x, rows, 0.0f, l.h, w, false);
    detail::check_solver(cusolverDnSpotrf(l.solver, CUBLAS_FILL_MODE_UPPER, static_cast<int>(w),
                                          l.h, static_cast<int>(w), l.work, l.lwork, l.info),
                         "cusolverDnSpotrf");
    accumulate_info(l);
    const float one = 1.0f;
    detail::check_cublas(
        cublasStrsm(l.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                    CUBLAS_DIAG_NON_UNIT, static_cast<int>(rows), static_cast<int>(w), &one, l.h,
                    static_cast<int>(w), x, static_cast<int>(rows)),
        "cublasStrsm");
  }

  static void accumulate_info(const detail::Lane& l) {
    detail::accumulate_info_kernel<<<1, 32, 0, l.stream>>>(l.info);
    detail::check_launch("accumulate_info_kernel");
  }
  /// The verdict on a candidate (dim0×width col-major) of tensor i; see verdict_kernel. info:
  /// the tensor's Lane::info.
  void verdict(cudaStream_t st, int* info, const Entry& e, std::size_t i, const float* cand,
               index_t width, bool svd_refresh) const {
    detail::verdict_kernel<<<1, 256, 0, st>>>(cand, e.dim0 * width, info, skip + i,
                                              svd_refresh ? amax + i : nullptr, e.ready,
                                              status + 2 * i, provisional + i);
    detail::check_launch("verdict_kernel");
  }

  /// The candidate's top r columns (or the identity, or nothing: the verdict decides).
  void install(cudaStream_t st, int* info, Entry& e, std::size_t i, const float* u, index_t width) {
    if (i < 64 && (detail::svd_injected_failures >> i & 1u) != 0) {  // the test hook
      detail::svd_injected_failures &= ~(std::uint64_t{1} << i);
      detail::check(cudaMemsetAsync(info + 1, 1, sizeof(int), st), "cudaMemsetAsync");
    }
    verdict(st, info, e, i, u, width, true);
    detail::install_basis_kernel<<<static_cast<unsigned>(rank), 256, 0, st>>>(
        u, e.dim0, width, rank, e.side == Side::left, info + 2, e.basis);
    detail::check_launch("install_basis_kernel");
    e.ready = true;  // a candidate, or the identity basis
  }

  /// The exact refresh of tensor i on a lane: the top-r eigenvectors of H = ĜĜᵀ (fp32
  /// products: the Gram squares the spectrum). Not scaled as the randomized refresh is (that
  /// needs Ĝ·2^e as a GEMM operand: a copy of G), so a gradient whose largest |x| is below about
  /// 2^-75 or above 2^60 still under- or overflows H here.
  void exact_refresh(const detail::Lane& l, Entry& e, std::size_t i) {
    detail::check(cudaMemsetAsync(l.info, 0, 4 * sizeof(int), l.stream), "cudaMemsetAsync");
    const auto* g = static_cast<const float*>(e.t.grad);
    const index_t n = e.t.cols, mm = e.t.rows;
    if (e.side == Side::right)  // Ĝ = Gc (n×m): H = Gc Gcᵀ
      detail::gemm(l.blas, false, true, n, n, mm, 1.0f, g, n, g, n, 0.0f, l.h, n, false);
    else  // Ĝ = Gcᵀ: H = Gcᵀ Gc
      detail::gemm(l.blas, true, false, mm, mm, n, 1.0f, g, n, g, n, 0.0f, l.h, mm, false);
    const int d = static_cast<int>(e.dim0);
    detail::check_solver(
        cusolverDnSsyevd(l.solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, d, l.h, d,
                         l.eig, l.work, l.lwork, l.info),
        "cusolverDnSsyevd");
    accumulate_info(l);
    install(l.stream, l.info, e, i, l.h + (e.dim0 - rank) * e.dim0, rank);
  }

  // ---- the batched randomized refresh (caller's stream, handles blas and solver) ----------
  // Per tensor as the CPU: Ω from Philox, Y = ĜΩ, q power iterations orthonormalised by shifted
  // Cholesky-QR, Q by Cholesky-QR2, Bᵀ = ĜᵀQ, the top-r eigenvectors V of BBᵀ (ℓ×ℓ), U = Q·V.
  // The large products run per tensor (TF32 when asked); the small dense steps, which cost a
  // cuSOLVER call each and dominated the refresh (H100, per tensor: 6 potrf 3.0 ms, syevd
  // 5.6 ms, 6 trsm 1.0 ms, all GEMMs 0.3-0.8 ms), run batched: the Grams as one strided GEMM,
  // potrfBatched and trsmBatched over a run of tensors of one shape, and one XsyevBatched over
  // up to Options::refresh_batch tensors of one ℓ (its time is mostly per call: 8 matrices 52 ms,
  // 24 47 ms, 168 96 ms).

  /// X_c (rows×ℓ at x + c·stride, c < n) ← an orthonormal basis of its span by shifted
  /// Cholesky-QR (shift = factor·trace(XᵀX)); the Grams go to h (n matrices ℓ×ℓ, contiguous);
  /// breakdowns to slot_info (4 ints per tensor).
  void batched_cholesky_qr(cudaStream_t stream, float* x, index_t stride, index_t rows, index_t ell,
                           int n, float* h, int* slot_info, float factor) {
    const detail::RefreshBatch& b = batch;
    const float one = 1.0f, zero = 0.0f;
    const int ie = static_cast<int>(ell), ir = static_cast<int>(rows);
    detail::check_cublas(
        cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, ie, ie, ir, &one, x, CUDA_R_32F,
                                   ir, stride, x, CUDA_R_32F, ir, stride, &zero, h, CUDA_R_32F, ie,
                                   ell * ell, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx (Gram)");
    detail::shift_diagonal_kernel<<<dim3(1, static_cast<unsigned>(n)), 256, 0, stream>>>(h, ell,
                                                                                         factor);
    detail::check_launch("shift_diagonal_kernel");
    detail::strided_ptrs_kernel<<<1, 32, 0, stream>>>(b.hp, h, ell * ell, n);
    detail::check_launch("strided_ptrs_kernel");
    detail::strided_ptrs_kernel<<<1, 32, 0, stream>>>(b.xp, x, stride, n);
    detail::check_launch("strided_ptrs_kernel");
    detail::check_solver(
        cusolverDnSpotrfBatched(solver, CUBLAS_FILL_MODE_UPPER, ie, b.hp, ie, b.pinfo, n),
        "cusolverDnSpotrfBatched");
    detail::batch_info_kernel<<<1, 32, 0, stream>>>(b.pinfo, n, slot_info);
    detail::check_launch("batch_info_kernel");
    detail::check_cublas(
        cublasStrsmBatched(blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                           CUBLAS_DIAG_NON_UNIT, ir, ie, &one, b.hp, ie, b.xp, ir, n),
        "cublasStrsmBatched");
  }

  /// Range finder of the tensors idx[c0..c1) (one shape), at slots c0 − b0.. of the batch: Q
  /// into b.q, BBᵀ into b.h.
  void range_finder(cudaStream_t stream, const std::vector<std::size_t>& idx, std::size_t b0,
                    std::size_t c0, std::size_t c1, std::int64_t k) {
    const detail::RefreshBatch& b = batch;
    const Entry& f = entries[idx[c0]];
    const index_t ell = f.ell, d0 = f.dim0, d1 = f.dim1;
    const int n = static_cast<int>(c1 - c0);
    const auto j0 = static_cast<index_t>(c0 - b0);
    float* q0 = b.q + j0 * b.q_stride;
    float* h0 = b.h + j0 * ell * ell;
    int* info0 = b.slot_info + 4 * j0;
    auto q_of = [&](std::size_t c) { return q0 + static_cast<index_t>(c - c0) * b.q_stride; };
    auto z_of = [&](std::size_t c) { return b.z + static_cast<index_t>(c - c0) * b.z_stride; };
    const float one = 1.0f, zero = 0.0f;
    for (std::size_t c = c0; c < c1; ++c) {
      const Entry& e = entries[idx[c]];
      const random::Key key{svd.seed, e.t.id, static_cast<std::uint32_t>(k / svd.update_gap)};
      // Ω (dim1×ℓ) in Philox's row-major order, then transposed into Z (col-major dim1×ℓ).
      fill_gaussian(DeviceView<float>(b.omega, d1, ell, ell), key, 1.0, stream);
      detail::check_cublas(
          cublasSgeam(blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(d1), static_cast<int>(ell),
                      &one, b.omega, static_cast<int>(ell), &zero, z_of(c), static_cast<int>(d1),
                      z_of(c), static_cast<int>(d1)),
          "cublasSgeam");
      scaled_ghat_times(stream, idx[c], z_of(c), q_of(c), ell, false);
    }
    // Shifted Cholesky-QR between products: enough to keep the sketch from collapsing onto the
    // top singular vector; the shift (ℓ·ε·‖X‖²_F) keeps a rank-deficient sketch factorisable.
    const float eps = std::numeric_limits<float>::epsilon();
    const float shift = static_cast<float>(ell) * eps;
    for (index_t it = 0; it < svd.power_iterations; ++it) {
      batched_cholesky_qr(stream, q0, b.q_stride, d0, ell, n, h0, info0, shift);
      for (std::size_t c = c0; c < c1; ++c)
        scaled_ghat_times(stream, idx[c], q_of(c), z_of(c), ell, true);
      batched_cholesky_qr(stream, b.z, b.z_stride, d1, ell, n, h0, info0, shift);
      for (std::size_t c = c0; c < c1; ++c)
        scaled_ghat_times(stream, idx[c], z_of(c), q_of(c), ell, false);
    }
    // Cholesky-QR2: Q orthonormal to working accuracy.
    batched_cholesky_qr(stream, q0, b.q_stride, d0, ell, n, h0, info0, shift);
    batched_cholesky_qr(stream, q0, b.q_stride, d0, ell, n, h0, info0, eps);
    for (std::size_t c = c0; c < c1; ++c)  // Bᵀ = ĜᵀQ (dim1×ℓ)
      scaled_ghat_times(stream, idx[c], q_of(c), z_of(c), ell, true);
    const int ie = static_cast<int>(ell), i1 = static_cast<int>(d1);
    detail::check_cublas(cublasGemmStridedBatchedEx(
                             blas, CUBLAS_OP_T, CUBLAS_OP_N, ie, ie, i1, &one, b.z, CUDA_R_32F, i1,
                             b.z_stride, b.z, CUDA_R_32F, i1, b.z_stride, &zero, h0, CUDA_R_32F, ie,
                             ell * ell, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                         "cublasGemmStridedBatchedEx (BBᵀ)");
  }

  /// The randomized refresh of the tensors idx[b0..b1) (one ℓ, at most bs of them, sorted by
  /// shape): range finders in runs of one shape, one batched eigensolver, then per tensor
  /// U = Q·V[:, ℓ−r:] and the verdict.
  void refresh_batch(cudaStream_t stream, const std::vector<std::size_t>& idx, std::size_t b0,
                     std::size_t b1, std::int64_t k) {
    const detail::RefreshBatch& b = batch;
    const int count = static_cast<int>(b1 - b0);
    const index_t ell = entries[idx[b0]].ell;
    detail::check(cudaMemsetAsync(b.slot_info, 0, 4 * static_cast<std::size_t>(count) * 4, stream),
                  "cudaMemsetAsync");
    for (std::size_t c0 = b0; c0 < b1;) {
      const Entry& f = entries[idx[c0]];
      std::size_t c1 = c0;
      while (c1 < b1 && c1 - c0 < static_cast<std::size_t>(b.bq) &&
             entries[idx[c1]].dim0 == f.dim0 && entries[idx[c1]].dim1 == f.dim1)
        ++c1;
      range_finder(stream, idx, b0, c0, c1, k);
      c0 = c1;
    }
    detail::sanitize_kernel<<<static_cast<unsigned>(count), 1024, 0, stream>>>(b.h, ell,
                                                                               b.slot_info);
    detail::check_launch("sanitize_kernel");
    detail::check_solver(
        cusolverDnXsyevBatched(solver, solver_params, CUSOLVER_EIG_MODE_VECTOR,
                               CUBLAS_FILL_MODE_UPPER, ell, CUDA_R_32F, b.h, ell, CUDA_R_32F, b.eig,
                               CUDA_R_32F, b.syev_work, b.syev_bytes, syev_host.data(),
                               b.syev_host_bytes, b.sinfo, count),
        "cusolverDnXsyevBatched");
    detail::batch_info_kernel<<<(count + 127) / 128, 128, 0, stream>>>(b.sinfo, count, b.slot_info);
    detail::check_launch("batch_info_kernel");
    for (std::size_t c = b0; c < b1; ++c) {
      const std::size_t i = idx[c];
      Entry& e = entries[i];
      const auto j = static_cast<index_t>(c - b0);
      const float* v = b.h + j * ell * ell + (ell - rank) * ell;  // ascending: the top r last
      detail::gemm(blas, false, false, e.dim0, rank, ell, 1.0f, b.q + j * b.q_stride, e.dim0, v,
                   ell, 0.0f, b.u, e.dim0, false);
      install(stream, b.slot_info + 4 * j, e, i, b.u, rank);
    }
  }

  /// The randomized refresh of the tensors idx, in batches of one ℓ.
  void randomized_refresh(cudaStream_t stream, std::vector<std::size_t> idx, std::int64_t k) {
    if (idx.empty()) return;
    std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t c) {
      const Entry &x = entries[a], &y = entries[c];
      return std::tuple{x.ell, x.dim0, x.dim1} < std::tuple{y.ell, y.dim0, y.dim1};
    });
    detail::check_cublas(cublasSetStream(blas, stream), "cublasSetStream");
    detail::check_cublas(cublasSetWorkspace(blas, blas_ws, blas_workspace), "cublasSetWorkspace");
    detail::check_solver(cusolverDnSetStream(solver, stream), "cusolverDnSetStream");
    for (std::size_t b0 = 0; b0 < idx.size();) {
      const index_t ell = entries[idx[b0]].ell;
      std::size_t b1 = b0;
      while (b1 < idx.size() && b1 - b0 < static_cast<std::size_t>(batch.bs) &&
             entries[idx[b1]].ell == ell)
        ++b1;
      refresh_batch(stream, idx, b0, b1, k);
      b0 = b1;
    }
  }

  /// The tracking's squarings: X ← (X·X)/‖X·X‖_F, 2^10 = 1024 powers of BᵀB, so v₁'s
  /// component dominates every other by (λ₁/λ₂)^1024; then power steps with BᵀB itself bring
  /// the vector to float rounding. Replaces a double syevd of the whole r×r spectrum.
  static constexpr int squarings = 10;
  static constexpr int power_steps = 3;

  /// v (r) ← the top eigenvector of the symmetric A (r×r col-major, left intact), up to sign:
  /// the geodesic step is the same for ±v.
  void top_eigenvector(const detail::Lane& l, const float* a, index_t r, float* v,
                       float* tmp) const {
    float* x = l.sq;
    float* y = l.sq + r * r;
    detail::normalise_kernel<<<1, 1024, 0, l.stream>>>(a, x, r * r);
    detail::check_launch("normalise_kernel");
    for (int q = 0; q < squarings; ++q) {
      detail::gemm(l.blas, false, false, r, r, r, 1.0f, x, r, x, r, 0.0f, y, r, false);
      detail::normalise_kernel<<<1, 1024, 0, l.stream>>>(y, x, r * r);
      detail::check_launch("normalise_kernel");
    }
    detail::top_column_kernel<<<1, 256, 0, l.stream>>>(x, r, v);
    detail::check_launch("top_column_kernel");
    const float one = 1.0f, zero = 0.0f;
    for (int q = 0; q < power_steps; ++q) {
      detail::normalise_kernel<<<1, 1024, 0, l.stream>>>(v, v, r);
      detail::check_launch("normalise_kernel");
      detail::check_cublas(
          cublasSgemv(l.blas, CUBLAS_OP_N, static_cast<int>(r), static_cast<int>(r), &one, a,
                      static_cast<int>(r), v, 1, &zero, tmp, 1),
          "cublasSgemv");
      detail::normalise_kernel<<<1, 1024, 0, l.stream>>>(tmp, v, r);
      detail::check_launch("normalise_kernel");
    }
  }

  void track(const detail::Lane& l, Entry& e, std::size_t k, bool reorth) {
    const bool tf32 = options.tf32;
    const index_t d0 = e.dim0, d1 = e.dim1, r = rank;
    const float one = 1.0f, zero = 0.0f;
    detail::check(cudaMemsetAsync(l.info, 0, 4 * sizeof(int), l.stream), "cudaMemsetAsync");
    // S (dim0×r col-major) from the stored basis: a copy (right) or a transpose (left).
    if (e.side == Side::right)
      detail::check(cudaMemcpyAsync(l.s, e.basis, static_cast<std::size_t>(d0 * r) * 4,
                                    cudaMemcpyDeviceToDevice, l.stream),
                    "cudaMemcpyAsync");
    else
      detail::check_cublas(cublasSgeam(l.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(d0),
                                       static_cast<int>(r), &one, e.basis, static_cast<int>(r),
                                       &zero, l.s, static_cast<int>(d0), l.s, static_cast<int>(d0)),
                           "cublasSgeam");
    float* at = l.z;   // Aᵀ = ĜᵀS (dim1×r)
    float* w = l.u;    // W = ĜAᵀ (dim0×r), then B
    float* sw = l.h;   // SᵀW (r×r), then BᵀB
    float* v = l.vec;  // r
    float* bv = v + r;
    float* sv = bv + d0;
    float* gw = sv + d0;
    float* wnorm = gw + d0;
    ghatT_times(l.blas, e, l.s, at, r, tf32);
    ghat_times(l.blas, e, at, w, r, tf32);
    detail::check_cublas(cublasSetPointerMode(l.blas, CUBLAS_POINTER_MODE_DEVICE), "pointer mode");
    detail::check_cublas(cublasSnrm2(l.blas, static_cast<int>(d0 * r), w, 1, wnorm), "cublasSnrm2");
    detail::check_cublas(cublasSetPointerMode(l.blas, CUBLAS_POINTER_MODE_HOST), "pointer mode");
    for (int pass = 0; pass < 2; ++pass) {  // B = (I − SSᵀ)W, twice
      detail::gemm(l.blas, true, false, r, r, d0, 1.0f, l.s, d0, w, d0, 0.0f, sw, r, false);
      detail::gemm(l.blas, false, false, d0, r, r, -1.0f, l.s, d0, sw, r, 1.0f, w, d0, false);
    }
    detail::gemm(l.blas, true, false, r, r, d0, 1.0f, w, d0, w, d0, 0.0f, sw, r, false);  // BᵀB
    const int ir = static_cast<int>(r);
    top_eigenvector(l, sw, r, v, gw);
    detail::check_cublas(cublasSgemv(l.blas, CUBLAS_OP_N, static_cast<int>(d0), ir, &one, w,
                                     static_cast<int>(d0), v, 1, &zero, bv, 1),
                         "cublasSgemv");
    detail::check_cublas(cublasSgemv(l.blas, CUBLAS_OP_N, static_cast<int>(d0), ir, &one, l.s,
                                     static_cast<int>(d0), v, 1, &zero, sv, 1),
                         "cublasSgemv");
    detail::geodesic_kernel<<<1, 256, 0, l.stream>>>(bv, sv, wnorm, d0, d1, eta, gw,
                                                     track_info + 2 * k);
    detail::check_launch("geodesic_kernel");
    detail::check_cublas(
        cublasSger(l.blas, static_cast<int>(d0), ir, &one, gw, 1, v, 1, l.s, static_cast<int>(d0)),
        "cublasSger");
    if (reorth) cholesky_qr(l, l.s, d0, r);
    float* c = l.h;  // C = S_newᵀ S_old (r×r), before the new basis overwrites the old
    if (options.projection_aware) {
      if (e.side == Side::right)  // S_old = Pc (d0×r)
        detail::gemm(l.blas, true, false, r, r, d0, 1.0f, l.s, d0, e.basis, d0, 0.0f, c, r, false);
      else  // S_oldᵀ = Sc (r×d0)
        detail::gemm(l.blas, true, true, r, r, d0, 1.0f, l.s, d0, e.basis, r, 0.0f, c, r, false);
    }
    verdict(l.stream, l.info, e, k, l.s, r, false);
    detail::store_tracked_kernel<<<64, 256, 0, l.stream>>>(l.s, d0, r, e.side == Side::left,
                                                           l.info + 2, e.basis);
    detail::check_launch("store_tracked_kernel");
    if (options.projection_aware)
      rotate_moments(l.stream, l.blas, l.sq, l.z, l.rot, e, c, l.info + 2, track_info + 2 * k + 1);
  }

  /// SubTrack++'s projection-aware moments after tensor k's tracking step (cpu::rotate_moments
  /// with b1 = b2 = 1, fp32 GEMMs): left (M, V r×n row-major = Mc n×r) M ← C M is
  /// Mc ← Mc Cᵀ; right (m×r = Mc r×m) M ← M Cᵀ is Mc ← C Mc. V likewise with C⊙C on V − M².
  /// rotate_finish_kernel writes back only when the basis turned (decision, θ). Scratch: cc
  /// (r×r), d (r·dim1), rot (2·r·dim1).
  void rotate_moments(cudaStream_t st, cublasHandle_t h, float* cc, float* d, float* rot, Entry& e,
                      const float* c, const int* decision, const double* theta) {
    const index_t r = rank, d1 = e.dim1, n = e.count;
    float* rm = rot;
    float* rd = rot + n;
    const auto blocks = static_cast<unsigned>(std::min<index_t>((n + 255) / 256, 1024));
    detail::square_kernel<<<static_cast<unsigned>((r * r + 255) / 256), 256, 0, st>>>(c, cc, r * r);
    detail::check_launch("square_kernel");
    detail::variance_term_kernel<<<blocks, 256, 0, st>>>(e.m, e.v, d, n);
    detail::check_launch("variance_term_kernel");
    if (e.side == Side::left) {
      detail::gemm(h, false, true, d1, r, r, 1.0f, e.m, d1, c, r, 0.0f, rm, d1, false);
      detail::gemm(h, false, true, d1, r, r, 1.0f, d, d1, cc, r, 0.0f, rd, d1, false);
    } else {
      detail::gemm(h, false, false, r, d1, r, 1.0f, c, r, e.m, r, 0.0f, rm, r, false);
      detail::gemm(h, false, false, r, d1, r, 1.0f, cc, r, d, r, 0.0f, rd, r, false);
    }
    detail::rotate_finish_kernel<<<blocks, 256, 0, st>>>(e.m, e.v, rm, rd, n, decision, theta);
    detail::check_launch("rotate_finish_kernel");
  }

  bool due(std::int64_t k) const {
    for (const Entry& e : entries)
      if (!e.ready) return true;
    if constexpr (grassmann)
      return k == 0 || transforms::Grassmann::tracking_due(k, svd.update_gap);
    else
      return transforms::SvdProjection::refresh_due(k, svd.update_gap);
  }

  /// skip ← 0, then the non-finite check of `what` (gradients or coefficients) ORed in.
  void check_finite(cudaStream_t stream, bool gradients, bool clear) {
    const auto nt = static_cast<unsigned>(entries.size());
    if (clear) detail::check(cudaMemsetAsync(skip, 0, nt * sizeof(int), stream), "cudaMemsetAsync");
    if (gradients)
      detail::check(cudaMemsetAsync(amax, 0, nt * sizeof(unsigned), stream), "cudaMemsetAsync");
    detail::nonfinite_kernel<<<dim3(gradients ? 64u : 4u, nt), 256, 0, stream>>>(
        gradients ? grad_ptrs : coeff_ptrs, gradients ? grad_counts : coeff_counts, rank,
        gradients ? nullptr : left_d, skip, gradients ? amax : nullptr);
    detail::check_launch("nonfinite_kernel");
  }

  void refresh_all(cudaStream_t stream, std::int64_t k) {
    // A tensor whose gradient is non-finite keeps its basis (the step skips it).
    check_finite(stream, true, true);
    bool any_track = false;
    if constexpr (grassmann) {
      bool all_ready = true;
      for (const Entry& e : entries)
        all_ready = all_ready && e.ready;
      any_track = all_ready && k > 0;
    }
    bool reorth = false;
    if (any_track) {
      ++tracking_steps;
      const index_t every = reorth_every;
      reorth = every > 0 && tracking_steps % every == 0;
    }
    // A tensor whose basis is still the identity of a failed first SVD runs the SVD again
    // instead of tracking, as the CPU's Grassmann (the flags are read only at a tracking step
    // after an SVD refresh: one synchronisation).
    std::vector<int> prov(entries.size(), 0);
    if (any_track && maybe_provisional) {
      detail::check(cudaMemcpyAsync(prov.data(), provisional, prov.size() * sizeof(int),
                                    cudaMemcpyDeviceToHost, stream),
                    "cudaMemcpyAsync");
      detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    }
    // The randomized refreshes run batched on the caller's stream; the tracking steps and
    // exact refreshes on the lanes, forked from it and joined back.
    std::vector<std::size_t> batched, laned, retried;
    std::vector<char> tracks(entries.size(), 0);
    maybe_provisional = !any_track;
    for (std::size_t i = 0; i < entries.size(); ++i) {
      tracks[i] = any_track && entries[i].ready && prov[i] == 0;
      if (any_track && prov[i] != 0) {
        retried.push_back(i);
        maybe_provisional = true;  // the retry may fail again
      }
      if (!tracks[i] && svd.method == transforms::SvdMethod::randomized)
        batched.push_back(i);
      else
        laned.push_back(i);
    }
    if (!laned.empty()) {
      detail::check(cudaEventRecord(fork, stream), "cudaEventRecord");
      for (detail::Lane& l : lanes)
        detail::check(cudaStreamWaitEvent(l.stream, fork, 0), "cudaStreamWaitEvent");
    }
    // One host thread per lane: lanes fed from one thread ran one after another, as if each
    // cuSOLVER call waited for the host (H100, the randomized refresh of the 168-tensor set
    // when it ran on the lanes: 1 lane 1.84 s, 8 lanes from one thread 1.80 s, 8 lanes with a
    // thread each 0.90 s). Each thread owns its lane's stream and handles.
    int device = 0;
    detail::check(cudaGetDevice(&device), "cudaGetDevice");
    const std::size_t nl = laned.empty() ? 0 : lanes.size();
    std::vector<std::exception_ptr> errors(nl);
    std::vector<std::thread> threads;
    threads.reserve(nl);
    for (std::size_t li = 0; li < nl; ++li)
      threads.emplace_back([&, li] {
        try {
          detail::check(cudaSetDevice(device), "cudaSetDevice");
          const detail::Lane& l = lanes[li];
          for (std::size_t j = li; j < laned.size(); j += nl) {
            const std::size_t i = laned[j];
            Entry& e = entries[i];
            if (tracks[i])
              track(l, e, i, reorth);
            else
              exact_refresh(l, e, i);
          }
        } catch (...) {
          errors[li] = std::current_exception();
        }
      });
    std::exception_ptr batched_error;
    try {
      randomized_refresh(stream, batched, k);
    } catch (...) {
      batched_error = std::current_exception();
    }
    for (std::thread& t : threads)
      t.join();
    if (batched_error) std::rethrow_exception(batched_error);
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
    for (std::size_t li = 0; li < nl; ++li) {
      detail::Lane& l = lanes[li];
      detail::check(cudaEventRecord(l.done, l.stream), "cudaEventRecord");
      detail::check(cudaStreamWaitEvent(stream, l.done, 0), "cudaStreamWaitEvent");
    }
    if (options.projection_aware && !retried.empty()) rotate_retried(stream, retried);
  }

  /// SubTrack++'s projection-aware moments after a retried SVD that installed its candidate
  /// (the CPU's refresh_now reports a change and C = S_newᵀ S_old, S_old the identity basis):
  /// on the caller's stream after the join, in lane 0's scratch.
  void rotate_retried(cudaStream_t stream, const std::vector<std::size_t>& retried) {
    const detail::Lane& l = lanes.front();
    detail::check_cublas(cublasSetStream(blas, stream), "cublasSetStream");
    detail::check_cublas(cublasSetWorkspace(blas, blas_ws, blas_workspace), "cublasSetWorkspace");
    for (const std::size_t i : retried) {
      Entry& e = entries[i];
      detail::identity_overlap_kernel<<<1, 256, 0, stream>>>(e.basis, e.dim0, rank,
                                                             e.side == Side::left, l.h);
      detail::check_launch("identity_overlap_kernel");
      // provisional[i] is 0 (install_candidate) exactly when the retry installed its basis.
      rotate_moments(stream, blas, l.sq, l.z, l.rot, e, l.h, provisional + i, nullptr);
    }
  }

  // ---- bf16 and fp32-master parameters ----------------------------------------------------
  /// Before a step: the bf16 gradients (and bf16 weights) widened into the fp32 copies.
  void widen_params(cudaStream_t stream) const {
    convert<std::uint16_t, float>(stream, widen, h_widen);
  }
  /// After a step: the fp32 weights rounded once into the bf16 weights or model copies.
  void narrow_params(cudaStream_t stream) const {
    convert<float, std::uint16_t>(stream, narrow, h_narrow);
  }
  template <class S, class D>
  void convert(cudaStream_t stream, const detail::ConvertEntry* table,
               const std::vector<detail::ConvertEntry>& host) const {
    if (host.empty()) return;
    const auto blocks = static_cast<unsigned>(std::min<index_t>((convert_max + 1023) / 1024, 64));
    detail::convert_kernel<S, D>
        <<<dim3(blocks, static_cast<unsigned>(host.size())), 256, 0, stream>>>(table);
    detail::check_launch("convert_kernel");
  }

  // ---- the steady step ---------------------------------------------------------------------
  optim::AdamStep step_scalars() const { return optim::Adam::step_scalars(options.rule, t + 1); }

  /// Flags (the coefficients' check ORed into what a refresh found), the per-tensor scalars,
  /// then Adam on every coefficient.
  void adam(cudaStream_t stream, const optim::AdamStep& s, bool refreshed, const StepScalars* ds) {
    check_finite(stream, false, !refreshed);
    const int nt = static_cast<int>(entries.size());
    const auto& r = options.rule;
    const detail::RuleScalars rule{1.0, r.beta1, r.beta2, r.eps, static_cast<int>(r.convention)};
    detail::tensor_scalars_kernel<<<(nt + 127) / 128, 128, 0, stream>>>(
        skip, skips, tscal, nt, static_cast<long long>(t + 1), rule, s.denom_divisor, s.eps, ds,
        slots, weights, sink);
    detail::check_launch("tensor_scalars_kernel");
    const index_t n4 = total / 4;
    const int blocks = static_cast<int>(std::min<index_t>((n4 + 255) / 256, 132 * 8));
    detail::lowrank_adam_kernel<<<blocks, 256, 0, stream>>>(
        reinterpret_cast<float4*>(coeff), reinterpret_cast<float4*>(m),
        reinterpret_cast<float4*>(v), n4, s, offsets_d, nt, skip, tscal, ds);
    detail::check_launch("lowrank_adam_kernel");
  }

  /// β and α' of the update GEMM: W ← β·W + α'·Back(N) is the convention's step and decay.
  std::pair<float, float> update_scalars(const optim::AdamStep& s) const {
    const optim::WeightUpdate& wu = s.weight;
    const double decay =
        static_cast<double>(wu.decay_multiplier) * (1.0 + static_cast<double>(wu.decay_alpha));
    const double step = -static_cast<double>(wu.step_size) * options.scale;
    return {static_cast<float>(decay), static_cast<float>(wu.decay_before ? step : step * decay)};
  }

  // The projection and the update with one cuBLAS call per tensor (Options::batched = false).
  void project_per_tensor() {
    const index_t r = rank;
    for (const Entry& e : entries) {
      const auto* g = static_cast<const float*>(e.t.grad);
      const index_t mm = e.t.rows, n = e.t.cols;
      if (e.side == Side::right)
        detail::gemm(blas, true, false, r, mm, n, 1.0f, e.basis, n, g, n, 0.0f, e.coeff, r,
                     options.tf32);
      else
        detail::gemm(blas, false, true, n, r, mm, 1.0f, g, n, e.basis, r, 0.0f, e.coeff, n,
                     options.tf32);
    }
  }
  // The update through the group tables (count 1), so a skipped tensor's sink applies.
  void update_per_tensor(const float* alpha, const float* beta) {
    for (const Entry& e : entries)
      update_gemm(groups[e.group], e.slot, 1, alpha, beta);
  }
  /// α, β: host pointers, or device pointers under CUBLAS_POINTER_MODE_DEVICE (graphs).
  void update_gemm(const Group& g, std::size_t first, int count, const float* alpha,
                   const float* beta) {
    const cublasComputeType_t ct = options.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const int m = static_cast<int>(g.rows), n = static_cast<int>(g.cols);
    const int ri = static_cast<int>(rank);
    // Wc (n×m) += Pc (n×r) · Nc (r×m)  |  Nc (n×r) · Sc (r×m)
    detail::check_cublas(
        cublasGemmBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, ri, alpha,
                            reinterpret_cast<const void* const*>(g.a2 + first), CUDA_R_32F, n,
                            reinterpret_cast<const void* const*>(g.b2 + first), CUDA_R_32F, ri,
                            beta, reinterpret_cast<void* const*>(g.c2 + first), CUDA_R_32F, n,
                            count, ct, CUBLAS_GEMM_DEFAULT),
        "cublasGemmBatchedEx (update)");
  }

  /// Adam and the update; ds: the scalars from device memory (graph replays).
  void adam_update(cudaStream_t stream, bool refreshed, const StepScalars* ds) {
    const optim::AdamStep s = step_scalars();
    if (options.recovery_scaling)  // the raw C, before Adam overwrites it with N
      detail::check(cudaMemcpyAsync(raw, coeff, static_cast<std::size_t>(total) * 4,
                                    cudaMemcpyDeviceToDevice, stream),
                    "cudaMemcpyAsync");
    adam(stream, s, refreshed, ds);
    // W ← β·W + α'·Back(N): decay and step of the convention in one GEMM epilogue.
    const auto [beta, alpha] = update_scalars(s);
    const float* pa = &alpha;
    const float* pb = &beta;
    if (ds != nullptr) {
      detail::update_scalars_kernel<<<1, 32, 0, stream>>>(ds, options.scale, upd);
      detail::check_launch("update_scalars_kernel");
      detail::check_cublas(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_DEVICE), "pointer mode");
      pa = upd;
      pb = upd + 1;
    }
    if (options.batched)
      for (const Group& g : groups)
        update_gemm(g, 0, g.count, pa, pb);
    else
      update_per_tensor(pa, pb);
    if (ds != nullptr)
      detail::check_cublas(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_HOST), "pointer mode");
    if (options.recovery_scaling) recover(stream, s, ds);
  }

  /// SubTrack++'s recovery scaling, per tensor after the update GEMM (which applied the decay
  /// and α·Expand(N)): Λ = (G − Expand(C)) ⊙ φ, ρ = NL(‖Λ‖), W += −step·Λ/ρ (the CPU's
  /// U = α·Expand(N) + Λ/ρ, W ← W − step·U with the convention's decay).
  void recover(cudaStream_t stream, const optim::AdamStep& s, const StepScalars* ds) {
    const index_t r = rank;
    for (std::size_t k = 0; k < entries.size(); ++k) {
      const Entry& e = entries[k];
      const index_t mm = e.t.rows, n = e.t.cols;
      const std::size_t bytes = static_cast<std::size_t>(mm * n) * 4;
      const float* c = raw + (e.coeff - coeff);
      detail::check(cudaMemcpyAsync(lam, e.t.grad, bytes, cudaMemcpyDeviceToDevice, stream),
                    "cudaMemcpyAsync");
      // Λc (n×m) −= Pc (n×r)·Cc (r×m)  |  Cc (n×r)·Sc (r×m)
      if (e.side == Side::right)
        detail::gemm(blas, false, false, n, mm, r, -1.0f, e.basis, n, c, r, 1.0f, lam, n,
                     options.tf32);
      else
        detail::gemm(blas, false, false, n, mm, r, -1.0f, c, n, e.basis, r, 1.0f, lam, n,
                     options.tf32);
      const bool left = e.side == Side::left;
      const index_t chans = e.dim1;
      const index_t per_block = left ? 256 : 8;  // channels: a thread each, or a warp each
      detail::recovery_phi_kernel<<<static_cast<unsigned>((chans + per_block - 1) / per_block), 256,
                                    0, stream>>>(e.coeff, c, chans, r, left, tscal + k, phi);
      detail::check_launch("recovery_phi_kernel");
      detail::check(cudaMemsetAsync(lam_norm, 0, sizeof(double), stream), "cudaMemsetAsync");
      const auto blocks = static_cast<unsigned>(std::min<index_t>((mm * n + 255) / 256, 132 * 4));
      detail::recovery_scale_kernel<<<blocks, 256, 0, stream>>>(lam, phi, mm, n, left, lam_norm);
      detail::check_launch("recovery_scale_kernel");
      detail::recovery_limiter_kernel<<<1, 32, 0, stream>>>(lam_norm, limiter + k,
                                                            options.limiter_gamma, skip + k,
                                                            tscal + k, s.weight, ds, lam_coef);
      detail::check_launch("recovery_limiter_kernel");
      detail::recovery_apply_kernel<<<blocks, 256, 0, stream>>>(static_cast<float*>(e.t.weight),
                                                                lam, mm * n, lam_coef, skip + k);
      detail::check_launch("recovery_apply_kernel");
    }
  }

  void project_adam_update(cudaStream_t stream, bool refreshed, const StepScalars* ds) {
    // cublasSetStream resets the handle to its default workspace pool: set ours again, so the
    // step never allocates.
    detail::check_cublas(cublasSetStream(blas, stream), "cublasSetStream");
    detail::check_cublas(cublasSetWorkspace(blas, blas_ws, blas_workspace), "cublasSetWorkspace");
    const cublasComputeType_t ct = options.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const float one = 1.0f, zero = 0.0f;
    const index_t r = rank;
    if (!options.batched) {
      project_per_tensor();
      adam_update(stream, refreshed, ds);
      return;
    }
    for (const Group& g : groups) {
      const int m = static_cast<int>(g.rows), n = static_cast<int>(g.cols);
      const int ri = static_cast<int>(r);
      if (g.side == Side::right)  // Rc (r×m) = Pcᵀ (n×r)ᵀ · Gc (n×m)
        detail::check_cublas(
            cublasGemmBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, ri, m, n, &one,
                                reinterpret_cast<const void* const*>(g.a1), CUDA_R_32F, n,
                                reinterpret_cast<const void* const*>(g.b1), CUDA_R_32F, n, &zero,
                                reinterpret_cast<void* const*>(g.c1), CUDA_R_32F, ri, g.count, ct,
                                CUBLAS_GEMM_DEFAULT),
            "cublasGemmBatchedEx (project)");
      else  // Rc (n×r) = Gc (n×m) · Sc (r×m)ᵀ
        detail::check_cublas(
            cublasGemmBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, ri, m, &one,
                                reinterpret_cast<const void* const*>(g.a1), CUDA_R_32F, n,
                                reinterpret_cast<const void* const*>(g.b1), CUDA_R_32F, ri, &zero,
                                reinterpret_cast<void* const*>(g.c1), CUDA_R_32F, n, g.count, ct,
                                CUBLAS_GEMM_DEFAULT),
            "cublasGemmBatchedEx (project)");
    }
    adam_update(stream, refreshed, ds);
  }
};

template <class Transform>
std::size_t MultiTensorLowRank<Transform>::workspace_bytes(std::span<const Tensor> tensors,
                                                           const Options& options) {
  return State::carve(tensors, options, State::sizes(tensors, options), nullptr, nullptr);
}

template <class Transform>
MultiTensorLowRank<Transform>::MultiTensorLowRank(std::span<const Tensor> tensors,
                                                  const Options& options, void* workspace,
                                                  std::size_t workspace_size, stream_t stream)
    : s_(std::make_unique<State>()) {
  constexpr const char* who = "cuda::MultiTensorLowRank";
  optim::Adam::validate(options.rule);
  const auto o = detail::svd_options_of(options.transform);
  require(o.rank >= 1, std::string(who) + ": rank must be at least 1");
  require(o.update_gap >= 1, std::string(who) + ": update_gap must be at least 1");
  require(o.oversampling >= 0 && o.power_iterations >= 0,
          std::string(who) + ": oversampling and power_iterations must be non-negative");
  require(std::isfinite(options.scale), std::string(who) + ": scale must be finite");
  require(options.lanes >= 1 && options.lanes <= 64,
          std::string(who) + ": lanes must lie in [1, 64]");
  require(options.refresh_batch >= 1, std::string(who) + ": refresh_batch must be at least 1");
  require(options.limiter_gamma == 0.0 ||
              (std::isfinite(options.limiter_gamma) && options.limiter_gamma >= 1.0),
          std::string(who) + ": limiter_gamma must be 0 (off) or >= 1");
  require(
      options.recovery_scaling || options.limiter_gamma == 0.0,
      std::string(who) + ": the limiter acts on the recovered residual: it needs recovery_scaling");
  require(!options.projection_aware || State::grassmann,
          std::string(who) +
              ": projection_aware rotates the moments at a tracking step: Grassmann only");
  if constexpr (State::grassmann)
    require(std::isfinite(options.transform.eta) && options.transform.eta >= 0.0 &&
                options.transform.reorth_every >= 0,
            std::string(who) + ": eta must be finite and >= 0, reorth_every >= 0");
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = tensors[k];
    detail::check_tensor(t, options.precision, k, who);
    require(t.rows > 0 && t.cols > 0 && o.rank <= std::min(t.rows, t.cols),
            std::string(who) + ": tensor " + std::to_string(k) + " (" + std::to_string(t.rows) +
                "x" + std::to_string(t.cols) + ") is empty or smaller than the rank " +
                std::to_string(o.rank));
    require(t.rows < (index_t{1} << 31) && t.cols < (index_t{1} << 31),
            std::string(who) + ": dimensions must fit cuBLAS's int");
  }
  const auto sizes = State::sizes(tensors, options);
  const std::size_t need = State::carve(tensors, options, sizes, nullptr, nullptr);
  detail::check_workspace(workspace, workspace_size, need, who);
  State& s = *s_;
  s.options = options;
  s.svd = o;
  s.rank = o.rank;
  if constexpr (State::grassmann) {
    s.eta = options.transform.eta;
    s.reorth_every = options.transform.reorth_every;
  }
  State::carve(tensors, options, sizes, static_cast<char*>(workspace), &s);
  for (const auto& e : s.entries)
    s.state_bytes += 2 * static_cast<std::size_t>(e.count) * 4 +
                     static_cast<std::size_t>(o.rank * e.dim0) * 4 +
                     (options.limiter_gamma > 0.0 ? sizeof(float) : 0);

  detail::check_cublas(cublasCreate(&s.blas), "cublasCreate");
  detail::check_cublas(cublasSetWorkspace(s.blas, s.blas_ws, State::blas_workspace),
                       "cublasSetWorkspace");
  detail::check(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming), "cudaEventCreate");
  if (s.batch.bs > 0) {
    detail::check_solver(cusolverDnCreate(&s.solver), "cusolverDnCreate");
    detail::check_solver(cusolverDnCreateParams(&s.solver_params), "cusolverDnCreateParams");
    s.syev_host.resize(std::max<std::size_t>(s.batch.syev_host_bytes, 1));
  }
  for (std::size_t i = 0; i < s.lanes.size(); ++i) {
    detail::Lane& l = s.lanes[i];
    detail::check(cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking), "cudaStreamCreate");
    detail::check(cudaEventCreateWithFlags(&l.done, cudaEventDisableTiming), "cudaEventCreate");
    detail::check_cublas(cublasCreate(&l.blas), "cublasCreate");
    detail::check_cublas(cublasSetStream(l.blas, l.stream), "cublasSetStream");
    detail::check_cublas(cublasSetWorkspace(l.blas, s.lane_ws[i], State::lane_blas_workspace),
                         "cublasSetWorkspace");
    detail::check_solver(cusolverDnCreate(&l.solver), "cusolverDnCreate");
    detail::check_solver(cusolverDnSetStream(l.solver, l.stream), "cusolverDnSetStream");
  }
  // Zero moments (the coefficients' padding too) and the tracking info; upload the tables.
  const std::size_t bytes = static_cast<std::size_t>(s.total) * 4;
  detail::check(cudaMemsetAsync(s.coeff, 0, bytes, stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.m, 0, bytes, stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.v, 0, bytes, stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.track_info, 0, 2 * tensors.size() * sizeof(double), stream),
                "cudaMemsetAsync");
  const std::size_t nt = tensors.size();
  detail::check(cudaMemsetAsync(s.skip, 0, nt * sizeof(int), stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.skips, 0, nt * sizeof(int), stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.status, 0, 2 * nt * sizeof(int), stream), "cudaMemsetAsync");
  detail::check(cudaMemsetAsync(s.provisional, 0, nt * sizeof(int), stream), "cudaMemsetAsync");
  if (s.limiter)  // all bits set: NaN, the limiter's "unset"
    detail::check(cudaMemsetAsync(s.limiter, 0xFF, nt * sizeof(float), stream), "cudaMemsetAsync");
  auto upload = [&](void* dst, const auto& host) {
    detail::check(cudaMemcpyAsync(dst, host.data(), host.size() * sizeof(host[0]),
                                  cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync");
  };
  upload(s.offsets_d, s.h_offsets);
  upload(s.coeff_ptrs, s.h_coeff_ptrs);
  upload(s.coeff_counts, s.h_coeff_counts);
  upload(s.left_d, s.h_left);
  upload(s.grad_ptrs, s.h_grad_ptrs);
  upload(s.grad_counts, s.h_grad_counts);
  upload(s.slots, s.h_slots);
  upload(s.weights, s.h_weights);
  if (!s.h_widen.empty()) upload(s.widen, s.h_widen);
  if (!s.h_narrow.empty()) upload(s.narrow, s.h_narrow);
  std::size_t off = 0;
  for (const auto& g : s.groups) {
    const std::size_t n = 6 * static_cast<std::size_t>(g.count);
    detail::check(cudaMemcpyAsync(const_cast<float**>(g.a1), s.host_table.data() + off,
                                  n * sizeof(void*), cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync");
    off += n;
  }
  detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

template <class Transform>
MultiTensorLowRank<Transform>::~MultiTensorLowRank() = default;

template <class Transform>
void MultiTensorLowRank<Transform>::step(stream_t stream) {
  State& s = *s_;
  const bool refreshed = s.due(s.t);
  s.widen_params(stream);
  if (refreshed) s.refresh_all(stream, s.t);
  s.project_adam_update(stream, refreshed, nullptr);
  s.narrow_params(stream);
  ++s.t;
}

template <class Transform>
void MultiTensorLowRank<Transform>::step(stream_t stream, const StepScalars* device_scalars) {
  State& s = *s_;
  require(device_scalars != nullptr, "cuda::MultiTensorLowRank::step: null device scalars");
  require(!s.due(s.t),
          "cuda::MultiTensorLowRank::step: a refresh is due (step(stream) runs refresh steps)");
  s.widen_params(stream);
  s.project_adam_update(stream, false, device_scalars);
  s.narrow_params(stream);
  ++s.t;
}

template <class Transform>
StepScalars MultiTensorLowRank<Transform>::scalars(std::int64_t t) const {
  require(t >= 1, "cuda::MultiTensorLowRank::scalars: t must be >= 1");
  StepScalars sc;
  sc.adam = optim::Adam::step_scalars(s_->options.rule, t);
  sc.epoch = static_cast<std::uint32_t>(t - 1);
  return sc;
}

template <class Transform>
void MultiTensorLowRank<Transform>::set_lr(double lr) {
  require(std::isfinite(lr) && lr >= 0, "cuda::MultiTensorLowRank::set_lr: lr must be >= 0");
  s_->options.rule.lr = lr;
}

template <class Transform>
void MultiTensorLowRank<Transform>::refresh(stream_t stream) {
  s_->widen_params(stream);
  s_->refresh_all(stream, s_->t);
}

template <class Transform>
bool MultiTensorLowRank<Transform>::refresh_due() const {
  return s_->due(s_->t);
}
template <class Transform>
std::int64_t MultiTensorLowRank<Transform>::steps() const {
  return s_->t;
}
template <class Transform>
void MultiTensorLowRank<Transform>::set_steps(std::int64_t t) {
  require(t >= 0, "cuda::MultiTensorLowRank: the step count must not be negative");
  s_->t = t;
}
template <class Transform>
std::size_t MultiTensorLowRank<Transform>::state_bytes() const {
  return s_->state_bytes;
}
template <class Transform>
index_t MultiTensorLowRank<Transform>::tensors() const {
  return static_cast<index_t>(s_->entries.size());
}

namespace detail {
template <class State>
const auto& lowrank_entry(const State& s, index_t k) {
  require(k >= 0 && k < static_cast<index_t>(s.entries.size()),
          "cuda::MultiTensorLowRank: tensor index out of range");
  return s.entries[static_cast<std::size_t>(k)];
}
}  // namespace detail

template <class Transform>
Side MultiTensorLowRank<Transform>::side(index_t tensor) const {
  return detail::lowrank_entry(*s_, tensor).side;
}
template <class Transform>
Shape MultiTensorLowRank<Transform>::basis_shape(index_t tensor) const {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  return transforms::SvdProjection::basis_shape(Shape{e.t.rows, e.t.cols}, e.side, s_->rank);
}
template <class Transform>
Shape MultiTensorLowRank<Transform>::coeff_shape(index_t tensor) const {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  return transforms::SvdProjection::coeff_shape(Shape{e.t.rows, e.t.cols}, e.side, s_->rank);
}
template <class Transform>
void MultiTensorLowRank<Transform>::read_basis(index_t tensor, float* host) const {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(host, e.basis, static_cast<std::size_t>(s_->rank * e.dim0) * 4,
                           cudaMemcpyDeviceToHost),
                "cudaMemcpy");
}
template <class Transform>
void MultiTensorLowRank<Transform>::write_basis(index_t tensor, const float* host) {
  (void)detail::lowrank_entry(*s_, tensor);  // range check
  auto& e = s_->entries[static_cast<std::size_t>(tensor)];
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(e.basis, host, static_cast<std::size_t>(s_->rank * e.dim0) * 4,
                           cudaMemcpyHostToDevice),
                "cudaMemcpy");
  // A written basis is final unless set_provisional() says otherwise (a checkpoint's flag).
  detail::check(cudaMemset(s_->provisional + tensor, 0, sizeof(int)), "cudaMemset");
  e.ready = true;
}
template <class Transform>
bool MultiTensorLowRank<Transform>::provisional(index_t tensor) const {
  (void)detail::lowrank_entry(*s_, tensor);
  int p = 0;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(&p, s_->provisional + tensor, sizeof(int), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
  return p != 0;
}
template <class Transform>
void MultiTensorLowRank<Transform>::set_provisional(index_t tensor, bool provisional) {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  require(!provisional || e.ready,
          "cuda::MultiTensorLowRank: a provisional basis needs a basis (write_basis first)");
  const int p = provisional ? 1 : 0;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(s_->provisional + tensor, &p, sizeof(int), cudaMemcpyHostToDevice),
                "cudaMemcpy");
  // The next tracking step reads the flags (one synchronisation) and retries the SVD.
  if (provisional) s_->maybe_provisional = true;
}
template <class Transform>
void MultiTensorLowRank<Transform>::read_moments(index_t tensor, float* m, float* v) const {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const auto bytes = static_cast<std::size_t>(e.count) * 4;
  detail::check(cudaMemcpy(m, e.m, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  detail::check(cudaMemcpy(v, e.v, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
}
template <class Transform>
void MultiTensorLowRank<Transform>::write_moments(index_t tensor, const float* m, const float* v) {
  const auto& e = detail::lowrank_entry(*s_, tensor);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const auto bytes = static_cast<std::size_t>(e.count) * 4;
  detail::check(cudaMemcpy(e.m, m, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  detail::check(cudaMemcpy(e.v, v, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
}

template <class Transform>
float MultiTensorLowRank<Transform>::read_limiter(index_t tensor) const {
  (void)detail::lowrank_entry(*s_, tensor);
  if (s_->limiter == nullptr) return -1.0f;
  float x = -1.0f;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(&x, s_->limiter + tensor, sizeof(float), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
  return x >= 0.0f ? x : -1.0f;
}
template <class Transform>
void MultiTensorLowRank<Transform>::write_limiter(index_t tensor, float norm) {
  (void)detail::lowrank_entry(*s_, tensor);
  if (s_->limiter == nullptr) return;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(s_->limiter + tensor, &norm, sizeof(float), cudaMemcpyHostToDevice),
                "cudaMemcpy");
}

template <class Transform>
std::vector<index_t> MultiTensorLowRank<Transform>::last_skipped() const {
  const State& s = *s_;
  std::vector<int> flags(s.entries.size());
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(
      cudaMemcpy(flags.data(), s.skip, flags.size() * sizeof(int), cudaMemcpyDeviceToHost),
      "cudaMemcpy");
  std::vector<index_t> out;
  for (std::size_t k = 0; k < flags.size(); ++k)
    if (flags[k]) out.push_back(static_cast<index_t>(k));
  return out;
}
template <class Transform>
std::int64_t MultiTensorLowRank<Transform>::tensor_steps(index_t tensor) const {
  (void)detail::lowrank_entry(*s_, tensor);
  int skips = 0;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(&skips, s_->skips + tensor, sizeof(int), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
  return s_->t - skips;
}
template <class Transform>
void MultiTensorLowRank<Transform>::set_tensor_steps(index_t tensor, std::int64_t steps) {
  (void)detail::lowrank_entry(*s_, tensor);
  require(steps >= 0 && steps <= s_->t,
          "cuda::MultiTensorLowRank: a tensor's step count must lie in [0, steps()]");
  const int skips = static_cast<int>(s_->t - steps);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(s_->skips + tensor, &skips, sizeof(int), cudaMemcpyHostToDevice),
                "cudaMemcpy");
}
template <class Transform>
std::pair<transforms::RefreshStatus, transforms::RefreshFailure>
MultiTensorLowRank<Transform>::refresh_status(index_t tensor) const {
  (void)detail::lowrank_entry(*s_, tensor);
  int st[2] = {0, 0};
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(st, s_->status + 2 * tensor, sizeof(st), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
  return {static_cast<transforms::RefreshStatus>(st[0]),
          static_cast<transforms::RefreshFailure>(st[1])};
}

}  // namespace slimgrad::cuda
