// Steps captured in a CUDA graph: one capture of step(stream, device_scalars), replayed over
// several steps whose learning rate changes (the scalars written to device memory before each
// replay), gives the same bits (weights, moments, 8-bit absmax, the limiter's state) as direct
// steps with set_lr() — for MultiTensorAdam (fp32, stochastic bf16, 8-bit stores) and for
// MultiTensorGwt with its limiter (three kernels in the graph, both with and without the finite
// check). A graph that replayed stale scalars would differ from the second step on.
#include <cuda_runtime.h>

#include <memory>
#include <slimgrad/backend/cuda/api.hpp>
#include <utility>
#include <vector>

#include "device.hpp"

using namespace slimgrad;
using test::cuda_check;
using test::DeviceBuffer;

namespace {

const std::vector<std::pair<index_t, index_t>> shapes = {
    {64, 100}, {33, 257}, {1, 4097}, {40, 512}};
const std::vector<double> lrs = {1e-3, 5e-4, 2e-3, 0.0, 7e-4, 3e-4};

/// Weights and gradients of every tensor on the device (the same initial values for each run).
struct Params {
  std::vector<std::unique_ptr<DeviceBuffer>> w, g;
  std::vector<cuda::Tensor> tensors;
  Params() {
    std::uint32_t seed = 1;
    for (const auto& [r, c] : shapes) {
      const auto n = static_cast<std::size_t>(r * c);
      w.push_back(std::make_unique<DeviceBuffer>(n * 4));
      g.push_back(std::make_unique<DeviceBuffer>(n * 4));
      test::upload(w.back()->ptr, test::random_floats(n, seed++));
      tensors.push_back({w.back()->ptr, g.back()->ptr, nullptr, r, c, 100 + seed});
    }
  }
  /// The gradients of step t (a different one every step).
  void set_grads(std::int64_t t, cudaStream_t stream) {
    for (std::size_t k = 0; k < shapes.size(); ++k) {
      const auto n = static_cast<std::size_t>(shapes[k].first * shapes[k].second);
      const std::vector<float> grad = test::random_floats(
          n, static_cast<std::uint32_t>(1000 * static_cast<std::size_t>(t) + k), 0.1f);
      cuda_check(cudaMemcpyAsync(g[k]->ptr, grad.data(), n * 4, cudaMemcpyHostToDevice, stream),
                 "grads");
      cuda_check(cudaStreamSynchronize(stream), "sync");
    }
  }
  std::vector<std::vector<float>> weights() const {
    std::vector<std::vector<float>> out;
    for (std::size_t k = 0; k < shapes.size(); ++k)
      out.push_back(test::download<float>(
          w[k]->ptr, static_cast<std::size_t>(shapes[k].first * shapes[k].second)));
    return out;
  }
};

std::vector<std::uint8_t> bytes_of(const void* p, std::size_t n) {
  return test::download<std::uint8_t>(p, n);
}

/// Every byte of a tensor's moments (codes and absmax, or the floats / bf16 bits).
std::vector<std::uint8_t> moment_bytes(const cuda::MomentBuffers& mb, std::size_t elem) {
  const auto n = static_cast<std::size_t>(mb.count);
  if (!mb.quantized) {
    auto a = bytes_of(mb.m, n * elem), b = bytes_of(mb.v, n * elem);
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }
  const std::size_t blocks = (n + 255) / 256;
  auto a = bytes_of(mb.m, n), b = bytes_of(mb.v, n), c = bytes_of(mb.m_absmax, blocks * 4),
       d = bytes_of(mb.v_absmax, blocks * 4);
  for (auto* x : {&b, &c, &d})
    a.insert(a.end(), x->begin(), x->end());
  return a;
}

template <class Opt>
struct Run {
  Params p;
  std::unique_ptr<DeviceBuffer> ws;
  std::unique_ptr<Opt> opt;
  Run(const typename Opt::Options& o, cudaStream_t stream) {
    const std::size_t bytes = Opt::workspace_bytes(p.tensors, o);
    ws = std::make_unique<DeviceBuffer>(bytes);
    opt = std::make_unique<Opt>(p.tensors, o, ws->ptr, bytes, stream);
  }
};

/// Direct steps vs one captured step replayed; returns nothing, checks bits.
template <class Opt>
void direct_vs_graph(const typename Opt::Options& o, std::size_t moment_elem) {
  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  Run<Opt> direct(o, stream), graphed(o, stream);
  DeviceBuffer scalars(sizeof(cuda::StepScalars));
  const auto* dev = scalars.as<const cuda::StepScalars>();

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  graphed.opt->step(stream, dev);
  cuda_check(cudaStreamEndCapture(stream, &graph), "end capture");
  cuda_check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");

  for (std::int64_t t = 1; t <= static_cast<std::int64_t>(lrs.size()); ++t) {
    const double lr = lrs[static_cast<std::size_t>(t - 1)];
    direct.p.set_grads(t, stream);
    direct.opt->set_lr(lr);
    direct.opt->step(stream);

    graphed.p.set_grads(t, stream);
    graphed.opt->set_lr(lr);
    const cuda::StepScalars s = graphed.opt->scalars(t);
    cuda_check(cudaMemcpyAsync(scalars.ptr, &s, sizeof(s), cudaMemcpyHostToDevice, stream),
               "scalars");
    cuda_check(cudaGraphLaunch(exec, stream), "graph launch");
    cuda_check(cudaStreamSynchronize(stream), "sync");
  }
  CHECK(direct.opt->steps() == static_cast<std::int64_t>(lrs.size()));
  const auto wd = direct.p.weights(), wg = graphed.p.weights();
  for (std::size_t k = 0; k < shapes.size(); ++k) {
    CAPTURE(k);
    CHECK(test::max_ulp(wd[k], wg[k]) == 0);
    CHECK(moment_bytes(direct.opt->moments(static_cast<index_t>(k)), moment_elem) ==
          moment_bytes(graphed.opt->moments(static_cast<index_t>(k)), moment_elem));
  }
  // The learning rate changed: the last step did move the weights by another amount than a
  // replay of the first step's scalars would (the test can fail).
  CHECK(direct.opt->scalars(6).adam.weight.step_size !=
        direct.opt->scalars(1).adam.weight.step_size);
  if constexpr (requires { direct.opt->limiter_state(); }) {
    const auto n = shapes.size();
    CHECK(test::download<float>(direct.opt->limiter_state(), n) ==
          test::download<float>(graphed.opt->limiter_state(), n));
  }
  cuda_check(cudaGraphExecDestroy(exec), "destroy");
  cuda_check(cudaGraphDestroy(graph), "destroy");
  cuda_check(cudaStreamDestroy(stream), "destroy");
}

}  // namespace

TEST_CASE("cuda graphs: a captured Adam step replays with the lr and step written to the device") {
  SUBCASE("fp32") {
    cuda::MultiTensorAdam<state::Fp32>::Options o;
    direct_vs_graph<cuda::MultiTensorAdam<state::Fp32>>(o, 4);
  }
  SUBCASE("bf16, stochastic rounding (the epoch comes from the device too)") {
    cuda::MultiTensorAdam<state::Bf16>::Options o;
    o.store.stochastic_rounding = true;
    o.seed = 5;
    direct_vs_graph<cuda::MultiTensorAdam<state::Bf16>>(o, 2);
  }
  SUBCASE("8-bit, bnb") {
    cuda::MultiTensorAdam<state::Q8Block<256>>::Options o;
    o.rule.convention = optim::AdamConvention::bnb;
    direct_vs_graph<cuda::MultiTensorAdam<state::Q8Block<256>>>(o, 4);
  }
}

TEST_CASE("cuda graphs: a captured GWT step (limiter and finite check) replays bit-identically") {
  cuda::MultiTensorGwt<transforms::Haar, 2>::Options o;
  o.residual.limiter_gamma = 1.01;
  direct_vs_graph<cuda::MultiTensorGwt<transforms::Haar, 2>>(o, 4);
}

TEST_CASE(
    "cuda graphs: the optimistic GWT step (limiter, no finite check) replays bit-identically") {
  cuda::MultiTensorGwt<transforms::Haar, 2>::Options o;
  o.residual.limiter_gamma = 1.01;
  o.check_finite = false;  // pass A, the limiter kernel and pass B, always launched
  o.optimistic_limiter = true;
  direct_vs_graph<cuda::MultiTensorGwt<transforms::Haar, 2>>(o, 4);
}

TEST_CASE("cuda graphs: bad scalars are refused") {
  Params p;
  cuda::MultiTensorAdam<state::Fp32>::Options o;
  const std::size_t bytes = cuda::MultiTensorAdam<state::Fp32>::workspace_bytes(p.tensors, o);
  DeviceBuffer ws(bytes);
  cuda::MultiTensorAdam<state::Fp32> opt(p.tensors, o, ws.ptr, bytes, nullptr);
  CHECK_THROWS_WITH_AS(opt.set_lr(-1.0), doctest::Contains("lr must be finite"), Error);
  CHECK_THROWS_WITH_AS(opt.step(nullptr, nullptr), doctest::Contains("null device scalars"), Error);
  CHECK_THROWS_WITH_AS(opt.scalars(0), doctest::Contains("count from 1"), Error);
  CHECK(opt.steps() == 0);
}
