// tools/bench_transform.cpp — `slimgrad bench` (the group) and `slimgrad bench transform`:
// times the DWT's forward + inverse on random data and reports the rate against the bytes the
// two passes must move (design.md §4: benchmarks report rates, not only times).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cli.hpp"

namespace slimgrad::tools {
namespace {

struct BenchTransformArgs {
  std::string wavelet = "haar";
  int levels = 2;
  std::string mode = "zero";
  std::string shape;
  int repeat = 10;
  unsigned seed = 0;
  bool json = false;
};

/// "RxC" → {R, C}; throws with a sentence on anything else.
Shape parse_shape(const std::string& s) {
  const auto x = s.find_first_of("xX");
  auto number = [&](const std::string& part) -> index_t {
    const bool digits =
        !part.empty() && part.size() <= 9 &&
        std::all_of(part.begin(), part.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    require(digits && std::stol(part) > 0,
            "shape '" + s + "' is not ROWSxCOLS with positive integers (e.g. 4096x4096)");
    return std::stol(part);
  };
  require(x != std::string::npos,
          "shape '" + s + "' is not ROWSxCOLS with positive integers (e.g. 4096x4096)");
  const Shape g{number(s.substr(0, x)), number(s.substr(x + 1))};
  require(g.rows * g.cols <= (index_t{1} << 31),
          "shape '" + s + "' has more than 2^31 elements (8 GiB of float32)");
  return g;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <class D>
void bench(const BenchTransformArgs& args, Shape g, transforms::BoundaryMode mode) {
  using clock = std::chrono::steady_clock;
  impl<D, backend::cpu> dwt(typename D::Options{mode, transforms::Axis::rows});
  const auto state = dwt.init(g, 0);
  const Shape cs = dwt.coeff_shape(g);
  std::vector<float> x(static_cast<std::size_t>(g.size()));
  std::vector<float> c(static_cast<std::size_t>(cs.size()));
  std::vector<float> y(static_cast<std::size_t>(g.size()));
  std::mt19937 rng(args.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x)
    v = normal(rng);
  const auto xv = host_view(static_cast<const float*>(x.data()), g.rows, g.cols);
  const auto cv = host_view(c.data(), cs.rows, cs.cols);
  const auto yv = host_view(y.data(), g.rows, g.cols);

  dwt.forward(state, xv, cv);  // warm-up: grows the scratch, faults the pages in
  dwt.inverse(state, cv, yv);
  std::vector<double> fwd, inv, total;
  for (int r = 0; r < args.repeat; ++r) {
    const auto t0 = clock::now();
    dwt.forward(state, xv, cv);
    const auto t1 = clock::now();
    dwt.inverse(state, cv, yv);
    const auto t2 = clock::now();
    fwd.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    inv.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
    total.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
  }
  float max_err = 0.0f;  // a benchmark of a wrong result is worthless
  for (std::size_t i = 0; i < x.size(); ++i)
    max_err = std::max(max_err, std::abs(x[i] - y[i]));
  require(max_err < 1e-3f,
          "bench transform: the round trip is wrong (max error " + std::to_string(max_err) + ")");

  const double bytes =
      2.0 * 4.0 * static_cast<double>(g.rows) * static_cast<double>(g.cols + cs.cols);
  const double med = median(total);
  const double gbps = bytes / (med * 1e-3) / 1e9;
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif
  if (args.json) {
    const nlohmann::json j = {{"command", "bench transform"},
                              {"wavelet", args.wavelet},
                              {"levels", args.levels},
                              {"mode", args.mode},
                              {"shape", {g.rows, g.cols}},
                              {"coeff_cols", cs.cols},
                              {"repeat", args.repeat},
                              {"seed", args.seed},
                              {"threads", threads},
                              {"median_ms", med},
                              {"min_ms", *std::min_element(total.begin(), total.end())},
                              {"forward_median_ms", median(fwd)},
                              {"inverse_median_ms", median(inv)},
                              {"bytes", bytes},
                              {"gbps", gbps},
                              {"max_roundtrip_error", max_err}};
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf(
      "bench transform: %s level %d (%s) on %ldx%ld float32, %d repeats, %d thread%s, "
      "seed %u\n",
      args.wavelet.c_str(), args.levels, args.mode.c_str(), g.rows, g.cols, args.repeat, threads,
      threads == 1 ? "" : "s", args.seed);
  std::printf("  forward          median %9.3f ms\n", median(fwd));
  std::printf("  inverse          median %9.3f ms\n", median(inv));
  std::printf("  forward+inverse  median %9.3f ms  (min %.3f ms)  %.2f GB/s\n", med,
              *std::min_element(total.begin(), total.end()), gbps);
  std::printf("  bytes = 2 x 4 x %ld x (%ld + %ld) = %.0f  (max round-trip error %.2e)\n", g.rows,
              g.cols, cs.cols, bytes, static_cast<double>(max_err));
}

void run_bench_transform(const BenchTransformArgs& args) {
  const WaveletName wavelet = parse_wavelet(args.wavelet);
  const auto mode = transforms::parse_boundary_mode(args.mode);
  const Shape g = parse_shape(args.shape);
  require(args.repeat >= 1, "--repeat must be at least 1, got " + std::to_string(args.repeat));
  with_dwt(wavelet, args.levels,
           [&](auto tag) { bench<typename decltype(tag)::type>(args, g, mode); });
}

}  // namespace

CLI::App& add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Microbenchmarks of slimgrad's transforms");
  bench->require_subcommand(1);
  return *bench;
}

void add_bench_transform_command(CLI::App& bench) {
  auto args = std::make_shared<BenchTransformArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "transform", "Time the DWT forward + inverse on random N(0,1) float32 data");
  add_dwt_options(cmd, args->wavelet, args->levels, args->mode);
  cmd->add_option("--shape", args->shape, "Matrix shape ROWSxCOLS, e.g. 4096x4096")->required();
  cmd->add_option("--repeat", args->repeat, "Timed repetitions after one warm-up")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the random matrix (std::mt19937)")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "Print exactly one JSON object on stdout");
  cmd->footer(
      "Times forward (pywt.wavedec along axis 1) then inverse (waverec) on an R x C matrix,\n"
      "rows in parallel over OpenMP threads (OMP_NUM_THREADS), after one untimed warm-up;\n"
      "reports the median over --repeat runs of forward+inverse.\n"
      "GB/s = bytes / median time, bytes = 2 passes x (read + write) = 2 x 4 x R x (C + K),\n"
      "where K is the packed coefficient width (forward reads R x C floats and writes R x K,\n"
      "inverse reads R x K and writes R x C). Compare with the machine's copy bandwidth.\n"
      "--json keys: median_ms, gbps, shape, wavelet, levels, mode, repeat, seed, threads,\n"
      "min_ms, forward_median_ms, inverse_median_ms, bytes, coeff_cols, max_roundtrip_error.");
  cmd->callback([args] { run_bench_transform(*args); });
}

}  // namespace slimgrad::tools
