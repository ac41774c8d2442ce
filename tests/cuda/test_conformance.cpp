// The CPU's conformance suite against the peers (tests/conformance/peers.hpp) on the CUDA
// backend, through Optimizer<..., backend::cuda> (backend/cuda/optimizer.hpp); and checkpoints
// across backends: written on the CPU, resumed on the GPU, written there and resumed on the CPU.
#include <cuda_runtime.h>

#include <slimgrad/backend/cuda/optimizer.hpp>

#include "../conformance/peers.hpp"
#include "device.hpp"

namespace slimgrad::conformance {

// The suite's memory on the device: weights and gradients in device buffers that stay put for
// the optimizer's lifetime (its launch tables hold them), gradients uploaded before each step.
template <>
struct Harness<backend::cuda> {
  static constexpr bool fused_variants[] = {true};  // Options::fused is a CPU setting
  template <class Opt>
  static Opt make(const typename Opt::Options& o) {
    return Opt(o, nullptr, cuda::DeviceOptions{.tf32 = false});  // plain fp32 GEMMs (peers.hpp)
  }
  template <class Opt, class Grads>
  static void run(Opt& opt, const std::vector<std::string>& names, std::vector<Matrix>& w,
                  int steps, const Grads& grads) {
    std::vector<std::unique_ptr<test::DeviceBuffer>> wd, gd;
    for (const Matrix& m : w) {
      wd.push_back(std::make_unique<test::DeviceBuffer>(m.v.size() * sizeof(float)));
      gd.push_back(std::make_unique<test::DeviceBuffer>(m.v.size() * sizeof(float)));
      test::upload(wd.back()->ptr, m.v);
    }
    for (int k = 0; k < steps; ++k) {
      const std::vector<Matrix> g = grads(k);
      std::vector<cuda::Param> params;
      for (std::size_t i = 0; i < names.size(); ++i) {
        test::upload(gd[i]->ptr, g[i].v);
        params.push_back({names[i], device_view(wd[i]->as<float>(), w[i].rows, w[i].cols),
                          device_view<const float>(gd[i]->as<float>(), w[i].rows, w[i].cols)});
      }
      const StepReport rep = opt.step(params);
      REQUIRE(rep.stepped == static_cast<index_t>(names.size()));
    }
    for (std::size_t i = 0; i < w.size(); ++i)
      w[i].v = test::download<float>(wd[i]->ptr, w[i].v.size());
  }
};

}  // namespace slimgrad::conformance

TEST_CASE_TEMPLATE_INVOKE(conformance_adamw, slimgrad::backend::cuda);
TEST_CASE_TEMPLATE_INVOKE(conformance_galore, slimgrad::backend::cuda);
TEST_CASE_TEMPLATE_INVOKE(conformance_gwt, slimgrad::backend::cuda);
TEST_CASE_TEMPLATE_INVOKE(conformance_adam8bit, slimgrad::backend::cuda);
TEST_CASE_TEMPLATE_INVOKE(conformance_fails, slimgrad::backend::cuda);

namespace {

using namespace slimgrad;
using conformance::Harness;
using conformance::Matrix;

// Three parameters: two matrices the compressing recipes take (both orientations) and a bias
// that falls back to the plain rule.
const std::vector<std::string> names = {"a", "bias", "c"};
std::vector<Matrix> initial() {
  const Shape shapes[] = {{64, 96}, {1, 96}, {96, 64}};
  std::vector<Matrix> w;
  for (std::size_t i = 0; i < 3; ++i)
    w.push_back({test::random_floats(static_cast<std::size_t>(shapes[i].size()),
                                     static_cast<std::uint32_t>(11 + i)),
                 shapes[i].rows, shapes[i].cols});
  return w;
}
// Step k's gradients (k counted from the start of the run, whichever backend takes it).
auto grads_from(int first) {
  return [first](int k) {
    std::vector<Matrix> g = initial();
    for (std::size_t i = 0; i < g.size(); ++i)
      g[i].v = test::random_floats(
          g[i].v.size(), static_cast<std::uint32_t>(1000 * static_cast<std::size_t>(first + k) + i),
          0.1f);
    return g;
  };
}

bool same_state(const io::TensorFile& a, const io::TensorFile& b) {
  if (a.tensors.size() != b.tensors.size()) return false;
  for (const auto& [name, t] : a.tensors) {
    const auto it = b.tensors.find(name);
    if (it == b.tensors.end() || it->second.data != t.data) return false;
  }
  return true;
}

// 3 steps on the CPU, save; load on the GPU, 3 steps, save; load on the CPU, 3 steps: against 9
// steps straight on the CPU. `ulps_per_step` = 0 requires the same bits; otherwise
// max |w − w_cpu| ≤ ulps_per_step · 6 · 2^-23 · max |w_cpu| (the 6 steps after the GPU took
// over). Then a corrupted and a mismatched checkpoint are refused on the GPU, nothing changed.
template <template <class> class Recipe>
void cross_case(const typename Recipe<backend::cpu>::Options& o, double ulps_per_step) {
  using CpuOpt = Recipe<backend::cpu>;
  using GpuOpt = Recipe<backend::cuda>;
  std::vector<Matrix> straight = initial();
  {
    CpuOpt cpu(o);
    Harness<backend::cpu>::run(cpu, names, straight, 9, grads_from(0));
  }
  std::vector<Matrix> w = initial();
  const auto dir = std::filesystem::temp_directory_path();
  const auto first = dir / "slimgrad_cross_cpu.safetensors";
  const auto second = dir / "slimgrad_cross_gpu.safetensors";
  std::size_t gpu_bytes = 0;
  {
    CpuOpt cpu(o);
    Harness<backend::cpu>::run(cpu, names, w, 3, grads_from(0));
    cpu.save(first);
  }
  {
    auto gpu = Harness<backend::cuda>::make<GpuOpt>(o);
    gpu.load(first);
    CHECK(gpu.step_count("a") == 3);
    Harness<backend::cuda>::run(gpu, names, w, 3, grads_from(3));
    CHECK(gpu.step_count("a") == 6);
    gpu_bytes = gpu.state_bytes();
    gpu.save(second);

    // Refused, nothing changed: a corrupted file (checksum), another composition, other shapes.
    const io::TensorFile before = gpu.to_checkpoint();
    io::TensorFile corrupt = io::read(second);
    corrupt.tensors.begin()->second.data[0] ^= std::byte{1};
    CHECK_THROWS_AS(gpu.from_checkpoint(corrupt), Error);
    recipes::AdamW<> other;
    std::vector<Matrix> w2 = initial();
    Harness<backend::cpu>::run(other, names, w2, 1, grads_from(0));
    if constexpr (!std::is_same_v<CpuOpt, recipes::AdamW<>>)
      CHECK_THROWS_AS(gpu.from_checkpoint(other.to_checkpoint()), Error);
    CpuOpt narrow(o);
    std::vector<Matrix> w3 = initial();
    w3[1].cols = w3[0].cols = 48;  // "a" as 64×48, "bias" 1×48 (first 48 values)
    w3[0].v.resize(64 * 48);
    w3[1].v.resize(48);
    Harness<backend::cpu>::run(narrow, names, w3, 1, [&](int k) {
      auto g = grads_from(0)(k);
      g[0].cols = g[1].cols = 48;
      g[0].v.resize(64 * 48);
      g[1].v.resize(48);
      return g;
    });
    CHECK_THROWS_AS(gpu.from_checkpoint(narrow.to_checkpoint()), Error);
    CHECK(same_state(gpu.to_checkpoint(), before));
    CHECK(gpu.step_count("a") == 6);
  }
  {
    CpuOpt cpu(o);
    cpu.load(second);
    CHECK(cpu.step_count("bias") == 6);
    CHECK(cpu.state_bytes() == gpu_bytes);  // the same state, accounted the same way
    Harness<backend::cpu>::run(cpu, names, w, 3, grads_from(6));
  }
  std::filesystem::remove(first);
  std::filesystem::remove(second);
  for (std::size_t i = 0; i < names.size(); ++i) {
    CAPTURE(names[i]);
    if (ulps_per_step == 0) {
      CHECK(test::max_ulp(w[i].v, straight[i].v) == 0);
    } else {
      double dev = 0, ref = 0;
      for (std::size_t j = 0; j < w[i].v.size(); ++j) {
        dev = std::max(dev, std::fabs(double(w[i].v[j]) - straight[i].v[j]));
        ref = std::max(ref, std::fabs(double(straight[i].v[j])));
      }
      MESSAGE(names[i] << ": max |dw| = " << dev / (0x1p-23 * ref) << " ulp of max|w|");
      CHECK(dev <= ulps_per_step * 6 * 0x1p-23 * ref);
    }
  }
}

}  // namespace

TEST_CASE("checkpoints cross backends: CPU → GPU → CPU resumes a run (AdamW, 8-bit: same bits)") {
  cross_case<recipes::AdamW>(recipes::adamw_options(), 0);
  auto o = recipes::adam8bit_options();
  o.store.min_8bit_size = 1024;  // "a" and "c" in 8 bits, the bias in fp32
  cross_case<recipes::Adam8bit>(o, 0);
}

TEST_CASE("checkpoints cross backends: GWT (same bits without the limiter, rounding with it)") {
  auto o = recipes::gwt_options();
  o.fallback.min_size = 0;
  o.residual.limiter_gamma = 0;
  cross_case<recipes::Gwt>(o, 0);
  o.residual.limiter_gamma = 1.01;
  cross_case<recipes::Gwt>(o, 4);
}

TEST_CASE("checkpoints cross backends: GaLore (a refresh on each backend, subspace accuracy)") {
  auto o = recipes::galore_options();
  o.transform.rank = 8;
  o.transform.update_gap = 4;  // refreshes at k = 0 (CPU), 4 (GPU), 8 (CPU)
  o.transform.method = transforms::SvdMethod::exact;
  o.fallback.min_size = 0;
  cross_case<recipes::GaLore>(o, 8);
}

TEST_CASE("checkpoints cross backends: SubTrack++ recovery scaling and its limiter") {
  auto o = recipes::subtrack_options(true);
  o.residual.projection_aware = false;
  o.transform.rank = 8;
  o.transform.update_gap = 2;  // tracking at k = 2 (CPU), 4 (GPU), 6 and 8 (CPU)
  o.fallback.min_size = 0;
  cross_case<recipes::SubTrack>(o, 8);
}

TEST_CASE("checkpoints cross backends: SubTrack++ with projection-aware moments") {
  auto o = recipes::subtrack_options(true);
  REQUIRE(o.residual.projection_aware);
  o.transform.rank = 8;
  o.transform.update_gap = 2;  // tracking and rotation at k = 2 (CPU), 4 (GPU), 6 and 8 (CPU)
  o.fallback.min_size = 0;
  cross_case<recipes::SubTrack>(o, 8);
  // GaLore's refresh reports no rotation on the GPU: refused before anything happens.
  using Fira = Optimizer<optim::Adam, transforms::SvdProjection, state::Fp32, backend::cuda,
                         residual::Recovery>;
  Fira::Options f;
  f.residual.projection_aware = true;
  CHECK_THROWS_AS(static_cast<void>(Fira(f)), Error);
}
