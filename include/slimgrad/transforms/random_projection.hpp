// slimgrad/transforms/random_projection.hpp — seeded Gaussian projection (APOLLO, Flora,
// CompAct; algorithms.md §6.1, §6.4, §4.1, §8.2).
//
// The projection P has i.i.d. N(0, 1/r) entries, so E[Pᵀ P] = I (right side) and
// E[P Pᵀ] = I (left side). It is never stored in a checkpoint: it is regenerated from
// (seed, tensor id, epoch) with Philox4x32-10 (core/philox.hpp), identically on every backend.
// A new epoch starts every `update_gap` steps: epoch = k / update_gap, so the matrix at any step
// is a pure function of the step counter (resume needs no extra state).
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/orientation.hpp"
#include "../core/philox.hpp"
#include "../core/view.hpp"

namespace slimgrad::transforms {

/// Random projection to rank r on the side chosen by `proj_type` (GaLore's rule, §5.1).
/// Right side (m ≥ n under std): P is r×n, coefficients G Pᵀ (m×r), back-map N P.
/// Left side: P is m×r, coefficients Pᵀ G (r×n), back-map P N.
/// State: 16 bytes (seed and epoch) per tensor, plus r·min(m,n)·4 bytes while `keep_matrix`
/// holds the regenerated matrix in memory between refreshes (faster; off = regenerate per call).
struct RandomProjection {
  struct Options {
    index_t rank = 128;
    index_t update_gap = 200;  ///< resample when k % update_gap == 0
    ProjType proj_type = ProjType::std_;
    std::uint64_t seed = 0;
    bool keep_matrix = true;
  };
  static constexpr const char* name = "random_projection";

  /// Shape of the stored projection matrix P for a gradient of `g` on `side`.
  SLIMGRAD_HOST_DEVICE static constexpr Shape matrix_shape(Shape g, Side side, index_t rank) {
    return side == Side::right ? Shape{rank, g.cols} : Shape{g.rows, rank};
  }
  /// Standard deviation of the entries: 1/sqrt(r).
  static double stddev(index_t rank) { return 1.0 / std::sqrt(static_cast<double>(rank)); }
  /// The epoch (resample count) in force at step k.
  SLIMGRAD_HOST_DEVICE static constexpr std::uint32_t epoch_at(index_t step, index_t update_gap) {
    return static_cast<std::uint32_t>(step / update_gap);
  }
};

}  // namespace slimgrad::transforms
