// Benchmarks of the SVD-based transforms (GaLore's refresh, the randomized range finder,
// SubTrack's geodesic tracking step) on a 4096×4096 gradient at rank 128.
//
// The gradient has a realistic decaying spectrum: G = A·diag(s)·B + noise, with Gaussian
// factors A (4096×1024), B (1024×4096) scaled to unit-norm columns/rows, s_i = (i+1)^-1 and
// i.i.d. N(0, 0.002²/4096) noise, i.e. a power-law head over a noise bulk (the singular values
// are printed once). Run (slow: the exact SVD takes seconds per iteration):
//   slimgrad_bench --benchmark_filter='Svd|Grassmann'
// The exact refresh runs first and keeps its basis; the randomized benchmark reports the
// principal angles (max and mean, degrees) of its basis to that exact subspace as counters.
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <random>
#include <slimgrad/backend/cpu/grassmann.hpp>
#include <slimgrad/backend/cpu/svd_projection.hpp>
#include <vector>

namespace {

using namespace slimgrad;
using SvdImpl = impl<transforms::SvdProjection, backend::cpu>;
using GrImpl = impl<transforms::Grassmann, backend::cpu>;

constexpr index_t kDim = 4096;
constexpr index_t kRank = 128;
constexpr index_t kFactor = 1024;

// The gradient (and a second one, G + a small change, for the tracking step), built once.
struct Problem {
  cpu::RowMatrix g, g_next;
  cpu::RowMatrix exact_basis;  // set by the exact benchmark

  Problem() {
    std::mt19937_64 rng(20250101);
    std::normal_distribution<float> nd;
    auto fill = [&](cpu::RowMatrix& m, float scale) {
      for (index_t i = 0; i < m.rows(); ++i)
        for (index_t j = 0; j < m.cols(); ++j)
          m(i, j) = scale * nd(rng);
    };
    cpu::RowMatrix a(kDim, kFactor), b(kFactor, kDim);
    fill(a, 1.0f / std::sqrt(float(kDim)));
    fill(b, 1.0f / std::sqrt(float(kDim)));
    for (index_t i = 0; i < kFactor; ++i)
      a.col(i) *= 1.0f / float(i + 1);
    g.resize(kDim, kDim);
    g.noalias() = a * b;
    cpu::RowMatrix noise(kDim, kDim);
    fill(noise, 0.002f / std::sqrt(float(kDim)));
    g += noise;
    // The next gradient: mostly the same head, a fresh noise draw and a perturbed factor.
    fill(a, 0.2f / std::sqrt(float(kDim)));
    g_next = g;
    g_next.noalias() += a.leftCols(64) * b.topRows(64);
    fill(noise, 0.002f / std::sqrt(float(kDim)));
    g_next += noise;
  }
};

Problem& problem() {
  static Problem p;
  return p;
}

// Principal angles (degrees) between the spans of two dim0×r orthonormal bases stored as
// P (r×n, right side): θ_i = asin σ_i((I − S_e S_eᵀ) S).
std::pair<double, double> angles_deg(const cpu::RowMatrix& p, const cpu::RowMatrix& p_exact) {
  const Eigen::MatrixXd s = p.transpose().cast<double>();
  const Eigen::MatrixXd e = p_exact.transpose().cast<double>();
  const Eigen::MatrixXd resid = s - e * (e.transpose() * s);
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(resid);
  const Eigen::VectorXd sv = svd.singularValues();
  double mx = 0, mean = 0;
  for (index_t i = 0; i < sv.size(); ++i) {
    const double a = std::asin(std::min(1.0, sv[i])) * 180.0 / 3.14159265358979323846;
    mx = std::max(mx, a);
    mean += a;
  }
  return {mx, mean / double(sv.size())};
}

void print_spectrum_once() {
  static bool done = false;
  if (done) return;
  done = true;
  // Singular values of the benchmark gradient from a cheap randomized estimate of the head
  // (r + p = 300, q = 4): printed so the results can be judged against the spectrum.
  Problem& pr = problem();
  cpu::ColMatrix u;
  cpu::SvdWorkspace ws;
  (void)cpu::randomized_top_singular_vectors(cpu::as_eigen(cpu::as_view(pr.g)), 300, 10, 4,
                                             random::Key{1, 2, 0}, u, ws);
  const Eigen::VectorXf sv = (u.transpose() * pr.g).rowwise().norm();
  std::printf(
      "# gradient spectrum (estimate): s1 %.4g  s64 %.4g  s128 %.4g  s129 %.4g  s256 %.4g"
      "  s300 %.4g\n",
      double(sv[0]), double(sv[63]), double(sv[127]), double(sv[128]), double(sv[255]),
      double(sv[299]));
}

void BM_SvdRefreshExact(benchmark::State& state) {
  Problem& pr = problem();
  print_spectrum_once();
  SvdImpl svd({.rank = kRank, .method = transforms::SvdMethod::exact});
  auto s = svd.init({kDim, kDim}, tensor_id("bench.w"));
  const HostView<const float> gv = cpu::as_view(pr.g);
  for (auto _ : state) {
    svd.refresh_now(s, gv, 0, {});
    benchmark::DoNotOptimize(s.basis.data());
  }
  pr.exact_basis = s.basis;
  state.counters["status_ok"] = s.last_refresh_status == transforms::RefreshStatus::ok;
}

void BM_SvdRefreshRandomized(benchmark::State& state) {
  Problem& pr = problem();
  const index_t q = state.range(0);
  SvdImpl svd({.rank = kRank,
               .method = transforms::SvdMethod::randomized,
               .oversampling = 10,
               .power_iterations = q,
               .seed = 7});
  auto s = svd.init({kDim, kDim}, tensor_id("bench.w"));
  const HostView<const float> gv = cpu::as_view(pr.g);
  for (auto _ : state) {
    svd.refresh_now(s, gv, 0, {});
    benchmark::DoNotOptimize(s.basis.data());
  }
  const double ell = double(kRank + 10);
  const double flops = double(2 * q + 2) * 2.0 * double(kDim) * double(kDim) * ell;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  if (pr.exact_basis.size() > 0) {
    const auto [mx, mean] = angles_deg(s.basis, pr.exact_basis);
    state.counters["max_angle_deg"] = mx;
    state.counters["mean_angle_deg"] = mean;
    // What GaLore cares about: the gradient energy the basis captures, ‖G Pᵀ‖² relative to the
    // optimum ‖G P_exactᵀ‖² (1 = as good as the exact SVD).
    const double captured = (pr.g * s.basis.transpose()).squaredNorm();
    const double optimum = (pr.g * pr.exact_basis.transpose()).squaredNorm();
    state.counters["energy_vs_exact"] = captured / optimum;
  }
}

void BM_GrassmannTrackingStep(benchmark::State& state) {
  Problem& pr = problem();
  GrImpl gr({.rank = kRank, .update_gap = 1, .eta = 10.0, .reorth_every = state.range(0)});
  auto s = gr.init({kDim, kDim}, tensor_id("bench.w"));
  if (pr.exact_basis.size() > 0) {
    s.basis = pr.exact_basis;  // start from the exact subspace, as SubTrack does at k = 0
  } else {
    GrImpl init({.rank = kRank, .init_method = transforms::SvdMethod::randomized});
    init.refresh(s, cpu::as_view(pr.g), 0);
  }
  const HostView<const float> gv = cpu::as_view(pr.g_next);
  index_t k = 1;
  for (auto _ : state) {
    gr.track_now(s, gv, k++, {});
    benchmark::DoNotOptimize(s.basis.data());
  }
  const double flops = 4.0 * double(kDim) * double(kDim) * double(kRank);
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["angle_rad"] = s.last_angle;
}

void BM_SvdForward(benchmark::State& state) {
  Problem& pr = problem();
  SvdImpl svd({.rank = kRank, .method = transforms::SvdMethod::randomized});
  auto s = svd.init({kDim, kDim}, 1);
  svd.refresh(s, cpu::as_view(pr.g), 0);
  cpu::RowMatrix c(kDim, kRank);
  for (auto _ : state) {
    svd.forward(s, cpu::as_view(pr.g), cpu::as_view(c));
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(kDim) * double(kDim) * double(kRank) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_SvdInverse(benchmark::State& state) {
  Problem& pr = problem();
  SvdImpl svd({.rank = kRank, .method = transforms::SvdMethod::randomized});
  auto s = svd.init({kDim, kDim}, 1);
  svd.refresh(s, cpu::as_view(pr.g), 0);
  cpu::RowMatrix c = cpu::RowMatrix::Random(kDim, kRank), out(kDim, kDim);
  for (auto _ : state) {
    svd.inverse(s, cpu::as_view(c), cpu::as_view(out));
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(kDim) * double(kDim) * double(kRank) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

// Wall-clock time: Eigen's GEMMs run on all OpenMP threads.
BENCHMARK(BM_SvdRefreshExact)->Iterations(1)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SvdRefreshRandomized)->Arg(2)->Arg(0)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_GrassmannTrackingStep)->Arg(1)->Arg(0)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SvdForward)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SvdInverse)->UseRealTime()->Unit(benchmark::kMillisecond);
