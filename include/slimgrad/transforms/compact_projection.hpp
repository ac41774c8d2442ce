// slimgrad/transforms/compact_projection.hpp — CompAct's projection (algorithms.md §4), the
// optimizer side of the CompAct activation codec (activation/codecs.hpp).
//
// CompAct saves Z = X Pᵀ instead of a linear layer's input X, so the weight gradient is born
// compressed: Ĝ = dYᵀ Z = G Pᵀ (m×r). The optimizer keeps m×r moments and maps the update back
// with the same P: W ← W − lr·α·N P. P is RandomProjection's matrix on the right side (r×n,
// N(0, 1/r)), named by the same (seed, tensor id, epoch) key, so this transform, the activation
// codec and `RandomProjection{proj_type = right}` all regenerate the same bits; the rank may be a
// ratio of in_features because every layer of a model has its own n.
//
// `sketch = count` replaces the Gaussian by a CountSketch (a sparse JL matrix; CompAct's ablation
// finds sparse JL comparable, algorithms.md §4.1): column j of P has one nonzero, ±1 in row h(j),
// both drawn from Philox block j of the same key. PᵀP has an exact unit diagonal and off-diagonal
// entries of mean 0 and variance 1/r, as the Gaussian's, so E[PᵀP] = I and the update stays
// unbiased; but X Pᵀ costs one addition per input element instead of 2r flops, so the forward
// pays almost nothing for the sketch (the Gaussian's 2·n·r flops per token are 25% of an n×n
// layer's at r = n/4).
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/philox.hpp"
#include "random_projection.hpp"

namespace slimgrad::transforms {

/// The distribution of CompAct's P.
enum class Sketch : std::uint8_t {
  gaussian,  ///< i.i.d. N(0, 1/r), RandomProjection's matrix (the paper's)
  count      ///< CountSketch: one ±1 per column, in a Philox-drawn row
};

/// P is r×n (stored like GaLore's right-side P), coefficients G Pᵀ (m×r), back-map N P.
/// State: 16 bytes (seed and epoch) per tensor, plus r·n·4 bytes if `keep_matrix` holds P
/// (Gaussian only: a CountSketch is regenerated in n Philox calls).
struct CompactProjection {
  struct Options {
    index_t rank = 0;         ///< absolute rank; 0: use `ratio`
    double ratio = 0.25;      ///< r = round(n·ratio) if ratio ≤ 1, else int(ratio) (§4.1)
    index_t update_gap = 50;  ///< resample when k % update_gap == 0 (T = 50 for 60M–350M)
    std::uint64_t seed = 0;
    /// Keep P between resamples: r·n floats for one GEMM-sized fill per use (about 5% of a
    /// 4096×4096 layer's forward over 2048 tokens). Off by default: the seed is the state.
    bool keep_matrix = false;
    Sketch sketch = Sketch::gaussian;
  };
  static constexpr const char* name = "compact_projection";
  /// The optimizer takes a gradient already in coefficient space (m×r) for such a transform.
  static constexpr bool accepts_coefficients = true;

  /// The rank for a layer with n = in_features (0 when the options give none).
  static index_t rank_for(index_t n, const Options& o) {
    if (o.rank > 0) return o.rank;
    if (!(o.ratio > 0)) return 0;
    if (o.ratio <= 1.0) return static_cast<index_t>(std::llround(static_cast<double>(n) * o.ratio));
    return static_cast<index_t>(o.ratio);
  }
  /// CountSketch's column j of P: the row of its nonzero and the nonzero (±1). The row is the
  /// high half of a 32-bit uniform times r (Lemire's multiply-shift: no modulo, bias < r/2^32).
  struct CountEntry {
    index_t row;
    float sign;
  };
  SLIMGRAD_HOST_DEVICE static CountEntry count_entry(const random::Key& key, index_t rank,
                                                     std::uint64_t column) {
    const random::Block4 bits = random::block_bits(key, column);
    const auto row =
        (static_cast<std::uint64_t>(bits.v[0]) * static_cast<std::uint64_t>(rank)) >> 32;
    return {static_cast<index_t>(row), (bits.v[1] & 1u) != 0 ? -1.0f : 1.0f};
  }

  /// The P of RandomProjection on the right side: r×n.
  static constexpr Shape matrix_shape(Shape g, index_t rank) {
    return RandomProjection::matrix_shape(g, Side::right, rank);
  }
};

}  // namespace slimgrad::transforms
