// slimgrad/backend/cpu/svd_projection.hpp — GaLore's SVD projector on the CPU backend
// (arXiv 2403.03507, algorithms.md §5.1, §8.4).
#pragma once

#include <cstdint>
#include <string>

#include "../../core/concepts.hpp"
#include "../../transforms/svd_projection.hpp"
#include "common.hpp"
#include "svd.hpp"

namespace slimgrad {

/// impl of transforms::SvdProjection on the CPU: the basis is recomputed from the current
/// gradient at k = 0, T, 2T, ... by an exact (BDCSVD) or randomized (range finder) SVD, with
/// canonical signs; forward is Sᵀ G (left) or G Pᵀ (right), inverse S N or N P.
/// State: r·projected_dim·4 bytes per tensor (the fp32 basis). One impl object serves many
/// tensors; its scratch (the randomized sketch, the previous basis of the last refresh) is
/// grown once to the largest tensor seen and is not per-tensor state; for the same reason one
/// impl object must not be used from two threads at once.
template <>
struct impl<transforms::SvdProjection, backend::cpu> {
  using Policy = transforms::SvdProjection;
  using State = cpu::BasisState;

  Policy::Options options;

  impl() : impl(Policy::Options{}) {}
  explicit impl(const Policy::Options& o) : options(o) { validate(o, "svd projection"); }

  /// Checks options shared with Grassmann; `who` names the transform in the message.
  static void validate(const Policy::Options& o, const char* who) {
    const std::string w(who);
    require(o.rank >= 1, w + ": rank must be at least 1, got " + std::to_string(o.rank));
    require(o.update_gap >= 1,
            w + ": update_gap must be at least 1, got " + std::to_string(o.update_gap));
    require(o.oversampling >= 0,
            w + ": oversampling must be non-negative, got " + std::to_string(o.oversampling));
    require(o.power_iterations >= 0, w + ": power_iterations must be non-negative, got " +
                                         std::to_string(o.power_iterations));
    require(
        o.method == transforms::SvdMethod::exact || o.method == transforms::SvdMethod::randomized,
        w + ": unknown SVD method");
    require(o.proj_type == ProjType::std_ || o.proj_type == ProjType::reverse_std ||
                o.proj_type == ProjType::left || o.proj_type == ProjType::right,
            w + ": unknown proj_type");
  }

  /// A fresh state for a gradient of shape `g`; the basis is computed by the first refresh().
  /// Throws unless g is non-empty and rank <= min(m, n).
  State init(Shape g, std::uint64_t tensor_id) const { return init_state(g, tensor_id, options); }

  /// init() with explicit options (shared with Grassmann, whose options map onto these).
  static State init_state(Shape g, std::uint64_t tensor_id, const Policy::Options& o) {
    require(g.rows > 0 && g.cols > 0, "svd projection: zero-size tensor (" +
                                          std::to_string(g.rows) + "x" + std::to_string(g.cols) +
                                          ")");
    const index_t small = g.rows < g.cols ? g.rows : g.cols;
    require(o.rank <= small, "svd projection: rank " + std::to_string(o.rank) +
                                 " exceeds min(m, n) = " + std::to_string(small) + " of a " +
                                 std::to_string(g.rows) + "x" + std::to_string(g.cols) + " tensor");
    State s;
    s.shape = g;
    s.side = side_for(g, o.proj_type);
    s.rank = o.rank;
    s.stream = tensor_id;
    return s;
  }

  /// Shape forward() writes: r×n (left) or m×r (right).
  Shape coeff_shape(Shape g) const {
    return Policy::coeff_shape(g, side_for(g, options.proj_type), options.rank);
  }
  /// Bytes of the stored basis: r·projected_dim·4.
  std::size_t state_bytes(Shape g) const {
    return Policy::state_bytes(g, side_for(g, options.proj_type), options.rank);
  }
  /// Every coefficient carries optimizer state (projections have no stored residual).
  HostView<float> tracked(HostView<float> coeffs) const { return coeffs; }
  HostView<const float> tracked(HostView<const float> coeffs) const { return coeffs; }

  /// Recomputes the basis when k % T == 0 (k counted before the increment), and always when
  /// the state has no basis yet. Returns true when the basis changed; false when no refresh was
  /// due or when the refresh failed and kept the previous basis (see State's status fields).
  bool refresh(State& s, HostView<const float> g, index_t k) { return refresh(s, g, k, {}); }

  /// As refresh(s, g, k), and writes C = S_newᵀ S_old (r×r) into `rotation` when it is
  /// non-empty: the identity when the basis did not change or had no predecessor. The
  /// optimizer uses C to carry its moments into the new basis (algorithms.md §2.3(a)).
  bool refresh(State& s, HostView<const float> g, index_t k, HostView<float> rotation) {
    check_refresh_args(s, g, k, rotation);
    if (s.ready() && !Policy::refresh_due(k, options.update_gap)) {
      if (!rotation.empty()) cpu::as_eigen(rotation).setIdentity();
      return false;
    }
    return refresh_now(s, g, k, rotation);
  }

  /// Recomputes the basis now, whatever the schedule (Grassmann's initialisation uses this).
  /// Arguments and result as refresh().
  bool refresh_now(State& s, HostView<const float> g, index_t k, HostView<float> rotation) {
    check_refresh_args(s, g, k, rotation);
    using transforms::RefreshFailure;
    using transforms::RefreshStatus;
    using transforms::SvdMethod;
    ++s.refresh_count;
    s.last_refresh_step = k;
    RefreshFailure failure = RefreshFailure::none;
    RefreshStatus status = RefreshStatus::ok;
    if (!cpu::all_finite(g)) {
      failure = RefreshFailure::non_finite_gradient;
    } else if (cpu::all_zero(g)) {
      // Every direction of a zero gradient is a singular vector (σ = 0): the SVD would return
      // whichever coordinate vectors its internals pick (Eigen's BDCSVD: the leading ones below
      // 16 columns, others from its deflation above), so the basis is fixed here, on both
      // backends, as the first r coordinate vectors. A success, not provisional: a later
      // gradient has nothing better to retry.
      cpu::identity_basis(projected_dim(s.shape, s.side), s.rank, u_);
    } else {
      failure = compute(s, g, k, options.method);
      if (failure != RefreshFailure::none && !s.ready()) {
        // No basis to keep: the other method is the fallback (exact ↔ randomized).
        const SvdMethod other =
            options.method == SvdMethod::exact ? SvdMethod::randomized : SvdMethod::exact;
        if (compute(s, g, k, other) == RefreshFailure::none)
          status = RefreshStatus::fallback_method;
      }
    }
    if (failure != RefreshFailure::none) {
      ++s.failure_count;
      if (status != RefreshStatus::fallback_method) {
        if (s.ready()) {
          s.last_refresh_status = RefreshStatus::kept_previous;
          s.last_failure = failure;
          if (!rotation.empty()) cpu::as_eigen(rotation).setIdentity();
          return false;
        }
        cpu::identity_basis(projected_dim(s.shape, s.side), s.rank, u_);
        status = RefreshStatus::identity_basis;
      }
    }
    s.last_refresh_status = status;
    s.last_failure = failure;
    s.provisional = status == RefreshStatus::identity_basis;
    install(s, u_, rotation);
    return true;
  }

  /// coeffs = Sᵀ G (left, r×n) or G Pᵀ (right, m×r).
  void forward(const State& s, HostView<const float> g, HostView<float> coeffs) {
    check_ready(s);
    cpu::require_shape(g, s.shape, "svd projection gradient");
    cpu::require_shape(coeffs, Policy::coeff_shape(s.shape, s.side, s.rank),
                       "svd projection coefficients");
    if (s.side == Side::left)
      cpu::as_eigen(coeffs).noalias() = s.basis.transpose() * cpu::as_eigen(g);
    else
      cpu::as_eigen(coeffs).noalias() = cpu::as_eigen(g) * s.basis.transpose();
  }

  /// out = S N (left) or N P (right): the back-projection, m×n, without GaLore's scale α.
  void inverse(const State& s, HostView<const float> coeffs, HostView<float> out) {
    check_ready(s);
    cpu::require_shape(coeffs, Policy::coeff_shape(s.shape, s.side, s.rank),
                       "svd projection coefficients");
    cpu::require_shape(out, s.shape, "svd projection output");
    if (s.side == Side::left)
      cpu::as_eigen(out).noalias() = s.basis * cpu::as_eigen(coeffs);
    else
      cpu::as_eigen(out).noalias() = cpu::as_eigen(coeffs) * s.basis;
  }

  /// The basis before the last refresh that changed it (stored layout, as State::basis), valid
  /// until the next refresh through this impl object; empty when that refresh had no
  /// predecessor. Transient: S_old is not per-tensor state (algorithms.md §2.3(a)).
  HostView<const float> previous_basis() const { return cpu::as_view(previous_); }

  /// Frees the scratch (sketch, previous basis); the next refresh grows it again.
  void release_workspace() {
    workspace_ = cpu::SvdWorkspace{};
    u_ = cpu::ColMatrix{};
    previous_ = cpu::RowMatrix{};
  }

  /// Internal to Grassmann (not an API): the buffer previous_basis() shows.
  cpu::RowMatrix& previous_buffer() { return previous_; }

  /// Validates refresh()'s arguments before anything changes.
  static void check_refresh_args(const State& s, HostView<const float> g, index_t k,
                                 HostView<float> rotation) {
    require(s.rank >= 1, "svd projection: state was not created by init()");
    cpu::require_shape(g, s.shape, "svd projection gradient");
    require(k >= 0, "svd projection: negative step " + std::to_string(k));
    if (!rotation.empty()) cpu::require_shape(rotation, {s.rank, s.rank}, "rotation matrix C");
  }

 private:
  cpu::SvdWorkspace workspace_;
  cpu::ColMatrix u_;         // the new basis as dim0×r, before it is stored
  cpu::RowMatrix previous_;  // S_old of the last basis change (transient)

  static void check_ready(const State& s) {
    require(s.ready(), "svd projection: refresh() must run (at step 0) before forward/inverse");
  }

  transforms::RefreshFailure compute(const State& s, HostView<const float> g, index_t k,
                                     transforms::SvdMethod method) {
    if (method == transforms::SvdMethod::exact)
      return cpu::exact_top_singular_vectors(g, s.side, s.rank, u_);
    const random::Key key{options.seed, s.stream,
                          static_cast<std::uint32_t>(k / options.update_gap)};
    const auto gm = cpu::as_eigen(g);
    if (s.side == Side::left)
      return cpu::randomized_top_singular_vectors(gm, s.rank, options.oversampling,
                                                  options.power_iterations, key, u_, workspace_);
    return cpu::randomized_top_singular_vectors(gm.transpose(), s.rank, options.oversampling,
                                                options.power_iterations, key, u_, workspace_);
  }

  // Moves the old basis to previous_ (buffers swap, no copy) and stores u as the new one.
  void install(State& s, const cpu::ColMatrix& u, HostView<float> rotation) {
    const bool had_basis = s.ready();
    previous_.swap(s.basis);
    cpu::store_basis(u, s.side, s.basis);
    if (rotation.empty()) return;
    if (had_basis)
      cpu::basis_overlap(s.basis, previous_, s.side, rotation);
    else
      cpu::as_eigen(rotation).setIdentity();
  }
};

static_assert(transform_policy<transforms::SvdProjection, backend::cpu>);

}  // namespace slimgrad
