#include <doctest/doctest.h>

#include <cmath>
#include <slimgrad/backend/cpu/random_projection.hpp>
#include <vector>

using namespace slimgrad;
using RP = impl<transforms::RandomProjection, backend::cpu>;

namespace {

std::vector<float> test_matrix(index_t m, index_t n, std::uint64_t seed) {
  std::vector<float> g(static_cast<std::size_t>(m * n));
  random::fill_gaussian(host_view(g.data(), m, n), {seed, 99, 0}, 1.0);
  return g;
}

// Double-precision reference of the projection with P regenerated independently.
std::vector<double> reference_forward(const std::vector<float>& g, index_t m, index_t n,
                                      const RP& rp, const RP::State& s) {
  cpu::RowMatrix p;
  rp.generate(s, p);
  const index_t r = rp.options.rank;
  std::vector<double> out;
  if (s.side == Side::right) {  // G Pᵀ: m×r
    out.assign(static_cast<std::size_t>(m * r), 0.0);
    for (index_t i = 0; i < m; ++i)
      for (index_t k = 0; k < r; ++k) {
        double acc = 0;
        for (index_t j = 0; j < n; ++j)
          acc += double(g[static_cast<std::size_t>(i * n + j)]) * double(p(k, j));
        out[static_cast<std::size_t>(i * r + k)] = acc;
      }
  } else {  // Pᵀ G: r×n
    out.assign(static_cast<std::size_t>(r * n), 0.0);
    for (index_t k = 0; k < r; ++k)
      for (index_t j = 0; j < n; ++j) {
        double acc = 0;
        for (index_t i = 0; i < m; ++i)
          acc += double(p(i, k)) * double(g[static_cast<std::size_t>(i * n + j)]);
        out[static_cast<std::size_t>(k * n + j)] = acc;
      }
  }
  return out;
}

}  // namespace

TEST_CASE("random projection: orientation, shapes and values against a double loop") {
  for (Shape shape : {Shape{40, 24}, Shape{24, 40}, Shape{33, 33}}) {
    for (bool keep : {true, false}) {
      RP rp({.rank = 8, .update_gap = 5, .seed = 11, .keep_matrix = keep});
      auto s = rp.init(shape, tensor_id("w"));
      CHECK(s.side == side_for(shape));
      auto g = test_matrix(shape.rows, shape.cols, 3);
      HostView<const float> gv(g.data(), shape.rows, shape.cols);
      REQUIRE(rp.refresh(s, gv, 0));
      const Shape cs = rp.coeff_shape(shape);
      std::vector<float> c(static_cast<std::size_t>(cs.size()));
      rp.forward(s, gv, host_view(c.data(), cs.rows, cs.cols));
      auto ref = reference_forward(g, shape.rows, shape.cols, rp, s);
      for (std::size_t i = 0; i < c.size(); ++i)
        CHECK(c[i] == doctest::Approx(ref[i]).epsilon(1e-5).scale(1.0));
      // The back-map is the adjoint: <P G, C> = <G, Pᵀ C> for any C.
      std::vector<float> back(g.size());
      rp.inverse(s, HostView<const float>(c.data(), cs.rows, cs.cols),
                 host_view(back.data(), shape.rows, shape.cols));
      double lhs = 0, rhs = 0;
      for (std::size_t i = 0; i < c.size(); ++i)
        lhs += double(c[i]) * c[i];
      for (std::size_t i = 0; i < g.size(); ++i)
        rhs += double(g[i]) * back[i];
      CHECK(lhs == doctest::Approx(rhs).epsilon(1e-4));
    }
  }
}

TEST_CASE("random projection: P P^T is the identity in expectation, so the sketch is unbiased") {
  // E[back(forward(G))] = G. Average over epochs and check the error shrinks like 1/sqrt(K).
  const index_t m = 24, n = 16, r = 4;
  auto g = test_matrix(m, n, 5);
  HostView<const float> gv(g.data(), m, n);
  RP rp({.rank = r, .update_gap = 1, .seed = 2024});
  auto s = rp.init({m, n}, tensor_id("unbiased"));
  std::vector<double> mean(g.size(), 0.0);
  std::vector<float> c(static_cast<std::size_t>(m * r)), back(g.size());
  double err_at[2] = {0, 0};
  const int checkpoints[2] = {100, 1600};
  int next = 0;
  double gnorm = 0;
  for (float x : g)
    gnorm += double(x) * x;
  for (int k = 0; k < 1600; ++k) {
    rp.refresh(s, gv, k);
    rp.forward(s, gv, host_view(c.data(), m, r));
    rp.inverse(s, HostView<const float>(c.data(), m, r), host_view(back.data(), m, n));
    for (std::size_t i = 0; i < g.size(); ++i)
      mean[i] += back[i];
    if (k + 1 == checkpoints[next]) {
      double e = 0;
      for (std::size_t i = 0; i < g.size(); ++i) {
        const double d = mean[i] / (k + 1) - g[i];
        e += d * d;
      }
      err_at[next++] = std::sqrt(e / gnorm);
      if (next == 2) break;
    }
  }
  INFO("seed 2024: relative error after 100 epochs " << err_at[0] << ", after 1600 " << err_at[1]);
  // 16x more samples: the error should shrink ~4x; accept 2.5x–6.5x and a small final error.
  CHECK(err_at[1] < err_at[0] / 2.5);
  CHECK(err_at[1] > err_at[0] / 6.5);
  CHECK(err_at[1] < 0.15);
}

TEST_CASE("random projection: resampled every update_gap steps, deterministic by key") {
  const index_t m = 10, n = 30;
  auto g = test_matrix(m, n, 8);
  HostView<const float> gv(g.data(), m, n);
  RP a({.rank = 3, .update_gap = 4, .seed = 7});
  RP b({.rank = 3, .update_gap = 4, .seed = 7});
  auto sa = a.init({m, n}, tensor_id("x"));
  auto sb = b.init({m, n}, tensor_id("x"));
  std::vector<float> ca(static_cast<std::size_t>(3 * n)), cb(ca.size()), first(ca.size());
  for (index_t k = 0; k < 9; ++k) {
    CHECK(a.refresh(sa, gv, k) == (k % 4 == 0));
    b.refresh(sb, gv, k);
    CHECK(sa.epoch == static_cast<std::uint32_t>(k / 4));
    a.forward(sa, gv, host_view(ca.data(), 3, n));
    b.forward(sb, gv, host_view(cb.data(), 3, n));
    CHECK(ca == cb);  // bit-identical across objects
    if (k == 0) first = ca;
    if (k < 4) CHECK(ca == first);
    if (k >= 4) CHECK(ca != first);
  }
  // A fresh object resuming at step 10 gets the same matrix without having seen steps 0..9.
  RP c({.rank = 3, .update_gap = 4, .seed = 7});
  auto sc = c.init({m, n}, tensor_id("x"));
  c.refresh(sc, gv, 10);
  std::vector<float> cc(ca.size());
  c.forward(sc, gv, host_view(cc.data(), 3, n));
  CHECK(cc == ca);
  // Another tensor name or seed: another matrix.
  RP d({.rank = 3, .update_gap = 4, .seed = 8});
  auto sd = d.init({m, n}, tensor_id("x"));
  d.refresh(sd, gv, 8);
  d.forward(sd, gv, host_view(cc.data(), 3, n));
  CHECK(cc != ca);
}

TEST_CASE("random projection: state bytes and bad input") {
  RP keep({.rank = 8}), seed_only({.rank = 8, .keep_matrix = false});
  CHECK(keep.state_bytes({100, 50}) == 16 + 8 * 50 * 4);  // right side: P is r×n
  CHECK(keep.state_bytes({50, 100}) == 16 + 50 * 8 * 4);  // left side: P is m×r
  CHECK(seed_only.state_bytes({50, 100}) == 16);
  CHECK_THROWS_AS(RP({.rank = 0}), Error);
  CHECK_THROWS_AS(RP({.rank = 4, .update_gap = 0}), Error);
  CHECK_THROWS_AS(keep.init({100, 7}, 1), Error);  // rank 8 > min(m, n) = 7
  CHECK_THROWS_AS(keep.init({0, 7}, 1), Error);
  RP rp({.rank = 2});
  auto s = rp.init({6, 4}, 1);
  std::vector<float> g(24), c(12);
  CHECK_THROWS_AS(rp.forward(s, host_view<const float>(g.data(), 6, 4), host_view(c.data(), 6, 2)),
                  Error);  // before refresh
  rp.refresh(s, host_view<const float>(g.data(), 6, 4), 0);
  CHECK_THROWS_AS(rp.forward(s, host_view<const float>(g.data(), 4, 6), host_view(c.data(), 6, 2)),
                  Error);  // wrong gradient shape
  CHECK_THROWS_AS(rp.forward(s, host_view<const float>(g.data(), 6, 4), host_view(c.data(), 2, 6)),
                  Error);  // wrong coefficient shape
}
