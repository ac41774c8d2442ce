// Tests of transforms::Dwt on the CPU backend (GWT, algorithms.md §1.1).
//
// References: PyWavelets 1.1.1 (tests/reference/gen_dwt.py writes tests/data/dwt_*.json,
// computed in float64 from float32-exact inputs) and plain double loops written here.
// Tolerances (float32 kernels against float64 references): every coefficient of a transformed
// line within 1e-5 · ‖line‖₂ + 1e-7 of the reference, where the line is the input line
// (forward) or the coefficient line (inverse). float32 round-off of an F-tap orthonormal
// filter bank over L levels is ~L·F·6e-8 relative to the line norm; the stored references have
// 7 significant digits (5e-7 relative); 1e-5 leaves a margin of ~10× and still catches any
// wrong tap, shift or boundary sample (errors of order 1).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <type_traits>
#include <vector>

using namespace slimgrad;
using transforms::Axis;
using transforms::BoundaryMode;
using transforms::Db2;
using transforms::Db4;
using transforms::Dwt;
using transforms::Haar;

namespace {

constexpr double kRel = 1e-5;
constexpr double kAbs = 1e-7;

/// Same as hash_value() in gen_dwt.py: an exact float32 in [-2, 2).
float hash_value(std::uint64_t salt, std::uint64_t i) {
  auto h = static_cast<std::uint32_t>(i * 2654435761ull + salt * 97531ull + 12345ull);
  h ^= h >> 15;
  h = h * 2246822519u;
  h ^= h >> 13;
  const std::uint32_t k = h & 0xFFFFu;
  return (static_cast<float>(k) - 32768.0f) / 16384.0f;
}

std::vector<float> hash_vector(std::uint64_t salt, index_t count) {
  std::vector<float> v(static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < v.size(); ++i)
    v[i] = hash_value(salt, i);
  return v;
}

std::vector<float> random_vector(std::mt19937& rng, index_t count) {
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<std::size_t>(count));
  for (auto& x : v)
    x = nd(rng);
  return v;
}

/// Calls f.template operator()<W, L>() for a wavelet name and level chosen at run time.
template <class Fn>
void dispatch(const std::string& wavelet, int level, Fn&& f) {
  auto by_level = [&]<class W>() {
    switch (level) {
      case 1:
        return f.template operator()<W, 1>();
      case 2:
        return f.template operator()<W, 2>();
      case 3:
        return f.template operator()<W, 3>();
      case 4:
        return f.template operator()<W, 4>();
      case 6:
        return f.template operator()<W, 6>();
      default:
        FAIL("level not instantiated in the test: " << level);
    }
  };
  if (wavelet == "haar")
    by_level.template operator()<Haar>();
  else if (wavelet == "db2")
    by_level.template operator()<Db2>();
  else if (wavelet == "db4")
    by_level.template operator()<Db4>();
  else
    FAIL("unknown wavelet " << wavelet);
}

/// Element (line, k) of a matrix whose lines run along `axis`.
float at(const std::vector<float>& v, Shape s, Axis axis, index_t line, index_t k) {
  const index_t i = axis == Axis::rows ? line * s.cols + k : k * s.cols + line;
  return v[static_cast<std::size_t>(i)];
}
index_t line_count(Shape s, Axis axis) {
  return axis == Axis::rows ? s.rows : s.cols;
}
index_t line_len(Shape s, Axis axis) {
  return axis == Axis::rows ? s.cols : s.rows;
}

double line_norm(const std::vector<float>& v, Shape s, Axis axis, index_t line) {
  double sum = 0.0;
  for (index_t k = 0; k < line_len(s, axis); ++k) {
    const double x = at(v, s, axis, line, k);
    sum += x * x;
  }
  return std::sqrt(sum);
}

/// Largest |got - want| over each line, divided by the tolerance of that line (pass: <= 1).
/// The tolerance's norm is taken over the lines of `scale` (same line count, its own shape).
double worst_ratio(const std::vector<float>& got, const std::vector<double>& want, Shape s,
                   Axis axis, const std::vector<float>& scale, Shape scale_shape) {
  double worst = 0.0;
  for (index_t line = 0; line < line_count(s, axis); ++line) {
    const double tol = kRel * line_norm(scale, scale_shape, axis, line) + kAbs;
    for (index_t k = 0; k < line_len(s, axis); ++k) {
      const index_t i = axis == Axis::rows ? line * s.cols + k : k * s.cols + line;
      const double err =
          std::fabs(got[static_cast<std::size_t>(i)] - want[static_cast<std::size_t>(i)]);
      worst = std::max(worst, err / tol);
    }
  }
  return worst;
}

nlohmann::json load(const std::string& name) {
  std::ifstream in(std::string(SLIMGRAD_TEST_DATA_DIR) + "/" + name);
  REQUIRE_MESSAGE(in.good(), "missing test data " << name << " (run tests/reference/gen_dwt.py)");
  return nlohmann::json::parse(in);
}

template <class W, int L>
using Cpu = impl<Dwt<W, L>, backend::cpu>;

/// Forward then inverse; returns the worst |x - inverse(forward(x))| / (1e-5·‖line‖ + 1e-7).
template <class W, int L>
double round_trip_ratio(Shape shape, BoundaryMode mode, Axis axis, std::mt19937& rng,
                        index_t extra_ld = 0) {
  Cpu<W, L> t({mode, axis});
  const auto s = t.init(shape, 7);
  const Shape cs = t.coeff_shape(shape);
  const index_t gld = shape.cols + extra_ld, cld = cs.cols + extra_ld;
  std::vector<float> g = random_vector(rng, shape.rows * gld);
  std::vector<float> c(static_cast<std::size_t>(cs.rows * cld), NAN);
  std::vector<float> back(static_cast<std::size_t>(shape.rows * gld), NAN);
  t.forward(s, HostView<const float>(g.data(), shape.rows, shape.cols, gld),
            HostView<float>(c.data(), cs.rows, cs.cols, cld));
  t.inverse(s, HostView<const float>(c.data(), cs.rows, cs.cols, cld),
            HostView<float>(back.data(), shape.rows, shape.cols, gld));
  // Compact copies for the comparison.
  std::vector<float> gc, bc;
  for (index_t i = 0; i < shape.rows; ++i)
    for (index_t j = 0; j < shape.cols; ++j) {
      gc.push_back(g[static_cast<std::size_t>(i * gld + j)]);
      bc.push_back(back[static_cast<std::size_t>(i * gld + j)]);
    }
  return worst_ratio(bc, std::vector<double>(gc.begin(), gc.end()), shape, axis, gc, shape);
}

}  // namespace

TEST_CASE("dwt: wavelet filters are pywt's and orthonormal") {
  auto check = [](auto w) {
    using W = decltype(w);
    double norm_lo = 0, norm_hi = 0, dot = 0;
    for (int k = 0; k < W::filter_length; ++k) {
      CHECK(W::rec_lo[k] == W::dec_lo[W::filter_length - 1 - k]);
      CHECK(W::rec_hi[k] == W::dec_hi[W::filter_length - 1 - k]);
      norm_lo += W::dec_lo[k] * W::dec_lo[k];
      norm_hi += W::dec_hi[k] * W::dec_hi[k];
      dot += W::dec_lo[k] * W::dec_hi[k];
    }
    CHECK(norm_lo == doctest::Approx(1.0).epsilon(1e-14));
    CHECK(norm_hi == doctest::Approx(1.0).epsilon(1e-14));
    CHECK(std::fabs(dot) < 1e-14);
  };
  check(Haar{});
  check(Db2{});
  check(Db4{});
  // Spot values from pywt 1.1.1 (pywt.Wavelet('db4').dec_lo[7], pywt.Wavelet('db2').rec_hi[3]).
  CHECK(Db4::dec_lo[7] == 0.2303778133088965);
  CHECK(Db2::rec_hi[3] == -0.48296291314453416);
}

TEST_CASE("dwt: layout lengths equal pywt's, levels beyond dwt_max_level included") {
  const auto data = load("dwt_lengths.json");
  int checked = 0;
  for (const auto& row : data["lengths"]) {
    const std::string wavelet = row[0];
    const BoundaryMode mode = transforms::parse_boundary_mode(row[1].get<std::string>());
    const int level = row[2];
    const index_t n = row[3];
    const std::vector<index_t> want = row[4];
    dispatch(wavelet, level, [&]<class W, int L>() {
      const transforms::DwtLayout lay = Dwt<W, L>::layout(n, mode);
      INFO(wavelet << " " << to_string(mode) << " L=" << L << " n=" << n);
      REQUIRE(want.size() == static_cast<std::size_t>(L + 1));
      CHECK(lay.n == n);
      CHECK(lay.approx_length() == want[0]);
      CHECK(lay.approx_offset() == 0);
      index_t offset = want[0], total = want[0];
      for (int l = L; l >= 1; --l) {
        const index_t len = want[static_cast<std::size_t>(L - l + 1)];
        CHECK(lay.detail_length(l) == len);
        CHECK(lay.detail_offset[l] == offset);
        offset += len;
        total += len;
      }
      CHECK(lay.total == total);
      // K determines N_L (tracked() relies on it).
      CHECK(transforms::dwt_approx_length_for_total(total, W::filter_length, L, mode) == want[0]);
      ++checked;
    });
  }
  CHECK(checked > 900);
}

TEST_CASE("dwt: forward and inverse equal pywt wavedec / waverec") {
  for (const char* file :
       {"dwt_reference_haar.json", "dwt_reference_db2.json", "dwt_reference_db4.json"}) {
    const auto data = load(file);
    int cases = 0;
    for (const auto& c : data["cases"]) {
      const std::string wavelet = c["wavelet"];
      const int level = c["level"];
      const BoundaryMode mode = transforms::parse_boundary_mode(c["mode"].get<std::string>());
      const Axis axis = transforms::parse_axis(c["axis"].get<std::string>());
      const Shape shape{c["rows"].get<index_t>(), c["cols"].get<index_t>()};
      const std::uint64_t salt = c["salt"];
      const std::vector<index_t> lengths = c["lengths"];
      const std::vector<double> want_coeffs = c["coeffs"];
      const std::vector<double> want_recon = c["recon"];
      INFO(wavelet << " L=" << level << " " << to_string(mode) << " axis " << to_string(axis)
                   << " shape " << shape.rows << "x" << shape.cols << " salt " << salt);
      dispatch(wavelet, level, [&]<class W, int L>() {
        Cpu<W, L> t({mode, axis});
        const auto s = t.init(shape, 0);
        const Shape cs = t.coeff_shape(shape);
        REQUIRE(static_cast<std::size_t>(cs.size()) == want_coeffs.size());
        const transforms::DwtLayout lay = t.layout(shape);
        CHECK(lay.approx_length() == lengths[0]);
        for (int l = 1; l <= L; ++l)
          CHECK(lay.detail_length(l) == lengths[static_cast<std::size_t>(L - l + 1)]);

        const std::vector<float> g = hash_vector(salt, shape.size());
        std::vector<float> coeffs(static_cast<std::size_t>(cs.size()), NAN);
        t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
                  host_view(coeffs.data(), cs.rows, cs.cols));
        CHECK(worst_ratio(coeffs, want_coeffs, cs, axis, g, shape) <= 1.0);

        const std::vector<float> rc = hash_vector(salt + 1, cs.size());
        std::vector<float> recon(static_cast<std::size_t>(shape.size()), NAN);
        t.inverse(s, host_view<const float>(rc.data(), cs.rows, cs.cols),
                  host_view(recon.data(), shape.rows, shape.cols));
        CHECK(worst_ratio(recon, want_recon, shape, axis, rc, cs) <= 1.0);
      });
      ++cases;
    }
    CHECK(cases > 50);
  }
}

TEST_CASE("dwt: round trip on random data, many shapes, padded leading dimensions") {
  const unsigned seed = 20240601;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<index_t> len(1, 300), other(1, 6), pad(0, 5);
  for (int trial = 0; trial < 40; ++trial) {
    for (BoundaryMode mode : {BoundaryMode::zero, BoundaryMode::periodization})
      for (Axis axis : {Axis::rows, Axis::cols}) {
        const index_t n = len(rng), o = other(rng), extra = pad(rng);
        const Shape shape = axis == Axis::rows ? Shape{o, n} : Shape{n, o};
        INFO("trial " << trial << " shape " << shape.rows << "x" << shape.cols << " ld +" << extra
                      << " " << to_string(mode) << " " << to_string(axis));
        CHECK(round_trip_ratio<Haar, 1>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Haar, 2>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Haar, 5>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Db2, 2>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Db2, 3>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Db4, 1>(shape, mode, axis, rng, extra) <= 1.0);
        CHECK(round_trip_ratio<Db4, 4>(shape, mode, axis, rng, extra) <= 1.0);
      }
  }
  // Large enough to take the OpenMP path, with LLaMA-1B's odd intermediate width.
  CHECK(round_trip_ratio<Haar, 2>({64, 5461}, BoundaryMode::zero, Axis::rows, rng) <= 1.0);
  CHECK(round_trip_ratio<Db4, 2>({5461, 40}, BoundaryMode::periodization, Axis::cols, rng) <= 1.0);
  // Levels far beyond dwt_max_level (allowed, as in pywt).
  CHECK(round_trip_ratio<Db4, 8>({3, 5}, BoundaryMode::zero, Axis::rows, rng) <= 1.0);
  CHECK(round_trip_ratio<Db4, 8>({3, 5}, BoundaryMode::periodization, Axis::rows, rng) <= 1.0);
}

TEST_CASE(
    "dwt: energy is preserved (orthonormal): zero mode at any length, periodization "
    "when every level length is even") {
  const unsigned seed = 77;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  auto energy_ratio = [&]<class W, int L>(Shape shape, BoundaryMode mode, Axis axis) {
    Cpu<W, L> t({mode, axis});
    const auto s = t.init(shape, 0);
    const Shape cs = t.coeff_shape(shape);
    const std::vector<float> g = random_vector(rng, shape.size());
    std::vector<float> c(static_cast<std::size_t>(cs.size()));
    t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
              host_view(c.data(), cs.rows, cs.cols));
    double eg = 0, ec = 0;
    for (float x : g)
      eg += static_cast<double>(x) * x;
    for (float x : c)
      ec += static_cast<double>(x) * x;
    return ec / eg;
  };
  for (index_t n : {1, 2, 3, 7, 33, 100, 129}) {
    INFO("n " << n);
    CHECK(energy_ratio.operator()<Haar, 3>({4, n}, BoundaryMode::zero, Axis::rows) ==
          doctest::Approx(1.0).epsilon(kRel));
    CHECK(energy_ratio.operator()<Db2, 2>({n, 3}, BoundaryMode::zero, Axis::cols) ==
          doctest::Approx(1.0).epsilon(kRel));
    CHECK(energy_ratio.operator()<Db4, 3>({4, n}, BoundaryMode::zero, Axis::rows) ==
          doctest::Approx(1.0).epsilon(kRel));
  }
  for (index_t n : {8, 16, 64, 200, 1024}) {
    INFO("n " << n);
    CHECK(energy_ratio.operator()<Haar, 3>({4, n}, BoundaryMode::periodization, Axis::rows) ==
          doctest::Approx(1.0).epsilon(kRel));
    CHECK(energy_ratio.operator()<Db2, 3>({n, 3}, BoundaryMode::periodization, Axis::cols) ==
          doctest::Approx(1.0).epsilon(kRel));
    CHECK(energy_ratio.operator()<Db4, 3>({4, n}, BoundaryMode::periodization, Axis::rows) ==
          doctest::Approx(1.0).epsilon(kRel));
  }
  // Periodization is then square and orthogonal: forward(inverse(c)) == c as well.
  Cpu<Db4, 2> t({BoundaryMode::periodization, Axis::rows});
  const auto s = t.init({3, 64}, 0);
  const std::vector<float> c = random_vector(rng, 3 * 64);
  std::vector<float> x(3 * 64), c2(3 * 64);
  t.inverse(s, host_view<const float>(c.data(), 3, 64), host_view(x.data(), 3, 64));
  t.forward(s, host_view<const float>(x.data(), 3, 64), host_view(c2.data(), 3, 64));
  CHECK(worst_ratio(c2, std::vector<double>(c.begin(), c.end()), {3, 64}, Axis::rows, c, {3, 64}) <=
        1.0);
}

TEST_CASE("dwt: Haar matches a plain double loop of algorithms.md §1.1 and the closed form") {
  // §1.1: a_l = (a[2k] + a[2k+1])/√2, d_l = (a[2k] - a[2k+1])/√2; odd length: append a zero.
  auto haar_reference = [](std::vector<double> a, int levels) {
    std::vector<std::vector<double>> details;
    for (int l = 0; l < levels; ++l) {
      if (a.size() % 2 != 0) a.push_back(0.0);
      std::vector<double> na(a.size() / 2), nd(a.size() / 2);
      for (std::size_t k = 0; k < na.size(); ++k) {
        na[k] = (a[2 * k] + a[2 * k + 1]) / std::sqrt(2.0);
        nd[k] = (a[2 * k] - a[2 * k + 1]) / std::sqrt(2.0);
      }
      details.push_back(nd);
      a = na;
    }
    std::vector<double> packed = a;
    for (int l = levels - 1; l >= 0; --l)
      packed.insert(packed.end(), details[static_cast<std::size_t>(l)].begin(),
                    details[static_cast<std::size_t>(l)].end());
    return packed;
  };
  const unsigned seed = 5;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  auto check = [&]<int L>(index_t n) {
    Cpu<Haar, L> t;
    const auto s = t.init({2, n}, 0);
    const Shape cs = t.coeff_shape({2, n});
    const std::vector<float> g = random_vector(rng, 2 * n);
    std::vector<float> c(static_cast<std::size_t>(cs.size()));
    t.forward(s, host_view<const float>(g.data(), 2, n), host_view(c.data(), cs.rows, cs.cols));
    std::vector<double> want;
    for (index_t i = 0; i < 2; ++i) {
      const auto r =
          haar_reference(std::vector<double>(g.begin() + i * n, g.begin() + (i + 1) * n), L);
      REQUIRE(static_cast<index_t>(r.size()) == cs.cols);
      want.insert(want.end(), r.begin(), r.end());
    }
    CHECK(worst_ratio(c, want, cs, Axis::rows, g, {2, n}) <= 1.0);
    if (n % (index_t{1} << L) == 0) {
      // Closed form: a_L[k] = 2^{-L/2} Σ_{j<2^L} x[2^L k + j].
      const index_t b = index_t{1} << L;
      for (index_t k = 0; k < n / b; ++k) {
        double sum = 0;
        for (index_t j = 0; j < b; ++j)
          sum += g[static_cast<std::size_t>(b * k + j)];
        CHECK(c[static_cast<std::size_t>(k)] ==
              doctest::Approx(sum / std::pow(2.0, L / 2.0)).epsilon(1e-5));
      }
    }
  };
  for (index_t n : {1, 2, 3, 5, 8, 13, 64, 100, 5461}) {
    INFO("n " << n);
    check.operator()<1>(n);
    check.operator()<2>(n);
    check.operator()<3>(n);
  }
}

TEST_CASE("dwt: shapes, tracked block and coefficient layout contract") {
  Cpu<Haar, 2> rows;
  CHECK(rows.coeff_shape({3, 5461}) == Shape{3, 1366 + 1366 + 2731});
  CHECK(rows.layout({3, 5461}).approx_length() == 1366);  // algorithms.md §1.1: 5461→2731→1366
  CHECK(rows.state_bytes({3, 5461}) == 0);
  std::vector<float> buf(3 * 5463);
  auto tr = rows.tracked(host_view(buf.data(), 3, 5463));
  CHECK(tr.shape() == Shape{3, 1366});
  CHECK(tr.ld == 5463);
  CHECK(tr.data == buf.data());
  CHECK_THROWS_AS(rows.tracked(host_view(buf.data(), 3, 0)), Error);

  Cpu<Db4, 3> cols({BoundaryMode::periodization, Axis::cols});
  CHECK(cols.coeff_shape({100, 7}) == Shape{13 + 13 + 25 + 50, 7});
  std::vector<float> cb(101 * 7);
  auto tc = cols.tracked(HostView<const float>(cb.data(), 101, 7));
  CHECK(tc.shape() == Shape{13, 7});
  CHECK(transforms::Dwt<Db4, 3>::tracked_shape(
            {100, 7}, {BoundaryMode::periodization, Axis::cols}) == Shape{13, 7});
  {
    auto st = cols.init({100, 7}, 1);
    CHECK_FALSE(cols.refresh(st, HostView<const float>(cb.data(), 100, 7), 0));
    static_assert(std::is_empty_v<decltype(st)>);
  }
}

TEST_CASE("dwt: invalid arguments throw before anything is written") {
  Cpu<Db2, 2> t;
  const auto s = t.init({2, 10}, 0);
  const Shape cs = t.coeff_shape({2, 10});
  std::vector<float> g(20, 1.0f), c(static_cast<std::size_t>(cs.size()) + 8, -3.0f);
  CHECK_THROWS_AS(t.init({0, 10}, 0), Error);
  CHECK_THROWS_AS(t.init({2, 0}, 0), Error);
  CHECK_THROWS_AS(t.forward(s, host_view<const float>(g.data(), 2, 10),
                            host_view(c.data(), cs.rows, cs.cols + 1)),
                  Error);
  CHECK_THROWS_AS(
      t.forward(s, host_view<const float>(g.data(), 0, 10), host_view(c.data(), 0, cs.cols)),
      Error);
  CHECK_THROWS_AS(
      t.inverse(s, host_view<const float>(c.data(), cs.rows, cs.cols), host_view(g.data(), 2, 5)),
      Error);
  // n = 9 packs to the same K as n = 10 (6 + 4 + 4): the output view decides n, so it is valid.
  CHECK(t.coeff_shape({2, 9}) == cs);
  CHECK_THROWS_AS(t.forward(s, HostView<const float>(g.data(), 2, 10, 5),
                            host_view(c.data(), cs.rows, cs.cols)),
                  Error);  // leading dimension < width
  // Partial overlap (not the supported in-place configuration).
  CHECK_THROWS_AS(t.forward(s, host_view<const float>(c.data() + 1, 2, 10),
                            host_view(c.data(), cs.rows, cs.cols)),
                  Error);
  for (std::size_t i = 0; i < c.size(); ++i)
    REQUIRE(c[i] == -3.0f);  // nothing written
  using Opt = Dwt<Db2, 2>::Options;
  CHECK_THROWS_AS((Cpu<Db2, 2>(Opt{static_cast<BoundaryMode>(7), Axis::rows})), Error);
  CHECK_THROWS_AS((Cpu<Db2, 2>(Opt{BoundaryMode::zero, static_cast<Axis>(9)})), Error);
  CHECK_THROWS_AS(transforms::parse_boundary_mode("symmetric"), Error);
  CHECK_THROWS_AS(transforms::parse_axis("depth"), Error);
  CHECK(transforms::parse_boundary_mode("per") == BoundaryMode::periodization);
}

TEST_CASE("dwt: in place equals out of place; scratch grows once") {
  const unsigned seed = 99;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  auto check = [&]<class W, int L>(Shape shape, BoundaryMode mode, Axis axis) {
    INFO(W::name << " L=" << L << " " << shape.rows << "x" << shape.cols << " " << to_string(mode)
                 << " " << to_string(axis));
    Cpu<W, L> t({mode, axis});
    const auto s = t.init(shape, 0);
    const Shape cs = t.coeff_shape(shape);
    const index_t ld = cs.cols + 3;  // padded, shared by G and the coefficients
    const std::vector<float> g = random_vector(rng, shape.size());
    std::vector<float> ref(static_cast<std::size_t>(cs.size()));
    t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
              host_view(ref.data(), cs.rows, cs.cols));
    std::vector<float> buf(static_cast<std::size_t>(cs.rows * ld), NAN);
    for (index_t i = 0; i < shape.rows; ++i)
      for (index_t j = 0; j < shape.cols; ++j)
        buf[static_cast<std::size_t>(i * ld + j)] = g[static_cast<std::size_t>(i * shape.cols + j)];
    t.forward(s, HostView<const float>(buf.data(), shape.rows, shape.cols, ld),
              HostView<float>(buf.data(), cs.rows, cs.cols, ld));
    for (index_t i = 0; i < cs.rows; ++i)
      for (index_t j = 0; j < cs.cols; ++j)
        REQUIRE(buf[static_cast<std::size_t>(i * ld + j)] ==
                ref[static_cast<std::size_t>(i * cs.cols + j)]);
    std::vector<float> back(static_cast<std::size_t>(shape.size()));
    t.inverse(s, host_view<const float>(ref.data(), cs.rows, cs.cols),
              host_view(back.data(), shape.rows, shape.cols));
    t.inverse(s, HostView<const float>(buf.data(), cs.rows, cs.cols, ld),
              HostView<float>(buf.data(), shape.rows, shape.cols, ld));
    for (index_t i = 0; i < shape.rows; ++i)
      for (index_t j = 0; j < shape.cols; ++j)
        REQUIRE(buf[static_cast<std::size_t>(i * ld + j)] ==
                back[static_cast<std::size_t>(i * shape.cols + j)]);
    // Steady state: repeated calls do not grow the scratch.
    const std::size_t ws = t.workspace_bytes();
    t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
              host_view(ref.data(), cs.rows, cs.cols));
    t.inverse(s, host_view<const float>(ref.data(), cs.rows, cs.cols),
              host_view(back.data(), shape.rows, shape.cols));
    CHECK(t.workspace_bytes() == ws);
  };
  for (BoundaryMode mode : {BoundaryMode::zero, BoundaryMode::periodization}) {
    check.operator()<Haar, 1>({5, 7}, mode, Axis::rows);
    check.operator()<Haar, 2>({64, 1001}, mode, Axis::rows);
    check.operator()<Db2, 3>({4, 33}, mode, Axis::rows);
    check.operator()<Db4, 2>({80, 517}, mode, Axis::rows);
    check.operator()<Haar, 2>({33, 5}, mode, Axis::cols);
    check.operator()<Db4, 3>({517, 130}, mode, Axis::cols);
  }
}

TEST_CASE("dwt: rows computed in parallel equal rows computed one at a time") {
  const unsigned seed = 3;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  const Shape shape{96, 777};
  Cpu<Db4, 2> t({BoundaryMode::periodization, Axis::rows});
  const auto s = t.init(shape, 0);
  const Shape cs = t.coeff_shape(shape);
  const std::vector<float> g = random_vector(rng, shape.size());
  std::vector<float> all(static_cast<std::size_t>(cs.size())),
      one(static_cast<std::size_t>(cs.cols));
  t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
            host_view(all.data(), cs.rows, cs.cols));
  Cpu<Db4, 2> single({BoundaryMode::periodization, Axis::rows});
  for (index_t i = 0; i < shape.rows; ++i) {
    single.forward(s, host_view<const float>(g.data() + i * shape.cols, 1, shape.cols),
                   host_view(one.data(), 1, cs.cols));
    for (index_t j = 0; j < cs.cols; ++j)
      REQUIRE(one[static_cast<std::size_t>(j)] == all[static_cast<std::size_t>(i * cs.cols + j)]);
  }
}

TEST_CASE("dwt: outputs large enough for streaming stores equal the cached path") {
  // >= 16 MiB of output takes the non-temporal path; a leading dimension of K + 1 misaligns
  // every row so that the aligned body, the head and the tail of stream_copy all run.
  const unsigned seed = 11;
  MESSAGE("seed " << seed);
  std::mt19937 rng(seed);
  const Shape shape{1100, 4001};
  Cpu<Haar, 2> t;
  const auto s = t.init(shape, 0);
  const Shape cs = t.coeff_shape(shape);
  const index_t ld = cs.cols + 1;
  REQUIRE(static_cast<std::size_t>(cs.rows * ld) * sizeof(float) >= (std::size_t{16} << 20));
  const std::vector<float> g = random_vector(rng, shape.size());
  std::vector<float> all(static_cast<std::size_t>(cs.rows * ld), NAN);
  t.forward(s, host_view<const float>(g.data(), shape.rows, shape.cols),
            HostView<float>(all.data(), cs.rows, cs.cols, ld));
  std::vector<float> back(static_cast<std::size_t>(shape.rows * ld), NAN);
  t.inverse(s, HostView<const float>(all.data(), cs.rows, cs.cols, ld),
            HostView<float>(back.data(), shape.rows, shape.cols, ld));
  Cpu<Haar, 2> single;
  std::vector<float> one(static_cast<std::size_t>(cs.cols)),
      row(static_cast<std::size_t>(shape.cols));
  bool same = true;
  for (index_t i = 0; i < shape.rows; ++i) {
    single.forward(s, host_view<const float>(g.data() + i * shape.cols, 1, shape.cols),
                   host_view(one.data(), 1, cs.cols));
    single.inverse(s, host_view<const float>(one.data(), 1, cs.cols),
                   host_view(row.data(), 1, shape.cols));
    for (index_t j = 0; j < cs.cols; ++j)
      same = same && one[static_cast<std::size_t>(j)] == all[static_cast<std::size_t>(i * ld + j)];
    for (index_t j = 0; j < shape.cols; ++j)
      same = same && row[static_cast<std::size_t>(j)] == back[static_cast<std::size_t>(i * ld + j)];
    CHECK(std::isnan(all[static_cast<std::size_t>(i * ld + cs.cols)]));  // padding untouched
  }
  CHECK(same);
}
