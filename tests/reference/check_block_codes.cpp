// Offline exhaustive check of the fused 8-bit Adam quantiser's codes (backend/cpu/
// adam8bit_fused.hpp, block_codes_avx512) on every float x with |x| ≤ 1 + 8 ulp (both signs for
// the signed map, x ≥ +0 for the unsigned one), in two ways:
//  1. against session 5's form (binades, clamps to the piece's range, the tables of
//     build_piece_tables(map, true)): each lane the current form leaves unflagged is unflagged
//     there with the same code;
//  2. the property the fused step needs, directly: each unflagged lane's code is q8::quantize()'s
//     (the store's, the generic path's) for every float of its sign within 4 ulp of x,
//     magnitudes clamped to 1.
// Both fail on the clamped form's tables (8,161,795 signed and 428,775 unsigned lanes wrong).
// Build from the repository root, and run (AVX-512 F/DQ/BW/VL; about 14 s and 1 GB here):
//   g++ -std=c++20 -O2 -fopenmp -Iinclude -isystem /usr/include/eigen3 -o /tmp/check_block_codes
//     tests/reference/check_block_codes.cpp
//   /tmp/check_block_codes
#include <algorithm>
#include <cstdio>
#include <slimgrad/backend/cpu/adam8bit_fused.hpp>
#include <vector>

using namespace slimgrad;
using cpu::q8::PieceRegs;
using cpu::q8::PieceTables;

namespace {

// The floats whose bits are u, u + 1, ..., u + 15, with `sign` OR-ed in.
__attribute__((target("avx512f"))) __m512 sixteen_floats(std::uint32_t u, std::uint32_t sign) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(u)), lanes),
                      _mm512_set1_epi32(static_cast<int>(sign))));
}

// The lanes of sixteen_floats(u, ·) whose bits are at most `last`.
__mmask16 lanes_up_to(std::uint32_t u, std::uint32_t last) {
  return static_cast<__mmask16>(last - u >= 15 ? 0xFFFF : (2u << (last - u)) - 1u);
}

// The proven form (session 5), verbatim but for its name.
template <bool Signed>
__attribute__((target("avx512f,avx512dq,avx512bw"), always_inline)) inline __m512i proven_codes(
    const PieceRegs& p, __m512 x, __mmask16& ambiguous) {
  const __mmask16 all = 0xFFFF;
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 ax =
      Signed ? _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), magnitude)) : x;
  const __m512i binade =
      _mm512_subs_epu16(_mm512_maskz_srli_epi32(all, _mm512_castps_si512(ax), 23),
                        _mm512_set1_epi32(127 - PieceTables::binades + 1));
  __m512i piece = _mm512_permutex2var_epi32(p.first[0], binade, p.first[1]);
  const __m512 b0 = _mm512_permutex2var_ps(p.bound0[0], binade, p.bound0[1]);
  const __m512 b1 = _mm512_permutex2var_ps(p.bound1[0], binade, p.bound1[1]);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b0, _CMP_GT_OQ), piece, one);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b1, _CMP_GT_OQ), piece, one);
  const __m512 s = _mm512_maskz_permutexvar_ps(all, piece, p.slope);
  const __m512 t = _mm512_maskz_permutexvar_ps(all, piece, p.offset);
  const __m512 lo = _mm512_maskz_permutexvar_ps(all, piece, p.lo);
  const __m512 hi = _mm512_maskz_permutexvar_ps(all, piece, p.hi);
  const __m512 z =
      _mm512_maskz_min_ps(all, _mm512_maskz_max_ps(all, _mm512_fmadd_ps(ax, s, t), lo), hi);
  __m512i c = _mm512_maskz_cvt_roundps_epi32(all, z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 dist = _mm512_castsi512_ps(_mm512_and_si512(
      _mm512_castps_si512(_mm512_reduce_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)),
      magnitude));
  ambiguous = _mm512_cmp_ps_mask(dist, p.margin, _CMP_GT_OQ);
  if constexpr (Signed)
    c = _mm512_mask_min_epi32(c, _mm512_movepi32_mask(_mm512_castps_si512(x)),
                              _mm512_subs_epu8(_mm512_set1_epi32(254), c), _mm512_set1_epi32(126));
  return c;
}

template <bool Signed>
__attribute__((target("avx512f,avx512dq,avx512bw"))) void check(std::uint32_t sign) {
  const state::q8::CodeMap& map =
      Signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
  const PieceRegs regs = cpu::q8::piece_regs(cpu::q8::block_piece_tables(map));
  const PieceRegs proven = cpu::q8::piece_regs(cpu::q8::build_piece_tables(map, true));
  const std::uint32_t last = numeric::float_bits(1.0f) + 8;
  std::uint64_t bad = 0, flagged = 0, proven_flagged = 0, n = 0;
  for (std::uint32_t u = 0; u <= last; u += 16) {
    const __mmask16 valid = lanes_up_to(u, last);
    const __m512 x = sixteen_floats(u, sign);
    __mmask16 a = 0, b = 0;
    const __m512i c = cpu::q8::block_codes_avx512<Signed>(regs, x, a);
    const __m512i d = proven_codes<Signed>(proven, x, b);
    const __mmask16 wrong =
        static_cast<__mmask16>(valid & ~a & (b | _mm512_cmpneq_epi32_mask(c, d)));
    if (wrong && bad < 5) std::printf("  mismatch near x = %a\n", _mm512_cvtss_f32(x));
    bad += static_cast<std::uint64_t>(__builtin_popcount(wrong));
    flagged += static_cast<std::uint64_t>(__builtin_popcount(valid & a));
    proven_flagged += static_cast<std::uint64_t>(__builtin_popcount(valid & b));
    n += static_cast<std::uint64_t>(__builtin_popcount(valid));
  }
  std::printf(
      "%s map, sign %s: %llu floats, %llu unflagged lanes off the proven form; flagged %llu "
      "(proven form %llu)\n",
      Signed ? "signed" : "unsigned", sign ? "-" : "+", static_cast<unsigned long long>(n),
      static_cast<unsigned long long>(bad), static_cast<unsigned long long>(flagged),
      static_cast<unsigned long long>(proven_flagged));
  if (bad) std::printf("FAILED\n");
}

// The property itself, directly: each unflagged lane's code is the store's code (q8::quantize,
// the generic path's) of every float of its sign within 4 ulp, magnitudes clamped to 1.
template <bool Signed>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void check_within_4ulp(
    std::uint32_t sign) {
  const state::q8::CodeMap& map =
      Signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
  const PieceRegs regs = cpu::q8::piece_regs(cpu::q8::block_piece_tables(map));
  const std::uint32_t one = numeric::float_bits(1.0f), last = one + 8;
  // ref[k] = the code of the float with magnitude bits min(max(k − 4, 0), one).
  std::vector<std::uint8_t> ref(std::size_t{last} + 40);
  std::vector<float> xs(1 << 16);
  for (std::size_t k = 0; k < ref.size(); k += xs.size()) {
    const std::size_t n = std::min(xs.size(), ref.size() - k);
    for (std::size_t i = 0; i < n; ++i) {
      const std::int64_t u = std::clamp<std::int64_t>(static_cast<std::int64_t>(k + i) - 4, 0, one);
      xs[i] = numeric::float_from_bits(static_cast<std::uint32_t>(u) | sign);
    }
    cpu::q8::quantize(cpu::q8::best_isa(), map, Signed, xs.data(), static_cast<index_t>(n), 1.0f,
                      ref.data() + k);
  }
  std::uint64_t bad = 0;
  for (std::uint32_t u = 0; u <= last; u += 16) {
    const __mmask16 valid = lanes_up_to(u, last);
    const __m512 x = sixteen_floats(u, sign);
    __mmask16 a = 0;
    const __m128i c =
        _mm512_maskz_cvtepi32_epi8(0xFFFF, cpu::q8::block_codes_avx512<Signed>(regs, x, a));
    __mmask16 off = 0;
    for (std::uint32_t d = 0; d <= 8; ++d)
      off = static_cast<__mmask16>(
          off | _mm_cmpneq_epi8_mask(
                    c, _mm_loadu_si128(reinterpret_cast<const __m128i*>(ref.data() + u + d))));
    const __mmask16 wrong = static_cast<__mmask16>(valid & ~a & off);
    if (wrong && bad < 5) std::printf("  wrong near x = %a\n", _mm512_cvtss_f32(x));
    bad += static_cast<std::uint64_t>(__builtin_popcount(wrong));
  }
  std::printf("%s map, sign %s: %llu unflagged lanes whose code some float within 4 ulp lacks\n",
              Signed ? "signed" : "unsigned", sign ? "-" : "+",
              static_cast<unsigned long long>(bad));
  if (bad) std::printf("FAILED\n");
}

}  // namespace

int main() {
  check<true>(0u);
  check<true>(0x80000000u);
  check<false>(0u);
  check_within_4ulp<true>(0u);
  check_within_4ulp<true>(0x80000000u);
  check_within_4ulp<false>(0u);
}
