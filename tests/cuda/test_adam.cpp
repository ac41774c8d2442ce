// MultiTensorAdam on the GPU against impl<Adam, backend::cpu>::update_apply: every store (fp32,
// bf16 nearest/stochastic, 8-bit blockwise), every convention (torch, hf, bnb), every parameter
// precision, on tensors of awkward sizes (partial 8-bit blocks, fp32 fallback below
// min_8bit_size, misaligned pointers). Built with -fmad=false, the shared element math must give
// the CPU's bits exactly: weights, moments, codes and absmax.
#include <slimgrad/backend/cpu/adam.hpp>
#include <slimgrad/backend/cpu/stores.hpp>
#include <slimgrad/backend/cuda/api.hpp>
#include <slimgrad/core/numeric.hpp>
#include <slimgrad/core/orientation.hpp>
#include <slimgrad/state/q8_math.hpp>

#include <limits>
#include <memory>
#include <utility>

#include "device.hpp"

using namespace slimgrad;
using test::DeviceBuffer;

namespace {

struct Dims {
  index_t rows, cols;
};
// 1x1 and 3x5: below one warp unit; 7x300: fp32 fallback of the 8-bit store (< 4096);
// 64x100: a partial last 8-bit block; 1x4097: one element past a block boundary.
const std::vector<Dims> dims = {{1, 1},    {3, 5},     {7, 300}, {64, 100},
                                {33, 257}, {128, 512}, {1, 4097}};

std::vector<std::uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<std::uint16_t> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    out[i] = numeric::bf16_bits_rne(x[i]);
  return out;
}
std::vector<float> widen(const std::vector<std::uint16_t>& x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    out[i] = numeric::bf16_to_float(x[i]);
  return out;
}

template <class Store>
void compare_moments(
    const impl<Store, backend::cpu>& store,
    const typename impl<optim::Adam, backend::cpu>::template State<impl<Store, backend::cpu>>& st,
    const cuda::MomentBuffers& mb) {
  const auto n = static_cast<std::size_t>(mb.count);
  if constexpr (std::is_same_v<Store, state::Fp32>) {
    CHECK(test::max_ulp(test::download<float>(mb.m, n), st.m.data) == 0);
    CHECK(test::max_ulp(test::download<float>(mb.v, n), st.v.data) == 0);
  } else if constexpr (std::is_same_v<Store, state::Bf16>) {
    CHECK(test::download<std::uint16_t>(mb.m, n) == st.m.data);
    CHECK(test::download<std::uint16_t>(mb.v, n) == st.v.data);
  } else {
    REQUIRE(mb.quantized == st.m.quantized);
    if (!mb.quantized) {
      CHECK(test::max_ulp(test::download<float>(mb.m, n), st.m.fp32) == 0);
      CHECK(test::max_ulp(test::download<float>(mb.v, n), st.v.fp32) == 0);
      return;
    }
    const std::size_t blocks = st.m.absmax.size();
    CHECK(test::download<std::uint8_t>(mb.m, n) == st.m.codes);
    CHECK(test::download<std::uint8_t>(mb.v, n) == st.v.codes);
    CHECK(test::max_ulp(test::download<float>(mb.m_absmax, blocks), st.m.absmax) == 0);
    CHECK(test::max_ulp(test::download<float>(mb.v_absmax, blocks), st.v.absmax) == 0);
  }
  (void)store;
}

template <class Store>
void run_case(optim::AdamConvention convention, cuda::Precision precision,
              typename Store::Options store_options, int steps) {
  using CpuStore = impl<Store, backend::cpu>;
  using Rule = impl<optim::Adam, backend::cpu>;
  optim::Adam::Options ro;
  ro.lr = 3e-3;
  ro.weight_decay = 0.1;
  ro.eps = 1e-6;
  ro.convention = convention;
  const Rule rule(ro);
  const CpuStore store(store_options);
  const std::uint64_t seed = 1234;

  // One device buffer for all weights (and one for gradients), tensors at offsets that leave
  // some of them misaligned for 4-wide accesses.
  const bool w_half = precision == cuda::Precision::bf16;
  const bool g_half = precision != cuda::Precision::fp32;
  std::vector<index_t> offset;
  index_t total = 0;
  for (std::size_t k = 0; k < dims.size(); ++k) {
    offset.push_back(total);
    total += dims[k].rows * dims[k].cols + (k % 2 == 0 ? 4 : 1);
  }
  const auto tot = static_cast<std::size_t>(total);
  DeviceBuffer w_dev(tot * (w_half ? 2 : 4)), g_dev(tot * (g_half ? 2 : 4)), copy_dev(tot * 2);

  std::vector<cuda::Tensor> tensors;
  std::vector<std::vector<float>> w_cpu;  // fp32 (fp32, master) or widened (bf16)
  std::vector<typename Rule::template State<CpuStore>> st;
  for (std::size_t k = 0; k < dims.size(); ++k) {
    const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
    const auto off = static_cast<std::size_t>(offset[k]);
    std::vector<float> w0 = test::random_floats(n, static_cast<std::uint32_t>(k + 1));
    if (w_half) {
      const auto bits = to_bf16(w0);
      test::upload(static_cast<std::uint16_t*>(w_dev.ptr) + off, bits);
      w0 = widen(bits);
    } else {
      test::upload(static_cast<float*>(w_dev.ptr) + off, w0);
    }
    w_cpu.push_back(w0);
    st.push_back(rule.make(store, Shape{dims[k].rows, dims[k].cols}));
    cuda::Tensor t;
    t.weight = w_half ? static_cast<void*>(w_dev.as<std::uint16_t>(off)) : w_dev.as<float>(off);
    t.grad = g_half ? static_cast<const void*>(g_dev.as<std::uint16_t>(off)) : g_dev.as<float>(off);
    t.weight_bf16 =
        precision == cuda::Precision::fp32_master ? copy_dev.as<std::uint16_t>(off) : nullptr;
    t.rows = dims[k].rows;
    t.cols = dims[k].cols;
    t.id = tensor_id("layer." + std::to_string(k));
    tensors.push_back(t);
  }
  typename cuda::MultiTensorAdam<Store>::Options opt;
  opt.rule = ro;
  opt.store = store_options;
  opt.precision = precision;
  opt.seed = seed;
  const std::size_t bytes = cuda::MultiTensorAdam<Store>::workspace_bytes(tensors, opt);
  DeviceBuffer ws(bytes);
  cuda::MultiTensorAdam<Store> gpu(tensors, opt, ws.ptr, bytes, nullptr);

  std::size_t cpu_state = 0;
  for (std::size_t k = 0; k < dims.size(); ++k)
    cpu_state += rule.bytes(store, st[k]);
  CHECK(gpu.state_bytes() == cpu_state);

  for (int step = 1; step <= steps; ++step) {
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
      const auto off = static_cast<std::size_t>(offset[k]);
      std::vector<float> g = test::random_floats(
          n, static_cast<std::uint32_t>(1000 * static_cast<std::size_t>(step) + k), 0.5f);
      if (g_half) {
        const auto bits = to_bf16(g);
        test::upload(g_dev.as<std::uint16_t>(off), bits);
        g = widen(bits);
      } else {
        test::upload(g_dev.as<float>(off), g);
      }
      const random::Key key{seed, tensors[k].id, static_cast<std::uint32_t>(step - 1)};
      rule.update_apply(store, st[k], host_view<const float>(g.data(), dims[k].rows, dims[k].cols),
                        host_view(w_cpu[k].data(), dims[k].rows, dims[k].cols), step, 1.0f, key);
      if (w_half) w_cpu[k] = widen(to_bf16(w_cpu[k]));  // the bf16 weight rounds every step
    }
    gpu.step(nullptr);
  }
  test::cuda_check(cudaDeviceSynchronize(), "step");
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
    const auto off = static_cast<std::size_t>(offset[k]);
    std::vector<float> w_gpu =
        w_half ? widen(test::download<std::uint16_t>(w_dev.as<std::uint16_t>(off), n))
               : test::download<float>(w_dev.as<float>(off), n);
    CHECK(test::max_ulp(w_gpu, w_cpu[k]) == 0);
    if (precision == cuda::Precision::fp32_master)
      CHECK(test::download<std::uint16_t>(copy_dev.as<std::uint16_t>(off), n) == to_bf16(w_cpu[k]));
    compare_moments<Store>(store, st[k], gpu.moments(static_cast<index_t>(k)));
  }
}

const optim::AdamConvention conventions[] = {optim::AdamConvention::torch,
                                             optim::AdamConvention::hf, optim::AdamConvention::bnb};
const cuda::Precision precisions[] = {cuda::Precision::fp32, cuda::Precision::bf16,
                                      cuda::Precision::fp32_master};

}  // namespace

TEST_CASE("cuda MultiTensorAdam, fp32 store: bit-identical to the CPU in every convention") {
  for (auto c : conventions)
    for (auto p : precisions) {
      CAPTURE(static_cast<int>(c));
      CAPTURE(static_cast<int>(p));
      run_case<state::Fp32>(c, p, {}, 4);
    }
}

TEST_CASE("cuda MultiTensorAdam, bf16 store (nearest and stochastic): bit-identical to the CPU") {
  for (bool stochastic : {false, true}) {
    CAPTURE(stochastic);
    state::Bf16::Options o;
    o.stochastic_rounding = stochastic;
    run_case<state::Bf16>(optim::AdamConvention::torch, cuda::Precision::fp32, o, 4);
    run_case<state::Bf16>(optim::AdamConvention::hf, cuda::Precision::bf16, o, 3);
  }
}

TEST_CASE("cuda MultiTensorAdam, 8-bit blockwise store: codes and absmax equal the CPU's") {
  for (auto p : precisions) {
    CAPTURE(static_cast<int>(p));
    run_case<state::Q8Block<256>>(optim::AdamConvention::bnb, p, {}, 5);
  }
  run_case<state::Q8Block<256>>(optim::AdamConvention::torch, cuda::Precision::fp32, {}, 3);
}

namespace {

// The host bytes of a CPU store buffer: data (codes or floats) and absmax (8-bit only).
template <class Buffer>
std::pair<void*, float*> raw(Buffer& b) {
  if constexpr (requires { b.codes; }) {
    if (b.quantized) return {b.codes.data(), b.absmax.data()};
    return {b.fp32.data(), nullptr};
  } else {
    return {b.data.data(), nullptr};
  }
}

// CPU steps 1..3, the GPU resumes from the CPU's weights and moments for steps 4..5 beside the
// CPU; then a fresh CPU state resumes from the GPU's moments for step 6. Weights and moments
// must stay bit-identical throughout.
template <class Store>
void resume_case(optim::AdamConvention convention) {
  using CpuStore = impl<Store, backend::cpu>;
  using Rule = impl<optim::Adam, backend::cpu>;
  optim::Adam::Options ro;
  ro.lr = 2e-3;
  ro.weight_decay = 0.05;
  ro.convention = convention;
  const Rule rule(ro);
  const CpuStore store{typename Store::Options{}};
  const std::uint64_t seed = 99;
  std::vector<std::vector<float>> w(dims.size());
  std::vector<typename Rule::template State<CpuStore>> st;
  std::vector<std::unique_ptr<DeviceBuffer>> wd, gd;
  std::vector<cuda::Tensor> tensors;
  for (std::size_t k = 0; k < dims.size(); ++k) {
    const auto n = static_cast<std::size_t>(dims[k].rows * dims[k].cols);
    w[k] = test::random_floats(n, static_cast<std::uint32_t>(k + 70));
    st.push_back(rule.make(store, Shape{dims[k].rows, dims[k].cols}));
    wd.push_back(std::make_unique<DeviceBuffer>(n * 4));
    gd.push_back(std::make_unique<DeviceBuffer>(n * 4));
    cuda::Tensor t;
    t.weight = wd[k]->ptr;
    t.grad = gd[k]->ptr;
    t.rows = dims[k].rows;
    t.cols = dims[k].cols;
    t.id = 1000 + k;
    tensors.push_back(t);
  }
  auto cpu_step = [&](int step, std::size_t k, const std::vector<float>& g) {
    const random::Key key{seed, tensors[k].id, static_cast<std::uint32_t>(step - 1)};
    rule.update_apply(store, st[k], host_view<const float>(g.data(), dims[k].rows, dims[k].cols),
                      host_view(w[k].data(), dims[k].rows, dims[k].cols), step, 1.0f, key);
  };
  auto grad = [&](int step, std::size_t k) {
    return test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                               static_cast<std::uint32_t>(77 * static_cast<std::size_t>(step) + k),
                               0.5f);
  };
  for (int step = 1; step <= 3; ++step)
    for (std::size_t k = 0; k < dims.size(); ++k)
      cpu_step(step, k, grad(step, k));

  typename cuda::MultiTensorAdam<Store>::Options opt;
  opt.rule = ro;
  opt.seed = seed;
  const std::size_t bytes = cuda::MultiTensorAdam<Store>::workspace_bytes(tensors, opt);
  DeviceBuffer ws(bytes);
  cuda::MultiTensorAdam<Store> gpu(tensors, opt, ws.ptr, bytes, nullptr);
  for (std::size_t k = 0; k < dims.size(); ++k) {
    test::upload(wd[k]->ptr, w[k]);
    const auto [m, ma] = raw(st[k].m);
    const auto [v, va] = raw(st[k].v);
    gpu.write_moments(static_cast<index_t>(k), m, v, ma, va);
  }
  gpu.set_steps(3);
  for (int step = 4; step <= 5; ++step) {
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const auto g = grad(step, k);
      test::upload(gd[k]->ptr, g);
      cpu_step(step, k, g);
    }
    gpu.step(nullptr);
  }
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(test::download<float>(wd[k]->ptr, w[k].size()), w[k]) == 0);
    // GPU → CPU: a fresh CPU state takes the GPU's moments; one more step on both.
    auto fresh = rule.make(store, Shape{dims[k].rows, dims[k].cols});
    const auto [m, ma] = raw(fresh.m);
    const auto [v, va] = raw(fresh.v);
    gpu.read_moments(static_cast<index_t>(k), m, v, ma, va);
    st[k] = std::move(fresh);
  }
  for (std::size_t k = 0; k < dims.size(); ++k) {
    const auto g = grad(6, k);
    test::upload(gd[k]->ptr, g);
    cpu_step(6, k, g);
  }
  gpu.step(nullptr);
  for (std::size_t k = 0; k < dims.size(); ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(test::download<float>(wd[k]->ptr, w[k].size()), w[k]) == 0);
    compare_moments<Store>(store, st[k], gpu.moments(static_cast<index_t>(k)));
  }
}

}  // namespace

TEST_CASE("cuda MultiTensorAdam: runs resume across backends (CPU state to GPU and back)") {
  resume_case<state::Fp32>(optim::AdamConvention::torch);
  resume_case<state::Bf16>(optim::AdamConvention::hf);
  resume_case<state::Q8Block<256>>(optim::AdamConvention::bnb);
}

TEST_CASE("cuda MultiTensorAdam: a workspace too small or misaligned is refused") {
  std::vector<cuda::Tensor> none;
  cuda::MultiTensorAdam<state::Fp32>::Options o;
  DeviceBuffer ws(1024);
  cuda::Tensor t;
  t.rows = 4;
  t.cols = 4;
  t.weight = ws.ptr;
  t.grad = ws.ptr;
  std::vector<cuda::Tensor> one{t};
  CHECK_THROWS_WITH_AS(cuda::MultiTensorAdam<state::Fp32>(one, o, ws.as<char>(1), 512, nullptr),
                       doctest::Contains("aligned"), Error);
  CHECK_THROWS_WITH_AS(cuda::MultiTensorAdam<state::Fp32>(one, o, ws.ptr, 16, nullptr),
                       doctest::Contains("bytes"), Error);
}

TEST_CASE("cuda 8-bit quantiser: the CPU's codes on every code, midpoint, neighbour, absmax") {
  for (state::Moment kind : {state::Moment::first, state::Moment::second}) {
    CAPTURE(static_cast<int>(kind));
    const bool is_signed = kind == state::Moment::first;
    const state::q8::CodeMap& map = state::q8::code_map(kind);
    std::vector<float> x, a;
    auto around = [&](float v, float absmax) {
      for (float y : {v, std::nextafter(v, 2.0f), std::nextafter(v, -2.0f), -v}) {
        x.push_back(y * absmax);  // exact for a power-of-two absmax
        a.push_back(absmax);
      }
    };
    for (float absmax : {1.0f, 0x1p-20f, 0x1p40f}) {
      for (int j = 0; j < state::q8::map_size; ++j)
        around(map.code[j], absmax);
      for (int j = 0; j + 1 < state::q8::map_size; ++j)
        around(map.mid[j], absmax);
    }
    const float special[] = {0.0f,
                             1e-30f,
                             5.9e-8f,
                             6e-8f,
                             1.0f,
                             1.5f,
                             3e38f,
                             std::numeric_limits<float>::infinity(),
                             std::numeric_limits<float>::quiet_NaN(),
                             std::numeric_limits<float>::denorm_min()};
    for (float v : special)
      for (float absmax : {1.0f, 0.0f, 1e-40f, 3e38f, 0x1p-126f, 0x1p126f})
        around(v, absmax);
    // Random blocks: values and their block's absmax, over a wide range of magnitudes.
    std::mt19937 gen(5);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::uniform_int_distribution<int> e(-40, 10);
    for (int blk = 0; blk < 2000; ++blk) {
      const int scale = e(gen);
      std::vector<float> vals(256);
      float absmax = 0.0f;
      for (float& v : vals) {
        v = std::ldexp(u(gen), scale + e(gen) / 8);
        if (!is_signed) v = std::fabs(v);
        absmax = state::q8::absmax_update(absmax, v);
      }
      for (float v : vals)
        x.push_back(v), a.push_back(absmax);
    }
    DeviceBuffer xd(x.size() * 4), ad(a.size() * 4), cd(x.size());
    test::upload(xd.ptr, x);
    test::upload(ad.ptr, a);
    cuda::q8_quantize_codes(xd.as<float>(), ad.as<float>(), cd.as<std::uint8_t>(),
                            static_cast<index_t>(x.size()), kind, nullptr);
    const auto got = test::download<std::uint8_t>(cd.ptr, x.size());
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += got[i] != state::q8::quantize(map, is_signed, x[i], a[i]);
    CHECK(wrong == 0);
  }
}
