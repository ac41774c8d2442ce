// Optimizer<…, backend::cuda> (backend/cuda/optimizer.hpp) against the CPU optimizer on what
// the CPU offers beyond the plain step: the non-finite gradient skip on the plain Adam path and
// in GWT's engine (weights, moments and the tensor's own count untouched; its later steps take
// its own bias corrections), per-parameter overrides, and bf16 / fp32-master parameters, whose CPU
// reference steps the bf16-rounded values. Same bits as the CPU unless a case says otherwise.
#include <slimgrad/backend/cuda/optimizer.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "device.hpp"

using namespace slimgrad;
using test::DeviceBuffer;

namespace {

// Sorted names (the GPU reports in name order, the CPU in the order given): two matrices the
// compressing recipes take (both orientations) and a bias the fallback keeps plain.
const std::vector<std::string> names = {"a", "bias", "c"};
const std::vector<Shape> shapes = {{64, 96}, {1, 96}, {96, 64}};

std::vector<std::vector<float>> initial_weights() {
  std::vector<std::vector<float>> w;
  for (std::size_t i = 0; i < shapes.size(); ++i)
    w.push_back(test::random_floats(static_cast<std::size_t>(shapes[i].size()),
                                    static_cast<std::uint32_t>(7 + i), 0.5f));
  return w;
}

using Poison = std::function<void(int step, std::vector<std::vector<float>>& g)>;

std::vector<std::vector<float>> gradients(int step, const Poison& poison) {
  std::vector<std::vector<float>> g;
  for (std::size_t i = 0; i < shapes.size(); ++i)
    g.push_back(test::random_floats(
        static_cast<std::size_t>(shapes[i].size()),
        static_cast<std::uint32_t>(500 * static_cast<std::size_t>(step) + i), 0.1f));
  if (poison) poison(step, g);
  return g;
}

float round_bf16(float x) {
  return numeric::bf16_to_float(numeric::bf16_bits_rne(x));
}
std::vector<std::uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<std::uint16_t> out(x.size());
  std::transform(x.begin(), x.end(), out.begin(), numeric::bf16_bits_rne);
  return out;
}
std::vector<float> widen(const std::vector<std::uint16_t>& x) {
  std::vector<float> out(x.size());
  std::transform(x.begin(), x.end(), out.begin(), numeric::bf16_to_float);
  return out;
}

bool same_tensors(const io::TensorFile& a, const io::TensorFile& b) {
  if (a.tensors.size() != b.tensors.size()) return false;
  for (const auto& [name, t] : a.tensors) {
    const auto it = b.tensors.find(name);
    if (it == b.tensors.end() || it->second.data != t.data) {
      MESSAGE("checkpoint tensor differs: " << name);
      return false;
    }
  }
  return true;
}

// The device side of a run in one precision: weights (and the fp32-master run's bf16 copies)
// stay in their buffers; each step uploads the gradients and builds the precision's params.
struct DeviceSet {
  cuda::Precision precision;
  std::vector<std::unique_ptr<DeviceBuffer>> w, g, copy;

  DeviceSet(cuda::Precision p, const std::vector<std::vector<float>>& weights) : precision(p) {
    const bool bf16_w = p == cuda::Precision::bf16;
    const bool bf16_g = p != cuda::Precision::fp32;
    for (const auto& x : weights) {
      w.push_back(std::make_unique<DeviceBuffer>(x.size() * (bf16_w ? 2 : 4)));
      g.push_back(std::make_unique<DeviceBuffer>(x.size() * (bf16_g ? 2 : 4)));
      copy.push_back(std::make_unique<DeviceBuffer>(
          p == cuda::Precision::fp32_master ? x.size() * 2 : std::size_t{0}));
      if (bf16_w)
        test::upload(w.back()->ptr, to_bf16(x));
      else
        test::upload(w.back()->ptr, x);
    }
  }

  template <class Opt>
  StepReport step(Opt& opt, const std::vector<std::vector<float>>& grads) {
    for (std::size_t i = 0; i < grads.size(); ++i) {
      if (precision == cuda::Precision::fp32)
        test::upload(g[i]->ptr, grads[i]);
      else
        test::upload(g[i]->ptr, to_bf16(grads[i]));
    }
    auto view = [&](auto* p, std::size_t i) {
      return device_view(p, shapes[i].rows, shapes[i].cols);
    };
    if (precision == cuda::Precision::fp32) {
      std::vector<cuda::Param> ps;
      for (std::size_t i = 0; i < names.size(); ++i)
        ps.push_back(
            {names[i], view(w[i]->as<float>(), i), view(static_cast<const float*>(g[i]->ptr), i)});
      return opt.step(ps);
    }
    if (precision == cuda::Precision::bf16) {
      std::vector<cuda::ParamBf16> ps;
      for (std::size_t i = 0; i < names.size(); ++i)
        ps.push_back({names[i], view(w[i]->as<std::uint16_t>(), i),
                      view(static_cast<const std::uint16_t*>(g[i]->ptr), i)});
      return opt.step(ps);
    }
    std::vector<cuda::ParamMaster> ps;
    for (std::size_t i = 0; i < names.size(); ++i)
      ps.push_back({names[i], view(w[i]->as<float>(), i),
                    view(static_cast<const std::uint16_t*>(g[i]->ptr), i),
                    copy[i]->as<std::uint16_t>()});
    return opt.step(ps);
  }

  /// The weights as floats (bf16 widened).
  std::vector<float> weights(std::size_t i) const {
    const auto n = static_cast<std::size_t>(shapes[i].size());
    if (precision == cuda::Precision::bf16)
      return widen(test::download<std::uint16_t>(w[i]->ptr, n));
    return test::download<float>(w[i]->ptr, n);
  }
};

struct RunOptions {
  int steps = 5;
  Poison poison;
  cuda::Precision precision = cuda::Precision::fp32;
  /// Maximal |Δw| in units of 2^-23·max|w_cpu| per step (0: the same bits, checkpoint too).
  /// bf16 weights: the fp32 results differ by that much, so their roundings may differ by a
  /// bf16 ulp: at most 2% of the weights may differ, each by at most two bf16 ulps.
  double ulps_per_step = 0;
};
RunOptions run(int steps, Poison p = {}, cuda::Precision precision = cuda::Precision::fp32,
               double ulps_per_step = 0) {
  RunOptions r;
  r.steps = steps;
  r.poison = std::move(p);
  r.precision = precision;
  r.ulps_per_step = ulps_per_step;
  return r;
}
template <class Opt>
typename Opt::Override override_of(double lr_scale, std::optional<double> weight_decay = {}) {
  typename Opt::Override o;
  o.lr_scale = lr_scale;
  o.weight_decay = weight_decay;
  return o;
}
// SubTrack (SubTrack++ with plus_plus) for the small shapes: rank 8, tracking every second step
// with η = 5, no parameter left plain.
recipes::SubTrack<>::Options small_subtrack_options(bool plus_plus, double lr) {
  auto o = recipes::subtrack_options(plus_plus);
  o.rule.lr = lr;
  o.transform.rank = 8;
  o.transform.update_gap = 2;
  o.transform.eta = 5.0;
  o.fallback.min_size = 0;
  return o;
}
// SubTrack++ for the cases around a first SVD refresh: the small shapes' set-up with the recipe's
// lr, the first SVD randomized, projection-aware moments as `aware`.
recipes::SubTrack<>::Options first_refresh_options(bool aware) {
  auto o = small_subtrack_options(true, recipes::subtrack_options(true).rule.lr);
  o.transform.init_method = transforms::SvdMethod::randomized;
  o.residual.projection_aware = aware;
  return o;
}
cuda::DeviceOptions device_options(bool check_finite, bool report_skips, bool tf32 = true) {
  cuda::DeviceOptions d;
  d.check_finite = check_finite;
  d.report_skips = report_skips;
  d.tf32 = tf32;
  return d;
}

// `steps` steps on both backends from the same weights and gradients; the GPU's weights (and
// reports and per-parameter counts) must equal the CPU's after every step, its state at the end.
// With bf16 parameters the CPU steps the bf16-rounded weights and its result is rounded again.
template <class Gpu, class Cpu>
void compare(Gpu& gpu, Cpu& cpu, const RunOptions& ro) {
  std::vector<std::vector<float>> w = initial_weights();
  const bool bf16_w = ro.precision == cuda::Precision::bf16;
  const bool bf16_g = ro.precision != cuda::Precision::fp32;
  if (bf16_w)
    for (auto& x : w)
      std::transform(x.begin(), x.end(), x.begin(), round_bf16);
  DeviceSet dev(ro.precision, w);
  const std::vector<std::vector<float>> w0 = w;
  for (int k = 0; k < ro.steps; ++k) {
    CAPTURE(k);
    std::vector<std::vector<float>> g = gradients(k, ro.poison);
    if (bf16_g)
      for (auto& x : g)
        std::transform(x.begin(), x.end(), x.begin(), round_bf16);
    std::vector<Param> hp;
    for (std::size_t i = 0; i < names.size(); ++i)
      hp.push_back({names[i], host_view(w[i].data(), shapes[i].rows, shapes[i].cols),
                    host_view<const float>(g[i].data(), shapes[i].rows, shapes[i].cols)});
    const StepReport want = cpu.step(hp);
    if (bf16_w)
      for (auto& x : w)
        std::transform(x.begin(), x.end(), x.begin(), round_bf16);
    const StepReport got = dev.step(gpu, g);
    CHECK(got.skipped == want.skipped);
    CHECK(got.stepped == want.stepped);
    for (std::size_t i = 0; i < names.size(); ++i) {
      CAPTURE(names[i]);
      CHECK(gpu.step_count(names[i]) == cpu.step_count(names[i]));
      const std::vector<float> wg = dev.weights(i);
      if (ro.ulps_per_step == 0) {
        CHECK(test::max_ulp(wg, w[i]) == 0);
      } else if (bf16_w) {
        double ref = 0;
        for (const float x : w[i])
          ref = std::max(ref, std::fabs(double(x)));
        const double fp32 = ro.ulps_per_step * (k + 1) * 0x1p-23 * ref;
        std::size_t differ = 0;
        bool close = true;
        for (std::size_t j = 0; j < wg.size(); ++j)
          if (wg[j] != w[i][j]) {
            ++differ;
            const double d = std::fabs(double(wg[j]) - w[i][j]);  // at most two bf16 spacings
            close = close && d <= fp32 + 0x1p-6 * std::max(std::fabs(wg[j]), std::fabs(w[i][j]));
          }
        CHECK(close);
        CHECK(differ <= wg.size() / 50);
      } else {
        double d = 0, ref = 0;
        for (std::size_t j = 0; j < wg.size(); ++j) {
          d = std::max(d, std::fabs(double(wg[j]) - w[i][j]));
          ref = std::max(ref, std::fabs(double(w[i][j])));
        }
        CHECK(d <= ro.ulps_per_step * (k + 1) * 0x1p-23 * ref);
      }
      if (ro.precision == cuda::Precision::fp32_master) {  // the GPU's own weight, rounded
        const auto copy = test::download<std::uint16_t>(dev.copy[i]->ptr, wg.size());
        CHECK(copy == to_bf16(wg));
      }
    }
  }
  // Inexact bf16 runs must move the weights by more than the rounding's noise: most of them.
  if (bf16_w && ro.ulps_per_step != 0)
    for (std::size_t i = 0; i < names.size(); ++i) {
      std::size_t moved = 0;
      for (std::size_t j = 0; j < w[i].size(); ++j)
        if (w[i][j] != w0[i][j]) ++moved;
      CAPTURE(names[i]);
      CHECK(moved >= w[i].size() / 2);
    }
  CHECK(gpu.state_bytes() == cpu.state_bytes());
  if (ro.ulps_per_step == 0) CHECK(same_tensors(gpu.to_checkpoint(), cpu.to_checkpoint()));
}

// A dominant rank-8 part in the gradients of "a" and "c" (σ_q = 4·0.8^q on DCT vectors, a
// sign per step) over the noise: the CPU's and the GPU's SVDs then find the same basis to float
// accuracy (on the noise alone, nearly equal singular values let the bases differ by far more).
void low_rank_part(int step, std::vector<std::vector<float>>& g) {
  const double pi = 3.14159265358979323846;
  for (const std::size_t t : {std::size_t{0}, std::size_t{2}}) {
    const index_t rows = shapes[t].rows, cols = shapes[t].cols;
    for (int q = 0; q < 8; ++q) {
      const double sigma = 4.0 * std::pow(0.8, q) * ((step + q) % 3 == 0 ? -1.0 : 1.0);
      for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) {
          const double u = std::sqrt(2.0 / double(rows)) *
                           std::cos(pi * (double(i) + 0.5) * (q + 1) / double(rows));
          const double v = std::sqrt(2.0 / double(cols)) *
                           std::cos(pi * (double(j) + 0.5) * (q + 1) / double(cols));
          g[t][static_cast<std::size_t>(i * cols + j)] += static_cast<float>(sigma * u * v);
        }
    }
  }
}

// A NaN in "a" at step 1; an infinity in the bias and a NaN in "c" at step 3; "c" again at 4.
void poison(int step, std::vector<std::vector<float>>& g) {
  if (step == 1) g[0][5] = std::numeric_limits<float>::quiet_NaN();
  if (step == 3) {
    g[1][95] = std::numeric_limits<float>::infinity();
    g[2][6143] = -std::numeric_limits<float>::quiet_NaN();
  }
  if (step == 4) g[2][0] = -std::numeric_limits<float>::infinity();
}
void low_rank_and_poison(int step, std::vector<std::vector<float>>& g) {
  low_rank_part(step, g);
  poison(step, g);
}

template <template <class> class Recipe>
void skip_case(const typename Recipe<backend::cpu>::Options& o, double ulps_per_step = 0) {
  const auto fp32 = cuda::Precision::fp32;
  Recipe<backend::cpu> cpu(o);
  Recipe<backend::cuda> gpu(o);
  compare(gpu, cpu, run(6, poison, fp32, ulps_per_step));
  CHECK(cpu.step_count("a") == 5);
  CHECK(cpu.step_count("c") == 4);
  // Resume from the GPU's checkpoint (counts that differ between parameters) on a fresh GPU
  // optimizer and on the CPU: two more steps, a NaN in "bias" at the first.
  Recipe<backend::cuda> resumed(o);
  resumed.from_checkpoint(gpu.to_checkpoint());
  CHECK(resumed.step_count("c") == 4);
  Recipe<backend::cpu> cpu2(o);
  cpu2.from_checkpoint(cpu.to_checkpoint());
  compare(resumed, cpu2,
          run(
              2,
              [](int step, std::vector<std::vector<float>>& g) {
                if (step == 0) g[1][0] = std::numeric_limits<float>::quiet_NaN();
              },
              fp32, ulps_per_step));
}

}  // namespace

TEST_CASE("cuda facade: a non-finite gradient skips its tensor on the plain path as on the CPU") {
  SUBCASE("adamw (fp32, torch)") {
    skip_case<recipes::AdamW>(recipes::adamw_options());
  }
  SUBCASE("adam8bit (bnb; a and c in 8 bits, the bias in fp32)") {
    auto o = recipes::adam8bit_options();
    o.store.min_8bit_size = 1024;
    skip_case<recipes::Adam8bit>(o);
  }
  // GWT's engine: a and c compressed, each with its own count after its skips.
  SUBCASE("gwt without the limiter (finite check, then one pass)") {
    auto o = recipes::gwt_options();
    o.residual.limiter_gamma = 0.0;
    skip_case<recipes::Gwt>(o);
  }
  SUBCASE("gwt with the limiter (two passes; ‖N‖ summed in another order: to rounding)") {
    skip_case<recipes::Gwt>(recipes::gwt_options(), 4);
  }
  SUBCASE("adamw, bf16 moments with stochastic rounding (the lagging tensor's own epoch)") {
    using Opt = Optimizer<optim::Adam, transforms::Identity, state::Bf16>;
    auto o = Opt::Options{};
    o.store.stochastic_rounding = true;
    o.seed = 42;
    Opt cpu(o);
    Optimizer<optim::Adam, transforms::Identity, state::Bf16, backend::cuda> gpu(o);
    compare(gpu, cpu, run(6, poison));
  }
}

TEST_CASE("cuda facade: report_skips off never waits; last_skipped reads the flags; no check") {
  const auto o = recipes::adamw_options();
  {
    recipes::AdamW<backend::cuda> gpu(o, nullptr, device_options(true, false));
    DeviceSet dev(cuda::Precision::fp32, initial_weights());
    const StepReport r = dev.step(gpu, gradients(1, poison));
    CHECK(r.stepped == 3);
    CHECK(r.skipped.empty());
    CHECK(gpu.last_skipped() == std::vector<std::string>{"a"});
    CHECK(gpu.step_count("a") == 0);
    CHECK(gpu.step_count("c") == 1);
  }
  {  // check_finite off: the NaN goes through (a trainer that checks its gradients itself)
    recipes::AdamW<backend::cuda> gpu(o, nullptr, device_options(false, true));
    DeviceSet dev(cuda::Precision::fp32, initial_weights());
    const StepReport r = dev.step(gpu, gradients(1, poison));
    CHECK(r.skipped.empty());
    CHECK(std::isnan(dev.weights(0)[5]));
    CHECK(gpu.step_count("a") == 1);
  }
}

TEST_CASE("cuda facade: per-parameter overrides as on the CPU") {
  SUBCASE("adamw: lr scale and weight decay") {
    auto o = recipes::adamw_options();
    recipes::AdamW<> cpu(o);
    recipes::AdamW<backend::cuda> gpu(o);
    using Opt = recipes::AdamW<>;
    const auto bias = override_of<Opt>(0.5, 0.0);
    const auto c = override_of<Opt>(2.0);
    cpu.set_override("bias", bias);
    gpu.set_override("bias", bias);
    cpu.set_override("c", c);
    gpu.set_override("c", c);
    CHECK_THROWS_AS(gpu.set_override("a", override_of<Opt>(-1.0)), Error);
    CHECK_THROWS_AS(gpu.set_override("a", override_of<Opt>(1.0, std::nan(""))), Error);
    compare(gpu, cpu, run(3, poison));
    gpu.set_lr(2e-3);  // each engine takes lr × its scale
    cpu.set_lr(2e-3);
    compare(gpu, cpu, run(1));
    CHECK_THROWS_AS(gpu.set_override("a", override_of<Opt>(1.0)), Error);  // after step 1
  }
  SUBCASE("gwt: a forced plain parameter, lr scale and residual scale") {
    auto o = recipes::gwt_options();
    o.fallback.min_size = 0;
    o.residual.limiter_gamma = 0;  // same bits (the limiter's norm is summed in another order)
    recipes::Gwt<> cpu(o);
    recipes::Gwt<backend::cuda> gpu(o);
    using Opt = recipes::Gwt<>;
    auto a = override_of<Opt>(1.0);
    a.role = ParamRole::plain;
    auto c = override_of<Opt>(0.5, 0.1);
    c.residual = o.residual;
    c.residual->scale = 0.5;
    cpu.set_override("a", a);
    cpu.set_override("c", c);
    gpu.set_override("a", a);
    gpu.set_override("c", c);
    auto cols = o.transform;
    cols.axis = transforms::Axis::cols;
    auto bad = override_of<Opt>(1.0);
    bad.transform = cols;
    CHECK_THROWS_AS(gpu.set_override("bias", bad), Error);
    compare(gpu, cpu, run(4));
    CHECK_FALSE(gpu.is_compressed("a"));
    CHECK(gpu.is_compressed("c"));
  }
  SUBCASE("galore: a rank override gets its own engine (subspace accuracy)") {
    auto o = recipes::galore_options();
    o.transform.rank = 8;
    o.transform.update_gap = 3;
    o.transform.method = transforms::SvdMethod::exact;
    o.fallback.min_size = 0;
    recipes::GaLore<> cpu(o);
    recipes::GaLore<backend::cuda> gpu(o, nullptr, device_options(true, true, false));
    using Opt = recipes::GaLore<>;
    auto c = override_of<Opt>(0.5);
    c.transform = o.transform;
    c.transform->rank = 4;
    cpu.set_override("c", c);
    gpu.set_override("c", c);
    auto limited = override_of<Opt>(1.0);
    limited.residual = o.residual;
    limited.residual->limiter_gamma = 1.01;
    CHECK_THROWS_AS(gpu.set_override("a", limited), Error);
    auto a = override_of<Opt>(1.0);
    a.transform = o.transform;
    a.transform->rank = 1000;  // above min(m, n): the CPU's fallback keeps "a" plain, on both
    cpu.set_override("a", a);
    gpu.set_override("a", a);
    compare(gpu, cpu, run(5, {}, cuda::Precision::fp32, 8));
    CHECK_FALSE(gpu.is_compressed("a"));
    CHECK(gpu.is_compressed("c"));
  }
}

TEST_CASE("cuda facade: bf16 parameters and fp32 master weights against the CPU") {
  SUBCASE("adamw, bf16 weights and gradients, with a skip") {
    recipes::AdamW<> cpu(recipes::adamw_options());
    recipes::AdamW<backend::cuda> gpu(recipes::adamw_options());
    compare(gpu, cpu, run(5, poison, cuda::Precision::bf16));
  }
  SUBCASE("adam8bit, fp32 master weights, bf16 gradients and model copy") {
    auto o = recipes::adam8bit_options();
    o.store.min_8bit_size = 1024;
    recipes::Adam8bit<> cpu(o);
    recipes::Adam8bit<backend::cuda> gpu(o);
    compare(gpu, cpu, run(4, poison, cuda::Precision::fp32_master));
  }
  SUBCASE("gwt, bf16 weights and gradients") {
    auto o = recipes::gwt_options();
    o.fallback.min_size = 0;
    o.residual.limiter_gamma = 0;
    recipes::Gwt<> cpu(o);
    recipes::Gwt<backend::cuda> gpu(o);
    compare(gpu, cpu, run(4, {}, cuda::Precision::bf16));
    // A later step in another precision is refused, nothing changed.
    DeviceSet other(cuda::Precision::fp32, initial_weights());
    CHECK_THROWS_AS(other.step(gpu, gradients(0, {})), Error);
  }
  // The low-rank engine steps fp32 copies of the widened values (subspace accuracy: exact SVDs,
  // no TF32); the learning rates make a step a few bf16 ulps of the weights.
  SUBCASE("galore, bf16 weights and gradients, with skips") {
    auto o = recipes::galore_options();
    o.rule.lr = 0.1;
    o.transform.rank = 8;
    o.transform.update_gap = 200;  // the GPU refreshes on the global count, the CPU on its own
    o.transform.method = transforms::SvdMethod::exact;
    o.fallback.min_size = 0;  // "a" and "c" compressed, the bias plain
    recipes::GaLore<> cpu(o);
    recipes::GaLore<backend::cuda> gpu(o, nullptr, device_options(true, true, false));
    compare(gpu, cpu, run(5, low_rank_and_poison, cuda::Precision::bf16, 8));
    CHECK(gpu.is_compressed("a"));
    CHECK(gpu.step_count("c") == 3);
  }
  SUBCASE("subtrack++, fp32 master weights, bf16 gradients and model copy") {
    const auto o = small_subtrack_options(true, 0.01);
    recipes::SubTrack<> cpu(o);
    recipes::SubTrack<backend::cuda> gpu(o, nullptr, device_options(true, true, false));
    // Random gradients: with low_rank_part, the tracking's direction (B = (I − SSᵀ)W, noise
    // only) is ill-conditioned and the backends' bases part after the second tracking step.
    compare(gpu, cpu, run(5, {}, cuda::Precision::fp32_master, 64));
    CHECK(gpu.is_compressed("c"));
  }
  SUBCASE("subtrack, bf16 weights and gradients") {
    const auto o = small_subtrack_options(false, 0.1);
    recipes::SubTrack<> cpu(o);
    recipes::SubTrack<backend::cuda> gpu(o, nullptr, device_options(true, true, false));
    compare(gpu, cpu, run(5, low_rank_part, cuda::Precision::bf16, 64));
  }
}

TEST_CASE("cuda facade: low-rank checkpoints keep per-tensor step counts across backends") {
  // Skips leave "a" at 5 steps and "c" at 4 of 6 (GaLore's compressed parameters, the bias
  // plain); the file of either backend resumes on the other with those counts (the next steps
  // take each tensor's own bias corrections), and on its own backend.
  auto o = recipes::galore_options();
  o.transform.rank = 8;
  o.transform.update_gap = 200;  // one refresh, at k = 0 (the GPU's schedule is global)
  o.transform.method = transforms::SvdMethod::exact;
  o.fallback.min_size = 0;
  const auto dev = device_options(true, true, false);
  recipes::GaLore<> cpu(o);
  recipes::GaLore<backend::cuda> gpu(o, nullptr, dev);
  compare(gpu, cpu, run(6, low_rank_and_poison, cuda::Precision::fp32, 8));
  REQUIRE(cpu.step_count("a") == 5);
  REQUIRE(cpu.step_count("c") == 4);
  const io::TensorFile from_gpu = gpu.to_checkpoint(), from_cpu = cpu.to_checkpoint();
  auto nan_bias = [](int step, std::vector<std::vector<float>>& g) {
    low_rank_part(step, g);
    if (step == 0) g[1][0] = std::numeric_limits<float>::quiet_NaN();
  };
  SUBCASE("GPU file -> CPU, CPU file -> GPU") {
    recipes::GaLore<backend::cuda> resumed(o, nullptr, dev);
    resumed.from_checkpoint(from_cpu);
    CHECK(resumed.step_count("c") == 4);
    recipes::GaLore<> cpu2(o);
    cpu2.from_checkpoint(from_gpu);
    CHECK(cpu2.step_count("a") == 5);
    compare(resumed, cpu2, run(3, nan_bias, cuda::Precision::fp32, 8));
    CHECK(resumed.step_count("a") == 8);
    CHECK(resumed.step_count("c") == 7);
  }
  SUBCASE("GPU file -> the bound GPU optimizer (the engines take the counts in place)") {
    gpu.from_checkpoint(from_cpu);  // either file goes through the bound engines unchanged
    CHECK(same_tensors(gpu.to_checkpoint(), from_cpu));
    CHECK_FALSE(same_tensors(from_cpu, from_gpu));
    gpu.from_checkpoint(from_gpu);
    CHECK(gpu.step_count("a") == 5);
    CHECK(gpu.step_count("c") == 4);
    CHECK(same_tensors(gpu.to_checkpoint(), from_gpu));
  }
  SUBCASE("without check_finite, a file whose GWT parameters differ is refused") {
    auto g = recipes::gwt_options();
    g.fallback.min_size = 0;
    g.residual.limiter_gamma = 0;
    recipes::Gwt<> gcpu(g);
    std::vector<std::vector<float>> w = initial_weights();
    for (int k = 0; k < 3; ++k) {
      const std::vector<std::vector<float>> gr = gradients(k, poison);
      std::vector<Param> hp;
      for (std::size_t i = 0; i < names.size(); ++i)
        hp.push_back({names[i], host_view(w[i].data(), shapes[i].rows, shapes[i].cols),
                      host_view<const float>(gr[i].data(), shapes[i].rows, shapes[i].cols)});
      gcpu.step(hp);
    }
    REQUIRE(gcpu.step_count("a") == 2);
    recipes::Gwt<backend::cuda> unchecked(g, nullptr, device_options(false, true));
    CHECK_THROWS_AS(unchecked.from_checkpoint(gcpu.to_checkpoint()), Error);
    CHECK(unchecked.size() == 0);
    recipes::Gwt<backend::cuda> checked(g);  // per-tensor counts (check_finite, the default)
    checked.from_checkpoint(gcpu.to_checkpoint());
    CHECK(checked.step_count("a") == 2);
    CHECK(checked.step_count("c") == 3);
  }
}

TEST_CASE("cuda facade: DeviceOptions::refresh_batch is checked") {
  auto o = recipes::galore_options();
  cuda::DeviceOptions d;
  d.refresh_batch = 0;
  CHECK_THROWS_WITH_AS(recipes::GaLore<backend::cuda>(o, nullptr, d),
                       doctest::Contains("refresh_batch must be at least 1"), Error);
  d.refresh_batch = 1;  // fewer than the tensors of one sketch width: one call each
  d.tf32 = false;
  o.transform.rank = 8;
  o.transform.update_gap = 2;
  o.transform.method = transforms::SvdMethod::randomized;
  o.fallback.min_size = 0;
  recipes::GaLore<> cpu(o);
  recipes::GaLore<backend::cuda> gpu(o, nullptr, d);
  compare(gpu, cpu, run(3, low_rank_part, cuda::Precision::fp32, 64));
}

TEST_CASE("cuda facade: subtrack++ retries a failed first SVD and rotates the moments as the CPU") {
  // At k = 0 the GPU's SVD refreshes are made to break down and the CPU's two SVDs (randomized,
  // then exact) of "a" and "c" to fail (the test hooks; a zero or tiny gradient is no failure,
  // see the last cases). Both install the identity basis; at k = 2 both run the SVD again instead
  // of tracking, and carry the moments of steps 0-1 into the new basis (C = S_newᵀ I); k = 4
  // tracks. Before the GPU retried, it tracked from the identity at k = 2 and its weights left the
  // CPU's.
  for (const bool aware : {true, false}) {
    CAPTURE(aware);
    const auto o = first_refresh_options(aware);
    recipes::SubTrack<> cpu(o);
    recipes::SubTrack<backend::cuda> gpu(o, nullptr, device_options(true, true, false));
    auto fail_first = [](int step, std::vector<std::vector<float>>&) {
      cuda::detail::svd_injected_failures = step == 0 ? ~std::uint64_t{0} : 0;  // every tensor
      if (step == 0) cpu::detail::svd_injected_failures = 4;  // both methods, "a" and "c"
    };
    compare(gpu, cpu, run(5, fail_first, cuda::Precision::fp32, 64));
    CHECK(cpu::detail::svd_injected_failures == 0);
    cpu::detail::svd_injected_failures = 0;
    const io::TensorFile f = gpu.to_checkpoint();
    for (const char* name : {"a", "c"}) {
      CAPTURE(name);
      io::StateReader r(f, name);
      CHECK(r.i64("last_refresh_status") ==
            static_cast<std::int64_t>(transforms::RefreshStatus::ok));
    }
  }
}

namespace {

// Steps [from, to) on the GPU (weights in `dev`) and on the CPU (weights in `w`).
template <class Gpu>
void gpu_steps(Gpu& gpu, DeviceSet& dev, int from, int to, const Poison& p) {
  for (int k = from; k < to; ++k)
    dev.step(gpu, gradients(k, p));
}
template <class Cpu>
void cpu_steps(Cpu& cpu, std::vector<std::vector<float>>& w, int from, int to, const Poison& p) {
  for (int k = from; k < to; ++k) {
    const std::vector<std::vector<float>> g = gradients(k, p);
    std::vector<Param> hp;
    for (std::size_t i = 0; i < names.size(); ++i)
      hp.push_back({names[i], host_view(w[i].data(), shapes[i].rows, shapes[i].cols),
                    host_view<const float>(g[i].data(), shapes[i].rows, shapes[i].cols)});
    cpu.step(hp);
  }
}
// A checkpoint's provisional flag of `name` (-1: absent).
std::int64_t provisional_flag(const io::TensorFile& f, const char* name) {
  const io::StateReader r(f, name);
  return r.has("provisional") ? r.i64("provisional") : -1;
}
// The GPU checkpoint `f` says `name`'s last SVD refresh succeeded: status ok, no failure, not
// provisional.
void check_refresh_succeeded(const io::TensorFile& f, const char* name) {
  CHECK(io::StateReader(f, name).i64("last_refresh_status") ==
        static_cast<std::int64_t>(transforms::RefreshStatus::ok));
  CHECK(io::StateReader(f, name).i64("last_failure") ==
        static_cast<std::int64_t>(transforms::RefreshFailure::none));
  CHECK(provisional_flag(f, name) == 0);
}
// max |a − b| <= ulps · 2^-23 · max |b|.
bool within_ulps(const std::vector<float>& a, const std::vector<float>& b, double ulps) {
  double d = 0, ref = 0;
  for (std::size_t j = 0; j < a.size(); ++j) {
    d = std::max(d, std::fabs(double(a[j]) - b[j]));
    ref = std::max(ref, std::fabs(double(b[j])));
  }
  return d <= ulps * 0x1p-23 * ref;
}

}  // namespace

TEST_CASE("cuda facade: checkpoints keep the provisional basis of a failed first SVD") {
  // As the case above: "a" and "c" get the identity basis at k = 0 (both backends' SVDs are made
  // to fail). Saved after k = 1, the
  // file must keep the mark so that k = 2 of the resumed run, on either backend, runs the SVD
  // again as the straight run does; before the flag was saved, it tracked from the identity.
  const auto o = first_refresh_options(true);
  const auto dev = device_options(true, true, false);
  const auto fp32 = cuda::Precision::fp32;
  const Poison zero = [](int step, std::vector<std::vector<float>>&) {
    cuda::detail::svd_injected_failures = step == 0 ? ~std::uint64_t{0} : 0;  // every tensor
  };
  const Poison zero_cpu = [](int step, std::vector<std::vector<float>>&) {
    if (step == 0) cpu::detail::svd_injected_failures = 4;  // both methods, "a" and "c"
  };
  const int k = 2, n = 5;
  recipes::SubTrack<backend::cuda> gpu_straight(o, nullptr, dev);
  DeviceSet d1(fp32, initial_weights());
  gpu_steps(gpu_straight, d1, 0, n, zero);
  recipes::SubTrack<> cpu_straight(o);
  std::vector<std::vector<float>> w1 = initial_weights();
  cpu_steps(cpu_straight, w1, 0, n, zero_cpu);
  REQUIRE(cpu::detail::svd_injected_failures == 0);

  recipes::SubTrack<backend::cuda> gpu_half(o, nullptr, dev);
  DeviceSet d2(fp32, initial_weights());
  gpu_steps(gpu_half, d2, 0, k, zero);
  recipes::SubTrack<> cpu_half(o);
  std::vector<std::vector<float>> w2 = initial_weights();
  cpu_steps(cpu_half, w2, 0, k, zero_cpu);
  REQUIRE(cpu::detail::svd_injected_failures == 0);
  const io::TensorFile from_gpu = gpu_half.to_checkpoint(), from_cpu = cpu_half.to_checkpoint();
  for (const char* name : {"a", "c"}) {
    CAPTURE(name);
    CHECK(provisional_flag(from_gpu, name) == 1);
    CHECK(provisional_flag(from_cpu, name) == 1);
  }
  CHECK(io::StateReader(from_gpu, "a").i64("last_refresh_status") ==
        static_cast<std::int64_t>(transforms::RefreshStatus::identity_basis));

  SUBCASE("GPU file -> a fresh GPU optimizer: the straight run's bits") {
    recipes::SubTrack<backend::cuda> resumed(o, nullptr, dev);
    resumed.from_checkpoint(from_gpu);
    gpu_steps(resumed, d2, k, n, zero);
    for (std::size_t i = 0; i < names.size(); ++i) {
      CAPTURE(names[i]);
      CHECK(test::max_ulp(d2.weights(i), d1.weights(i)) == 0);
    }
    CHECK(same_tensors(resumed.to_checkpoint(), gpu_straight.to_checkpoint()));
    CHECK(provisional_flag(resumed.to_checkpoint(), "a") == 0);
  }
  SUBCASE("GPU file -> CPU, CPU file -> GPU: the other backend's straight run") {
    recipes::SubTrack<> cpu_resumed(o);
    cpu_resumed.from_checkpoint(from_gpu);
    std::vector<std::vector<float>> w3;
    for (std::size_t i = 0; i < names.size(); ++i)
      w3.push_back(d2.weights(i));
    cpu_steps(cpu_resumed, w3, k, n, zero);
    recipes::SubTrack<backend::cuda> gpu_resumed(o, nullptr, dev);
    gpu_resumed.from_checkpoint(from_cpu);
    DeviceSet d4(fp32, w2);
    gpu_steps(gpu_resumed, d4, k, n, zero);
    for (std::size_t i = 0; i < names.size(); ++i) {
      CAPTURE(names[i]);
      CHECK(within_ulps(w3[i], d1.weights(i), 64.0 * n));  // as the case above: 64 per step
      CHECK(within_ulps(d4.weights(i), w1[i], 64.0 * n));
    }
    CHECK(cpu_resumed.transform_state("a").last_refresh_status == transforms::RefreshStatus::ok);
    CHECK(!cpu_resumed.transform_state("a").provisional);
  }
}

TEST_CASE("cuda facade: a zero gradient at the first SVD is a success on both backends") {
  // "a" and "c" are all zeros at k = 0. Every direction is then a singular vector: the CPU's
  // SVD returned whichever coordinate vectors Eigen picked (for these shapes not the leading
  // ones), and the GPU's randomized SVD broke down (a zero sketch has no Cholesky factor) and
  // installed the leading ones as provisional, so that SubTrack retried the SVD at k = 2 where
  // the CPU tracked. Now both install the first r coordinate vectors with status ok, not
  // provisional, and the runs agree: GaLore keeps that basis (one refresh), SubTrack++ tracks it.
  const Poison zero_first = [](int step, std::vector<std::vector<float>>& g) {
    if (step == 0) {
      std::fill(g[0].begin(), g[0].end(), 0.0f);
      std::fill(g[2].begin(), g[2].end(), 0.0f);
    } else {
      low_rank_part(step, g);
    }
  };
  const auto dev = device_options(true, true, false);
  // After k = 0 on fresh optimizers: the outcome of the zero gradient's refresh.
  auto check_first = [&](auto& gpu, auto& cpu) {
    compare(gpu, cpu, run(1, zero_first, cuda::Precision::fp32, 64));
    const io::TensorFile f = gpu.to_checkpoint();
    for (const char* name : {"a", "c"}) {
      CAPTURE(name);
      check_refresh_succeeded(f, name);
      CHECK(cpu.transform_state(name).last_refresh_status == transforms::RefreshStatus::ok);
      CHECK(!cpu.transform_state(name).provisional);
      const cpu::RowMatrix& b = cpu.transform_state(name).basis;  // S (64×8) or P = Sᵀ (8×64)
      CHECK(b == cpu::RowMatrix::Identity(b.rows(), b.cols()));
    }
  };
  for (const auto method : {transforms::SvdMethod::randomized, transforms::SvdMethod::exact}) {
    CAPTURE(static_cast<int>(method));
    auto o = recipes::galore_options();
    o.transform.rank = 8;
    o.transform.update_gap = 200;  // one refresh: the run keeps the zero gradient's basis
    o.transform.method = method;
    o.fallback.min_size = 0;
    {
      recipes::GaLore<> cpu(o);
      recipes::GaLore<backend::cuda> gpu(o, nullptr, dev);
      check_first(gpu, cpu);
    }
    recipes::GaLore<> cpu(o);
    recipes::GaLore<backend::cuda> gpu(o, nullptr, dev);
    compare(gpu, cpu, run(5, zero_first, cuda::Precision::fp32, 64));
  }
  for (const bool aware : {true, false}) {
    CAPTURE(aware);
    const auto o = first_refresh_options(aware);
    {
      recipes::SubTrack<> cpu(o);
      recipes::SubTrack<backend::cuda> gpu(o, nullptr, dev);
      check_first(gpu, cpu);
    }
    recipes::SubTrack<> cpu(o);
    recipes::SubTrack<backend::cuda> gpu(o, nullptr, dev);
    compare(gpu, cpu, run(5, zero_first, cuda::Precision::fp32, 64));
    const io::TensorFile f = gpu.to_checkpoint();
    for (const char* name : {"a", "c"}) {
      CAPTURE(name);
      CHECK(provisional_flag(f, name) == 0);
      CHECK(!cpu.transform_state(name).provisional);
    }
  }
}

namespace {

// The GPU checkpoint's basis of `name`.
std::vector<float> basis_of(const io::TensorFile& f, const char* name) {
  const io::StateReader r(f, name);
  const auto& shape = r.shape("basis");
  REQUIRE(shape.size() == 2);
  std::vector<float> b(static_cast<std::size_t>(shape[0] * shape[1]));
  r.values<float>("basis", std::span<float>(b));
  return b;
}

// "a" and "c" scaled by `scale` (a power of two) at k = 0 (see the case below); with the CPU
// (`cpu_too`), its first refresh must succeed too and five steps agree.
template <template <class> class Recipe>
void scaled_case(const typename Recipe<backend::cpu>::Options& o, float scale, bool cpu_too) {
  const auto dev = device_options(true, true, false);
  const auto fp32 = cuda::Precision::fp32;
  const Poison scaled = [scale](int step, std::vector<std::vector<float>>& g) {
    low_rank_part(step, g);
    if (step != 0) return;
    for (const std::size_t t : {std::size_t{0}, std::size_t{2}})
      for (float& x : g[t])
        x *= scale;
  };
  // After k = 0: the unscaled gradient's GPU basis, then the scaled one's against it.
  Recipe<backend::cuda> plain(o, nullptr, dev);
  DeviceSet d(fp32, initial_weights());
  gpu_steps(plain, d, 0, 1, Poison(low_rank_part));
  const io::TensorFile fp = plain.to_checkpoint();
  Recipe<backend::cpu> cpu(o);
  Recipe<backend::cuda> gpu(o, nullptr, dev);
  if (cpu_too) {
    compare(gpu, cpu, run(1, scaled, fp32, 64));
  } else {
    DeviceSet ds(fp32, initial_weights());
    gpu_steps(gpu, ds, 0, 1, scaled);
  }
  const io::TensorFile f = gpu.to_checkpoint();
  for (const char* name : {"a", "c"}) {
    CAPTURE(name);
    check_refresh_succeeded(f, name);
    CHECK(basis_of(f, name) == basis_of(fp, name));  // the same bits
    if (!cpu_too) continue;
    CHECK(cpu.transform_state(name).last_refresh_status == transforms::RefreshStatus::ok);
    CHECK(!cpu.transform_state(name).provisional);
  }
  if (cpu_too) {  // and the steps after it
    Recipe<backend::cpu> cpu5(o);
    Recipe<backend::cuda> gpu5(o, nullptr, dev);
    compare(gpu5, cpu5, run(5, scaled, fp32, 64));
  }
}

}  // namespace

TEST_CASE(
    "cuda facade: a gradient scaled by 2^-100 or 2^80 at the first SVD refreshes as unscaled") {
  // "a" and "c" (a dominant rank-8 part) scaled by 2^-100 or 2^80 at k = 0: finite and nonzero,
  // but the randomized SVD's Grams (YᵀY of the sketch Y = ĜΩ ~ |G|) underflowed to zero or
  // overflowed to Inf, so the GPU's refresh broke down and installed the identity as provisional.
  // The GPU now scales its products with Ĝ by an exact power of two from the gradient's largest
  // |x| (here 2^100 and 2^-80): the refresh runs on the unscaled gradient's very numbers and
  // installs its basis, bit for bit, with status ok, not provisional. At 2^-100 the CPU's refresh
  // (which scales its products the same way, cpu::refresh_exponent) succeeds too and five steps
  // agree; at 2^80 Adam's g² overflows on both backends, so that scale is checked on the GPU.
  for (const float scale : {0x1p-100f, 0x1p80f}) {
    CAPTURE(scale);
    const bool cpu_too = scale < 1.0f;
    auto o = recipes::galore_options();
    o.transform.rank = 8;
    o.transform.update_gap = 200;  // one refresh
    o.transform.method = transforms::SvdMethod::randomized;
    o.fallback.min_size = 0;
    scaled_case<recipes::GaLore>(o, scale, cpu_too);
    scaled_case<recipes::SubTrack>(first_refresh_options(true), scale, cpu_too);
  }
}
