// Every recipe, and compositions no peer offers, train a real (small) problem: a linear map
// fitted by least squares, loss 1/2N·‖XWᵀ − Y‖². The loss must fall by a stated factor.
#include <doctest/doctest.h>

#include <cmath>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

using namespace slimgrad;

namespace {

struct Regression {
  index_t m = 48, n = 64, samples = 256;
  std::vector<float> x, y, w, g;
  Regression() {
    x.resize(static_cast<std::size_t>(samples * n));
    std::vector<float> target(static_cast<std::size_t>(m * n));
    random::fill_gaussian(host_view(x.data(), samples, n), {1, 1, 0}, 1.0);
    // A target of decaying spectrum: low-rank structure plus noise, as gradients have.
    std::vector<float> a(static_cast<std::size_t>(m * 4)), b(static_cast<std::size_t>(4 * n));
    random::fill_gaussian(host_view(a.data(), m, 4), {2, 1, 0}, 1.0);
    random::fill_gaussian(host_view(b.data(), 4, n), {3, 1, 0}, 1.0);
    random::fill_gaussian(host_view(target.data(), m, n), {4, 1, 0}, 0.05);
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j)
        for (index_t k = 0; k < 4; ++k)
          target[static_cast<std::size_t>(i * n + j)] += 0.2f *
                                                         a[static_cast<std::size_t>(i * 4 + k)] *
                                                         b[static_cast<std::size_t>(k * n + j)];
    y.assign(static_cast<std::size_t>(samples * m), 0.0f);
    for (index_t s = 0; s < samples; ++s)
      for (index_t i = 0; i < m; ++i) {
        double acc = 0;
        for (index_t j = 0; j < n; ++j)
          acc += double(x[static_cast<std::size_t>(s * n + j)]) *
                 target[static_cast<std::size_t>(i * n + j)];
        y[static_cast<std::size_t>(s * m + i)] = static_cast<float>(acc);
      }
    w.assign(static_cast<std::size_t>(m * n), 0.0f);
    g.assign(w.size(), 0.0f);
  }
  // Loss and gradient dL/dW = 1/N (XWᵀ − Y)ᵀ X.
  double loss_and_grad() {
    std::fill(g.begin(), g.end(), 0.0f);
    double loss = 0;
    std::vector<double> r(static_cast<std::size_t>(m));
    for (index_t s = 0; s < samples; ++s) {
      for (index_t i = 0; i < m; ++i) {
        double acc = -double(y[static_cast<std::size_t>(s * m + i)]);
        for (index_t j = 0; j < n; ++j)
          acc += double(x[static_cast<std::size_t>(s * n + j)]) *
                 w[static_cast<std::size_t>(i * n + j)];
        r[static_cast<std::size_t>(i)] = acc;
        loss += 0.5 * acc * acc / static_cast<double>(samples);
      }
      for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j)
          g[static_cast<std::size_t>(i * n + j)] +=
              static_cast<float>(r[static_cast<std::size_t>(i)] *
                                 x[static_cast<std::size_t>(s * n + j)] / double(samples));
    }
    return loss;
  }
};

template <class Opt>
double train(Opt& opt, int steps, double* initial) {
  Regression problem;
  double loss = problem.loss_and_grad();
  *initial = loss;
  for (int k = 0; k < steps; ++k) {
    Param p{"layers.0.mlp.weight", host_view(problem.w.data(), problem.m, problem.n),
            host_view<const float>(problem.g.data(), problem.m, problem.n)};
    auto rep = opt.step(std::span<const Param>(&p, 1));
    REQUIRE(rep.stepped == 1);
    loss = problem.loss_and_grad();
  }
  return loss;
}

template <class Opt>
void check_trains(const char* what, typename Opt::Options o, int steps, double factor,
                  bool expect_compressed = true) {
  o.fallback.min_size = 0;
  Opt opt(o);
  double initial = 0;
  const double final_loss = train(opt, steps, &initial);
  MESSAGE(std::string(what) << ": loss " << initial << " -> " << final_loss << " after " << steps
                            << " steps");
  CHECK(std::isfinite(final_loss));
  CHECK(final_loss < initial / factor);
  CHECK(opt.is_compressed("layers.0.mlp.weight") == expect_compressed);
}

}  // namespace

TEST_CASE("every recipe trains a least-squares problem") {
  {
    auto o = recipes::adamw_options();
    o.rule.lr = 2e-2;
    check_trains<recipes::AdamW<>>("adamw", o, 150, 20, false);
  }
  {
    auto o = recipes::galore_options();
    o.transform.rank = 8;
    o.transform.update_gap = 20;
    o.rule.lr = 0.1;  // 5e-2 reached only 10.5x in 150 steps: no margin
    check_trains<recipes::GaLore<>>("galore", o, 150, 10);
  }
  {
    // GWT's step matches the official WaveAdamW to < 1 ulp (test_peers.cpp), so its pace here is
    // its own. Its per-element step on the approximation is α·2^(−L/2) = 1/8 of Adam's; its
    // details carry no momentum, yet are divided by the approximation's sqrt(V) and multiplied by
    // the first-moment bias correction 1/(1 − β1^t) (up to 10x in the first steps), so where
    // |d| ≫ |a| (this gradient is white along n) they overshoot: at lr 1e-2 the loss rises to
    // about 231 after 50 steps before it falls, and lr ≥ 2e-2 is worse. The official lr 1e-2
    // with more steps gives about 65x in 600 steps.
    auto o = recipes::gwt_options();
    o.rule.lr = 1e-2;
    check_trains<recipes::Gwt<>>("gwt", o, 600, 10);
  }
  {
    auto o = recipes::subtrack_options();
    o.transform.rank = 8;
    o.transform.update_gap = 20;
    // η = 1: the rotation angle η·σ is not normalised (algorithms.md §2.2) and this problem's
    // tangent is large; with η = 10 the loss after 200 steps is 12 instead of 5.
    o.transform.eta = 1.0;
    o.rule.lr = 0.1;
    check_trains<recipes::SubTrack<>>("subtrack", o, 200, 10);
    auto pp = recipes::subtrack_options(true);
    pp.transform.rank = 8;
    pp.transform.update_gap = 20;
    pp.rule.lr = 0.1;
    check_trains<recipes::SubTrack<>>("subtrack++", pp, 150, 10);
  }
  {
    auto o = recipes::apollo_options();
    o.transform.rank = 8;
    o.rule.lr = 2e-2;
    check_trains<recipes::Apollo<>>("apollo", o, 150, 10);
    auto mini = recipes::apollo_mini_options();
    mini.rule.lr = 2e-3;
    check_trains<recipes::Apollo<>>("apollo-mini", mini, 150, 10);
  }
}

TEST_CASE("adafactor and compositions no peer offers train too") {
  {
    auto o = recipes::adafactor_options();
    o.rule.relative_step = false;
    o.rule.scale_parameter = false;
    o.rule.lr = 2e-2;
    check_trains<recipes::Adafactor<>>("adafactor", o, 150, 10, false);
    o.rule.beta1 = 0.9;
    check_trains<recipes::Adafactor<>>("adafactor beta1", o, 150, 10, false);
  }
  {
    // GWT with 8-bit blockwise state.
    using GwtQ8 = Optimizer<optim::Adam, transforms::Dwt<transforms::Haar, 2>, state::Q8Block<256>,
                            backend::cpu, residual::WaveletDetails>;
    GwtQ8::Options o;
    o.rule = {.lr = 1e-2, .eps = 1e-6, .weight_decay = 0, .convention = optim::AdamConvention::hf};
    o.residual.scale = 0.25;
    o.residual.limiter_gamma = 1.01;
    o.store.min_8bit_size = 0;
    check_trains<GwtQ8>("gwt + q8block", o, 600, 10);  // as gwt above
  }
  {
    // SubTrack++ with Adafactor as the rule.
    using SubTrackAdafactor = Optimizer<optim::Adafactor, transforms::Grassmann, state::Fp32,
                                        backend::cpu, residual::Recovery>;
    SubTrackAdafactor::Options o;
    o.rule.relative_step = false;
    o.rule.scale_parameter = false;
    o.rule.lr = 0.1;
    o.transform.rank = 8;
    o.transform.update_gap = 20;
    o.residual.scale = 0.25;
    // The limiter, as SubTrack++ has it: without it the recovery term (G − S SᵀG)·‖N_j‖/‖C_j‖
    // is unbounded for a channel nearly orthogonal to the basis, and one such step throws the
    // loss to 1e7–1e11 (Fira's reason for the limiter).
    o.residual.limiter_gamma = 1.01;
    check_trains<SubTrackAdafactor>("subtrack + adafactor", o, 150, 10);
  }
  {
    // GaLore with bf16 moments (stochastic rounding).
    using GaLoreBf16 = Optimizer<optim::Adam, transforms::SvdProjection, state::Bf16>;
    GaLoreBf16::Options o;
    o.rule = {.lr = 0.1, .eps = 1e-6, .weight_decay = 0, .convention = optim::AdamConvention::hf};
    o.transform.rank = 8;
    o.transform.update_gap = 20;
    o.residual.scale = 0.25;
    o.store.stochastic_rounding = true;
    check_trains<GaLoreBf16>("galore + bf16 (stochastic rounding)", o, 150, 10);
  }
}
