// slimgrad/core/orientation.hpp — which side of an m×n gradient a projection acts on.
//
// One helper for GaLore, APOLLO, SubTrack and Flora (algorithms.md §5.1, §8.1): with `std`,
// the smaller dimension is compressed, so the basis is the smaller object.
#pragma once

#include <cstdint>
#include <string_view>

#include "config.hpp"
#include "error.hpp"
#include "view.hpp"

namespace slimgrad {

/// Left: basis S is m×r, coefficients Sᵀ G are r×n.  Right: basis is n×r (stored r×n as
/// GaLore's P), coefficients G Pᵀ are m×r.
enum class Side : std::uint8_t { left, right };

/// GaLore's proj_type: std (compress the smaller side), reverse_std, or a forced side.
enum class ProjType : std::uint8_t { std_, reverse_std, left, right };

/// The side a projection acts on for a gradient of `shape` under `type`.
SLIMGRAD_HOST_DEVICE constexpr Side side_for(Shape shape, ProjType type = ProjType::std_) {
  const bool right_if_std = shape.rows >= shape.cols;
  switch (type) {
    case ProjType::std_:
      return right_if_std ? Side::right : Side::left;
    case ProjType::reverse_std:
      return right_if_std ? Side::left : Side::right;
    case ProjType::left:
      return Side::left;
    case ProjType::right:
      return Side::right;
  }
  return Side::left;
}

/// Length of the dimension a projection compresses (the basis' row count).
SLIMGRAD_HOST_DEVICE constexpr index_t projected_dim(Shape shape, Side side) {
  return side == Side::left ? shape.rows : shape.cols;
}

/// Shape of the rank-r coefficients: r×n on the left, m×r on the right.
SLIMGRAD_HOST_DEVICE constexpr Shape projected_shape(Shape shape, Side side, index_t rank) {
  return side == Side::left ? Shape{rank, shape.cols} : Shape{shape.rows, rank};
}

inline ProjType parse_proj_type(std::string_view s) {
  if (s == "std") return ProjType::std_;
  if (s == "reverse_std") return ProjType::reverse_std;
  if (s == "left") return ProjType::left;
  if (s == "right") return ProjType::right;
  throw Error("slimgrad: unknown proj_type '" + std::string(s) +
              "' (expected std, reverse_std, left or right)");
}

inline const char* to_string(ProjType t) {
  switch (t) {
    case ProjType::std_:
      return "std";
    case ProjType::reverse_std:
      return "reverse_std";
    case ProjType::left:
      return "left";
    case ProjType::right:
      return "right";
  }
  return "?";
}

/// A stable 64-bit id for a parameter name (FNV-1a). Random projections are keyed by it, so
/// the same name gives the same matrix in every run, on every backend, after every reload.
constexpr std::uint64_t tensor_id(std::string_view name) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace slimgrad
