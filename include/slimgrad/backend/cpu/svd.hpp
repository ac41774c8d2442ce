// slimgrad/backend/cpu/svd.hpp — the SVD machinery shared by SvdProjection (GaLore) and
// Grassmann (SubTrack): the exact top-r singular vectors (Eigen BDCSVD), the randomized range
// finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), the canonical sign rule and the
// orthonormalisation used by both.
//
// Everything here computes "the top-r left singular vectors of Ĝ", where Ĝ = G for a
// left-side basis and Ĝ = Gᵀ for a right-side basis (algorithms.md §2.1), so that a basis is
// always a dim0×r column-orthonormal matrix S; a right-side basis is stored as P = Sᵀ (r×n).
#pragma once

#include <Eigen/Dense>
#include <Eigen/SVD>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../../core/orientation.hpp"
#include "../../core/philox.hpp"
#include "../../transforms/svd_projection.hpp"
#include "common.hpp"

namespace slimgrad::cpu {

using ColMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

namespace detail {
/// Test hook, not an API: while positive, each SVD routine below reports NoConvergence without
/// computing and decrements it. It lets the tests reach the fallback paths that a real
/// non-convergence (rare, input-dependent) would take.
inline thread_local unsigned svd_injected_failures = 0;

inline bool take_injected_failure() {
  if (svd_injected_failures == 0) return false;
  --svd_injected_failures;
  return true;
}
}  // namespace detail

/// True when every element of a dense Eigen matrix is finite (common.hpp's all_finite on its
/// storage; Eigen's allFinite() evaluates x − x for every element and does not stop early).
template <class Derived>
bool all_finite_dense(const Eigen::PlainObjectBase<Derived>& m) {
  return all_finite(HostView<const float>(m.data(), 1, m.size(), m.size()));
}

/// Applies transforms::canonical_sign_flip to every column of `u` (column-major, contiguous
/// columns) and flips the matching column of `partner` with it when `partner` is given (the
/// other side of an SVD: the pair (u_i, v_i) flips together; the basis side decides).
inline void canonicalize_signs(ColMatrix& u, ColMatrix* partner = nullptr) {
  for (index_t j = 0; j < u.cols(); ++j) {
    if (transforms::canonical_sign_flip(u.col(j).data(), u.rows(), 1)) {
      u.col(j) = -u.col(j);
      if (partner != nullptr) partner->col(j) = -partner->col(j);
    }
  }
}

/// Replaces the columns of `y` (rows ≥ cols) by an orthonormal basis of their span: the Q of a
/// Householder thin QR, with each column's sign chosen so that R has a non-negative diagonal.
/// With that sign choice Q is unique for a full-rank y (it is what Gram–Schmidt would produce)
/// and Q ≈ y when y is already nearly orthonormal, which is what re-orthonormalising a tracked
/// basis needs: the columns keep their identity, so the optimizer's moments stay meaningful.
/// `qr` and `q` are caller-owned scratch, reused across calls.
inline void orthonormalize_columns(ColMatrix& y, Eigen::HouseholderQR<ColMatrix>& qr,
                                   ColMatrix& q) {
  qr.compute(y);
  q.setIdentity(y.rows(), y.cols());
  qr.householderQ().applyThisOnTheLeft(q);
  const auto& packed = qr.matrixQR();
  for (index_t j = 0; j < y.cols(); ++j)
    if (packed(j, j) < 0.0f) q.col(j) = -q.col(j);
  y = q;  // a copy, not a swap: y keeps its allocation across calls
}

/// Scratch of the randomized range finder and of the tracking step, grown once to the largest
/// shape seen and reused (no allocation in steady state beyond Eigen's internal GEMM and QR
/// workspaces).
struct SvdWorkspace {
  RowMatrix omega;  ///< Ω, dim1×ℓ, row-major so that Philox's element order is (i·ℓ + j)
  ColMatrix y;      ///< dim0×ℓ: the range sketch, then its orthonormal basis Q
  ColMatrix z;      ///< dim1×ℓ: the co-range sketch; at the end Bᵀ = ĜᵀQ
  ColMatrix q;      ///< QR output scratch (the larger of dim0×ℓ and dim1×ℓ)
  ColMatrix r;      ///< ℓ×ℓ triangle of the final QR
  Eigen::HouseholderQR<ColMatrix> qr;
  /// Bytes held by this workspace now (transient memory, not per-tensor state).
  std::size_t bytes() const {
    const auto n = static_cast<std::size_t>(omega.size() + y.size() + z.size() + q.size() +
                                            r.size() + qr.matrixQR().size() + qr.hCoeffs().size());
    return n * sizeof(float);
  }
};

/// The per-tensor state of a projection whose basis comes from an SVD (SvdProjection) or is
/// tracked from one (Grassmann): shape, side, the fp32 basis and the refresh bookkeeping.
/// Bytes of state: basis.size()·4 (r·projected_dim·4); the bookkeeping (about 64 bytes) is
/// not counted in state_bytes().
struct BasisState {
  Shape shape;
  Side side = Side::right;
  index_t rank = 0;
  std::uint64_t stream = 0;  ///< the tensor id: the Philox stream of the randomized test matrix
  /// m×r (left: S) or r×n (right: P = Sᵀ, as GaLore stores Vh[:r, :]); empty before the first
  /// refresh.
  RowMatrix basis;
  std::uint64_t refresh_count = 0;  ///< refreshes that ran (were due), failed ones included
  std::uint64_t failure_count = 0;  ///< refreshes whose configured computation failed
  transforms::RefreshStatus last_refresh_status = transforms::RefreshStatus::none;
  transforms::RefreshFailure last_failure = transforms::RefreshFailure::none;
  index_t last_refresh_step = -1;  ///< k of the last refresh that ran
  /// True while the basis is the identity fallback of a failed first refresh: Grassmann then
  /// runs the SVD again at its next due step instead of tracking from coordinate vectors.
  /// Checkpoints keep it (NAME/provisional), so a resumed run retries as the straight one.
  bool provisional = false;

  /// True once a basis exists (forward/inverse may run).
  bool ready() const { return basis.size() > 0; }
  /// The stored basis as a row-major view.
  HostView<const float> basis_view() const { return as_view(basis); }
};

/// C = S_newᵀ S_old (r×r) for two stored bases of the same side: on the left S_newᵀ S_old,
/// on the right P_new P_oldᵀ. This is the matrix that carries coefficients of the old basis
/// into the new one (LDAdam/SubTrack++ moment rotation, algorithms.md §2.3(a)).
inline void basis_overlap(const RowMatrix& s_new, const RowMatrix& s_old, Side side,
                          HostView<float> c) {
  if (side == Side::left)
    as_eigen(c).noalias() = s_new.transpose() * s_old;
  else
    as_eigen(c).noalias() = s_new * s_old.transpose();
}

/// Exact top-r left singular vectors of Ĝ (Ĝ = G on the left, Gᵀ on the right) into `u`
/// (dim0×r), canonical signs. Eigen's BDCSVD (divide and conquer on the bidiagonal form; it runs
/// one-sided Jacobi itself below 16 columns) on the fp32 gradient, computing only the side that
/// becomes the basis. Transient memory: Eigen copies G twice (input conversion and scaling)
/// and holds the thin singular vectors of that side, about 2mn + dim0·min(m,n) floats.
/// Returns RefreshFailure::none on success; `u` is unspecified otherwise.
inline transforms::RefreshFailure exact_top_singular_vectors(HostView<const float> g, Side side,
                                                             index_t rank, ColMatrix& u) {
  using transforms::RefreshFailure;
  if (detail::take_injected_failure()) return RefreshFailure::no_convergence;
  const unsigned options = side == Side::left ? Eigen::ComputeThinU : Eigen::ComputeThinV;
  Eigen::BDCSVD<ColMatrix> svd(as_eigen(g), options);
  if (svd.info() == Eigen::InvalidInput) return RefreshFailure::non_finite_gradient;
  if (svd.info() != Eigen::Success) return RefreshFailure::no_convergence;
  u = side == Side::left ? svd.matrixU().leftCols(rank) : svd.matrixV().leftCols(rank);
  if (!all_finite_dense(u)) return RefreshFailure::non_finite_result;
  canonicalize_signs(u);
  return RefreshFailure::none;
}

/// The power of two 2^e by which the randomized SVD scales its products with Ĝ, from Ĝ's largest
/// |x| (as the CUDA backend's refresh_exponent): a multiple of 20, −20·floor((⌊log2 amax⌋ +
/// 10)/20), so 0 (no scaling: the numbers of before) for amax in [2^-10, 2^10). Without it the
/// Householder QR of the sketch of a tiny gradient (2^-100: squared norms underflow) returns
/// another subspace, and that of a huge one (from about 2^62) overflows; with it a gradient
/// scaled by 2^(20j) is refreshed from the unscaled gradient's very numbers (exact scaling).
inline int refresh_exponent(float amax) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return 0;
  int e = 0;
  std::frexp(amax, &e);  // amax = f·2^e, f in [1/2, 1): ⌊log2 amax⌋ = e − 1
  const int t = e - 1 + 10;
  const int q = t >= 0 ? t / 20 : -((-t + 19) / 20);  // floor(t / 20)
  return -20 * q;
}

/// Randomized top-r left singular vectors of `ghat` (dim0×dim1; an Eigen expression such as a
/// map of G or its transpose) into `u` (dim0×r), canonical signs (HMT 2011, Alg. 4.4 with
/// Alg. 5.1): Ω (dim1×ℓ, ℓ = min(r + p, min(m, n))) ~ N(0, 1) from Philox keyed by `key`;
/// Y = ĜΩ; q times: orthonormalise Y, Z = ĜᵀY, orthonormalise Z, Y = ĜZ; Q = orth(Y);
/// Bᵀ = ĜᵀQ = Q₂R; R = U_R Σ V_Rᵀ (exact SVD of ℓ×ℓ); U = Q V_R[:, :r] (the left singular
/// vectors of B = QᵀĜ = Rᵀ Q₂ᵀ are V_R). The QR between products keeps the sketch from
/// collapsing onto the top singular vector in fp32. Cost: (2q + 2) GEMMs of m·n·ℓ, plus QRs of
/// dim·ℓ². Transient memory: the workspace, about (2·dim1 + 2·dim0)·ℓ floats.
template <class GHat>
transforms::RefreshFailure randomized_top_singular_vectors(const GHat& ghat, index_t rank,
                                                           index_t oversampling,
                                                           index_t power_iterations,
                                                           const random::Key& key, ColMatrix& u,
                                                           SvdWorkspace& ws) {
  using transforms::RefreshFailure;
  if (detail::take_injected_failure()) return RefreshFailure::no_convergence;
  const index_t dim0 = ghat.rows(), dim1 = ghat.cols();
  const index_t ell = transforms::SvdProjection::sketch_width({dim0, dim1}, rank, oversampling);

  const int e = dim0 * dim1 > 0 ? refresh_exponent(ghat.cwiseAbs().maxCoeff()) : 0;
  auto scaled = [e](ColMatrix& x) {  // x ← x·2^e, exact
    if (e != 0) x = x.unaryExpr([e](float v) { return std::ldexp(v, e); });
  };

  ws.omega.resize(dim1, ell);
  random::fill_gaussian(as_view(ws.omega), key, 1.0);
  ws.y.resize(dim0, ell);
  ws.y.noalias() = ghat * ws.omega;
  scaled(ws.y);
  ws.z.resize(dim1, ell);
  for (index_t it = 0; it < power_iterations; ++it) {
    orthonormalize_columns(ws.y, ws.qr, ws.q);
    ws.z.noalias() = ghat.transpose() * ws.y;
    scaled(ws.z);
    orthonormalize_columns(ws.z, ws.qr, ws.q);
    ws.y.noalias() = ghat * ws.z;
    scaled(ws.y);
  }
  orthonormalize_columns(ws.y, ws.qr, ws.q);
  ws.z.noalias() = ghat.transpose() * ws.y;  // Bᵀ
  scaled(ws.z);
  if (!all_finite_dense(ws.z)) return RefreshFailure::non_finite_result;
  ws.qr.compute(ws.z);
  ws.r = ws.qr.matrixQR().topRows(ell).template triangularView<Eigen::Upper>();
  Eigen::BDCSVD<ColMatrix> small(ws.r, Eigen::ComputeThinV);
  if (small.info() == Eigen::InvalidInput) return RefreshFailure::non_finite_result;
  if (small.info() != Eigen::Success) return RefreshFailure::no_convergence;
  u.resize(dim0, rank);
  u.noalias() = ws.y * small.matrixV().leftCols(rank);
  if (!all_finite_dense(u)) return RefreshFailure::non_finite_result;
  canonicalize_signs(u);
  return RefreshFailure::none;
}

/// The first r coordinate vectors (dim0×r): the documented last-resort basis when the first
/// refresh cannot compute one (non-finite gradient, or both SVD methods failed). Orthonormal and
/// finite, so training continues (as plain projected SGD/Adam on the leading coordinates) until
/// the next refresh replaces it. Also the basis of a zero gradient, as a success (every
/// direction is then a singular vector; both backends pick these).
inline void identity_basis(index_t dim0, index_t rank, ColMatrix& u) {
  u.setIdentity(dim0, rank);
}

/// Writes a dim0×r column-orthonormal S into the stored basis: S itself (m×r) on the left,
/// P = Sᵀ (r×n) on the right.
inline void store_basis(const ColMatrix& s, Side side, RowMatrix& basis) {
  if (side == Side::left)
    basis = s;
  else
    basis = s.transpose();
}

/// ‖SᵀS − I‖_F of a stored basis (m×r on the left, r×n on the right), in double.
inline double orthonormality_error(const RowMatrix& basis, Side side) {
  const Eigen::MatrixXd s = side == Side::left ? Eigen::MatrixXd(basis.cast<double>())
                                               : Eigen::MatrixXd(basis.transpose().cast<double>());
  const Eigen::MatrixXd gram = s.transpose() * s;
  return (gram - Eigen::MatrixXd::Identity(gram.rows(), gram.cols())).norm();
}

}  // namespace slimgrad::cpu
