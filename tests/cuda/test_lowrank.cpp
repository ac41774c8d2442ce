// MultiTensorLowRank (GaLore and SubTrack-Grad on cuBLAS/cuSOLVER) against the CPU optimizers.
// The steady step and the tracking step are compared with recipes::GaLore / recipes::SubTrack
// from the same state (the CPU's basis, moments and weights after its first step, uploaded), with
// TF32 off: the GEMMs sum in another order, so the bound is float rounding, not bits. The GPU's
// refresh is compared with the CPU's exact SVD to subspace accuracy (principal angles) and, the
// singular values being well separated, vector by vector under the canonical sign rule; its
// Philox test matrix is bit-identical to the CPU's. Robustness as the CPU optimizer's (a
// non-finite gradient skips its tensor, a failed refresh keeps the basis) and the steady step
// captured in a CUDA graph.
#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>
#include <slimgrad/backend/cuda/api.hpp>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

#include "device.hpp"

using namespace slimgrad;
using test::DeviceBuffer;

namespace {

struct Dims {
  index_t rows, cols;
};
// Right side (m ≥ n), left side (m < n), and a square one (right under std).
const std::vector<Dims> dims = {{96, 64}, {48, 80}, {64, 64}};

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    d = std::max(d, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return d;
}
double max_abs(const std::vector<float>& a) {
  double d = 0;
  for (float x : a)
    d = std::max(d, std::abs(static_cast<double>(x)));
  return d;
}

std::vector<float> field(const io::TensorFile& f, const std::string& name) {
  const auto it = f.tensors.find(name);
  REQUIRE(it != f.tensors.end());
  return it->second.to_f32();
}

/// Runs `steps` steps of the CPU optimizer `cpu` and of the GPU one, the GPU starting from the
/// CPU's state after its first step; checks weights, moments and bases after every step. At
/// step `nan_step` tensor 1's gradient holds a NaN and an Inf: both skip it.
template <class CpuOpt, class Transform>
void compare_with_cpu(typename CpuOpt::Options co,
                      typename cuda::MultiTensorLowRank<Transform>::Options go, int steps,
                      float grad_scale, double w_tol, double basis_tol,
                      io::TensorFile* after_cpu = nullptr, int nan_step = -1) {
  CpuOpt cpu(co);
  std::vector<std::vector<float>> w;
  std::vector<std::string> names;
  for (std::size_t k = 0; k < dims.size(); ++k) {
    w.push_back(test::random_floats(static_cast<std::size_t>(dims[k].rows * dims[k].cols),
                                    static_cast<std::uint32_t>(10 + k)));
    names.push_back("layer" + std::to_string(k) + ".weight");
  }
  auto grads = [&](int s) {
    std::vector<std::vector<float>> g;
    for (std::size_t k = 0; k < dims.size(); ++k)
      g.push_back(test::random_floats(
          static_cast<std::size_t>(dims[k].rows * dims[k].cols),
          static_cast<std::uint32_t>(1000 + 37 * static_cast<std::size_t>(s) + k), grad_scale));
    return g;
  };
  auto cpu_step = [&](const std::vector<std::vector<float>>& g) {
    std::vector<Param> params;
    for (std::size_t k = 0; k < dims.size(); ++k)
      params.push_back({names[k], host_view(w[k].data(), dims[k].rows, dims[k].cols),
                        host_view(g[k].data(), dims[k].rows, dims[k].cols)});
    return cpu.step(params);
  };
  REQUIRE(cpu_step(grads(0)).skipped.empty());

  // The GPU optimizer over the same tensors, from the CPU's state after step 1.
  test::DeviceTensors dev;
  for (std::size_t k = 0; k < dims.size(); ++k)
    dev.add(dims[k].rows, dims[k].cols, w[k], tensor_id(names[k]));
  test::WithWorkspace<cuda::MultiTensorLowRank<Transform>> engine(dev.tensors, go);
  auto& gpu = engine.engine;
  {
    const io::TensorFile f = cpu.to_checkpoint();
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const auto ki = static_cast<index_t>(k);
      const std::vector<float> basis = field(f, names[k] + "/basis");
      const Shape bs = gpu.basis_shape(ki);
      REQUIRE(basis.size() == static_cast<std::size_t>(bs.size()));
      gpu.write_basis(ki, basis.data());
      const std::vector<float> m = field(f, names[k] + "/m"), v = field(f, names[k] + "/v");
      REQUIRE(m.size() == static_cast<std::size_t>(gpu.coeff_shape(ki).size()));
      gpu.write_moments(ki, m.data(), v.data());
      if (go.limiter_gamma > 0) gpu.write_limiter(ki, field(f, names[k] + "/limiter")[0]);
    }
  }
  gpu.set_steps(1);
  CHECK(gpu.state_bytes() == cpu.state_bytes() - dims.size() * sizeof(std::int64_t));

  for (int s = 1; s < steps; ++s) {
    auto g = grads(s);
    if (s == nan_step) {
      g[1][7] = std::numeric_limits<float>::quiet_NaN();
      g[1][20] = -std::numeric_limits<float>::infinity();
    }
    for (std::size_t k = 0; k < dims.size(); ++k)
      dev.set_grad(k, g[k]);
    const StepReport rep = cpu_step(g);
    gpu.step(nullptr);
    test::cuda_check(cudaDeviceSynchronize(), "step");
    CAPTURE(s);
    if (s == nan_step) {
      REQUIRE(rep.skipped == std::vector<std::string>{names[1]});
      CHECK(gpu.last_skipped() == std::vector<index_t>{1});
    } else {
      REQUIRE(rep.skipped.empty());
      CHECK(gpu.last_skipped().empty());
    }
    const io::TensorFile f = cpu.to_checkpoint();
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const auto ki = static_cast<index_t>(k);
      CAPTURE(k);
      CAPTURE(s);
      CHECK(max_abs_diff(dev.weights(k), w[k]) <= w_tol);
      const std::vector<float> mc = field(f, names[k] + "/m"), vc = field(f, names[k] + "/v");
      std::vector<float> mg(mc.size()), vg(vc.size());
      gpu.read_moments(ki, mg.data(), vg.data());
      CHECK(max_abs_diff(mg, mc) <= 1e-4 * max_abs(mc));
      CHECK(max_abs_diff(vg, vc) <= 1e-4 * max_abs(vc));
      const std::vector<float> bc = field(f, names[k] + "/basis");
      std::vector<float> bg(bc.size());
      gpu.read_basis(ki, bg.data());
      CHECK(max_abs_diff(bg, bc) <= basis_tol);
      if (go.limiter_gamma > 0) {
        const float lc = field(f, names[k] + "/limiter")[0];
        CHECK(lc > 0.0f);
        CHECK(std::abs(gpu.read_limiter(ki) - lc) <= 1e-5f * lc);
      }
    }
  }
  for (std::size_t k = 0; k < dims.size(); ++k)
    CHECK(gpu.tensor_steps(static_cast<index_t>(k)) == cpu.step_count(names[k]));
  if (after_cpu) *after_cpu = cpu.to_checkpoint();
}

/// S (dim0×r, column-major doubles) from a stored basis (m×r on the left, r×n on the right).
Eigen::MatrixXd basis_matrix(const std::vector<float>& stored, Side side, index_t dim0, index_t r) {
  Eigen::MatrixXd s(dim0, r);
  for (index_t i = 0; i < dim0; ++i)
    for (index_t j = 0; j < r; ++j)
      s(i, j) = side == Side::left ? stored[static_cast<std::size_t>(i * r + j)]
                                   : stored[static_cast<std::size_t>(j * dim0 + i)];
  return s;
}

}  // namespace

TEST_CASE("cuda galore: the projected Adam step matches the CPU galore optimizer") {
  auto co = recipes::galore_options();
  co.rule.weight_decay = 0.1;  // exercise the decay folded into the update GEMM
  co.transform.rank = 8;
  co.transform.update_gap = 1000;  // the basis stays the CPU's
  co.fallback = {.min_dim = 1, .max_aspect = 1e9, .min_size = 0};
  cuda::MultiTensorLowRank<transforms::SvdProjection>::Options go;
  go.rule = co.rule;
  go.transform = co.transform;
  go.scale = co.residual.scale;
  go.tf32 = false;
  go.lanes = 2;
  // Weights ~1: float rounding of the products bounds the difference at a few ulps of 1.
  compare_with_cpu<recipes::GaLore<>, transforms::SvdProjection>(co, go, 5, 1.0f, 2e-6, 0.0);
  // A non-finite gradient skips its tensor (no decay either); its own step count then sets its
  // bias corrections.
  compare_with_cpu<recipes::GaLore<>, transforms::SvdProjection>(co, go, 6, 1.0f, 2e-6, 0.0,
                                                                 nullptr, 2);
}

TEST_CASE("cuda galore: torch-convention decay before the step, one GEMM per tensor") {
  auto co = recipes::galore_options();
  co.rule.weight_decay = 0.05;
  co.rule.convention = optim::AdamConvention::torch;
  co.rule.eps = 1e-8;
  co.transform.rank = 5;
  co.transform.update_gap = 1000;
  co.fallback = {.min_dim = 1, .max_aspect = 1e9, .min_size = 0};
  cuda::MultiTensorLowRank<transforms::SvdProjection>::Options go;
  go.rule = co.rule;
  go.transform = co.transform;
  go.scale = co.residual.scale;
  go.tf32 = false;
  go.lanes = 1;
  go.batched = false;  // one GEMM per tensor
  compare_with_cpu<recipes::GaLore<>, transforms::SvdProjection>(co, go, 3, 1.0f, 2e-6, 0.0);
  // The skip with one GEMM per tensor, and the decay before the step (the sink takes it).
  compare_with_cpu<recipes::GaLore<>, transforms::SvdProjection>(co, go, 5, 1.0f, 2e-6, 0.0,
                                                                 nullptr, 1);
}

TEST_CASE("cuda subtrack++: recovery scaling with its limiter matches the CPU") {
  auto co = recipes::subtrack_options(true);
  co.residual.projection_aware = false;
  co.transform.rank = 8;
  co.transform.update_gap = 2;  // tracking at k = 2 and k = 4
  co.transform.eta = 5.0;
  co.rule.weight_decay = 0.01;
  co.fallback = {.min_dim = 1, .max_aspect = 1e9, .min_size = 0};
  cuda::MultiTensorLowRank<transforms::Grassmann>::Options go;
  go.rule = co.rule;
  go.transform = co.transform;
  go.scale = co.residual.scale;
  go.recovery_scaling = true;
  go.limiter_gamma = co.residual.limiter_gamma;
  go.tf32 = false;
  go.lanes = 2;
  // lr·Λ is about 1e-4 per weight and step (φ ≈ 4, G ≈ 0.03): 50× the weights' tolerance.
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 6, 0.05f, 2e-6, 2e-5);
  // A NaN step after the tracking at k = 2 skips tensor 1 (weights, moments and limiter kept).
  // (Not further: the CPU's schedule then follows the tensor's own count, the GPU's steps().)
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 4, 0.05f, 2e-6, 2e-5,
                                                               nullptr, 3);
  // GaLore with Fira-style recovery (the same residual on the SVD projection).
  auto cg = recipes::galore_options();
  cg.transform.rank = 8;
  cg.transform.update_gap = 1000;
  cg.fallback = co.fallback;
  cuda::MultiTensorLowRank<transforms::SvdProjection>::Options gg;
  gg.rule = cg.rule;
  gg.transform = cg.transform;
  gg.scale = cg.residual.scale;
  gg.tf32 = false;
  gg.lanes = 1;
  gg.recovery_scaling = true;
  gg.limiter_gamma = 1.01;
  using Fira = Optimizer<optim::Adam, transforms::SvdProjection, state::Fp32, backend::cpu,
                         residual::Recovery>;
  Fira::Options fo;
  fo.rule = cg.rule;
  fo.transform = cg.transform;
  fo.fallback = cg.fallback;
  fo.residual.scale = cg.residual.scale;
  fo.residual.recovery_scaling = true;
  fo.residual.limiter_gamma = 1.01;
  compare_with_cpu<Fira, transforms::SvdProjection>(fo, gg, 4, 0.05f, 2e-6, 0.0);
}

TEST_CASE("cuda subtrack++: projection-aware moments rotate into the tracked basis as the CPU's") {
  auto co = recipes::subtrack_options(true);
  REQUIRE(co.residual.projection_aware);
  co.transform.rank = 8;
  co.transform.update_gap = 2;  // tracking (and the rotation) at k = 2 and k = 4
  co.transform.eta = 5.0;
  co.rule.weight_decay = 0.01;
  co.fallback = {.min_dim = 1, .max_aspect = 1e9, .min_size = 0};
  cuda::MultiTensorLowRank<transforms::Grassmann>::Options go;
  go.rule = co.rule;
  go.transform = co.transform;
  go.scale = co.residual.scale;
  go.recovery_scaling = true;
  go.limiter_gamma = co.residual.limiter_gamma;
  go.projection_aware = true;
  go.tf32 = false;
  go.lanes = 2;
  // Moments to 1e-4 of their largest (compare_with_cpu), weights and bases as without rotation.
  io::TensorFile rotated;
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 6, 0.05f, 2e-6, 2e-5,
                                                               &rotated);
  // The comparison can fail: the CPU without the rotation ends with other moments, far beyond
  // that tolerance (the bases turned by more than 0.05 rad at each tracking step).
  {
    auto plain = co;
    plain.residual.projection_aware = false;
    io::TensorFile unrotated;
    auto gp = go;
    gp.projection_aware = false;
    compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(plain, gp, 6, 0.05f, 2e-6, 2e-5,
                                                                 &unrotated);
    for (std::size_t k = 0; k < dims.size(); ++k) {
      const std::string n = "layer" + std::to_string(k) + ".weight";
      const std::vector<float> a = field(rotated, n + "/v"), b = field(unrotated, n + "/v");
      CAPTURE(k);
      CHECK(max_abs_diff(a, b) > 1e-2 * max_abs(a));
    }
  }
  // A NaN step after the rotation at k = 2 skips tensor 1 (moments kept, not rotated).
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 4, 0.05f, 2e-6, 2e-5,
                                                               nullptr, 3);
  // One GEMM per tensor, one lane, no reorthonormalisation after the tracking steps.
  co.transform.reorth_every = 0;
  go.transform = co.transform;
  go.batched = false;
  go.lanes = 1;
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 5, 0.05f, 2e-6, 2e-5);
  // GaLore's refresh reports no rotation on the GPU: refused (and accepted without the flag).
  using Galore = cuda::MultiTensorLowRank<transforms::SvdProjection>;
  Galore::Options gg;
  gg.transform.rank = 8;
  test::DeviceTensors one;
  one.add(16, 16);
  CHECK_NOTHROW(test::WithWorkspace<Galore>(one.tensors, gg));
  gg.projection_aware = true;
  CHECK_THROWS_AS(test::WithWorkspace<Galore>(one.tensors, gg), Error);
}

TEST_CASE("cuda subtrack: the geodesic tracking step and the steps around it match the CPU") {
  auto co = recipes::subtrack_options();
  co.transform.rank = 8;
  co.transform.update_gap = 2;  // tracking at k = 2 and k = 4
  co.transform.eta = 5.0;
  co.rule.weight_decay = 0.01;
  co.fallback = {.min_dim = 1, .max_aspect = 1e9, .min_size = 0};
  cuda::MultiTensorLowRank<transforms::Grassmann>::Options go;
  go.rule = co.rule;
  go.transform = co.transform;
  go.scale = co.residual.scale;
  go.tf32 = false;
  go.lanes = 3;
  io::TensorFile f;
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 6, 0.05f, 2e-6, 2e-5, &f);
  // The test means something only if the basis really turned.
  for (std::size_t k = 0; k < dims.size(); ++k) {
    const std::string n = "layer" + std::to_string(k) + ".weight";
    const auto it = f.tensors.find(n + "/last_angle");
    REQUIRE(it != f.tensors.end());
    const double angle = it->second.values<double>(io::Dtype::F64)[0];
    MESSAGE(n << ": last tracking angle " << angle << " rad");
    CHECK(angle > 0.05);
  }
  // A non-finite gradient at a tracking step: the tensor keeps its basis, the others track.
  // (Not further: the CPU's schedule then follows the tensor's own count, the GPU's steps().)
  compare_with_cpu<recipes::SubTrack<>, transforms::Grassmann>(co, go, 3, 0.05f, 2e-6, 2e-5,
                                                               nullptr, 2);
}

TEST_CASE("cuda galore refresh: the subspace of the CPU's exact SVD, Philox's test matrix") {
  const index_t r = 10;
  for (const Dims d : std::vector<Dims>{{200, 120}, {90, 150}}) {
    CAPTURE(d.rows);
    // G = U diag(s) Vᵀ + small noise: well separated top singular values, a gap after r.
    const index_t k = std::min(d.rows, d.cols);
    Eigen::MatrixXf u(d.rows, k), v(d.cols, k);
    for (index_t i = 0; i < u.size(); ++i)
      u.data()[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i)) +
                                       std::cos(1.3 * static_cast<double>(i * i)));
    for (index_t i = 0; i < v.size(); ++i)
      v.data()[i] = static_cast<float>(std::cos(0.71 * static_cast<double>(i)) +
                                       std::sin(0.9 * static_cast<double>(i * i)));
    u = Eigen::HouseholderQR<Eigen::MatrixXf>(u).householderQ() *
        Eigen::MatrixXf::Identity(d.rows, k);
    v = Eigen::HouseholderQR<Eigen::MatrixXf>(v).householderQ() *
        Eigen::MatrixXf::Identity(d.cols, k);
    Eigen::VectorXf s(k);
    for (index_t i = 0; i < k; ++i)
      s[i] = i < r ? 10.0f * std::pow(0.8f, static_cast<float>(i))
                   : 0.05f / (1.0f + 0.1f * static_cast<float>(i));
    const cpu::RowMatrix g = u * s.asDiagonal() * v.transpose();
    const std::vector<float> gv(g.data(), g.data() + g.size());

    test::DeviceTensors dev;
    dev.add(d.rows, d.cols, {}, 77);
    dev.set_grad(0, gv);
    const cuda::Tensor t = dev.tensors[0];
    const Side side = side_for({d.rows, d.cols});
    const index_t dim0 = projected_dim({d.rows, d.cols}, side);
    cpu::ColMatrix ucpu;
    REQUIRE(cpu::exact_top_singular_vectors(host_view(gv.data(), d.rows, d.cols), side, r, ucpu) ==
            transforms::RefreshFailure::none);
    const Eigen::MatrixXd sc = ucpu.cast<double>();

    for (const auto method : {transforms::SvdMethod::randomized, transforms::SvdMethod::exact}) {
      for (const bool tf32 : {false, true}) {
        CAPTURE(static_cast<int>(method));
        CAPTURE(tf32);
        cuda::MultiTensorLowRank<transforms::SvdProjection>::Options o;
        o.transform.rank = r;
        o.transform.method = method;
        o.transform.seed = 5;
        o.tf32 = tf32;
        o.lanes = 1;
        // Three tensors with this gradient (own Philox streams), batched eigensolver calls of
        // two: a batch of two and one of one.
        o.refresh_batch = 2;
        std::vector<cuda::Tensor> ts{t, t, t};
        ts[1].id = 78;
        ts[2].id = 79;
        test::WithWorkspace<cuda::MultiTensorLowRank<transforms::SvdProjection>> engine(ts, o);
        auto& gpu = engine.engine;
        REQUIRE(gpu.refresh_due());
        gpu.refresh(nullptr);
        for (index_t q = 0; q < 3; ++q) {
          CAPTURE(q);
          CHECK(gpu.refresh_status(q) ==
                std::pair{transforms::RefreshStatus::ok, transforms::RefreshFailure::none});
          std::vector<float> stored(static_cast<std::size_t>(r * dim0));
          gpu.read_basis(q, stored.data());
          const Eigen::MatrixXd sg = basis_matrix(stored, side, dim0, r);
          // Orthonormal, and the principal angles with the CPU's subspace are small.
          CHECK((sg.transpose() * sg - Eigen::MatrixXd::Identity(r, r)).norm() < 1e-4);
          // sin of the largest principal angle = ‖(I − S_cpu S_cpuᵀ) S_gpu‖₂ (accurate where
          // the cosines' form √(1 − cos²) is not).
          const Eigen::MatrixXd resid = sg - sc * (sc.transpose() * sg);
          const double sin_max = Eigen::JacobiSVD<Eigen::MatrixXd>(resid).singularValues()(0);
          MESSAGE("largest principal angle sine " << sin_max);
          CHECK(sin_max < (tf32 ? 1e-2 : 1e-4));
          // Vector by vector, canonical signs: the same singular vectors.
          CHECK((sg - sc).cwiseAbs().maxCoeff() < (tf32 ? 2e-2 : 2e-3));
        }
      }
    }
    // The refresh's test matrix: Philox keyed (seed, id, k / T) over dim1 × ℓ, the CPU's bits.
    const index_t dim1 = side == Side::left ? d.cols : d.rows;
    const index_t ell = transforms::SvdProjection::sketch_width({d.rows, d.cols}, r, 10);
    const random::Key key{5, 77, 0};
    std::vector<float> host(static_cast<std::size_t>(dim1 * ell));
    random::fill_gaussian(host_view(host.data(), dim1, ell), key, 1.0);
    DeviceBuffer om(host.size() * 4);
    cuda::fill_gaussian(device_view(om.as<float>(), dim1, ell), key, 1.0, nullptr);
    CHECK(test::max_ulp(test::download<float>(om.ptr, host.size()), host) == 0);
  }
}

TEST_CASE("cuda galore: arguments are checked before anything happens") {
  DeviceBuffer a(64 * 64 * 4), b(64 * 64 * 4);
  cuda::Tensor t;
  t.weight = a.ptr;
  t.grad = b.ptr;
  t.rows = 64;
  t.cols = 4;  // smaller than the rank
  cuda::MultiTensorLowRank<transforms::SvdProjection>::Options o;
  o.transform.rank = 8;
  const std::vector<cuda::Tensor> ts{t};
  DeviceBuffer ws(1 << 20);
  CHECK_THROWS_AS(
      cuda::MultiTensorLowRank<transforms::SvdProjection>(ts, o, ws.ptr, 1 << 20, nullptr), Error);
  t.cols = 64;
  const std::vector<cuda::Tensor> ok{t};
  CHECK_THROWS_AS(cuda::MultiTensorLowRank<transforms::SvdProjection>(ok, o, ws.ptr, 16, nullptr),
                  Error);
}

namespace {
/// One tensor under `o`: refreshes (first step) from a normal gradient, then from `bad` at the
/// next due step; returns the stored basis before and after and the last refresh status.
template <class Transform>
void refresh_failure_case(typename cuda::MultiTensorLowRank<Transform>::Options o,
                          const std::vector<float>& bad, index_t rows, index_t cols,
                          transforms::RefreshStatus want_status,
                          transforms::RefreshFailure want_failure) {
  const auto n = static_cast<std::size_t>(rows * cols);
  test::DeviceTensors dev;
  dev.add(rows, cols, test::random_floats(n, 3), 9);
  dev.set_grad(0, test::random_floats(n, 4));
  test::WithWorkspace<cuda::MultiTensorLowRank<Transform>> engine(dev.tensors, o);
  auto& gpu = engine.engine;
  gpu.step(nullptr);  // k = 0: the first refresh
  CHECK(gpu.refresh_status(0).first == transforms::RefreshStatus::ok);
  const Shape bs = gpu.basis_shape(0);
  std::vector<float> before(static_cast<std::size_t>(bs.size())), after(before.size());
  gpu.read_basis(0, before.data());
  while (!gpu.refresh_due())
    gpu.step(nullptr);
  dev.set_grad(0, bad);
  gpu.step(nullptr);
  const auto [st, fail] = gpu.refresh_status(0);
  CHECK(st == want_status);
  if (want_failure == transforms::RefreshFailure::none)
    CHECK(fail == want_failure);
  else  // which breakdown comes first is the solver's business
    CHECK(fail != transforms::RefreshFailure::none);
  MESSAGE("refresh status " << std::string(transforms::to_string(st)) << ", "
                            << std::string(transforms::to_string(fail)));
  gpu.read_basis(0, after.data());
  CHECK(test::max_ulp(after, before) == 0);
}
}  // namespace

TEST_CASE("cuda galore/subtrack: a failed refresh keeps the basis, a first one gets the identity") {
  using transforms::RefreshFailure;
  using transforms::RefreshStatus;
  const index_t rows = 64, cols = 48, r = 6;
  const auto n = static_cast<std::size_t>(rows * cols);
  std::vector<float> nan_grad = test::random_floats(n, 5);
  nan_grad[11] = std::numeric_limits<float>::quiet_NaN();
  // Finite, but its Gram overflows: the factorisation (or the eigensolver, or the tracking's
  // BᵀB) breaks down or returns non-finite vectors.
  std::vector<float> huge = test::random_floats(n, 6, 3e37f);
  for (const auto method : {transforms::SvdMethod::randomized, transforms::SvdMethod::exact}) {
    CAPTURE(static_cast<int>(method));
    cuda::MultiTensorLowRank<transforms::SvdProjection>::Options o;
    o.transform.rank = r;
    o.transform.update_gap = 2;
    o.transform.method = method;
    o.rule.weight_decay = 0.1;
    o.lanes = 1;
    // A skipped tensor keeps its basis and the status of its last refresh.
    refresh_failure_case<transforms::SvdProjection>(o, nan_grad, rows, cols, RefreshStatus::ok,
                                                    RefreshFailure::none);
    {
      using Gpu = test::WithWorkspace<cuda::MultiTensorLowRank<transforms::SvdProjection>>;
      test::DeviceTensors dev;
      dev.add(rows, cols, test::random_floats(n, 3));
      dev.set_grad(0, huge);
      Gpu engine(dev.tensors, o);
      auto& gpu = engine.engine;
      gpu.refresh(nullptr);  // no basis yet: the identity, never a non-finite one
      const auto [st, fail] = gpu.refresh_status(0);
      CHECK(st == RefreshStatus::identity_basis);
      CHECK(fail != RefreshFailure::none);
      std::vector<float> b(static_cast<std::size_t>(gpu.basis_shape(0).size()));
      gpu.read_basis(0, b.data());
      const Side side = gpu.side(0);
      const index_t dim0 = projected_dim({rows, cols}, side);
      for (index_t i = 0; i < dim0; ++i)
        for (index_t j = 0; j < r; ++j)
          CHECK(b[static_cast<std::size_t>(side == Side::left ? i * r + j : j * dim0 + i)] ==
                (i == j ? 1.0f : 0.0f));
      // The same with a NaN: the reason is the gradient.
      dev.set_grad(0, nan_grad);
      Gpu fresh_engine(dev.tensors, o);
      auto& fresh = fresh_engine.engine;
      fresh.step(nullptr);
      CHECK(fresh.refresh_status(0) ==
            std::pair{RefreshStatus::identity_basis, RefreshFailure::non_finite_gradient});
      CHECK(fresh.last_skipped() == std::vector<index_t>{0});
      CHECK(fresh.tensor_steps(0) == 0);
      CHECK(dev.weights(0) == test::random_floats(n, 3));
    }
    refresh_failure_case<transforms::SvdProjection>(
        o, huge, rows, cols, RefreshStatus::kept_previous, RefreshFailure::non_finite_result);
  }
  cuda::MultiTensorLowRank<transforms::Grassmann>::Options g;
  g.transform.rank = r;
  g.transform.update_gap = 2;
  g.transform.eta = 1.0;
  g.lanes = 1;
  refresh_failure_case<transforms::Grassmann>(g, nan_grad, rows, cols, RefreshStatus::ok,
                                              RefreshFailure::none);
  refresh_failure_case<transforms::Grassmann>(g, huge, rows, cols, RefreshStatus::kept_previous,
                                              RefreshFailure::non_finite_result);
}

TEST_CASE("cuda galore: the steady step captured in a CUDA graph replays as direct steps") {
  // Direct steps with set_lr() against one capture of step(stream, device_scalars) replayed
  // with scalars(t) written before each replay: the same bits, with a changing learning rate
  // and a non-finite gradient (the skip, and the lagging tensor's own t, inside the graph).
  const std::vector<Dims> ds = {{96, 64}, {48, 80}, {96, 64}};
  const std::vector<double> lrs = {1e-3, 5e-4, 2e-3, 0.0, 7e-4, 3e-4};
  const int nan_step = 2;
  cudaStream_t stream = nullptr;
  test::cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
  using Gpu = cuda::MultiTensorLowRank<transforms::SvdProjection>;
  for (const bool batched : {true, false}) {
    CAPTURE(batched);
    Gpu::Options o;
    o.rule = recipes::galore_options().rule;
    o.rule.weight_decay = 0.1;
    o.transform.rank = 4;
    o.transform.update_gap = 1000;
    o.lanes = 2;
    o.batched = batched;
    o.tf32 = false;
    std::vector<std::vector<float>> result[2];
    for (const bool graph : {false, true}) {
      test::DeviceTensors dev;
      for (std::size_t k = 0; k < ds.size(); ++k)
        dev.add(ds[k].rows, ds[k].cols,
                test::random_floats(static_cast<std::size_t>(ds[k].rows * ds[k].cols),
                                    static_cast<std::uint32_t>(k + 1)),
                50 + k);
      auto set_grads = [&](int step) {
        for (std::size_t k = 0; k < ds.size(); ++k) {
          const auto n = static_cast<std::size_t>(ds[k].rows * ds[k].cols);
          auto g = test::random_floats(
              n, static_cast<std::uint32_t>(100 * static_cast<std::size_t>(step) + k), 0.1f);
          if (step == nan_step && k == 1) g[3] = std::numeric_limits<float>::infinity();
          dev.set_grad(k, g);
        }
      };
      test::WithWorkspace<Gpu> engine(dev.tensors, o, stream);
      auto& gpu = engine.engine;
      gpu.set_lr(lrs[0]);
      set_grads(0);
      gpu.step(stream);  // the refresh step, outside any graph
      test::cuda_check(cudaStreamSynchronize(stream), "sync");
      DeviceBuffer dsc(sizeof(cuda::StepScalars));
      cudaGraphExec_t exec = nullptr;
      cudaGraph_t g = nullptr;
      if (graph) {
        test::cuda_check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "capture");
        gpu.step(stream, static_cast<const cuda::StepScalars*>(dsc.ptr));
        test::cuda_check(cudaStreamEndCapture(stream, &g), "end capture");
        test::cuda_check(cudaGraphInstantiate(&exec, g, 0), "instantiate");
      }
      for (std::size_t i = 1; i < lrs.size(); ++i) {
        set_grads(static_cast<int>(i));
        gpu.set_lr(lrs[i]);
        if (graph) {
          const cuda::StepScalars sc = gpu.scalars(static_cast<std::int64_t>(i) + 1);
          test::cuda_check(cudaMemcpy(dsc.ptr, &sc, sizeof(sc), cudaMemcpyHostToDevice), "sc");
          test::cuda_check(cudaGraphLaunch(exec, stream), "launch");
        } else {
          gpu.step(stream);
        }
        test::cuda_check(cudaStreamSynchronize(stream), "sync");
        CHECK(gpu.last_skipped() ==
              (static_cast<int>(i) == nan_step ? std::vector<index_t>{1} : std::vector<index_t>{}));
      }
      if (graph) {
        CHECK_THROWS_AS(gpu.step(stream, nullptr), Error);
        gpu.set_steps(static_cast<std::int64_t>(lrs.size()));
        test::cuda_check(cudaGraphExecDestroy(exec), "destroy");
        test::cuda_check(cudaGraphDestroy(g), "destroy");
      }
      CHECK(gpu.tensor_steps(1) == static_cast<std::int64_t>(lrs.size()) - 1);
      for (std::size_t k = 0; k < ds.size(); ++k)
        result[graph].push_back(dev.weights(k));
    }
    // The replay's update GEMM reads α', β from device memory (CUBLAS_POINTER_MODE_DEVICE),
    // where cuBLAS may pick another kernel than for host scalars: a few ulps, while stale
    // scalars (another lr, another t) would be off by far more.
    for (std::size_t k = 0; k < ds.size(); ++k) {
      const std::int64_t ulp = test::max_ulp(result[1][k], result[0][k]);
      MESSAGE("tensor " << k << ": graph vs direct, max " << ulp << " ulp");
      CHECK(ulp <= 4);
    }
  }
  test::cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}
