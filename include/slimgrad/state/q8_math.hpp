// slimgrad/state/q8_math.hpp — the 8-bit "dynamic" code maps and the blockwise quantiser of
// bitsandbytes (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022;
// algorithms.md §6.5), written once for the CPU and CUDA backends.
//
// A block of B consecutive elements is stored as one fp32 absmax (the largest |x| of the block)
// and one uint8 code per element; element x is stored as the index of the code-map entry nearest
// to x / absmax and read back as map[code] · absmax. State cost: 1 + 4/B bytes per element.
//
// Faithfulness to bitsandbytes (kOptimizerStatic8bit2StateBlockwise, csrc/kernels.cu @ 95f9af30):
//  * the maps are the exact float32 values of functional.create_dynamic_map(signed,
//    max_exponent_bits=7, total_bits=8) as computed by torch (1.13, CPU); the tables below are
//    printed by tests/reference/gen_stores.py, which runs that function's code;
//  * nearest_code() is the kernel's quantize_2D: a 7-step binary search from index 127, then a
//    comparison with the float midpoint (a + b)·0.5f of the two neighbours; a value exactly on a
//    midpoint goes to the last pivot of the search (always the even index of the pair);
//  * for the signed map, a code whose sign differs from the value's moves one code toward the
//    value's sign (tiny negative values thus never collapse to +0; −0.0 becomes the smallest
//    negative code, as in the kernel);
//  * deviations: we normalise with an IEEE division x / absmax where the kernel uses the
//    approximate __fdividef (≤ 2 ulp), so a value within 2 ulp of a midpoint may land on the other
//    neighbour; and an all-zero block (absmax 0) normalises to 0 instead of 0/0 = NaN, as newer
//    bitsandbytes kernels do (the dequantised values are 0 either way).
//
// Speed: the kernel's search costs eight dependent loads per value (about 14 ns on a CPU core).
// nearest_code() finds the same index with one load from a cell table (CodeMap::cell) and one
// integer comparison; it equals the search on all 2^32 floats (checked offline, sampled in
// tests/optim/test_stores.cpp). The CPU backend has vectorised forms (backend/cpu/stores.hpp).
#pragma once

#include <cstdint>

#include "../core/config.hpp"
#include "../core/numeric.hpp"
#include "stores.hpp"

namespace slimgrad::state::q8 {

/// Number of entries in a code map.
inline constexpr int map_size = 256;

// The cell table. A normalised value is put in a cell by its sign and float bits 30..16 (the 8
// exponent bits and the top 7 mantissa bits); magnitudes below 2^-23 share cell 0 and magnitudes
// from 1 up (∞ included) share the last cell. The dynamic maps are linear within decades, and
// with 7 mantissa bits no cell holds more than one midpoint (with 6, two midpoints of the
// unsigned map's top decade share a cell), so the nearest code is the number of midpoints below
// the cell plus one comparison of the value's low 16 bits with those of the midpoint inside.

/// Mantissa bits that select a cell within a binade.
inline constexpr int cell_mantissa_bits = 7;
/// Low bits of a value that are compared with a cell's threshold.
inline constexpr int cell_low_bits = 23 - cell_mantissa_bits;
/// Mask of those low bits.
inline constexpr std::uint32_t cell_low_mask = (1u << cell_low_bits) - 1u;
/// Magnitudes below 2^cell_min_exponent share cell 0 (the smallest positive midpoint of either
/// map is above 2^-23).
inline constexpr int cell_min_exponent = -23;
/// Bits 30..16 of 2^cell_min_exponent, the key of cell 0's upper part.
inline constexpr std::uint32_t cell_first = static_cast<std::uint32_t>(127 + cell_min_exponent)
                                            << cell_mantissa_bits;
/// The bit pattern of 1.0f: larger magnitudes are clamped to it.
inline constexpr std::uint32_t one_bits = 0x3F800000u;
/// Cells per sign: 23 binades of 128 cells and the cell of magnitudes ≥ 1.
inline constexpr int cells_per_sign = (-cell_min_exponent << cell_mantissa_bits) + 1;
/// A threshold that no 16-bit key reaches: the cell holds no midpoint.
inline constexpr std::uint32_t cell_never = 1u << cell_low_bits;

/// A code map; the float midpoints between neighbours, mid[j] = (code[j] + code[j+1])·0.5f,
/// exactly as quantize_2D computes them; and the cell table of nearest_code(): the cell of sign s
/// and index c has entry cell[s·cells_per_sign + c] = base | threshold << 8, base being the number
/// of midpoints below the cell (2 KiB of maps and midpoints, 23 KiB of cells).
struct CodeMap {
  float code[map_size];
  float mid[map_size - 1];
  std::uint32_t cell[2 * cells_per_sign];
};

namespace detail {

// The smallest or largest magnitude of cell c (cell 0 from 0; the last cell's nominal range).
// __builtin_bit_cast (GCC, clang and nvcc): constexpr on host and device alike, where
// std::bit_cast is host-only for nvcc. These builders run at compile time only.
SLIMGRAD_HOST_DEVICE constexpr float cell_bound(int c, bool largest) {
  const std::uint32_t top = static_cast<std::uint32_t>(c) + cell_first;
  if (largest) return __builtin_bit_cast(float, ((top + 1u) << cell_low_bits) - 1u);
  return c == 0 ? 0.0f : __builtin_bit_cast(float, top << cell_low_bits);
}

// The lowest and highest value of the cell of sign `negative` and index c.
SLIMGRAD_HOST_DEVICE constexpr float cell_lowest(bool negative, int c) {
  return negative ? -cell_bound(c, true) : cell_bound(c, false);
}
SLIMGRAD_HOST_DEVICE constexpr float cell_highest(bool negative, int c) {
  return negative ? -cell_bound(c, false) : cell_bound(c, true);
}

// A cell whose values lie in [lowest, highest] holds midpoint `base` (the number of midpoints
// below it) or none (cell_conflicts()). A value x counts it when x > mid[base], or x ≥ mid[base]
// for odd base: the kernel's search takes a value exactly on the midpoint of the pair
// (base, base+1) to the even index. Within one cell these are comparisons of the low 16 bits,
// reversed for negative values (larger magnitude, smaller value), which XOR-ing the key with the
// mask turns back into "key ≥ threshold". Cells are visited in ascending value order (negative
// cells from the largest magnitude down) so that one pass over the midpoints finds every base.
SLIMGRAD_HOST_DEVICE constexpr void fill_cells(CodeMap& m) {
  int base = 0;
  for (int k = 0; k < 2 * cells_per_sign; ++k) {
    const bool negative = k < cells_per_sign;
    const int c = negative ? cells_per_sign - 1 - k : k - cells_per_sign;
    while (base < map_size - 1 && m.mid[base] < cell_lowest(negative, c))
      ++base;
    std::uint32_t threshold = cell_never;
    if (base < map_size - 1 && m.mid[base] <= cell_highest(negative, c)) {
      const std::uint32_t low = __builtin_bit_cast(std::uint32_t, m.mid[base]) & cell_low_mask;
      const std::uint32_t key = negative ? cell_low_mask - low : low;
      threshold = (base & 1) ? key : key + 1u;
    }
    m.cell[(negative ? cells_per_sign : 0) + c] = static_cast<std::uint32_t>(base) | threshold << 8;
  }
}

SLIMGRAD_HOST_DEVICE constexpr CodeMap make_map(const float (&code)[map_size]) {
  CodeMap m{};
  for (int j = 0; j < map_size; ++j)
    m.code[j] = code[j];
  for (int j = 0; j + 1 < map_size; ++j)
    m.mid[j] = (code[j] + code[j + 1]) * 0.5f;
  fill_cells(m);
  return m;
}

// The midpoints that one comparison per cell would miss: a midpoint in the same cell as the
// one before it (midpoints ascend, so cell-mates are neighbours), or in cell 0 or the last cell
// (where a value's low bits are not the cell's). Must be 0; found from the midpoints' own bits,
// independently of fill_cells().
SLIMGRAD_HOST_DEVICE constexpr int cell_conflicts(const CodeMap& m) {
  int bad = 0;
  for (int j = 0; j < map_size - 1; ++j) {
    const std::uint32_t bits = __builtin_bit_cast(std::uint32_t, m.mid[j]);
    const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
    const bool edge = (magnitude >> cell_low_bits) <= cell_first || magnitude >= one_bits;
    const bool shared = j > 0 && (__builtin_bit_cast(std::uint32_t, m.mid[j - 1]) >>
                                  cell_low_bits) == (bits >> cell_low_bits);
    bad += (edge || shared) ? 1 : 0;
  }
  return bad;
}

// The signed map's values: functional.create_dynamic_map(signed=True) as printed by
// tests/reference/gen_stores.py.
SLIMGRAD_HOST_DEVICE constexpr CodeMap signed_values() {
  constexpr float table[map_size] = {
      -0x1.fc6666p-1f,  -0x1.f53332p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,  -0x1.df9998p-1f,
      -0x1.d86666p-1f,  -0x1.d13334p-1f,  -0x1.cap-1f,      -0x1.c2ccccp-1f,  -0x1.bb9998p-1f,
      -0x1.b46666p-1f,  -0x1.ad3332p-1f,  -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.979998p-1f,
      -0x1.906666p-1f,  -0x1.893334p-1f,  -0x1.82p-1f,      -0x1.7acccep-1f,  -0x1.73999ap-1f,
      -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56cccep-1f,  -0x1.4f999ap-1f,
      -0x1.486666p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,      -0x1.32ccccp-1f,  -0x1.2b999ap-1f,
      -0x1.246668p-1f,  -0x1.1d3334p-1f,  -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.07999ap-1f,
      -0x1.006666p-1f,  -0x1.f26668p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,
      -0x1.b8ccccp-2f,  -0x1.aa6664p-2f,  -0x1.9cp-2f,      -0x1.8d9998p-2f,  -0x1.7f3334p-2f,
      -0x1.70ccccp-2f,  -0x1.626664p-2f,  -0x1.54p-2f,      -0x1.459998p-2f,  -0x1.373334p-2f,
      -0x1.28ccccp-2f,  -0x1.1a6668p-2f,  -0x1.0cp-2f,      -0x1.fb3334p-3f,  -0x1.de6668p-3f,
      -0x1.c1999ap-3f,  -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3332p-3f,  -0x1.4e6666p-3f,
      -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,  -0x1.93d70ap-4f,
      -0x1.8851eap-4f,  -0x1.7ccccep-4f,  -0x1.7147aep-4f,  -0x1.65c29p-4f,   -0x1.5a3d7p-4f,
      -0x1.4eb85p-4f,   -0x1.433334p-4f,  -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,
      -0x1.151ebap-4f,  -0x1.09999ap-4f,  -0x1.fc28f4p-5f,  -0x1.e51ebap-5f,  -0x1.ce147ap-5f,
      -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,  -0x1.5ae146p-5f,
      -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c28ep-5f,  -0x1.fd70a4p-6f,  -0x1.cf5c26p-6f,
      -0x1.a147aep-6f,  -0x1.733334p-6f,  -0x1.451eb8p-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,
      -0x1.75c29p-7f,   -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,
      -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,  -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,  -0x1.56041ap-8f,
      -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,  -0x1.851eb8p-9f,  -0x1.3b645ap-9f,
      -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f,
      -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
      -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f,
      -0x1.b43528p-19f, -0x1.27476ep-21f, 0x0p+0f,          0x1.27476ep-21f,  0x1.b43528p-19f,
      0x1.040bfep-17f,  0x1.64840cp-16f,  0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,
      0x1.47ae16p-13f,  0x1.19ce0ap-12f,  0x1.8fc506p-12f,  0x1.02de02p-11f,  0x1.3dd982p-11f,
      0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,  0x1.e353f8p-10f,
      0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,   0x1.0c49bap-8f,   0x1.3126e8p-8f,
      0x1.56041ap-8f,   0x1.7ae148p-8f,   0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,
      0x1.072b02p-7f,   0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,
      0x1.d1eb86p-7f,   0x1.170a3ep-6f,   0x1.451eb8p-6f,   0x1.733334p-6f,   0x1.a147aep-6f,
      0x1.cf5c26p-6f,   0x1.fd70a4p-6f,   0x1.15c28ep-5f,   0x1.2ccccep-5f,   0x1.43d70ap-5f,
      0x1.5ae146p-5f,   0x1.71eb86p-5f,   0x1.88f5c2p-5f,   0x1.ap-5f,        0x1.b70a3ep-5f,
      0x1.ce147ap-5f,   0x1.e51ebap-5f,   0x1.fc28f4p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
      0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,   0x1.4eb85p-4f,
      0x1.5a3d7p-4f,    0x1.65c29p-4f,    0x1.7147aep-4f,   0x1.7ccccep-4f,   0x1.8851eap-4f,
      0x1.93d70ap-4f,   0x1.b66668p-4f,   0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,
      0x1.4e6666p-3f,   0x1.6b3332p-3f,   0x1.88p-3f,       0x1.a4ccccp-3f,   0x1.c1999ap-3f,
      0x1.de6668p-3f,   0x1.fb3334p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,   0x1.28ccccp-2f,
      0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,       0x1.626664p-2f,   0x1.70ccccp-2f,
      0x1.7f3334p-2f,   0x1.8d9998p-2f,   0x1.9cp-2f,       0x1.aa6664p-2f,   0x1.b8ccccp-2f,
      0x1.c73334p-2f,   0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26668p-2f,   0x1.006666p-1f,
      0x1.07999ap-1f,   0x1.0eccccp-1f,   0x1.16p-1f,       0x1.1d3334p-1f,   0x1.246668p-1f,
      0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,       0x1.413334p-1f,   0x1.486666p-1f,
      0x1.4f999ap-1f,   0x1.56cccep-1f,   0x1.5ep-1f,       0x1.653334p-1f,   0x1.6c6668p-1f,
      0x1.73999ap-1f,   0x1.7acccep-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
      0x1.979998p-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3332p-1f,   0x1.b46666p-1f,
      0x1.bb9998p-1f,   0x1.c2ccccp-1f,   0x1.cap-1f,       0x1.d13334p-1f,   0x1.d86666p-1f,
      0x1.df9998p-1f,   0x1.e6ccccp-1f,   0x1.eep-1f,       0x1.f53332p-1f,   0x1.fc6666p-1f,
      0x1p+0f,
  };
  return make_map(table);
}

// The unsigned map's values (create_dynamic_map(signed=False)).
SLIMGRAD_HOST_DEVICE constexpr CodeMap unsigned_values() {
  constexpr float table[map_size] = {
      0x0p+0f,         0x1.5cf754p-22f, 0x1.a0133p-21f,  0x1.1d367p-19f,  0x1.2599ecp-18f,
      0x1.bc98a2p-18f, 0x1.29cbaap-17f, 0x1.0624dcp-16f, 0x1.c2e34p-16f,  0x1.3fd0dp-15f,
      0x1.9e3p-15f,    0x1.fc8f34p-15f, 0x1.2d7732p-14f, 0x1.5ca6c8p-14f, 0x1.8bd662p-14f,
      0x1.0cb296p-13f, 0x1.82a994p-13f, 0x1.f8a09p-13f,  0x1.374bc8p-12f, 0x1.724744p-12f,
      0x1.ad42c4p-12f, 0x1.e83e44p-12f, 0x1.119ce2p-11f, 0x1.2f1aap-11f,  0x1.4c986p-11f,
      0x1.6a162p-11f,  0x1.8793dep-11f, 0x1.a511ap-11f,  0x1.c28f5ep-11f, 0x1.e00d1cp-11f,
      0x1.fd8adcp-11f, 0x1.2b020cp-10f, 0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041892p-9f,
      0x1.28f5c2p-9f,  0x1.4dd2fp-9f,   0x1.72b01ep-9f,  0x1.978d4ep-9f,  0x1.bc6a7cp-9f,
      0x1.e147aep-9f,  0x1.03126ep-8f,  0x1.158104p-8f,  0x1.27ef9ep-8f,  0x1.3a5e34p-8f,
      0x1.4cccccp-8f,  0x1.5f3b64p-8f,  0x1.71a9fap-8f,  0x1.841894p-8f,  0x1.968728p-8f,
      0x1.a8f5c2p-8f,  0x1.bb645cp-8f,  0x1.cdd2fp-8f,   0x1.e0418ap-8f,  0x1.f2b01ep-8f,
      0x1.028f5cp-7f,  0x1.0bc6a6p-7f,  0x1.14fdf2p-7f,  0x1.1e354p-7f,   0x1.276c8ap-7f,
      0x1.30a3d6p-7f,  0x1.39db2p-7f,   0x1.43126ep-7f,  0x1.5eb854p-7f,  0x1.8ccccep-7f,
      0x1.bae146p-7f,  0x1.e8f5c4p-7f,  0x1.0b851ep-6f,  0x1.228f5cp-6f,  0x1.39999ap-6f,
      0x1.50a3d6p-6f,  0x1.67ae16p-6f,  0x1.7eb854p-6f,  0x1.95c29p-6f,   0x1.accccep-6f,
      0x1.c3d70ep-6f,  0x1.dae146p-6f,  0x1.f1eb86p-6f,  0x1.047aep-5f,   0x1.1p-5f,
      0x1.1b851ep-5f,  0x1.270a3ep-5f,  0x1.328f5ep-5f,  0x1.3e147ap-5f,  0x1.49999ap-5f,
      0x1.551eb6p-5f,  0x1.60a3d6p-5f,  0x1.6c28f6p-5f,  0x1.77ae14p-5f,  0x1.833334p-5f,
      0x1.8eb854p-5f,  0x1.9a3d7p-5f,   0x1.a5c29p-5f,   0x1.b147aep-5f,  0x1.bccccep-5f,
      0x1.c851eep-5f,  0x1.d3d70ep-5f,  0x1.df5c2ap-5f,  0x1.eae146p-5f,  0x1.f66666p-5f,
      0x1.00f5c4p-4f,  0x1.06b852p-4f,  0x1.0c7ae2p-4f,  0x1.123d72p-4f,  0x1.18p-4f,
      0x1.1dc29p-4f,   0x1.23852p-4f,   0x1.2947aep-4f,  0x1.2f0a3ep-4f,  0x1.34cccep-4f,
      0x1.3a8f5ep-4f,  0x1.4051ecp-4f,  0x1.46147ap-4f,  0x1.4bd70ap-4f,  0x1.51999ap-4f,
      0x1.575c28p-4f,  0x1.5d1eb8p-4f,  0x1.62e146p-4f,  0x1.68a3d6p-4f,  0x1.6e6666p-4f,
      0x1.7428f6p-4f,  0x1.79eb86p-4f,  0x1.7fae14p-4f,  0x1.8570a4p-4f,  0x1.8b3334p-4f,
      0x1.90f5c2p-4f,  0x1.96b852p-4f,  0x1.a8p-4f,      0x1.c4ccccp-4f,  0x1.e1999ap-4f,
      0x1.fe6666p-4f,  0x1.0d9998p-3f,  0x1.1cp-3f,      0x1.2a6668p-3f,  0x1.38ccccp-3f,
      0x1.473334p-3f,  0x1.559998p-3f,  0x1.64p-3f,      0x1.726668p-3f,  0x1.80ccccp-3f,
      0x1.8f3334p-3f,  0x1.9d9998p-3f,  0x1.acp-3f,      0x1.ba6668p-3f,  0x1.c8ccccp-3f,
      0x1.d73334p-3f,  0x1.e5999cp-3f,  0x1.f4p-3f,      0x1.013334p-2f,  0x1.086666p-2f,
      0x1.0f999ap-2f,  0x1.16cccep-2f,  0x1.1ep-2f,      0x1.253334p-2f,  0x1.2c6668p-2f,
      0x1.33999ap-2f,  0x1.3acccep-2f,  0x1.42p-2f,      0x1.493334p-2f,  0x1.506666p-2f,
      0x1.579998p-2f,  0x1.5eccccp-2f,  0x1.66p-2f,      0x1.6d3332p-2f,  0x1.746666p-2f,
      0x1.7b9998p-2f,  0x1.82ccccp-2f,  0x1.8ap-2f,      0x1.913334p-2f,  0x1.986666p-2f,
      0x1.9f9998p-2f,  0x1.a6ccccp-2f,  0x1.aep-2f,      0x1.b53332p-2f,  0x1.bc6666p-2f,
      0x1.c3999ap-2f,  0x1.caccccp-2f,  0x1.d2p-2f,      0x1.d93334p-2f,  0x1.e06666p-2f,
      0x1.e7999ap-2f,  0x1.eeccccp-2f,  0x1.f6p-2f,      0x1.fd3332p-2f,  0x1.023334p-1f,
      0x1.05ccccp-1f,  0x1.096664p-1f,  0x1.0dp-1f,      0x1.109998p-1f,  0x1.143334p-1f,
      0x1.17ccccp-1f,  0x1.1b6668p-1f,  0x1.1fp-1f,      0x1.22999ap-1f,  0x1.263334p-1f,
      0x1.29ccccp-1f,  0x1.2d6668p-1f,  0x1.31p-1f,      0x1.34999ap-1f,  0x1.383334p-1f,
      0x1.3bccccp-1f,  0x1.3f6666p-1f,  0x1.43p-1f,      0x1.469998p-1f,  0x1.4a3334p-1f,
      0x1.4dccccp-1f,  0x1.516668p-1f,  0x1.55p-1f,      0x1.58999cp-1f,  0x1.5c3334p-1f,
      0x1.5fccccp-1f,  0x1.636668p-1f,  0x1.67p-1f,      0x1.6a999cp-1f,  0x1.6e3334p-1f,
      0x1.71ccccp-1f,  0x1.756668p-1f,  0x1.79p-1f,      0x1.7c9998p-1f,  0x1.803334p-1f,
      0x1.83ccccp-1f,  0x1.876668p-1f,  0x1.8bp-1f,      0x1.8e9998p-1f,  0x1.923334p-1f,
      0x1.95ccccp-1f,  0x1.996664p-1f,  0x1.9dp-1f,      0x1.a09998p-1f,  0x1.a43334p-1f,
      0x1.a7ccccp-1f,  0x1.ab6668p-1f,  0x1.afp-1f,      0x1.b2999ap-1f,  0x1.b63334p-1f,
      0x1.b9ccccp-1f,  0x1.bd6668p-1f,  0x1.c1p-1f,      0x1.c4999ap-1f,  0x1.c83334p-1f,
      0x1.cbccccp-1f,  0x1.cf6666p-1f,  0x1.d3p-1f,      0x1.d69998p-1f,  0x1.da3334p-1f,
      0x1.ddccccp-1f,  0x1.e16668p-1f,  0x1.e5p-1f,      0x1.e8999cp-1f,  0x1.ec3334p-1f,
      0x1.efccccp-1f,  0x1.f36668p-1f,  0x1.f7p-1f,      0x1.fa999cp-1f,  0x1.fe3334p-1f,
      0x1p+0f,
  };
  return make_map(table);
}

}  // namespace detail

/// The signed dynamic map (first moment), sorted ascending: 127 negative values, 0 at index 127,
/// 127 positive values and 1.0 at index 255 (there is no −1.0). Static tables in the function so
/// that host and device code read the same bytes (device: global memory; kernels stage them in
/// shared memory as bitsandbytes does).
SLIMGRAD_HOST_DEVICE inline const CodeMap& signed_code_map() {
  static constexpr CodeMap map = detail::signed_values();
  static_assert(detail::cell_conflicts(map) == 0, "slimgrad: a cell holds two midpoints");
  return map;
}

/// The unsigned dynamic map (second moment), sorted ascending: 0 at index 0, 254 positive values,
/// 1.0 at index 255.
SLIMGRAD_HOST_DEVICE inline const CodeMap& unsigned_code_map() {
  static constexpr CodeMap map = detail::unsigned_values();
  static_assert(detail::cell_conflicts(map) == 0, "slimgrad: a cell holds two midpoints");
  return map;
}

/// The 256 values of the signed map.
SLIMGRAD_HOST_DEVICE inline const float* signed_map() {
  return signed_code_map().code;
}
/// The 256 values of the unsigned map.
SLIMGRAD_HOST_DEVICE inline const float* unsigned_map() {
  return unsigned_code_map().code;
}

/// The map bitsandbytes uses for a moment: signed for the first, unsigned for the second.
SLIMGRAD_HOST_DEVICE inline const CodeMap& code_map(Moment kind) {
  return kind == Moment::first ? signed_code_map() : unsigned_code_map();
}

/// The index of the map entry nearest to x (x normally in [−1, 1]), by bitsandbytes'
/// deterministic binary search with midpoint rounding (quantize_2D). `code` is a sorted 256-entry
/// map; `is_signed` selects the lower bound the kernel starts from (−1 or 0). Values beyond the
/// ends clamp to index 0 or 255; NaN gives index 0 (every comparison is false).
SLIMGRAD_HOST_DEVICE inline std::uint8_t nearest_code(const float* code, float x, bool is_signed) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = is_signed ? -1.0f : 0.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < midpoint ? lower_pivot : pivot);
}

/// Folds |x| into a running block absmax (start from 0). NaN elements are skipped, as fmaxf does
/// in the kernel.
SLIMGRAD_HOST_DEVICE inline float absmax_update(float current, float x) {
  const float magnitude = numeric::float_from_bits(numeric::float_bits(x) & 0x7FFFFFFFu);
  return magnitude > current ? magnitude : current;
}

/// The same index as nearest_code(map.code, x, ·) by a uniform binary search over the 255
/// midpoints (branch-free: eight dependent loads, no table beyond the 1 KiB of midpoints, for a
/// device that prefers that to the cell table), then a value exactly on a midpoint moves to the
/// even index of its pair, as the kernel's search ends there.
SLIMGRAD_HOST_DEVICE inline std::uint8_t nearest_code_search(const CodeMap& map, float x) {
  int idx = 0;
  // Arithmetic on the comparison, not a conditional: compilers emit it without branches (a
  // branchy search mispredicts about half of its steps, 4-5x slower on the CPU).
  for (int step = 128; step > 0; step >>= 1)
    idx += step * static_cast<int>(x > map.mid[idx + step - 1]);
  if (idx < map_size - 1 && (idx & 1) && x == map.mid[idx]) ++idx;
  return static_cast<std::uint8_t>(idx);
}

/// The index of x's cell entry in map.cell (sign, then clamped magnitude); `clamped` receives the
/// magnitude bits clamped to those of 1.0f. x must not be NaN.
SLIMGRAD_HOST_DEVICE inline std::uint32_t cell_index(std::uint32_t bits, std::uint32_t& clamped) {
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  clamped = magnitude < one_bits ? magnitude : one_bits;
  const std::uint32_t top = clamped >> cell_low_bits;
  return (bits >> 31) * static_cast<std::uint32_t>(cells_per_sign) +
         (top > cell_first ? top - cell_first : 0u);
}

/// The same index as nearest_code(map.code, x, ·) from the cell table: the cell entry's base
/// plus one if x's low 16 bits (reversed for negative x) reach the cell's threshold. NaN gives
/// 0, as in the search. Equal to the kernel's search for all 2^32 floats (checked exhaustively
/// when the table was written; tests check every code, midpoint and midpoint ± 1 ulp, every cell
/// boundary and random values).
SLIMGRAD_HOST_DEVICE inline std::uint8_t nearest_code(const CodeMap& map, float x) {
  const std::uint32_t bits = numeric::float_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;
  std::uint32_t clamped = 0;
  const std::uint32_t entry = map.cell[cell_index(bits, clamped)];
  const std::uint32_t key = (clamped & cell_low_mask) ^ ((bits >> 31) ? cell_low_mask : 0u);
  return static_cast<std::uint8_t>((entry & 0xFFu) + (key >= (entry >> 8) ? 1u : 0u));
}

/// The code stored for `value` in a block whose absmax is `absmax` (≥ 0): the nearest entry of
/// the map to value / absmax, then, for the signed map, the kernel's sign correction.
SLIMGRAD_HOST_DEVICE inline std::uint8_t quantize(const CodeMap& map, bool is_signed, float value,
                                                  float absmax) {
  const float normalised = absmax > 0.0f ? value / absmax : 0.0f;
  std::uint8_t c = nearest_code(map, normalised);
  if (is_signed && (numeric::float_bits(map.code[c]) >> 31) != (numeric::float_bits(value) >> 31)) {
    // Unsigned-char arithmetic, as in the kernel (only reachable in-range for finite values).
    c = static_cast<std::uint8_t>(value > 0.0f ? c + 1 : c - 1);
  }
  return c;
}

/// quantize() for n consecutive values of one block (the portable loop; the CPU backend has
/// vectorised forms of the same steps).
SLIMGRAD_HOST_DEVICE inline void quantize_n(const CodeMap& map, bool is_signed, const float* value,
                                            index_t n, float absmax, std::uint8_t* out) {
  for (index_t i = 0; i < n; ++i)
    out[i] = quantize(map, is_signed, value[i], absmax);
}

/// The value a code stands for in a block with the given absmax.
SLIMGRAD_HOST_DEVICE inline float dequantize(const CodeMap& map, std::uint8_t c, float absmax) {
  return map.code[c] * absmax;
}

}  // namespace slimgrad::state::q8
