#include <doctest/doctest.h>

#include <cmath>
#include <slimgrad/slimgrad.hpp>
#include <vector>

using namespace slimgrad;

namespace {

std::vector<float> gaussian(index_t n, std::uint64_t seed, double sd = 1.0) {
  std::vector<float> v(static_cast<std::size_t>(n));
  random::fill_gaussian(host_view(v.data(), 1, n), {seed, 5, 0}, sd);
  return v;
}

// torch.optim.AdamW (torch 1.13, single-tensor path), elementwise in float, as a reference.
void torch_adamw_reference(std::vector<float>& w, std::vector<float>& m, std::vector<float>& v,
                           const std::vector<float>& g, int t, double lr, double b1, double b2,
                           double eps, double wd) {
  const float mult = static_cast<float>(1.0 - lr * wd);
  const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
  const float step = static_cast<float>(lr / bc1), bc2s = static_cast<float>(std::sqrt(bc2));
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i] = w[i] * mult;
    m[i] = m[i] * static_cast<float>(b1) + static_cast<float>(1 - b1) * g[i];
    v[i] = v[i] * static_cast<float>(b2) + static_cast<float>(1 - b2) * g[i] * g[i];
    const float den = std::sqrt(v[i]) / bc2s + static_cast<float>(eps);
    w[i] = w[i] + (-step) * (m[i] / den);
  }
}

}  // namespace

using AdamW = Optimizer<optim::Adam, transforms::Identity, state::Fp32>;

TEST_CASE("AdamW follows torch.optim.AdamW's arithmetic step by step") {
  const index_t m = 7, n = 9;
  auto w = gaussian(m * n, 1);
  auto ref_w = w;
  std::vector<float> ref_m(w.size()), ref_v(w.size());
  AdamW opt({.rule = {.lr = 1e-2, .weight_decay = 0.1}});
  for (int k = 0; k < 5; ++k) {
    auto g = gaussian(m * n, 100 + static_cast<std::uint64_t>(k));
    Param p{"w", host_view(w.data(), m, n), host_view<const float>(g.data(), m, n)};
    auto rep = opt.step(std::span<const Param>(&p, 1));
    CHECK(rep.stepped == 1);
    torch_adamw_reference(ref_w, ref_m, ref_v, g, k + 1, 1e-2, 0.9, 0.999, 1e-8, 0.1);
  }
  for (std::size_t i = 0; i < w.size(); ++i)
    CHECK(w[i] == ref_w[i]);
  CHECK(opt.state_bytes() == 2 * 4 * 63 + 8);
  CHECK(opt.step_count("w") == 5);
}

TEST_CASE("a gradient with NaN or Inf is skipped, others step") {
  AdamW opt;
  std::vector<float> w1 = {1, 2, 3, 4}, w2 = {1, 2, 3, 4};
  std::vector<float> g1 = {0.1f, NAN, 0.3f, 0.4f}, g2 = {0.1f, 0.2f, 0.3f, 0.4f};
  const auto w1_before = w1;
  Param ps[2] = {{"a", host_view(w1.data(), 1, 4), host_view<const float>(g1.data(), 1, 4)},
                 {"b", host_view(w2.data(), 1, 4), host_view<const float>(g2.data(), 1, 4)}};
  auto rep = opt.step(ps);
  REQUIRE(rep.skipped.size() == 1);
  CHECK(rep.skipped[0] == "a");
  CHECK(rep.stepped == 1);
  CHECK(w1 == w1_before);
  CHECK(w2 != w1_before);
  CHECK(opt.step_count("a") == 0);
  CHECK(opt.step_count("b") == 1);
  g1[1] = INFINITY;
  rep = opt.step(ps);
  CHECK(rep.skipped.size() == 1);
  CHECK(w1 == w1_before);
}

TEST_CASE("bad input is refused before anything changes") {
  AdamW opt;
  std::vector<float> w = {1, 2, 3, 4, 5, 6}, g = {1, 1, 1, 1, 1, 1};
  Param ok{"w", host_view(w.data(), 2, 3), host_view<const float>(g.data(), 2, 3)};
  opt.step(std::span<const Param>(&ok, 1));
  const auto w_before = w;
  Param wrong_shape{"w", host_view(w.data(), 3, 2), host_view<const float>(g.data(), 3, 2)};
  CHECK_THROWS_AS(opt.step(std::span<const Param>(&wrong_shape, 1)), Error);
  Param mismatch{"x", host_view(w.data(), 2, 3), host_view<const float>(g.data(), 3, 2)};
  Param both[2] = {ok, mismatch};
  CHECK_THROWS_AS(opt.step(both), Error);  // the valid one must not have moved either
  CHECK(w == w_before);
  CHECK(opt.step_count("w") == 1);
  Param dup[2] = {ok, ok};
  CHECK_THROWS_AS(opt.step(dup), Error);
  Param empty{"e", host_view(w.data(), 0, 3), host_view<const float>(g.data(), 0, 3)};
  CHECK_THROWS_AS(opt.step(std::span<const Param>(&empty, 1)), Error);
  CHECK_THROWS_AS(AdamW({.rule = {.lr = NAN}}), Error);
  CHECK_THROWS_AS(AdamW({.rule = {.beta1 = 1.0}}), Error);
  CHECK_THROWS_AS(AdamW({.rule = {.eps = -1}}), Error);
  CHECK_THROWS_AS(opt.set_lr(-1), Error);
  CHECK(w == w_before);
}

TEST_CASE("an override's lr scale and weight decay are that parameter's rule settings") {
  const index_t m = 4, n = 8;
  AdamW opt({.rule = {.lr = 1e-2, .weight_decay = 0.1}});
  AdamW::Override o;
  o.lr_scale = 0.5;
  o.weight_decay = 0.0;
  opt.set_override("b", o);
  AdamW b_alone({.rule = {.lr = 5e-3, .weight_decay = 0.0}});  // 1e-2 × 0.5, no decay
  AdamW a_alone({.rule = {.lr = 1e-2, .weight_decay = 0.1}});
  auto wa = gaussian(m * n, 3), wb = gaussian(m * n, 4);
  auto wa2 = wa, wb2 = wb;
  for (int k = 0; k < 3; ++k) {
    const auto ga = gaussian(m * n, 200 + static_cast<std::uint64_t>(k));
    const auto gb = gaussian(m * n, 300 + static_cast<std::uint64_t>(k));
    Param both[2] = {{"a", host_view(wa.data(), m, n), host_view<const float>(ga.data(), m, n)},
                     {"b", host_view(wb.data(), m, n), host_view<const float>(gb.data(), m, n)}};
    opt.step(both);
    Param a{"a", host_view(wa2.data(), m, n), host_view<const float>(ga.data(), m, n)};
    Param b{"b", host_view(wb2.data(), m, n), host_view<const float>(gb.data(), m, n)};
    a_alone.step(std::span<const Param>(&a, 1));
    b_alone.step(std::span<const Param>(&b, 1));
  }
  CHECK(wa == wa2);
  CHECK(wb == wb2);
  CHECK_THROWS_AS(opt.set_override("b", o), Error);  // it has state
  AdamW::Override bad;
  bad.weight_decay = -1.0;
  CHECK_THROWS_AS(opt.set_override("c", bad), Error);
  bad.weight_decay = NAN;
  CHECK_THROWS_AS(opt.set_override("c", bad), Error);
}
