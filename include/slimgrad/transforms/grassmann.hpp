// slimgrad/transforms/grassmann.hpp — SubTrack-Grad / SubTrack++ Grassmannian subspace
// tracking (arXiv 2502.01586, algorithms.md §2.2, §2.3, §9 item 5).
//
// GaLore's projector, but after the first SVD the basis is moved along a Grassmann geodesic
// every T steps instead of being recomputed: one rank-1 rotation per tracking step, O(mnr)
// instead of O(mn·min(m,n)). This header holds the backend-neutral part: options, shapes and
// the per-element math (host/device, no Eigen, no heap). The CPU implementation is
// impl<Grassmann, backend::cpu> in backend/cpu/grassmann.hpp.
//
// The formulas are the mathematically intended ones of §2.2/§2.3, not the reference code's
// (§9 item 5): the tangent is formed on the correct side for both orientations, the moment
// rotation uses the actual old and new bases at the switch, and the recovery residual is
// G − S SᵀG without α.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/orientation.hpp"
#include "../core/view.hpp"
#include "svd_projection.hpp"

namespace slimgrad::transforms {

/// SubTrack-Grad's tracked projector. Orientation, basis layout (left: S m×r; right: P = Sᵀ
/// r×n, as SvdProjection), coefficients and back-projection are exactly SvdProjection's.
/// k = 0 (or a state without a basis): the basis is the top-r SVD (canonical signs, shared code
/// with SvdProjection). k ≡ 0 mod T, k > 0: one geodesic step on the current gradient.
/// State cost: the fp32 basis, r·projected_dim·4 bytes (r·min(m,n)·4 under std).
struct Grassmann {
  struct Options {
    index_t rank = 128;        ///< r, in [1, min(m, n)]
    index_t update_gap = 200;  ///< T: track when k % T == 0, k > 0 (k before the increment)
    /// η, the geodesic step: the basis turns by the angle η·σ with σ = ‖∇F‖₂ (not normalised,
    /// so η depends on the gradient scale; 10 in SubTrack's C4 scripts).
    double eta = 10.0;
    ProjType proj_type = ProjType::std_;
    /// Re-orthonormalise S (thin Householder QR with a non-negative R diagonal, so that the
    /// columns keep their identity) after every `reorth_every`-th rotating tracking step; 0
    /// never. Default 1: tracking runs once per T steps, so even the measured 11–34 ms of a
    /// 4096×128 QR on 2 cores (10–13 % of that tracking step, bench/results/svd.md) is
    /// ~0.1 ms per training step at T = 200. The exact geodesic keeps orthonormality and in fp32
    /// the drift is small (measured ‖SᵀS − I‖_F ≈ 2e-7 after 300 turns of ~1 rad on 64×48, r = 8,
    /// without QR), so this is cheap insurance: it bounds the drift of long runs, of bases rounded
    /// to bf16 by a caller and of huge η·σ, and keeps A = SᵀĜ the least-squares coefficients.
    index_t reorth_every = 1;
    SvdMethod init_method = SvdMethod::exact;  ///< the k = 0 SVD
    index_t oversampling = 10;                 ///< p, for a randomized initial SVD
    index_t power_iterations = 2;              ///< q, for a randomized initial SVD
    std::uint64_t seed = 0;                    ///< Philox seed of the randomized initial SVD
  };
  static constexpr const char* name = "grassmann";

  /// The SvdProjection that computes the k = 0 basis (both backends).
  static SvdProjection::Options initial_svd(const Options& o) {
    SvdProjection::Options s;
    s.rank = o.rank;
    s.update_gap = o.update_gap;
    s.proj_type = o.proj_type;
    s.method = o.init_method;
    s.oversampling = o.oversampling;
    s.power_iterations = o.power_iterations;
    s.seed = o.seed;
    return s;
  }

  SLIMGRAD_HOST_DEVICE static constexpr Shape coeff_shape(Shape g, Side side, index_t rank) {
    return SvdProjection::coeff_shape(g, side, rank);
  }
  SLIMGRAD_HOST_DEVICE static constexpr std::size_t state_bytes(Shape g, Side side, index_t rank) {
    return SvdProjection::state_bytes(g, side, rank);
  }
  /// True when step k moves the basis along the geodesic: k > 0 and k % T == 0.
  SLIMGRAD_HOST_DEVICE static constexpr bool tracking_due(index_t k, index_t update_gap) {
    return k > 0 && k % update_gap == 0;
  }

  /// Row i of the rank-1 geodesic update S ← S + w vᵀ:
  /// w_i = (S v)_i (cos θ − 1) − u_i sin θ, with u = −B v/‖B v‖. Callers pass cos θ − 1 computed
  /// as −2 sin²(θ/2), which keeps small angles accurate. Invariant under (u, v) → (−u, −v).
  SLIMGRAD_HOST_DEVICE static float geodesic_row(float sv_i, float u_i, double cos_minus_one,
                                                 double sin_theta) {
    return static_cast<float>(static_cast<double>(sv_i) * cos_minus_one -
                              static_cast<double>(u_i) * sin_theta);
  }

  /// SubTrack++ moment rotation, the element-wise part (algorithms.md §2.3(a), LDAdam): with
  /// bias corrections b1 = 1 − β1^t and b2 = 1 − β2^t (both 1 for the raw-moment form),
  /// the variance term fed to (C⊙C)· is v/b2 − (m/b1)².
  SLIMGRAD_HOST_DEVICE static float variance_term(float m, float v, float b1, float b2) {
    const float mh = m / b1;
    return v / b2 - mh * mh;
  }
  /// ... and the new second moment from ((C⊙C)·D)_ij = cd and (C M)_ij = cm:
  /// V_new = b2 · |cd + (cm/b1)²|.
  SLIMGRAD_HOST_DEVICE static float rotated_second_moment(float cd, float cm, float b1, float b2) {
    const float mh = cm / b1;
    const float x = cd + mh * mh;
    return b2 * (x < 0.0f ? -x : x);
  }

  /// Recovery scaling (Fira / SubTrack++ §2.3(b)): the per-channel factor ‖N_c‖ / (‖Y_c‖ + 1e-8)
  /// from the norms of one channel (column on the left, row on the right) of the normalised
  /// low-rank update N and of the coefficients Y.
  SLIMGRAD_HOST_DEVICE static float recovery_factor(float norm_n, float norm_y) {
    return norm_n / (norm_y + 1e-8f);
  }
};

}  // namespace slimgrad::transforms
