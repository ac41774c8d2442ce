// The optimizers against the official peer code: the cases of
// tests/data/optim_reference.safetensors (written by tests/reference/gen_optim.py) are replayed
// through the C++ optimizer and the final weights compared with the peer's. The cases both
// backends implement (torch.optim.AdamW, bitsandbytes' 8-bit Adam, GWT's WaveAdamW, the GaLore
// wheel's AdamW) live in tests/conformance/peers.hpp, written once for every backend and
// instantiated here for backend::cpu (tests/cuda does backend::cuda); this file adds the
// CPU-only peers: the GaLore wheel's Adafactor and the APOLLO wheel's AdamW. Tolerances and why:
// see peers.hpp (c = 4 ulp of max|w_peer| per step for these elementwise rules).
#include <doctest/doctest.h>

#include "../conformance/peers.hpp"

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
using namespace slimgrad::conformance;

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

// ---- per-peer option builders -------------------------------------------------------------------

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

TEST_CASE("Adafactor matches the official (HF) Adafactor") {
  for (const char* c : {"adafactor_lr", "adafactor_lr_b1", "adafactor_hf", "adafactor_hf_b1"}) {
    CAPTURE(c);
    recipes::Adafactor<> opt(adafactor_options(c));
    CHECK(within(c, replay<backend::cpu>(opt, c), elementwise_ulps));
  }
}

TEST_CASE("APOLLO matches the official APOLLO AdamW given the same projection matrices") {
  for (const char* c :
       {"apollo_channel", "apollo_channel_front", "apollo_tensor", "apollo_tensor_front"}) {
    CAPTURE(c);
    ApolloGiven opt(apollo_options(c));
    CHECK(within(c, replay<backend::cpu>(opt, c), elementwise_ulps));
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

TEST_CASE("each CPU-only comparison fails when one semantic detail changes") {
  {  // Adafactor's second-moment decay t^-0.8 → t^-0.7.
    auto o = adafactor_options("adafactor_hf");
    o.rule.decay_rate = -0.7;
    recipes::Adafactor<> opt(o);
    CHECK_FALSE(
        within("adafactor_hf", replay<backend::cpu>(opt, "adafactor_hf"), elementwise_ulps));
  }
  {  // APOLLO's channel scale taken per tensor.
    auto o = apollo_options("apollo_channel");
    o.residual.granularity = residual::ScaleGranularity::tensor;
    ApolloGiven opt(o);
    CHECK_FALSE(
        within("apollo_channel", replay<backend::cpu>(opt, "apollo_channel"), elementwise_ulps));
  }
}

TEST_CASE_TEMPLATE_INVOKE(conformance_adamw, slimgrad::backend::cpu);
TEST_CASE_TEMPLATE_INVOKE(conformance_galore, slimgrad::backend::cpu);
TEST_CASE_TEMPLATE_INVOKE(conformance_gwt, slimgrad::backend::cpu);
TEST_CASE_TEMPLATE_INVOKE(conformance_adam8bit, slimgrad::backend::cpu);
TEST_CASE_TEMPLATE_INVOKE(conformance_fails, slimgrad::backend::cpu);
