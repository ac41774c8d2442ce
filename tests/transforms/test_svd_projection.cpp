// Tests of transforms::SvdProjection on the CPU (GaLore, algorithms.md §5.1, §8.4) against
// double-precision references written here: Eigen's JacobiSVD on double (a different algorithm
// from the BDCSVD-on-float under test) for subspaces, and plain loops for the projections.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <slimgrad/backend/cpu/svd_projection.hpp>
#include <vector>

#include "matrices.hpp"

using namespace slimgrad;
using Svd = impl<transforms::SvdProjection, backend::cpu>;
using transforms::RefreshFailure;
using transforms::RefreshStatus;
using transforms::SvdMethod;

namespace {

using test::gaussian;
using test::MatD;
using test::orthonormality;
using test::to_double;

// A random orthonormal n×k matrix (QR of a Gaussian matrix, in double).
MatD random_orthonormal(index_t n, index_t k, std::mt19937_64& rng) {
  std::normal_distribution<double> nd;
  MatD a(n, k);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < k; ++j)
      a(i, j) = nd(rng);
  Eigen::HouseholderQR<MatD> qr(a);
  return qr.householderQ() * MatD::Identity(n, k);
}

// G = U diag(s) Vᵀ with random orthonormal U, V and the given singular values; returned as a
// row-major float buffer.
std::vector<float> with_spectrum(index_t m, index_t n, const std::vector<double>& s,
                                 std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto k = static_cast<index_t>(s.size());
  const MatD u = random_orthonormal(m, k, rng), v = random_orthonormal(n, k, rng);
  MatD g = u * Eigen::Map<const Eigen::VectorXd>(s.data(), k).asDiagonal() * v.transpose();
  std::vector<float> out(static_cast<std::size_t>(m * n));
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j)
      out[static_cast<std::size_t>(i * n + j)] = static_cast<float>(g(i, j));
  return out;
}

// Top r singular values well separated from each other (ratio 0.85) and from the rest (gap 20).
std::vector<double> gapped_spectrum(index_t k, index_t r) {
  std::vector<double> s(static_cast<std::size_t>(k));
  for (index_t i = 0; i < k; ++i)
    s[static_cast<std::size_t>(i)] =
        i < r ? 100.0 * std::pow(0.85, double(i)) : 0.5 * std::pow(0.97, double(i - r));
  return s;
}

// Slowly decaying (power-law) spectrum: s_i = (i + 1)^-0.5.
std::vector<double> slow_spectrum(index_t k) {
  std::vector<double> s(static_cast<std::size_t>(k));
  for (index_t i = 0; i < k; ++i)
    s[static_cast<std::size_t>(i)] = 1.0 / std::sqrt(double(i + 1));
  return s;
}

// The basis as a dim0×r double matrix S (P transposed on the right).
MatD basis_columns(const Svd::State& s) {
  return test::basis_columns(s.basis, s.side);
}

// Top-r left singular vectors of Ĝ (G on the left, Gᵀ on the right) by JacobiSVD in double,
// with the canonical sign rule applied in double.
MatD reference_basis(const std::vector<float>& g, Shape shape, Side side, index_t r) {
  const MatD gd = to_double(g, shape.rows, shape.cols);
  Eigen::JacobiSVD<MatD> svd(gd, Eigen::ComputeThinU | Eigen::ComputeThinV);
  MatD u = (side == Side::left ? svd.matrixU() : svd.matrixV()).leftCols(r);
  for (index_t j = 0; j < r; ++j) {
    index_t best = 0;
    for (index_t i = 1; i < u.rows(); ++i)
      if (std::abs(u(i, j)) > std::abs(u(best, j))) best = i;
    if (u(best, j) < 0) u.col(j) = -u.col(j);
  }
  return u;
}

// Principal angles (radians, descending) between the column spans of orthonormal a and b:
// θ_i = asin of the singular values of (I − b bᵀ) a, accurate for small angles.
Eigen::VectorXd principal_angles(const MatD& a, const MatD& b) {
  const MatD resid = a - b * (b.transpose() * a);
  Eigen::JacobiSVD<MatD> svd(resid);
  Eigen::VectorXd s = svd.singularValues();
  for (index_t i = 0; i < s.size(); ++i)
    s[i] = std::asin(std::min(1.0, s[i]));
  return s;
}

constexpr double deg = 180.0 / 3.14159265358979323846;

}  // namespace

TEST_CASE("svd projection: exact basis matches a double JacobiSVD reference, every proj_type") {
  // Seeds 101..; shapes cover m > n, m < n and square; all four proj types.
  std::uint64_t seed = 101;
  for (Shape shape : {Shape{48, 30}, Shape{30, 48}, Shape{40, 40}}) {
    for (ProjType pt : {ProjType::std_, ProjType::reverse_std, ProjType::left, ProjType::right}) {
      CAPTURE(shape.rows);
      CAPTURE(shape.cols);
      CAPTURE(to_string(pt));
      CAPTURE(seed);
      const index_t r = 6;
      const index_t k = std::min(shape.rows, shape.cols);
      const auto g = with_spectrum(shape.rows, shape.cols, gapped_spectrum(k, r), seed++);
      Svd svd({.rank = r, .update_gap = 10, .proj_type = pt});
      auto s = svd.init(shape, tensor_id("w"));
      CHECK(s.side == side_for(shape, pt));
      REQUIRE(svd.refresh(s, host_view(g.data(), shape.rows, shape.cols), 0));
      CHECK(s.last_refresh_status == RefreshStatus::ok);
      const Shape bs = transforms::SvdProjection::basis_shape(shape, s.side, r);
      CHECK(s.basis.rows() == bs.rows);
      CHECK(s.basis.cols() == bs.cols);
      CHECK(s.basis.size() * 4 == static_cast<index_t>(svd.state_bytes(shape)));
      const MatD got = basis_columns(s);
      const MatD ref = reference_basis(g, shape, s.side, r);
      // fp32 SVD of a matrix with ‖G‖ = 100 and gaps ≥ 15 % between the kept singular values:
      // vector errors ~ ε·σ₁/gap ≈ 1e-6; 2e-5 leaves room for the fp32 Householder steps.
      CHECK(orthonormality(got) < 1e-5);
      CHECK((got - ref).cwiseAbs().maxCoeff() < 2e-5);
      CHECK(principal_angles(got, ref).maxCoeff() < 2e-5);
    }
  }
}

TEST_CASE("svd projection: canonical sign rule") {
  SUBCASE("host/device rule: largest magnitude positive, first entry on ties") {
    const float a[] = {0.1f, -0.9f, 0.5f};
    CHECK(transforms::canonical_sign_flip(a, 3, 1));
    const float b[] = {0.7f, -0.7f};
    CHECK(!transforms::canonical_sign_flip(b, 2, 1));  // tie: the first entry (positive) decides
    const float c[] = {-0.7f, 0.7f};
    CHECK(transforms::canonical_sign_flip(c, 2, 1));
    const float strided[] = {0.2f, 9.0f, -0.8f, 9.0f, 0.3f};  // stride 2 reads 0.2, -0.8, 0.3
    CHECK(transforms::canonical_sign_flip(strided, 3, 2));
  }
  SUBCASE("every basis vector has a positive largest entry; G and -G give the same basis") {
    for (SvdMethod method : {SvdMethod::exact, SvdMethod::randomized}) {
      for (Shape shape : {Shape{50, 20}, Shape{20, 50}}) {
        const index_t r = 5;
        auto g = with_spectrum(shape.rows, shape.cols, gapped_spectrum(20, r), 7);
        Svd svd({.rank = r, .method = method, .seed = 3});
        auto s = svd.init(shape, 1);
        svd.refresh(s, host_view(g.data(), shape.rows, shape.cols), 0);
        const MatD b = basis_columns(s);
        for (index_t j = 0; j < r; ++j) {
          index_t best = 0;
          for (index_t i = 1; i < b.rows(); ++i)
            if (std::abs(b(i, j)) > std::abs(b(best, j))) best = i;
          CHECK(b(best, j) > 0.0);
        }
        for (auto& x : g)
          x = -x;
        auto s2 = svd.init(shape, 1);
        svd.refresh(s2, host_view(g.data(), shape.rows, shape.cols), 0);
        CHECK((basis_columns(s2) - b).cwiseAbs().maxCoeff() < 1e-5);
      }
    }
  }
}

TEST_CASE("svd projection: forward and inverse against double loops, strided views") {
  for (Shape shape : {Shape{37, 23}, Shape{23, 37}}) {
    const index_t r = 7, m = shape.rows, n = shape.cols;
    const auto g0 = gaussian(m, n, 11);
    Svd svd({.rank = r});
    auto s = svd.init(shape, 5);
    svd.refresh(s, host_view(g0.data(), m, n), 0);
    // A new gradient in a strided buffer (ld = n + 3).
    const index_t ld = n + 3;
    auto gbuf = gaussian(m, ld, 12);
    HostView<const float> gv(gbuf.data(), m, n, ld);
    const Shape cs = svd.coeff_shape(shape);
    CHECK(cs == projected_shape(shape, s.side, r));
    std::vector<float> c(static_cast<std::size_t>(cs.size()));
    svd.forward(s, gv, host_view(c.data(), cs.rows, cs.cols));
    const MatD b = s.basis.cast<double>();
    double max_err = 0, max_ref = 0;
    for (index_t i = 0; i < cs.rows; ++i)
      for (index_t j = 0; j < cs.cols; ++j) {
        double acc = 0;
        if (s.side == Side::left)  // (Sᵀ G)_ij = Σ_k S_ki G_kj
          for (index_t k = 0; k < m; ++k)
            acc += b(k, i) * double(gv(k, j));
        else  // (G Pᵀ)_ij = Σ_k G_ik P_jk
          for (index_t k = 0; k < n; ++k)
            acc += double(gv(i, k)) * b(j, k);
        max_err = std::max(max_err, std::abs(acc - c[static_cast<std::size_t>(i * cs.cols + j)]));
        max_ref = std::max(max_ref, std::abs(acc));
      }
    // fp32 dot products of length ≤ 37 with unit-norm basis vectors: relative 1e-6 is typical.
    CHECK(max_err <= 1e-5 * max_ref);

    // Inverse of arbitrary coefficients into a strided output.
    const auto nc = gaussian(cs.rows, cs.cols, 13);
    std::vector<float> obuf(static_cast<std::size_t>(m * ld), 7.0f);
    HostView<float> ov(obuf.data(), m, n, ld);
    svd.inverse(s, host_view(nc.data(), cs.rows, cs.cols), ov);
    max_err = 0;
    max_ref = 0;
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) {
        double acc = 0;
        if (s.side == Side::left)  // (S N)_ij
          for (index_t k = 0; k < r; ++k)
            acc += b(i, k) * double(nc[static_cast<std::size_t>(k * n + j)]);
        else  // (N P)_ij
          for (index_t k = 0; k < r; ++k)
            acc += double(nc[static_cast<std::size_t>(i * r + k)]) * b(k, j);
        max_err = std::max(max_err, std::abs(acc - ov(i, j)));
        max_ref = std::max(max_ref, std::abs(acc));
      }
    CHECK(max_err <= 1e-5 * max_ref);
    for (index_t i = 0; i < m; ++i)  // padding untouched
      for (index_t j = n; j < ld; ++j)
        CHECK(obuf[static_cast<std::size_t>(i * ld + j)] == 7.0f);
    // back(forward(S x)) = S x for a gradient inside the subspace.
    std::vector<float> inside(static_cast<std::size_t>(m * n)), back(inside.size());
    svd.inverse(s, host_view(nc.data(), cs.rows, cs.cols), host_view(inside.data(), m, n));
    std::vector<float> c2(c.size());
    svd.forward(s, host_view(inside.data(), m, n), host_view(c2.data(), cs.rows, cs.cols));
    svd.inverse(s, host_view(c2.data(), cs.rows, cs.cols), host_view(back.data(), m, n));
    double d = 0, nrm = 0;
    for (std::size_t i = 0; i < inside.size(); ++i) {
      d = std::max(d, double(std::abs(inside[i] - back[i])));
      nrm = std::max(nrm, double(std::abs(inside[i])));
    }
    CHECK(d <= 1e-5 * nrm);
  }
}

TEST_CASE("svd projection: refresh schedule k % T == 0, k before the increment") {
  const Shape shape{30, 20};
  Svd svd({.rank = 4, .update_gap = 3});
  auto s = svd.init(shape, 9);
  std::vector<bool> refreshed;
  std::vector<float> last_basis;
  for (index_t k = 0; k < 10; ++k) {
    const auto g = gaussian(shape.rows, shape.cols, 1000 + static_cast<std::uint64_t>(k));
    const std::vector<float> before(s.basis.data(), s.basis.data() + s.basis.size());
    const bool did = svd.refresh(s, host_view(g.data(), shape.rows, shape.cols), k);
    refreshed.push_back(did);
    const std::vector<float> after(s.basis.data(), s.basis.data() + s.basis.size());
    if (!did) CHECK(after == before);
    if (did) CHECK(after != before);
  }
  CHECK(refreshed ==
        std::vector<bool>{true, false, false, true, false, false, true, false, false, true});
  CHECK(s.refresh_count == 4);
  CHECK(s.last_refresh_step == 9);
  // A state without a basis refreshes at any step (a parameter created mid-training).
  auto late = svd.init(shape, 9);
  const auto g = gaussian(shape.rows, shape.cols, 5);
  CHECK(svd.refresh(late, host_view(g.data(), shape.rows, shape.cols), 7));
  CHECK(!svd.refresh(late, host_view(g.data(), shape.rows, shape.cols), 8));
}

TEST_CASE("svd projection: randomized range finder on a gapped spectrum") {
  // Gap σ_r/σ_{r+1} ≥ 20 with q = 2: the theoretical subspace error is below fp32 round-off,
  // so the randomized basis must match the exact one vector by vector (canonical signs).
  for (Shape shape : {Shape{120, 80}, Shape{80, 120}}) {
    const index_t r = 8;
    const auto g = with_spectrum(shape.rows, shape.cols, gapped_spectrum(80, r), 21);
    Svd exact({.rank = r});
    Svd rnd({.rank = r, .method = SvdMethod::randomized, .seed = 77});
    auto se = exact.init(shape, 3), sr = rnd.init(shape, 3);
    exact.refresh(se, host_view(g.data(), shape.rows, shape.cols), 0);
    rnd.refresh(sr, host_view(g.data(), shape.rows, shape.cols), 0);
    CHECK(sr.last_refresh_status == RefreshStatus::ok);
    const MatD be = basis_columns(se), br = basis_columns(sr);
    const MatD ref = reference_basis(g, shape, se.side, r);
    CHECK(orthonormality(br) < 1e-5);
    const auto ang = principal_angles(br, ref);
    MESSAGE("randomized vs exact subspace (gapped, ", shape.rows, "x", shape.cols, "): max angle ",
            ang.maxCoeff() * deg, " deg");
    CHECK(ang.maxCoeff() < 2e-5);
    CHECK((br - be).cwiseAbs().maxCoeff() < 5e-5);
  }
}

TEST_CASE("svd projection: randomized range finder on a slowly decaying spectrum (reported)") {
  const Shape shape{200, 160};
  const index_t r = 16;
  const auto g = with_spectrum(shape.rows, shape.cols, slow_spectrum(160), 31);
  const MatD ref = reference_basis(g, shape, side_for(shape), r);
  double mean_q[3] = {0, 0, 0};
  for (index_t q : {0, 1, 2}) {
    Svd rnd({.rank = r,
             .method = SvdMethod::randomized,
             .oversampling = 10,
             .power_iterations = q,
             .seed = 5});
    auto s = rnd.init(shape, 1);
    rnd.refresh(s, host_view(g.data(), shape.rows, shape.cols), 0);
    const auto ang = principal_angles(basis_columns(s), ref);
    mean_q[q] = ang.mean();
    MESSAGE("slow spectrum s_i = (i+1)^-1/2, ", shape.rows, "x", shape.cols, " r=", r,
            " p=10 q=", q, ": max angle ", ang.maxCoeff() * deg, " deg, mean ", ang.mean() * deg,
            " deg");
    CHECK(orthonormality(basis_columns(s)) < 1e-5);
  }
  // No gap, so no accuracy promise; but power iterations must help.
  CHECK(mean_q[2] < mean_q[0]);
}

TEST_CASE("svd projection: randomized determinism by seed, tensor id and epoch") {
  const Shape shape{90, 70};
  const auto g = with_spectrum(shape.rows, shape.cols, slow_spectrum(70), 41);
  HostView<const float> gv(g.data(), shape.rows, shape.cols);
  auto run = [&](std::uint64_t seed, std::uint64_t id, index_t k) {
    Svd rnd({.rank = 6, .update_gap = 10, .method = SvdMethod::randomized, .seed = seed});
    auto s = rnd.init(shape, id);
    rnd.refresh(s, gv, k);
    return std::vector<float>(s.basis.data(), s.basis.data() + s.basis.size());
  };
  const auto a = run(1, 2, 0);
  CHECK(a == run(1, 2, 0));   // same bits
  CHECK(a == run(1, 2, 9));   // same epoch k / T
  CHECK(a != run(2, 2, 0));   // another seed: another Ω
  CHECK(a != run(1, 3, 0));   // another tensor
  CHECK(a != run(1, 2, 10));  // another epoch
}

TEST_CASE("svd projection: non-finite gradients never produce NaN") {
  const Shape shape{40, 25};
  const index_t m = shape.rows, n = shape.cols, r = 5;
  for (SvdMethod method : {SvdMethod::exact, SvdMethod::randomized}) {
    CAPTURE(static_cast<int>(method));
    Svd svd({.rank = r, .update_gap = 2, .method = method});
    auto bad = gaussian(m, n, 51);
    bad[17] = std::numeric_limits<float>::quiet_NaN();
    SUBCASE("first refresh: identity basis, reported") {
      auto s = svd.init(shape, 1);
      CHECK(svd.refresh(s, host_view(bad.data(), m, n), 0));
      CHECK(s.last_refresh_status == RefreshStatus::identity_basis);
      CHECK(s.last_failure == RefreshFailure::non_finite_gradient);
      CHECK(s.failure_count == 1);
      CHECK(s.basis.allFinite());
      CHECK(orthonormality(basis_columns(s)) == 0.0);
      const auto good = gaussian(m, n, 52);
      std::vector<float> c(static_cast<std::size_t>(svd.coeff_shape(shape).size()));
      svd.forward(s, host_view(good.data(), m, n),
                  host_view(c.data(), svd.coeff_shape(shape).rows, svd.coeff_shape(shape).cols));
      for (float x : c)
        CHECK(std::isfinite(x));
      // The next due refresh with a finite gradient recovers.
      CHECK(svd.refresh(s, host_view(good.data(), m, n), 2));
      CHECK(s.last_refresh_status == RefreshStatus::ok);
      CHECK(s.last_failure == RefreshFailure::none);
    }
    SUBCASE("later refresh: previous basis kept, reported") {
      auto s = svd.init(shape, 1);
      const auto good = gaussian(m, n, 53);
      svd.refresh(s, host_view(good.data(), m, n), 0);
      const cpu::RowMatrix before = s.basis;
      bad[3] = std::numeric_limits<float>::infinity();
      std::vector<float> cbuf(static_cast<std::size_t>(r * r));
      CHECK(!svd.refresh(s, host_view(bad.data(), m, n), 2, host_view(cbuf.data(), r, r)));
      CHECK(s.last_refresh_status == RefreshStatus::kept_previous);
      CHECK(s.last_failure == RefreshFailure::non_finite_gradient);
      CHECK(s.basis == before);
      CHECK(s.refresh_count == 2);
      CHECK(s.failure_count == 1);
      CHECK(cpu::as_eigen(host_view(cbuf.data(), r, r)) == cpu::RowMatrix::Identity(r, r));
    }
  }
}

TEST_CASE("svd projection: fallbacks when an SVD fails") {
  const Shape shape{40, 25};
  const index_t m = shape.rows, n = shape.cols, r = 5;
  const auto g = with_spectrum(m, n, gapped_spectrum(25, r), 61);
  HostView<const float> gv(g.data(), m, n);
  Svd exact({.rank = r, .update_gap = 2});
  auto ref = exact.init(shape, 1);
  exact.refresh(ref, gv, 0);

  SUBCASE("randomized overflows (finite but huge gradient): exact fallback at k = 0") {
    // Largest entry 1e38 (FLT_MAX 3.4e38): the sketch GΩ overflows; BDCSVD rescales first.
    float big = 0.0f;
    for (float x : g)
      big = std::max(big, std::abs(x));
    std::vector<float> huge(g.size());
    for (std::size_t i = 0; i < g.size(); ++i)
      huge[i] = g[i] * (1e38f / big);
    REQUIRE(cpu::all_finite(host_view<const float>(huge.data(), m, n)));
    Svd rnd({.rank = r, .method = SvdMethod::randomized});
    auto s = rnd.init(shape, 1);
    CHECK(rnd.refresh(s, host_view(huge.data(), m, n), 0));
    CHECK(s.last_refresh_status == RefreshStatus::fallback_method);
    CHECK(s.last_failure == RefreshFailure::non_finite_result);
    CHECK(s.basis.allFinite());
    CHECK((s.basis - ref.basis).cwiseAbs().maxCoeff() < 1e-5);
  }
  SUBCASE("exact does not converge at k = 0: randomized fallback") {
    cpu::detail::svd_injected_failures = 1;
    auto s = exact.init(shape, 1);
    CHECK(exact.refresh(s, gv, 0));
    CHECK(cpu::detail::svd_injected_failures == 0);
    CHECK(s.last_refresh_status == RefreshStatus::fallback_method);
    CHECK(s.last_failure == RefreshFailure::no_convergence);
    CHECK((s.basis - ref.basis).cwiseAbs().maxCoeff() < 5e-5);
  }
  SUBCASE("both methods fail at k = 0: identity basis") {
    cpu::detail::svd_injected_failures = 2;
    auto s = exact.init(shape, 1);
    CHECK(exact.refresh(s, gv, 0));
    CHECK(s.last_refresh_status == RefreshStatus::identity_basis);
    CHECK(s.basis == cpu::RowMatrix::Identity(r, n));  // right side: P = [I_r 0]
  }
  SUBCASE("failure at a later refresh keeps the previous basis") {
    auto s = exact.init(shape, 1);
    exact.refresh(s, gv, 0);
    const auto g2 = gaussian(m, n, 62);
    cpu::detail::svd_injected_failures = 1;
    CHECK(!exact.refresh(s, host_view(g2.data(), m, n), 2));
    CHECK(s.last_refresh_status == RefreshStatus::kept_previous);
    CHECK(s.last_failure == RefreshFailure::no_convergence);
    CHECK(s.basis == ref.basis);
  }
  cpu::detail::svd_injected_failures = 0;
}

TEST_CASE("svd projection: rotation output C = S_new^T S_old and the previous basis") {
  for (Shape shape : {Shape{30, 18}, Shape{18, 30}}) {
    const index_t m = shape.rows, n = shape.cols, r = 4;
    Svd svd({.rank = r, .update_gap = 1});
    auto s = svd.init(shape, 1);
    std::vector<float> c(static_cast<std::size_t>(r * r), -1.0f);
    const auto g0 = gaussian(m, n, 71), g1 = gaussian(m, n, 72);
    CHECK(svd.refresh(s, host_view(g0.data(), m, n), 0, host_view(c.data(), r, r)));
    CHECK(svd.previous_basis().empty());
    CHECK(cpu::as_eigen(host_view(c.data(), r, r)) == cpu::RowMatrix::Identity(r, r));
    const cpu::RowMatrix old = s.basis;
    CHECK(svd.refresh(s, host_view(g1.data(), m, n), 1, host_view(c.data(), r, r)));
    const auto prev = svd.previous_basis();
    REQUIRE(prev.rows == old.rows());
    CHECK(cpu::as_eigen(prev) == old);
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < r; ++j) {
        double acc = 0;
        if (s.side == Side::left)
          for (index_t k = 0; k < m; ++k)
            acc += double(s.basis(k, i)) * double(old(k, j));
        else
          for (index_t k = 0; k < n; ++k)
            acc += double(s.basis(i, k)) * double(old(j, k));
        CHECK(std::abs(acc - c[static_cast<std::size_t>(i * r + j)]) < 1e-5);
      }
  }
}

TEST_CASE("svd projection: a zero gradient gives the first r coordinate vectors, as a success") {
  // Eigen's SVD of zero picks other coordinate vectors at these sizes (BDCSVD's deflation above
  // 16 columns; the randomized path's ℓ = 18 small SVD): the refresh fixes the choice, so that
  // the CUDA backend can make the same one.
  for (SvdMethod method : {SvdMethod::exact, SvdMethod::randomized})
    for (const Shape shape : {Shape{96, 64}, Shape{64, 96}}) {
      CAPTURE(static_cast<int>(method));
      CAPTURE(shape.rows);
      Svd svd({.rank = 8, .method = method});
      const std::vector<float> zero(static_cast<std::size_t>(shape.size()), 0.0f);
      const auto g = gaussian(shape.rows, shape.cols, 82);
      auto s = svd.init(shape, 1);
      for (const index_t k : {0, 200}) {  // the first refresh, and one with a basis to replace
        CAPTURE(k);
        CHECK(svd.refresh(s, host_view(zero.data(), shape.rows, shape.cols), k));
        CHECK(s.last_refresh_status == RefreshStatus::ok);
        CHECK(s.last_failure == RefreshFailure::none);
        CHECK(!s.provisional);
        CHECK(s.basis == cpu::RowMatrix::Identity(s.basis.rows(), s.basis.cols()));
        svd.refresh_now(s, host_view(g.data(), shape.rows, shape.cols), k + 1, {});
        CHECK(s.basis != cpu::RowMatrix::Identity(s.basis.rows(), s.basis.cols()));
      }
      // -0 is zero too.
      std::vector<float> negative_zero = zero;
      negative_zero[7] = -0.0f;
      CHECK(svd.refresh(s, host_view(negative_zero.data(), shape.rows, shape.cols), 400));
      CHECK(s.basis == cpu::RowMatrix::Identity(s.basis.rows(), s.basis.cols()));
    }
}

TEST_CASE("svd projection: the randomized basis of G·2^-100 and G·2^80 is G's, bit for bit") {
  // Finite, nonzero, but the sketch's squared norms under- or overflow in fp32: without the
  // power-of-two scaling (cpu::refresh_exponent) the Householder QR of a 2^-100 sketch returned
  // another subspace and that of a 2^80 one failed (the first refresh fell back to the exact SVD).
  CHECK(cpu::refresh_exponent(0.5f) == 0);
  CHECK(cpu::refresh_exponent(0x1p-10f) == 0);
  CHECK(cpu::refresh_exponent(0x1.fffffep9f) == 0);
  CHECK(cpu::refresh_exponent(0x1p10f) == -20);
  CHECK(cpu::refresh_exponent(0x1.fffffep-11f) == 20);
  CHECK(cpu::refresh_exponent(0x1p-101f) == 100);
  CHECK(cpu::refresh_exponent(0x1p79f) == -80);
  CHECK(cpu::refresh_exponent(0.0f) == 0);
  for (const Shape shape : {Shape{96, 64}, Shape{64, 96}}) {
    CAPTURE(shape.rows);
    Svd svd({.rank = 8, .method = SvdMethod::randomized});
    const auto g = gaussian(shape.rows, shape.cols, 83);
    auto ref = svd.init(shape, 1);
    REQUIRE(svd.refresh(ref, host_view(g.data(), shape.rows, shape.cols), 0));
    for (const float scale : {0x1p-100f, 0x1p80f}) {
      CAPTURE(scale);
      std::vector<float> gs = g;
      for (float& x : gs)
        x *= scale;
      auto s = svd.init(shape, 1);
      CHECK(svd.refresh(s, host_view(gs.data(), shape.rows, shape.cols), 0));
      CHECK(s.last_refresh_status == RefreshStatus::ok);
      CHECK(!s.provisional);
      CHECK(s.basis == ref.basis);
    }
  }
}

TEST_CASE("svd projection: zero and rank-deficient gradients give an orthonormal basis") {
  const Shape shape{30, 20};
  for (SvdMethod method : {SvdMethod::exact, SvdMethod::randomized}) {
    Svd svd({.rank = 6, .method = method});
    std::vector<float> zero(600, 0.0f);
    auto s = svd.init(shape, 1);
    svd.refresh(s, host_view(zero.data(), 30, 20), 0);
    CHECK(s.last_refresh_status == RefreshStatus::ok);
    CHECK(s.basis.allFinite());
    CHECK(orthonormality(basis_columns(s)) < 1e-5);
    const auto rank2 = with_spectrum(30, 20, {3.0, 1.0}, 81);
    svd.refresh(s, host_view(rank2.data(), 30, 20), 0);
    CHECK(s.basis.allFinite());
    CHECK(orthonormality(basis_columns(s)) < 1e-5);
  }
}

TEST_CASE("svd projection: argument validation") {
  CHECK_THROWS_AS(Svd({.rank = 0}), Error);
  CHECK_THROWS_AS(Svd({.rank = 4, .update_gap = 0}), Error);
  CHECK_THROWS_AS(Svd({.rank = 4, .oversampling = -1}), Error);
  CHECK_THROWS_AS(Svd({.rank = 4, .power_iterations = -1}), Error);
  Svd svd({.rank = 8});
  CHECK_THROWS_AS(svd.init({0, 10}, 1), Error);
  CHECK_THROWS_AS(svd.init({10, 0}, 1), Error);
  CHECK_THROWS_AS(svd.init({7, 100}, 1), Error);  // rank 8 > min(m, n) = 7
  CHECK_THROWS_AS(svd.init({100, 7}, 1), Error);
  Svd rev({.rank = 8, .proj_type = ProjType::reverse_std});
  CHECK_THROWS_AS(rev.init({100, 7}, 1), Error);  // projected dim 100, but only 7 singular vectors
  CHECK_NOTHROW(svd.init({8, 8}, 1));

  const auto g = gaussian(20, 10, 1);
  auto s = svd.init({20, 10}, 1);
  std::vector<float> c(static_cast<std::size_t>(20 * 8)), out(200);
  CHECK_THROWS_AS(svd.forward(s, host_view(g.data(), 20, 10), host_view(c.data(), 20, 8)),
                  Error);  // before the first refresh
  CHECK_THROWS_AS(svd.refresh(s, host_view(g.data(), 10, 20), 0), Error);  // wrong shape
  CHECK_THROWS_AS(svd.refresh(s, host_view(g.data(), 20, 10), -1), Error);
  std::vector<float> cbad(9);
  CHECK_THROWS_AS(svd.refresh(s, host_view(g.data(), 20, 10), 0, host_view(cbad.data(), 3, 3)),
                  Error);
  CHECK(s.refresh_count == 0);  // nothing changed by the rejected calls
  REQUIRE(svd.refresh(s, host_view(g.data(), 20, 10), 0));
  CHECK_THROWS_AS(svd.forward(s, host_view(g.data(), 20, 10), host_view(c.data(), 8, 20)), Error);
  CHECK_THROWS_AS(
      svd.inverse(s, host_view<const float>(c.data(), 20, 8), host_view(out.data(), 10, 20)),
      Error);
  CHECK(svd.state_bytes({20, 10}) == 8u * 10u * 4u);
  CHECK(svd.state_bytes({10, 20}) == 8u * 10u * 4u);
}
