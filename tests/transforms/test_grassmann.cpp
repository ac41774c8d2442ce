// Tests of transforms::Grassmann on the CPU (SubTrack-Grad / SubTrack++, algorithms.md §2.2,
// §2.3) against a double-precision implementation of the same formulas written here, and
// against properties: the geodesic stays on the manifold, a small step lowers the projection
// error, B = 0 does not rotate, the update is invariant under (u, v) → (−u, −v).
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <cmath>
#include <limits>
#include <random>
#include <slimgrad/backend/cpu/grassmann.hpp>
#include <vector>

#include "matrices.hpp"

using namespace slimgrad;
using namespace slimgrad::test;
using Gr = impl<transforms::Grassmann, backend::cpu>;
using Svd = impl<transforms::SvdProjection, backend::cpu>;
using transforms::RefreshFailure;
using transforms::RefreshStatus;

namespace {

// Ĝ = G (left) or Gᵀ (right).
MatD ghat(const std::vector<float>& g, Shape shape, Side side) {
  const MatD d = to_double(g, shape.rows, shape.cols);
  return side == Side::left ? d : MatD(d.transpose());
}

double projection_error(const MatD& s, const MatD& gh) {
  return (gh - s * (s.transpose() * gh)).norm();
}

// The tracking step of §2.2 in double, with the residual formed explicitly.
struct RefStep {
  MatD s_new;
  double sigma = 0, theta = 0;
};
RefStep reference_step(const MatD& s, const MatD& gh, double eta) {
  const MatD a = s.transpose() * gh;
  const MatD r = gh - s * a;
  const MatD b = r * a.transpose();
  Eigen::SelfAdjointEigenSolver<MatD> eig(b.transpose() * b);
  const Eigen::VectorXd v = eig.eigenvectors().col(s.cols() - 1);
  const Eigen::VectorXd bv = b * v;
  RefStep out;
  out.sigma = 2.0 * bv.norm();
  out.theta = eta * out.sigma;
  const Eigen::VectorXd u = -bv / bv.norm();
  out.s_new = s + (s * v * (std::cos(out.theta) - 1.0) - u * std::sin(out.theta)) * v.transpose();
  return out;
}

std::vector<float> from_double(const MatD& d) {
  std::vector<float> out(static_cast<std::size_t>(d.size()));
  for (index_t i = 0; i < d.rows(); ++i)
    for (index_t j = 0; j < d.cols(); ++j)
      out[static_cast<std::size_t>(i * d.cols() + j)] = static_cast<float>(d(i, j));
  return out;
}

}  // namespace

TEST_CASE("grassmann: k = 0 is SvdProjection's basis; the schedule tracks at k % T == 0") {
  for (Shape shape : {Shape{40, 24}, Shape{24, 40}}) {
    const index_t m = shape.rows, n = shape.cols, r = 5;
    const auto g0 = gaussian(m, n, 1);
    Gr gr({.rank = r, .update_gap = 3, .eta = 1e-3});
    Svd svd({.rank = r, .update_gap = 3});
    auto s = gr.init(shape, 7);
    auto sv = svd.init(shape, 7);
    CHECK(s.side == side_for(shape));
    CHECK(gr.coeff_shape(shape) == svd.coeff_shape(shape));
    CHECK(gr.state_bytes(shape) == static_cast<std::size_t>(r * std::min(m, n) * 4));
    REQUIRE(gr.refresh(s, host_view(g0.data(), m, n), 0));
    svd.refresh(sv, host_view(g0.data(), m, n), 0);
    CHECK(s.basis == sv.basis);  // shared code, same bits
    std::vector<bool> did;
    for (index_t k = 1; k <= 7; ++k) {
      const auto g = gaussian(m, n, 100 + static_cast<std::uint64_t>(k));
      did.push_back(gr.refresh(s, host_view(g.data(), m, n), k));
    }
    CHECK(did == std::vector<bool>{false, false, true, false, false, true, false});
    CHECK(s.tracking_count == 2);
    CHECK(s.refresh_count == 3);
    CHECK(s.last_refresh_status == RefreshStatus::ok);
    CHECK(s.last_angle > 0.0);
  }
}

TEST_CASE("grassmann: one tracking step equals a double-precision implementation") {
  // Seeds 11.., both orientations; η chosen so that the turn is about 0.6 rad.
  std::uint64_t seed = 11;
  for (Shape shape : {Shape{60, 36}, Shape{36, 60}, Shape{45, 45}}) {
    const index_t m = shape.rows, n = shape.cols, r = 6;
    CAPTURE(seed);
    const auto g0 = gaussian(m, n, seed++), g1 = gaussian(m, n, seed++);
    Gr probe({.rank = r});
    auto s = probe.init(shape, 1);
    probe.refresh(s, host_view(g0.data(), m, n), 0);
    const MatD s0 = basis_columns(s.basis, s.side);
    const MatD gh = ghat(g1, shape, s.side);
    const double eta = 0.6 / reference_step(s0, gh, 1.0).sigma;
    const RefStep ref = reference_step(s0, gh, eta);

    Gr gr({.rank = r, .update_gap = 5, .eta = eta, .reorth_every = 0});
    auto st = gr.init(shape, 1);
    gr.refresh(st, host_view(g0.data(), m, n), 0);
    REQUIRE(gr.refresh(st, host_view(g1.data(), m, n), 5));
    CHECK(std::abs(st.last_sigma - ref.sigma) <= 1e-5 * ref.sigma);
    CHECK(std::abs(st.last_angle - ref.theta) <= 1e-5 * ref.theta);
    // fp32 GEMMs of length ≤ 60 and an angle of 0.6 rad: entries agree to ~1e-6.
    CHECK((basis_columns(st.basis, st.side) - ref.s_new).cwiseAbs().maxCoeff() < 2e-5);
    // The forward map is SvdProjection's with the tracked basis: Sᵀ G or G Pᵀ.
    const Shape cs = gr.coeff_shape(shape);
    std::vector<float> c(static_cast<std::size_t>(cs.size()));
    gr.forward(st, host_view(g1.data(), m, n), host_view(c.data(), cs.rows, cs.cols));
    const MatD g1d = to_double(g1, m, n);
    const MatD cref = st.side == Side::left
                          ? MatD(basis_columns(st.basis, st.side).transpose() * g1d)
                          : MatD(g1d * basis_columns(st.basis, st.side));
    double err = 0;
    for (index_t i = 0; i < cs.rows; ++i)
      for (index_t j = 0; j < cs.cols; ++j)
        err = std::max(err, std::abs(cref(i, j) - c[static_cast<std::size_t>(i * cs.cols + j)]));
    CHECK(err < 1e-5 * cref.cwiseAbs().maxCoeff());
  }
}

TEST_CASE("grassmann: the geodesic stays on the manifold over many steps") {
  for (Shape shape : {Shape{64, 48}, Shape{48, 64}}) {
    const index_t m = shape.rows, n = shape.cols, r = 8;
    for (index_t reorth : {index_t{0}, index_t{1}, index_t{10}}) {
      // η·σ ≈ 1 rad per step for N(0,1) gradients of this size.
      Gr gr({.rank = r, .update_gap = 1, .eta = 5e-3, .reorth_every = reorth});
      auto s = gr.init(shape, 3);
      const auto g0 = gaussian(m, n, 500);
      gr.refresh(s, host_view(g0.data(), m, n), 0);
      double max_angle = 0;
      for (index_t k = 1; k <= 300; ++k) {
        const auto g = gaussian(m, n, 500 + static_cast<std::uint64_t>(k));
        gr.refresh(s, host_view(g.data(), m, n), k);
        max_angle = std::max(max_angle, s.last_angle);
      }
      const double err = orthonormality(basis_columns(s.basis, s.side));
      MESSAGE(m, "x", n, " r=", r, " reorth_every=", reorth,
              ": ||S^T S - I||_F after 300 steps = ", err, " (largest turn ", max_angle, " rad)");
      CHECK(s.tracking_count == 300);
      CHECK(max_angle > 0.3);
      // Without re-orthonormalisation fp32 drift grows with the number of steps (~ε per step);
      // with it, ‖SᵀS − I‖ stays at one QR's round-off.
      CHECK(err < (reorth == 1 ? 2e-6 : 1e-5));
    }
  }
}

TEST_CASE("grassmann: small steps lower the projection error on a fixed target") {
  for (Shape shape : {Shape{50, 30}, Shape{30, 50}}) {
    const index_t m = shape.rows, n = shape.cols, r = 5;
    const auto g0 = gaussian(m, n, 21), target = gaussian(m, n, 22);
    Gr gr({.rank = r, .update_gap = 1, .eta = 1e-4});
    auto s = gr.init(shape, 1);
    gr.refresh(s, host_view(g0.data(), m, n), 0);
    const MatD gh = ghat(target, shape, s.side);
    double err = projection_error(basis_columns(s.basis, s.side), gh);
    const double start = err;
    for (index_t k = 1; k <= 20; ++k) {
      gr.refresh(s, host_view(target.data(), m, n), k);
      CHECK(s.last_angle > 0.0);
      CHECK(s.last_angle < 0.1);
      const double e = projection_error(basis_columns(s.basis, s.side), gh);
      CHECK(e < err);
      err = e;
    }
    // The optimum is the top-r subspace of the target.
    Eigen::JacobiSVD<MatD> svd(gh);
    double best = 0;
    for (index_t i = r; i < svd.singularValues().size(); ++i)
      best += svd.singularValues()[i] * svd.singularValues()[i];
    MESSAGE(m, "x", n, ": projection error ", start, " -> ", err, " (optimum ", std::sqrt(best),
            ")");
    CHECK(err >= std::sqrt(best) * (1 - 1e-6));
  }
}

TEST_CASE("grassmann: B = 0 leaves S unchanged") {
  for (Shape shape : {Shape{40, 24}, Shape{24, 40}}) {
    const index_t m = shape.rows, n = shape.cols, r = 4;
    Gr gr({.rank = r, .update_gap = 1, .eta = 10.0});
    auto s = gr.init(shape, 1);
    const auto g0 = gaussian(m, n, 31);
    gr.refresh(s, host_view(g0.data(), m, n), 0);
    const cpu::RowMatrix before = s.basis;
    std::vector<float> c(static_cast<std::size_t>(r * r));

    SUBCASE("zero gradient") {
      std::vector<float> zero(static_cast<std::size_t>(m * n), 0.0f);
      CHECK(!gr.refresh(s, host_view(zero.data(), m, n), 1, host_view(c.data(), r, r)));
      CHECK(s.basis == before);
      CHECK(s.last_angle == 0.0);
      CHECK(s.last_refresh_status == RefreshStatus::ok);
      CHECK(cpu::as_eigen(host_view(c.data(), r, r)) == cpu::RowMatrix::Identity(r, r));
    }
    SUBCASE("gradient inside span(S): B is round-off only") {
      // G = S X (left) or X P (right), formed in double and rounded once.
      const MatD sd = basis_columns(before, s.side);
      const MatD x =
          to_double(gaussian(r, s.side == Side::left ? n : m, 32), r, s.side == Side::left ? n : m);
      const MatD gd = s.side == Side::left ? MatD(sd * x) : MatD((sd * x).transpose());
      const auto g = from_double(gd);
      CHECK(!gr.refresh(s, host_view(g.data(), m, n), 1));
      CHECK(s.basis == before);
      MESSAGE("in-span gradient: sigma = ", s.last_sigma, " (round-off), no rotation");
    }
    SUBCASE("a small out-of-span part still rotates") {
      const MatD sd = basis_columns(before, s.side);
      const index_t other = s.side == Side::left ? n : m;
      const MatD x = to_double(gaussian(r, other, 33), r, other);
      MatD gd = sd * x + 1e-3 * to_double(gaussian(sd.rows(), other, 34), sd.rows(), other);
      if (s.side == Side::right) gd.transposeInPlace();
      const auto g = from_double(gd);
      CHECK(gr.refresh(s, host_view(g.data(), m, n), 1));
      CHECK(s.last_angle > 0.0);
    }
  }
}

TEST_CASE("grassmann: geodesic update is invariant under (u, v) -> (-u, -v)") {
  for (Side side : {Side::left, Side::right}) {
    const index_t dim0 = 30, r = 5;
    // An orthonormal S and a unit u ⊥ S.
    MatD a = MatD::Random(dim0, r + 1);
    Eigen::HouseholderQR<MatD> qr(a);
    const MatD q = qr.householderQ() * MatD::Identity(dim0, r + 1);
    const MatD sd = q.leftCols(r);
    const Eigen::VectorXf u = q.col(r).cast<float>();
    const Eigen::VectorXf v = Eigen::VectorXd::Random(r).normalized().cast<float>();
    const cpu::RowMatrix basis = side == Side::left ? cpu::RowMatrix(sd.cast<float>())
                                                    : cpu::RowMatrix(sd.transpose().cast<float>());
    const double theta = 0.8;
    cpu::RowMatrix b1 = basis, b2 = basis, b3 = basis, b4 = basis;
    Gr::apply_geodesic(b1, side, u, v, theta);
    Gr::apply_geodesic(b2, side, -u, -v, theta);
    Gr::apply_geodesic(b3, side, -u, v, theta);  // flipping u alone reverses the turn
    Gr::apply_geodesic(b4, side, u, v, -theta);
    CHECK(b1 == b2);
    CHECK((b3 - b4).cwiseAbs().maxCoeff() < 1e-6);
    CHECK((b1 - b3).cwiseAbs().maxCoeff() > 0.1);
    // The step is a rotation: still orthonormal, and the turn is θ (principal angle).
    const MatD s1 = basis_columns(b1, side);
    CHECK(orthonormality(s1) < 1e-5);
    Eigen::JacobiSVD<MatD> cs(sd.transpose() * s1);
    CHECK(std::abs(std::acos(std::min(1.0, cs.singularValues().minCoeff())) - theta) < 1e-4);
  }
}

TEST_CASE("grassmann: rotation output C and the previous basis at a tracking step") {
  for (Shape shape : {Shape{36, 20}, Shape{20, 36}}) {
    const index_t m = shape.rows, n = shape.cols, r = 4;
    Gr gr({.rank = r, .update_gap = 2, .eta = 3e-3});
    auto s = gr.init(shape, 1);
    const auto g0 = gaussian(m, n, 51), g1 = gaussian(m, n, 52);
    std::vector<float> c(static_cast<std::size_t>(r * r));
    gr.refresh(s, host_view(g0.data(), m, n), 0, host_view(c.data(), r, r));
    const cpu::RowMatrix old = s.basis;
    REQUIRE(gr.refresh(s, host_view(g1.data(), m, n), 2, host_view(c.data(), r, r)));
    CHECK(cpu::as_eigen(gr.previous_basis()) == old);
    const MatD cref = basis_columns(s.basis, s.side).transpose() * basis_columns(old, s.side);
    double err = 0;
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < r; ++j)
        err = std::max(err, std::abs(cref(i, j) - c[static_cast<std::size_t>(i * r + j)]));
    CHECK(err < 1e-5);
    CHECK(s.last_angle > 0.05);
  }
}

TEST_CASE("grassmann: non-finite gradient at a tracking step keeps the basis") {
  const Shape shape{30, 20};
  Gr gr({.rank = 4, .update_gap = 1});
  auto s = gr.init(shape, 1);
  auto g = gaussian(30, 20, 61);
  gr.refresh(s, host_view(g.data(), 30, 20), 0);
  const cpu::RowMatrix before = s.basis;
  g[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK(!gr.refresh(s, host_view(g.data(), 30, 20), 1));
  CHECK(s.basis == before);
  CHECK(s.last_refresh_status == RefreshStatus::kept_previous);
  CHECK(s.last_failure == RefreshFailure::non_finite_gradient);
  CHECK(s.failure_count == 1);
  // Finite but overflowing products: also kept, also reported.
  auto huge = gaussian(30, 20, 62, 1e30f);
  CHECK(!gr.refresh(s, host_view(huge.data(), 30, 20), 2));
  CHECK(s.basis == before);
  CHECK(s.last_failure == RefreshFailure::non_finite_result);
}

TEST_CASE("grassmann: a failed first SVD is retried at the next due step, not tracked") {
  const Shape shape{30, 20};
  Gr gr({.rank = 4, .update_gap = 2});
  Svd svd({.rank = 4, .update_gap = 2});
  auto s = gr.init(shape, 1);
  auto bad = gaussian(30, 20, 63);
  bad[0] = std::numeric_limits<float>::infinity();
  CHECK(gr.refresh(s, host_view(bad.data(), 30, 20), 0));
  CHECK(s.last_refresh_status == RefreshStatus::identity_basis);
  CHECK(s.provisional);
  const auto good = gaussian(30, 20, 64);
  CHECK(!gr.refresh(s, host_view(good.data(), 30, 20), 1));  // not due
  CHECK(gr.refresh(s, host_view(good.data(), 30, 20), 2));
  CHECK(s.last_refresh_status == RefreshStatus::ok);
  CHECK(!s.provisional);
  CHECK(s.tracking_count == 0);
  auto ref = svd.init(shape, 1);
  svd.refresh(ref, host_view(good.data(), 30, 20), 2);
  CHECK(s.basis == ref.basis);
}

TEST_CASE("grassmann: moment rotation against a double loop") {
  // Left: M, V are r×n; right: m×r. 300 channels cross the 256-channel blocking.
  const index_t r = 5, channels = 300;
  const MatD so = MatD::Random(40, r).householderQr().householderQ() * MatD::Identity(40, r);
  const MatD sn = MatD::Random(40, r).householderQr().householderQ() * MatD::Identity(40, r);
  const MatD cd = sn.transpose() * so;  // C = S_newᵀ S_old
  const auto c = from_double(cd);
  for (Side side : {Side::left, Side::right}) {
    for (const auto& bias : {std::pair{1.0f, 1.0f}, std::pair{0.19f, 0.0198f}}) {
      const float b1 = bias.first, b2 = bias.second;
      const index_t rows = side == Side::left ? r : channels;
      const index_t cols = side == Side::left ? channels : r;
      auto m0 = gaussian(rows, cols, 72, 0.1f);
      auto v0 = gaussian(rows, cols, 73, 0.01f);
      for (std::size_t i = 0; i < v0.size(); ++i)  // a plausible second moment: ≥ M², noisy
        v0[i] = m0[i] * m0[i] + std::abs(v0[i]);
      auto m1 = m0, v1 = v0;
      cpu::rotate_moments(side, host_view<const float>(c.data(), r, r),
                          host_view(m1.data(), rows, cols), host_view(v1.data(), rows, cols), b1,
                          b2);
      double err_m = 0, err_v = 0;
      for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) {
          double mm = 0, vv = 0, scale_v = 0;
          for (index_t k = 0; k < r; ++k) {
            // left: (C M)_ij = Σ_k C_ik M_kj; right: (M Cᵀ)_ij = Σ_k M_ik C_jk
            const double ck = side == Side::left ? cd(i, k) : cd(j, k);
            const std::size_t e =
                static_cast<std::size_t>(side == Side::left ? k * cols + j : i * cols + k);
            const double mk = m0[e], vk = v0[e];
            const double dk = vk / b2 - (mk / b1) * (mk / b1);
            mm += ck * mk;
            vv += ck * ck * dk;
            scale_v += ck * ck * std::abs(dk);
          }
          const double mh = mm / b1;
          const double vref = b2 * std::abs(vv + mh * mh);
          scale_v = b2 * (scale_v + mh * mh);
          const std::size_t o = static_cast<std::size_t>(i * cols + j);
          err_m = std::max(err_m, std::abs(m1[o] - mm) / 0.1);
          err_v = std::max(err_v, std::abs(v1[o] - vref) / scale_v);
        }
      CAPTURE(b1);
      CHECK(err_m < 1e-5);  // fp32 sums of 5 terms, relative to the M scale
      CHECK(err_v < 1e-5);  // relative to the sum of magnitudes (no cancellation blow-up)
    }
  }
  // Identity C leaves both moments unchanged (up to V's |·|, already non-negative).
  std::vector<float> eye(static_cast<std::size_t>(r * r), 0.0f);
  for (index_t i = 0; i < r; ++i)
    eye[static_cast<std::size_t>(i * r + i)] = 1.0f;
  auto m = gaussian(r, 20, 74), v = gaussian(r, 20, 75);
  for (auto& x : v)
    x = std::abs(x) + 1.0f;
  const auto m_copy = m, v_copy = v;
  cpu::rotate_moments(Side::left, host_view<const float>(eye.data(), r, r),
                      host_view(m.data(), r, 20), host_view(v.data(), r, 20));
  CHECK(m == m_copy);
  for (std::size_t i = 0; i < v.size(); ++i)
    CHECK(v[i] == doctest::Approx(v_copy[i]).epsilon(1e-6));
  CHECK_THROWS_AS(cpu::rotate_moments(Side::left, host_view<const float>(eye.data(), r, r),
                                      host_view(m.data(), 20, r), host_view(v.data(), 20, r)),
                  Error);
}

TEST_CASE("grassmann: recovery residual against a double loop") {
  for (Shape shape : {Shape{40, 26}, Shape{26, 40}}) {
    const index_t m = shape.rows, n = shape.cols, r = 5;
    Gr gr({.rank = r});
    auto s = gr.init(shape, 1);
    const auto g = gaussian(m, n, 81);
    gr.refresh(s, host_view(g.data(), m, n), 0);
    const Shape cs = gr.coeff_shape(shape);
    std::vector<float> y(static_cast<std::size_t>(cs.size()));
    gr.forward(s, host_view(g.data(), m, n), host_view(y.data(), cs.rows, cs.cols));
    const auto nn = gaussian(cs.rows, cs.cols, 82, 0.3f);
    std::vector<float> out(static_cast<std::size_t>(m * n));
    gr.recovery_residual(s, host_view(g.data(), m, n),
                         host_view<const float>(y.data(), cs.rows, cs.cols),
                         host_view(nn.data(), cs.rows, cs.cols), host_view(out.data(), m, n));
    // Reference: φ from N and Y in double; residual G − S SᵀG from the basis in double.
    const MatD sd = basis_columns(s.basis, s.side), gd = to_double(g, m, n);
    const MatD resid = s.side == Side::left ? MatD(gd - sd * (sd.transpose() * gd))
                                            : MatD(gd - (gd * sd) * sd.transpose());
    const MatD yd = to_double(y, cs.rows, cs.cols), nd = to_double(nn, cs.rows, cs.cols);
    const auto phi = gr.recovery_factors();
    double err = 0;
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        const index_t ch = s.side == Side::left ? j : i;
        const double pr = s.side == Side::left ? nd.col(ch).norm() / (yd.col(ch).norm() + 1e-8)
                                               : nd.row(ch).norm() / (yd.row(ch).norm() + 1e-8);
        CHECK(std::abs(phi(0, ch) - pr) <= 1e-5 * pr);
        // G − S SᵀG cancels to ~ε·|G|: compare against |G|'s scale times φ.
        err = std::max(err, std::abs(out[static_cast<std::size_t>(i * n + j)] - resid(i, j) * pr) /
                                (gd.cwiseAbs().maxCoeff() * pr));
      }
    CHECK(err < 1e-5);
    // In place (out = g) gives the same values.
    auto g2 = g;
    gr.recovery_residual(s, host_view<const float>(g2.data(), m, n),
                         host_view<const float>(y.data(), cs.rows, cs.cols),
                         host_view(nn.data(), cs.rows, cs.cols), host_view(g2.data(), m, n));
    CHECK(g2 == out);
  }
}

TEST_CASE("grassmann: argument validation") {
  CHECK_THROWS_AS(Gr({.rank = 0}), Error);
  CHECK_THROWS_AS(Gr({.rank = 4, .eta = -1.0}), Error);
  CHECK_THROWS_AS(Gr({.rank = 4, .eta = std::numeric_limits<double>::quiet_NaN()}), Error);
  CHECK_THROWS_AS(Gr({.rank = 4, .reorth_every = -1}), Error);
  Gr gr({.rank = 6});
  CHECK_THROWS_AS(gr.init({5, 30}, 1), Error);
  CHECK_THROWS_AS(gr.init({0, 30}, 1), Error);
  auto s = gr.init({20, 10}, 1);
  const auto g = gaussian(20, 10, 1);
  CHECK_THROWS_AS(gr.track_now(s, host_view(g.data(), 20, 10), 1, {}), Error);  // no basis yet
  CHECK_THROWS_AS(gr.refresh(s, host_view(g.data(), 10, 20), 0), Error);
}
