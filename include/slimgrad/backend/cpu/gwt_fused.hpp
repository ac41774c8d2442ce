// slimgrad/backend/cpu/gwt_fused.hpp — GWT's step (Adam on the DWT approximation, details
// normalised, algorithms.md §1.2) fused into two passes over the rows, on the CPU.
//
// The generic engine path writes the coefficients, the denominators and the update as m×n
// buffers (about 43 bytes of memory traffic per parameter). Here every row is transformed in
// cache, and only G (read twice), the moments and W touch memory: about 22 bytes per parameter
// for L = 2, finite check included. Two passes because the norm-growth limiter needs ‖N‖ over
// the whole tensor before any detail can be scaled:
//   pass 1 (reads G and the moments, writes nothing): finite check and ‖N‖² per row, N computed
//          from the would-be moments;
//   pass 2: forward DWT again, update the moments, N/ρ, details/(D·ρ), inverse DWT, W −= c·α·U.
// The operations and their order are the generic path's, so the result is bit-identical to it
// (tests/optim/test_gwt_fused.cpp checks). Haar rows of 2 levels (the `gwt` recipe) run in
// AVX-512 registers, 64 samples at a time (gwt_haar_avx512.hpp, l2::): per parameter about
// 18 bytes of DRAM traffic (g twice, the second time from cache; w read and written; quarter-size
// moments), against fp32 Adam's 28.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "../../optim/adam.hpp"
#include "../../optim/residual.hpp"
#include "../../transforms/dwt.hpp"
#include "adam.hpp"
#include "common.hpp"
#include "dwt.hpp"
#include "gwt_haar_avx512.hpp"

namespace slimgrad::cpu {

/// w ← apply_update(w, u) over a row, with the convention's branches taken once per row (so
/// the loops vectorise). Same operations as optim::apply_update.
inline void apply_row(float* w, const float* u, index_t n, const optim::WeightUpdate& p) {
  const float c = -p.step_size;
  if (p.decay_before && p.decay_multiplier != 1.0f)
    for (index_t j = 0; j < n; ++j)
      w[j] = w[j] * p.decay_multiplier;
  if (p.decay_before && p.decay_alpha != 0.0f)
    for (index_t j = 0; j < n; ++j)
      w[j] = w[j] + p.decay_alpha * w[j];
  for (index_t j = 0; j < n; ++j)
    w[j] = w[j] + c * u[j];
  if (!p.decay_before && p.decay_multiplier != 1.0f)
    for (index_t j = 0; j < n; ++j)
      w[j] = w[j] * p.decay_multiplier;
  if (!p.decay_before && p.decay_alpha != 0.0f)
    for (index_t j = 0; j < n; ++j)
      w[j] = w[j] + p.decay_alpha * w[j];
}

namespace gwt_detail {

// Everything a row of either pass needs, as raw pointers (the row functions are instantiated
// twice, for the baseline ISA and for AVX2).
struct RowArgs {
  const transforms::DwtLayout* lay;
  const optim::AdamStep* s;
  float* scratch;  // RowScratch::floats(lay)
  float* coef;     // K
  float* u;        // n
  float* denom;    // approximation length
  float* up;       // longest level
  float rho = 1.0f, alpha = 1.0f;
};

// Pass 1 of row i: ‖N‖² from the would-be moments (nothing written but the buffers).
template <class Wavelet>
inline double pass1_row(const RowArgs& a, const float* gi, const float* mi, const float* vi) {
  const transforms::DwtLayout& lay = *a.lay;
  const optim::AdamStep& s = *a.s;
  const index_t na = lay.approx_length();
  const detail::RowScratch sc = detail::RowScratch::carve(a.scratch, lay);
  detail::forward_row<Wavelet>(gi, a.coef, lay, sc);
  float* mt = a.u;  // the would-be moments of this row (u is free in pass 1)
  float* vt = a.denom;
  for (index_t j = 0; j < na; ++j) {
    mt[j] = mi[j];
    vt[j] = vi[j];
    optim::adam_moments(a.coef[j], mt[j], vt[j], s);
  }
  sqrt_n(vt, vt, na);
  // x / 1.0f is x exactly: the hf convention skips that division.
  if (s.denom_divisor != 1.0f)
    for (index_t j = 0; j < na; ++j)
      vt[j] = vt[j] / s.denom_divisor;
  NormLanes sum;  // cpu::frobenius's order, as the generic path's limiter
  for (index_t j = 0; j < na; ++j)
    sum.add(j, mt[j] / (vt[j] + s.eps));
  return sum.total();
}

// Pass 2 of row i: the step.
template <class Wavelet, int Levels>
inline void pass2_row(const RowArgs& a, const float* gi, float* mi, float* vi, float* wi) {
  const transforms::DwtLayout& lay = *a.lay;
  const optim::AdamStep& s = *a.s;
  const index_t na = lay.approx_length(), n = lay.n;
  const detail::RowScratch sc = detail::RowScratch::carve(a.scratch, lay);
  float* coef = a.coef;
  float* den = a.denom;
  const float rho = a.rho;
  detail::forward_row<Wavelet>(gi, coef, lay, sc);
  for (index_t j = 0; j < na; ++j)
    optim::adam_moments(coef[j], mi[j], vi[j], s);
  sqrt_n(vi, den, na);
  if (s.denom_divisor != 1.0f)
    for (index_t j = 0; j < na; ++j)
      den[j] = den[j] / s.denom_divisor;
  for (index_t j = 0; j < na; ++j) {
    den[j] = den[j] + s.eps;
    coef[j] = mi[j] / den[j];
  }
  if (rho != 1.0f)
    for (index_t j = 0; j < na; ++j)
      coef[j] = coef[j] / rho;
  // Details: the ancestor's D·ρ, up-sampled into a contiguous row first so that the divisions
  // vectorise (a divide per element through an index shift does not).
  float* up = a.up;
  for (int l = 1; l <= Levels; ++l) {
    float* d = coef + lay.detail_offset[l];
    const int shift = Levels - l;
    const index_t len = lay.length[l];
    for (index_t j = 0; j < len; ++j)
      up[j] = den[j >> shift] * rho;
    for (index_t j = 0; j < len; ++j)
      d[j] = d[j] / up[j];
  }
  float* u = a.u;
  detail::inverse_row<Wavelet>(coef, u, lay, sc);
  if (a.alpha != 1.0f)
    for (index_t j = 0; j < n; ++j)
      u[j] = u[j] * a.alpha;
  apply_row(wi, u, n, s.weight);
}

// The same rows compiled for AVX2 (without FMA, so nothing is contracted and the bits are the
// baseline's): GCC and clang vectorise the row loops 8 wide. Chosen at run time.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SLIMGRAD_GWT_AVX2 1
template <class Wavelet>
__attribute__((target("avx2"), flatten)) double pass1_row_avx2(const RowArgs& a, const float* gi,
                                                               const float* mi, const float* vi) {
  return pass1_row<Wavelet>(a, gi, mi, vi);
}
template <class Wavelet, int Levels>
__attribute__((target("avx2"), flatten)) void pass2_row_avx2(const RowArgs& a, const float* gi,
                                                             float* mi, float* vi, float* wi) {
  pass2_row<Wavelet, Levels>(a, gi, mi, vi, wi);
}
inline bool avx2_supported() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}
#else
#define SLIMGRAD_GWT_AVX2 0
#endif

}  // namespace gwt_detail

/// Runs one fused GWT step if it applies (axis rows, fp32 moments the store exposes directly).
/// Returns nullopt when it does not apply (the caller takes the generic path), false when the
/// gradient holds a non-finite value (nothing changed), true when the step was taken.
template <class Wavelet, int Levels, class Store, class AdamState>
std::optional<bool> gwt_adam_fused_step(const impl<optim::Adam, backend::cpu>& rule,
                                        const Store& store, AdamState& st,
                                        const typename transforms::Dwt<Wavelet, Levels>::Options& o,
                                        HostView<const float> g, HostView<float> w, std::int64_t t,
                                        double scale, double gamma, float& limiter) {
  using Dwt = transforms::Dwt<Wavelet, Levels>;
  float* m = store.direct(st.m);
  float* v = store.direct(st.v);
  if (o.axis != transforms::Axis::rows || m == nullptr || v == nullptr) return std::nullopt;

  const transforms::DwtLayout lay = Dwt::layout(g.cols, o.mode);
  const index_t rows = g.rows, n = g.cols, k = lay.total, na = lay.approx_length();
  const optim::AdamStep s = optim::Adam::step_scalars(rule.options, t);
  const std::size_t scratch_floats = detail::RowScratch::floats(lay);
  // The AVX-512 rows prefetch the row `ahead` rows on, about 8 KiB of g ahead: one row of 512
  // (2 KiB) is shorter than the memory latency takes to cover (measured: 4 rows ahead took the
  // compressed LLaMA-60M step from 13.7 to 12.2 ms on one core).
  const index_t ahead = std::max<index_t>(1, (2048 + n - 1) / n);
#if SLIMGRAD_GWT_AVX2
  const bool avx2 = gwt_detail::avx2_supported();
#endif

  struct Buffers {
    std::vector<float> scratch, coef, u, denom, up;
  };
  auto args = [&]() -> gwt_detail::RowArgs {
    thread_local Buffers b;
    b.scratch.resize(scratch_floats);
    b.coef.resize(static_cast<std::size_t>(k));
    b.u.resize(static_cast<std::size_t>(n));
    b.denom.resize(static_cast<std::size_t>(na));
    b.up.resize(static_cast<std::size_t>(lay.max_level_length()));
    return {&lay, &s, b.scratch.data(), b.coef.data(), b.u.data(), b.denom.data(), b.up.data()};
  };

  // Pass 1: ‖N‖² per row and the finite check, without writing anything.
  thread_local std::vector<double> row_norm2;
  thread_local std::vector<std::uint8_t> row_bad;
  row_norm2.assign(static_cast<std::size_t>(rows), 0.0);
  row_bad.assign(static_cast<std::size_t>(rows), 0);
  double* norm2 = row_norm2.data();
  std::uint8_t* bad = row_bad.data();
#if SLIMGRAD_GWT_AVX512
  // Haar rows whose levels halve exactly: the AVX-512 rows (gwt_haar_avx512.hpp), same bits.
  bool haar512 = false;
  if constexpr (Wavelet::filter_length == 2 && Levels <= 5)
    haar512 = gwt_avx512::supported() && gwt_avx512::applies(lay);
#endif
  parallel_for(rows, 4 * n, [&](index_t i) {
    const float* gi = g.row(i);
#if SLIMGRAD_GWT_AVX512
    if constexpr (Wavelet::filter_length == 2 && Levels <= 5) {
      if (haar512) {
        const index_t j = i + ahead < rows ? i + ahead : i;
        if constexpr (Levels == 2) {  // the recipe's: in registers, no scratch rows
          bad[i] = !gwt_avx512::l2::pass1<Wavelet>(gi, n, m + i * na, v + i * na, s,
                                                   {g.row(j), m + j * na, v + j * na, w.row(j)},
                                                   norm2[i]);
          return;
        }
        const gwt_detail::RowArgs a = args();
        const detail::RowScratch sc = detail::RowScratch::carve(a.scratch, lay);
        bad[i] = !gwt_avx512::pass1<Wavelet, Levels>(gi, n, m + i * na, v + i * na, s,
                                                     {g.row(j), m + j * na, v + j * na, w.row(j)},
                                                     sc.ping, a.coef, norm2[i]);
        return;
      }
    }
#endif
    std::uint32_t nonfinite = 0;
    for (index_t j = 0; j < n; ++j) {
      std::uint32_t bits;
      std::memcpy(&bits, gi + j, sizeof bits);
      nonfinite |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
    }
    bad[i] = static_cast<std::uint8_t>(nonfinite);
    if (nonfinite) return;
    const gwt_detail::RowArgs a = args();
#if SLIMGRAD_GWT_AVX2
    if (avx2) {
      norm2[i] = gwt_detail::pass1_row_avx2<Wavelet>(a, gi, m + i * na, v + i * na);
      return;
    }
#endif
    norm2[i] = gwt_detail::pass1_row<Wavelet>(a, gi, m + i * na, v + i * na);
  });
  for (index_t i = 0; i < rows; ++i)
    if (bad[i]) return false;
  double total = 0.0;
  for (index_t i = 0; i < rows; ++i)
    total += norm2[i];
  const float rho =
      gamma > 0 ? static_cast<float>(residual::limiter_divisor(std::sqrt(total), gamma, limiter))
                : 1.0f;
  const float alpha = static_cast<float>(scale);

  // Pass 2: the step.
  parallel_for(rows, 8 * n, [&](index_t i) {
#if SLIMGRAD_GWT_AVX512
    if constexpr (Wavelet::filter_length == 2 && Levels == 2) {
      if (haar512) {
        const index_t j = i + ahead < rows ? i + ahead : i;
        gwt_avx512::l2::pass2<Wavelet>(g.row(i), n, m + i * na, v + i * na, w.row(i), s, rho, alpha,
                                       {g.row(j), m + j * na, v + j * na, w.row(j)});
        return;
      }
    }
#endif
    gwt_detail::RowArgs a = args();
    a.rho = rho;
    a.alpha = alpha;
#if SLIMGRAD_GWT_AVX512
    if constexpr (Wavelet::filter_length == 2 && Levels <= 5) {
      if (haar512) {
        const detail::RowScratch sc = detail::RowScratch::carve(a.scratch, lay);
        const index_t j = i + ahead < rows ? i + ahead : i;
        gwt_avx512::pass2<Wavelet, Levels>(g.row(i), n, m + i * na, v + i * na, w.row(i), s, rho,
                                           alpha, {g.row(j), m + j * na, v + j * na, w.row(j)},
                                           sc.ping, sc.pong, a.coef, a.u, a.denom);
        return;
      }
    }
#endif
#if SLIMGRAD_GWT_AVX2
    if (avx2) {
      gwt_detail::pass2_row_avx2<Wavelet, Levels>(a, g.row(i), m + i * na, v + i * na, w.row(i));
      return;
    }
#endif
    gwt_detail::pass2_row<Wavelet, Levels>(a, g.row(i), m + i * na, v + i * na, w.row(i));
  });
  return true;
}

}  // namespace slimgrad::cpu
