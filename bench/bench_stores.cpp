// Benchmarks of the state stores on the CPU backend (backend/cpu/stores.hpp): how fast a moment
// tensor of 16M elements can be widened to fp32 (load) and narrowed back (store), so the cost of
// an optimizer step with a given store can be predicted.
//
// bytes_per_second counts fp32-equivalent bytes: a load produces 4 bytes per element, a store
// consumes 4, a round trip (load then store, what the rule does per step) moves 8. Compare with
// stores_memcpy_baseline (two 64 MiB memcpy = the fp32 round trip at copy bandwidth). Counter
// state_B_per_elem is the store's memory per element. `tile` variants call load/store on
// 64Ki-element tiles, as an engine that streams through scratch does; the others call once.
// stores_q8_quantize / stores_q8_dequantize time the 8-bit kernels alone on cache-resident
// 256-element blocks (as an optimizer step's tiles give them), per instruction set (arg 0:
// 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 VBMI; arg 1: 0 first moment, 1 second moment);
// items_per_second counts elements.
// Run: slimgrad_bench --benchmark_filter=stores
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstring>
#include <random>
#include <slimgrad/backend/cpu/stores.hpp>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace slimgrad;

constexpr index_t kCount = index_t{1} << 24;  // 16M elements
constexpr index_t kTile = index_t{1} << 16;

std::vector<float> moment_values(index_t n, state::Moment kind) {
  std::mt19937 rng(777);
  std::normal_distribution<float> nd(0.0f, 1e-3f);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& x : v) {
    x = nd(rng);
    if (kind == state::Moment::second) x = x * x;
  }
  return v;
}

template <class Store>
impl<Store, backend::cpu> make_impl(bool stochastic) {
  if constexpr (std::is_same_v<Store, state::Bf16>)
    return impl<Store, backend::cpu>(state::Bf16::Options{stochastic, 1});
  else
    return impl<Store, backend::cpu>();
}

// Mode 0: load, 1: store, 2: load + store. tile = 0: one call over all elements.
template <class Store, int Mode, bool Stochastic = false>
void stores(benchmark::State& state) {
  const index_t tile = state.range(0) > 0 ? state.range(0) : kCount;
  const auto kind = state::Moment::second;
  auto s = make_impl<Store>(Stochastic);
  auto b = s.make(kCount, kind);
  const std::vector<float> x = moment_values(kCount, kind);
  std::vector<float> y(x.size());
  s.store(b, 0, kCount, x.data(), random::Key{1, 2, 0});
  s.load(b, 0, kCount, y.data());
  std::uint32_t step = 0;
  for (auto _ : state) {
    const random::Key key{1, 2, step++};
    for (index_t lo = 0; lo < kCount; lo += tile) {
      const index_t hi = lo + tile < kCount ? lo + tile : kCount;
      if constexpr (Mode != 1) s.load(b, lo, hi, y.data() + lo);
      if constexpr (Mode != 0) s.store(b, lo, hi, (Mode == 2 ? y.data() : x.data()) + lo, key);
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double per_elem = Mode == 2 ? 8.0 : 4.0;
  state.SetBytesProcessed(static_cast<std::int64_t>(static_cast<double>(state.iterations()) *
                                                    per_elem * static_cast<double>(kCount)));
  state.counters["state_B_per_elem"] =
      static_cast<double>(s.bytes(b)) / static_cast<double>(kCount);
}

void stores_memcpy_baseline(benchmark::State& state) {
  const std::vector<float> a = moment_values(kCount, state::Moment::first);
  std::vector<float> b(a.size()), c(a.size());
  const std::size_t bytes = a.size() * sizeof(float);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), bytes);
    std::memcpy(c.data(), b.data(), bytes);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 8 * kCount);
}

// Adafactor's factored second moment on a 4096×4096 gradient: one accumulate (reads G twice:
// row sums, then column sums) and the factors. bytes_per_second: 4 bytes of G per element.
void stores_factored_accumulate(benchmark::State& state) {
  const index_t n = 4096;
  impl<state::Factored, backend::cpu> s;
  auto b = s.make(Shape{n, n}, state::Moment::second);
  const std::vector<float> g = moment_values(n * n, state::Moment::first);
  std::vector<float> rf(static_cast<std::size_t>(n)), cf(static_cast<std::size_t>(n));
  double t = 1.0;
  for (auto _ : state) {
    s.accumulate(b, host_view(g.data(), n, n), 1.0 - std::pow(t, -0.8));
    s.inverse_sqrt_factors(b, rf.data(), cf.data());
    t += 1.0;
    benchmark::DoNotOptimize(rf.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * 4 * n * n);
  state.counters["state_B_per_elem"] = static_cast<double>(s.bytes(b)) / static_cast<double>(n * n);
}

// Op 0: absmax + quantise each block; op 1: dequantise each block.
template <int Op>
void stores_q8_kernels(benchmark::State& state) {
  const auto isa = static_cast<cpu::q8::Isa>(state.range(0));
  const auto kind = state.range(1) == 0 ? state::Moment::first : state::Moment::second;
  if (!cpu::q8::supported(isa)) {
    state.SkipWithError("instruction set not supported here");
    return;
  }
  constexpr index_t block = 256, count = 64 * block;  // 64 KiB of floats: L2-resident
  const bool is_signed = kind == state::Moment::first;
  const state::q8::CodeMap& map = state::q8::code_map(kind);
  std::vector<float> x = moment_values(count, state::Moment::first), y(x.size());
  for (index_t i = 0; i < count; ++i) {  // blocks over five decades, as moments of many rows
    x[static_cast<std::size_t>(i)] *= std::pow(10.0f, static_cast<float>((i / block) % 5) - 2.0f);
    if (!is_signed) x[static_cast<std::size_t>(i)] *= x[static_cast<std::size_t>(i)];
  }
  std::vector<std::uint8_t> q(x.size());
  std::vector<float> absmax(static_cast<std::size_t>(count / block));
  for (index_t b = 0; b < count; b += block) {
    absmax[static_cast<std::size_t>(b / block)] = cpu::q8::absmax_portable(x.data() + b, block);
    cpu::q8::quantize_portable(map, is_signed, x.data() + b, block,
                               absmax[static_cast<std::size_t>(b / block)], q.data() + b);
  }
  for (auto _ : state) {
    for (index_t b = 0; b < count; b += block) {
      if constexpr (Op == 0) {
        const float a = cpu::q8::absmax(isa, x.data() + b, block);
        cpu::q8::quantize(isa, map, is_signed, x.data() + b, block, a, q.data() + b);
      } else {
        cpu::q8::dequantize(isa, map, q.data() + b, block,
                            absmax[static_cast<std::size_t>(b / block)], y.data() + b);
      }
    }
    benchmark::DoNotOptimize(q.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * count);
  static const char* const names[] = {"portable", "avx2", "avx512", "avx512vbmi"};
  state.SetLabel(std::string(names[state.range(0)]) + (is_signed ? " m" : " v"));
}

using Q256 = state::Q8Block<256>;
using Q2048 = state::Q8Block<2048>;

}  // namespace

BENCHMARK(stores_memcpy_baseline)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(stores<state::Fp32, 2>)
    ->Name("stores_roundtrip/fp32")
    ->Arg(0)
    ->Arg(kTile)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<state::Bf16, 2>)
    ->Name("stores_roundtrip/bf16_rne")
    ->Arg(0)
    ->Arg(kTile)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<state::Bf16, 2, true>)
    ->Name("stores_roundtrip/bf16_stochastic")
    ->Arg(0)
    ->Arg(kTile)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<Q256, 2>)
    ->Name("stores_roundtrip/q8block256")
    ->Arg(0)
    ->Arg(kTile)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<Q2048, 2>)
    ->Name("stores_roundtrip/q8block2048")
    ->Arg(0)
    ->Arg(kTile)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<state::Bf16, 0>)
    ->Name("stores_load/bf16")
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<state::Bf16, 1>)
    ->Name("stores_store/bf16_rne")
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<state::Bf16, 1, true>)
    ->Name("stores_store/bf16_stochastic")
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<Q256, 0>)
    ->Name("stores_load/q8block256")
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores<Q256, 1>)
    ->Name("stores_store/q8block256")
    ->Arg(0)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(stores_q8_kernels<0>)
    ->Name("stores_q8_quantize")
    ->ArgsProduct({{0, 1, 2, 3}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(stores_q8_kernels<1>)
    ->Name("stores_q8_dequantize")
    ->ArgsProduct({{0, 1, 2, 3}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(stores_factored_accumulate)->Unit(benchmark::kMillisecond)->UseRealTime();
