// Checkpoints across backends through files (backend/cuda/transfer.hpp): a CPU run (the
// optimizer engine, recipes::AdamW-style) saves after step 3; the file loads into a fresh CPU
// optimizer whose state goes to the GPU, which takes steps 4–5 beside the CPU run; the GPU's
// state is saved through a CPU optimizer into a second file, which loads into another fresh CPU
// optimizer for step 6. Weights and moments stay bit-identical to the uninterrupted CPU run
// (fp32 torch, bf16 stochastic hf, 8-bit bnb with the fp32 fallback of a small tensor).
#include <slimgrad/backend/cuda/transfer.hpp>

#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "device.hpp"

using namespace slimgrad;

namespace {

struct Dims {
  index_t rows, cols;
};
// "norm" (3×5) is an 8-bit store's fp32 fallback and a tensor GWT's CPU engine keeps plain.
const std::vector<std::string> names = {"layers.0.q_proj", "layers.0.mlp.up", "lm_head", "norm"};
const std::vector<Dims> dims = {{64, 100}, {33, 257}, {70, 300}, {3, 5}};

std::vector<float> grad(int step, std::size_t k) {
  return test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                             static_cast<std::uint32_t>(100 * static_cast<std::size_t>(step) + k),
                             0.05f);
}

template <class Opt>
struct Host {
  Opt opt;
  std::vector<std::vector<float>> w;
  explicit Host(const typename Opt::Options& o) : opt(o) {
    for (std::size_t k = 0; k < dims.size(); ++k)
      w.push_back(test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                                      static_cast<std::uint32_t>(7 + k)));
  }
  void step(int t) {
    std::vector<std::vector<float>> g;
    std::vector<Param> params;
    for (std::size_t k = 0; k < dims.size(); ++k) {
      g.push_back(grad(t, k));
      params.push_back(
          {names[k], host_view(w[k].data(), dims[k].rows, dims[k].cols),
           HostView<const float>(g[k].data(), dims[k].rows, dims[k].cols, dims[k].cols)});
    }
    const StepReport r = opt.step(params);
    REQUIRE(r.skipped.empty());
  }
};

template <class Store>
void roundtrip(const typename cuda::CpuAdam<Store>::Options& o, cuda::Precision precision) {
  const auto dir = std::filesystem::temp_directory_path();
  const auto file1 = dir / ("slimgrad_transfer_a_" + std::string(Store::name) + ".safetensors");
  const auto file2 = dir / ("slimgrad_transfer_b_" + std::string(Store::name) + ".safetensors");
  Host<cuda::CpuAdam<Store>> ref(o);  // the uninterrupted CPU run
  for (int t = 1; t <= 3; ++t)
    ref.step(t);
  ref.opt.save(file1);

  // File → CPU optimizer → GPU.
  cuda::CpuAdam<Store> loaded(o);
  loaded.load(file1);
  test::DeviceTensors dev;
  for (std::size_t k = 0; k < dims.size(); ++k)
    dev.add(dims[k].rows, dims[k].cols, ref.w[k], tensor_id(names[k]));
  const std::vector<cuda::Tensor>& tensors = dev.tensors;
  typename cuda::MultiTensorAdam<Store>::Options go{
      .rule = o.rule, .store = o.store, .precision = precision, .seed = o.seed};
  test::WithWorkspace<cuda::MultiTensorAdam<Store>> engine(tensors, go);
  auto& gpu = engine.engine;
  cuda::copy_state(loaded, names, gpu);
  CHECK(gpu.steps() == 3);
  for (int t = 4; t <= 5; ++t) {
    ref.step(t);
    for (std::size_t k = 0; k < dims.size(); ++k)
      dev.set_grad(k, grad(t, k));
    gpu.step(nullptr);
  }
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(dev.weights(k), ref.w[k]) == 0);
  }

  // GPU → CPU optimizer → file → a fresh CPU optimizer, which takes step 6.
  cuda::CpuAdam<Store> out(o);
  cuda::copy_state(gpu, tensors, names, out);
  out.save(file2);
  Host<cuda::CpuAdam<Store>> resumed(o);
  resumed.opt.load(file2);
  for (std::size_t k = 0; k < dims.size(); ++k) {
    resumed.w[k] = dev.weights(k);
    CHECK(resumed.opt.step_count(names[k]) == 5);
  }
  ref.step(6);
  resumed.step(6);
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(resumed.w[k], ref.w[k]) == 0);
  }
  // Every tensor of the resumed state (moments, step counts) equals the uninterrupted run's.
  CHECK(io::checksum(resumed.opt.to_checkpoint()) == io::checksum(ref.opt.to_checkpoint()));
  std::filesystem::remove(file1);
  std::filesystem::remove(file2);
}

}  // namespace

TEST_CASE("cuda checkpoints: a file written by either backend resumes on the other") {
  SUBCASE("fp32, torch") {
    cuda::CpuAdam<state::Fp32>::Options o;
    roundtrip<state::Fp32>(o, cuda::Precision::fp32);
  }
  SUBCASE("bf16 stochastic, hf") {
    cuda::CpuAdam<state::Bf16>::Options o;
    o.rule.convention = optim::AdamConvention::hf;
    o.store.stochastic_rounding = true;
    o.seed = 77;
    roundtrip<state::Bf16>(o, cuda::Precision::fp32);
  }
  SUBCASE("8-bit, bnb (the small tensor stays fp32)") {
    cuda::CpuAdam<state::Q8Block<256>>::Options o;
    o.rule.convention = optim::AdamConvention::bnb;
    roundtrip<state::Q8Block<256>>(o, cuda::Precision::fp32);
  }
}

namespace {

// GWT: the first three tensors (the CPU engine transforms them; "norm" it keeps plain, which the
// transfer refuses). With the limiter, ‖N‖ is summed in another order on each backend, so the
// weights agree to a few ulps (test_gwt's bound) and the limiter memory to float rounding.
void gwt_roundtrip(double gamma) {
  using Cpu = cuda::CpuGwt<transforms::Haar, 2>;
  using Gpu = cuda::MultiTensorGwt<transforms::Haar, 2>;
  const std::vector<std::string> gnames(names.begin(), names.begin() + 3);
  Cpu::Options o;
  o.residual.limiter_gamma = gamma;
  const auto dir = std::filesystem::temp_directory_path();
  const auto file = dir / "slimgrad_transfer_gwt.safetensors";
  // The CPU run over the first three tensors only.
  Cpu ref(o);
  std::vector<std::vector<float>> w;
  for (std::size_t k = 0; k < 3; ++k)
    w.push_back(test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                                    static_cast<std::uint32_t>(7 + k)));
  auto cpu_step = [&](Cpu& opt, std::vector<std::vector<float>>& ws, int t) {
    std::vector<std::vector<float>> g;
    std::vector<Param> params;
    for (std::size_t k = 0; k < 3; ++k) {
      g.push_back(grad(t, k));
      params.push_back(
          {gnames[k], host_view(ws[k].data(), dims[k].rows, dims[k].cols),
           HostView<const float>(g[k].data(), dims[k].rows, dims[k].cols, dims[k].cols)});
    }
    REQUIRE(opt.step(params).skipped.empty());
  };
  for (int t = 1; t <= 3; ++t)
    cpu_step(ref, w, t);
  ref.save(file);
  Cpu loaded(o);
  loaded.load(file);

  test::DeviceTensors dev;
  for (std::size_t k = 0; k < 3; ++k)
    dev.add(dims[k].rows, dims[k].cols, w[k], tensor_id(gnames[k]));
  const std::vector<cuda::Tensor>& tensors = dev.tensors;
  Gpu::Options go;
  go.rule = o.rule;
  go.residual = o.residual;
  test::WithWorkspace<Gpu> engine(tensors, go);
  auto& gpu = engine.engine;
  cuda::copy_state(loaded, gnames, gpu);
  CHECK(gpu.steps() == 3);
  const std::int64_t ulps = gamma > 0 ? 4 : 0;
  for (int t = 4; t <= 5; ++t) {
    cpu_step(ref, w, t);
    for (std::size_t k = 0; k < 3; ++k)
      dev.set_grad(k, grad(t, k));
    gpu.step(nullptr);
  }
  for (std::size_t k = 0; k < 3; ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(dev.weights(k), w[k]) <= ulps);
  }
  Cpu out(o);
  cuda::copy_state(gpu, tensors, gnames, out);
  out.save(file);
  Cpu resumed(o);
  resumed.load(file);
  std::vector<std::vector<float>> w2;
  for (std::size_t k = 0; k < 3; ++k) {
    w2.push_back(dev.weights(k));
    CHECK(resumed.step_count(gnames[k]) == 5);
    const float a = resumed.limiter_state(gnames[k]), b = ref.limiter_state(gnames[k]);
    if (gamma > 0)
      CHECK(a == doctest::Approx(b).epsilon(1e-5));
    else
      CHECK(a == b);  // unset on both (−1)
  }
  cpu_step(ref, w, 6);
  cpu_step(resumed, w2, 6);
  for (std::size_t k = 0; k < 3; ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(w2[k], w[k]) <= ulps);
  }
  if (gamma == 0) CHECK(io::checksum(resumed.to_checkpoint()) == io::checksum(ref.to_checkpoint()));
  std::filesystem::remove(file);

  // A tensor the CPU keeps plain cannot come from the GPU's GWT.
  dev.add(3, 5, {}, tensor_id("norm"));  // dev.tensors: the three and "norm"
  const std::vector<cuda::Tensor>& four = dev.tensors;
  test::WithWorkspace<Gpu> engine4(four, go);
  Cpu none(o);
  CHECK_THROWS_WITH_AS(cuda::copy_state(engine4.engine, four, names, none),
                       doctest::Contains("plain rule on the CPU"), Error);
  CHECK(none.size() == 0);
}

}  // namespace

TEST_CASE("cuda checkpoints: GWT state crosses backends through files") {
  SUBCASE("no limiter: bit-identical") {
    gwt_roundtrip(0.0);
  }
  SUBCASE("limiter 1.01: its memory travels too") {
    gwt_roundtrip(1.01);
  }
}

namespace {

// Per-tensor step counts: on the CPU, tensor 1's gradient holds a NaN at step 2, so it has taken
// one step fewer. The GPU engine (check_finite) takes each tensor's own count from the CPU and
// gives it back; steps 4–5 on both backends stay bit-identical only if tensor 1's bias
// corrections come from its own count. An engine without check_finite refuses the lagging state
// before anything changes.
template <class Cpu, class Gpu>
void lagging_counts(const typename Cpu::Options& o, typename Gpu::Options go, std::size_t n) {
  const std::vector<std::string> pnames(names.begin(), names.begin() + static_cast<long>(n));
  Cpu cpu(o);
  std::vector<std::vector<float>> w;
  for (std::size_t k = 0; k < n; ++k)
    w.push_back(test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                                    static_cast<std::uint32_t>(7 + k)));
  auto cpu_step = [&](int t) {
    std::vector<std::vector<float>> g;
    std::vector<Param> params;
    for (std::size_t k = 0; k < n; ++k) {
      g.push_back(grad(t, k));
      if (t == 2 && k == 1) g[k][5] = std::numeric_limits<float>::quiet_NaN();
      params.push_back(
          {pnames[k], host_view(w[k].data(), dims[k].rows, dims[k].cols),
           HostView<const float>(g[k].data(), dims[k].rows, dims[k].cols, dims[k].cols)});
    }
    const StepReport r = cpu.step(params);
    REQUIRE(r.skipped.size() == (t == 2 ? 1u : 0u));
  };
  for (int t = 1; t <= 3; ++t)
    cpu_step(t);
  REQUIRE(cpu.step_count(pnames[1]) == 2);

  test::DeviceTensors dev;
  for (std::size_t k = 0; k < n; ++k)
    dev.add(dims[k].rows, dims[k].cols, w[k], tensor_id(pnames[k]));
  const std::vector<cuda::Tensor>& tensors = dev.tensors;
  {  // Without check_finite every tensor must have the engine's count.
    go.check_finite = false;
    test::WithWorkspace<Gpu> strict(tensors, go);
    CHECK_THROWS_WITH_AS(cuda::copy_state(cpu, pnames, strict.engine),
                         doctest::Contains("without check_finite"), Error);
    CHECK(strict.engine.steps() == 0);
  }
  go.check_finite = true;
  test::WithWorkspace<Gpu> engine(tensors, go);
  auto& gpu = engine.engine;
  cuda::copy_state(cpu, pnames, gpu);
  CHECK(gpu.steps() == 3);
  for (std::size_t k = 0; k < n; ++k)
    CHECK(gpu.tensor_steps(static_cast<index_t>(k)) == (k == 1 ? 2 : 3));
  for (int t = 4; t <= 5; ++t) {
    cpu_step(t);
    for (std::size_t k = 0; k < n; ++k)
      dev.set_grad(k, grad(t, k));
    gpu.step(nullptr);
  }
  for (std::size_t k = 0; k < n; ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(dev.weights(k), w[k]) == 0);
  }
  Cpu back(o);
  cuda::copy_state(gpu, tensors, pnames, back);
  for (std::size_t k = 0; k < n; ++k)
    CHECK(back.step_count(pnames[k]) == (k == 1 ? 4 : 5));
}

}  // namespace

TEST_CASE("cuda checkpoints: a tensor that skipped a step keeps its own count across backends") {
  SUBCASE("Adam, fp32, torch") {
    lagging_counts<cuda::CpuAdam<state::Fp32>, cuda::MultiTensorAdam<state::Fp32>>({}, {}, 4);
  }
  SUBCASE("GWT, Haar 2 levels, no limiter") {
    cuda::CpuGwt<transforms::Haar, 2>::Options o;
    o.residual.limiter_gamma = 0.0;
    cuda::MultiTensorGwt<transforms::Haar, 2>::Options go;
    go.rule = o.rule;
    go.residual = o.residual;
    lagging_counts<cuda::CpuGwt<transforms::Haar, 2>, cuda::MultiTensorGwt<transforms::Haar, 2>>(
        o, go, 3);
  }
}

TEST_CASE("cuda checkpoints: mismatched lists are refused with nothing changed") {
  test::DeviceTensors dev;
  for (std::size_t k = 0; k < dims.size(); ++k)
    dev.add(dims[k].rows, dims[k].cols, {}, tensor_id(names[k]));
  const std::vector<cuda::Tensor>& tensors = dev.tensors;
  test::WithWorkspace<cuda::MultiTensorAdam<state::Fp32>> engine(tensors, {});
  auto& gpu = engine.engine;
  cuda::CpuAdam<state::Fp32> cpu;
  const std::vector<std::string> three(names.begin(), names.end() - 1);
  CHECK_THROWS_WITH_AS(cuda::copy_state(gpu, tensors, three, cpu),
                       doctest::Contains("3 names and 4 tensors"), Error);
  CHECK_THROWS_WITH_AS(cuda::copy_state(cpu, names, gpu), doctest::Contains("no state"), Error);
  std::vector<std::string> swapped = names;
  std::swap(swapped[0], swapped[1]);
  CHECK_THROWS_WITH_AS(cuda::copy_state(gpu, tensors, swapped, cpu),
                       doctest::Contains("not tensor_id"), Error);
  CHECK(cpu.size() == 0);
  // A CPU state of another shape: refused before the GPU changes.
  cpu.add_state(names[0], {64, 99});
  for (std::size_t k = 1; k < names.size(); ++k)
    cpu.add_state(names[k], {dims[k].rows, dims[k].cols});
  CHECK_THROWS_WITH_AS(cuda::copy_state(cpu, names, gpu), doctest::Contains("different shapes"),
                       Error);
  CHECK(gpu.steps() == 0);
}
