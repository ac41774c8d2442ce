// slimgrad/backend/cpu/adam8bit_fused.hpp — Adam on Q8Block moments in one pass per block
// (bitsandbytes' kOptimizerStatic8bit2StateBlockwise on a CPU core, algorithms.md §6.5).
//
// The generic chunk path dequantises a chunk of both moments into scratch, runs Adam over it
// with SSE2 (the x86-64 baseline), then takes the absmax and quantises in further passes. Here
// each block of B elements is dequantised into two stack arrays (cpu::q8 kernels), and one
// AVX-512 loop updates the moments and the weights and takes both absmax values; the block is
// quantised back while it is still in L1, without a division per element (quantize_block_avx512:
// the same codes). The arithmetic is the generic path's, operation for operation (m·β1 +
// (1−β1)·g; v·β2 + ((1−β2)·g)·g; IEEE sqrt and division), with multiplies and adds as separate
// rounded instructions: no contraction into FMA, so the bits equal the generic path's
// (tests/optim/test_gwt_fused.cpp checks both paths against each other).
#pragma once

#include <cstdint>

#include "../../core/numeric.hpp"
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

// Adam on 16 elements (lanes outside k are zero and not stored); the largest magnitude bits of
// the new m and v folded into accm and accv (as unsigned integers: the order of non-negative
// floats, with NaN above ∞, so a NaN shows), and v's bits OR-ed into signs (its sign bit tells
// whether some v is negative: never, v = β2·v + ((1−β2)·g)·g from v ≥ 0, but the quantiser
// below relies on it, so it is checked rather than assumed).
SLIMGRAD_Q8_TARGET("avx512f")
__attribute__((always_inline)) inline void adam16(const avx512::Moments& c,
                                                  const avx512::WeightStep& p, const float* g,
                                                  float* w, float* m, float* v, __mmask16 k,
                                                  __m512i& accm, __m512i& accv, __m512i& signs) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 mi = _mm512_maskz_loadu_ps(k, m);
  __m512 vi = _mm512_maskz_loadu_ps(k, v);
  __m512 wi = _mm512_maskz_loadu_ps(k, w);
  avx512::adam(c, p, _mm512_maskz_loadu_ps(k, g), mi, vi, wi);
  _mm512_mask_storeu_ps(m, k, mi);
  _mm512_mask_storeu_ps(v, k, vi);
  _mm512_mask_storeu_ps(w, k, wi);
  accm = _mm512_mask_max_epu32(accm, k, _mm512_and_si512(_mm512_castps_si512(mi), magnitude), accm);
  accv = _mm512_mask_max_epu32(accv, k, _mm512_and_si512(_mm512_castps_si512(vi), magnitude), accv);
  signs = _mm512_or_si512(signs, _mm512_castps_si512(vi));
}

// The absmax of a block from the largest magnitude bits of its values: exact when no value is
// NaN (returns true); with a NaN, the store's NaN-skipping absmax (returns false).
SLIMGRAD_Q8_TARGET("avx512f")
inline bool absmax_of(__m512i acc, Isa isa, const float* x, index_t n, float& absmax) {
  alignas(64) std::uint32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  std::uint32_t top = 0;
  for (std::uint32_t b : lanes)
    top = b > top ? b : top;
  if (top <= 0x7F800000u) {
    absmax = numeric::float_from_bits(top);
    return true;
  }
  absmax = q8::absmax(isa, x, n);
  return false;
}

/// Which optional operations a step takes (the flags of avx512::Moments and WeightStep, as
/// bits): the block loop is compiled for the conventions' usual sets, so that it does not test
/// them per vector (a tenth of the step's instructions).
inline int adam_kind(const optim::AdamStep& s, float alpha) {
  const optim::WeightUpdate& p = s.weight;
  return (s.denom_divisor != 1.0f ? 1 : 0) | (alpha != 1.0f ? 2 : 0) |
         (p.decay_before && p.decay_multiplier != 1.0f ? 4 : 0) |
         (p.decay_before && p.decay_alpha != 0.0f ? 8 : 0) |
         (!p.decay_before && p.decay_multiplier != 1.0f ? 16 : 0) |
         (!p.decay_before && p.decay_alpha != 0.0f ? 32 : 0);
}
/// The sets compiled apart: none (no weight decay), bnb (decay after, multiplied), torch
/// (divisor, decay before, multiplied), hf (decay after, added); others test the flags.
inline constexpr int adam_kinds[] = {0, 16, 1, 1 | 4, 32};

// One block: m, v (fp32, dequantised) and w take the step with gradient g; am and av receive
// the absmax of the new m and v; plain_m and plain_v tell whether the block quantiser may take
// them (no NaN, and no v with its sign bit set). n ≤ B, lanes past n are masked. Kind: the
// adam_kind() of s, or −1 for any.
template <int Kind>
SLIMGRAD_Q8_TARGET("avx512f")
inline void adam_block_avx512(Isa isa, const float* g, float* w, float* m, float* v, index_t n,
                              const optim::AdamStep& s, float alpha, float& am, float& av,
                              bool& plain_m, bool& plain_v) {
  avx512::Moments c = avx512::moments_of(s);
  avx512::WeightStep p = avx512::weight_step_of(s.weight, alpha);
  if constexpr (Kind >= 0) {
    c.divide = (Kind & 1) != 0;
    p.scale = (Kind & 2) != 0;
    p.mult_before = (Kind & 4) != 0;
    p.alpha_before = (Kind & 8) != 0;
    p.mult_after = (Kind & 16) != 0;
    p.alpha_after = (Kind & 32) != 0;
  }
  __m512i accm = _mm512_setzero_si512(), accv = _mm512_setzero_si512();
  __m512i signs = _mm512_setzero_si512();
  index_t i = 0;
  for (; i + 16 <= n; i += 16)
    adam16(c, p, g + i, w + i, m + i, v + i, 0xFFFF, accm, accv, signs);
  if (i < n)
    adam16(c, p, g + i, w + i, m + i, v + i, static_cast<__mmask16>((1u << (n - i)) - 1u), accm,
           accv, signs);
  plain_m = absmax_of(accm, isa, m, n, am);
  plain_v =
      absmax_of(accv, isa, v, n, av) && _mm512_cmplt_epi32_mask(signs, _mm512_setzero_si512()) == 0;
}

// The codes of 16 normalised values x (|x| ≤ 1 + 8 ulp, no NaN; second moments ≥ +0) by the
// piece formulas of PieceTables, with the lanes whose code could differ from that of any float
// within 4 ulp of x flagged in `ambiguous` (the same margin as pieces_avx512, whose clamp of |x|
// to 1 and NaN test are not needed here). Fewer instructions than pieces_avx512: the binade by a
// saturating 16-bit subtraction, rounding and the distance to it by vcvtps2dq and vreduceps
// (AVX512DQ), the mirror of negative values by a saturating byte subtraction (AVX512BW). With
// block_piece_tables' bounds, z needs no clamp to the piece's range (two permutes, a max and a
// min fewer than session 5's form, ~10% of the step's cycles) and all permutes are of the
// integer kind (vpermi2ps takes twice vpermi2d's time here). Checked offline on every float of
// the domain (tests/reference/check_block_codes.cpp): codes and flags as in session 5's form
// (clamped, on the tables of build_piece_tables(map, true)), and the 4-ulp property itself.
template <bool Signed>
SLIMGRAD_Q8_TARGET("avx512f,avx512dq,avx512bw")
__attribute__((always_inline)) inline __m512i
    block_codes_avx512(const PieceRegs& p, __m512 x, __mmask16& ambiguous) {
  const __mmask16 all = 0xFFFF;  // masked forms: GCC 12 warns about the unmasked ones
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 ax =
      Signed ? _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude)) : x;
  // Binade: the exponent minus that of 2^-23, 0 below (exponents are in the low 16 bits).
  const __m512i binade =
      _mm512_subs_epu16(_mm512_maskz_srli_epi32(all, _mm512_castps_si512(ax), 23),
                        _mm512_set1_epi32(127 - PieceTables::binades + 1));
  __m512i piece = _mm512_permutex2var_epi32(p.first[0], binade, p.first[1]);
  const __m512 b0 = _mm512_castsi512_ps(_mm512_permutex2var_epi32(
      _mm512_castps_si512(p.bound0[0]), binade, _mm512_castps_si512(p.bound0[1])));
  const __m512 b1 = _mm512_castsi512_ps(_mm512_permutex2var_epi32(
      _mm512_castps_si512(p.bound1[0]), binade, _mm512_castps_si512(p.bound1[1])));
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b0, _CMP_GT_OQ), piece, one);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b1, _CMP_GT_OQ), piece, one);
  const __m512 s = _mm512_maskz_permutexvar_ps(all, piece, p.slope);
  const __m512 t = _mm512_maskz_permutexvar_ps(all, piece, p.offset);
  const __m512 z = _mm512_fmadd_ps(ax, s, t);
  __m512i c = _mm512_maskz_cvt_roundps_epi32(all, z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 dist = _mm512_castsi512_ps(_mm512_and_si512(
      _mm512_castps_si512(_mm512_reduce_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
      magnitude));
  ambiguous = _mm512_cmp_ps_mask(dist, p.margin, _CMP_GT_OQ);
  if constexpr (Signed) {
    // Below −y there are 254 − count(y) midpoints, 0 when y is above mid[254] (count 255): a
    // saturating subtraction; the sign rule moves code 127 (+0) of a negative value to 126.
    c = _mm512_mask_min_epi32(c, _mm512_movepi32_mask(_mm512_castps_si512(x)),
                              _mm512_subs_epu8(_mm512_set1_epi32(254), c), _mm512_set1_epi32(126));
  }
  return c;
}

/// The piece tables of block_codes_avx512: each bound half a spacing past the run below, or
/// closer (build_piece_tables with low_bounds), so that no piece needs a clamp.
inline const PieceTables& block_piece_tables(const state::q8::CodeMap& map) {
  static const PieceTables signed_tables =
      build_piece_tables(state::q8::signed_code_map(), false, true);
  static const PieceTables unsigned_tables =
      build_piece_tables(state::q8::unsigned_code_map(), false, true);
  return &map == &state::q8::signed_code_map() ? signed_tables : unsigned_tables;
}

/// Where quantize_block_avx512 applies: a block absmax in [2^-125, 2^125], so that 1/absmax is
/// a normal float (finite, full precision).
inline bool block_quantizable(float absmax) {
  return absmax >= 0x1p-125f && absmax <= 0x1p125f;
}

// The quantiser of a block inside the fused step, where more is known than in the store's
// quantize_avx512: the absmax was taken over these very values, none of them NaN, and
// block_quantizable(absmax); second moments are ≥ +0 (both checked by the caller). So no division
// is needed: x' = value · (1/absmax) is within 4 ulp of x = value / absmax (two roundings of
// relative error 2^-24 each, and x's own), and block_codes_avx512 flags every lane where a float
// within 4 ulp of x' could have another code (checked on every float x' with |x'| ≤ 1 + 8 ulp
// for both maps, offline; a sampled form is in tests/optim/test_gwt_fused.cpp). A flagged vector
// takes the exact path on x = value / absmax. Same codes as q8::quantize() for every block.
template <bool Signed>
SLIMGRAD_Q8_TARGET("avx512f,avx512dq,avx512bw")
inline void quantize_block_avx512(const state::q8::CodeMap& map, const PieceRegs& regs,
                                  const float* value, index_t n, float absmax, std::uint8_t* out) {
  const PieceRegs p = regs;  // a local copy: the byte stores cannot alias it
  const __m512 r = _mm512_set1_ps(1.0f / absmax);
  // The flags are looked at once per block, not per vector: a branch on each vector's flags
  // waits for the end of its dependency chain (measured: about 7% slower).
  std::uint32_t flags = 0;
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __mmask16 ambiguous = 0;
    const __m512i c =
        block_codes_avx512<Signed>(p, _mm512_mul_ps(_mm512_loadu_ps(value + i), r), ambiguous);
    flags |= ambiguous;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_maskz_cvtepi32_epi8(0xFFFF, c));
  }
  if (flags) {  // about one block in eight: the flagged vectors again, exactly
    const __m512 a = _mm512_set1_ps(absmax);
    for (index_t j = 0; j < i; j += 16) {
      const __m512 v = _mm512_loadu_ps(value + j);
      __mmask16 ambiguous = 0;
      (void)block_codes_avx512<Signed>(p, _mm512_mul_ps(v, r), ambiguous);
      if (ambiguous)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                         _mm512_maskz_cvtepi32_epi8(
                             0xFFFF, exact_codes_avx512<Signed>(map, v, _mm512_div_ps(v, a))));
    }
  }
  quantize_portable(map, Signed, value + i, n - i, absmax, out + i);
}

#endif  // SLIMGRAD_Q8_X86

/// True when the fused kernel runs on this processor (AVX-512F, DQ and BW).
inline bool adam_fused_supported() {
#if SLIMGRAD_Q8_X86
  static const bool yes = (best_isa() == Isa::avx512 || best_isa() == Isa::avx512vbmi) &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return yes;
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
  const PieceTables& st = block_piece_tables(sm);
  const PieceTables& ut = block_piece_tables(um);
  const bool pieces = st.usable && ut.usable;
  const PieceRegs sr = piece_regs(st), ur = piece_regs(ut);
  const int kind = adam_kind(s, alpha);
  // Work items of whole blocks, about 4096 elements (the generic path's thread split).
  constexpr index_t item = B >= 4096 ? B : (4096 / B) * B;
  constexpr index_t lead = B >= 512 ? B : (512 / B) * B;
  for_each_chunk(count, B, item, [&](index_t begin, index_t end) {
    alignas(64) float m[B];
    alignas(64) float v[B];
    for (index_t blk = begin; blk < end; blk += B) {
      const index_t n = blk + B < end ? B : end - blk;
      const auto q = static_cast<std::size_t>(blk / B);
      // The lines of the block `lead` elements on, requested now: the block's loops take one
      // stream at a time in bursts too short for the hardware prefetcher (LLaMA-60M, one core:
      // 94 → 62 ms of CPU). Past the work item's end too: on one thread the next item follows
      // (one block ahead within the item: 2.85–3.25 cycles per parameter from DRAM; 512 elements
      // ahead, across items: 2.4–2.9).
      if (const index_t ahead = blk + lead; ahead < count) {
        const index_t span = count - ahead < B ? count - ahead : B;
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
      bool plain_m = false, plain_v = false;
      switch (kind) {
        case adam_kinds[0]:
          adam_block_avx512<adam_kinds[0]>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av,
                                           plain_m, plain_v);
          break;
        case adam_kinds[1]:
          adam_block_avx512<adam_kinds[1]>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av,
                                           plain_m, plain_v);
          break;
        case adam_kinds[2]:
          adam_block_avx512<adam_kinds[2]>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av,
                                           plain_m, plain_v);
          break;
        case adam_kinds[3]:
          adam_block_avx512<adam_kinds[3]>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av,
                                           plain_m, plain_v);
          break;
        case adam_kinds[4]:
          adam_block_avx512<adam_kinds[4]>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av,
                                           plain_m, plain_v);
          break;
        default:
          adam_block_avx512<-1>(isa, g + blk, w + blk, m, v, n, s, alpha, am, av, plain_m, plain_v);
      }
      bm.absmax[q] = am;
      bv.absmax[q] = av;
      // The block quantiser where its conditions hold (always, unless a moment overflowed),
      // else the store's.
      if (pieces && plain_m && block_quantizable(am))
        quantize_block_avx512<true>(sm, sr, m, n, am, bm.codes.data() + blk);
      else
        quantize(isa, sm, true, m, n, am, bm.codes.data() + blk);
      if (pieces && plain_v && block_quantizable(av))
        quantize_block_avx512<false>(um, ur, v, n, av, bv.codes.data() + blk);
      else
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
