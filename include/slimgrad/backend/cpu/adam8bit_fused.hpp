// slimgrad/backend/cpu/adam8bit_fused.hpp — Adam on Q8Block moments in one pass per block
// (bitsandbytes' kOptimizerStatic8bit2StateBlockwise on a CPU core, algorithms.md §6.5).
//
// The generic chunk path dequantises a chunk of both moments into scratch, runs Adam over it
// with SSE2 (the x86-64 baseline), then takes the absmax and quantises in further passes. Here
// each block of B elements is dequantised into two stack arrays (cpu::q8 kernels), and one
// AVX-512 loop updates the moments and the weights and takes both absmax values; the block is
// quantised back while it is still in L1. The arithmetic is the generic path's, operation for
// operation (m·β1 + (1−β1)·g; v·β2 + ((1−β2)·g)·g; IEEE sqrt and division), with multiplies
// and adds as separate rounded instructions: no contraction into FMA, so the bits equal the
// generic path's (tests/optim/test_stores.cpp checks both paths against each other).
#pragma once

#include <cstdint>

#include "../../optim/adam.hpp"
#include "adam_avx512.hpp"
#include "common.hpp"
#include "elementwise.hpp"
#include "stores.hpp"

// GCC contracts a·b + c into an FMA when the target has one (AVX-512F does), even between
// intrinsics; the kernel must round each operation as the generic path does.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

namespace slimgrad::cpu::q8 {

/// B for the CPU Q8Block<B> store, 0 for any other store.
template <class Store>
inline constexpr int block_of = 0;
template <int B>
inline constexpr int block_of<impl<state::Q8Block<B>, backend::cpu>> = B;

#if SLIMGRAD_Q8_X86

// One block: m, v (fp32, dequantised) and w take the step with gradient g; returns the absmax
// of the new m and v in am, av. n ≤ B; lanes past n are masked.
SLIMGRAD_Q8_TARGET("avx512f")
inline void adam_block_avx512(const float* g, float* w, float* m, float* v, index_t n,
                              const optim::AdamStep& s, float alpha, float& am, float& av) {
  const avx512::Moments c = avx512::moments_of(s);
  const avx512::WeightStep p = avx512::weight_step_of(s.weight, alpha);
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 accm = _mm512_setzero_ps(), accv = _mm512_setzero_ps();
  for (index_t i = 0; i < n; i += 16) {
    const __mmask16 k =
        n - i >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (n - i)) - 1u);
    __m512 mi = _mm512_maskz_loadu_ps(k, m + i);
    __m512 vi = _mm512_maskz_loadu_ps(k, v + i);
    __m512 wi = _mm512_maskz_loadu_ps(k, w + i);
    avx512::adam(c, p, _mm512_maskz_loadu_ps(k, g + i), mi, vi, wi);
    _mm512_mask_storeu_ps(m + i, k, mi);
    _mm512_mask_storeu_ps(v + i, k, vi);
    _mm512_mask_storeu_ps(w + i, k, wi);
    // As absmax_avx512: max(|x|, acc) keeps acc for a NaN x; masked-off lanes stay 0.
    const __m512 absm = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(mi), magnitude));
    const __m512 absv = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(vi), magnitude));
    accm = _mm512_mask_max_ps(accm, k, absm, accm);
    accv = _mm512_mask_max_ps(accv, k, absv, accv);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, accm);
  am = 0.0f;
  for (float x : lanes)
    am = state::q8::absmax_update(am, x);
  _mm512_store_ps(lanes, accv);
  av = 0.0f;
  for (float x : lanes)
    av = state::q8::absmax_update(av, x);
}

#endif  // SLIMGRAD_Q8_X86

/// True when the fused kernel runs on this processor (AVX-512F).
inline bool adam_fused_supported() {
#if SLIMGRAD_Q8_X86
  return best_isa() == Isa::avx512 || best_isa() == Isa::avx512vbmi;
#else
  return false;
#endif
}

/// One Adam step on 8-bit moments (both quantized) for contiguous g and w (count elements):
/// per block, dequantise, step, absmax, quantise. Call only when adam_fused_supported().
template <int B, class Buffer>
void adam_step_fused(Buffer& bm, Buffer& bv, const float* g, float* w, index_t count,
                     const optim::AdamStep& s, float alpha) {
#if SLIMGRAD_Q8_X86
  const Isa isa = best_isa();
  const state::q8::CodeMap& sm = state::q8::signed_code_map();
  const state::q8::CodeMap& um = state::q8::unsigned_code_map();
  // Work items of whole blocks, about 4096 elements (the generic path's thread split).
  constexpr index_t item = B >= 4096 ? B : (4096 / B) * B;
  for_each_chunk(count, B, item, [&](index_t begin, index_t end) {
    alignas(64) float m[B];
    alignas(64) float v[B];
    for (index_t blk = begin; blk < end; blk += B) {
      const index_t n = blk + B < end ? B : end - blk;
      const auto q = static_cast<std::size_t>(blk / B);
      // The next block's lines, requested now: the block's loops take one stream at a time in
      // bursts too short for the hardware prefetcher (LLaMA-60M, one core: 94 → 62 ms of CPU).
      if (const index_t ahead = blk + B; ahead < end) {
        const index_t span = end - ahead < B ? end - ahead : B;
        for (index_t j = 0; j < span; j += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(g + ahead + j), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + ahead + j), _MM_HINT_T0);
        }
        for (index_t j = 0; j < span; j += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(bm.codes.data() + ahead + j), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(bv.codes.data() + ahead + j), _MM_HINT_T0);
        }
      }
      dequantize(isa, sm, bm.codes.data() + blk, n, bm.absmax[q], m);
      dequantize(isa, um, bv.codes.data() + blk, n, bv.absmax[q], v);
      float am = 0.0f, av = 0.0f;
      adam_block_avx512(g + blk, w + blk, m, v, n, s, alpha, am, av);
      bm.absmax[q] = am;
      bv.absmax[q] = av;
      quantize(isa, sm, true, m, n, am, bm.codes.data() + blk);
      quantize(isa, um, false, v, n, av, bv.codes.data() + blk);
    }
  });
#else
  (void)bm, (void)bv, (void)g, (void)w, (void)count, (void)s, (void)alpha;
#endif
}

}  // namespace slimgrad::cpu::q8

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
