// slimgrad/backend/cpu/grassmann.hpp — SubTrack-Grad Grassmannian subspace tracking and the
// SubTrack++ extras (moment rotation, recovery scaling) on the CPU backend
// (arXiv 2502.01586, algorithms.md §2.2, §2.3, §9 item 5).
#pragma once

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../../core/concepts.hpp"
#include "../../transforms/grassmann.hpp"
#include "common.hpp"
#include "svd.hpp"
#include "svd_projection.hpp"

namespace slimgrad {

namespace cpu {

/// SubTrack++ projection-aware moment rotation at a basis switch (algorithms.md §2.3(a), after
/// LDAdam), in place: with C = S_newᵀ S_old (r×r, from refresh()'s rotation output),
///   left  (M, V r×n):  M ← C M,    V ← b2·|(C⊙C)(V/b2 − (M/b1)²) + (C M/b1)²|
///   right (M, V m×r):  M ← M Cᵀ,   V ← b2·|(V/b2 − (M/b1)²)(C⊙C)ᵀ + (M Cᵀ/b1)²|
/// b1 = b2 = 1 (the defaults) is the raw-moment form of §2.3, which this library uses: M and V
/// are rotated as stored. LDAdam's published form passes the bias-corrected m̂ = M/b1,
/// v̂ = V/b2 and returns to the raw scale; give b1 = 1 − β1^t and b2 = 1 − β2^t (t = steps
/// taken) for it. M's rotation is the same in both forms (it is linear); V differs only in the
/// weight of the M² terms, and early in training (b2 ≪ b1²) the raw form underestimates the
/// variance part V − M² that the absolute value then rescues. Not the reference code's (1−β2)
/// factor (§9 item 5(c)). Cost: 4·r²·max(m,n) flops; scratch of 4 blocks of r×256 floats,
/// allocated per call (a switch happens once per T steps).
inline void rotate_moments(Side side, HostView<const float> c, HostView<float> m, HostView<float> v,
                           float bias1 = 1.0f, float bias2 = 1.0f) {
  using G = transforms::Grassmann;
  require(c.rows == c.cols && c.rows >= 1, "rotate_moments: C must be square (r x r)");
  const index_t r = c.rows;
  require_shape(c, {r, r}, "rotate_moments C");
  const Shape ms = side == Side::left ? Shape{r, m.cols} : Shape{m.rows, r};
  require_shape(m, ms, "rotate_moments first moment M");
  require_shape(v, ms, "rotate_moments second moment V");
  require(m.rows > 0 && m.cols > 0, "rotate_moments: empty moments");
  require(bias1 > 0.0f && bias1 <= 1.0f && bias2 > 0.0f && bias2 <= 1.0f,
          "rotate_moments: bias corrections must lie in (0, 1]");
  const RowMatrix cm = as_eigen(c);
  const RowMatrix cc = cm.cwiseProduct(cm);
  constexpr index_t block = 256;
  RowMatrix d, rm, rd;
  const index_t channels = side == Side::left ? m.cols : m.rows;
  for (index_t c0 = 0; c0 < channels; c0 += block) {
    const index_t bw = std::min(block, channels - c0);
    auto mb = side == Side::left ? m.block(0, c0, r, bw) : m.block(c0, 0, bw, r);
    auto vb = side == Side::left ? v.block(0, c0, r, bw) : v.block(c0, 0, bw, r);
    auto em = as_eigen(mb);
    auto ev = as_eigen(vb);
    d.resize(em.rows(), em.cols());
    for (index_t i = 0; i < em.rows(); ++i)
      for (index_t j = 0; j < em.cols(); ++j)
        d(i, j) = G::variance_term(em(i, j), ev(i, j), bias1, bias2);
    if (side == Side::left) {
      rm.noalias() = cm * em;
      rd.noalias() = cc * d;
    } else {
      rm.noalias() = em * cm.transpose();
      rd.noalias() = d * cc.transpose();
    }
    for (index_t i = 0; i < em.rows(); ++i)
      for (index_t j = 0; j < em.cols(); ++j) {
        em(i, j) = rm(i, j);
        ev(i, j) = G::rotated_second_moment(rd(i, j), rm(i, j), bias1, bias2);
      }
  }
}

/// SubTrack++ recovery scaling (algorithms.md §2.3(b), Fira): Λ = (G − back(Y)) ⊙ φ, where
/// Y = forward(G) under `basis` (m×r on the left, r×n on the right, as State::basis), N is the
/// normalised low-rank update (same shape as Y), and φ is per channel of the non-projected
/// dimension: φ_j = ‖N[:, j]‖ / (‖Y[:, j]‖ + 1e-8) for each column (left), φ_i over rows (right).
/// The residual is G − S SᵀG without GaLore's α (Fira's form, not the reference code's
/// G − α·S SᵀG, §9 item 5(d)). `out` (m×n) may be `g` itself. `scratch` is caller-owned, 2×c
/// with c = n (left) or m (right); on return its row 0 holds φ. No allocation.
/// The norm-growth limiter (§0.3) is the optimizer's, not applied here.
inline void recovery_residual(Side side, HostView<const float> basis, HostView<const float> g,
                              HostView<const float> y, HostView<const float> n, HostView<float> out,
                              HostView<float> scratch) {
  using G = transforms::Grassmann;
  const index_t rows = g.rows, cols = g.cols;
  require(rows > 0 && cols > 0, "recovery_residual: empty gradient");
  const index_t r = side == Side::left ? basis.cols : basis.rows;
  require_shape(basis, side == Side::left ? Shape{rows, r} : Shape{r, cols},
                "recovery_residual basis");
  const Shape ys = projected_shape(g.shape(), side, r);
  require_shape(y, ys, "recovery_residual coefficients Y");
  require_shape(n, ys, "recovery_residual normalised update N");
  require_shape(out, g.shape(), "recovery_residual output");
  const index_t channels = side == Side::left ? cols : rows;
  require_shape(scratch, {2, channels}, "recovery_residual scratch");
  require(out.data != y.data && out.data != n.data && out.data != basis.data,
          "recovery_residual: out must not alias Y, N or the basis");

  float* phi = scratch.row(0);
  float* ynorm = scratch.row(1);
  if (side == Side::left) {
    std::fill(phi, phi + channels, 0.0f);
    std::fill(ynorm, ynorm + channels, 0.0f);
    for (index_t k = 0; k < r; ++k) {
      const float* nr = n.row(k);
      const float* yr = y.row(k);
      for (index_t j = 0; j < channels; ++j) {
        phi[j] += nr[j] * nr[j];
        ynorm[j] += yr[j] * yr[j];
      }
    }
    for (index_t j = 0; j < channels; ++j)
      phi[j] = G::recovery_factor(std::sqrt(phi[j]), std::sqrt(ynorm[j]));
  } else {
    for (index_t i = 0; i < channels; ++i) {
      const float* nr = n.row(i);
      const float* yr = y.row(i);
      float sn = 0.0f, sy = 0.0f;
      for (index_t k = 0; k < r; ++k) {
        sn += nr[k] * nr[k];
        sy += yr[k] * yr[k];
      }
      phi[i] = G::recovery_factor(std::sqrt(sn), std::sqrt(sy));
    }
  }

  auto eo = as_eigen(out);
  if (out.data != g.data) eo = as_eigen(g);
  if (side == Side::left)
    eo.noalias() -= as_eigen(basis) * as_eigen(y);
  else
    eo.noalias() -= as_eigen(y) * as_eigen(basis);
  parallel_for(rows, cols, [&](index_t i) {
    float* row = out.row(i);
    if (side == Side::left) {
      for (index_t j = 0; j < cols; ++j)
        row[j] *= phi[j];
    } else {
      const float f = phi[i];
      for (index_t j = 0; j < cols; ++j)
        row[j] *= f;
    }
  });
}

}  // namespace cpu

/// impl of transforms::Grassmann on the CPU. Forward, inverse and the initial SVD are
/// SvdProjection's (one shared implementation); tracking is the geodesic step of
/// algorithms.md §2.2 computed without an m×n temporary:
///   A = SᵀĜ (r×dim1), W = ĜAᵀ (dim0×r), B = (I − SSᵀ)W, applied twice (= R Aᵀ with
///   R = Ĝ − S A; the second pass restores B ⊥ S to round-off, so u ⊥ S and the step stays on
///   the manifold), v = top eigenvector of BᵀB (r×r, in double), σ = 2‖Bv‖, u = −Bv/‖Bv‖,
///   θ = ησ, S ← S + (S v (cos θ − 1) − u sin θ) vᵀ, then an optional thin QR.
/// Cost per tracking step: 2 GEMMs of m·n·r (4mnr flops), plus O(dim0·r²); GaLore's refresh
/// is O(mn·min(m,n)). When ‖Bv‖ is below the round-off floor of W (4·ε·√dim1·‖W‖_F) the
/// gradient lies in span(S) to working precision: the direction u would be noise, so the
/// basis is left unchanged (angle 0). State: r·projected_dim·4 bytes (the basis). Scratch
/// (A, W and r×r matrices) is grown once to the largest tensor and shared by all tensors.
template <>
struct impl<transforms::Grassmann, backend::cpu> {
  using Policy = transforms::Grassmann;
  using Svd = impl<transforms::SvdProjection, backend::cpu>;

  /// SvdProjection's state plus the tracking bookkeeping (not counted in state_bytes()).
  struct State : cpu::BasisState {
    std::uint64_t tracking_count = 0;  ///< tracking steps that rotated the basis
    double last_angle = 0.0;           ///< θ = ησ of the last tracking step (radians; 0: none)
    double last_sigma = 0.0;           ///< σ = ‖∇F‖₂ = 2‖Bv‖ of the last tracking step
  };

  Policy::Options options;

  impl() : impl(Policy::Options{}) {}
  explicit impl(const Policy::Options& o) : options(o), svd_(Policy::initial_svd(o)) {
    require(std::isfinite(o.eta) && o.eta >= 0.0,
            "grassmann: eta must be finite and non-negative, got " + std::to_string(o.eta));
    require(o.reorth_every >= 0,
            "grassmann: reorth_every must be non-negative, got " + std::to_string(o.reorth_every));
  }

  /// A fresh state (no basis yet); throws unless g is non-empty and rank <= min(m, n).
  State init(Shape g, std::uint64_t tensor_id) const {
    State s;
    static_cast<cpu::BasisState&>(s) = Svd::init_state(g, tensor_id, svd_.options);
    return s;
  }
  /// Shape forward() writes: r×n (left) or m×r (right), as SvdProjection.
  Shape coeff_shape(Shape g) const { return svd_.coeff_shape(g); }
  /// Bytes of the stored basis: r·projected_dim·4.
  std::size_t state_bytes(Shape g) const { return svd_.state_bytes(g); }
  /// Every coefficient carries optimizer state.
  HostView<float> tracked(HostView<float> coeffs) const { return coeffs; }
  HostView<const float> tracked(HostView<const float> coeffs) const { return coeffs; }

  /// k = 0 or no basis yet: the top-r SVD (SvdProjection's refresh, with its fallbacks).
  /// k % T == 0, k > 0: one geodesic tracking step on `g` (or the SVD again while the basis is
  /// the identity fallback of a failed first refresh). Returns true when the basis changed.
  bool refresh(State& s, HostView<const float> g, index_t k) { return refresh(s, g, k, {}); }

  /// As refresh(s, g, k), and writes C = S_newᵀ S_old (r×r) into `rotation` when non-empty
  /// (the identity when the basis did not change). previous_basis() shows S_old afterwards.
  bool refresh(State& s, HostView<const float> g, index_t k, HostView<float> rotation) {
    Svd::check_refresh_args(s, g, k, rotation);
    if (!s.ready() || k == 0) return svd_.refresh_now(s, g, k, rotation);
    if (!Policy::tracking_due(k, options.update_gap)) {
      if (!rotation.empty()) cpu::as_eigen(rotation).setIdentity();
      return false;
    }
    if (s.provisional) return svd_.refresh_now(s, g, k, rotation);  // retry the initial SVD
    return track_now(s, g, k, rotation);
  }

  /// One geodesic tracking step now, whatever the schedule (benchmarks, tests). Requires a
  /// basis. On a non-finite gradient or result the basis is kept and the status says so.
  bool track_now(State& s, HostView<const float> g, index_t k, HostView<float> rotation) {
    using transforms::RefreshFailure;
    using transforms::RefreshStatus;
    Svd::check_refresh_args(s, g, k, rotation);
    require(s.ready(), "grassmann: tracking needs a basis; refresh() at step 0 first");
    ++s.refresh_count;
    s.last_refresh_step = k;
    cpu::RowMatrix& old = svd_.previous_buffer();
    old = s.basis;  // S_old, transient (a copy into grown-once scratch)
    RefreshFailure failure = RefreshFailure::none;
    if (!cpu::all_finite(g)) {
      failure = RefreshFailure::non_finite_gradient;
    } else {
      const auto gm = cpu::as_eigen(g);
      failure = s.side == Side::left ? step(gm, s.basis, s)
                                     : step(gm.transpose(), s.basis.transpose(), s);
    }
    if (failure != RefreshFailure::none) {
      s.basis = old;  // a failed step may have written nothing, but never leave a partial one
      ++s.failure_count;
      s.last_refresh_status = RefreshStatus::kept_previous;
      s.last_failure = failure;
      s.last_angle = 0.0;
      if (!rotation.empty()) cpu::as_eigen(rotation).setIdentity();
      return false;
    }
    s.last_refresh_status = RefreshStatus::ok;
    s.last_failure = RefreshFailure::none;
    const bool moved = s.last_angle != 0.0;
    if (moved) {
      ++s.tracking_count;
      if (options.reorth_every > 0 &&
          s.tracking_count % static_cast<std::uint64_t>(options.reorth_every) == 0)
        reorthonormalize(s);
    }
    if (!rotation.empty()) {
      if (moved)
        cpu::basis_overlap(s.basis, old, s.side, rotation);
      else
        cpu::as_eigen(rotation).setIdentity();
    }
    return moved;
  }

  /// coeffs = Sᵀ G (left) or G Pᵀ (right): SvdProjection's forward on the tracked basis.
  void forward(const State& s, HostView<const float> g, HostView<float> coeffs) {
    svd_.forward(s, g, coeffs);
  }
  /// out = S N (left) or N P (right), without SubTrack's scale α (the optimizer applies it).
  void inverse(const State& s, HostView<const float> coeffs, HostView<float> out) {
    svd_.inverse(s, coeffs, out);
  }

  /// S_old of the last refresh or tracking step through this impl (stored layout); transient.
  HostView<const float> previous_basis() const { return svd_.previous_basis(); }

  /// SubTrack++ recovery residual Λ for `s`'s basis (see cpu::recovery_residual), using grown-
  /// once scratch; φ is available afterwards from recovery_factors().
  void recovery_residual(const State& s, HostView<const float> g, HostView<const float> y,
                         HostView<const float> n, HostView<float> out) {
    require(s.ready(), "grassmann: recovery_residual needs a basis");
    cpu::require_shape(g, s.shape, "recovery_residual gradient");
    const index_t channels = s.side == Side::left ? s.shape.cols : s.shape.rows;
    if (phi_.rows() != 2 || phi_.cols() < channels) phi_.resize(2, channels);
    cpu::recovery_residual(s.side, s.basis_view(), g, y, n, out,
                           HostView<float>(phi_.data(), 2, channels, phi_.cols()));
    phi_len_ = channels;
  }
  /// φ of the last recovery_residual() call (1×channels).
  HostView<const float> recovery_factors() const {
    return HostView<const float>(phi_.data(), phi_len_ > 0 ? 1 : 0, phi_len_, phi_.cols());
  }

  /// Applies S ← S + (S v (cos θ − 1) − u sin θ) vᵀ to a stored basis (m×r left, r×n right)
  /// with unit u (dim0, ⊥ S) and v (r). The rank-1 geodesic of §2.2, exposed for tests.
  static void apply_geodesic(cpu::RowMatrix& basis, Side side, const Eigen::VectorXf& u,
                             const Eigen::VectorXf& v, double theta) {
    Eigen::VectorXf sv, w;
    if (side == Side::left)
      geodesic_update(basis, u, v, theta, sv, w);
    else {
      auto st = basis.transpose();
      geodesic_update(st, u, v, theta, sv, w);
    }
  }

 private:
  Svd svd_;
  cpu::ColMatrix a_, w_, q_;
  Eigen::MatrixXf sw_, btb_;
  Eigen::MatrixXd btb_d_;
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig_;
  Eigen::VectorXf v_, bv_, sv_, wvec_;
  Eigen::HouseholderQR<cpu::ColMatrix> qr_;
  cpu::ColMatrix qtmp_;
  cpu::RowMatrix phi_;
  index_t phi_len_ = 0;

  template <class SMat>
  static void geodesic_update(SMat&& s, const Eigen::VectorXf& u, const Eigen::VectorXf& v,
                              double theta, Eigen::VectorXf& sv, Eigen::VectorXf& w) {
    const double half = std::sin(0.5 * theta);
    const double cos_minus_one = -2.0 * half * half;
    const double sin_theta = std::sin(theta);
    sv.noalias() = s * v;
    w.resize(sv.size());
    for (index_t i = 0; i < sv.size(); ++i)
      w[i] = Policy::geodesic_row(sv[i], u[i], cos_minus_one, sin_theta);
    s.noalias() += w * v.transpose();
  }

  // One tracking step on Ĝ (dim0×dim1) and S (dim0×r; a transposed view of P on the right).
  template <class GHat, class SMat>
  transforms::RefreshFailure step(const GHat& ghat, SMat&& s, State& st) {
    using transforms::RefreshFailure;
    const index_t r = s.cols(), dim1 = ghat.cols();
    a_.resize(r, dim1);
    a_.noalias() = s.transpose() * ghat;  // A = SᵀĜ
    w_.resize(s.rows(), r);
    w_.noalias() = ghat * a_.transpose();  // W = ĜAᵀ
    const double wnorm = static_cast<double>(w_.norm());
    for (int pass = 0; pass < 2; ++pass) {  // B = (I − SSᵀ)W, twice ("twice is enough")
      sw_.noalias() = s.transpose() * w_;
      w_.noalias() -= s * sw_;
    }
    btb_.noalias() = w_.transpose() * w_;
    if (!std::isfinite(wnorm) || !cpu::all_finite_dense(btb_))
      return RefreshFailure::non_finite_result;
    btb_d_ = btb_.cast<double>();
    eig_.compute(btb_d_, Eigen::ComputeEigenvectors);
    if (eig_.info() != Eigen::Success) return RefreshFailure::no_convergence;
    v_ = eig_.eigenvectors().col(r - 1).cast<float>();
    bv_.noalias() = w_ * v_;
    const double nb = static_cast<double>(bv_.norm());
    if (!std::isfinite(nb)) return RefreshFailure::non_finite_result;
    const double floor = 4.0 * static_cast<double>(std::numeric_limits<float>::epsilon()) *
                         std::sqrt(static_cast<double>(dim1)) * wnorm;
    st.last_sigma = 2.0 * nb;
    if (!(nb > floor) || options.eta == 0.0) {  // B = 0 (to working precision): no rotation
      st.last_angle = 0.0;
      return RefreshFailure::none;
    }
    const double theta = options.eta * st.last_sigma;
    bv_ *= static_cast<float>(-1.0 / nb);  // u = −Bv/‖Bv‖
    geodesic_update(s, bv_, v_, theta, sv_, wvec_);
    if (!cpu::all_finite_dense(st.basis)) return RefreshFailure::non_finite_result;
    st.last_angle = theta;
    return RefreshFailure::none;
  }

  void reorthonormalize(State& s) {
    if (s.side == Side::left)
      q_ = s.basis;
    else
      q_ = s.basis.transpose();
    cpu::orthonormalize_columns(q_, qr_, qtmp_);
    cpu::store_basis(q_, s.side, s.basis);
  }
};

static_assert(transform_policy<transforms::Grassmann, backend::cpu>);

}  // namespace slimgrad
