// Benchmarks of GWT's DWT on the CPU backend (transforms::Dwt, algorithms.md §1.1).
//
// One iteration = forward then inverse of an N×N float32 matrix along rows (GWT's layout).
// bytes_per_second counts what must cross memory: forward reads G and writes the coefficients,
// inverse reads them and writes the result: 2 passes × (read + write) × 4 bytes × N² (the
// coefficients are N² floats for Haar at even N; db4 writes a few more, ignored here).
// dwt_memcpy_baseline copies the same bytes with std::memcpy (two N² copies), so
// time(memcpy) / time(dwt) is the fraction of this machine's copy bandwidth the DWT reaches.
// bench/compare_pywt.py runs these next to PyWavelets and prints the table.
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <slimgrad/slimgrad.hpp>
#include <vector>

namespace {

using namespace slimgrad;

std::vector<float> random_matrix(index_t rows, index_t cols) {
  std::mt19937 rng(12345);
  std::normal_distribution<float> nd;
  std::vector<float> v(static_cast<std::size_t>(rows * cols));
  for (auto& x : v)
    x = nd(rng);
  return v;
}

double pass_bytes(index_t n) {
  return 2.0 * 2.0 * 4.0 * static_cast<double>(n) * static_cast<double>(n);
}

template <class W, int L, bool Forward = true, bool Inverse = true>
void dwt_rows(benchmark::State& state) {
  const index_t n = state.range(0);
  impl<transforms::Dwt<W, L>, backend::cpu> t;
  const auto s = t.init({n, n}, 0);
  const Shape cs = t.coeff_shape({n, n});
  const std::vector<float> g = random_matrix(n, n);
  std::vector<float> c(static_cast<std::size_t>(cs.size())), out(g.size());
  const auto gv = host_view<const float>(g.data(), n, n);
  const auto cv = host_view(c.data(), cs.rows, cs.cols);
  const auto ov = host_view(out.data(), n, n);
  t.forward(s, gv, cv);  // grow the scratch, touch every page
  t.inverse(s, cv, ov);
  for (auto _ : state) {
    if constexpr (Forward) t.forward(s, gv, cv);
    if constexpr (Inverse) t.inverse(s, cv, ov);
    benchmark::DoNotOptimize(c.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double passes = (Forward ? 1.0 : 0.0) + (Inverse ? 1.0 : 0.0);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(pass_bytes(n) * passes / 2.0));
}

void dwt_memcpy_baseline(benchmark::State& state) {
  const index_t n = state.range(0);
  const std::vector<float> a = random_matrix(n, n);
  std::vector<float> b(a.size()), c(a.size());
  const std::size_t bytes = a.size() * sizeof(float);
  std::memcpy(b.data(), a.data(), bytes);
  std::memcpy(c.data(), b.data(), bytes);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);  // "forward": read G, write coefficients
    std::memcpy(c.data(), b.data(), bytes);  // "inverse": read them, write the result
    benchmark::DoNotOptimize(b.data());
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(pass_bytes(n)));
}

using transforms::Db2;
using transforms::Db4;
using transforms::Haar;

}  // namespace

BENCHMARK(dwt_memcpy_baseline)->Arg(4096)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Haar, 1>)
    ->Name("dwt_haar_L1_fwd_inv")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Haar, 2>)
    ->Name("dwt_haar_L2_fwd_inv")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Db2, 2>)
    ->Name("dwt_db2_L2_fwd_inv")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Db4, 2>)
    ->Name("dwt_db4_L2_fwd_inv")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Haar, 2, true, false>)
    ->Name("dwt_haar_L2_fwd")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(dwt_rows<Haar, 2, false, true>)
    ->Name("dwt_haar_L2_inv")
    ->Arg(4096)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
