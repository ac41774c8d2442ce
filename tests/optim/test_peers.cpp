// The optimizers against the official peer code: every case of
// tests/data/optim_reference.safetensors (written by tests/reference/gen_optim.py:
// torch.optim.AdamW, the GaLore wheel's AdamW and Adafactor, GWT's WaveAdamW step, the APOLLO
// wheel's AdamW and bitsandbytes' 8-bit kernels) is replayed through the C++ optimizer, and the
// final weights are compared with the peer's.
//
// Tolerances. Both sides compute in float32 with the same operations in nearly the same order,
// but not bit for bit: torch's addcdiv computes (value·m)/d where we compute value·(m/d), norms
// are accumulated in float by torch and in double here, scalars are rounded at different points.
// Each step can then move a weight by a few units in the last place of the largest weight, and
// the differences add up over the K steps. The bound is
//     max |w − w_peer| ≤ c · K · u · max |w_peer|,   u = 2^-23 (one ulp of a float in [1, 2)),
// per parameter, with c = 4 for the elementwise rules (AdamW, Adafactor, 8-bit Adam, GWT,
// APOLLO) and c = 8 for GaLore, whose basis also carries the SVD's error: its vectors are
// accurate to about 2^-24·σ1/gap ≲ 1e-6 on these gradients (singular values decay by 0.7 per
// index, so gap/σ1 ≥ 0.1 at rank 4), and a basis error δ moves a step by about lr·α·δ, far below
// one ulp of the weights. The measured deviations (printed by every case) are at most 1.4 ulp
// over all K steps. For 8-bit Adam the bound also means that every 8-bit code matched: one code
// apart is about 1% of a moment, hundreds of ulp of the weight after a few steps.
// Each tolerance must be able to fail: the last test case replays cases with one semantic detail
// changed (ε placement, limiter, granularity, schedule, decay order) and requires the comparison
// to fail.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <tuple>
#include <vector>

using namespace slimgrad;

// ---- a user-written transform: a projection by given matrices --------------------------------
// APOLLO draws its matrices with torch.Generator, which slimgrad does not reproduce (it uses
// Philox; algorithms.md §8.2). To compare "the update given the same projection matrix", this
// transform holds the matrices the peer drew, per tensor and per epoch (k / update_gap), in
// GaLore's orientation (right: P is r×n, coefficients G Pᵀ; left: P is m×r, coefficients Pᵀ G).
// It is written against the transform contract of core/concepts.hpp only, which shows that a
// user's policy composes with the engine's rules, stores and residual policies.
namespace test_policies {
struct GivenMatrix {
  using Matrices = std::map<std::uint64_t, std::vector<cpu::RowMatrix>>;  // tensor id → epochs
  struct Options {
    index_t rank = 1;
    index_t update_gap = 1;
    std::shared_ptr<const Matrices> matrices;
  };
  static constexpr const char* name = "given_matrix";
};
}  // namespace test_policies

template <>
struct slimgrad::impl<test_policies::GivenMatrix, backend::cpu> {
  using Policy = test_policies::GivenMatrix;
  struct State {
    Shape shape;
    Side side = Side::right;  // read by the engine for ChannelScale and Recovery
    std::uint64_t id = 0;
    const cpu::RowMatrix* p = nullptr;
  };
  Policy::Options options;

  impl() = default;
  explicit impl(const Policy::Options& o) : options(o) {
    require(o.rank >= 1 && o.update_gap >= 1, "given matrix: rank and update_gap must be >= 1");
  }
  State init(Shape g, std::uint64_t id) const {
    require(options.rank <= projected_dim(g, side_for(g)), "given matrix: rank too large");
    return {g, side_for(g), id, nullptr};
  }
  Shape coeff_shape(Shape g) const { return projected_shape(g, side_for(g), options.rank); }
  std::size_t state_bytes(Shape) const { return 0; }
  HostView<float> tracked(HostView<float> c) const { return c; }
  HostView<const float> tracked(HostView<const float> c) const { return c; }
  bool refresh(State& s, HostView<const float>, index_t k) {
    if (s.p && k % options.update_gap != 0) return false;
    require(options.matrices && options.matrices->count(s.id),
            "given matrix: no matrix for tensor");
    const auto& epochs = options.matrices->at(s.id);
    const auto e = static_cast<std::size_t>(k / options.update_gap);
    require(e < epochs.size(), "given matrix: no matrix for this epoch");
    s.p = &epochs[e];
    return true;
  }
  void forward(const State& s, HostView<const float> g, HostView<float> c) {
    if (s.side == Side::right)
      cpu::as_eigen(c).noalias() = cpu::as_eigen(g) * s.p->transpose();
    else
      cpu::as_eigen(c).noalias() = s.p->transpose() * cpu::as_eigen(g);
  }
  void inverse(const State& s, HostView<const float> c, HostView<float> out) {
    if (s.side == Side::right)
      cpu::as_eigen(out).noalias() = cpu::as_eigen(c) * *s.p;
    else
      cpu::as_eigen(out).noalias() = *s.p * cpu::as_eigen(c);
  }
};
static_assert(transform_policy<test_policies::GivenMatrix, backend::cpu>);

namespace {

using json = nlohmann::json;

const io::TensorFile& reference() {
  static const io::TensorFile file =
      io::read(std::string(SLIMGRAD_TEST_DATA_DIR) + "/optim_reference.safetensors");
  return file;
}

json case_meta(const std::string& name) {
  return json::parse(reference().metadata.at("case." + name));
}

struct Matrix {
  std::vector<float> v;
  index_t rows = 0, cols = 0;
};

Matrix load(const std::string& name) {
  const io::Tensor& t = reference().at(name);
  Matrix m;
  m.v = t.to_f32();
  m.rows = t.shape.size() == 2 ? t.shape[0] : 1;
  m.cols = t.shape.back();
  return m;
}

// One parameter's outcome: max |w − w_peer| and max |w_peer|.
struct Outcome {
  std::string param;
  double max_dev = 0, max_ref = 0;
};

// Replays case `c` through `opt` and returns the deviation of every parameter.
template <class Opt>
std::vector<Outcome> replay(Opt& opt, const std::string& c) {
  const json meta = case_meta(c);
  const int steps = meta.at("K").get<int>();
  const auto names = meta.at("params").get<std::vector<std::string>>();
  std::vector<Matrix> w;
  for (const auto& p : names)
    w.push_back(load("w." + c + "." + p));
  for (int k = 0; k < steps; ++k) {
    std::vector<Matrix> g;
    std::vector<Param> params;
    for (const auto& p : names)
      g.push_back(load("g." + c + "." + p + "." + std::to_string(k)));
    for (std::size_t i = 0; i < names.size(); ++i)
      params.push_back({names[i], host_view(w[i].v.data(), w[i].rows, w[i].cols),
                        host_view<const float>(g[i].v.data(), g[i].rows, g[i].cols)});
    const StepReport rep = opt.step(params);
    REQUIRE(rep.stepped == static_cast<index_t>(names.size()));
  }
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

constexpr double ulp = 0x1p-23;

// Whether every parameter is within c · K · u · max|w_peer|; prints the measurements.
bool within(const std::string& c, const std::vector<Outcome>& outcomes, double ulps_per_step,
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

constexpr double elementwise_ulps = 4;  // per step, see the header comment
constexpr double galore_ulps = 8;       // per step: rounding plus the SVD's error

optim::Adam::Options adam_from(const json& m, optim::AdamConvention conv) {
  return {.lr = m.at("lr").get<double>(),
          .beta1 = m.at("beta1").get<double>(),
          .beta2 = m.at("beta2").get<double>(),
          .eps = m.at("eps").get<double>(),
          .weight_decay = m.at("weight_decay").get<double>(),
          .convention = conv};
}

// ---- per-peer option builders -------------------------------------------------------------------

recipes::AdamW<>::Options adamw_options(optim::AdamConvention conv = optim::AdamConvention::torch) {
  auto o = recipes::adamw_options();
  o.rule = adam_from(case_meta("adamw"), conv);
  return o;
}

recipes::GaLore<>::Options galore_options() {
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

recipes::Adafactor<>::Options adafactor_options(const std::string& c) {
  const json m = case_meta(c);
  auto o = recipes::adafactor_options();
  o.rule.relative_step = m.at("relative_step").get<bool>();
  o.rule.scale_parameter = m.at("scale_parameter").get<bool>();
  if (!m.at("lr").is_null()) o.rule.lr = m.at("lr").get<double>();
  o.rule.beta1 = m.at("beta1").is_null() ? 0.0 : m.at("beta1").get<double>();
  o.rule.weight_decay = m.at("weight_decay").get<double>();
  o.rule.eps1 = m.at("eps1").get<double>();
  o.rule.eps2 = m.at("eps2").get<double>();
  o.rule.clip_threshold = m.at("clip_threshold").get<double>();
  o.rule.decay_rate = m.at("decay_rate").get<double>();
  return o;
}

recipes::Gwt<>::Options gwt_options() {
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

using ApolloGiven = Optimizer<optim::Adam, test_policies::GivenMatrix, state::Fp32, backend::cpu,
                              residual::ChannelScale>;

ApolloGiven::Options apollo_options(const std::string& c) {
  const json m = case_meta(c);
  ApolloGiven::Options o;
  o.rule = adam_from(m, optim::AdamConvention::hf);
  o.transform.rank = m.at("rank").get<index_t>();
  o.transform.update_gap = m.at("update_proj_gap").get<index_t>();
  auto mats = std::make_shared<test_policies::GivenMatrix::Matrices>();
  for (const std::string p : {"left", "right"}) {
    auto& epochs = (*mats)[tensor_id(p)];
    for (int e = 0; reference().contains("P." + c + "." + p + "." + std::to_string(e)); ++e) {
      const Matrix pm = load("P." + c + "." + p + "." + std::to_string(e));
      epochs.push_back(cpu::as_eigen(host_view<const float>(pm.v.data(), pm.rows, pm.cols)));
    }
    REQUIRE(epochs.size() >= 2);  // the case refreshes mid-run
  }
  o.transform.matrices = mats;
  o.residual.scale = m.at("scale").get<double>();
  o.residual.limiter_gamma = m.at("limiter").get<double>();
  o.residual.scale_front = m.at("scale_front").get<bool>();
  o.residual.granularity = m.at("scale_type") == "tensor" ? residual::ScaleGranularity::tensor
                                                          : residual::ScaleGranularity::channel;
  o.fallback.min_size = 0;
  return o;
}

recipes::Adam8bit<>::Options adam8bit_options() {
  const json m = case_meta("adam8bit");
  REQUIRE(m.at("block") == 256);  // recipes::Adam8bit is Q8Block<256>
  auto o = recipes::adam8bit_options();
  const auto conv = o.rule.convention;
  o.rule = adam_from(m, conv);
  o.store.min_8bit_size = m.at("min_8bit_size").get<index_t>();
  return o;
}

}  // namespace

TEST_CASE("the reference file holds the cases this test knows") {
  const std::string cases = reference().metadata.at("cases");
  MESSAGE("reference cases: " << cases << " (seed " << reference().metadata.at("seed") << ", "
                              << reference().metadata.at("versions") << ")");
  for (const char* c : {"adamw", "galore", "adafactor_lr", "adafactor_lr_b1", "adafactor_hf",
                        "adafactor_hf_b1", "gwt", "apollo_channel", "apollo_channel_front",
                        "apollo_tensor", "apollo_tensor_front", "adam8bit"})
    CHECK(cases.find(c) != std::string::npos);
}

TEST_CASE("AdamW matches torch.optim.AdamW") {
  recipes::AdamW<> opt(adamw_options());
  CHECK(within("adamw", replay(opt, "adamw"), elementwise_ulps));
}

TEST_CASE("GaLore matches the official GaLore AdamW (both orientations, a refresh mid-run)") {
  const json m = case_meta("galore");
  MESSAGE("galore sign experiment (generator): "
          << m.at("raw_sign_flips").get<std::string>() << "; raw vs canonical signs: max |dw| "
          << m.at("raw_vs_canonical_max_dev_without_refresh").get<double>()
          << " without a refresh, " << m.at("raw_vs_canonical_max_dev").get<double>()
          << " with refreshes");
  recipes::GaLore<> opt(galore_options());
  CHECK(within("galore", replay(opt, "galore"), galore_ulps));
  CHECK(opt.is_compressed("left"));
  CHECK(opt.is_compressed("right"));
  CHECK_FALSE(opt.is_compressed("bias"));
}

TEST_CASE("Adafactor matches the official (HF) Adafactor") {
  for (const char* c : {"adafactor_lr", "adafactor_lr_b1", "adafactor_hf", "adafactor_hf_b1"}) {
    CAPTURE(c);
    recipes::Adafactor<> opt(adafactor_options(c));
    CHECK(within(c, replay(opt, c), elementwise_ulps));
  }
}

TEST_CASE("GWT matches the official WaveAdamW step (odd width, tall matrix, plain bias)") {
  for (const bool fused : {true, false}) {  // the fused row kernel and the generic engine path
    CAPTURE(fused);
    auto o = gwt_options();
    o.fused = fused;
    recipes::Gwt<> opt(o);
    CHECK(within("gwt", replay(opt, "gwt"), elementwise_ulps));
    CHECK(opt.is_compressed("odd"));
    CHECK(opt.is_compressed("tall"));
    CHECK_FALSE(opt.is_compressed("bias"));
  }
}

TEST_CASE("APOLLO matches the official APOLLO AdamW given the same projection matrices") {
  for (const char* c :
       {"apollo_channel", "apollo_channel_front", "apollo_tensor", "apollo_tensor_front"}) {
    CAPTURE(c);
    ApolloGiven opt(apollo_options(c));
    CHECK(within(c, replay(opt, c), elementwise_ulps));
    CHECK(opt.is_compressed("left"));
    CHECK_FALSE(opt.is_compressed("bias"));
  }
}

TEST_CASE("RandomProjection's entries are N(0, 1/r), as APOLLO's") {
  const json d = json::parse(reference().metadata.at("apollo_distribution"));
  const index_t r = d.at("rank").get<index_t>();
  const double rd = static_cast<double>(r);
  // Same shape as the peer's draw: a right-side projection of a 512×256 gradient (P is r×256).
  transforms::RandomProjection::Options po;
  po.rank = r;
  po.seed = 7;
  impl<transforms::RandomProjection, backend::cpu> rp(po);
  const Shape g{512, 256};
  auto st = rp.init(g, tensor_id("w"));
  const std::vector<float> zeros(static_cast<std::size_t>(g.size()), 0.0f);
  REQUIRE(rp.refresh(st, host_view<const float>(zeros.data(), g.rows, g.cols), 0));
  cpu::RowMatrix p;
  rp.generate(st, p);
  const double count = static_cast<double>(p.size());
  double mean = 0, m2 = 0, m4 = 0, in1 = 0, in2 = 0;
  for (index_t i = 0; i < p.size(); ++i)
    mean += p.data()[i];
  mean /= count;
  for (index_t i = 0; i < p.size(); ++i) {
    const double x = p.data()[i], z = x * std::sqrt(rd);
    m2 += (x - mean) * (x - mean);
    m4 += z * z * z * z;
    in1 += std::fabs(z) < 1.0;
    in2 += std::fabs(z) < 2.0;
  }
  const double var = m2 / count;
  // Sampling bounds at 5 standard errors for N(0, 1/r) with `count` entries.
  const double se_mean = std::sqrt(1.0 / rd / count), se_var_r = std::sqrt(2.0 / count);
  const double se_p1 = std::sqrt(0.6827 * 0.3173 / count),
               se_p2 = std::sqrt(0.9545 * 0.0455 / count);
  MESSAGE("slimgrad: mean " << mean << ", var*r " << var * rd << ", P(|z|<1) " << in1 / count
                            << ", P(|z|<2) " << in2 / count << ", E z^4 " << m4 / count);
  MESSAGE("APOLLO:   mean " << d.at("mean").get<double>() << ", var*r "
                            << d.at("var_times_r").get<double>() << ", P(|z|<1) "
                            << d.at("frac_within_1sd").get<double>() << ", P(|z|<2) "
                            << d.at("frac_within_2sd").get<double>() << ", E z^4 "
                            << d.at("kurtosis").get<double>());
  for (const auto& [mu, vr, p1, p2, k4] :
       {std::tuple{mean, var * rd, in1 / count, in2 / count, m4 / count},
        std::tuple{d.at("mean").get<double>(), d.at("var_times_r").get<double>(),
                   d.at("frac_within_1sd").get<double>(), d.at("frac_within_2sd").get<double>(),
                   d.at("kurtosis").get<double>()}}) {
    CHECK(std::fabs(mu) < 5 * se_mean);
    CHECK(std::fabs(vr - 1.0) < 5 * se_var_r);
    CHECK(std::fabs(p1 - 0.6827) < 5 * se_p1);
    CHECK(std::fabs(p2 - 0.9545) < 5 * se_p2);
    CHECK(std::fabs(k4 - 3.0) < 5 * std::sqrt(96.0 / count));  // Var z^4 = 105 − 9
  }
}

TEST_CASE("8-bit Adam matches bitsandbytes' blockwise kernels") {
  recipes::Adam8bit<> opt(adam8bit_options());
  CHECK(within("adam8bit", replay(opt, "adam8bit"), elementwise_ulps));
  CHECK(opt.state_bytes("w") < opt.state_bytes("bias") * 300);  // 8-bit vs 32-bit states
}

TEST_CASE("each comparison fails when one semantic detail changes") {
  // ε on the bias-corrected sqrt(v̂) (torch) versus on the raw sqrt(v) (HF): the AdamW case has
  // gradient rows down to 1e-9, where the two differ at first order.
  {
    recipes::AdamW<> opt(adamw_options(optim::AdamConvention::hf));
    CHECK_FALSE(within("adamw", replay(opt, "adamw"), elementwise_ulps));
  }
  {  // GaLore refreshed every 4 steps instead of 3.
    auto o = galore_options();
    o.transform.update_gap += 1;
    recipes::GaLore<> opt(o);
    CHECK_FALSE(within("galore", replay(opt, "galore"), galore_ulps));
  }
  {  // Adafactor's second-moment decay t^-0.8 → t^-0.7.
    auto o = adafactor_options("adafactor_hf");
    o.rule.decay_rate = -0.7;
    recipes::Adafactor<> opt(o);
    CHECK_FALSE(within("adafactor_hf", replay(opt, "adafactor_hf"), elementwise_ulps));
  }
  {  // GWT without the norm-growth limiter.
    auto o = gwt_options();
    o.residual.limiter_gamma = 0;
    recipes::Gwt<> opt(o);
    CHECK_FALSE(within("gwt", replay(opt, "gwt"), elementwise_ulps));
  }
  {  // APOLLO's channel scale taken per tensor.
    auto o = apollo_options("apollo_channel");
    o.residual.granularity = residual::ScaleGranularity::tensor;
    ApolloGiven opt(o);
    CHECK_FALSE(within("apollo_channel", replay(opt, "apollo_channel"), elementwise_ulps));
  }
  {  // 8-bit Adam with torch's convention (decay before the step).
    auto o = adam8bit_options();
    o.rule.convention = optim::AdamConvention::torch;
    recipes::Adam8bit<> opt(o);
    CHECK_FALSE(within("adam8bit", replay(opt, "adam8bit"), elementwise_ulps));
  }
}
