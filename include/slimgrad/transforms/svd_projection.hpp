// slimgrad/transforms/svd_projection.hpp — GaLore's SVD projector (arXiv 2403.03507,
// algorithms.md §5.1): the gradient G (m×n) is projected onto its top-r singular subspace,
// recomputed every T steps (k ≡ 0 mod T, k counted before the increment).
//
// This header is the backend-neutral descriptor: options, shape math and the canonical sign
// rule, written without Eigen or heap use so that the CUDA backend shares them. The CPU
// implementation is impl<SvdProjection, backend::cpu> in backend/cpu/svd_projection.hpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/orientation.hpp"
#include "../core/view.hpp"

namespace slimgrad::transforms {

/// How a basis refresh computes the top-r singular vectors.
enum class SvdMethod : std::uint8_t {
  /// A full thin SVD of the fp32 gradient (Eigen BDCSVD on the CPU, which itself switches to
  /// one-sided Jacobi below 16 columns). O(mn·min(m,n)).
  exact,
  /// Halko–Martinsson–Tropp randomized range finder: Gaussian test matrix with r + p columns,
  /// q power iterations with a QR between every product, then a small exact SVD.
  /// O(mn(r+p)(2q+2)); accurate when the spectrum has a gap after r (algorithms.md §8.4).
  randomized,
};

/// Outcome of the last basis refresh, kept in the per-tensor state so that a trainer can log
/// it. A refresh never produces a non-finite basis: on failure it keeps what it had.
enum class RefreshStatus : std::uint8_t {
  none,             ///< no refresh has run on this state yet
  ok,               ///< the configured method produced the basis (or tracked it)
  fallback_method,  ///< the first refresh's configured method failed; the other SVD method
                    ///< produced the basis
  kept_previous,    ///< the refresh failed; the previous basis is kept unchanged
  identity_basis,   ///< the first refresh failed with no basis to keep (e.g. a non-finite
                    ///< gradient): the basis is the first r coordinate vectors
};

/// Why the last failed refresh failed (RefreshFailure::none after a clean refresh).
enum class RefreshFailure : std::uint8_t {
  none,
  non_finite_gradient,  ///< the gradient held a NaN or an infinity
  no_convergence,       ///< the SVD reported that it did not converge
  non_finite_result,    ///< the computed vectors held a NaN or an infinity (e.g. overflow)
};

inline const char* to_string(RefreshStatus s) {
  switch (s) {
    case RefreshStatus::none:
      return "none";
    case RefreshStatus::ok:
      return "ok";
    case RefreshStatus::fallback_method:
      return "fallback_method";
    case RefreshStatus::kept_previous:
      return "kept_previous";
    case RefreshStatus::identity_basis:
      return "identity_basis";
  }
  return "?";
}

inline const char* to_string(RefreshFailure f) {
  switch (f) {
    case RefreshFailure::none:
      return "none";
    case RefreshFailure::non_finite_gradient:
      return "non_finite_gradient";
    case RefreshFailure::no_convergence:
      return "no_convergence";
    case RefreshFailure::non_finite_result:
      return "non_finite_result";
  }
  return "?";
}

/// GaLore's projector. Left side: basis S (m×r, top-r left singular vectors), coefficients
/// Sᵀ G (r×n), back-projection S N. Right side: basis P (r×n, top-r right singular vectors
/// stored as rows, as GaLore stores `Vh[:r,:]`), coefficients G Pᵀ (m×r), back-projection N P.
/// All coefficients are tracked (no stored residual); the scale α belongs to the optimizer.
/// State cost: the basis, r·projected_dim·4 bytes (r·min(m,n)·4 with proj_type std), i.e.
/// 4r/max(m,n) bytes per parameter.
struct SvdProjection {
  struct Options {
    index_t rank = 128;        ///< r, in [1, min(m, n)]
    index_t update_gap = 200;  ///< T: refresh when k % T == 0 (k before increment)
    ProjType proj_type = ProjType::std_;
    SvdMethod method = SvdMethod::exact;
    index_t oversampling = 10;     ///< p (randomized): the test matrix has r + p columns
    index_t power_iterations = 2;  ///< q (randomized)
    std::uint64_t seed = 0;        ///< seed of the randomized test matrix (Philox key)
  };
  static constexpr const char* name = "svd_projection";

  /// Shape of the basis as stored: m×r on the left, r×n on the right.
  SLIMGRAD_HOST_DEVICE static constexpr Shape basis_shape(Shape g, Side side, index_t rank) {
    return side == Side::left ? Shape{g.rows, rank} : Shape{rank, g.cols};
  }
  /// Shape of the coefficients forward() writes: r×n on the left, m×r on the right.
  SLIMGRAD_HOST_DEVICE static constexpr Shape coeff_shape(Shape g, Side side, index_t rank) {
    return projected_shape(g, side, rank);
  }
  /// Bytes of per-tensor state: the fp32 basis.
  SLIMGRAD_HOST_DEVICE static constexpr std::size_t state_bytes(Shape g, Side side, index_t rank) {
    return static_cast<std::size_t>(rank) * static_cast<std::size_t>(projected_dim(g, side)) *
           sizeof(float);
  }
  /// GaLore's schedule: a refresh is due at k = 0, T, 2T, ... (k before the increment).
  SLIMGRAD_HOST_DEVICE static constexpr bool refresh_due(index_t k, index_t update_gap) {
    return k % update_gap == 0;
  }
  /// Columns of the randomized test matrix: r + p, capped at min(m, n) (beyond that the
  /// range finder spans everything and more columns add nothing).
  SLIMGRAD_HOST_DEVICE static constexpr index_t sketch_width(Shape g, index_t rank,
                                                             index_t oversampling) {
    const index_t cap = g.rows < g.cols ? g.rows : g.cols;
    const index_t want = rank + oversampling;
    return want < cap ? want : cap;
  }
};

/// The canonical sign rule shared by every backend and every SVD routine: a singular vector
/// x (n entries, `stride` apart) is flipped so that its entry of largest magnitude is positive;
/// on ties the first such entry decides. Returns true when x must be negated. A singular
/// vector is defined only up to sign, so without this rule the basis (and the coefficients the
/// optimizer keeps moments for) would depend on the LAPACK in use. Entries whose magnitudes
/// differ only by rounding can still decide differently across libraries; the rule makes the
/// sign reproducible whenever the largest entry is separated from the next by more than the
/// SVD's error.
SLIMGRAD_HOST_DEVICE inline bool canonical_sign_flip(const float* x, index_t n, index_t stride) {
  index_t best = 0;
  float best_abs = -1.0f;
  for (index_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    const float a = v < 0.0f ? -v : v;
    if (a > best_abs) {
      best_abs = a;
      best = i;
    }
  }
  return n > 0 && x[best * stride] < 0.0f;
}

}  // namespace slimgrad::transforms
