// slimgrad/core/numeric.hpp — bfloat16 conversions shared by the CPU and CUDA backends.
//
// bf16 keeps the top 16 bits of an IEEE binary32 (sign, 8 exponent bits, 7 mantissa bits), so
// every conversion here is integer arithmetic on the float's bit pattern: the same bits on any
// compiler, host or device. The pure-bf16 recipe of the GaLore-family papers (algorithms.md §0.5,
// §8.8) stores weights and optimizer states this way. State cost: none (free functions).
#pragma once

#include <cstdint>
#include <cstring>

#include "config.hpp"

namespace slimgrad::numeric {

/// The bit pattern of a float (host: memcpy, which compilers turn into a register move).
SLIMGRAD_HOST_DEVICE inline std::uint32_t float_bits(float x) {
#if SLIMGRAD_DEVICE_PASS
  return __float_as_uint(x);
#else
  std::uint32_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

/// The float with bit pattern `u`.
SLIMGRAD_HOST_DEVICE inline float float_from_bits(std::uint32_t u) {
#if SLIMGRAD_DEVICE_PASS
  return __uint_as_float(u);
#else
  float x = 0.0f;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

/// True for the bf16 bit patterns that encode NaN.
SLIMGRAD_HOST_DEVICE constexpr bool bf16_is_nan(std::uint16_t h) {
  return (h & 0x7FFFu) > 0x7F80u;
}

/// float → bf16 bits, IEEE round-to-nearest-even. Correct for every input: ties go to the even
/// mantissa, subnormals round within the subnormal range (bf16 has float's exponent range),
/// values at or above max finite + half an ulp (0x7F7F8000) become ±infinity, ±0 keeps its sign.
/// A NaN stays a NaN with its sign and top payload bits, and is made quiet (bit 0x0040): the
/// bias trick alone could carry a NaN's payload into the exponent and produce infinity.
/// (torch's scalar path returns 0x7FC0 and its AVX2 path 0xFFFF for any NaN; all three are NaN.)
SLIMGRAD_HOST_DEVICE inline std::uint16_t bf16_bits_rne(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  const std::uint32_t bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + bias) >> 16);
}

/// bf16 bits → float (exact: every bf16 value is a float).
SLIMGRAD_HOST_DEVICE inline float bf16_to_float(std::uint16_t h) {
  return float_from_bits(static_cast<std::uint32_t>(h) << 16);
}

/// float → float rounded to the nearest-even bf16 value (convenience for references and rules).
SLIMGRAD_HOST_DEVICE inline float round_to_bf16(float x) {
  return bf16_to_float(bf16_bits_rne(x));
}

/// float → bf16 bits, stochastic rounding with one 32-bit random word `random`.
///
/// Exactly: take the float's bit pattern u, add the low 16 bits of `random` (r = random & 0xFFFF)
/// as an unsigned integer, and keep the top 16 bits: (u + r) >> 16. Writing u = 2^16·h + l, the
/// result is h + 1 (the next value away from zero) when l + r ≥ 2^16, i.e. with probability
/// l / 2^16, and h otherwise. Since bf16 values are uniformly spaced between h and h + 1, the
/// expectation equals x: the rounding is unbiased (for r uniform) and only the two bf16
/// neighbours of x can appear; a value that is already bf16 (l = 0) is returned unchanged.
/// Consequences of working on the magnitude bits: rounding is symmetric in sign; a float above
/// the largest finite bf16 (0x7F7F) rounds to infinity with probability l / 2^16; ±infinity stays
/// ±infinity. A NaN is handled as in bf16_bits_rne (kept, made quiet), never turned into
/// infinity by the carry.
SLIMGRAD_HOST_DEVICE inline std::uint16_t bf16_bits_stochastic(float x, std::uint32_t random) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  return static_cast<std::uint16_t>((u + (random & 0xFFFFu)) >> 16);
}

}  // namespace slimgrad::numeric
