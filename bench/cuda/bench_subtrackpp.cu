// bench/cuda/bench_subtrackpp.cu — SubTrack++ on the GPU (cuda::MultiTensorLowRank<Grassmann>
// with recovery scaling, limiter γ 1.01) on the LLaMA-1B-like set of bench/cuda/side_by_side.py
// (24 × q, k, v, o 2048×2048; gate, up 5461×2048; down 2048×5461; rank 512, T = 200, HF-Adam
// lr 1e-2, ε 1e-6, α 0.25, TF32, 8 lanes, η 10 as the side-by-side script):
//   * the steady step and the tracking refresh with and without projection-aware moments
//     (Options::projection_aware: the moment rotation runs inside the tracking refresh);
//   * where the steady step's recovery scaling goes: the engine's per-tensor chain (copy of G,
//     the residual GEMM, φ, Λ ⊙= φ with ‖Λ‖², the limiter, W += c·Λ), replayed phase by phase
//     over the 168 tensors with the engine's own kernels and launch shapes, CUDA events around
//     each phase (so one phase's launches queue back to back; median of 5).
#include <slimgrad/cuda.cuh>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "llama_set.cuh"

namespace sg = slimgrad;
using sg::index_t;
using sg::bench::check;
using sg::bench::fill;
using sg::bench::median_ms;

namespace {

using Set = sg::bench::LlamaSet;

using Engine = sg::cuda::MultiTensorLowRank<sg::transforms::Grassmann>;

Engine::Options options(bool projection_aware) {
  Engine::Options o;
  o.rule.lr = 1e-2;
  o.rule.eps = 1e-6;
  o.rule.convention = sg::optim::AdamConvention::hf;
  o.transform.rank = 512;
  o.transform.update_gap = 200;
  o.transform.eta = 10.0;
  o.scale = 0.25;
  o.recovery_scaling = true;
  o.limiter_gamma = 1.01;
  o.projection_aware = projection_aware;
  return o;
}

void engine_run(const Set& s, bool projection_aware) {
  const Engine::Options o = options(projection_aware);
  const std::size_t bytes = Engine::workspace_bytes(s.t, o);
  void* ws = nullptr;
  check(cudaMalloc(&ws, bytes));
  {
    Engine e(s.t, o, ws, bytes, nullptr);
    e.step(nullptr);  // the first SVD
    check(cudaDeviceSynchronize());
    const float steady = median_ms([&] { e.step(nullptr); }, 3, 10);
    const float refresh = median_ms([&] { e.refresh(nullptr); }, 1, 3);
    std::printf(
        "subtrack++ projection_aware=%d: steady %.2f ms, tracking refresh %.1f ms, "
        "amortised %.2f ms; workspace %.2f GB, state %.2f GB\n",
        projection_aware ? 1 : 0, steady, refresh, steady + refresh / 200.0,
        static_cast<double>(bytes) / 1e9, static_cast<double>(e.state_bytes()) / 1e9);
  }
  check(cudaFree(ws));
}

// The engine's recover() chain, phase by phase over every tensor (lowrank.cuh's kernels and
// launch shapes; the GEMM as detail::gemm with TF32).
void recovery_split(const Set& s) {
  namespace d = sg::cuda::detail;
  const index_t r = 512;
  index_t big = 0, chans = 0, coeffs = 0;
  for (const auto& t : s.t) {
    big = std::max(big, t.rows * t.cols);
    chans = std::max(chans, std::max(t.rows, t.cols));
    coeffs = std::max(coeffs, r * std::max(t.rows, t.cols));
  }
  float *lam, *phi, *c, *x, *coef, *limiter, *basis;
  double* norm;
  int* skip;
  d::TensorScalars* ts;
  check(cudaMalloc(&lam, static_cast<std::size_t>(big) * 4));
  check(cudaMalloc(&phi, static_cast<std::size_t>(chans) * 4));
  check(cudaMalloc(&c, static_cast<std::size_t>(coeffs) * 4));
  check(cudaMalloc(&x, static_cast<std::size_t>(coeffs) * 4));
  check(cudaMalloc(&basis, static_cast<std::size_t>(coeffs) * 4));
  check(cudaMalloc(&coef, 4));
  check(cudaMalloc(&limiter, 4));
  check(cudaMalloc(&norm, 8));
  check(cudaMalloc(&skip, 4));
  check(cudaMalloc(&ts, sizeof(d::TensorScalars)));
  fill(c, static_cast<long>(coeffs), 5);
  fill(x, static_cast<long>(coeffs), 6);
  fill(basis, static_cast<long>(coeffs), 7, 0.02f);
  check(cudaMemset(skip, 0, 4));
  check(cudaMemset(norm, 0, 8));
  const d::TensorScalars one_ts{1.0f, 1e-6f, 1.0f};
  check(cudaMemcpy(ts, &one_ts, sizeof one_ts, cudaMemcpyHostToDevice));
  const float unset = -1.0f;
  check(cudaMemcpy(limiter, &unset, 4, cudaMemcpyHostToDevice));
  cublasHandle_t blas;
  d::check_cublas(cublasCreate(&blas), "cublasCreate");
  const sg::optim::AdamStep step = sg::optim::Adam::step_scalars(options(false).rule, 2);

  auto each = [&](auto&& f) {
    return median_ms(
        [&] {
          for (const auto& t : s.t)
            f(t);
        },
        1, 5);
  };
  auto blocks = [](const sg::cuda::Tensor& t) {
    return static_cast<unsigned>(std::min<index_t>((t.rows * t.cols + 255) / 256, 132 * 4));
  };
  const float copy = each([&](const sg::cuda::Tensor& t) {
    check(cudaMemcpyAsync(lam, t.grad, static_cast<std::size_t>(t.rows * t.cols) * 4,
                          cudaMemcpyDeviceToDevice));
  });
  const float gemm = each([&](const sg::cuda::Tensor& t) {
    const index_t mm = t.rows, n = t.cols;
    if (mm >= n)  // right: Λc (n×m) −= Pc (n×r)·Cc (r×m)
      d::gemm(blas, false, false, n, mm, r, -1.0f, basis, n, c, r, 1.0f, lam, n, true);
    else  // left: Cc (n×r)·Sc (r×m)
      d::gemm(blas, false, false, n, mm, r, -1.0f, c, n, basis, r, 1.0f, lam, n, true);
  });
  const float phis = each([&](const sg::cuda::Tensor& t) {
    const bool left = t.rows < t.cols;
    const index_t ch = left ? t.cols : t.rows;
    const index_t per_block = left ? 256 : 8;
    d::recovery_phi_kernel<<<static_cast<unsigned>((ch + per_block - 1) / per_block), 256>>>(
        x, c, ch, r, left, ts, phi);
  });
  const float scale = each([&](const sg::cuda::Tensor& t) {
    check(cudaMemsetAsync(norm, 0, 8));
    d::recovery_scale_kernel<<<blocks(t), 256>>>(lam, phi, t.rows, t.cols, t.rows < t.cols, norm);
  });
  const float limit = each([&](const sg::cuda::Tensor&) {
    d::recovery_limiter_kernel<<<1, 32>>>(norm, limiter, 1.01, skip, ts, step.weight, nullptr,
                                          coef);
  });
  const float apply = each([&](const sg::cuda::Tensor& t) {
    d::recovery_apply_kernel<<<blocks(t), 256>>>(static_cast<float*>(t.weight), lam,
                                                 t.rows * t.cols, coef, skip);
  });
  check(cudaGetLastError());
  check(cudaDeviceSynchronize());
  std::printf(
      "recovery chain over %zu tensors, ms: copy G %.2f | residual GEMM (TF32) %.2f | phi %.2f | "
      "scale + norm %.2f | limiter %.2f | apply %.2f | sum %.2f\n",
      s.t.size(), copy, gemm, phis, scale, limit, apply,
      copy + gemm + phis + scale + limit + apply);
  cublasDestroy(blas);
  for (void* p : std::vector<void*>{lam, phi, c, x, basis, coef, limiter, norm, skip, ts})
    cudaFree(p);
}

}  // namespace

int main() {
  const Set s;
  engine_run(s, false);
  engine_run(s, true);
  recovery_split(s);
  return 0;
}
