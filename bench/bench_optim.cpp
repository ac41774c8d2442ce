// Optimizer steps over LLaMA-60M-shaped parameters (algorithms.md §0.5): 8 layers of q, k, v, o
// (512×512), gate, up (1376×512) and down (512×1376), two 512 norms per layer, embedding and
// head (32000×512), final norm. Matrices of attention and MLP are compressed; embedding, head
// and norms take the plain rule, as the peers do. Counters: bytes/s of the bytes an fp32 Adam
// step must move (28 per parameter: g read, w, m, v read and written) so every recipe is
// compared against the same floor, and state bytes per parameter.
#include <benchmark/benchmark.h>

#include <cstring>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

using namespace slimgrad;

namespace {

struct Tensor {
  std::string name;
  Shape shape;
  bool compressed;
  std::vector<float> w, g;
};

std::vector<Tensor> llama_60m() {
  const index_t h = 512, f = 1376, vocab = 32000;
  std::vector<Tensor> t;
  auto add = [&](std::string name, Shape s, bool c) {
    Tensor x{std::move(name), s, c, std::vector<float>(static_cast<std::size_t>(s.size())),
             std::vector<float>(static_cast<std::size_t>(s.size()))};
    random::fill_gaussian(host_view(x.w.data(), s.rows, s.cols), {1, tensor_id(x.name), 0}, 0.02);
    random::fill_gaussian(host_view(x.g.data(), s.rows, s.cols), {2, tensor_id(x.name), 0}, 1e-3);
    t.push_back(std::move(x));
  };
  add("embed", {vocab, h}, false);
  for (int l = 0; l < 8; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const char* n : {"q", "k", "v", "o"})
      add(p + "attn." + n, {h, h}, true);
    add(p + "mlp.gate", {f, h}, true);
    add(p + "mlp.up", {f, h}, true);
    add(p + "mlp.down", {h, f}, true);
    add(p + "norm1", {1, h}, false);
    add(p + "norm2", {1, h}, false);
  }
  add("norm", {1, h}, false);
  add("head", {vocab, h}, false);
  return t;
}

index_t count(const std::vector<Tensor>& t) {
  index_t n = 0;
  for (const auto& x : t)
    n += x.shape.size();
  return n;
}

// The attention and MLP matrices alone (25,165,824 parameters): the tensors a compressing recipe
// transforms, where GWT keeps 25% of Adam's moments (the whole model's embedding and head take
// plain Adam in every recipe).
std::vector<Tensor> llama_60m_compressed() {
  auto t = llama_60m();
  std::erase_if(t, [](const Tensor& x) { return !x.compressed; });
  return t;
}

template <class Opt>
void run(benchmark::State& state, typename Opt::Options o, bool compressed_only = false) {
  auto tensors = compressed_only ? llama_60m_compressed() : llama_60m();
  Opt opt(o);
  for (const auto& t : tensors) {
    typename Opt::Override ov;
    ov.role = t.compressed ? ParamRole::compressed : ParamRole::plain;
    opt.set_override(t.name, ov);
  }
  std::vector<Param> params;
  for (auto& t : tensors)
    params.push_back({t.name, host_view(t.w.data(), t.shape.rows, t.shape.cols),
                      host_view<const float>(t.g.data(), t.shape.rows, t.shape.cols)});
  opt.step(params);  // state and workspace exist from here on
  for (auto _ : state) {
    opt.step(params);
    benchmark::ClobberMemory();
  }
  const index_t n = count(tensors);
  state.SetBytesProcessed(state.iterations() * n * 28);
  state.counters["params"] = static_cast<double>(n);
  state.counters["state_B_per_param"] =
      static_cast<double>(opt.state_bytes()) / static_cast<double>(n);
}

void memcpy_28(benchmark::State& state, index_t n) {
  // 28 bytes per parameter as 14 read + 14 written.
  std::vector<char> a(static_cast<std::size_t>(n * 14), 1), b(a.size());
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), a.size());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 28);
}

void BM_memcpy_28B_per_param(benchmark::State& s) {
  memcpy_28(s, count(llama_60m()));
}
void BM_memcpy_28B_per_param_compressed(benchmark::State& s) {
  memcpy_28(s, count(llama_60m_compressed()));
}

void BM_adamw(benchmark::State& s) {
  run<recipes::AdamW<>>(s, recipes::adamw_options());
}
void BM_adam8bit(benchmark::State& s) {
  run<recipes::Adam8bit<>>(s, recipes::adam8bit_options());
}
void BM_gwt(benchmark::State& s) {
  run<recipes::Gwt<>>(s, recipes::gwt_options());
}
void BM_adamw_compressed(benchmark::State& s) {
  run<recipes::AdamW<>>(s, recipes::adamw_options(), true);
}
void BM_gwt_compressed(benchmark::State& s) {
  run<recipes::Gwt<>>(s, recipes::gwt_options(), true);
}
void BM_flora(benchmark::State& s) {
  run<recipes::Flora<>>(s, recipes::flora_options());
}
void BM_galore_randomized_steady(benchmark::State& s) {
  auto o = recipes::galore_options();
  o.transform.method = transforms::SvdMethod::randomized;
  o.transform.update_gap = 1000000;  // steady state: no refresh inside the timed loop
  run<recipes::GaLore<>>(s, o);
}
void BM_galore_randomized_refresh(benchmark::State& s) {
  auto o = recipes::galore_options();
  o.transform.method = transforms::SvdMethod::randomized;
  o.transform.update_gap = 1;  // every step refreshes every basis
  run<recipes::GaLore<>>(s, o);
}
void BM_galore_exact_refresh(benchmark::State& s) {
  auto o = recipes::galore_options();
  o.transform.update_gap = 1;
  run<recipes::GaLore<>>(s, o);
}

// GaLore's steady step without the Adam part: per compressed matrix the projection C = Sᵀ G
// (left, m < n) or G Pᵀ (right) and the back-projection S N or N P at rank 128, as
// backend/cpu/svd_projection.hpp does them (row-major Eigen, noalias). 4·r flops per parameter;
// the counter gives Eigen's rate.
void BM_galore_gemms(benchmark::State& state) {
  const index_t r = 128;
  auto tensors = llama_60m_compressed();
  struct Mats {
    cpu::RowMatrix basis, c, u;
  };
  std::vector<Mats> mats;
  double flops = 0;
  for (const auto& t : tensors) {
    const bool right = t.shape.rows >= t.shape.cols;
    Mats x;
    x.basis =
        right ? cpu::RowMatrix::Random(r, t.shape.cols) : cpu::RowMatrix::Random(t.shape.rows, r);
    x.c = right ? cpu::RowMatrix(t.shape.rows, r) : cpu::RowMatrix(r, t.shape.cols);
    x.u = cpu::RowMatrix(t.shape.rows, t.shape.cols);
    mats.push_back(std::move(x));
    flops += 4.0 * static_cast<double>(r) * static_cast<double>(t.shape.size());
  }
  for (auto _ : state) {
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      auto& x = mats[i];
      const auto g = cpu::as_eigen(host_view<const float>(t.g.data(), t.shape.rows, t.shape.cols));
      if (t.shape.rows >= t.shape.cols) {
        x.c.noalias() = g * x.basis.transpose();
        x.u.noalias() = x.c * x.basis;
      } else {
        x.c.noalias() = x.basis.transpose() * g;
        x.u.noalias() = x.basis * x.c;
      }
    }
    benchmark::ClobberMemory();
  }
  state.counters["flops"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_galore_gemms)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_memcpy_28B_per_param)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_adamw)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_adam8bit)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_gwt)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_memcpy_28B_per_param_compressed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_adamw_compressed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_gwt_compressed)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_flora)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_galore_randomized_steady)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_galore_randomized_refresh)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(2);
BENCHMARK(BM_galore_exact_refresh)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);
