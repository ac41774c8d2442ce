// The GPU's Philox matrices, Haar DWT and fused GWT step against the CPU backend.
#include <slimgrad/backend/cpu/adam.hpp>
#include <slimgrad/backend/cpu/dwt.hpp>
#include <slimgrad/backend/cpu/gwt_fused.hpp>
#include <slimgrad/backend/cpu/stores.hpp>
#include <slimgrad/backend/cuda/api.hpp>
#include <slimgrad/core/philox.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include "device.hpp"

using namespace slimgrad;
using test::DeviceBuffer;

TEST_CASE("cuda fill_gaussian: the CPU's bits, any shape and leading dimension") {
  struct Case {
    index_t rows, cols, ld;
    random::Key key;
  };
  const Case cases[] = {{1, 1, 1, {1, 2, 3}},
                        {7, 13, 16, {42, 0xFFFFFFFFFFull, 0}},
                        {256, 1000, 1000, {0xDEADBEEFCAFEull, 7, 9}},
                        {33, 5, 9, {5, 5, 0xFFFFFFFFu}}};
  for (const Case& c : cases) {
    CAPTURE(c.rows);
    CAPTURE(c.cols);
    const auto size = static_cast<std::size_t>(c.rows * c.ld);
    std::vector<float> cpu(size, -7.0f);
    random::fill_gaussian(HostView<float>(cpu.data(), c.rows, c.cols, c.ld), c.key, 0.02);
    DeviceBuffer d(size * 4);
    test::upload(d.ptr, std::vector<float>(size, -7.0f));  // poison: gaps must stay untouched
    cuda::fill_gaussian(DeviceView<float>(d.as<float>(), c.rows, c.cols, c.ld), c.key, 0.02,
                        nullptr);
    const auto gpu = test::download<float>(d.ptr, size);
    CHECK(std::memcmp(gpu.data(), cpu.data(), size * 4) == 0);
  }
}

namespace {

template <int L>
void check_dwt(index_t rows, index_t cols, transforms::BoundaryMode mode) {
  using Dwt = transforms::Dwt<transforms::Haar, L>;
  impl<Dwt, backend::cpu> cpu({mode, transforms::Axis::rows});
  const Shape gs{rows, cols};
  const Shape cs = cpu.coeff_shape(gs);
  const auto g = test::random_floats(static_cast<std::size_t>(gs.size()), 77);
  std::vector<float> c_cpu(static_cast<std::size_t>(cs.size())), x_cpu(g.size());
  auto state = cpu.init(gs, 0);
  cpu.forward(state, host_view(g.data(), rows, cols), host_view(c_cpu.data(), cs.rows, cs.cols));
  cpu.inverse(state, host_view<const float>(c_cpu.data(), cs.rows, cs.cols),
              host_view(x_cpu.data(), rows, cols));

  DeviceBuffer gd(g.size() * 4), cd(c_cpu.size() * 4), xd(g.size() * 4);
  test::upload(gd.ptr, g);
  test::upload(cd.ptr, std::vector<float>(c_cpu.size(), std::numeric_limits<float>::quiet_NaN()));
  cuda::dwt_forward_rows<transforms::Haar, L>(device_view<const float>(gd.as<float>(), rows, cols),
                                              device_view(cd.as<float>(), cs.rows, cs.cols), mode,
                                              nullptr);
  cuda::dwt_inverse_rows<transforms::Haar, L>(
      device_view<const float>(cd.as<float>(), cs.rows, cs.cols),
      device_view(xd.as<float>(), rows, cols), mode, nullptr);
  CHECK(test::max_ulp(test::download<float>(cd.ptr, c_cpu.size()), c_cpu) == 0);
  CHECK(test::max_ulp(test::download<float>(xd.ptr, g.size()), x_cpu) == 0);
}

}  // namespace

TEST_CASE("cuda Haar DWT along rows: the CPU's coefficients and reconstruction, bit for bit") {
  using transforms::BoundaryMode;
  for (index_t cols : {1, 2, 3, 5, 8, 37, 64, 1001, 5461}) {
    CAPTURE(cols);
    check_dwt<2>(9, cols, BoundaryMode::zero);
    check_dwt<3>(4, cols, BoundaryMode::zero);
    if (cols % 4 == 0) check_dwt<2>(9, cols, BoundaryMode::periodization);
  }
}

namespace {

struct GwtCase {
  optim::AdamConvention convention;
  double gamma;
  cuda::Precision precision;
  bool inject_nan;
  double weight_decay = 0.0;
  bool inactive = false;     // the limiter's memory set huge before every step: ρ = 1 throughout
  bool check_finite = true;  // off with the limiter: the optimistic step
};

struct GwtResult {
  std::int64_t max_ulp = 0;  // weights, GPU against CPU
  double max_scaled = 0;     // |Δw| in ulps of the largest |w| the element took on the CPU
  int limited = 0;           // (tensor, step) pairs the GPU's limiter scaled (ρ ≠ 1)
};

// GWT on several tensors: CPU gwt_adam_fused_step per tensor vs one MultiTensorGwt.
template <int L>
GwtResult run_gwt(const GwtCase& c, int steps, std::int64_t tolerance) {
  using CpuStore = impl<state::Fp32, backend::cpu>;
  using Rule = impl<optim::Adam, backend::cpu>;
  using Dwt = transforms::Dwt<transforms::Haar, L>;
  struct Dims {
    index_t rows, cols;
  };
  const std::vector<Dims> dims = {{5, 37}, {16, 64}, {3, 5461}, {40, 128}, {1, 3}, {300, 260}};
  optim::Adam::Options ro;
  ro.lr = 1e-2;
  ro.eps = 1e-6;
  ro.weight_decay = c.convention == optim::AdamConvention::torch ? 0.1 : c.weight_decay;
  ro.convention = c.convention;
  const Rule rule(ro);
  const CpuStore store;
  const double scale = 0.25;
  const bool w_half = c.precision == cuda::Precision::bf16;
  const bool g_half = c.precision != cuda::Precision::fp32;

  std::vector<cuda::Tensor> tensors;
  std::vector<std::unique_ptr<DeviceBuffer>> wd, gd;
  std::vector<std::vector<float>> w_cpu, w_max;  // w_max: the largest |w| seen per element
  std::vector<typename Rule::template State<CpuStore>> st;
  std::vector<float> limiter(dims.size(), -1.0f);
  std::vector<std::int64_t> own(dims.size(), 0);  // each tensor's own count (skips not counted)
  typename Dwt::Options dwt_options;
  for (std::size_t k = 0; k < dims.size(); ++k) {
    const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
    std::vector<float> w0 = test::random_floats(n, static_cast<std::uint32_t>(k + 10));
    wd.push_back(std::make_unique<DeviceBuffer>(n * (w_half ? 2 : 4)));
    gd.push_back(std::make_unique<DeviceBuffer>(n * (g_half ? 2 : 4)));
    if (w_half) {
      std::vector<std::uint16_t> bits(n);
      for (std::size_t i = 0; i < n; ++i)
        bits[i] = numeric::bf16_bits_rne(w0[i]), w0[i] = numeric::bf16_to_float(bits[i]);
      test::upload(wd[k]->ptr, bits);
    } else {
      test::upload(wd[k]->ptr, w0);
    }
    w_cpu.push_back(w0);
    w_max.push_back(w0);
    for (float& x : w_max.back())
      x = std::fabs(x);
    st.push_back(rule.make(store, Dwt::tracked_shape({dims[k].rows, dims[k].cols}, dwt_options)));
    cuda::Tensor t;
    t.weight = wd[k]->ptr;
    t.grad = gd[k]->ptr;
    t.rows = dims[k].rows;
    t.cols = dims[k].cols;
    tensors.push_back(t);
  }
  typename cuda::MultiTensorGwt<transforms::Haar, L>::Options opt;
  opt.rule = ro;
  opt.residual.scale = scale;
  opt.residual.limiter_gamma = c.gamma;
  opt.precision = c.precision;
  opt.check_finite = c.check_finite;
  opt.optimistic_limiter = c.gamma > 0 && !c.check_finite;
  const std::size_t bytes =
      cuda::MultiTensorGwt<transforms::Haar, L>::workspace_bytes(tensors, opt);
  DeviceBuffer ws(bytes);
  cuda::MultiTensorGwt<transforms::Haar, L> gpu(tensors, opt, ws.ptr, bytes, nullptr);

  GwtResult result;
  for (int step = 1; step <= steps; ++step) {
    if (c.inactive) {  // ‖N‖ far below the memory: ρ = 1, and the memory becomes ‖N‖
      std::fill(limiter.begin(), limiter.end(), 1e30f);
      test::upload(gpu.limiter_state(), limiter);
    }
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
      std::vector<float> g = test::random_floats(
          n, static_cast<std::uint32_t>(500 * static_cast<std::size_t>(step) + k), 0.3f);
      if (c.inject_nan && step == 2 && k == 1) g[n / 2] = std::numeric_limits<float>::quiet_NaN();
      if (g_half) {
        std::vector<std::uint16_t> bits(n);
        for (std::size_t i = 0; i < n; ++i)
          bits[i] = numeric::bf16_bits_rne(g[i]), g[i] = numeric::bf16_to_float(bits[i]);
        test::upload(gd[k]->ptr, bits);
      } else {
        test::upload(gd[k]->ptr, g);
      }
      const auto taken = cpu::gwt_adam_fused_step<transforms::Haar, L>(
          rule, store, st[k], dwt_options,
          host_view<const float>(g.data(), dims[k].rows, dims[k].cols),
          host_view(w_cpu[k].data(), dims[k].rows, dims[k].cols), own[k] + 1, scale, c.gamma,
          limiter[k]);
      REQUIRE(taken.has_value());
      if (*taken) ++own[k];
      if (w_half)
        for (float& x : w_cpu[k])
          x = numeric::round_to_bf16(x);
      for (std::size_t i = 0; i < w_cpu[k].size(); ++i)
        w_max[k][i] = std::max(w_max[k][i], std::fabs(w_cpu[k][i]));
    }
    gpu.step(nullptr);
    if (c.gamma > 0)
      for (float r : test::download<float>(gpu.limiter_divisors(), dims.size()))
        result.limited += r != 1.0f ? 1 : 0;
    if (c.inject_nan && step == 2) {
      const auto skipped = test::download<std::int32_t>(gpu.skipped(), dims.size());
      for (std::size_t k = 0; k < dims.size(); ++k)
        CHECK(skipped[k] == (k == 1 ? 1 : 0));
    }
  }
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
    std::vector<float> w_gpu;
    if (w_half) {
      for (std::uint16_t b : test::download<std::uint16_t>(wd[k]->ptr, n))
        w_gpu.push_back(numeric::bf16_to_float(b));
    } else {
      w_gpu = test::download<float>(wd[k]->ptr, n);
    }
    const std::int64_t d = test::max_ulp(w_gpu, w_cpu[k]);
    double scaled = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const float big = w_max[k][i];
      const float ulp = std::nextafter(big, INFINITY) - big;  // of the largest |w| on the CPU
      scaled = std::max(scaled, static_cast<double>(std::fabs(w_gpu[i] - w_cpu[k][i]) / ulp));
    }
    MESSAGE("gwt tensor " << k << ": max weight difference " << d << " ulp, " << scaled
                          << " ulp of the largest |w|");
    result.max_ulp = std::max(result.max_ulp, d);
    result.max_scaled = std::max(result.max_scaled, scaled);
    CHECK(scaled <= static_cast<double>(tolerance));
    if (c.gamma > 0) {  // ‖N‖ is summed in another order: the memory to rounding
      const float mem_cpu = limiter[k];
      const float mem_gpu = test::download<float>(gpu.limiter_state() + k, 1)[0];
      CHECK(std::fabs(mem_gpu - mem_cpu) <= 1e-6f * std::fabs(mem_cpu));
    }
    CHECK(gpu.tensor_steps(static_cast<index_t>(k)) == own[k]);
    const cuda::MomentBuffers mb = gpu.moments(static_cast<index_t>(k));
    CHECK(test::max_ulp(test::download<float>(mb.m, static_cast<std::size_t>(mb.count)),
                        st[k].m.data) == 0);
    CHECK(test::max_ulp(test::download<float>(mb.v, static_cast<std::size_t>(mb.count)),
                        st[k].v.data) == 0);
  }
  return result;
}

}  // namespace

TEST_CASE("cuda GWT fused step without limiter: bit-identical to the CPU's fused step") {
  run_gwt<2>({optim::AdamConvention::hf, 0.0, cuda::Precision::fp32, false}, 4, 0);
  run_gwt<2>({optim::AdamConvention::torch, 0.0, cuda::Precision::fp32, true}, 4, 0);
  run_gwt<3>({optim::AdamConvention::hf, 0.0, cuda::Precision::fp32, false}, 3, 0);
  run_gwt<2>({optim::AdamConvention::hf, 0.0, cuda::Precision::bf16, false}, 3, 0);
}

TEST_CASE("cuda GWT optimistic step, limiter inactive (ρ = 1): the CPU's two passes, bit for bit") {
  using C = optim::AdamConvention;
  using P = cuda::Precision;
  const GwtCase cases[] = {{C::hf, 1.01, P::fp32, false, 0.1, true, false},
                           {C::torch, 1.01, P::fp32, false, 0.1, true, false},
                           {C::bnb, 1.01, P::fp32_master, false, 0.1, true, false}};
  for (const GwtCase& c : cases) {
    const GwtResult r = run_gwt<2>(c, 4, 0);
    CHECK(r.limited == 0);
    CHECK(r.max_ulp == 0);
  }
}

TEST_CASE("cuda GWT optimistic step, limiter scaling: the CPU's two-pass weights to rounding") {
  // Pass A steps with ρ = 1; a limited tensor then moves by c·f·(1 − 1/ρ)·u (pass B), where the
  // CPU divides the update by ρ before applying it. The two round differently (and ρ may differ
  // in its last bit: ‖N‖ is summed in another order), so the bound is in ulps of the largest
  // |w| an element took. Every run must have limited tensors, or it proves nothing.
  using C = optim::AdamConvention;
  using P = cuda::Precision;
  const GwtCase fp32_cases[] = {{C::hf, 1.01, P::fp32, false, 0.0, false, false},
                                {C::hf, 1.01, P::fp32, false, 0.1, false, false},
                                {C::torch, 1.01, P::fp32, false, 0.1, false, false},
                                {C::bnb, 1.01, P::fp32, false, 0.1, false, false},
                                {C::hf, 1.01, P::fp32_master, false, 0.1, false, false}};
  for (const GwtCase& c : fp32_cases) {
    CAPTURE(static_cast<int>(c.convention));
    // Measured on an H100: at most 5.5 ulps of the largest |w| after 6 steps (about one per
    // limited step); the bound allows 1.5 per step.
    const GwtResult r = run_gwt<2>(c, 6, 9);
    MESSAGE("optimistic: limited (tensor, step) pairs " << r.limited << "; max " << r.max_ulp
                                                        << " ulp, " << r.max_scaled
                                                        << " ulp of the largest |w|");
    CHECK(r.limited > 0);
  }
  // bf16 weights: W' is rounded to bf16 before the correction: one bf16 ulp (2^16 of fp32's).
  const GwtResult r = run_gwt<2>({C::hf, 1.01, P::bf16, false, 0.1, false, false}, 5, 65536);
  MESSAGE("optimistic bf16: limited pairs " << r.limited << "; " << r.max_scaled / 65536
                                            << " bf16 ulp of the largest |w|");
  CHECK(r.limited > 0);
}

TEST_CASE("cuda GWT two-pass step (limiter and finite check): the CPU's weights to rounding") {
  // ‖N‖ is summed in another order than on the CPU, so ρ may differ in its last bit.
  using C = optim::AdamConvention;
  using P = cuda::Precision;
  for (const GwtCase& c :
       {GwtCase{C::hf, 1.01, P::fp32, false}, GwtCase{C::hf, 1.01, P::fp32_master, true},
        GwtCase{C::torch, 1.01, P::fp32, true}}) {
    const GwtResult r = run_gwt<2>(c, 5, 2);
    MESSAGE("two-pass: limited pairs " << r.limited << "; max " << r.max_ulp << " ulp, "
                                       << r.max_scaled << " ulp of the largest |w|");
    CHECK(r.limited > 0);
  }
}
