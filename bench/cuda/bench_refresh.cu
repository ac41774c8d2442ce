// bench/cuda/bench_refresh.cu — where GaLore's randomized refresh spends its time on the GPU, and
// what the alternatives for its small dense steps cost (for cuda::MultiTensorLowRank).
//   * profile: one tensor's refresh as lowrank.cuh runs it (Philox sketch, q = 2 power
//     iterations with shifted Cholesky-QR, Cholesky-QR2, B = QᵀĜ, BBᵀ, syevd, U = QV), on one
//     stream, with a CUDA event after every call, summed per phase (median of 5);
//   * the eigensolver on an (r+p)×(r+p) BBᵀ: syevd, syevj, XsyevBatched;
//   * potrf single against potrfBatched; trsm against a GEMM with R⁻¹;
//   * with --engine (instead): MultiTensorLowRank's refresh of the whole LLaMA-1B set for
//     several Options::refresh_batch, with the workspace each takes.
// Shapes: the LLaMA-1B set's two (2048×2048, and 5461×2048 on the 2048 side), r = 512, p = 10.
#include <slimgrad/cuda.cuh>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "llama_set.cuh"

namespace {

using slimgrad::bench::check;
using slimgrad::bench::fill;
using slimgrad::bench::median_ms;

void cb(cublasStatus_t s, const char* w) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLAS %s: %d\n", w, static_cast<int>(s));
    std::exit(1);
  }
}
void cs(cusolverStatus_t s, const char* w) {
  if (s != CUSOLVER_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuSOLVER %s: %d\n", w, static_cast<int>(s));
    std::exit(1);
  }
}

// lowrank.cuh's dispatch of an fp32 GEMM (TF32 or not), with α = 1, β = 0.
void gemm(cublasHandle_t h, bool ta, bool tb, int m, int n, int k, const float* a, int lda,
          const float* b, int ldb, float* c, int ldc, bool tf32) {
  slimgrad::cuda::detail::gemm(h, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, ldc, tf32);
}

struct Ctx {
  cudaStream_t st{};
  cublasHandle_t blas{};
  cusolverDnHandle_t sol{};
  float *g{}, *y{}, *z{}, *h{}, *u{}, *eig{}, *work{};
  int* info{};
  int lwork = 0;
};

// Phase-timed refresh of one right-side tensor: G (rows×cols row-major) = Gc (cols×rows), Ĝ =
// Gc, dim0 = cols, dim1 = rows.
struct Profiler {
  Ctx& c;
  std::map<std::string, float> ms;
  std::vector<std::pair<std::string, cudaEvent_t>> marks;
  cudaEvent_t start{};
  explicit Profiler(Ctx& cc) : c(cc) {}
  void begin() {
    check(cudaEventCreate(&start));
    check(cudaEventRecord(start, c.st));
  }
  void mark(const char* phase) {
    cudaEvent_t e;
    check(cudaEventCreate(&e));
    check(cudaEventRecord(e, c.st));
    marks.push_back({phase, e});
  }
  void end() {
    check(cudaStreamSynchronize(c.st));
    cudaEvent_t prev = start;
    for (auto& [p, e] : marks) {
      float t = 0;
      check(cudaEventElapsedTime(&t, prev, e));
      ms[p] += t;
      prev = e;
    }
    float total = 0;
    check(cudaEventElapsedTime(&total, start, marks.back().second));
    ms["total"] += total;
    for (auto& [p, e] : marks)
      check(cudaEventDestroy(e));
    check(cudaEventDestroy(start));
    marks.clear();
  }
};

void profiled_refresh(Ctx& c, Profiler& p, int rows, int cols, int ell, int r) {
  const int d0 = cols, d1 = rows;
  const float eps = 1.1920929e-7f;
  auto cqr = [&](float* x, int n, float shift) {
    gemm(c.blas, true, false, ell, ell, n, x, n, x, n, c.h, ell, false);
    p.mark("gram (fp32 GEMM)");
    slimgrad::cuda::detail::shift_diagonal_kernel<<<1, 256, 0, c.st>>>(c.h, ell, shift);
    p.mark("small kernels");
    cs(cusolverDnSpotrf(c.sol, CUBLAS_FILL_MODE_UPPER, ell, c.h, ell, c.work, c.lwork, c.info),
       "potrf");
    p.mark("potrf");
    const float one = 1.0f;
    cb(cublasStrsm(c.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                   CUBLAS_DIAG_NON_UNIT, n, ell, &one, c.h, ell, x, n),
       "trsm");
    p.mark("trsm");
  };
  p.begin();
  fill(c.z, static_cast<long>(d1) * ell, 7, 1.0f, c.st);
  p.mark("sketch");
  gemm(c.blas, false, false, d0, ell, d1, c.g, d0, c.z, d1, c.y, d0, true);
  p.mark("range GEMMs (tf32)");
  for (int it = 0; it < 2; ++it) {
    cqr(c.y, d0, ell * eps);
    gemm(c.blas, true, false, d1, ell, d0, c.g, d0, c.y, d0, c.z, d1, true);
    p.mark("range GEMMs (tf32)");
    cqr(c.z, d1, ell * eps);
    gemm(c.blas, false, false, d0, ell, d1, c.g, d0, c.z, d1, c.y, d0, true);
    p.mark("range GEMMs (tf32)");
  }
  cqr(c.y, d0, ell * eps);
  cqr(c.y, d0, eps);
  gemm(c.blas, true, false, d1, ell, d0, c.g, d0, c.y, d0, c.z, d1, true);
  p.mark("range GEMMs (tf32)");
  gemm(c.blas, true, false, ell, ell, d1, c.z, d1, c.z, d1, c.h, ell, false);
  p.mark("BBt (fp32 GEMM)");
  cs(cusolverDnSsyevd(c.sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell, c.h, ell, c.eig,
                      c.work, c.lwork, c.info),
     "syevd");
  p.mark("syevd");
  gemm(c.blas, false, false, d0, r, ell, c.y, d0, c.h + (ell - r) * ell, ell, c.u, d0, false);
  p.mark("U = QV (fp32 GEMM)");
  p.end();
}

// The engine's randomized refresh of the whole LLaMA-1B set (GaLore, rank 512, TF32, the
// side-by-side options) for each refresh_batch: the eigensolver's scratch against its calls.
void engine_refresh() {
  using Engine = slimgrad::cuda::MultiTensorLowRank<slimgrad::transforms::SvdProjection>;
  const slimgrad::bench::LlamaSet set;
  std::printf(
      "== GaLore's refresh of the LLaMA-1B set (168 tensors) by refresh_batch, median of 3\n");
  for (int batch : {4, 8, 16, 32, 64, 168}) {
    Engine::Options o;
    o.rule.lr = 1e-2;
    o.rule.eps = 1e-6;
    o.rule.convention = slimgrad::optim::AdamConvention::hf;
    o.transform.rank = 512;
    o.transform.update_gap = 200;
    o.transform.method = slimgrad::transforms::SvdMethod::randomized;  // p 10, q 2
    o.scale = 0.25;
    o.refresh_batch = batch;
    const std::size_t bytes = Engine::workspace_bytes(set.t, o);
    void* ws = nullptr;
    check(cudaMalloc(&ws, bytes));
    {
      Engine e(set.t, o, ws, bytes, nullptr);
      const float ms = median_ms([&] { e.refresh(nullptr); }, 1, 3);
      std::printf("  refresh_batch %3d  refresh %7.1f ms  workspace %.2f GB\n", batch, ms,
                  static_cast<double>(bytes) / 1e9);
    }
    check(cudaFree(ws));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--engine") {
    engine_refresh();
    return 0;
  }
  const int r = 512, ell = 522;
  Ctx c;
  check(cudaStreamCreateWithFlags(&c.st, cudaStreamNonBlocking));
  cb(cublasCreate(&c.blas), "create");
  cb(cublasSetStream(c.blas, c.st), "stream");
  cs(cusolverDnCreate(&c.sol), "create");
  cs(cusolverDnSetStream(c.sol, c.st), "stream");
  const long big = 5461L * 2048;
  check(cudaMalloc(&c.g, big * 4));
  check(cudaMalloc(&c.y, 2048L * ell * 4));
  check(cudaMalloc(&c.z, 5461L * ell * 4));
  check(cudaMalloc(&c.h, 2048L * 2048 * 4));
  check(cudaMalloc(&c.u, 2048L * r * 4));
  check(cudaMalloc(&c.eig, 2048 * 4));
  check(cudaMalloc(&c.info, 64));
  int lw1 = 0, lw2 = 0;
  cs(cusolverDnSpotrf_bufferSize(c.sol, CUBLAS_FILL_MODE_UPPER, ell, c.h, ell, &lw1), "bs");
  cs(cusolverDnSsyevd_bufferSize(c.sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell, c.h,
                                 ell, c.eig, &lw2),
     "bs");
  c.lwork = std::max(lw1, lw2);
  check(cudaMalloc(&c.work, static_cast<std::size_t>(c.lwork) * 4));
  fill(c.g, big, 1);
  check(cudaDeviceSynchronize());

  std::printf("== profile of one tensor's randomized refresh (r %d, l %d), ms, median-ish of 5\n",
              r, ell);
  for (int shape = 0; shape < 2; ++shape) {
    const int rows = shape == 0 ? 2048 : 5461, cols = 2048;
    Profiler warm(c);
    profiled_refresh(c, warm, rows, cols, ell, r);
    Profiler p(c);
    for (int rep = 0; rep < 5; ++rep)
      profiled_refresh(c, p, rows, cols, ell, r);
    std::printf("-- %dx%d\n", rows, cols);
    for (auto& [k, v] : p.ms)
      std::printf("  %-22s %8.3f\n", k.c_str(), v / 5);
  }

  // BBᵀ-like symmetric matrices: B (ell × 2048) random, H = BBᵀ.
  const int nb = 168;
  float *bb = nullptr, *hs = nullptr, *hw = nullptr, *ws = nullptr;
  check(cudaMalloc(&bb, static_cast<std::size_t>(ell) * 2048 * 4));
  check(cudaMalloc(&hs, static_cast<std::size_t>(nb) * ell * ell * 4));
  check(cudaMalloc(&hw, static_cast<std::size_t>(nb) * ell * ell * 4));
  check(cudaMalloc(&ws, static_cast<std::size_t>(nb) * ell * 4));
  for (int k = 0; k < nb; ++k) {
    fill(bb, static_cast<long>(ell) * 2048, 100 + k, 1.0f, c.st);
    gemm(c.blas, false, true, ell, ell, 2048, bb, ell, bb, ell,
         hs + static_cast<long>(k) * ell * ell, ell, false);
  }
  check(cudaStreamSynchronize(c.st));
  const std::size_t hbytes = static_cast<std::size_t>(ell) * ell * 4;
  auto reset = [&](int n) {
    check(cudaMemcpyAsync(hw, hs, hbytes * n, cudaMemcpyDeviceToDevice, c.st));
  };
  auto timed = [&](auto&& f) {
    for (int i = 0; i < 2; ++i)
      f();
    std::vector<float> t;
    cudaEvent_t a, b;
    check(cudaEventCreate(&a));
    check(cudaEventCreate(&b));
    for (int i = 0; i < 5; ++i) {
      check(cudaEventRecord(a, c.st));
      f();
      check(cudaEventRecord(b, c.st));
      check(cudaEventSynchronize(b));
      float ms = 0;
      check(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    std::sort(t.begin(), t.end());
    return t[2];
  };
  std::printf("== eigensolvers on %dx%d BB^T (ms per matrix)\n", ell, ell);
  const float copy1 = timed([&] { reset(1); });
  std::printf("  copy of one matrix      %8.3f\n", copy1);
  std::printf("  syevd                   %8.3f\n",
              timed([&] {
                reset(1);
                cs(cusolverDnSsyevd(c.sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell,
                                    hw, ell, ws, c.work, c.lwork, c.info),
                   "syevd");
              }) - copy1);
  std::vector<float> ref(static_cast<std::size_t>(ell) * ell), got(ref.size());
  check(cudaMemcpy(ref.data(), hw, hbytes, cudaMemcpyDeviceToHost));
  // Subspace agreement of the top r: ‖V_refᵀ V_got‖_F² / r (1 = same subspace).
  auto agreement = [&](const float* dev) {
    check(cudaMemcpy(got.data(), dev, hbytes, cudaMemcpyDeviceToHost));
    double s = 0;
    for (int i = ell - r; i < ell; ++i)
      for (int j = ell - r; j < ell; ++j) {
        double d = 0;
        for (int q = 0; q < ell; ++q)
          d += static_cast<double>(ref[static_cast<std::size_t>(i) * ell + q]) *
               got[static_cast<std::size_t>(j) * ell + q];
        s += d * d;
      }
    return s / r;
  };
  for (double tol : {1e-7, 1e-5, 1e-4}) {
    for (int sweeps : {15, 100}) {
      syevjInfo_t pj;
      cs(cusolverDnCreateSyevjInfo(&pj), "syevjinfo");
      cs(cusolverDnXsyevjSetTolerance(pj, tol), "tol");
      cs(cusolverDnXsyevjSetMaxSweeps(pj, sweeps), "sweeps");
      int lwj = 0;
      cs(cusolverDnSsyevj_bufferSize(c.sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell,
                                     hw, ell, ws, &lwj, pj),
         "bs");
      float* wj = nullptr;
      check(cudaMalloc(&wj, static_cast<std::size_t>(lwj) * 4));
      const float t = timed([&] {
        reset(1);
        cs(cusolverDnSsyevj(c.sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell, hw, ell,
                            ws, wj, lwj, c.info, pj),
           "syevj");
      });
      int executed = 0;
      double resid = 0;
      cs(cusolverDnXsyevjGetSweeps(c.sol, pj, &executed), "get");
      cs(cusolverDnXsyevjGetResidual(c.sol, pj, &resid), "get");
      std::printf("  syevj tol %.0e max %3d  %8.3f  (sweeps %d, residual %.2e, agreement %.7f)\n",
                  tol, sweeps, t - copy1, executed, resid, agreement(hw));
      check(cudaFree(wj));
      cusolverDnDestroySyevjInfo(pj);
    }
  }
  cusolverDnParams_t prm;
  cs(cusolverDnCreateParams(&prm), "params");
  for (int batch : {8, 24, 168}) {
    std::size_t dbytes = 0, hb = 0;
    const cusolverStatus_t st = cusolverDnXsyevBatched_bufferSize(
        c.sol, prm, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, ell, CUDA_R_32F, hw, ell,
        CUDA_R_32F, ws, CUDA_R_32F, &dbytes, &hb, batch);
    if (st != CUSOLVER_STATUS_SUCCESS) {
      std::printf("  XsyevBatched batch %d: bufferSize status %d\n", batch, static_cast<int>(st));
      continue;
    }
    void* dw = nullptr;
    check(cudaMalloc(&dw, std::max<std::size_t>(dbytes, 16)));
    std::vector<char> hwork(std::max<std::size_t>(hb, 16));
    int* infos = nullptr;
    check(cudaMalloc(&infos, static_cast<std::size_t>(batch) * 4));
    const float copyb = timed([&] { reset(batch); });
    cusolverStatus_t last = CUSOLVER_STATUS_SUCCESS;
    const float t = timed([&] {
      reset(batch);
      last = cusolverDnXsyevBatched(c.sol, prm, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                    ell, CUDA_R_32F, hw, ell, CUDA_R_32F, ws, CUDA_R_32F, dw,
                                    dbytes, hwork.data(), hb, infos, batch);
    });
    std::printf("  XsyevBatched batch %3d  %8.3f  (status %d, %.1f MB work, agreement %.7f)\n",
                batch, (t - copyb) / batch, static_cast<int>(last), dbytes / 1e6,
                last == CUSOLVER_STATUS_SUCCESS ? agreement(hw) : -1.0);
    check(cudaFree(dw));
    check(cudaFree(infos));
  }

  std::printf("== Cholesky-QR pieces, ms per matrix\n");
  std::printf(
      "  potrf %d                %8.3f\n", ell,
      timed([&] {
        reset(1);
        cs(cusolverDnSpotrf(c.sol, CUBLAS_FILL_MODE_UPPER, ell, hw, ell, c.work, c.lwork, c.info),
           "potrf");
      }) - copy1);
  {
    const int batch = 24;
    std::vector<float*> hp(batch);
    for (int k = 0; k < batch; ++k)
      hp[k] = hw + static_cast<long>(k) * ell * ell;
    float** dp = nullptr;
    int* infos = nullptr;
    check(cudaMalloc(&dp, batch * sizeof(float*)));
    check(cudaMalloc(&infos, batch * 4));
    check(cudaMemcpy(dp, hp.data(), batch * sizeof(float*), cudaMemcpyHostToDevice));
    const float copyb = timed([&] { reset(batch); });
    const float t = timed([&] {
      reset(batch);
      cs(cusolverDnSpotrfBatched(c.sol, CUBLAS_FILL_MODE_UPPER, ell, dp, ell, infos, batch),
         "potrfBatched");
    });
    std::printf("  potrfBatched x%d        %8.3f\n", batch, (t - copyb) / batch);
    // trsm against trtri + GEMM, on X (2048 × ell) and (5461 × ell) with R from potrf.
    for (int n : {2048, 5461}) {
      const float one = 1.0f;
      const float ttrsm = timed([&] {
        cb(cublasStrsm(c.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                       CUBLAS_DIAG_NON_UNIT, n, ell, &one, hw, ell, c.z, n),
           "trsm");
      });
      const float tg =
          timed([&] { gemm(c.blas, false, false, n, ell, ell, c.z, n, hw, ell, c.y, n, false); });
      const float tgt =
          timed([&] { gemm(c.blas, false, false, n, ell, ell, c.z, n, hw, ell, c.y, n, true); });
      std::printf("  trsm %5d x %d         %8.3f   (fp32 GEMM same shape %.3f, tf32 %.3f)\n", n,
                  ell, ttrsm, tg, tgt);
      if (n == 2048) {
        std::vector<float*> xp(batch);
        for (int k = 0; k < batch; ++k)
          xp[k] = c.z;  // same X: a timing of the call only
        float** dx = nullptr;
        check(cudaMalloc(&dx, batch * sizeof(float*)));
        check(cudaMemcpy(dx, xp.data(), batch * sizeof(float*), cudaMemcpyHostToDevice));
        const float tb = timed([&] {
          cb(cublasStrsmBatched(c.blas, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N,
                                CUBLAS_DIAG_NON_UNIT, n, ell, &one, dp, ell, dx, n, batch),
             "trsmBatched");
        });
        std::printf("  trsmBatched x%d %d     %8.3f\n", batch, n, tb / batch);
        check(cudaFree(dx));
      }
    }
    check(cudaFree(dp));
    check(cudaFree(infos));
  }
  check(cudaDeviceSynchronize());
  return 0;
}
