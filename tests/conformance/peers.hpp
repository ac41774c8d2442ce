// The conformance suite against the peers' reference data, written once for every backend: the
// cases of tests/data/optim_reference.safetensors (tests/reference/gen_optim.py) that both
// backends implement — torch.optim.AdamW, bitsandbytes' blockwise 8-bit Adam, GWT's WaveAdamW
// step and the official GaLore AdamW — replayed through recipes::X<Backend> and compared with
// the peer's final weights. tests/optim instantiates it for backend::cpu (with the CPU-only
// peers, Adafactor and APOLLO, in test_peers.cpp), tests/cuda for backend::cuda.
//
// A test that instantiates the cases for another backend first specialises Harness<Backend>
// (see Harness<backend::cpu> below for the contract): how to build an optimizer and how to run
// steps on the backend's memory.
//
// Tolerances, the same on both backends. Both sides compute in float32 with the same operations
// in nearly the same order, but not bit for bit: torch's addcdiv computes (value·m)/d where we
// compute value·(m/d), norms are accumulated in float by torch and in double here, scalars are
// rounded at different points. Each step can then move a weight by a few units in the last place
// of the largest weight, and the differences add up over the K steps. The bound is
//     max |w − w_peer| ≤ c · K · u · max |w_peer|,   u = 2^-23 (one ulp of a float in [1, 2)),
// per parameter, with c = 4 for the elementwise rules (AdamW, 8-bit Adam, GWT) and c = 8 for
// GaLore, whose basis also carries the SVD's error: its vectors are accurate to about
// 2^-24·σ1/gap ≲ 1e-6 on these gradients (singular values decay by 0.7 per index, so gap/σ1 ≥
// 0.1 at rank 4), and a basis error δ moves a step by about lr·α·δ, far below one ulp of the
// weights. On the GPU the Adam, 8-bit and GWT kernels reproduce the CPU's element math (built
// with -fmad=false; the GWT limiter's norm is summed in another order), so the same c holds;
// GaLore's exact refresh there is an fp32 eigensolve of the Gram matrix ĜĜᵀ, whose basis error
// ~2^-24·σ1²/(σr² − σr+1²) ≈ 1e-6 at rank 4 is of the same order, with the GEMMs in plain fp32
// (DeviceOptions::tf32 off: TF32's 10-bit products would move a step by ~1e-3 of itself).
// For 8-bit Adam the bound also means that every 8-bit code matched: one code apart is about 1%
// of a moment, hundreds of ulp of the weight after a few steps. Each tolerance must be able to
// fail: the last case replays cases with one semantic detail changed and requires the comparison
// to fail.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

namespace slimgrad::conformance {

using json = nlohmann::json;

// The data folder: $SLIMGRAD_TEST_DATA_DIR when set (a test binary run away from its source
// tree, e.g. on the GPU machine), else the source tree's tests/data.
inline const io::TensorFile& reference() {
  static const io::TensorFile file = [] {
    const char* dir = std::getenv("SLIMGRAD_TEST_DATA_DIR");
    return io::read(std::string(dir ? dir : SLIMGRAD_TEST_DATA_DIR) +
                    "/optim_reference.safetensors");
  }();
  return file;
}

inline json case_meta(const std::string& name) {
  return json::parse(reference().metadata.at("case." + name));
}

struct Matrix {
  std::vector<float> v;
  index_t rows = 0, cols = 0;
};

inline Matrix load(const std::string& name) {
  const io::Tensor& t = reference().at(name);
  Matrix m;
  m.v = t.to_f32();
  m.rows = t.shape.size() == 2 ? t.shape[0] : 1;
  m.cols = t.shape.back();
  return m;
}

/// How a backend runs the suite. A specialisation provides
///   template <class Opt> static Opt make(const typename Opt::Options&);
///   template <class Opt> static void run(Opt&, names, std::vector<Matrix>& w, int steps, grads);
/// where run() takes `steps` steps from the weights w (which receive the final weights) with
/// grads(k) giving step k's gradients (one Matrix per name), and requires every parameter to
/// step; and fused_variants, the values of Options::fused worth running.
template <class Backend>
struct Harness;

template <>
struct Harness<backend::cpu> {
  static constexpr bool fused_variants[] = {true, false};
  template <class Opt>
  static Opt make(const typename Opt::Options& o) {
    return Opt(o);
  }
  template <class Opt, class Grads>
  static void run(Opt& opt, const std::vector<std::string>& names, std::vector<Matrix>& w,
                  int steps, const Grads& grads) {
    for (int k = 0; k < steps; ++k) {
      const std::vector<Matrix> g = grads(k);
      std::vector<Param> params;
      for (std::size_t i = 0; i < names.size(); ++i)
        params.push_back({names[i], host_view(w[i].v.data(), w[i].rows, w[i].cols),
                          host_view<const float>(g[i].v.data(), g[i].rows, g[i].cols)});
      const StepReport rep = opt.step(params);
      REQUIRE(rep.stepped == static_cast<index_t>(names.size()));
    }
  }
};

// One parameter's outcome: max |w − w_peer| and max |w_peer|.
struct Outcome {
  std::string param;
  double max_dev = 0, max_ref = 0;
};

// Replays case `c` through `opt` and returns the deviation of every parameter.
template <class Backend, class Opt>
std::vector<Outcome> replay(Opt& opt, const std::string& c) {
  const json meta = case_meta(c);
  const int steps = meta.at("K").get<int>();
  const auto names = meta.at("params").get<std::vector<std::string>>();
  std::vector<Matrix> w;
  for (const auto& p : names)
    w.push_back(load("w." + c + "." + p));
  Harness<Backend>::run(opt, names, w, steps, [&](int k) {
    std::vector<Matrix> g;
    for (const auto& p : names)
      g.push_back(load("g." + c + "." + p + "." + std::to_string(k)));
    return g;
  });
  std::vector<Outcome> out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const Matrix ref = load("out." + c + "." + names[i]);
    REQUIRE(ref.v.size() == w[i].v.size());
    Outcome o{names[i]};
    for (std::size_t j = 0; j < ref.v.size(); ++j) {
      o.max_dev = std::max(o.max_dev, std::fabs(double(w[i].v[j]) - ref.v[j]));
      o.max_ref = std::max(o.max_ref, std::fabs(double(ref.v[j])));
    }
    out.push_back(o);
  }
  return out;
}

inline constexpr double ulp = 0x1p-23;

// Whether every parameter is within c · K · u · max|w_peer|; prints the measurements.
inline bool within(const std::string& c, const std::vector<Outcome>& outcomes, double ulps_per_step,
                   bool verbose = true) {
  const int steps = case_meta(c).at("K").get<int>();
  bool ok = true;
  for (const Outcome& o : outcomes) {
    const double tol = ulps_per_step * steps * ulp * o.max_ref;
    if (verbose)
      MESSAGE(c << "." << o.param << ": max |dw| = " << o.max_dev << " = "
                << o.max_dev / (ulp * o.max_ref) << " ulp of max|w| (tolerance " << tol << " = "
                << ulps_per_step * steps << " ulp), max|w| = " << o.max_ref);
    ok = ok && o.max_dev <= tol;
  }
  return ok;
}

inline constexpr double elementwise_ulps = 4;  // per step, see the header comment
inline constexpr double galore_ulps = 8;       // per step: rounding plus the SVD's error

inline optim::Adam::Options adam_from(const json& m, optim::AdamConvention conv) {
  return {.lr = m.at("lr").get<double>(),
          .beta1 = m.at("beta1").get<double>(),
          .beta2 = m.at("beta2").get<double>(),
          .eps = m.at("eps").get<double>(),
          .weight_decay = m.at("weight_decay").get<double>(),
          .convention = conv};
}

// ---- per-peer option builders (the Options types are the same on every backend) -------------

inline recipes::AdamW<>::Options adamw_options(
    optim::AdamConvention conv = optim::AdamConvention::torch) {
  auto o = recipes::adamw_options();
  o.rule = adam_from(case_meta("adamw"), conv);
  return o;
}

inline recipes::GaLore<>::Options galore_options() {
  const json m = case_meta("galore");
  auto o = recipes::galore_options();
  o.rule = adam_from(m, optim::AdamConvention::hf);
  o.transform.rank = m.at("rank").get<index_t>();
  o.transform.update_gap = m.at("update_proj_gap").get<index_t>();
  o.transform.proj_type = parse_proj_type(m.at("proj_type").get<std::string>());
  o.transform.method = transforms::SvdMethod::exact;
  o.residual.scale = m.at("scale").get<double>();
  o.fallback.min_size = 0;  // the peer compresses every matrix of its rank group
  return o;
}

inline recipes::Gwt<>::Options gwt_options() {
  const json m = case_meta("gwt");
  auto o = recipes::gwt_options();
  o.rule = adam_from(m, optim::AdamConvention::hf);
  REQUIRE(m.at("wavelet") == "haar");
  REQUIRE(m.at("level") == 2);
  o.transform.mode = transforms::parse_boundary_mode(m.at("boundary").get<std::string>());
  o.residual.scale = m.at("scale").get<double>();
  o.residual.limiter_gamma = m.at("limiter").get<double>();
  o.fallback.min_size = 0;
  return o;
}

inline recipes::Adam8bit<>::Options adam8bit_options() {
  const json m = case_meta("adam8bit");
  REQUIRE(m.at("block") == 256);  // recipes::Adam8bit is Q8Block<256>
  auto o = recipes::adam8bit_options();
  const auto conv = o.rule.convention;
  o.rule = adam_from(m, conv);
  o.store.min_8bit_size = m.at("min_8bit_size").get<index_t>();
  return o;
}

}  // namespace slimgrad::conformance

TYPE_TO_STRING(slimgrad::backend::cpu);
TYPE_TO_STRING(slimgrad::backend::cuda);

// ---- the cases, instantiated per backend by TEST_CASE_TEMPLATE_INVOKE(<id>, backend::X) ------

TEST_CASE_TEMPLATE_DEFINE("AdamW matches torch.optim.AdamW", Backend, conformance_adamw) {
  using namespace slimgrad::conformance;
  auto opt = Harness<Backend>::template make<slimgrad::recipes::AdamW<Backend>>(adamw_options());
  CHECK(within("adamw", replay<Backend>(opt, "adamw"), elementwise_ulps));
}

TEST_CASE_TEMPLATE_DEFINE(
    "GaLore matches the official GaLore AdamW (both orientations, a refresh mid-run)", Backend,
    conformance_galore) {
  using namespace slimgrad::conformance;
  const json m = case_meta("galore");
  MESSAGE("galore sign experiment (generator): "
          << m.at("raw_sign_flips").get<std::string>() << "; raw vs canonical signs: max |dw| "
          << m.at("raw_vs_canonical_max_dev_without_refresh").get<double>()
          << " without a refresh, " << m.at("raw_vs_canonical_max_dev").get<double>()
          << " with refreshes");
  auto opt = Harness<Backend>::template make<slimgrad::recipes::GaLore<Backend>>(galore_options());
  CHECK(within("galore", replay<Backend>(opt, "galore"), galore_ulps));
  CHECK(opt.is_compressed("left"));
  CHECK(opt.is_compressed("right"));
  CHECK_FALSE(opt.is_compressed("bias"));
}

TEST_CASE_TEMPLATE_DEFINE("GWT matches the official WaveAdamW step (odd width, tall matrix, bias)",
                          Backend, conformance_gwt) {
  using namespace slimgrad::conformance;
  for (const bool fused : Harness<Backend>::fused_variants) {  // CPU: fused rows and generic
    CAPTURE(fused);
    auto o = gwt_options();
    o.fused = fused;
    auto opt = Harness<Backend>::template make<slimgrad::recipes::Gwt<Backend>>(o);
    CHECK(within("gwt", replay<Backend>(opt, "gwt"), elementwise_ulps));
    CHECK(opt.is_compressed("odd"));
    CHECK(opt.is_compressed("tall"));
    CHECK_FALSE(opt.is_compressed("bias"));
  }
}

TEST_CASE_TEMPLATE_DEFINE("8-bit Adam matches bitsandbytes' blockwise kernels", Backend,
                          conformance_adam8bit) {
  using namespace slimgrad::conformance;
  auto opt =
      Harness<Backend>::template make<slimgrad::recipes::Adam8bit<Backend>>(adam8bit_options());
  CHECK(within("adam8bit", replay<Backend>(opt, "adam8bit"), elementwise_ulps));
  CHECK(opt.state_bytes("w") < opt.state_bytes("bias") * 300);  // 8-bit vs 32-bit states
}

TEST_CASE_TEMPLATE_DEFINE("each shared comparison fails when one semantic detail changes", Backend,
                          conformance_fails) {
  using namespace slimgrad::conformance;
  namespace recipes = slimgrad::recipes;
  // ε on the bias-corrected sqrt(v̂) (torch) versus on the raw sqrt(v) (HF): the AdamW case has
  // gradient rows down to 1e-9, where the two differ at first order.
  {
    auto opt = Harness<Backend>::template make<recipes::AdamW<Backend>>(
        adamw_options(slimgrad::optim::AdamConvention::hf));
    CHECK_FALSE(within("adamw", replay<Backend>(opt, "adamw"), elementwise_ulps));
  }
  {  // GaLore refreshed every 4 steps instead of 3.
    auto o = galore_options();
    o.transform.update_gap += 1;
    auto opt = Harness<Backend>::template make<recipes::GaLore<Backend>>(o);
    CHECK_FALSE(within("galore", replay<Backend>(opt, "galore"), galore_ulps));
  }
  {  // GWT without the norm-growth limiter.
    auto o = gwt_options();
    o.residual.limiter_gamma = 0;
    auto opt = Harness<Backend>::template make<recipes::Gwt<Backend>>(o);
    CHECK_FALSE(within("gwt", replay<Backend>(opt, "gwt"), elementwise_ulps));
  }
  {  // 8-bit Adam with torch's convention (decay before the step).
    auto o = adam8bit_options();
    o.rule.convention = slimgrad::optim::AdamConvention::torch;
    auto opt = Harness<Backend>::template make<recipes::Adam8bit<Backend>>(o);
    CHECK_FALSE(within("adam8bit", replay<Backend>(opt, "adam8bit"), elementwise_ulps));
  }
}
