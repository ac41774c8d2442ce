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
// Two levels (the `gwt` recipe) take l2::pass1 / l2::pass2: 64 samples at a time with every
// intermediate in registers (no scratch rows, no per-level loops), the finite check on pass 1's
// loads, and the next rows' g, w and moments prefetched block by block.
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

// Even and odd samples of two vectors holding x[2o .. 2o + 32).
SLIMGRAD_GWT_TARGET inline void deinterleave(__m512 v0, __m512 v1, __m512& even, __m512& odd) {
  const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  even = _mm512_permutex2var_ps(v0, ie, v1);
  odd = _mm512_permutex2var_ps(v0, io, v1);
}

// Even and odd samples of x[2o .. 2o + 2k) (k ≤ 16 pairs; the rest of the lanes are 0).
SLIMGRAD_GWT_TARGET inline void split(const float* x, index_t k, __m512& even, __m512& odd) {
  deinterleave(_mm512_maskz_loadu_ps(lanes(2 * k), x),
               _mm512_maskz_loadu_ps(lanes(2 * k - 16), x + 16), even, odd);
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

/// ‖N‖² in NormLanes' order: lane j mod 8 of a row's N sums its squares in double; 16 values of
/// N at a time, the low 8 first.
SLIMGRAD_GWT_TARGET inline void add_norm2(__m512d& acc, __m512 nj) {
  const __m512d nd = _mm512_castps_pd(nj);
  const __m512d lo =
      _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, nd, 0)));
  const __m512d hi =
      _mm512_maskz_cvtps_pd(0xFF, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, nd, 1)));
  acc = _mm512_add_pd(acc, _mm512_mul_pd(lo, lo));  // float² is exact in double
  acc = _mm512_add_pd(acc, _mm512_mul_pd(hi, hi));
}
SLIMGRAD_GWT_TARGET inline double norm2_total(__m512d acc) {
  alignas(64) double part[8];
  _mm512_store_pd(part, acc);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/// Pass 1 of a row: false if g holds a non-finite value; else ‖N‖² of the row (NormLanes'
/// order) in `norm2`. `ping` holds n/2 floats, `coef` n/2^L.
template <class W, int Levels>
SLIMGRAD_GWT_TARGET inline bool pass1(const float* g, index_t n, const float* m, const float* v,
                                      const optim::AdamStep& s, const Next& next, float* ping,
                                      float* coef, double& norm2) {
  // Level 1 straight from g: the finite check rides on its loads, and the next row of g is
  // requested while this one is transformed.
  const __m512 h0 = _mm512_set1_ps(detail::DwtTaps<W>::lo[0]);
  const __m512 h1 = _mm512_set1_ps(detail::DwtTaps<W>::lo[1]);
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  float* first = Levels == 1 ? coef : ping;
  __mmask16 bad = 0;
  for (index_t o = 0; o < n / 2; o += 16) {
    prefetch(next.g + 2 * o);
    prefetch(next.g + 2 * o + 16);
    const index_t k = n / 2 - o < 16 ? n / 2 - o : 16;
    const __m512 v0 = _mm512_maskz_loadu_ps(lanes(2 * k), g + 2 * o);
    const __m512 v1 = _mm512_maskz_loadu_ps(lanes(2 * k - 16), g + 2 * o + 16);
    bad = static_cast<__mmask16>(
        bad | _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v0), expo), expo) |
        _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v1), expo), expo));
    __m512 e, d;
    deinterleave(v0, v1, e, d);
    _mm512_mask_storeu_ps(first + o, lanes(k),
                          _mm512_add_ps(_mm512_mul_ps(h0, e), _mm512_mul_ps(h1, d)));
  }
  if (bad != 0) return false;
  // The other approximations: level l halves the previous level in place in `ping` (the last
  // into `coef`). Reading o ≥ 16-pairs ahead of writing o keeps the in-place halving safe.
  const float* src = first;
  index_t len = n / 2;
  for (int l = 2; l <= Levels; ++l) {
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
    add_norm2(acc, nj);
  }
  norm2 = norm2_total(acc);
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

// Two levels (the `gwt` recipe) with every intermediate in registers: a block of 64 samples of
// g is 32 level-1 and 16 level-2 approximations, so both passes run block by block without the
// scratch rows and per-level loops of pass1/pass2 above. Same operations, same order, same bits.
namespace l2 {

struct Block {
  __m512 x[4];     // 64 samples of g (zeros past the row)
  __mmask16 k[4];  // the lanes of x inside the row
  __mmask16 ka;    // the lanes of the level-2 coefficients inside the row
};
SLIMGRAD_GWT_TARGET inline Block load(const float* g, index_t n, index_t b) {
  Block x;
  for (int q = 0; q < 4; ++q) {
    x.k[q] = lanes(n - b - 16 * q);
    x.x[q] = _mm512_maskz_loadu_ps(x.k[q], g + b + 16 * q);
  }
  x.ka = lanes((n - b) / 4);
  return x;
}

struct Taps {
  __m512 h0, h1, g0, g1;
};
template <class W>
SLIMGRAD_GWT_TARGET inline Taps taps() {
  return {_mm512_set1_ps(detail::DwtTaps<W>::lo[0]), _mm512_set1_ps(detail::DwtTaps<W>::lo[1]),
          _mm512_set1_ps(detail::DwtTaps<W>::hi[0]), _mm512_set1_ps(detail::DwtTaps<W>::hi[1])};
}
SLIMGRAD_GWT_TARGET inline __m512 lo(const Taps& t, __m512 e, __m512 o) {
  return _mm512_add_ps(_mm512_mul_ps(t.h0, e), _mm512_mul_ps(t.h1, o));
}
SLIMGRAD_GWT_TARGET inline __m512 hi(const Taps& t, __m512 e, __m512 o) {
  return _mm512_add_ps(_mm512_mul_ps(t.g0, e), _mm512_mul_ps(t.g1, o));
}
// Inverse of one level: x[0, 32) from a[0, 16) and d[0, 16) (inverse_level's arithmetic).
SLIMGRAD_GWT_TARGET inline void inverse(const Taps& t, __m512 a, __m512 d, __m512& x_lo,
                                        __m512& x_hi) {
  const __m512i il = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ih = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512 x0 = _mm512_add_ps(_mm512_mul_ps(t.h0, a), _mm512_mul_ps(t.g0, d));
  const __m512 x1 = _mm512_add_ps(_mm512_mul_ps(t.h1, a), _mm512_mul_ps(t.g1, d));
  x_lo = _mm512_permutex2var_ps(x0, il, x1);
  x_hi = _mm512_permutex2var_ps(x0, ih, x1);
}

/// pass1<W, 2> in registers. Prefetches the next row of g, m and v.
template <class W>
SLIMGRAD_GWT_TARGET inline bool pass1(const float* g, index_t n, const float* m, const float* v,
                                      const optim::AdamStep& s, const Next& next, double& norm2) {
  const Taps t = taps<W>();
  const avx512::Moments c = avx512::moments_of(s);
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  __m512d acc = _mm512_setzero_pd();
  for (index_t b = 0; b < n; b += 64) {
    for (int q = 0; q < 4; ++q)
      prefetch(next.g + b + 16 * q);
    prefetch(next.m + b / 4);
    prefetch(next.v + b / 4);
    const Block x = load(g, n, b);
    for (int q = 0; q < 4; ++q)
      bad = static_cast<__mmask16>(
          bad | _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x.x[q]), expo), expo));
    __m512 e, o;
    deinterleave(x.x[0], x.x[1], e, o);
    const __m512 a0 = lo(t, e, o);
    deinterleave(x.x[2], x.x[3], e, o);
    const __m512 a1 = lo(t, e, o);
    deinterleave(a0, a1, e, o);
    const __m512 a = lo(t, e, o);
    const index_t j = b / 4;
    __m512 mt = _mm512_maskz_loadu_ps(x.ka, m + j), vt = _mm512_maskz_loadu_ps(x.ka, v + j), root;
    avx512::moments(c, a, mt, vt, root);  // the would-be moments
    add_norm2(acc, _mm512_maskz_div_ps(x.ka, mt, _mm512_add_ps(root, c.eps)));
  }
  if (bad != 0) return false;
  norm2 = norm2_total(acc);
  return true;
}

/// pass2<W, 2> in registers. Prefetches the next row of g, m, v and w.
template <class W>
SLIMGRAD_GWT_TARGET inline void pass2(const float* g, index_t n, float* m, float* v, float* w,
                                      const optim::AdamStep& s, float rho, float alpha,
                                      const Next& next) {
  const Taps t = taps<W>();
  const avx512::Moments c = avx512::moments_of(s);
  const avx512::WeightStep p = avx512::weight_step_of(s.weight, alpha);
  const __m512 r = _mm512_set1_ps(rho);
  const bool scale_rho = rho != 1.0f;
  // Level-1 detail j has ancestor j >> 1: lanes of the first and the second 16 details.
  const __m512i up0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i up1 = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  for (index_t b = 0; b < n; b += 64) {
    for (int q = 0; q < 4; ++q) {
      prefetch(next.g + b + 16 * q);
      prefetch(next.w + b + 16 * q);
    }
    prefetch(next.m + b / 4);
    prefetch(next.v + b / 4);
    const Block x = load(g, n, b);
    // Forward: a1 = (a0, a1), d1 = (d10, d11); a2 = a, d2 = d.
    __m512 e, o;
    deinterleave(x.x[0], x.x[1], e, o);
    const __m512 a10 = lo(t, e, o), d10 = hi(t, e, o);
    deinterleave(x.x[2], x.x[3], e, o);
    const __m512 a11 = lo(t, e, o), d11 = hi(t, e, o);
    deinterleave(a10, a11, e, o);
    const __m512 a = lo(t, e, o), d = hi(t, e, o);
    // Adam on the approximations; N/ρ.
    const index_t j = b / 4;
    __m512 mj = _mm512_maskz_loadu_ps(x.ka, m + j), vj = _mm512_maskz_loadu_ps(x.ka, v + j), root;
    avx512::moments(c, a, mj, vj, root);
    _mm512_mask_storeu_ps(m + j, x.ka, mj);
    _mm512_mask_storeu_ps(v + j, x.ka, vj);
    const __m512 den = _mm512_add_ps(root, c.eps);
    // Lanes past the row hold zeros and stay in lanes past the row through every step below
    // (never stored), so the divisions need no masks.
    __m512 nj = _mm512_div_ps(mj, den);
    if (scale_rho) nj = _mm512_div_ps(nj, r);
    // Details over their ancestor's D·ρ.
    const __m512 up = _mm512_mul_ps(den, r);
    const __m512 d2 = _mm512_div_ps(d, up);
    const __m512 d10n = _mm512_div_ps(d10, _mm512_maskz_permutexvar_ps(0xFFFF, up0, up));
    const __m512 d11n = _mm512_div_ps(d11, _mm512_maskz_permutexvar_ps(0xFFFF, up1, up));
    // Inverse, then w.
    __m512 b0, b1, u0, u1, u2, u3;
    inverse(t, nj, d2, b0, b1);
    inverse(t, b0, d10n, u0, u1);
    inverse(t, b1, d11n, u2, u3);
    const __m512 u[4] = {u0, u1, u2, u3};
    for (int q = 0; q < 4; ++q) {
      const __m512 wq = _mm512_maskz_loadu_ps(x.k[q], w + b + 16 * q);
      _mm512_mask_storeu_ps(w + b + 16 * q, x.k[q], avx512::apply(p, wq, u[q]));
    }
  }
}

}  // namespace l2

}  // namespace slimgrad::cpu::gwt_avx512

#undef SLIMGRAD_GWT_TARGET

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#endif  // SLIMGRAD_GWT_AVX512
