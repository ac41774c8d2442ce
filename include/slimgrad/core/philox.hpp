// slimgrad/core/philox.hpp — the counter-based generator behind every random projection.
//
// Random projections (APOLLO, CompAct, Flora, the randomized SVD's test matrix) are never stored:
// they are regenerated from (seed, stream, epoch) with Philox4x32-10 (Salmon et al., SC'11,
// "Parallel random numbers: as easy as 1, 2, 3"), so any tile of a matrix can be produced
// independently and the CPU and CUDA backends produce the same bits (algorithms.md §8.2).
//
// Bit-identity across compilers needs more than the same integer generator: the Gaussian
// transform (Box–Muller) must round identically everywhere. Library log/sin/cos differ between
// glibc and CUDA, and compilers may fuse a*b+c into one FMA. So the Gaussian below uses only
// IEEE-754 basic operations (+, −, ×, ÷, sqrt, all correctly rounded) in double precision, in
// our own log and sincos, with every product fenced against contraction. The double result is
// rounded once to float. State cost: none (the seed is the state).
#pragma once

#include <cmath>
#include <cstdint>

#include "config.hpp"
#include "view.hpp"

namespace slimgrad::random {

/// Four 32-bit words: a Philox counter or output block.
struct Block4 {
  std::uint32_t v[4];
};

namespace detail {

SLIMGRAD_HOST_DEVICE inline std::uint32_t mulhilo(std::uint32_t a, std::uint32_t b,
                                                  std::uint32_t* hi) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  *hi = static_cast<std::uint32_t>(p >> 32);
  return static_cast<std::uint32_t>(p);
}

// A product that is rounded on its own: never fused with a following addition.
SLIMGRAD_HOST_DEVICE inline double mul_rn(double a, double b) {
#if SLIMGRAD_DEVICE_PASS
  return __dmul_rn(a, b);
#else
  double r = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(r));  // the value must exist in a register: no FMA across this point
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#else
  volatile double fence = r;
  r = fence;
#endif
  return r;
#endif
}

SLIMGRAD_HOST_DEVICE inline double div_rn(double a, double b) {
#if SLIMGRAD_DEVICE_PASS
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

SLIMGRAD_HOST_DEVICE inline double sqrt_rn(double a) {
#if SLIMGRAD_DEVICE_PASS
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// Natural logarithm of u in (0, 1], from basic operations only. u = m·2^e with m in
// [1/√2, √2); ln m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.172, series to s^23 (error < 1e-17).
SLIMGRAD_HOST_DEVICE inline double log_rn(double u) {
  int e = 0;
  double m = frexp(u, &e);  // exact: m in [0.5, 1)
  if (m < 0.70710678118654752440) {
    m = m * 2.0;  // exact
    e -= 1;
  }
  const double s = div_rn(m - 1.0, m + 1.0);
  const double s2 = mul_rn(s, s);
  double p = 1.0 / 23.0;
  constexpr double inv_odd[] = {1.0 / 21.0, 1.0 / 19.0, 1.0 / 17.0, 1.0 / 15.0,
                                1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0,  1.0 / 7.0,
                                1.0 / 5.0,  1.0 / 3.0,  1.0};
  for (double c : inv_odd)
    p = mul_rn(p, s2) + c;
  const double log_m = mul_rn(2.0, mul_rn(s, p));
  return mul_rn(static_cast<double>(e), 0.69314718055994530942) + log_m;
}

// sin(x) and cos(x) for x in [0, π/4]: Taylor series in y = x² to x^19 / x^18 (error < 1e-18),
// Horner from the highest term.
SLIMGRAD_HOST_DEVICE inline void sincos_quarter(double x, double* s, double* c) {
  constexpr double sin_over_x[] = {-1.0 / 121645100408832000.0,
                                   1.0 / 355687428096000.0,
                                   -1.0 / 1307674368000.0,
                                   1.0 / 6227020800.0,
                                   -1.0 / 39916800.0,
                                   1.0 / 362880.0,
                                   -1.0 / 5040.0,
                                   1.0 / 120.0,
                                   -1.0 / 6.0,
                                   1.0};
  constexpr double cos_terms[] = {-1.0 / 6402373705728000.0,
                                  1.0 / 20922789888000.0,
                                  -1.0 / 87178291200.0,
                                  1.0 / 479001600.0,
                                  -1.0 / 3628800.0,
                                  1.0 / 40320.0,
                                  -1.0 / 720.0,
                                  1.0 / 24.0,
                                  -1.0 / 2.0,
                                  1.0};
  const double y = mul_rn(x, x);
  double ps = 0.0, pc = 0.0;
  for (double k : sin_over_x)
    ps = mul_rn(ps, y) + k;
  for (double k : cos_terms)
    pc = mul_rn(pc, y) + k;
  *s = mul_rn(x, ps);
  *c = pc;
}

}  // namespace detail

/// Philox4x32-10: the 128-bit block for `counter` under the 64-bit `key` (Random123 semantics).
SLIMGRAD_HOST_DEVICE inline Block4 philox4x32_10(Block4 counter, std::uint32_t key0,
                                                 std::uint32_t key1) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  Block4 c = counter;
  for (int round = 0; round < 10; ++round) {
    std::uint32_t hi0 = 0, hi1 = 0;
    const std::uint32_t lo0 = detail::mulhilo(m0, c.v[0], &hi0);
    const std::uint32_t lo1 = detail::mulhilo(m1, c.v[2], &hi1);
    c = Block4{{hi1 ^ c.v[1] ^ key0, lo1, hi0 ^ c.v[3] ^ key1, lo0}};
    key0 += w0;
    key1 += w1;
  }
  return c;
}

/// Where a random matrix comes from: a user seed, a stream (the tensor id, see tensor_id()) and
/// an epoch (the resample count). Element e of the row-major matrix uses Philox block e/4,
/// lane e%4, with key = seed and counter = (e/4, epoch, stream low, stream high).
struct Key {
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
  std::uint32_t epoch = 0;
};

/// Box–Muller on one 128-bit block: four independent N(0, 1) values, in double.
SLIMGRAD_HOST_DEVICE inline void box_muller4(Block4 bits, double out[4]) {
  for (int pair = 0; pair < 2; ++pair) {
    // Uniforms in (0, 1): (x + 1/2)·2^-32, exact in double.
    const double u1 = (static_cast<double>(bits.v[2 * pair]) + 0.5) * 0x1p-32;
    const double u2 = (static_cast<double>(bits.v[2 * pair + 1]) + 0.5) * 0x1p-32;
    const double radius = detail::sqrt_rn(-2.0 * detail::log_rn(u1));
    // Angle 2π·u2: quadrant q from 4·u2 (exact), then an angle in [0, π/4] by symmetry.
    const double t = u2 * 4.0;
    const int q = static_cast<int>(t);
    double f = t - static_cast<double>(q);  // exact, in [0, 1)
    const bool swap = f > 0.5;
    if (swap) f = 1.0 - f;  // exact
    double s = 0.0, c = 0.0;
    detail::sincos_quarter(detail::mul_rn(f, 1.57079632679489661923), &s, &c);
    if (swap) {
      const double tmp = s;
      s = c;
      c = tmp;
    }
    double sin_a = s, cos_a = c;  // angle = q·π/2 + φ
    switch (q & 3) {
      case 1:
        sin_a = c;
        cos_a = -s;
        break;
      case 2:
        sin_a = -s;
        cos_a = -c;
        break;
      case 3:
        sin_a = -c;
        cos_a = s;
        break;
      default:
        break;
    }
    out[2 * pair] = detail::mul_rn(radius, cos_a);
    out[2 * pair + 1] = detail::mul_rn(radius, sin_a);
  }
}

/// The Philox block holding element `block` (= element index / 4) of the matrix named by `key`.
SLIMGRAD_HOST_DEVICE inline Block4 block_bits(const Key& key, std::uint64_t block) {
  const Block4 counter{{static_cast<std::uint32_t>(block), key.epoch,
                        static_cast<std::uint32_t>(key.stream),
                        static_cast<std::uint32_t>(key.stream >> 32)}};
  return philox4x32_10(counter, static_cast<std::uint32_t>(key.seed),
                       static_cast<std::uint32_t>(key.seed >> 32));
}

/// Largest element count a Key can address (2^32 blocks of 4).
inline constexpr std::uint64_t max_elements = std::uint64_t{1} << 34;

/// Element `index` of the N(0, stddev²) matrix named by `key`, rounded once to float.
SLIMGRAD_HOST_DEVICE inline float gaussian(const Key& key, std::uint64_t index, double stddev) {
  double z[4];
  box_muller4(block_bits(key, index / 4), z);
  return static_cast<float>(detail::mul_rn(z[index % 4], stddev));
}

/// Fills `out` (row-major; element (i, j) has index i·cols + j whatever the leading dimension)
/// with N(0, stddev²) values named by `key`. With `first_row`, `out` is the tile of rows
/// [first_row, first_row + out.rows) of the matrix (same bits as filling it whole). Host loop;
/// the CUDA backend has its own.
inline void fill_gaussian(HostView<float> out, const Key& key, double stddev,
                          index_t first_row = 0) {
  const std::uint64_t cols = static_cast<std::uint64_t>(out.cols);
  for (index_t i = 0; i < out.rows; ++i) {
    float* row = out.row(i);
    std::uint64_t e = static_cast<std::uint64_t>(first_row + i) * cols;
    std::uint64_t j = 0;
    while (j < cols) {
      double z[4];
      box_muller4(block_bits(key, e / 4), z);
      for (std::uint64_t lane = e % 4; lane < 4 && j < cols; ++lane, ++j, ++e)
        row[j] = static_cast<float>(detail::mul_rn(z[lane], stddev));
    }
  }
}

}  // namespace slimgrad::random
