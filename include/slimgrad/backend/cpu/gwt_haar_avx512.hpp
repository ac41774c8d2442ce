// slimgrad/backend/cpu/gwt_haar_avx512.hpp — the rows of the fused GWT step (gwt_fused.hpp) for
// Haar on AVX-512, written with intrinsics.
//
// (Masked forms of some intrinsics throughout: GCC 12 warns about the unmasked forms' undefined
// source operand.)
//
// Why intrinsics rather than the AVX2 build of the portable rows: the Haar butterflies read and
// write every other sample, which the compilers vectorise with long shuffle sequences (or not
// at all), and AVX-512F implies FMA, so an auto-vectorised a·b + c may be contracted (clang
// does so even inside inlined helpers). Here every operation is an explicit, separately rounded
// instruction in the portable rows' order, the even/odd split and merge are one two-source
// permute each, pass 1 computes only the approximations it needs (‖N‖ does not depend on the
// details), and the finite check rides in pass 1's loads. Same bits as gwt_detail::pass1_row /
// pass2_row: the same IEEE multiplies, adds, divisions and square roots; ‖N‖² per row in the
// eight partial sums of gwt_detail::norm2_lanes (lane j mod 8), combined in the same tree.
//
// Applies when every level halves the row exactly (n a multiple of 2^L): no boundary samples.
#pragma once

#include <cstdint>

#include "../../optim/adam.hpp"
#include "../../transforms/dwt.hpp"
#include "adam_avx512.hpp"
#include "common.hpp"
#include "dwt.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SLIMGRAD_GWT_AVX512 1
#include <immintrin.h>
#else
#define SLIMGRAD_GWT_AVX512 0
#endif

#if SLIMGRAD_GWT_AVX512

// GCC contracts a·b + c into an FMA when the target has one, even between intrinsics.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

#define SLIMGRAD_GWT_TARGET __attribute__((target("avx512f")))

namespace slimgrad::cpu::gwt_avx512 {

/// True when this row length takes the AVX-512 Haar rows (every level halves it exactly).
inline bool applies(const transforms::DwtLayout& lay) {
  const index_t whole = index_t{1} << lay.levels;
  return lay.n > 0 && lay.n % whole == 0 && lay.approx_length() == lay.n / whole;
}

inline bool supported() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// Mask of the first k lanes (none for k ≤ 0, all for k ≥ 16).
SLIMGRAD_GWT_TARGET inline __mmask16 lanes(index_t k) {
  if (k <= 0) return 0;
  return k >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << k) - 1u);
}

// Even and odd samples of x[2o .. 2o + 2k) (k ≤ 16 pairs; the rest of the lanes are 0).
SLIMGRAD_GWT_TARGET inline void split(const float* x, index_t k, __m512& even, __m512& odd) {
  const __m512 v0 = _mm512_maskz_loadu_ps(lanes(2 * k), x);
  const __m512 v1 = _mm512_maskz_loadu_ps(lanes(2 * k - 16), x + 16);
  const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  even = _mm512_permutex2var_ps(v0, ie, v1);
  odd = _mm512_permutex2var_ps(v0, io, v1);
}

// One forward level of t = 2h samples: lo[o] = h0·x0 + h1·x1 (and hi with g0, g1 unless null).
template <class W>
SLIMGRAD_GWT_TARGET inline void forward_level(const float* x, index_t h, float* lo, float* hi) {
  const __m512 h0 = _mm512_set1_ps(detail::DwtTaps<W>::lo[0]);
  const __m512 h1 = _mm512_set1_ps(detail::DwtTaps<W>::lo[1]);
  const __m512 g0 = _mm512_set1_ps(detail::DwtTaps<W>::hi[0]);
  const __m512 g1 = _mm512_set1_ps(detail::DwtTaps<W>::hi[1]);
  for (index_t o = 0; o < h; o += 16) {
    const index_t k = h - o < 16 ? h - o : 16;
    __m512 e, d;
    split(x + 2 * o, k, e, d);
    const __mmask16 mk = lanes(k);
    _mm512_mask_storeu_ps(lo + o, mk, _mm512_add_ps(_mm512_mul_ps(h0, e), _mm512_mul_ps(h1, d)));
    if (hi != nullptr)
      _mm512_mask_storeu_ps(hi + o, mk, _mm512_add_ps(_mm512_mul_ps(g0, e), _mm512_mul_ps(g1, d)));
  }
}

// One inverse level: 2h samples from h approximation and detail samples.
template <class W>
SLIMGRAD_GWT_TARGET inline void inverse_level(const float* a, const float* d, index_t h, float* x) {
  const __m512 h0 = _mm512_set1_ps(detail::DwtTaps<W>::lo[0]);
  const __m512 h1 = _mm512_set1_ps(detail::DwtTaps<W>::lo[1]);
  const __m512 g0 = _mm512_set1_ps(detail::DwtTaps<W>::hi[0]);
  const __m512 g1 = _mm512_set1_ps(detail::DwtTaps<W>::hi[1]);
  const __m512i il = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ih = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (index_t p = 0; p < h; p += 16) {
    const index_t k = h - p < 16 ? h - p : 16;
    const __mmask16 mk = lanes(k);
    const __m512 ap = _mm512_maskz_loadu_ps(mk, a + p), dp = _mm512_maskz_loadu_ps(mk, d + p);
    const __m512 x0 = _mm512_add_ps(_mm512_mul_ps(h0, ap), _mm512_mul_ps(g0, dp));
    const __m512 x1 = _mm512_add_ps(_mm512_mul_ps(h1, ap), _mm512_mul_ps(g1, dp));
    _mm512_mask_storeu_ps(x + 2 * p, lanes(2 * k), _mm512_permutex2var_ps(x0, il, x1));
    _mm512_mask_storeu_ps(x + 2 * p + 16, lanes(2 * k - 16), _mm512_permutex2var_ps(x0, ih, x1));
  }
}

/// The next row of each stream, prefetched while this row runs: the row loops touch one stream
/// at a time, in bursts too short for the hardware prefetcher to run ahead (the last row passes
/// its own rows).
struct Next {
  const float *g, *m, *v, *w;
};
SLIMGRAD_GWT_TARGET inline void prefetch(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

/// Pass 1 of a row: false if g holds a non-finite value; else ‖N‖² of the row (NormLanes'
/// order) in `norm2`. `ping` holds n/2 floats, `coef` n/2^L.
template <class W, int Levels>
SLIMGRAD_GWT_TARGET inline bool pass1(const float* g, index_t n, const float* m, const float* v,
                                      const optim::AdamStep& s, const Next& next, float* ping,
                                      float* coef, double& norm2) {
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (index_t j = 0; j < n; j += 16) {
    const __m512i b =
        _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(n - j), g + j)), expo);
    bad = static_cast<__mmask16>(bad | _mm512_cmpeq_epi32_mask(b, expo));
  }
  if (bad != 0) return false;
  // Approximations only: level l halves the previous level in place in `ping` (the last into
  // `coef`). Reading o ≥ 16-pairs ahead of writing o keeps the in-place halving safe.
  const float* src = g;
  index_t len = n;
  for (int l = 1; l <= Levels; ++l) {
    float* dst = l == Levels ? coef : ping;
    forward_level<W>(src, len / 2, dst, nullptr);
    src = dst;
    len /= 2;
  }
  const index_t na = len;
  const avx512::Moments c = avx512::moments_of(s);
  __m512d acc = _mm512_setzero_pd();
  for (index_t j = 0; j < na; j += 16) {
    prefetch(next.m + j);
    prefetch(next.v + j);
    const __mmask16 k = lanes(na - j);
    __m512 mt = _mm512_maskz_loadu_ps(k, m + j), vt = _mm512_maskz_loadu_ps(k, v + j), root;
    // The would-be moments: ‖N‖ needs them before the step.
    avx512::moments(c, _mm512_maskz_loadu_ps(k, coef + j), mt, vt, root);
    // Lanes past na: 0/(0 + ε) would be NaN for ε = 0, so the division is masked to 0.
    const __m512 nj = _mm512_maskz_div_ps(k, mt, _mm512_add_ps(root, c.eps));
    const __m512d nd = _mm512_castps_pd(nj);
    const __m512d lo =
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, nd, 0)));
    const __m512d hi =
        _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, nd, 1)));
    acc = _mm512_add_pd(acc, _mm512_mul_pd(lo, lo));  // float² is exact in double
    acc = _mm512_add_pd(acc, _mm512_mul_pd(hi, hi));
  }
  alignas(64) double part[8];
  _mm512_store_pd(part, acc);
  norm2 = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  return true;
}

/// Pass 2 of a row: the step (gwt_detail::pass2_row). `ping` and `pong` hold n/2 floats, `coef`
/// n, `u` n, `den` n/2^L.
template <class W, int Levels>
SLIMGRAD_GWT_TARGET inline void pass2(const float* g, index_t n, float* m, float* v, float* w,
                                      const optim::AdamStep& s, float rho, float alpha,
                                      const Next& next, float* ping, float* pong, float* coef,
                                      float* u, float* den) {
  // Forward: a_l into ping/pong (a_L into coef[0, na)), d_l into coef[n/2^l, n/2^(l−1)) (the
  // packed layout with K = n).
  const float* src = g;
  index_t len = n;
  for (int l = 1; l <= Levels; ++l) {
    const index_t h = len / 2;
    float* dst = l == Levels ? coef : (l % 2 == 1 ? ping : pong);
    forward_level<W>(src, h, dst, coef + h);
    src = dst;
    len = h;
  }
  const index_t na = len;
  const avx512::Moments c = avx512::moments_of(s);
  const __m512 r = _mm512_set1_ps(rho);
  const bool scale_rho = rho != 1.0f;
  for (index_t j = 0; j < na; j += 16) {
    prefetch(next.m + j);
    prefetch(next.v + j);
    const __mmask16 k = lanes(na - j);
    __m512 mj = _mm512_maskz_loadu_ps(k, m + j), vj = _mm512_maskz_loadu_ps(k, v + j), root;
    avx512::moments(c, _mm512_maskz_loadu_ps(k, coef + j), mj, vj, root);
    _mm512_mask_storeu_ps(m + j, k, mj);
    _mm512_mask_storeu_ps(v + j, k, vj);
    const __m512 dj = _mm512_add_ps(root, c.eps);
    _mm512_mask_storeu_ps(den + j, k, dj);
    __m512 nj = _mm512_maskz_div_ps(k, mj, dj);
    if (scale_rho) nj = _mm512_div_ps(nj, r);
    _mm512_mask_storeu_ps(coef + j, k, nj);
  }
  // Details of level l divided by their ancestor's D·ρ: index j of d_l has ancestor j >> (L−l).
  for (int l = 1; l <= Levels; ++l) {
    const index_t h = n >> l;
    float* d = coef + h;
    const int shift = Levels - l;
    const __m512i idx = _mm512_maskz_srli_epi32(
        0xFFFF, _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        static_cast<unsigned>(shift));
    for (index_t j = 0; j < h; j += 16) {
      const __mmask16 k = lanes(h - j);
      const index_t first = j >> shift;
      const __m512 dw = _mm512_maskz_loadu_ps(lanes(na - first), den + first);
      const __m512 up = _mm512_mul_ps(_mm512_maskz_permutexvar_ps(0xFFFF, idx, dw), r);
      _mm512_mask_storeu_ps(d + j, k, _mm512_maskz_div_ps(k, _mm512_maskz_loadu_ps(k, d + j), up));
    }
  }
  // Inverse: a_L (coef) and d_L → a_{L−1} ... → u.
  const float* a = coef;
  for (int l = Levels; l >= 1; --l) {
    const index_t h = n >> l;
    float* dst = l == 1 ? u : ((Levels - l) % 2 == 0 ? ping : pong);
    inverse_level<W>(a, coef + h, h, dst);
    a = dst;
  }
  // w: the convention's decay and the step (apply_row), u scaled by α first.
  const avx512::WeightStep p = avx512::weight_step_of(s.weight, alpha);
  for (index_t j = 0; j < n; j += 16) {
    prefetch(next.w + j);
    prefetch(next.g + j);
    const __mmask16 k = lanes(n - j);
    const __m512 wj = _mm512_maskz_loadu_ps(k, w + j);
    _mm512_mask_storeu_ps(w + j, k, avx512::apply(p, wj, _mm512_maskz_loadu_ps(k, u + j)));
  }
}

}  // namespace slimgrad::cpu::gwt_avx512

#undef SLIMGRAD_GWT_TARGET

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#endif  // SLIMGRAD_GWT_AVX512
