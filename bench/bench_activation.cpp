// Benchmarks of the compressed linear layer (backend/cpu/activation.hpp): forward and backward of
// a 4096×4096 layer over 2048 tokens with each codec, against the exact layer (codec None).
//
// forward  = Y = X Wᵀ + b plus saving (a copy of X, VeLoRA's z, CompAct's Z = X Pᵀ);
// backward = dX = dY W, db = Σ dY and the codec's weight gradient (dYᵀ X, s·(dYᵀ Z) ⊗ v, dYᵀ Z).
// Counters: saved_B is what the layer's buffer holds after a forward (measured from the buffer),
// saved_vs_exact the exact layer's bytes for the same tokens divided by it, state_B the codec's
// own state (v, or the kept P).
// VeLoRA: D' = 16 (G = 256, as down_proj of the 60M run); CompAct: r = n/4, P regenerated from
// the seed in tiles on every forward (the default), kept between resamples for
// `compact_r1024_kept`, and a count sketch (one ±1 per column of P) for `compact_r1024_count`.
// state_B counts VeLoRA's v, CompAct's tile buffer or kept P. Run: slimgrad_bench
// --benchmark_filter=activation --benchmark_repetitions=5
//      --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <slimgrad/backend/cpu/activation.hpp>
#include <vector>

namespace {

using namespace slimgrad;

constexpr index_t kIn = 4096, kOut = 4096, kTokens = 2048;

struct Buffers {
  std::vector<float> x, w, b, y, dy, dx;
  Buffers()
      : x(static_cast<std::size_t>(kTokens * kIn)),
        w(static_cast<std::size_t>(kOut * kIn)),
        b(static_cast<std::size_t>(kOut)),
        y(static_cast<std::size_t>(kTokens * kOut)),
        dy(static_cast<std::size_t>(kTokens * kOut)),
        dx(static_cast<std::size_t>(kTokens * kIn)) {
    // A shifted input, so that VeLoRA's v (the mean sub-token) is well defined.
    random::fill_gaussian(host_view(x.data(), kTokens, kIn), {1, 1, 0}, 1.0);
    for (float& e : x)
      e += 0.5f;
    random::fill_gaussian(host_view(w.data(), kOut, kIn), {1, 2, 0}, 0.02);
    random::fill_gaussian(host_view(dy.data(), kTokens, kOut), {1, 3, 0}, 1e-3);
  }
  HostView<const float> xv() const { return {x.data(), kTokens, kIn}; }
  HostView<const float> wv() const { return {w.data(), kOut, kIn}; }
  HostView<const float> bv() const { return {b.data(), 1, kOut}; }
  HostView<const float> dyv() const { return {dy.data(), kTokens, kOut}; }
};

Buffers& buffers() {
  static Buffers b;
  return b;
}

// CompAct with P kept between resamples (keep_matrix): r·n floats more, no regeneration.
struct CompActKept : activation::CompAct {};
// CompAct with the count sketch (one ±1 per column of P): Z = X Pᵀ is a scatter-add.
struct CompActCount : activation::CompAct {};

template <class Codec>
typename Codec::Options options() {
  if constexpr (std::is_same_v<Codec, activation::VeLoRA>)
    return {.groups = kIn / 16};
  else if constexpr (std::is_same_v<Codec, activation::CompAct>)
    return {.ratio = 0.25};
  else
    return {};
}

template <class Codec>
struct layer_of {
  using type = activation::Linear<Codec>;
  static type make() { return type("layer", kIn, kOut, options<Codec>()); }
};
template <>
struct layer_of<CompActKept> {
  using type = activation::Linear<activation::CompAct>;
  static type make() { return type("layer", kIn, kOut, {.ratio = 0.25, .keep_matrix = true}); }
};

template <>
struct layer_of<CompActCount> {
  using type = activation::Linear<activation::CompAct>;
  static type make() {
    return type("layer", kIn, kOut, {.ratio = 0.25, .sketch = transforms::Sketch::count});
  }
};

template <class Layer>
void counters(benchmark::State& state, const Layer& layer) {
  state.counters["saved_B"] = static_cast<double>(layer.saved_bytes());
  state.counters["saved_vs_exact"] =
      static_cast<double>(layer.uncompressed_bytes()) / static_cast<double>(layer.saved_bytes());
  state.counters["state_B"] = static_cast<double>(layer.state_bytes());
}

template <class Codec>
void activation_forward(benchmark::State& state) {
  Buffers& b = buffers();
  auto layer = layer_of<Codec>::make();
  for (auto _ : state) {
    layer.forward(b.xv(), b.wv(), b.bv(), host_view(b.y.data(), kTokens, kOut));
    benchmark::DoNotOptimize(b.y.data());
  }
  counters(state, layer);
}

template <class Codec>
void activation_backward(benchmark::State& state) {
  Buffers& b = buffers();
  auto layer = layer_of<Codec>::make();
  const Shape gs = layer.grad_shape();
  std::vector<float> dw(static_cast<std::size_t>(gs.size())), db(static_cast<std::size_t>(kOut));
  for (auto _ : state) {
    state.PauseTiming();
    layer.forward(b.xv(), b.wv(), b.bv(), host_view(b.y.data(), kTokens, kOut));
    state.ResumeTiming();
    layer.backward(b.dyv(), b.wv(), host_view(b.dx.data(), kTokens, kIn),
                   host_view(dw.data(), gs.rows, gs.cols), host_view(db.data(), 1, kOut));
    benchmark::DoNotOptimize(dw.data());
  }
  counters(state, layer);
}

#define SLIMGRAD_ACTIVATION_BENCH(fn, codec, label) \
  BENCHMARK_TEMPLATE(fn, codec)                     \
      ->Name(#fn "/" label)                         \
      ->Unit(benchmark::kMillisecond)               \
      ->UseRealTime()                               \
      ->Iterations(2)

SLIMGRAD_ACTIVATION_BENCH(activation_forward, activation::None, "exact");
SLIMGRAD_ACTIVATION_BENCH(activation_forward, activation::VeLoRA, "velora_d16");
SLIMGRAD_ACTIVATION_BENCH(activation_forward, activation::CompAct, "compact_r1024");
SLIMGRAD_ACTIVATION_BENCH(activation_forward, CompActKept, "compact_r1024_kept");
SLIMGRAD_ACTIVATION_BENCH(activation_forward, CompActCount, "compact_r1024_count");
SLIMGRAD_ACTIVATION_BENCH(activation_backward, activation::None, "exact");
SLIMGRAD_ACTIVATION_BENCH(activation_backward, activation::VeLoRA, "velora_d16");
SLIMGRAD_ACTIVATION_BENCH(activation_backward, activation::CompAct, "compact_r1024");
SLIMGRAD_ACTIVATION_BENCH(activation_backward, CompActCount, "compact_r1024_count");

}  // namespace
