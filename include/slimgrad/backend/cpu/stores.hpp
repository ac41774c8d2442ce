// slimgrad/backend/cpu/stores.hpp — the StateStores (state/stores.hpp) on the CPU backend.
//
// Each impl owns the memory of its buffers (std::vector, zero-initialised) and converts ranges
// of elements between the stored format and fp32. The per-element math (bf16 rounding, the 8-bit
// maps and quantiser) lives in core/numeric.hpp and state/q8_math.hpp, shared with CUDA; this
// file only has loops, memory and argument checks. Loops over large ranges are split over OpenMP
// threads in chunks that start on block (and Philox-block) boundaries, so results do not depend
// on the thread count.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../../core/backend.hpp"
#include "../../core/error.hpp"
#include "../../core/numeric.hpp"
#include "../../core/philox.hpp"
#include "../../core/view.hpp"
#include "../../state/q8_math.hpp"
#include "../../state/stores.hpp"
#include "common.hpp"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace slimgrad {

namespace cpu::detail {

// Throws Error; [[noreturn]] so that compilers see the checked paths end here (no false
// -Warray-bounds/-Wnonnull on the code after a failed check).
[[noreturn]] inline void fail(const std::string& message) {
  throw Error("slimgrad: " + message);
}

inline void check_count(index_t count, const char* store) {
  if (count < 0)
    fail(std::string(store) + " store: element count " + std::to_string(count) + " is negative");
}

// A load/store range must lie in [0, count], start on a multiple of `alignment` and end on one or
// at count; the fp32 side must be non-null when the range is not empty. Messages are built only
// on failure: this runs on every call of the hot path.
inline void check_range(index_t count, index_t begin, index_t end, index_t alignment,
                        const void* fp32, const char* store, const char* op) {
  const bool inside = 0 <= begin && begin <= end && end <= count;
  const bool aligned_begin = begin % alignment == 0;
  const bool aligned_end = end % alignment == 0 || end == count;
  const bool pointer = fp32 != nullptr || begin == end;
  if (inside && aligned_begin && aligned_end && pointer) return;
  const std::string where = std::string(store) + " store " + op + ": ";
  if (!inside)
    fail(where + "range [" + std::to_string(begin) + ", " + std::to_string(end) +
         ") is not inside [0, " + std::to_string(count) + ")");
  if (!aligned_begin)
    fail(where + "range start " + std::to_string(begin) + " is not a multiple of the alignment " +
         std::to_string(alignment));
  if (!aligned_end)
    fail(where + "range end " + std::to_string(end) + " is neither a multiple of the alignment " +
         std::to_string(alignment) + " nor the element count " + std::to_string(count));
  fail(where + "the fp32 pointer is null");
}

// Runs body(b, e) over [begin, end) cut into chunks of `chunk` elements (the first chunk starts at
// begin, so a chunk that is a multiple of the alignment keeps every chunk aligned). Threads are
// used only when (end − begin)·cost reaches parallel_work, cost being the relative time per
// element (1 for a widening/narrowing at ~0.7 ns, 4 for stochastic rounding, 16 for 8-bit
// quantisation): about half a millisecond of work. Below that a parallel region costs more than
// it saves, and an engine that runs small tiles from its own parallel loop gets no nested
// regions.
inline constexpr index_t parallel_work = index_t{1} << 20;

template <class Body>
void for_chunks(index_t begin, index_t end, index_t chunk, index_t cost, Body&& body) {
  const index_t n = end - begin;
  if (n <= 0) return;
  const index_t chunks = (n + chunk - 1) / chunk;
  auto run = [&](index_t k) {
    const index_t b = begin + k * chunk;
    const index_t e = b + chunk < end ? b + chunk : end;
    body(b, e);
  };
#if defined(_OPENMP)
  const bool worth_it = chunks > 1 && n * cost >= parallel_work;
#pragma omp parallel for schedule(static) if (worth_it)
  for (index_t k = 0; k < chunks; ++k)
    run(k);
#else
  (void)cost;
  for (index_t k = 0; k < chunks; ++k)
    run(k);
#endif
}

inline constexpr index_t stream_chunk = index_t{1} << 14;  // elements per parallel work item

inline std::size_t to_size(index_t n) {
  return static_cast<std::size_t>(n);
}

}  // namespace cpu::detail

// --- 8-bit kernels ------------------------------------------------------------------------------
//
// The Q8Block store spends its time in three per-block loops: the absmax (a max-reduction), the
// quantiser (divide by the absmax, find the nearest code, apply the sign rule) and the
// dequantiser (map[code]·absmax). Each has a portable form (the host/device functions of
// state/q8_math.hpp, one element at a time: the cell table) and x86 forms compiled with target
// attributes and chosen at run time (best_isa), so that a build for any x86-64 gets them and the
// tests run every form the machine has:
//  * AVX2: absmax; quantiser on the cell table with gathers;
//  * AVX-512: absmax; quantiser on piece formulas (PieceTables: arithmetic and register
//    permutes, no memory access; the cell table for the rare vector near a midpoint);
//    dequantiser by permutes of the map held in registers; with VBMI, a byte-permute
//    dequantiser.
// All forms give the same bits as the portable one: the same IEEE division (no reciprocal), the
// same nearest codes (checked on all 2^32 normalised values, offline), and max is exact in any
// order. Per element of 256-element blocks on one AMD EPYC (Zen 5) core (bench_stores:
// stores_q8_quantize, stores_q8_dequantize): absmax + quantise 2.3-2.8 ns portable, 0.53-0.68
// AVX2, 0.32-0.37 AVX-512; dequantise 0.27 ns portable (also used for AVX2: its gathers were
// slower), 0.13 AVX-512, 0.04 VBMI.
namespace cpu::q8 {

/// Instruction sets of the 8-bit kernels: avx512 is AVX-512F; avx512vbmi adds AVX512BW and
/// AVX512-VBMI (byte permutes) for the dequantiser.
enum class Isa : std::uint8_t { portable, avx2, avx512, avx512vbmi };

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SLIMGRAD_Q8_X86 1
#define SLIMGRAD_Q8_TARGET(isa) __attribute__((target(isa)))
#else
#define SLIMGRAD_Q8_X86 0
#endif

/// True when this processor (and build) runs the kernels of `isa`.
inline bool supported(Isa isa) {
  if (isa == Isa::portable) return true;
#if SLIMGRAD_Q8_X86
  __builtin_cpu_init();
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2");
  if (isa == Isa::avx512) return __builtin_cpu_supports("avx512f");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

/// The fastest supported instruction set, found once.
inline Isa best_isa() {
  static const Isa best = supported(Isa::avx512vbmi) ? Isa::avx512vbmi
                          : supported(Isa::avx512)   ? Isa::avx512
                          : supported(Isa::avx2)     ? Isa::avx2
                                                     : Isa::portable;
  return best;
}

/// Largest |x[i]| for i < n, NaNs skipped, 0 for none (q8::absmax_update folded over x, in
/// eight independent running maxima: the maximum does not depend on the order).
inline float absmax_portable(const float* x, index_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  const index_t whole = n - n % 8;
  for (index_t i = 0; i < whole; i += 8)
    for (int l = 0; l < 8; ++l)
      acc[l] = state::q8::absmax_update(acc[l], x[i + l]);
  for (index_t i = whole; i < n; ++i)
    acc[0] = state::q8::absmax_update(acc[0], x[i]);
  float a = 0.0f;
  for (float m : acc)
    a = state::q8::absmax_update(a, m);
  return a;
}

inline void quantize_portable(const state::q8::CodeMap& map, bool is_signed, const float* x,
                              index_t n, float absmax, std::uint8_t* out) {
  state::q8::quantize_n(map, is_signed, x, n, absmax, out);
}

inline void dequantize_portable(const state::q8::CodeMap& map, const std::uint8_t* codes, index_t n,
                                float absmax, float* out) {
  for (index_t i = 0; i < n; ++i)
    out[i] = state::q8::dequantize(map, codes[i], absmax);
}

/// The AVX-512 quantiser's second way to the nearest code, without memory access: within runs of
/// equally spaced midpoints (the maps are linear within decades) the number of midpoints below
/// |x| is round(z) with z = fma(|x|, slope, offset) clamped to [lo, hi], exact unless z lies
/// within `margin` of a half-integer, i.e. |x| is near a midpoint; such vectors take the cell
/// table. A piece is found from the binade of |x| (0 below 2^-23, 1..23, 24 from 1.0): its
/// first piece plus the piece boundaries inside the binade that |x| exceeds (at most two).
/// Negative values of the signed map use its symmetry, mid[j] = −mid[253 − j]. Built once per
/// map from its midpoints; `usable` is false if a map did not fit (the cell table then serves).
/// Bit-identical to the cell table on all 2^32 floats (checked offline; sampled in the tests).
struct PieceTables {
  static constexpr int binades = 25;
  float bound[2][32];      ///< piece boundaries inside binade b (FLT_MAX when fewer)
  std::int32_t first[32];  ///< the piece of binade b's smallest magnitude
  float slope[16], offset[16], lo[16], hi[16];  ///< per piece (one register each)
  float top_mid = 0.0f;                         ///< mid[254] (signed map)
  float margin = 0.0f;                          ///< |z − round(z)| above this is ambiguous
  bool usable = false;
};

inline PieceTables build_piece_tables(const state::q8::CodeMap& m, bool keep_away = false,
                                      bool low_bounds = false) {
  constexpr int last = state::q8::map_size - 2;  // index of the last midpoint
  PieceTables p{};
  int j0 = 0;  // first positive midpoint
  while (j0 <= last && !(m.mid[j0] > 0.0f))
    ++j0;
  // Pieces: runs of midpoints with equal spacing (to 1e-3 relative), at least two per run but
  // the last (two points are always on a line).
  struct Run {
    int a, b;
  };
  std::vector<Run> runs;
  for (int j = j0; j <= last;) {
    int e = j < last ? j + 1 : j;
    if (e > j) {
      const double d = static_cast<double>(m.mid[j + 1]) - static_cast<double>(m.mid[j]);
      while (e < last && std::fabs(static_cast<double>(m.mid[e + 1]) -
                                   static_cast<double>(m.mid[e]) - d) <= 1e-3 * d)
        ++e;
    }
    runs.push_back({j, e});
    j = e + 1;
  }
  if (runs.size() > 16) return p;
  // Boundaries between runs: a power of two in the gap if there is one (then the binade says
  // which side), else the gap's middle. With keep_away, a power of two within 64 ulp of a
  // midpoint is not taken (signed mid[160] and unsigned mid[66] are 2^-6 exactly): the clamp to
  // the piece's range would hide that midpoint from a value a few ulp off (the fused Adam
  // kernel's quantiser, adam8bit_fused.hpp, sees such values). With low_bounds (which ignores
  // keep_away), each boundary lies next to the run below, whose spacing is the smaller.
  std::vector<float> bounds;
  for (std::size_t k = 0; k + 1 < runs.size(); ++k) {
    const float below = m.mid[runs[k].b], above = m.mid[runs[k + 1].a];
    if (low_bounds) {
      // Half a spacing of the run below past its last midpoint, or a power of two before that:
      // then no piece's formula reaches past its range inside the piece (checked offline for
      // the fused quantiser, which takes no clamp: tests/reference/check_block_codes.cpp).
      const int a = runs[k].a, b = runs[k].b;
      const double spacing = b > a ? (static_cast<double>(m.mid[b]) - m.mid[a]) / (b - a)
                                   : static_cast<double>(above) - below;
      const float reach = static_cast<float>(below + 0.5 * spacing);
      const float power = std::ldexp(1.0f, std::ilogb(below) + 1);
      bounds.push_back(power <= reach && power < above ? power : reach);
      continue;
    }
    const float power = std::ldexp(1.0f, std::ilogb(above));
    const float room = 0x1p-17f * power;  // 64 ulp of power
    const bool away = power - room > below && power + room < above;
    bounds.push_back(power > below && (away || !keep_away) ? power : 0.5f * (below + above));
  }
  for (int b = 0; b < 32; ++b) {
    const float smallest = b == 0 ? 0.0f : std::ldexp(1.0f, b - PieceTables::binades + 1);
    const float next = std::ldexp(1.0f, b - PieceTables::binades + 2);
    int first = 0, inside = 0;
    p.bound[0][b] = p.bound[1][b] = FLT_MAX;
    for (float bound : bounds) {
      first += bound <= smallest ? 1 : 0;
      if (b < PieceTables::binades && bound > smallest && bound < next) {
        if (inside == 2) return p;
        p.bound[inside++][b] = bound;
      }
    }
    p.first[b] = first;
  }
  // Formulas: z(mid[j]) = j + 0.5 at both ends of a run; a single midpoint gets the slope of its
  // nearest neighbour's distance.
  double worst = 0.0;
  for (int k = 0; k < 16; ++k) {
    p.slope[k] = 0.0f;
    p.offset[k] = p.lo[k] = p.hi[k] = 255.0f;
  }
  for (std::size_t k = 0; k < runs.size(); ++k) {
    const int a = runs[k].a, b = runs[k].b;
    double slope = 0.0;
    if (b > a) {
      slope = (b - a) / (static_cast<double>(m.mid[b]) - static_cast<double>(m.mid[a]));
    } else {
      double gap = 1.0;
      if (a > j0) gap = std::min(gap, static_cast<double>(m.mid[a]) - m.mid[a - 1]);
      if (a < last) gap = std::min(gap, static_cast<double>(m.mid[a + 1]) - m.mid[a]);
      slope = 1.0 / gap;
    }
    p.slope[k] = static_cast<float>(slope);
    p.offset[k] = static_cast<float>(a + 0.5 - slope * static_cast<double>(m.mid[a]));
    p.lo[k] = static_cast<float>(a);
    p.hi[k] = static_cast<float>(b + 1);
    for (int j = a; j <= b; ++j)
      worst = std::max(
          worst,
          std::fabs(static_cast<double>(std::fma(m.mid[j], p.slope[k], p.offset[k])) - (j + 0.5)));
  }
  // Margin: four times the largest error at a midpoint, at least 2^-12.
  float delta = 1.0f / 4096.0f;
  while (delta < 4.0 * worst)
    delta *= 2.0f;
  p.margin = 0.5f - delta;
  p.top_mid = m.mid[last];
  p.usable = delta <= 1.0f / 256.0f;
  return p;
}

/// The piece tables of a map (built at first use).
inline const PieceTables& piece_tables(const state::q8::CodeMap& map) {
  static const PieceTables signed_tables = build_piece_tables(state::q8::signed_code_map());
  static const PieceTables unsigned_tables = build_piece_tables(state::q8::unsigned_code_map());
  return &map == &state::q8::signed_code_map() ? signed_tables : unsigned_tables;
}

#if SLIMGRAD_Q8_X86

// max(m, acc) with m first: maxps returns its second operand when either is NaN, so a NaN
// magnitude leaves the accumulator as absmax_update does; lanes are combined the same way.
SLIMGRAD_Q8_TARGET("avx2") inline float absmax_avx2(const float* x, index_t n) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  index_t i = 0;
  for (const index_t whole = n - n % 16; i < whole; i += 16) {
    acc0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), acc0);
    acc1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i + 8), magnitude), acc1);
  }
  for (const index_t whole = n - n % 8; i < whole; i += 8)
    acc0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), acc0);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(acc0, acc1));
  float a = 0.0f;
  for (float m : lanes)
    a = state::q8::absmax_update(a, m);
  for (; i < n; ++i)
    a = state::q8::absmax_update(a, x[i]);
  return a;
}

// The codes of 8 values (as int32): q8::quantize() lane by lane. `x` is value / absmax (or 0).
SLIMGRAD_Q8_TARGET("avx2")
inline __m256i codes_avx2(const std::uint32_t* cells, bool is_signed, __m256 value, __m256 x) {
  using namespace state::q8;
  const __m256i u = _mm256_castps_si256(x);
  const __m256i negative = _mm256_srai_epi32(u, 31);
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i clamped = _mm256_min_epu32(mag, _mm256_set1_epi32(static_cast<int>(one_bits)));
  const __m256i cell =
      _mm256_max_epi32(_mm256_sub_epi32(_mm256_srli_epi32(clamped, cell_low_bits),
                                        _mm256_set1_epi32(static_cast<int>(cell_first))),
                       _mm256_setzero_si256());
  const __m256i index =
      _mm256_add_epi32(cell, _mm256_and_si256(negative, _mm256_set1_epi32(cells_per_sign)));
  const __m256i entry =
      _mm256_i32gather_epi32(reinterpret_cast<const int*>(cells), index, sizeof(std::uint32_t));
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(cell_low_mask));
  const __m256i key =
      _mm256_xor_si256(_mm256_and_si256(clamped, low_mask), _mm256_and_si256(negative, low_mask));
  // Thresholds and keys are below 2^17: signed comparison. base + 1 − (threshold > key).
  const __m256i below = _mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 8), key);
  __m256i c = _mm256_add_epi32(_mm256_and_si256(entry, _mm256_set1_epi32(0xFF)),
                               _mm256_add_epi32(below, _mm256_set1_epi32(1)));
  const __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F800000));
  c = _mm256_andnot_si256(nan, c);
  if (is_signed) {
    // Codes 0..126 are negative, 127..255 positive (+0 at 127).
    const __m256i code_negative = _mm256_cmpgt_epi32(_mm256_set1_epi32(127), c);
    const __m256i value_negative = _mm256_srai_epi32(_mm256_castps_si256(value), 31);
    const __m256i differ = _mm256_xor_si256(code_negative, value_negative);
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(value, _mm256_setzero_ps(), _CMP_GT_OQ));
    const __m256i step = _mm256_add_epi32(_mm256_and_si256(up, _mm256_set1_epi32(2)),
                                          _mm256_set1_epi32(-1));  // +1 or −1
    c = _mm256_and_si256(_mm256_add_epi32(c, _mm256_and_si256(differ, step)),
                         _mm256_set1_epi32(0xFF));
  }
  return c;
}

SLIMGRAD_Q8_TARGET("avx2")
inline void quantize_avx2(const state::q8::CodeMap& map, bool is_signed, const float* value,
                          index_t n, float absmax, std::uint8_t* out) {
  const bool divide = absmax > 0.0f;
  const __m256 a = _mm256_set1_ps(absmax);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  index_t i = 0;
  for (const index_t whole = n - n % 16; i < whole; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(value + i), v1 = _mm256_loadu_ps(value + i + 8);
    const __m256 x0 = divide ? _mm256_div_ps(v0, a) : _mm256_setzero_ps();
    const __m256 x1 = divide ? _mm256_div_ps(v1, a) : _mm256_setzero_ps();
    const __m256i c0 = codes_avx2(map.cell, is_signed, v0, x0);
    const __m256i c1 = codes_avx2(map.cell, is_signed, v1, x1);
    // Dwords of bytes [c0 0..3, c1 0..3 | c0 4..7, c1 4..7] in the two halves, put in order.
    const __m256i words = _mm256_packus_epi32(c0, c1);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), order);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(bytes));
  }
  quantize_portable(map, is_signed, value + i, n - i, absmax, out + i);
}

SLIMGRAD_Q8_TARGET("avx512f") inline float absmax_avx512(const float* x, index_t n) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  index_t i = 0;
  for (const index_t whole = n - n % 32; i < whole; i += 32) {
    acc0 = _mm512_maskz_max_ps(0xFFFF,
                               _mm512_castsi512_ps(_mm512_and_si512(
                                   _mm512_castps_si512(_mm512_loadu_ps(x + i)), magnitude)),
                               acc0);
    acc1 = _mm512_maskz_max_ps(0xFFFF,
                               _mm512_castsi512_ps(_mm512_and_si512(
                                   _mm512_castps_si512(_mm512_loadu_ps(x + i + 16)), magnitude)),
                               acc1);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_maskz_max_ps(0xFFFF, acc0, acc1));
  float a = 0.0f;
  for (float m : lanes)
    a = state::q8::absmax_update(a, m);
  for (; i < n; ++i)
    a = state::q8::absmax_update(a, x[i]);
  return a;
}

// The exact nearest code of 16 normalised values from the cell table (a gather). NaN lanes are
// left for the caller.
SLIMGRAD_Q8_TARGET("avx512f")
inline __m512i nearest_cells_avx512(const std::uint32_t* cells, __m512 x) {
  using namespace state::q8;
  const __mmask16 all = 0xFFFF;  // masked forms: GCC 12 warns about the unmasked ones' undefined
                                 // source operand
  const __m512i u = _mm512_castps_si512(x);
  const __m512i negative = _mm512_maskz_srai_epi32(all, u, 31);
  const __m512i clamped =
      _mm512_maskz_min_epu32(all, _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                             _mm512_set1_epi32(static_cast<int>(one_bits)));
  const __m512i cell =
      _mm512_maskz_max_epi32(all,
                             _mm512_sub_epi32(_mm512_maskz_srli_epi32(all, clamped, cell_low_bits),
                                              _mm512_set1_epi32(static_cast<int>(cell_first))),
                             _mm512_setzero_si512());
  const __m512i index =
      _mm512_add_epi32(cell, _mm512_and_si512(negative, _mm512_set1_epi32(cells_per_sign)));
  const __m512i entry = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), all, index,
                                                    reinterpret_cast<const int*>(cells), 4);
  const __m512i low_mask = _mm512_set1_epi32(static_cast<int>(cell_low_mask));
  const __m512i key =
      _mm512_xor_si512(_mm512_and_si512(clamped, low_mask), _mm512_and_si512(negative, low_mask));
  const __mmask16 reach = _mm512_cmpge_epu32_mask(key, _mm512_maskz_srli_epi32(all, entry, 8));
  const __m512i base = _mm512_and_si512(entry, _mm512_set1_epi32(0xFF));
  return _mm512_mask_add_epi32(base, reach, base, _mm512_set1_epi32(1));
}

// The piece tables in registers (10 of the 32).
struct PieceRegs {
  __m512 bound0[2], bound1[2], slope, offset, lo, hi;
  __m512i first[2];
  __m512 margin, top_mid;
};

SLIMGRAD_Q8_TARGET("avx512f") inline PieceRegs piece_regs(const PieceTables& p) {
  PieceRegs r;
  for (int h = 0; h < 2; ++h) {
    r.bound0[h] = _mm512_loadu_ps(p.bound[0] + 16 * h);
    r.bound1[h] = _mm512_loadu_ps(p.bound[1] + 16 * h);
    r.first[h] = _mm512_loadu_si512(p.first + 16 * h);
  }
  r.slope = _mm512_loadu_ps(p.slope);
  r.offset = _mm512_loadu_ps(p.offset);
  r.lo = _mm512_loadu_ps(p.lo);
  r.hi = _mm512_loadu_ps(p.hi);
  r.margin = _mm512_set1_ps(p.margin);
  r.top_mid = _mm512_set1_ps(p.top_mid);
  return r;
}

// The code of 16 values from their normalised values x = value / absmax (absmax > 0) by the
// piece formulas (PieceTables): no memory access. Lanes within the margin of a midpoint, and NaN
// lanes, are flagged in `ambiguous` (about 1 vector in 130 on Adam moments) and must take the
// exact path.
SLIMGRAD_Q8_TARGET("avx512f")
inline __m512i pieces_avx512(const PieceRegs& p, bool is_signed, __m512 x, __mmask16& ambiguous) {
  const __mmask16 all = 0xFFFF;
  const __m512 ax = _mm512_maskz_min_ps(
      0xFFFF,
      _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF))),
      _mm512_set1_ps(1.0f));
  // Binade: 0 below 2^-23, then one per power of two, 24 for 1.0.
  const __m512i binade = _mm512_maskz_max_epi32(
      all,
      _mm512_sub_epi32(_mm512_maskz_srli_epi32(all, _mm512_castps_si512(ax), 23),
                       _mm512_set1_epi32(127 - PieceTables::binades + 1)),
      _mm512_setzero_si512());
  const __m512i one = _mm512_set1_epi32(1);
  __m512i piece = _mm512_permutex2var_epi32(p.first[0], binade, p.first[1]);
  const __m512 b0 = _mm512_permutex2var_ps(p.bound0[0], binade, p.bound0[1]);
  const __m512 b1 = _mm512_permutex2var_ps(p.bound1[0], binade, p.bound1[1]);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b0, _CMP_GT_OQ), piece, one);
  piece = _mm512_mask_add_epi32(piece, _mm512_cmp_ps_mask(ax, b1, _CMP_GT_OQ), piece, one);
  // Piece tables have 16 entries: one-source permutes, which do not overwrite a table.
  const __m512 s = _mm512_maskz_permutexvar_ps(0xFFFF, piece, p.slope);
  const __m512 t = _mm512_maskz_permutexvar_ps(0xFFFF, piece, p.offset);
  const __m512 lo = _mm512_maskz_permutexvar_ps(0xFFFF, piece, p.lo);
  const __m512 hi = _mm512_maskz_permutexvar_ps(0xFFFF, piece, p.hi);
  const __m512 z =
      _mm512_maskz_min_ps(0xFFFF, _mm512_maskz_max_ps(0xFFFF, _mm512_fmadd_ps(ax, s, t), lo), hi);
  const __m512 r =
      _mm512_maskz_roundscale_ps(0xFFFF, z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 dist = _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(z, r)), _mm512_set1_epi32(0x7FFFFFFF)));
  ambiguous = _mm512_cmp_ps_mask(dist, p.margin, _CMP_GT_OQ);
  // NaN lanes take the exact path too (with the sign rule on the value's sign).
  ambiguous = static_cast<__mmask16>(ambiguous | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q));
  const __m512i c = _mm512_maskz_cvttps_epi32(0xFFFF, r);  // midpoints below |x|
  const __mmask16 negative =
      _mm512_cmplt_epi32_mask(_mm512_castps_si512(x), _mm512_setzero_si512());
  if (!is_signed) return _mm512_mask_mov_epi32(c, negative, _mm512_setzero_si512());
  // Signed map: mid[j] = −mid[253 − j] for j ≤ 253, so below −y (not on a midpoint) there are
  // 254 − count(y) + [mid[254] < y] midpoints. With absmax > 0, x has the value's sign, so the
  // sign rule only moves a negative value's code 127 (+0) to 126.
  const __m512i mirror =
      _mm512_mask_add_epi32(_mm512_set1_epi32(254), _mm512_cmp_ps_mask(ax, p.top_mid, _CMP_GT_OQ),
                            _mm512_set1_epi32(254), one);
  return _mm512_mask_min_epi32(c, negative, _mm512_sub_epi32(mirror, c), _mm512_set1_epi32(126));
}

// q8::quantize() of 16 values v with normalised values x = v / absmax (or 0): the nearest code
// from the cell table, NaN → 0, the sign rule on the value's sign.
template <bool Signed>
SLIMGRAD_Q8_TARGET("avx512f")
inline __m512i exact_codes_avx512(const state::q8::CodeMap& map, __m512 v, __m512 x) {
  __m512i c = nearest_cells_avx512(map.cell, x);
  c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), c);  // NaN → 0
  if constexpr (Signed) {
    // Codes 0..126 are negative, 127..255 not (+0 at 127).
    const __mmask16 code_negative = _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(127));
    const __mmask16 value_negative =
        _mm512_cmplt_epi32_mask(_mm512_castps_si512(v), _mm512_setzero_si512());
    const __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512i step = _mm512_mask_blend_epi32(up, _mm512_set1_epi32(-1), _mm512_set1_epi32(1));
    c = _mm512_and_si512(_mm512_mask_add_epi32(c, code_negative ^ value_negative, c, step),
                         _mm512_set1_epi32(0xFF));
  }
  return c;
}

// quantize() of the whole vectors among n values: the division, then the piece formulas or, for
// a vector with an ambiguous lane (and without Pieces), the exact path: the nearest code from the
// cell table, NaN → 0, the sign rule on the value's sign. Returns the number of values done.
template <bool Signed, bool Pieces>
SLIMGRAD_Q8_TARGET("avx512f")
inline index_t
    quantize_vectors_avx512(const state::q8::CodeMap& map, const PieceRegs& regs,
                            const float* value, index_t n, float absmax, std::uint8_t* out) {
  const bool divide = absmax > 0.0f;  // always with Pieces
  const __m512 a = _mm512_set1_ps(absmax);
  index_t i = 0;
  for (const index_t whole = n - n % 16; i < whole; i += 16) {
    const __m512 v = _mm512_loadu_ps(value + i);
    const __m512 x = divide ? _mm512_div_ps(v, a) : _mm512_setzero_ps();
    __mmask16 ambiguous = 0xFFFF;
    __m512i c = _mm512_setzero_si512();
    if constexpr (Pieces) c = pieces_avx512(regs, Signed, x, ambiguous);
    if (ambiguous) c = exact_codes_avx512<Signed>(map, v, x);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_maskz_cvtepi32_epi8(0xFFFF, c));
  }
  return i;
}

SLIMGRAD_Q8_TARGET("avx512f")
inline void quantize_avx512(const state::q8::CodeMap& map, bool is_signed, const float* value,
                            index_t n, float absmax, std::uint8_t* out) {
  const PieceTables& tables = piece_tables(map);
  const PieceRegs regs = piece_regs(tables);
  const bool pieces = tables.usable && absmax > 0.0f;
  index_t i = 0;
  if (is_signed)
    i = pieces ? quantize_vectors_avx512<true, true>(map, regs, value, n, absmax, out)
               : quantize_vectors_avx512<true, false>(map, regs, value, n, absmax, out);
  else
    i = pieces ? quantize_vectors_avx512<false, true>(map, regs, value, n, absmax, out)
               : quantize_vectors_avx512<false, false>(map, regs, value, n, absmax, out);
  quantize_portable(map, is_signed, value + i, n - i, absmax, out + i);
}

// The 256 map entries live in 16 registers; vpermt2ps picks from a pair (32 entries) by the low
// 5 bits of each code, and bits 5..7 choose among the eight results: 15 register operations per
// 16 codes instead of 16 loads.
SLIMGRAD_Q8_TARGET("avx512f")
inline void dequantize_avx512(const state::q8::CodeMap& map, const std::uint8_t* codes, index_t n,
                              float absmax, float* out) {
  if (n < 16) return dequantize_portable(map, codes, n, absmax, out);
  __m512 table[16];
  for (int j = 0; j < 16; ++j)
    table[j] = _mm512_loadu_ps(map.code + 16 * j);
  const __m512 a = _mm512_set1_ps(absmax);
  index_t i = 0;
  for (const index_t whole = n - n % 16; i < whole; i += 16) {
    const __m512i c = _mm512_maskz_cvtepu8_epi32(
        0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    __m512 r[8];
    for (int j = 0; j < 8; ++j)
      r[j] = _mm512_permutex2var_ps(table[2 * j], c, table[2 * j + 1]);
    const __mmask16 b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
    const __mmask16 b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
    const __mmask16 b7 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(128));
    for (int j = 0; j < 4; ++j)
      r[j] = _mm512_mask_blend_ps(b5, r[2 * j], r[2 * j + 1]);
    for (int j = 0; j < 2; ++j)
      r[j] = _mm512_mask_blend_ps(b6, r[2 * j], r[2 * j + 1]);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mask_blend_ps(b7, r[0], r[1]), a));
  }
  dequantize_portable(map, codes + i, n - i, absmax, out + i);
}

/// The four bytes of every map entry as four 256-byte planes, for vpermi2b.
struct BytePlanes {
  alignas(64) std::uint8_t plane[4][state::q8::map_size];
};

inline BytePlanes byte_planes(const state::q8::CodeMap& map) {
  BytePlanes p{};
  for (int j = 0; j < state::q8::map_size; ++j) {
    const std::uint32_t u = numeric::float_bits(map.code[j]);
    for (int k = 0; k < 4; ++k)
      p.plane[k][j] = static_cast<std::uint8_t>(u >> (8 * k));
  }
  return p;
}

inline const BytePlanes& byte_planes_of(const state::q8::CodeMap& map) {
  static const BytePlanes signed_planes = byte_planes(state::q8::signed_code_map());
  static const BytePlanes unsigned_planes = byte_planes(state::q8::unsigned_code_map());
  return &map == &state::q8::signed_code_map() ? signed_planes : unsigned_planes;
}

// 64 codes at a time: byte k of each entry comes from plane k by two vpermi2b (128 entries
// each) and a blend on the code's top bit; unpacking bytes to dwords works within 128-bit lanes,
// so the codes are first permuted (a 4x4 transpose of 4-byte groups) to leave the 64 floats in
// order. About 30 register operations per 64 codes.
SLIMGRAD_Q8_TARGET("avx512f,avx512bw,avx512vbmi")
inline void dequantize_avx512vbmi(const state::q8::CodeMap& map, const std::uint8_t* codes,
                                  index_t n, float absmax, float* out) {
  const BytePlanes& planes = byte_planes_of(map);
  __m512i table[4][4];
  for (int k = 0; k < 4; ++k)
    for (int q = 0; q < 4; ++q)
      table[k][q] = _mm512_load_si512(planes.plane[k] + 64 * q);
  alignas(64) static constexpr std::uint8_t order[64] = {
      0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
      22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
      56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i permutation = _mm512_load_si512(order);
  const __m512 a = _mm512_set1_ps(absmax);
  index_t i = 0;
  for (const index_t whole = n - n % 64; i < whole; i += 64) {
    const __m512i c =
        _mm512_maskz_permutexvar_epi8(~__mmask64{0}, permutation, _mm512_loadu_si512(codes + i));
    const __mmask64 high = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int k = 0; k < 4; ++k)
      b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(table[k][0], c, table[k][1]),
                                    _mm512_permutex2var_epi8(table[k][2], c, table[k][3]));
    const __m512i low01 = _mm512_unpacklo_epi8(b[0], b[1]),
                  high01 = _mm512_unpackhi_epi8(b[0], b[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(b[2], b[3]),
                  high23 = _mm512_unpackhi_epi8(b[2], b[3]);
    _mm512_storeu_ps(out + i,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23)), a));
    _mm512_storeu_ps(out + i + 16,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23)), a));
    _mm512_storeu_ps(out + i + 32,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23)), a));
    _mm512_storeu_ps(out + i + 48,
                     _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23)), a));
  }
  dequantize_portable(map, codes + i, n - i, absmax, out + i);  // a partial last block
}

#endif  // SLIMGRAD_Q8_X86

/// Largest |x[i]|, i < n (NaNs skipped, 0 for none), with the kernels of `isa` (supported).
inline float absmax(Isa isa, const float* x, index_t n) {
#if SLIMGRAD_Q8_X86
  if (isa == Isa::avx512 || isa == Isa::avx512vbmi) return absmax_avx512(x, n);
  if (isa == Isa::avx2) return absmax_avx2(x, n);
#endif
  (void)isa;
  return absmax_portable(x, n);
}

/// state::q8::quantize() of n values of one block, with the kernels of `isa` (supported).
inline void quantize(Isa isa, const state::q8::CodeMap& map, bool is_signed, const float* x,
                     index_t n, float absmax, std::uint8_t* out) {
#if SLIMGRAD_Q8_X86
  if (isa == Isa::avx512 || isa == Isa::avx512vbmi)
    return quantize_avx512(map, is_signed, x, n, absmax, out);
  if (isa == Isa::avx2) return quantize_avx2(map, is_signed, x, n, absmax, out);
#endif
  (void)isa;
  quantize_portable(map, is_signed, x, n, absmax, out);
}

/// state::q8::dequantize() of n codes of one block, with the kernels of `isa` (supported). AVX2
/// uses the portable loop: its gathers were slower than scalar loads where measured.
inline void dequantize(Isa isa, const state::q8::CodeMap& map, const std::uint8_t* codes, index_t n,
                       float absmax, float* out) {
#if SLIMGRAD_Q8_X86
  if (isa == Isa::avx512vbmi) return dequantize_avx512vbmi(map, codes, n, absmax, out);
  if (isa == Isa::avx512) return dequantize_avx512(map, codes, n, absmax, out);
#endif
  (void)isa;
  dequantize_portable(map, codes, n, absmax, out);
}

}  // namespace cpu::q8

/// Fp32 store on the CPU: 4 bytes per element; the rule works in place through direct().
template <>
struct impl<state::Fp32, backend::cpu> {
  using Options = state::Fp32::Options;

  /// One moment tensor: `count` floats, flattened row-major.
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    std::vector<float> data;
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options&) {}

  /// A zero-initialised buffer of `count` elements.
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Fp32::name);
    return Buffer{count, kind, std::vector<float>(cpu::detail::to_size(count), 0.0f)};
  }
  /// Exact bytes held: 4·count.
  std::size_t bytes(const Buffer& b) const { return b.data.size() * sizeof(float); }
  static std::size_t bytes_for(index_t count, state::Moment, const Options&) {
    cpu::detail::check_count(count, state::Fp32::name);
    return cpu::detail::to_size(count) * sizeof(float);
  }
  /// The fp32 data itself.
  float* direct(Buffer& b) const { return b.data.data(); }
  const float* direct(const Buffer& b) const { return b.data.data(); }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Fp32::name, "load");
    if (end > begin && out != b.data.data() + begin)
      std::memmove(out, b.data.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
  }
  void store(Buffer& b, index_t begin, index_t end, const float* in,
             const random::Key& /*deterministic*/) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Fp32::name, "store");
    if (end > begin && in != b.data.data() + begin)
      std::memmove(b.data.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
  }
};

/// Bf16 store on the CPU: 2 bytes per element; round-to-nearest-even or stochastic rounding
/// (numeric.hpp) on store, exact widening on load.
template <>
struct impl<state::Bf16, backend::cpu> {
  using Options = state::Bf16::Options;

  /// One moment tensor: `count` bf16 bit patterns, flattened row-major.
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    std::vector<std::uint16_t> data;
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {}

  const Options& options() const { return options_; }

  /// A zero-initialised buffer of `count` elements (+0.0 everywhere).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Bf16::name);
    return Buffer{count, kind, std::vector<std::uint16_t>(cpu::detail::to_size(count), 0)};
  }
  /// Exact bytes held: 2·count.
  std::size_t bytes(const Buffer& b) const { return b.data.size() * sizeof(std::uint16_t); }
  static std::size_t bytes_for(index_t count, state::Moment, const Options&) {
    cpu::detail::check_count(count, state::Bf16::name);
    return cpu::detail::to_size(count) * sizeof(std::uint16_t);
  }
  /// bf16 is not fp32: the rule loads and stores.
  float* direct(Buffer&) const { return nullptr; }
  const float* direct(const Buffer&) const { return nullptr; }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Bf16::name, "load");
    const std::uint16_t* src = b.data.data();
    cpu::detail::for_chunks(begin, end, cpu::detail::stream_chunk, 1, [&](index_t lo, index_t hi) {
      for (index_t e = lo; e < hi; ++e)
        out[e - begin] = numeric::bf16_to_float(src[e]);
    });
  }

  /// Rounds in[0 .. end−begin) into elements [begin, end). With stochastic rounding, element e
  /// uses word e % 4 of Philox block e / 4 under `key` (random::block_bits), so the result depends
  /// only on (key, e, value): any tiling or thread count gives the same bits.
  void store(Buffer& b, index_t begin, index_t end, const float* in, const random::Key& key) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Bf16::name, "store");
    std::uint16_t* dst = b.data.data();
    if (!options_.stochastic_rounding) {
      cpu::detail::for_chunks(begin, end, cpu::detail::stream_chunk, 1,
                              [&](index_t lo, index_t hi) {
                                for (index_t e = lo; e < hi; ++e)
                                  dst[e] = numeric::bf16_bits_rne(in[e - begin]);
                              });
      return;
    }
    if (static_cast<std::uint64_t>(end) > random::max_elements)
      cpu::detail::fail("bf16 store: stochastic rounding addresses at most 2^34 elements per key");
    // Chunks start on multiples of 4 after the first, so each Philox block is drawn once.
    const index_t first = begin - begin % 4;
    cpu::detail::for_chunks(first, end, cpu::detail::stream_chunk, 4, [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += 4) {
        const random::Block4 bits = random::block_bits(key, static_cast<std::uint64_t>(blk / 4));
        const index_t e0 = blk < begin ? begin : blk;
        const index_t e1 = blk + 4 < hi ? blk + 4 : hi;
        for (index_t e = e0; e < e1; ++e)
          dst[e] = numeric::bf16_bits_stochastic(in[e - begin], bits.v[e - blk]);
      }
    });
  }

 private:
  Options options_{};
};

/// Q8Block<B> store on the CPU: blockwise dynamic 8-bit (state/q8_math.hpp), 1 byte per element
/// plus 4 bytes per block of B; tensors below `min_8bit_size` elements stay fp32 (4 bytes per
/// element, direct()). First moments use the signed map, second moments the unsigned map. The
/// per-block loops are the kernels of cpu::q8 for the processor's best instruction set.
template <int B>
struct impl<state::Q8Block<B>, backend::cpu> {
  using Store = state::Q8Block<B>;
  using Options = typename Store::Options;

  /// One moment tensor. Either `quantized` (codes: count bytes; absmax: ceil(count/B) floats) or
  /// the fp32 fallback (fp32: count floats).
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    bool quantized = false;
    std::vector<std::uint8_t> codes;
    std::vector<float> absmax;
    std::vector<float> fp32;
  };

  static constexpr index_t alignment = B;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {
    require(options.min_8bit_size >= 0, "q8block store: min_8bit_size must not be negative");
  }

  const Options& options() const { return options_; }

  /// True when a tensor of `count` elements is held in 8 bits under `options`.
  static bool quantizes(index_t count, const Options& options) {
    return count >= options.min_8bit_size && count > 0;
  }

  /// A buffer of `count` zeros: codes point at the map's 0.0 entry (index 127 signed, 0
  /// unsigned) with absmax 0, so load() gives +0.0 (bitsandbytes zero-fills the codes, which
  /// reads back as −0.0 for the signed map: the same value).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, Store::name);
    Buffer b;
    b.count = count;
    b.kind = kind;
    b.quantized = quantizes(count, options_);
    if (b.quantized) {
      b.codes.assign(cpu::detail::to_size(count), zero_code(kind));
      b.absmax.assign(cpu::detail::to_size(blocks(count)), 0.0f);
    } else {
      b.fp32.assign(cpu::detail::to_size(count), 0.0f);
    }
    return b;
  }
  /// Exact bytes held: count + 4·ceil(count/B) when quantized, else 4·count.
  std::size_t bytes(const Buffer& b) const {
    return b.codes.size() + (b.absmax.size() + b.fp32.size()) * sizeof(float);
  }
  static std::size_t bytes_for(index_t count, state::Moment, const Options& options) {
    cpu::detail::check_count(count, Store::name);
    if (!quantizes(count, options)) return cpu::detail::to_size(count) * sizeof(float);
    return cpu::detail::to_size(count) + cpu::detail::to_size(blocks(count)) * sizeof(float);
  }
  /// The fp32 data for a small tensor, nullptr for a quantized one.
  float* direct(Buffer& b) const { return b.quantized ? nullptr : b.fp32.data(); }
  const float* direct(const Buffer& b) const { return b.quantized ? nullptr : b.fp32.data(); }

  /// Dequantises elements [begin, end): map[code]·absmax of the element's block.
  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, Store::name, "load");
    if (!b.quantized) {
      if (end > begin)
        std::memmove(out, b.fp32.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
      return;
    }
    const state::q8::CodeMap& map = state::q8::code_map(b.kind);
    const cpu::q8::Isa isa = cpu::q8::best_isa();
    auto body = [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += B) {
        const index_t stop = blk + B < hi ? blk + B : hi;
        cpu::q8::dequantize(isa, map, b.codes.data() + blk, stop - blk,
                            b.absmax[cpu::detail::to_size(blk / B)], out + (blk - begin));
      }
    };
    // The tiles of an Adam step are a few blocks: call the body directly rather than through an
    // OpenMP region that would not be taken (a runtime call per tile).
    if ((end - begin) * cost_load < cpu::detail::parallel_work)
      body(begin, end);
    else
      cpu::detail::for_chunks(begin, end, chunk, cost_load, body);
  }

  /// Quantises elements [begin, end): each block's absmax is the largest |value| among the values
  /// being stored (NaNs skipped), then every value gets its nearest code (q8_math.hpp).
  void store(Buffer& b, index_t begin, index_t end, const float* in,
             const random::Key& /*deterministic*/) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, Store::name, "store");
    if (!b.quantized) {
      if (end > begin && in != b.fp32.data() + begin)
        std::memmove(b.fp32.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
      return;
    }
    const bool is_signed = b.kind == state::Moment::first;
    const state::q8::CodeMap& map = state::q8::code_map(b.kind);
    const cpu::q8::Isa isa = cpu::q8::best_isa();
    auto body = [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += B) {
        const index_t stop = blk + B < hi ? blk + B : hi;
        const float* x = in + (blk - begin);
        const float a = cpu::q8::absmax(isa, x, stop - blk);
        b.absmax[cpu::detail::to_size(blk / B)] = a;
        cpu::q8::quantize(isa, map, is_signed, x, stop - blk, a, b.codes.data() + blk);
      }
    };
    if ((end - begin) * cost_store < cpu::detail::parallel_work)
      body(begin, end);
    else
      cpu::detail::for_chunks(begin, end, chunk, cost_store, body);
  }

 private:
  static constexpr index_t chunk =
      ((cpu::detail::stream_chunk + B - 1) / B) * B;  // whole blocks per work item
  static constexpr index_t cost_load = 1;             // relative cost per element (see for_chunks)
  static constexpr index_t cost_store = 4;            // absmax, division, nearest code

  static index_t blocks(index_t count) { return (count + B - 1) / B; }
  static std::uint8_t zero_code(state::Moment kind) {
    return kind == state::Moment::first ? std::uint8_t{127} : std::uint8_t{0};
  }

  Options options_{};
};

/// Factored store on the CPU (Adafactor, algorithms.md §6.3; HF transformers' Adafactor). A
/// second moment of a matrix with both dimensions > 1 is held as a row vector r (m floats) and a
/// column vector c (n floats): 4(m + n) bytes. First moments, vectors and matrices with a
/// dimension of 1 (for which the factored estimate equals the elementwise one) are held
/// elementwise in fp32 (4 bytes per element) with direct/load/store like Fp32.
template <>
struct impl<state::Factored, backend::cpu> {
  using Options = state::Factored::Options;

  struct Buffer {
    Shape shape{};
    state::Moment kind = state::Moment::second;
    bool factored = false;
    std::vector<float> row;   ///< r, length m (factored)
    std::vector<float> col;   ///< c, length n (factored)
    std::vector<float> full;  ///< elementwise fp32 values (not factored)
    index_t count = 0;        ///< shape.rows · shape.cols
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {
    require(std::isfinite(options.eps1) && options.eps1 >= 0.0f,
            "factored store: eps1 must be finite and not negative");
  }

  const Options& options() const { return options_; }

  /// True when a `kind` moment of this shape is held as row and column vectors.
  static bool factors(Shape shape, state::Moment kind) {
    return kind == state::Moment::second && shape.rows > 1 && shape.cols > 1;
  }

  /// A zero-initialised buffer for a rows × cols tensor.
  Buffer make(Shape shape, state::Moment kind) const {
    check_shape(shape);
    Buffer b;
    b.shape = shape;
    b.kind = kind;
    b.count = shape.rows * shape.cols;
    b.factored = factors(shape, kind);
    if (b.factored) {
      b.row.assign(cpu::detail::to_size(shape.rows), 0.0f);
      b.col.assign(cpu::detail::to_size(shape.cols), 0.0f);
    } else {
      b.full.assign(cpu::detail::to_size(b.count), 0.0f);
    }
    return b;
  }
  /// A zero-initialised buffer for a vector of `count` elements (1 × count: never factored).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Factored::name);
    return make(Shape{1, count}, kind);
  }

  /// Exact bytes held: 4(m + n) when factored, else 4mn.
  std::size_t bytes(const Buffer& b) const {
    return (b.row.size() + b.col.size() + b.full.size()) * sizeof(float);
  }
  static std::size_t bytes_for(Shape shape, state::Moment kind, const Options&) {
    check_shape(shape);
    if (factors(shape, kind)) return cpu::detail::to_size(shape.rows + shape.cols) * sizeof(float);
    return cpu::detail::to_size(shape.rows * shape.cols) * sizeof(float);
  }
  static std::size_t bytes_for(index_t count, state::Moment kind, const Options& options) {
    cpu::detail::check_count(count, state::Factored::name);
    return bytes_for(Shape{1, count}, kind, options);
  }

  /// The fp32 elementwise data, or nullptr for a factored buffer.
  float* direct(Buffer& b) const { return b.factored ? nullptr : b.full.data(); }
  const float* direct(const Buffer& b) const { return b.factored ? nullptr : b.full.data(); }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    if (b.factored)
      cpu::detail::fail(
          "factored store load: a factored second moment has no elements to load; "
          "use inverse_sqrt_factors");
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Factored::name, "load");
    if (end > begin)
      std::memmove(out, b.full.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
  }
  void store(Buffer& b, index_t begin, index_t end, const float* in, const random::Key&) const {
    if (b.factored)
      cpu::detail::fail(
          "factored store store: a factored second moment is updated only by "
          "accumulate");
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Factored::name, "store");
    if (end > begin && in != b.full.data() + begin)
      std::memmove(b.full.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
  }

  /// One Adafactor second-moment step with Q = g⊙g + eps1 (each in float, as torch's
  /// `grad**2 + eps1`): factored, r ← β̂·r + (1−β̂)·rowmean(Q) and c ← β̂·c + (1−β̂)·colmean(Q);
  /// elementwise, v ← β̂·v + (1−β̂)·Q. `beta2_hat` is 1 − t^−0.8 in Adafactor (0 at t = 1) and
  /// must be in [0, 1].
  ///
  /// Rounding follows HF's `x.mul_(beta2t).add_(mean, alpha=1.0 - beta2t)` on torch's CPU (AVX2)
  /// kernels: β and α = 1 − β̂ are each rounded once to float, x·β is rounded, then
  /// fma(mean, α, x·β). Pass β̂ in double (as HF's Python float) to get α exactly as torch does;
  /// the float overload uses α = 1 − float(β̂), which for β̂ near 1 (late steps) differs from
  /// float(1 − β̂) by up to 2^-25/(1 − β̂) relative. The means sum in double and round once, so
  /// they are within an ulp of torch's float32 mean (a pairwise float sum).
  void accumulate(Buffer& b, HostView<const float> g, double beta2_hat) {
    if (b.kind != state::Moment::second)
      cpu::detail::fail("factored store accumulate: the buffer holds a first moment");
    if (g.rows != b.shape.rows || g.cols != b.shape.cols || g.ld < g.cols ||
        (g.data == nullptr && !g.empty()))
      cpu::require_shape(g, b.shape, "factored store accumulate gradient");  // throws, says why
    if (!(beta2_hat >= 0.0 && beta2_hat <= 1.0))
      cpu::detail::fail("factored store accumulate: beta2_hat must be in [0, 1]");
    const float beta = static_cast<float>(beta2_hat);
    const float alpha = static_cast<float>(1.0 - beta2_hat);
    const float eps1 = options_.eps1;
    const index_t m = b.shape.rows, n = b.shape.cols;
    if (!b.factored) {
      float* v = b.full.data();
      cpu::parallel_for(m, n, [&](index_t i) {
        const float* gi = g.row(i);
        float* vi = v + i * n;
        for (index_t j = 0; j < n; ++j)
          vi[j] = blend(vi[j], beta, alpha, square_plus(gi[j], eps1));
      });
      return;
    }
    // Row means: one row per work item.
    float* r = b.row.data();
    cpu::parallel_for(m, n, [&](index_t i) {
      const float* gi = g.row(i);
      // Four double partial sums: a dependency chain four times shorter; the double sum differs
      // from a one-accumulator sum far below a float ulp (double carries 29 more bits).
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      index_t j = 0;
      for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; ++k)
          acc[k] += static_cast<double>(square_plus(gi[j + k], eps1));
      for (; j < n; ++j)
        acc[0] += static_cast<double>(square_plus(gi[j], eps1));
      const double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      const float mean = static_cast<float>(sum / static_cast<double>(n));
      r[i] = blend(r[i], beta, alpha, mean);
    });
    // Column means: column strips of `strip` columns per work item, rows in order.
    col_sums_.assign(cpu::detail::to_size(n), 0.0);
    double* sums = col_sums_.data();
    constexpr index_t strip = 256;
    const index_t strips = (n + strip - 1) / strip;
    cpu::parallel_for(strips, m * strip, [&](index_t s) {
      const index_t j0 = s * strip, j1 = j0 + strip < n ? j0 + strip : n;
      for (index_t i = 0; i < m; ++i) {
        const float* gi = g.row(i);
        for (index_t j = j0; j < j1; ++j)
          sums[j] += static_cast<double>(square_plus(gi[j], eps1));
      }
    });
    float* c = b.col.data();
    for (index_t j = 0; j < n; ++j) {
      const float mean = static_cast<float>(sums[j] / static_cast<double>(m));
      c[j] = blend(c[j], beta, alpha, mean);
    }
  }
  /// The same with β̂ in float (α = 1 − β̂ computed in float; see above).
  void accumulate(Buffer& b, HostView<const float> g, float beta2_hat) {
    accumulate(b, g, static_cast<double>(beta2_hat));
  }

  /// HF Adafactor's _approx_sq_grad factors of a factored buffer: row_factor_i =
  /// rsqrt(r_i / mean(r)) (m values) and col_factor_j = rsqrt(c_j) (n values), each rsqrt
  /// computed as 1/sqrt in float like torch's, so that 1/sqrt(v̂_ij) = row_factor_i·col_factor_j.
  void inverse_sqrt_factors(const Buffer& b, float* row_factor, float* col_factor) const {
    if (!b.factored)
      cpu::detail::fail("factored store inverse_sqrt_factors: the buffer is not factored");
    if (row_factor == nullptr || col_factor == nullptr)
      cpu::detail::fail("factored store inverse_sqrt_factors: null output");
    const index_t m = b.shape.rows, n = b.shape.cols;
    double sum = 0.0;
    for (index_t i = 0; i < m; ++i)
      sum += static_cast<double>(b.row[cpu::detail::to_size(i)]);
    const float mean = static_cast<float>(sum / static_cast<double>(m));
    for (index_t i = 0; i < m; ++i)
      row_factor[i] = 1.0f / std::sqrt(b.row[cpu::detail::to_size(i)] / mean);
    for (index_t j = 0; j < n; ++j)
      col_factor[j] = 1.0f / std::sqrt(b.col[cpu::detail::to_size(j)]);
  }

 private:
  static void check_shape(Shape shape) {
    require(shape.rows >= 0 && shape.cols >= 0,
            "factored store: shape " + std::to_string(shape.rows) + "x" +
                std::to_string(shape.cols) + " has a negative dimension");
  }
  // x·β rounded, then fma(q, α, x·β): torch's mul_(β) then add_(q, alpha=α) (vec::fmadd).
  static float blend(float x, float beta, float alpha, float q) {
    return std::fma(q, alpha, x * beta);
  }
  // g² rounded to float, then + eps1 rounded to float: torch's `grad**2 + eps1`, two ops. The
  // empty asm makes the product exist as a float, so -ffp-contract cannot fuse it into an FMA.
  static float square_plus(float g, float eps1) {
    float sq = g * g;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(sq));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(sq));
#else
    volatile float fence = sq;
    sq = fence;
#endif
    return sq + eps1;
  }

  Options options_{};
  std::vector<double> col_sums_;  // grown once, reused
};

}  // namespace slimgrad
