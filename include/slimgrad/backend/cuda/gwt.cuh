// slimgrad/backend/cuda/gwt.cuh — Haar DWT along rows and GWT's fused step (api.hpp) on CUDA.
//
// The Haar transform of L levels maps each aligned group of 2^L samples of a row to exactly one
// a_L coefficient and 2^L − 1 details, independently of every other group; rows whose length is
// not a multiple of 2^L behave as if padded (mode 'zero': with zeros, which is pywt's rule;
// 'periodization': the last sample of a level repeated). So one thread takes one group: it
// loads 2^L samples, runs every level in registers, and the packed layout (transforms/dwt.hpp)
// is only an addressing rule. The arithmetic is the CPU's haar_forward_line/haar_inverse_line
// (same taps, same expressions), the Adam step optim/adam.hpp's, so with -fmad=false the
// CUDA results equal the CPU's bit for bit (up to the limiter: ρ's norm is summed in another
// order, and the optimistic step applies a limited update in two roundings).
//
// GWT step bytes per parameter (fp32, L = 2): one pass reads G and W and writes W (12) and
// reads/writes the moments of a quarter of the coefficients (4): 16 (AdamW: 28). The norm-growth
// limiter needs ‖N‖ of the whole tensor before it can scale an update: a first pass reads G and
// the moments (6, the finite check included), then the step: 22. The optimistic step (no finite
// check) steps with ρ = 1 while it sums ‖N‖² (pass A), and only the tensors the limiter then
// scales take a second pass (pass B: G, W and the moments read again, W written: 14) that moves
// W by the rest of the limited update: 16 + 14·(the fraction of tensors limited). The finite
// check without the limiter reads G alone first (4): 20.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../optim/adam.hpp"
#include "../../optim/residual.hpp"
#include "../../transforms/dwt.hpp"
#include "../../transforms/wavelets.hpp"
#include "common.cuh"

namespace slimgrad::cuda {

namespace detail {

template <class W>
struct HaarTaps {
  static_assert(W::filter_length == 2,
                "slimgrad cuda: the fused DWT kernels are written for Haar (filter length 2)");
  static constexpr float h0 = static_cast<float>(W::rec_lo[0]);
  static constexpr float h1 = static_cast<float>(W::rec_lo[1]);
  static constexpr float g0 = static_cast<float>(W::rec_hi[0]);
  static constexpr float g1 = static_cast<float>(W::rec_hi[1]);
};

/// Lengths N_0..N_L of one row's levels (a small copy of DwtLayout for kernel arguments).
template <int L>
struct RowLengths {
  index_t len[L + 1];
  index_t offset[L + 1];  // detail offsets in the packed row ([0] unused)
  index_t total;
};

template <int L>
RowLengths<L> row_lengths(index_t n, transforms::BoundaryMode mode) {
  const transforms::DwtLayout lay = transforms::dwt_layout(n, 2, L, mode);
  RowLengths<L> r{};
  for (int l = 0; l <= L; ++l) {
    r.len[l] = lay.length[l];
    r.offset[l] = lay.detail_offset[l];
  }
  r.total = lay.total;
  return r;
}

/// Loads the 2^L samples of group `grp` of a row of n (zeros past n).
template <int L, class T>
__device__ inline void load_group(const T* row, index_t grp, index_t n, bool vec,
                                  float (&x)[1 << L]) {
  constexpr int G = 1 << L;
  const index_t c0 = grp * G;
  if constexpr (G >= 4) {
#pragma unroll
    for (int q = 0; q < G / 4; ++q) {
      float v4[4];
      load4(row, c0 + 4 * q, n, vec && c0 + 4 * q + 4 <= n, v4);
#pragma unroll
      for (int l = 0; l < 4; ++l)
        x[4 * q + l] = v4[l];
    }
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j)
      if constexpr (std::is_same_v<T, float>)
        x[j] = c0 + j < n ? row[c0 + j] : 0.0f;
      else
        x[j] = c0 + j < n ? numeric::bf16_to_float(row[c0 + j]) : 0.0f;
  }
}

template <int L, class T>
__device__ inline void store_group(T* row, index_t grp, index_t n, bool vec,
                                   const float (&x)[1 << L]) {
  constexpr int G = 1 << L;
  const index_t c0 = grp * G;
  if constexpr (G >= 4) {
#pragma unroll
    for (int q = 0; q < G / 4; ++q) {
      const float v4[4] = {x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]};
      store4(row, c0 + 4 * q, n, vec && c0 + 4 * q + 4 <= n, v4);
    }
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j)
      if (c0 + j < n) {
        if constexpr (std::is_same_v<T, float>)
          row[c0 + j] = x[j];
        else
          row[c0 + j] = numeric::bf16_bits_rne(x[j]);
      }
  }
}

/// Forward: x (the group's samples) → c[0] = a_L and the details in the group's packed order
/// (d_l at [2^L >> l, 2^(L+1) >> l)), exactly as haar_forward_line level by level. `len` are
/// the row's level lengths: a pair whose second sample lies past its level's end takes 0
/// (zero) or the first sample (periodization) as its partner.
template <class W, int L>
__device__ inline void haar_group_forward(float (&x)[1 << L], float (&d)[1 << L], index_t grp,
                                          const index_t* len, bool periodic) {
  using T = HaarTaps<W>;
  constexpr int G = 1 << L;
  int width = G;
#pragma unroll
  for (int l = 1; l <= L; ++l) {
    const int half = width / 2;
    const index_t first = grp * width;  // index of x[0] within level l − 1
#pragma unroll
    for (int j = 0; j < G / 2; ++j) {
      if (j < half) {
        const float x0 = x[2 * j];
        float x1 = x[2 * j + 1];
        const index_t i0 = first + 2 * j;
        if (i0 + 1 >= len[l - 1]) x1 = periodic && i0 < len[l - 1] ? x0 : 0.0f;
        x[j] = T::h0 * x0 + T::h1 * x1;
        d[half + j] = T::g0 * x0 + T::g1 * x1;
      }
    }
    width = half;
  }
}

/// Inverse of haar_group_forward: c = a_L and the details → the group's samples in x.
template <class W, int L>
__device__ inline void haar_group_inverse(float a, const float (&d)[1 << L], float (&x)[1 << L]) {
  using T = HaarTaps<W>;
  constexpr int G = 1 << L;
  x[0] = a;
  int width = 1;
#pragma unroll
  for (int l = L; l >= 1; --l) {
#pragma unroll
    for (int p = G / 2 - 1; p >= 0; --p) {
      if (p < width) {
        const float ap = x[p], dp = d[width + p];
        x[2 * p] = T::h0 * ap + T::g0 * dp;
        x[2 * p + 1] = T::h1 * ap + T::g1 * dp;
      }
    }
    width *= 2;
  }
}

template <class W, int L>
__global__ void __launch_bounds__(256)
    dwt_forward_kernel(DeviceView<const float> g, DeviceView<float> c, RowLengths<L> lay,
                       index_t groups_per_row, bool periodic, bool vec) {
  constexpr int G = 1 << L;
  const index_t gi = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gi >= g.rows * groups_per_row) return;
  const index_t row = gi / groups_per_row, grp = gi % groups_per_row;
  float x[G], d[G];
  load_group<L>(g.row(row), grp, g.cols, vec, x);
  haar_group_forward<W, L>(x, d, grp, lay.len, periodic);
  float* out = c.row(row);
  if (grp < lay.len[L]) out[grp] = x[0];
#pragma unroll
  for (int l = 1; l <= L; ++l) {
    const int w = G >> l;
#pragma unroll
    for (int j = 0; j < w; ++j) {
      const index_t at = grp * w + j;
      if (at < lay.len[l]) out[lay.offset[l] + at] = d[w + j];
    }
  }
}

template <class W, int L>
__global__ void __launch_bounds__(256)
    dwt_inverse_kernel(DeviceView<const float> c, DeviceView<float> out, RowLengths<L> lay,
                       index_t groups_per_row, bool vec) {
  constexpr int G = 1 << L;
  const index_t gi = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gi >= out.rows * groups_per_row) return;
  const index_t row = gi / groups_per_row, grp = gi % groups_per_row;
  const float* in = c.row(row);
  float d[G], x[G];
  const float a = grp < lay.len[L] ? in[grp] : 0.0f;
#pragma unroll
  for (int l = 1; l <= L; ++l) {
    const int w = G >> l;
#pragma unroll
    for (int j = 0; j < w; ++j) {
      const index_t at = grp * w + j;
      d[w + j] = at < lay.len[l] ? in[lay.offset[l] + at] : 0.0f;
    }
  }
  haar_group_inverse<W, L>(a, d, x);
  store_group<L>(out.row(row), grp, out.cols, vec, x);
}

// ---- the fused GWT step
// ---------------------------------------------------------------------------

inline constexpr int gwt_threads = 256;  // groups per unit (one block)

template <int L>
struct GwtEntry {
  void* w;
  const void* g;
  std::uint16_t* wcopy;
  float* m;
  float* v;
  index_t rows, cols, na;  // na = groups per row = N_L
  index_t len[L + 1];
  std::uint32_t vec;
};

inline constexpr int gwt_finite_units = 4;  // units per block of the finite check

/// The finite check alone (no limiter): a read of G before anything is written (a tensor's skip
/// has to be known before its first weight moves). Flags tensor k in `skipped` (zeroed first).
template <int L, Precision P>
__global__ void __launch_bounds__(gwt_threads)
    gwt_finite_kernel(const GwtEntry<L>* __restrict__ entries,
                      const index_t* __restrict__ unit_begin,
                      const std::uint32_t* __restrict__ unit_tensor, index_t units,
                      std::int32_t* skipped) {
  using PG = typename Params<P>::G;
  constexpr int G = 1 << L;
#pragma unroll
  for (int j = 0; j < gwt_finite_units; ++j) {  // independent loads in flight
    const index_t u = static_cast<index_t>(blockIdx.x) * gwt_finite_units + j;
    if (u >= units) return;
    const auto k = static_cast<int>(unit_tensor[u]);
    const GwtEntry<L>& e = entries[k];
    const index_t gi = (u - unit_begin[k]) * gwt_threads + threadIdx.x;
    if (gi >= e.rows * e.na) continue;
    float x[G];
    load_group<L>(static_cast<const PG*>(e.g) + (gi / e.na) * e.cols, gi % e.na, e.cols, e.vec != 0,
                  x);
    std::uint32_t nonfinite = 0;
#pragma unroll
    for (int q = 0; q < G; ++q)
      nonfinite |= (numeric::float_bits(x[q]) & 0x7f800000u) == 0x7f800000u;
    if (nonfinite) atomicOr(reinterpret_cast<unsigned*>(skipped + k), 1u);
  }
}

/// Block sum of `sum` in a fixed order (warps by shuffles, then the warps' sums by thread 0),
/// which thread 0 returns. Every thread of the block must call it.
__device__ inline double gwt_block_sum(double sum) {
  __shared__ double warp_sum[gwt_threads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    sum += __shfl_down_sync(0xFFFFFFFFu, sum, off);
  if ((threadIdx.x & 31u) == 0) warp_sum[threadIdx.x / 32] = sum;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < gwt_threads / 32; ++w)
      total += warp_sum[w];
  return total;
}

/// The first pass of the two-pass step (limiter and finite check): per unit, ‖N‖² of the
/// would-be normalised approximation and whether any gradient sample is not finite. Writes only
/// the two per-unit results. Own: under check_finite, a tensor that lags takes the scalars of its
/// own step from `own` (a separate instance, so the unchecked step's code is untouched).
template <class W, int L, Precision P, bool Own>
__global__ void __launch_bounds__(gwt_threads)
    gwt_norm_kernel(const GwtEntry<L>* __restrict__ entries, const index_t* __restrict__ unit_begin,
                    const std::uint32_t* __restrict__ unit_tensor, optim::AdamStep s, bool periodic,
                    double* partial, std::int32_t* bad,
                    const StepScalars* __restrict__ device_scalars,
                    const AdamTensorStep* __restrict__ own) {
  if (device_scalars != nullptr) s = device_scalars->adam;  // a graph's replay
  using PG = typename Params<P>::G;
  constexpr int G = 1 << L;
  const index_t u = blockIdx.x;
  const auto k = static_cast<int>(unit_tensor[u]);  // one load, not a search: short blocks
  const GwtEntry<L>& e = entries[k];
  const index_t gi = (u - unit_begin[k]) * gwt_threads + threadIdx.x;
  double sum = 0.0;
  int nonfinite = 0;
  if (gi < e.rows * e.na) {
    const index_t row = gi / e.na, grp = gi % e.na;
    float x[G], d[G];
    load_group<L>(static_cast<const PG*>(e.g) + row * e.cols, grp, e.cols, e.vec != 0, x);
#pragma unroll
    for (int j = 0; j < G; ++j)
      nonfinite |= (numeric::float_bits(x[j]) & 0x7f800000u) == 0x7f800000u;
    haar_group_forward<W, L>(x, d, grp, e.len, periodic);
    float mt = e.m[gi], vt = e.v[gi];
    if constexpr (Own) own_scalars(own, k, s);  // after the loads (before: 1.3-1.5% slower)
    optim::adam_moments(x[0], mt, vt, s);
    const float nj = mt / optim::adam_denominator(vt, s);
    sum = static_cast<double>(nj) * nj;
  }
  const int any_bad = __syncthreads_or(nonfinite);
  const double total = gwt_block_sum(sum);
  if (threadIdx.x == 0) {
    partial[u] = total;
    bad[u] = any_bad;
  }
}

/// One block per tensor: ρ from the unit sums (a fixed order) and the limiter's state. With
/// `bad` (the two-pass step's finite check) it also decides the tensor's skip.
__global__ void __launch_bounds__(256)
    gwt_limiter_kernel(const index_t* __restrict__ unit_begin, const double* __restrict__ partial,
                       const std::int32_t* __restrict__ bad, double gamma, float* limiter,
                       float* rho, std::int32_t* skipped) {
  const int k = static_cast<int>(blockIdx.x);
  double sum = 0.0;
  int any_bad = 0;
  for (index_t u = unit_begin[k] + threadIdx.x; u < unit_begin[k + 1]; u += blockDim.x) {
    sum += partial[u];
    if (bad != nullptr) any_bad |= bad[u];
  }
  __shared__ double s[256];
  s[threadIdx.x] = sum;
  any_bad = __syncthreads_or(any_bad);
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (bad != nullptr) skipped[k] = any_bad != 0 ? 1 : 0;
    rho[k] = any_bad != 0
                 ? 1.0f
                 : static_cast<float>(residual::limiter_divisor(sqrt(s[0]), gamma, limiter[k]));
  }
}

/// One group's update from its forward transform (x[0] = the approximation coefficient, d the
/// details) and the group's new moments: x ← u = α·IDWT(N/ρ, details/(D·ρ)) with N = M/D (nj).
/// The two-pass step's operations; with ρ = 1 the same bits in pass A and pass B.
template <class W, int L>
__device__ inline void gwt_group_update(float (&x)[1 << L], float (&d)[1 << L], float m, float v,
                                        const optim::AdamStep& s, float rho, float alpha,
                                        float& nj) {
  constexpr int G = 1 << L;
  const float den = optim::adam_denominator(v, s);
  nj = m / den;
  const float a = rho != 1.0f ? nj / rho : nj;
  const float up = den * rho;
#pragma unroll
  for (int j = 1; j < G; ++j)
    d[j] = d[j] / up;
  haar_group_inverse<W, L>(a, d, x);
  if (alpha != 1.0f)
#pragma unroll
    for (int j = 0; j < G; ++j)
      x[j] = x[j] * alpha;
}

/// The step, one thread per group. Two-pass (`rho_of` set): the limiter's ρ is known. Optimistic
/// (Sum: pass A): ρ = 1, and ‖N‖² is summed per unit into `partial` in the two-pass step's order
/// (ρ and the limiter's memory keep their bits); a separate instance, since the sum's registers
/// cost the plain step a block per SM (46 against 38). A tensor flagged in `skipped` is left
/// untouched. Own: as in gwt_norm_kernel (never with Sum: the optimistic step has no finite check).
template <class W, int L, Precision P, bool Sum, bool Own>
__global__ void __launch_bounds__(gwt_threads, 6)  // 6 blocks per SM: at most 40 registers
    gwt_step_kernel(const GwtEntry<L>* __restrict__ entries, const index_t* __restrict__ unit_begin,
                    const std::uint32_t* __restrict__ unit_tensor, optim::AdamStep s, bool periodic,
                    float alpha, const float* __restrict__ rho_of,
                    const std::int32_t* __restrict__ skipped, double* partial,
                    const StepScalars* __restrict__ device_scalars,
                    const AdamTensorStep* __restrict__ own, std::int32_t* __restrict__ skips) {
  if (device_scalars != nullptr) s = device_scalars->adam;  // a graph's replay
  using PW = typename Params<P>::W;
  using PG = typename Params<P>::G;
  constexpr int G = 1 << L;
  const index_t u = blockIdx.x;
  const auto k = static_cast<int>(unit_tensor[u]);  // one load, not a search: short blocks
  const GwtEntry<L>& e = entries[k];
  if (skipped != nullptr && skipped[k] != 0) {  // the whole block: one tensor
    if (skips != nullptr && threadIdx.x == 0 && u == unit_begin[k]) ++skips[k];  // its count
    return;
  }
  const index_t gi = (u - unit_begin[k]) * gwt_threads + threadIdx.x;
  double sum = 0.0;
  if (gi < e.rows * e.na) {
    const float rho = rho_of != nullptr ? rho_of[k] : 1.0f;
    const index_t row = gi / e.na, grp = gi % e.na;
    const bool vec = e.vec != 0;
    float x[G], d[G], w[G], nj;
    load_group<L>(static_cast<const PG*>(e.g) + row * e.cols, grp, e.cols, vec, x);
    PW* wrow = static_cast<PW*>(e.w) + row * e.cols;
    load_group<L>(wrow, grp, e.cols, vec, w);
    haar_group_forward<W, L>(x, d, grp, e.len, periodic);
    float m = e.m[gi], v = e.v[gi];
    if constexpr (Own) own_scalars(own, k, s);  // after the loads (before: 1.3-1.5% slower)
    optim::adam_moments(x[0], m, v, s);
    e.m[gi] = m;
    e.v[gi] = v;
    gwt_group_update<W, L>(x, d, m, v, s, rho, alpha, nj);
    if constexpr (Sum) sum = static_cast<double>(nj) * nj;
#pragma unroll
    for (int j = 0; j < G; ++j)
      w[j] = optim::apply_update(w[j], x[j], s.weight);
    store_group<L>(wrow, grp, e.cols, vec, w);
    if constexpr (P == Precision::fp32_master)
      if (e.wcopy != nullptr) store_group<L>(e.wcopy + row * e.cols, grp, e.cols, vec, w);
  }
  if constexpr (Sum) {
    const double total = gwt_block_sum(sum);
    if (threadIdx.x == 0) partial[u] = total;
  }
}

/// Pass B of the optimistic step: the tensors the limiter scaled (ρ ≠ 1) take the rest of their
/// step. Pass A wrote W' = step(W, c·u); the limited step is step(W, c·u/ρ), which differs from
/// W' by c·f·(1 − 1/ρ)·u, where f is the decay applied after the update (1 when it comes first,
/// as in torch; 1 + λ' for hf's w + λ'·w; the multiplier for bnb). u is recomputed from G and the
/// moments pass A wrote: the same bits. Always launched (a graph holds one sequence), a grid of
/// the blocks that fit on the device at once, which returns at once when no tensor is limited.
template <class W, int L, Precision P>
__global__ void __launch_bounds__(gwt_threads)
    gwt_limit_kernel(const GwtEntry<L>* __restrict__ entries,
                     const index_t* __restrict__ unit_begin, int tensors, optim::AdamStep s,
                     bool periodic, float alpha, const float* __restrict__ rho_of,
                     const StepScalars* __restrict__ device_scalars) {
  if (device_scalars != nullptr) s = device_scalars->adam;
  using PW = typename Params<P>::W;
  using PG = typename Params<P>::G;
  constexpr int G = 1 << L;
  __shared__ float rho_chunk[gwt_threads];
  const optim::WeightUpdate& wu = s.weight;
  const double after = wu.decay_before ? 1.0
                                       : static_cast<double>(wu.decay_multiplier) *
                                             (1.0 + static_cast<double>(wu.decay_alpha));
  for (int base = 0; base < tensors; base += gwt_threads) {
    const int kt = base + static_cast<int>(threadIdx.x);
    const float r = kt < tensors ? rho_of[kt] : 1.0f;
    __syncthreads();  // the previous chunk's reads are done
    rho_chunk[threadIdx.x] = r;
    __syncthreads();
    const int end = tensors - base < gwt_threads ? tensors - base : gwt_threads;
    for (int j = 0; j < end; ++j) {
      const float rho = rho_chunk[j];
      if (rho == 1.0f) continue;
      const GwtEntry<L>& e = entries[base + j];
      const auto kappa = static_cast<float>(static_cast<double>(wu.step_size) * after *
                                            (1.0 - 1.0 / static_cast<double>(rho)));
      const index_t count = e.rows * e.na, units = unit_begin[base + j + 1] - unit_begin[base + j];
      const bool vec = e.vec != 0;
      for (index_t uu = blockIdx.x; uu < units; uu += gridDim.x) {
        const index_t gi = uu * gwt_threads + threadIdx.x;
        if (gi >= count) continue;
        const index_t row = gi / e.na, grp = gi % e.na;
        float x[G], d[G], w[G], nj;
        load_group<L>(static_cast<const PG*>(e.g) + row * e.cols, grp, e.cols, vec, x);
        PW* wrow = static_cast<PW*>(e.w) + row * e.cols;
        load_group<L>(wrow, grp, e.cols, vec, w);
        haar_group_forward<W, L>(x, d, grp, e.len, periodic);
        gwt_group_update<W, L>(x, d, e.m[gi], e.v[gi], s, 1.0f, alpha, nj);
#pragma unroll
        for (int q = 0; q < G; ++q)
          w[q] = w[q] + kappa * x[q];
        store_group<L>(wrow, grp, e.cols, vec, w);
        if constexpr (P == Precision::fp32_master)
          if (e.wcopy != nullptr) store_group<L>(e.wcopy + row * e.cols, grp, e.cols, vec, w);
      }
    }
  }
}

template <int L>
bool row_vec_ok(const Tensor& t, Precision p) {
  // 4-wide accesses of a group need rows that start aligned: cols a multiple of 4.
  if (t.cols % 4 != 0) return false;
  switch (p) {
    case Precision::fp32:
      return Params<Precision::fp32>::aligned(t);
    case Precision::bf16:
      return Params<Precision::bf16>::aligned(t);
    case Precision::fp32_master:
      return Params<Precision::fp32_master>::aligned(t);
  }
  return false;
}

}  // namespace detail

template <class Wavelet, int Levels>
void dwt_forward_rows(DeviceView<const float> g, DeviceView<float> coeffs,
                      transforms::BoundaryMode mode, stream_t stream) {
  const detail::RowLengths<Levels> lay = detail::row_lengths<Levels>(g.cols, mode);
  require(coeffs.rows == g.rows && coeffs.cols == lay.total,
          "cuda::dwt_forward_rows: the coefficients must be rows x K (transforms/dwt.hpp)");
  const index_t groups = lay.len[Levels];
  const index_t work = g.rows * groups;
  if (work == 0) return;
  const bool vec =
      g.cols % 4 == 0 && g.ld % 4 == 0 && reinterpret_cast<std::uintptr_t>(g.data) % 16 == 0;
  detail::dwt_forward_kernel<Wavelet, Levels>
      <<<static_cast<unsigned>((work + 255) / 256), 256, 0, stream>>>(
          g, coeffs, lay, groups, mode == transforms::BoundaryMode::periodization, vec);
  detail::check_launch("dwt_forward_rows");
}

template <class Wavelet, int Levels>
void dwt_inverse_rows(DeviceView<const float> coeffs, DeviceView<float> out,
                      transforms::BoundaryMode mode, stream_t stream) {
  const detail::RowLengths<Levels> lay = detail::row_lengths<Levels>(out.cols, mode);
  require(coeffs.rows == out.rows && coeffs.cols == lay.total,
          "cuda::dwt_inverse_rows: the coefficients must be rows x K (transforms/dwt.hpp)");
  const index_t groups = lay.len[Levels];
  const index_t work = out.rows * groups;
  if (work == 0) return;
  const bool vec =
      out.cols % 4 == 0 && out.ld % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.data) % 16 == 0;
  detail::dwt_inverse_kernel<Wavelet, Levels>
      <<<static_cast<unsigned>((work + 255) / 256), 256, 0, stream>>>(coeffs, out, lay, groups,
                                                                      vec);
  detail::check_launch("dwt_inverse_rows");
}

template <class Wavelet, int Levels>
std::size_t MultiTensorGwt<Wavelet, Levels>::workspace_bytes(std::span<const Tensor> tensors,
                                                             const Options&) {
  detail::Carver c;
  index_t units = 0;
  c.take<detail::GwtEntry<Levels>>(tensors.size());
  c.take<index_t>(tensors.size() + 1);
  for (const Tensor& t : tensors) {
    const index_t na =
        transforms::dwt_layout(t.cols, 2, Levels, transforms::BoundaryMode::zero).approx_length();
    c.take<float>(static_cast<std::size_t>(t.rows * na));
    c.take<float>(static_cast<std::size_t>(t.rows * na));
    units += (t.rows * na + detail::gwt_threads - 1) / detail::gwt_threads;
  }
  c.take<double>(static_cast<std::size_t>(units));
  c.take<std::int32_t>(static_cast<std::size_t>(units));
  c.take<float>(tensors.size());
  c.take<std::int32_t>(tensors.size());
  c.take<float>(tensors.size());
  c.take<std::uint32_t>(static_cast<std::size_t>(units));
  c.take<std::int32_t>(tensors.size());
  c.take<detail::AdamTensorStep>(tensors.size());
  return c.bytes();
}

template <class Wavelet, int Levels>
MultiTensorGwt<Wavelet, Levels>::MultiTensorGwt(std::span<const Tensor> tensors,
                                                const Options& options, void* workspace,
                                                std::size_t workspace_size, stream_t stream)
    : options_(options) {
  constexpr const char* who = "cuda::MultiTensorGwt";
  optim::Adam::validate(options.rule);
  residual::validate(options.residual);
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    detail::check_tensor(tensors[k], options.precision, k, who);
    if (options.mode == transforms::BoundaryMode::periodization)
      require(tensors[k].cols % (index_t{1} << Levels) == 0,
              std::string(who) + ": periodization needs cols divisible by 2^levels");
  }
  require(!(options.optimistic_limiter && options.check_finite),
          std::string(who) +
              ": optimistic_limiter needs check_finite off (a skip must be known before a weight "
              "moves)");
  detail::check_workspace(workspace, workspace_size, workspace_bytes(tensors, options), who);

  detail::Carver c{static_cast<char*>(workspace)};
  auto* entries = c.take<detail::GwtEntry<Levels>>(tensors.size());
  auto* begin = c.take<index_t>(tensors.size() + 1);
  table_ = entries;
  std::vector<detail::GwtEntry<Levels>> host(tensors.size());
  std::vector<index_t> host_begin(tensors.size() + 1, 0);
  moments_.resize(tensors.size());
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = tensors[k];
    const detail::RowLengths<Levels> lay = detail::row_lengths<Levels>(t.cols, options.mode);
    const index_t na = lay.len[Levels];
    MomentBuffers& mb = moments_[k];
    mb.count = t.rows * na;
    mb.m = c.take<float>(static_cast<std::size_t>(mb.count));
    mb.v = c.take<float>(static_cast<std::size_t>(mb.count));
    state_bytes_ += 2 * static_cast<std::size_t>(mb.count) * sizeof(float);
    detail::GwtEntry<Levels>& e = host[k];
    e.w = t.weight;
    e.g = t.grad;
    e.wcopy = t.weight_bf16;
    e.m = static_cast<float*>(mb.m);
    e.v = static_cast<float*>(mb.v);
    e.rows = t.rows;
    e.cols = t.cols;
    e.na = na;
    for (int l = 0; l <= Levels; ++l)
      e.len[l] = lay.len[l];
    e.vec = detail::row_vec_ok<Levels>(t, options.precision) ? 1u : 0u;
    host_begin[k + 1] = host_begin[k] + (mb.count + detail::gwt_threads - 1) / detail::gwt_threads;
    if (mb.count > 0) {
      detail::check(cudaMemsetAsync(mb.m, 0, static_cast<std::size_t>(mb.count) * 4, stream),
                    "cudaMemsetAsync");
      detail::check(cudaMemsetAsync(mb.v, 0, static_cast<std::size_t>(mb.count) * 4, stream),
                    "cudaMemsetAsync");
    }
  }
  units_ = host_begin.back();
  partial_ = c.take<double>(static_cast<std::size_t>(units_));
  bad_ = c.take<std::int32_t>(static_cast<std::size_t>(units_));
  rho_ = c.take<float>(tensors.size());
  skipped_ = c.take<std::int32_t>(tensors.size());
  limiter_ = c.take<float>(tensors.size());
  unit_tensor_ = c.take<std::uint32_t>(static_cast<std::size_t>(units_));
  skips_ = c.take<std::int32_t>(tensors.size());
  own_ = c.take<detail::AdamTensorStep>(tensors.size());
  std::vector<std::uint32_t> host_unit_tensor(static_cast<std::size_t>(units_));
  for (std::size_t k = 0; k < tensors.size(); ++k)
    for (index_t u = host_begin[k]; u < host_begin[k + 1]; ++u)
      host_unit_tensor[static_cast<std::size_t>(u)] = static_cast<std::uint32_t>(k);
  const std::size_t n = tensors.size();
  if (n > 0) {
    detail::check(cudaMemsetAsync(limiter_, 0xFF, n * sizeof(float), stream),
                  "cudaMemsetAsync");  // NaN: unset
    detail::check(cudaMemsetAsync(skipped_, 0, n * sizeof(std::int32_t), stream),
                  "cudaMemsetAsync");
    detail::check(cudaMemsetAsync(skips_, 0, n * sizeof(std::int32_t), stream), "cudaMemsetAsync");
    detail::check(cudaMemsetAsync(rho_, 0, n * sizeof(float), stream), "cudaMemsetAsync");
  }
  detail::check(
      cudaMemcpyAsync(entries, host.data(), n * sizeof(host[0]), cudaMemcpyHostToDevice, stream),
      "cudaMemcpyAsync");
  detail::check(cudaMemcpyAsync(begin, host_begin.data(), host_begin.size() * sizeof(index_t),
                                cudaMemcpyHostToDevice, stream),
                "cudaMemcpyAsync");
  detail::check(cudaMemcpyAsync(unit_tensor_, host_unit_tensor.data(),
                                host_unit_tensor.size() * sizeof(std::uint32_t),
                                cudaMemcpyHostToDevice, stream),
                "cudaMemcpyAsync");
  // Pass B's grid: as many blocks as fit on the device at once (it loops over the units).
  int per_sm = 0;
  auto occupancy = [&](auto kernel) {
    detail::check(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, detail::gwt_threads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  };
  switch (options.precision) {
    case Precision::fp32:
      occupancy(detail::gwt_limit_kernel<Wavelet, Levels, Precision::fp32>);
      break;
    case Precision::bf16:
      occupancy(detail::gwt_limit_kernel<Wavelet, Levels, Precision::bf16>);
      break;
    case Precision::fp32_master:
      occupancy(detail::gwt_limit_kernel<Wavelet, Levels, Precision::fp32_master>);
      break;
  }
  limit_grid_ = std::max(1, per_sm) * detail::sm_count();
  detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

template <class Wavelet, int Levels>
MomentBuffers MultiTensorGwt<Wavelet, Levels>::moments(index_t tensor) const {
  require(tensor >= 0 && tensor < tensors(), "cuda::MultiTensorGwt: tensor index out of range");
  return moments_[static_cast<std::size_t>(tensor)];
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::read_state(index_t tensor, float* m, float* v,
                                                 float& limiter) const {
  const MomentBuffers mb = moments(tensor);
  const auto bytes = static_cast<std::size_t>(mb.count) * sizeof(float);
  require(bytes == 0 || (m != nullptr && v != nullptr), "cuda::read_state: null moment pointer");
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (bytes) {
    detail::check(cudaMemcpy(m, mb.m, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
    detail::check(cudaMemcpy(v, mb.v, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  detail::check(cudaMemcpy(&limiter, limiter_ + tensor, sizeof(float), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::write_state(index_t tensor, const float* m, const float* v,
                                                  float limiter) {
  const MomentBuffers mb = moments(tensor);
  const auto bytes = static_cast<std::size_t>(mb.count) * sizeof(float);
  require(bytes == 0 || (m != nullptr && v != nullptr), "cuda::write_state: null moment pointer");
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (bytes) {
    detail::check(cudaMemcpy(mb.m, m, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
    detail::check(cudaMemcpy(mb.v, v, bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  detail::check(cudaMemcpy(limiter_ + tensor, &limiter, sizeof(float), cudaMemcpyHostToDevice),
                "cudaMemcpy");
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::set_steps(std::int64_t t) {
  require(t >= 0, "cuda::MultiTensorGwt::set_steps: the step count must be >= 0");
  t_ = t;
}

template <class Wavelet, int Levels>
std::int64_t MultiTensorGwt<Wavelet, Levels>::tensor_steps(index_t tensor) const {
  (void)moments(tensor);  // range check
  std::int32_t skips = 0;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(&skips, skips_ + tensor, sizeof(std::int32_t), cudaMemcpyDeviceToHost),
                "cudaMemcpy");
  return t_ - skips;
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::set_tensor_steps(index_t tensor, std::int64_t steps) {
  (void)moments(tensor);
  require(steps >= 0 && steps <= t_,
          "cuda::MultiTensorGwt::set_tensor_steps: a tensor's count must be in [0, steps()]");
  require(t_ - steps <= 0x7fffffff, "cuda::MultiTensorGwt::set_tensor_steps: lag too large");
  require(steps == t_ || options_.check_finite,
          "cuda::MultiTensorGwt::set_tensor_steps: without check_finite every tensor has "
          "steps() steps");
  const auto skips = static_cast<std::int32_t>(t_ - steps);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(cudaMemcpy(skips_ + tensor, &skips, sizeof(std::int32_t), cudaMemcpyHostToDevice),
                "cudaMemcpy");
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::set_lr(double lr) {
  require(std::isfinite(lr) && lr >= 0, "cuda::MultiTensorGwt::set_lr: lr must be finite and >= 0");
  options_.rule.lr = lr;
}

template <class Wavelet, int Levels>
StepScalars MultiTensorGwt<Wavelet, Levels>::scalars(std::int64_t t) const {
  require(t >= 1, "cuda::MultiTensorGwt::scalars: steps count from 1");
  return {optim::Adam::step_scalars(options_.rule, t), static_cast<std::uint32_t>(t - 1),
          options_.rule.lr};
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::step(stream_t stream) {
  launch(stream, scalars(t_ + 1), nullptr);
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::step(stream_t stream, const StepScalars* device_scalars) {
  require(device_scalars != nullptr, "cuda::MultiTensorGwt::step: null device scalars");
  launch(stream, scalars(t_ + 1), device_scalars);
}

template <class Wavelet, int Levels>
void MultiTensorGwt<Wavelet, Levels>::launch(stream_t stream, const StepScalars& sc,
                                             const StepScalars* device_scalars) {
  const optim::AdamStep s = sc.adam;
  t_ += 1;
  if (units_ == 0) return;
  const auto* entries = static_cast<const detail::GwtEntry<Levels>*>(table_);
  const auto* begin = reinterpret_cast<const index_t*>(
      static_cast<const char*>(table_) +
      detail::Carver::round_up(moments_.size() * sizeof(detail::GwtEntry<Levels>)));
  const auto n = static_cast<int>(moments_.size());
  const bool periodic = options_.mode == transforms::BoundaryMode::periodization;
  const double gamma = options_.residual.limiter_gamma;
  const bool check = options_.check_finite;
  const auto alpha = static_cast<float>(options_.residual.scale);
  const auto blocks = static_cast<unsigned>(units_);
  // check_finite: each tensor's own step (skips_ counts its skips; the step kernel's first block
  // of a skipped tensor adds one), computed before anything reads the scalars.
  detail::AdamTensorStep* own = check ? own_ : nullptr;
  std::int32_t* skips = check ? skips_ : nullptr;
  if (check) {
    detail::launch_tensor_step(nullptr, nullptr, skips_, own_, n, options_.rule,
                               static_cast<long long>(t_), device_scalars, stream,
                               "MultiTensorGwt::step (tensor scalars)");
  }
  auto run = [&](auto norm_kernel, auto finite_kernel, auto step_kernel, auto pass_a_kernel,
                 auto limit_kernel) {
    if (gamma > 0 && !options_.optimistic_limiter) {
      // Two passes; the finite check shares the first one's read of G.
      norm_kernel<<<blocks, detail::gwt_threads, 0, stream>>>(
          entries, begin, unit_tensor_, s, periodic, partial_, bad_, device_scalars, own);
      detail::check_launch("MultiTensorGwt::step (norm)");
      detail::gwt_limiter_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(
          begin, partial_, check ? bad_ : nullptr, gamma, limiter_, rho_, skipped_);
      detail::check_launch("MultiTensorGwt::step (limiter)");
      step_kernel<<<blocks, detail::gwt_threads, 0, stream>>>(
          entries, begin, unit_tensor_, s, periodic, alpha, rho_, check ? skipped_ : nullptr,
          nullptr, device_scalars, own, skips);
      detail::check_launch("MultiTensorGwt::step");
      return;
    }
    if (check) {
      detail::check(cudaMemsetAsync(skipped_, 0, moments_.size() * sizeof(std::int32_t), stream),
                    "cudaMemsetAsync");
      finite_kernel<<<static_cast<unsigned>((units_ + detail::gwt_finite_units - 1) /
                                            detail::gwt_finite_units),
                      detail::gwt_threads, 0, stream>>>(entries, begin, unit_tensor_, units_,
                                                        skipped_);
      detail::check_launch("MultiTensorGwt::step (finite check)");
    }
    // One pass; with the (optimistic) limiter ρ = 1 while ‖N‖² is summed (pass A), then pass B
    // for the tensors the limiter scales.
    (gamma > 0 ? pass_a_kernel : step_kernel)<<<blocks, detail::gwt_threads, 0, stream>>>(
        entries, begin, unit_tensor_, s, periodic, alpha, nullptr, check ? skipped_ : nullptr,
        partial_, device_scalars, own, skips);
    detail::check_launch("MultiTensorGwt::step");
    if (gamma > 0) {
      detail::gwt_limiter_kernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(
          begin, partial_, nullptr, gamma, limiter_, rho_, skipped_);
      detail::check_launch("MultiTensorGwt::step (limiter)");
      limit_kernel<<<static_cast<unsigned>(limit_grid_), detail::gwt_threads, 0, stream>>>(
          entries, begin, n, s, periodic, alpha, rho_, device_scalars);
      detail::check_launch("MultiTensorGwt::step (limited tensors)");
    }
  };
  using W = Wavelet;
  constexpr int L = Levels;
  auto in = [&](auto precision) {
    constexpr Precision P = decltype(precision)::value;
    if (check)
      run(detail::gwt_norm_kernel<W, L, P, true>, detail::gwt_finite_kernel<L, P>,
          detail::gwt_step_kernel<W, L, P, false, true>,
          detail::gwt_step_kernel<W, L, P, true, false>, detail::gwt_limit_kernel<W, L, P>);
    else
      run(detail::gwt_norm_kernel<W, L, P, false>, detail::gwt_finite_kernel<L, P>,
          detail::gwt_step_kernel<W, L, P, false, false>,
          detail::gwt_step_kernel<W, L, P, true, false>, detail::gwt_limit_kernel<W, L, P>);
  };
  switch (options_.precision) {
    case Precision::fp32:
      in(std::integral_constant<Precision, Precision::fp32>{});
      break;
    case Precision::bf16:
      in(std::integral_constant<Precision, Precision::bf16>{});
      break;
    case Precision::fp32_master:
      in(std::integral_constant<Precision, Precision::fp32_master>{});
      break;
  }
}

}  // namespace slimgrad::cuda
