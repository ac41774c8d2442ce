// bench_cuda_activation: the compressed linear layer on the GPU (cuda::Linear, issue 5's target:
// CompAct and VeLoRA backward at most 1.15x the exact backward). A 4096 x 4096 layer over 2048
// tokens, with bias: forward (Y = X Wᵀ + b and the saved activation) and backward (dX, db, dW)
// for the exact layer (None: dW = dYᵀ X on cuBLAS), CompAct at r = n/4 and VeLoRA with sub-token
// size 16 (G = 256), in fp32 and in TF32 (the same math mode for every row of a block). The
// forward is compared with infer() (the GEMM and bias alone: what an exact layer that keeps a
// pointer to X costs); None's forward also copies X, as the CPU layer does. Median of 50 CUDA-
// event timings after 5 warm-ups; forward and backward are timed apart (each backward needs its
// forward, which runs untimed before it).
#include <slimgrad/cuda.cuh>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "timing.cuh"

namespace sg = slimgrad;
using sg::index_t;

namespace {

using slimgrad::bench::check;
using slimgrad::bench::Timer;

__global__ void fill(float* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<float>(sg::random::gaussian({seed, 0, 0}, i, 1.0)) + 0.1f;
}

constexpr index_t n = 4096, m = 4096, tokens = 2048;
constexpr int warmup = 5, reps = 50;

struct Buffers {
  float *x, *w, *b, *y, *dy, *dx, *dw, *db;
  Buffers() {
    for (auto [p, count] : {std::pair{&x, tokens * n},
                            {&w, m * n},
                            {&b, m},
                            {&y, tokens * m},
                            {&dy, tokens * m},
                            {&dx, tokens * n},
                            {&dw, m * n},
                            {&db, m}}) {
      check(cudaMalloc(p, static_cast<std::size_t>(count) * 4));
      fill<<<1024, 256>>>(*p, static_cast<std::size_t>(count), static_cast<unsigned>(count % 97));
    }
    check(cudaDeviceSynchronize());
  }
};

struct Row {
  float infer_ms, forward_ms, backward_ms;
  std::size_t saved_bytes;
};

template <class Codec>
Row run(Buffers& buf, const typename Codec::Options& co, sg::cuda::MathMode math) {
  using Layer = sg::cuda::Linear<Codec>;
  const typename Layer::Options o{.codec = co, .math = math};
  const std::size_t bytes = Layer::workspace_bytes(n, m, tokens, o);
  void* ws = nullptr;
  check(cudaMalloc(&ws, bytes));
  Row r{};
  {
    Layer layer("layers.0.mlp.up_proj", n, m, tokens, o, ws, bytes, nullptr);
    layer.set_step(0);
    const auto x = sg::DeviceView<const float>(buf.x, tokens, n, n);
    const auto w = sg::DeviceView<const float>(buf.w, m, n, n);
    const auto b = sg::DeviceView<const float>(buf.b, 1, m, m);
    const auto y = sg::DeviceView<float>(buf.y, tokens, m, m);
    const auto dy = sg::DeviceView<const float>(buf.dy, tokens, m, m);
    const auto dx = sg::DeviceView<float>(buf.dx, tokens, n, n);
    const sg::Shape gs = layer.grad_shape();
    const auto dw = sg::DeviceView<float>(buf.dw, gs.rows, gs.cols, gs.cols);
    const auto db = sg::DeviceView<float>(buf.db, 1, m, m);
    Timer ti, tf, tb;
    for (int i = 0; i < warmup + reps; ++i) {
      auto infer = [&] { layer.infer(x, w, b, y, nullptr); };
      auto forward = [&] { layer.forward(x, w, b, y, nullptr); };
      auto backward = [&] { layer.backward(dy, w, dx, dw, db, nullptr); };
      if (i < warmup) {
        infer();
        forward();
        backward();
        check(cudaDeviceSynchronize());
        continue;
      }
      ti.time(infer);
      tf.time(forward);
      tb.time(backward);
    }
    r = {ti.median(), tf.median(), tb.median(), layer.saved_bytes()};
  }
  check(cudaFree(ws));
  return r;
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  std::printf("layer %ldx%ld (out x in), %ld tokens, bias; median of %d\n", m, n, tokens, reps);
  Buffers buf;
  for (const auto math : {sg::cuda::MathMode::fp32, sg::cuda::MathMode::tf32}) {
    const char* mode = math == sg::cuda::MathMode::fp32 ? "fp32" : "tf32";
    const Row exact = run<sg::activation::None>(buf, {}, math);
    const Row compact = run<sg::activation::CompAct>(buf, {.ratio = 0.25}, math);
    const Row velora = run<sg::activation::VeLoRA>(buf, {.groups = n / 16}, math);
    std::printf("%-5s %-22s %9s %9s %9s %8s %8s %10s\n", mode, "codec", "infer ms", "fwd ms",
                "bwd ms", "fwd/inf", "bwd/ex", "saved MB");
    auto line = [&](const char* name, const Row& r) {
      std::printf("%-5s %-22s %9.3f %9.3f %9.3f %8.3f %8.3f %10.2f\n", mode, name, r.infer_ms,
                  r.forward_ms, r.backward_ms, r.forward_ms / r.infer_ms,
                  r.backward_ms / exact.backward_ms, static_cast<double>(r.saved_bytes) / 1e6);
    };
    line("exact (none)", exact);
    line("compact r=n/4", compact);
    line("velora sub-token 16", velora);
  }
  // CompAct's P (1024 x 4096) regenerated on an epoch change.
  float* p = nullptr;
  check(cudaMalloc(&p, std::size_t{1024} * n * 4));
  Timer tp;
  for (int i = 0; i < warmup + reps; ++i) {
    auto gen = [&] {
      sg::cuda::fill_gaussian(sg::device_view(p, 1024, n), {0, 1, static_cast<std::uint32_t>(i)},
                              1.0 / 32, nullptr);
    };
    if (i < warmup)
      gen();
    else
      tp.time(gen);
  }
  std::printf("compact P 1024x4096 regeneration (epoch change): %.3f ms\n", tp.median());
  check(cudaFree(p));
  return 0;
}
