// CUDA benchmarks of the slimgrad backend. One source, two builds:
//   * a shared library with a C interface (bench/cuda/side_by_side.py loads it with ctypes and
//     times slimgrad and torch.optim.AdamW(fused=True) on the same tensors, in one process);
//   * with -DSLIMGRAD_BENCH_MAIN, the program bench_cuda: device copy bandwidth and the Haar
//     DWT forward+inverse of a 4096 x 11008 matrix, as a fraction of that bandwidth.
// Built with -fmad=false like the GPU tests, so the timed kernels are the tested ones.
#include <slimgrad/cuda.cuh>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <memory>
#include <vector>

#include "timing.cuh"

namespace sg = slimgrad;
using sg::index_t;

namespace {

struct Handle {
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  std::size_t state_bytes = 0;
  std::function<void(cudaStream_t)> step;
  std::function<void(cudaStream_t)> refresh;  // low-rank methods: the refresh work alone
  std::function<int()> limited;               // GWT: tensors the last step's limiter scaled
  std::shared_ptr<void> object;
  ~Handle() {
    object.reset();
    if (workspace) cudaFree(workspace);
  }
};

std::vector<sg::cuda::Tensor> tensors_of(int n, void** w, void** g, void** wcopy, const long* rows,
                                         const long* cols) {
  std::vector<sg::cuda::Tensor> t(static_cast<std::size_t>(n));
  for (int k = 0; k < n; ++k) {
    t[k].weight = w[k];
    t[k].grad = g[k];
    t[k].weight_bf16 = wcopy ? static_cast<std::uint16_t*>(wcopy[k]) : nullptr;
    t[k].rows = rows[k];
    t[k].cols = cols[k];
    t[k].id = static_cast<std::uint64_t>(k);
  }
  return t;
}

template <class Opt>
Handle* make(const std::vector<sg::cuda::Tensor>& t, const typename Opt::Options& o) {
  auto h = std::make_unique<Handle>();
  const std::size_t bytes = Opt::workspace_bytes(t, o);
  if (cudaMalloc(&h->workspace, bytes) != cudaSuccess) return nullptr;
  h->workspace_bytes = bytes;
  auto opt = std::make_shared<Opt>(t, o, h->workspace, bytes, nullptr);
  h->state_bytes = opt->state_bytes();
  h->step = [opt](cudaStream_t s) { opt->step(s); };
  if constexpr (requires { opt->refresh(nullptr); })
    h->refresh = [opt](cudaStream_t s) { opt->refresh(s); };
  if constexpr (requires { opt->limiter_divisors(); })
    h->limited = [opt] {  // synchronous: outside the timed steps
      std::vector<float> rho(static_cast<std::size_t>(opt->tensors()));
      if (cudaMemcpy(rho.data(), opt->limiter_divisors(), rho.size() * sizeof(float),
                     cudaMemcpyDeviceToHost) != cudaSuccess)
        return -1;
      return static_cast<int>(
          std::count_if(rho.begin(), rho.end(), [](float r) { return r != 1.0f; }));
    };
  h->object = opt;
  return h.release();
}

sg::optim::Adam::Options rule(int convention, double lr, double b1, double b2, double eps,
                              double wd) {
  sg::optim::Adam::Options r;
  r.lr = lr;
  r.beta1 = b1;
  r.beta2 = b2;
  r.eps = eps;
  r.weight_decay = wd;
  r.convention = static_cast<sg::optim::AdamConvention>(convention);
  return r;
}

}  // namespace

extern "C" {

/// store: 0 fp32, 1 bf16, 2 q8 (256); convention: 0 torch, 1 hf, 2 bnb; precision: 0 fp32,
/// 1 bf16, 2 fp32_master; check_finite: the non-finite gradient skip's check pass. Returns
/// nullptr on failure (message on stderr).
void* sg_adam_create(int store, int convention, int precision, int check_finite, int n, void** w,
                     void** g, void** wcopy, const long* rows, const long* cols, double lr,
                     double b1, double b2, double eps, double wd) {
  try {
    const auto t = tensors_of(n, w, g, wcopy, rows, cols);
    auto fill = [&](auto& o) {
      o.rule = rule(convention, lr, b1, b2, eps, wd);
      o.precision = static_cast<sg::cuda::Precision>(precision);
      o.check_finite = check_finite != 0;
    };
    if (store == 0) {
      sg::cuda::MultiTensorAdam<sg::state::Fp32>::Options o;
      fill(o);
      return make<sg::cuda::MultiTensorAdam<sg::state::Fp32>>(t, o);
    }
    if (store == 1) {
      sg::cuda::MultiTensorAdam<sg::state::Bf16>::Options o;
      fill(o);
      return make<sg::cuda::MultiTensorAdam<sg::state::Bf16>>(t, o);
    }
    sg::cuda::MultiTensorAdam<sg::state::Q8Block<256>>::Options o;
    fill(o);
    return make<sg::cuda::MultiTensorAdam<sg::state::Q8Block<256>>>(t, o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_adam_create: %s\n", e.what());
    return nullptr;
  }
}

/// GWT, Haar, 2 levels, mode zero, HF-Adam. check_finite: 0 off, 1 on, 2 off with the
/// optimistic limiter step.
void* sg_gwt_create(int precision, int check_finite, double gamma, double scale, int n, void** w,
                    void** g, void** wcopy, const long* rows, const long* cols, double lr,
                    double b1, double b2, double eps, double wd) {
  try {
    using Opt = sg::cuda::MultiTensorGwt<sg::transforms::Haar, 2>;
    Opt::Options o;
    o.rule = rule(1, lr, b1, b2, eps, wd);
    o.precision = static_cast<sg::cuda::Precision>(precision);
    o.check_finite = check_finite == 1;
    o.optimistic_limiter = check_finite == 2;
    o.residual.limiter_gamma = gamma;
    o.residual.scale = scale;
    return make<Opt>(tensors_of(n, w, g, wcopy, rows, cols), o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_gwt_create: %s\n", e.what());
    return nullptr;
  }
}

/// GaLore (subtrack = 0) or SubTrack-Grad (subtrack = 1) on fp32 tensors: rank, T, HF-Adam;
/// method 0 exact, 1 randomized (GaLore's refresh; SubTrack's first SVD); eta: SubTrack's η;
/// refresh_batch: tensors per batched eigensolver call of the randomized refresh; limiter > 0:
/// SubTrack++'s recovery scaling with that limiter γ.
void* sg_lowrank_create(int subtrack, int method, int tf32, int rank, int gap, double eta,
                        int lanes, int batched, int refresh_batch, double limiter, int n, void** w,
                        void** g, const long* rows, const long* cols, double lr, double b1,
                        double b2, double eps, double wd, double scale) {
  try {
    const auto t = tensors_of(n, w, g, nullptr, rows, cols);
    auto fill = [&](auto& o, auto& svd) {
      o.rule = rule(1, lr, b1, b2, eps, wd);
      o.tf32 = tf32 != 0;
      o.lanes = lanes;
      o.batched = batched != 0;
      o.refresh_batch = refresh_batch;
      o.recovery_scaling = limiter > 0;
      o.limiter_gamma = limiter;
      o.scale = scale;
      o.transform.rank = rank;
      o.transform.update_gap = gap;
      svd = method == 0 ? sg::transforms::SvdMethod::exact : sg::transforms::SvdMethod::randomized;
    };
    if (subtrack == 0) {
      using Opt = sg::cuda::MultiTensorLowRank<sg::transforms::SvdProjection>;
      Opt::Options o;
      fill(o, o.transform.method);
      return make<Opt>(t, o);
    }
    using Opt = sg::cuda::MultiTensorLowRank<sg::transforms::Grassmann>;
    Opt::Options o;
    fill(o, o.transform.init_method);
    o.transform.eta = eta;
    return make<Opt>(t, o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_lowrank_create: %s\n", e.what());
    return nullptr;
  }
}

/// The refresh that the next step would run (GaLore's SVD, SubTrack's tracking), alone.
int sg_refresh(void* h, void* stream) {
  try {
    static_cast<Handle*>(h)->refresh(static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_refresh: %s\n", e.what());
    return 1;
  }
}

int sg_step(void* h, void* stream) {
  try {
    static_cast<Handle*>(h)->step(static_cast<cudaStream_t>(stream));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_step: %s\n", e.what());
    return 1;
  }
}

/// GWT: how many tensors the last step's limiter scaled (ρ ≠ 1); -1 when not GWT.
int sg_limited(void* h) {
  const Handle* p = static_cast<Handle*>(h);
  return p->limited ? p->limited() : -1;
}

unsigned long long sg_state_bytes(void* h) {
  return static_cast<Handle*>(h)->state_bytes;
}

unsigned long long sg_workspace_bytes(void* h) {
  return static_cast<Handle*>(h)->workspace_bytes;
}

void sg_destroy(void* h) {
  delete static_cast<Handle*>(h);
}

/// Haar, 2 levels, rows: g (rows x cols) → c (rows x K) → x (rows x cols).
int sg_dwt_roundtrip(const float* g, float* c, float* x, long rows, long cols, void* stream) {
  try {
    const auto k = sg::transforms::dwt_layout(cols, 2, 2, sg::transforms::BoundaryMode::zero).total;
    auto s = static_cast<cudaStream_t>(stream);
    sg::cuda::dwt_forward_rows<sg::transforms::Haar, 2>(sg::DeviceView<const float>(g, rows, cols),
                                                        sg::DeviceView<float>(c, rows, k),
                                                        sg::transforms::BoundaryMode::zero, s);
    sg::cuda::dwt_inverse_rows<sg::transforms::Haar, 2>(sg::DeviceView<const float>(c, rows, k),
                                                        sg::DeviceView<float>(x, rows, cols),
                                                        sg::transforms::BoundaryMode::zero, s);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sg_dwt_roundtrip: %s\n", e.what());
    return 1;
  }
}

}  // extern "C"

#if defined(SLIMGRAD_BENCH_MAIN)

namespace {

using slimgrad::bench::check;
using slimgrad::bench::median_ms;

__global__ void fill(float* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    p[i] = sg::random::gaussian({seed, 0, 0}, i, 1.0);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  // Copy bandwidth (bytes read + written) on 1 GiB buffers, well beyond L2.
  const std::size_t copy_n = std::size_t{1} << 28;
  float *src = nullptr, *dst = nullptr;
  check(cudaMalloc(&src, copy_n * 4));
  check(cudaMalloc(&dst, copy_n * 4));
  fill<<<1024, 256>>>(src, copy_n, 1);
  const float copy_ms = median_ms(
      [&] { check(cudaMemcpyAsync(dst, src, copy_n * 4, cudaMemcpyDeviceToDevice)); }, 3, 20);
  const double copy_gbs = 2.0 * copy_n * 4 / (copy_ms * 1e-3) / 1e9;
  std::printf("device copy: %.3f ms for 2 x %.0f MB: %.0f GB/s\n", copy_ms, copy_n * 4 / 1e6,
              copy_gbs);
  check(cudaFree(src));
  check(cudaFree(dst));

  // Haar DWT, 2 levels, forward + inverse of 4096 x 11008 (K = n): 16 bytes per element.
  const long rows = 4096, cols = 11008;
  const std::size_t n = static_cast<std::size_t>(rows) * cols;
  float *g = nullptr, *c = nullptr, *x = nullptr;
  check(cudaMalloc(&g, n * 4));
  check(cudaMalloc(&c, n * 4));
  check(cudaMalloc(&x, n * 4));
  fill<<<1024, 256>>>(g, n, 2);
  const float dwt_ms = median_ms([&] { sg_dwt_roundtrip(g, c, x, rows, cols, nullptr); }, 3, 50);
  const double dwt_gbs = 16.0 * n / (dwt_ms * 1e-3) / 1e9;
  std::printf("haar L2 fwd+inv 4096x11008: %.3f ms, %.0f GB/s = %.1f%% of copy bandwidth\n", dwt_ms,
              dwt_gbs, 100.0 * dwt_gbs / copy_gbs);
  const float fwd_ms = median_ms(
      [&] {
        sg::cuda::dwt_forward_rows<sg::transforms::Haar, 2>(
            sg::DeviceView<const float>(g, rows, cols), sg::DeviceView<float>(c, rows, cols),
            sg::transforms::BoundaryMode::zero, nullptr);
      },
      3, 50);
  std::printf("haar L2 forward alone: %.3f ms = %.1f%% of copy bandwidth\n", fwd_ms,
              100.0 * (8.0 * n / (fwd_ms * 1e-3) / 1e9) / copy_gbs);
  check(cudaFree(g));
  check(cudaFree(c));
  check(cudaFree(x));
  return 0;
}

#endif
