// slimgrad/backend/cpu/adam_avx512.hpp — Adam's per-element arithmetic in AVX-512 registers,
// written once for the fused kernels (fp32 Adam below, 8-bit Adam in adam8bit_fused.hpp, GWT in
// gwt_haar_avx512.hpp), and the fused fp32 Adam step.
//
// Every function is compiled with the target attribute avx512f (so a baseline x86-64 build has
// them, chosen at run time) and the helpers are always inlined into their callers, which carry
// the same attribute. The arithmetic is the generic path's (impl<Adam, cpu>::update_apply and
// optim::adam_moments), operation for operation: m·β1 + (1−β1)·g; v·β2 + ((1−β2)·g)·g; IEEE
// sqrt and division; the weight decay of the convention before or after w + (−c)·u. Multiplies
// and adds are separate rounded instructions, never contracted into FMA, so the bits equal the
// generic path's (tests/optim/test_gwt_fused.cpp compares them).
#pragma once

#include <cstdint>

#include "../../optim/adam.hpp"
#include "common.hpp"
#include "elementwise.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SLIMGRAD_AVX512 1
#include <immintrin.h>
#else
#define SLIMGRAD_AVX512 0
#endif

#if SLIMGRAD_AVX512

// GCC contracts a·b + c into an FMA when the target has one (AVX-512F does), even between
// intrinsics; every caller of these helpers is compiled under the same setting.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

#define SLIMGRAD_AVX512_TARGET __attribute__((target("avx512f")))
#define SLIMGRAD_AVX512_INLINE __attribute__((always_inline, target("avx512f"))) inline

namespace slimgrad::cpu::avx512 {

inline bool supported() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

/// The moment scalars of one step, broadcast.
struct Moments {
  __m512 b1, b2, a1, a2, div, eps;
  bool divide;  ///< x / 1 is x exactly: the hf and bnb conventions skip that division
};
SLIMGRAD_AVX512_INLINE Moments moments_of(const optim::AdamStep& s) {
  return {_mm512_set1_ps(s.beta1),
          _mm512_set1_ps(s.beta2),
          _mm512_set1_ps(s.one_minus_beta1),
          _mm512_set1_ps(s.one_minus_beta2),
          _mm512_set1_ps(s.denom_divisor),
          _mm512_set1_ps(s.eps),
          s.denom_divisor != 1.0f};
}

/// The new moments of 16 coefficients and sqrt(v)[/divisor] (optim::adam_moments and sqrt_n).
SLIMGRAD_AVX512_INLINE void moments(const Moments& c, __m512 g, __m512& m, __m512& v,
                                    __m512& root) {
  m = _mm512_add_ps(_mm512_mul_ps(m, c.b1), _mm512_mul_ps(c.a1, g));
  v = _mm512_add_ps(_mm512_mul_ps(v, c.b2), _mm512_mul_ps(_mm512_mul_ps(c.a2, g), g));
  root = _mm512_maskz_sqrt_ps(0xFFFF, v);  // masked: GCC 12 warns on the unmasked form
  if (c.divide) root = _mm512_div_ps(root, c.div);
}

/// How the weight takes its update (optim::WeightUpdate and the factor α), broadcast.
struct WeightStep {
  __m512 step, alpha, mult, dal;
  bool scale, mult_before, alpha_before, mult_after, alpha_after;
};
SLIMGRAD_AVX512_INLINE WeightStep weight_step_of(const optim::WeightUpdate& p, float alpha) {
  return {_mm512_set1_ps(-p.step_size),
          _mm512_set1_ps(alpha),
          _mm512_set1_ps(p.decay_multiplier),
          _mm512_set1_ps(p.decay_alpha),
          alpha != 1.0f,
          p.decay_before && p.decay_multiplier != 1.0f,
          p.decay_before && p.decay_alpha != 0.0f,
          !p.decay_before && p.decay_multiplier != 1.0f,
          !p.decay_before && p.decay_alpha != 0.0f};
}

/// w after the step with update u: u scaled by α, the convention's decay before or after
/// w + (−c)·u (optim::apply_update, the generic paths' order).
SLIMGRAD_AVX512_INLINE __m512 apply(const WeightStep& p, __m512 w, __m512 u) {
  if (p.scale) u = _mm512_mul_ps(p.alpha, u);
  if (p.mult_before) w = _mm512_mul_ps(w, p.mult);
  if (p.alpha_before) w = _mm512_add_ps(w, _mm512_mul_ps(p.dal, w));
  w = _mm512_add_ps(w, _mm512_mul_ps(p.step, u));
  if (p.mult_after) w = _mm512_mul_ps(w, p.mult);
  if (p.alpha_after) w = _mm512_add_ps(w, _mm512_mul_ps(p.dal, w));
  return w;
}

/// One Adam step of 16 elements: the moments, u = m / (sqrt(v)[/divisor] + ε), and w.
SLIMGRAD_AVX512_INLINE void adam(const Moments& c, const WeightStep& p, __m512 g, __m512& m,
                                 __m512& v, __m512& w) {
  __m512 root;
  moments(c, g, m, v, root);
  w = apply(p, w, _mm512_div_ps(m, _mm512_add_ps(root, c.eps)));
}

// Elements [begin, end) of the fp32 step. Each vector asks for the lines `ahead` elements on
// in all four streams (never past `count`): the hardware prefetcher does not cross 4 KiB pages
// and runs out of steam with four read-write streams per core.
SLIMGRAD_AVX512_TARGET inline void adam_fp32_range(const float* g, float* w, float* m, float* v,
                                                   index_t begin, index_t end, index_t count,
                                                   const optim::AdamStep& s, float alpha) {
  constexpr index_t ahead = 1024;
  const Moments c = moments_of(s);
  const WeightStep p = weight_step_of(s.weight, alpha);
  index_t i = begin;
  for (; i + 16 <= end; i += 16) {
    if (i + ahead < count) {
      _mm_prefetch(reinterpret_cast<const char*>(g + i + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w + i + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(m + i + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + i + ahead), _MM_HINT_T0);
    }
    __m512 mi = _mm512_loadu_ps(m + i), vi = _mm512_loadu_ps(v + i), wi = _mm512_loadu_ps(w + i);
    adam(c, p, _mm512_loadu_ps(g + i), mi, vi, wi);
    _mm512_storeu_ps(m + i, mi);
    _mm512_storeu_ps(v + i, vi);
    _mm512_storeu_ps(w + i, wi);
  }
  if (i < end) {
    const auto k = static_cast<__mmask16>((1u << (end - i)) - 1u);
    __m512 mi = _mm512_maskz_loadu_ps(k, m + i), vi = _mm512_maskz_loadu_ps(k, v + i);
    __m512 wi = _mm512_maskz_loadu_ps(k, w + i);
    adam(c, p, _mm512_maskz_loadu_ps(k, g + i), mi, vi, wi);
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    _mm512_mask_storeu_ps(w + i, k, wi);
  }
}

/// One Adam step on fp32 moments m, v for contiguous g and w (count elements each), in
/// parallel chunks. Call only when supported().
inline void adam_step_fp32(const float* g, float* w, float* m, float* v, index_t count,
                           const optim::AdamStep& s, float alpha) {
  for_each_chunk(count, 16, index_t{1} << 14,
                 [&](index_t b, index_t e) { adam_fp32_range(g, w, m, v, b, e, count, s, alpha); });
}

}  // namespace slimgrad::cpu::avx512

#undef SLIMGRAD_AVX512_TARGET
#undef SLIMGRAD_AVX512_INLINE

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#endif  // SLIMGRAD_AVX512
