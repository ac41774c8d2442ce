// cuda::Linear<Codec> against the CPU's activation::Linear<Codec> on the same inputs: CompAct's P
// and VeLoRA's v (placeholder and batch initialisation) bit-identical, VeLoRA's z bit-identical
// (the shared project(), built with -fmad=false), and every GEMM result (Y, CompAct's Z, dX, db,
// dW over two micro-batches) within the GEMM rounding bound: two fp32 sums of K products each
// lie within γ_K·(|A||B|) of the exact value (γ_K = K·u/(1 − K·u), u = 2^-24, any summation
// order), so they differ by at most 2γ_K·(|A||B|) element by element; K counts every rounded
// operation on the path (products, the bias, the accumulated micro-batches, Z's own GEMM for
// CompAct's dW). cuBLAS and Eigen sum in different orders, so bits are not expected there.
// Bad input: a clear Error before anything is enqueued, nothing changed.
#include <slimgrad/backend/cpu/activation.hpp>
#include <slimgrad/backend/cuda/activation.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "device.hpp"

using namespace slimgrad;
using test::DeviceBuffer;

namespace {

struct Mat {
  index_t rows = 0, cols = 0;
  std::vector<float> v;
  Mat() = default;
  Mat(index_t r, index_t c, float fill = 0.0f)
      : rows(r), cols(c), v(static_cast<std::size_t>(r * c), fill) {}
  float operator()(index_t i, index_t j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
  HostView<float> view() { return host_view(v.data(), rows, cols); }
  HostView<const float> cview() const { return HostView<const float>(v.data(), rows, cols, cols); }
};

Mat gaussian(index_t r, index_t c, std::uint64_t seed, float shift = 0.0f) {
  Mat m(r, c);
  random::fill_gaussian(m.view(), {seed, 11, 0}, 1.0);
  for (float& e : m.v)
    e += shift;
  return m;
}

/// A host matrix mirrored on the device.
struct DMat {
  Mat h;
  DeviceBuffer d;
  explicit DMat(const Mat& m) : h(m), d(m.v.size() * sizeof(float)) { test::upload(d.ptr, m.v); }
  DeviceView<float> view() { return device_view(d.as<float>(), h.rows, h.cols); }
  DeviceView<const float> cview() const {
    return DeviceView<const float>(d.as<float>(), h.rows, h.cols, h.cols);
  }
  std::vector<float> get() const { return test::download<float>(d.ptr, h.v.size()); }
};

// |A|·|B| in double, A r×k (row-major), B k×c; `bt`: B given as c×k (|A|·|B|ᵀ).
std::vector<double> absmm(const Mat& a, const Mat& b, bool bt) {
  const index_t r = a.rows, k = a.cols, c = bt ? b.rows : b.cols;
  std::vector<double> out(static_cast<std::size_t>(r * c), 0.0);
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j < c; ++j) {
      double s = 0;
      for (index_t q = 0; q < k; ++q)
        s += std::abs(double(a(i, q))) * std::abs(double(bt ? b(j, q) : b(q, j)));
      out[static_cast<std::size_t>(i * c + j)] = s;
    }
  return out;
}
Mat transpose(const Mat& a) {
  Mat t(a.cols, a.rows);
  for (index_t i = 0; i < a.rows; ++i)
    for (index_t j = 0; j < a.cols; ++j)
      t.v[static_cast<std::size_t>(j * a.rows + i)] = a(i, j);
  return t;
}
void add(std::vector<double>& to, const std::vector<double>& x, double f = 1.0) {
  REQUIRE(to.size() == x.size());
  for (std::size_t i = 0; i < x.size(); ++i)
    to[i] += f * x[i];
}

double gamma(double k) {
  const double u = std::ldexp(1.0, -24);
  return k * u / (1 - k * u);
}
// Every |gpu − cpu| ≤ 2γ_K·M (plus nothing: M > 0 wherever a value is non-zero here).
void check_bound(const std::vector<float>& gpu, const std::vector<float>& cpu,
                 const std::vector<double>& m, double k, const char* what) {
  REQUIRE(gpu.size() == cpu.size());
  REQUIRE(m.size() == cpu.size());
  const double tol = 2 * gamma(k);
  double worst = 0;  // the largest |gpu − cpu| / (2γ_K·M)
  std::size_t bad = 0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double d = std::abs(double(gpu[i]) - double(cpu[i]));
    if (d > tol * m[i]) ++bad;
    if (m[i] > 0) worst = std::max(worst, d / (tol * m[i]));
  }
  MESSAGE(std::string(what) << ": worst |gpu - cpu| / (2 gamma_K M) = " << worst << " (K = " << k
                            << ")");
  CHECK(bad == 0);
}

template <class Codec>
struct Pair {
  activation::Linear<Codec> cpu;
  std::unique_ptr<DeviceBuffer> ws;
  std::unique_ptr<cuda::Linear<Codec>> gpu;
  Pair(const std::string& name, index_t n, index_t m, index_t max_tokens,
       const typename Codec::Options& o)
      : cpu(name, n, m, o) {
    const typename cuda::Linear<Codec>::Options go{.codec = o};
    const std::size_t bytes = cuda::Linear<Codec>::workspace_bytes(n, m, max_tokens, go);
    ws = std::make_unique<DeviceBuffer>(bytes);
    gpu =
        std::make_unique<cuda::Linear<Codec>>(name, n, m, max_tokens, go, ws->ptr, bytes, nullptr);
  }
};

std::vector<float> cpu_p(const activation::Linear<activation::CompAct>& l) {
  cpu::RowMatrix p;
  l.codec().projection().generate(l.codec().state(), p);
  return {p.data(), p.data() + p.size()};
}

// Two micro-batches (the second with accumulate_dx) through both layers; every output compared.
template <class Codec>
void compare_layers(const typename Codec::Options& o, index_t n, index_t m, index_t step) {
  const index_t t1 = 37, t2 = 20;
  Pair<Codec> l("layers.3.mlp.up_proj", n, m, 40, o);
  l.cpu.set_step(step);
  l.gpu->set_step(step);
  const Mat w = gaussian(m, n, 1), b = gaussian(1, m, 2);
  DMat dw_dev(Mat(l.cpu.grad_shape().rows, l.cpu.grad_shape().cols, 0.25f));
  DMat db_dev(Mat(1, m, -0.5f));
  Mat dw_cpu = dw_dev.h, db_cpu = db_dev.h;
  DMat wd(w), bd(b);
  std::vector<double> mdw(dw_cpu.v.size(), 0.25), mdb(db_cpu.v.size(), 0.5);
  double kdw = 1;
  int batch = 0;
  for (const index_t t : {t1, t2}) {
    ++batch;
    // A shifted input: VeLoRA's v is then a well-defined mean.
    const Mat x = gaussian(t, n, 10 + static_cast<std::uint64_t>(t), 0.4f);
    const Mat dy = gaussian(t, m, 20 + static_cast<std::uint64_t>(t));
    DMat xd(x), dyd(dy), yd(Mat(t, m)), dxd(Mat(t, n, 1.5f));
    Mat y(t, m), dx(t, n, 1.5f);
    l.cpu.forward(x.cview(), w.cview(), b.cview(), y.view());
    l.gpu->forward(xd.cview(), wd.cview(), bd.cview(), yd.view(), nullptr);
    REQUIRE(l.gpu->pending());
    // Y = X Wᵀ + b.
    std::vector<double> my = absmm(x, w, true);
    for (index_t i = 0; i < t; ++i)
      for (index_t j = 0; j < m; ++j)
        my[static_cast<std::size_t>(i * m + j)] += std::abs(double(b(0, j)));
    check_bound(yd.get(), y.v, my, double(n + 1), "Y");

    // What was saved.
    const HostView<const float> sc = l.cpu.saved();
    const std::vector<float> saved_cpu(sc.data, sc.data + sc.size());
    const std::vector<float> saved_gpu =
        test::download<float>(l.gpu->saved().data, static_cast<std::size_t>(l.gpu->saved().size()));
    CHECK(l.gpu->saved_bytes() == static_cast<std::size_t>(sc.size()) * sizeof(float));
    CHECK(l.gpu->uncompressed_bytes() == l.cpu.uncompressed_bytes());
    Mat p;  // CompAct's P (r × n)
    if constexpr (std::is_same_v<Codec, activation::CompAct>) {
      p = Mat(l.gpu->grad_shape().cols, n);
      p.v = cpu_p(l.cpu);
      if (o.sketch == transforms::Sketch::count) {
        CHECK(l.gpu->projection() == nullptr);
        CHECK(test::max_ulp(saved_gpu, saved_cpu) == 0);  // the same sums in the same order
      } else {
        CHECK(test::download<float>(l.gpu->projection(), p.v.size()) == p.v);
        check_bound(saved_gpu, saved_cpu, absmm(x, p, true), double(n), "Z");
      }
    } else {
      CHECK(test::max_ulp(saved_gpu, saved_cpu) == 0);  // X itself, or z from the same v
      CHECK(l.gpu->codec_state() == l.cpu.codec_state());
    }

    // Backward: dX = dY W (then += dY W), db += Σ dY, dW += the codec's gradient.
    const bool acc = batch == 2;
    l.cpu.backward(dy.cview(), w.cview(), dx.view(), dw_cpu.view(), db_cpu.view(), acc);
    l.gpu->backward(dyd.cview(), wd.cview(), dxd.view(), dw_dev.view(), db_dev.view(), nullptr,
                    acc);
    CHECK_FALSE(l.gpu->pending());
    std::vector<double> mdx = absmm(dy, w, false);
    if (acc)
      for (double& e : mdx)
        e += 1.5;
    check_bound(dxd.get(), dx.v, mdx, double(m + 1), "dX");
    for (index_t j = 0; j < m; ++j)
      for (index_t i = 0; i < t; ++i)
        mdb[static_cast<std::size_t>(j)] += std::abs(double(dy(i, j)));
    check_bound(db_dev.get(), db_cpu.v, mdb, double(t1 + t2 + 1), "db");
    const Mat dyt = transpose(dy);
    if constexpr (std::is_same_v<Codec, activation::VeLoRA>) {
      // s·(|dY|ᵀ|Z|) ⊗ |v|: z and v are the same bits on both sides; H's GEMM and the expansion.
      const index_t g = o.groups, d = n / g;
      Mat z(t, g);
      z.v = saved_cpu;
      const std::vector<double> h = absmm(dyt, z, false);
      const std::vector<float>& v = l.cpu.codec().vector();
      for (index_t i = 0; i < m; ++i)
        for (index_t c = 0; c < n; ++c)
          mdw[static_cast<std::size_t>(i * n + c)] +=
              std::abs(o.scale) * h[static_cast<std::size_t>(i * g + c / d)] *
              std::abs(double(v[static_cast<std::size_t>(c % d)]));
      kdw += double(t) + 3;
    } else if constexpr (std::is_same_v<Codec, activation::CompAct>) {
      // |dY|ᵀ(|X||P|ᵀ) bounds |dY|ᵀ|Z| and the spread of Z's own rounding.
      Mat xp(t, p.rows);
      const std::vector<double> a = absmm(x, p, true);
      for (std::size_t i = 0; i < a.size(); ++i)
        xp.v[i] = static_cast<float>(a[i] * (1 + 1e-6));
      add(mdw, absmm(dyt, xp, false));
      kdw += double(t + n) + 1;
    } else {
      add(mdw, absmm(dyt, x, false));
      kdw += double(t);
    }
    check_bound(dw_dev.get(), dw_cpu.v, mdw, kdw, "dW");
  }
}

}  // namespace

TEST_CASE("cuda linear: CompAct's P is the CPU's, bit for bit, at every epoch") {
  for (const index_t step : {0, 49, 50, 173}) {
    const activation::CompAct::Options o{.ratio = 0.25, .update_gap = 50, .seed = 9};
    Pair<activation::CompAct> l("layers.0.self_attn.q_proj", 200, 8, 4, o);
    l.cpu.set_step(step);
    l.gpu->set_step(step);
    DMat x(gaussian(3, 200, 5)), w(gaussian(8, 200, 6)), y(Mat(3, 8));
    l.gpu->forward(x.cview(), w.cview(), {}, y.view(), nullptr);
    const std::vector<float> p = cpu_p(l.cpu);
    REQUIRE(p.size() == 50u * 200u);
    CHECK(test::download<float>(l.gpu->projection(), p.size()) == p);
    CHECK(l.gpu->grad_shape().cols == 50);
  }
}

TEST_CASE("cuda linear: outputs, saved activations and gradients agree with the CPU layer") {
  SUBCASE("none") {
    compare_layers<activation::None>({}, 96, 40, 0);
  }
  SUBCASE("velora, sub-token 16") {
    compare_layers<activation::VeLoRA>({.groups = 6, .scale = 1.5}, 96, 40, 0);
  }
  SUBCASE("velora, one group of 300 (several blocks per chunk)") {
    compare_layers<activation::VeLoRA>({.groups = 1, .scale = 0.5}, 300, 24, 0);
  }
  SUBCASE("velora, batch_average") {
    compare_layers<activation::VeLoRA>(
        {.groups = 8, .init = activation::VeloraInit::batch_average, .seed = 4}, 96, 40, 0);
  }
  SUBCASE("compact, r = n/4, epoch 2") {
    compare_layers<activation::CompAct>({.ratio = 0.25, .update_gap = 50, .seed = 3}, 96, 40, 120);
  }
  SUBCASE("compact, rank 7") {
    compare_layers<activation::CompAct>({.rank = 7, .seed = 1}, 33, 17, 0);
  }
  SUBCASE("compact with the count sketch, r = n/4, epoch 2") {
    compare_layers<activation::CompAct>(
        {.ratio = 0.25, .update_gap = 50, .seed = 3, .sketch = transforms::Sketch::count}, 96, 40,
        120);
  }
  SUBCASE("compact with the count sketch, rank 7 (buckets of several columns)") {
    compare_layers<activation::CompAct>({.rank = 7, .seed = 1, .sketch = transforms::Sketch::count},
                                        300, 17, 0);
  }
}

TEST_CASE("cuda linear: VeLoRA's v starts and initialises as on the CPU; checkpoints cross over") {
  const activation::VeLoRA::Options o{.groups = 4, .seed = 12};
  Pair<activation::VeLoRA> l("layers.1.mlp.down_proj", 64, 8, 64, o);
  CHECK(l.gpu->codec_state() == l.cpu.codec_state());  // the placeholder, flag 0
  CHECK(l.gpu->codec_state()[0] == 0.0f);
  // A zero batch cannot set v: both keep the placeholder and stay uninitialised.
  const Mat zero(5, 64), w = gaussian(8, 64, 3);
  DMat zd(zero), wd(w), yd(Mat(5, 8));
  Mat y(5, 8);
  l.cpu.forward(zero.cview(), w.cview(), {}, y.view());
  l.gpu->forward(zd.cview(), wd.cview(), {}, yd.view(), nullptr);
  CHECK(l.gpu->codec_state() == l.cpu.codec_state());
  CHECK(l.gpu->codec_state()[0] == 0.0f);
  // 50 tokens: three full chunks of 16 and a partial one.
  const Mat x = gaussian(50, 64, 4, 0.3f);
  DMat xd(x), y2(Mat(50, 8));
  Mat yc(50, 8);
  l.cpu.forward(x.cview(), w.cview(), {}, yc.view());
  l.gpu->forward(xd.cview(), wd.cview(), {}, y2.view(), nullptr);
  const std::vector<float> state = l.cpu.codec_state();
  CHECK(state[0] == 1.0f);
  CHECK(l.gpu->codec_state() == state);

  // The CPU's state resumes on the GPU, and the GPU's on the CPU: the next batch's z agree.
  Pair<activation::VeLoRA> r("layers.1.mlp.down_proj", 64, 8, 64, {.groups = 4, .seed = 99});
  r.gpu->load_codec_state(l.cpu.codec_state());
  r.cpu.load_codec_state(l.gpu->codec_state());
  const Mat x2 = gaussian(9, 64, 8, -1.0f);
  DMat x2d(x2), y3(Mat(9, 8));
  Mat y3c(9, 8);
  r.cpu.forward(x2.cview(), w.cview(), {}, y3c.view());
  r.gpu->forward(x2d.cview(), wd.cview(), {}, y3.view(), nullptr);
  CHECK(r.gpu->codec_state() == state);  // once: the second batch leaves v
  const HostView<const float> zc = r.cpu.saved();
  CHECK(test::download<float>(r.gpu->saved().data, static_cast<std::size_t>(zc.size())) ==
        std::vector<float>(zc.data, zc.data + zc.size()));
}

TEST_CASE("cuda linear: bad input is refused before anything runs") {
  using VL = cuda::Linear<activation::VeLoRA>;
  using CL = cuda::Linear<activation::CompAct>;
  CHECK_THROWS_WITH_AS(VL::workspace_bytes(30, 4, 8, {.codec = {.groups = 4}}),
                       doctest::Contains("does not divide"), Error);
  CHECK_THROWS_WITH_AS(CL::workspace_bytes(30, 4, 8, {.codec = {.rank = 30}}),
                       doctest::Contains("out of range"), Error);
  CHECK_THROWS_WITH_AS(CL::workspace_bytes(30, 4, 0, {}), doctest::Contains("max_tokens"), Error);
  CHECK_THROWS_WITH_AS(
      CL::workspace_bytes(30, 4, 8,
                          {.codec = {.keep_matrix = true, .sketch = transforms::Sketch::count}}),
      doctest::Contains("keep_matrix applies to the gaussian sketch only"), Error);
  const CL::Options o{.codec = {.rank = 8}};
  const std::size_t bytes = CL::workspace_bytes(32, 4, 8, o);
  DeviceBuffer ws(bytes);
  CHECK_THROWS_WITH_AS(CL("l", 32, 4, 8, o, ws.ptr, bytes - 256, nullptr),
                       doctest::Contains("workspace holds"), Error);
  CL l("l", 32, 4, 8, o, ws.ptr, bytes, nullptr);
  DMat x(gaussian(8, 32, 1)), w(gaussian(4, 32, 2)), y(Mat(8, 4)), dy(gaussian(8, 4, 3));
  DMat dw(Mat(4, 8)), dx(Mat(8, 32));
  CHECK_THROWS_WITH_AS(l.backward(dy.cview(), w.cview(), dx.view(), dw.view(), {}, nullptr),
                       doctest::Contains("without its forward"), Error);
  DMat big(gaussian(9, 32, 4)), ybig(Mat(9, 4));
  CHECK_THROWS_WITH_AS(l.forward(big.cview(), w.cview(), {}, ybig.view(), nullptr),
                       doctest::Contains("the workspace holds 8"), Error);
  CHECK_FALSE(l.pending());
  l.forward(x.cview(), w.cview(), {}, y.view(), nullptr);
  DMat dy7(gaussian(7, 4, 3)), dwfull(Mat(4, 32));
  CHECK_THROWS_WITH_AS(l.backward(dy7.cview(), w.cview(), {}, dw.view(), {}, nullptr),
                       doctest::Contains("forward had 8 tokens"), Error);
  CHECK_THROWS_WITH_AS(l.backward(dy.cview(), w.cview(), {}, dwfull.view(), {}, nullptr),
                       doctest::Contains("linear dW"), Error);
  CHECK_THROWS_WITH_AS(l.set_step(1), doctest::Contains("awaits its backward"), Error);
  CHECK(l.pending());  // nothing changed: the backward still runs
  const std::vector<float> before = dw.get();
  l.backward(dy.cview(), w.cview(), {}, dw.view(), {}, nullptr);
  CHECK(dw.get() != before);
  const VL::Options vo{.codec = {.groups = 4}};
  DeviceBuffer vws(VL::workspace_bytes(32, 4, 8, vo));
  VL v("v", 32, 4, 8, vo, vws.ptr, vws.bytes, nullptr);
  CHECK_THROWS_WITH_AS(v.load_codec_state(std::vector<float>(5, 0.0f)),
                       doctest::Contains("expected 9"), Error);
  CHECK_THROWS_WITH_AS(l.load_codec_state(std::vector<float>(1, 0.0f)),
                       doctest::Contains("no state"), Error);
}

namespace {

// Forward + backward of one micro-batch captured once in a CUDA graph and replayed twice (dW and
// db accumulate) against two direct calls of an identical layer.
template <class Codec>
void graph_case(const typename Codec::Options& o) {
  const index_t n = 64, m = 24, t = 40;
  cudaStream_t stream = nullptr;
  test::cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  Pair<Codec> direct("layers.2.mlp.gate_proj", n, m, t, o),
      graphed("layers.2.mlp.gate_proj", n, m, t, o);
  const Mat x = gaussian(t, n, 41, 0.2f), w = gaussian(m, n, 42), b = gaussian(1, m, 43),
            dy = gaussian(t, m, 44);
  DMat xd(x), wd(w), bd(b), dyd(dy);
  const Shape gs = direct.gpu->grad_shape();
  DMat y1(Mat(t, m)), dx1(Mat(t, n)), dw1(Mat(gs.rows, gs.cols)), db1(Mat(1, m));
  DMat y2(Mat(t, m)), dx2(Mat(t, n)), dw2(Mat(gs.rows, gs.cols)), db2(Mat(1, m));
  for (int rep = 0; rep < 2; ++rep) {
    direct.gpu->forward(xd.cview(), wd.cview(), bd.cview(), y1.view(), stream);
    direct.gpu->backward(dyd.cview(), wd.cview(), dx1.view(), dw1.view(), db1.view(), stream);
  }
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  test::cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  graphed.gpu->forward(xd.cview(), wd.cview(), bd.cview(), y2.view(), stream);
  graphed.gpu->backward(dyd.cview(), wd.cview(), dx2.view(), dw2.view(), db2.view(), stream);
  test::cuda_check(cudaStreamEndCapture(stream, &graph), "end capture");
  test::cuda_check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int rep = 0; rep < 2; ++rep)
    test::cuda_check(cudaGraphLaunch(exec, stream), "launch");
  test::cuda_check(cudaStreamSynchronize(stream), "sync");
  // The same kernels and GEMM configurations: the bits are expected to agree; the bound of the
  // comparison with the CPU is the test, the ulp count is reported.
  for (auto [a, c, what] :
       {std::tuple{&y1, &y2, "Y"}, {&dx1, &dx2, "dX"}, {&dw1, &dw2, "dW"}, {&db1, &db2, "db"}}) {
    const std::vector<float> va = a->get(), vc = c->get();
    MESSAGE(std::string(what) << " (graph vs direct): max " << test::max_ulp(va, vc) << " ulp");
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < va.size(); ++i) {
      worst = std::max(worst, std::abs(double(va[i]) - double(vc[i])));
      scale = std::max(scale, std::abs(double(va[i])));
    }
    CHECK(worst <= 1e-5 * scale);
  }
  CHECK(graphed.gpu->codec_state() == direct.gpu->codec_state());
  test::cuda_check(cudaGraphExecDestroy(exec), "destroy");
  test::cuda_check(cudaGraphDestroy(graph), "destroy");
  test::cuda_check(cudaStreamDestroy(stream), "destroy");
}

}  // namespace

TEST_CASE("cuda linear: forward and backward captured in a CUDA graph replay as direct calls") {
  SUBCASE("velora (the first replay sets v)") {
    graph_case<activation::VeLoRA>({.groups = 4});
  }
  SUBCASE("compact (P generated inside the graph)") {
    graph_case<activation::CompAct>({.ratio = 0.25, .seed = 2});
  }
  SUBCASE("compact with the count sketch (bucket lists built inside the graph)") {
    graph_case<activation::CompAct>(
        {.ratio = 0.25, .seed = 2, .sketch = transforms::Sketch::count});
  }
  SUBCASE("none") {
    graph_case<activation::None>({});
  }
}
