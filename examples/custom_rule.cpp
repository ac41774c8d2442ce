// A user-written update rule composed with slimgrad's transforms and stores.
//
// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") is not in the
// library. Written here as a Rule with the same contract as optim::Adam — make / bytes /
// bytes_for / update / update_apply — it composes with any transform and store: below it runs
// on the Haar approximation of GWT with 8-bit moments, a combination no peer ships.
//
//   c ← β1·m + (1−β1)·g;  u ← sign(c);  m ← β2·m + (1−β2)·g;  W ← W(1 − lr·λ) − lr·u
#include <cmath>
#include <cstdio>
#include <slimgrad/slimgrad.hpp>
#include <vector>

namespace lion {

struct Lion {
  struct Options {
    double lr = 1e-4;
    double beta1 = 0.9;
    double beta2 = 0.99;
    double weight_decay = 0.0;
  };
  static constexpr const char* name = "lion";
};

}  // namespace lion

namespace slimgrad {

// The rule's CPU implementation: one moment in whatever store the optimizer was given.
template <>
struct impl<lion::Lion, backend::cpu> {
  lion::Lion::Options options;

  impl() = default;
  explicit impl(const lion::Lion::Options& o) : options(o) {
    require(std::isfinite(o.lr) && o.lr >= 0, "lion: lr must be finite and >= 0");
  }

  template <class Store>
  struct State {
    typename Store::Buffer m;
  };
  template <class Store>
  State<Store> make(const Store& store, Shape tracked) const {
    return {store.make(tracked.size(), state::Moment::first)};
  }
  template <class Store>
  std::size_t bytes(const Store& store, const State<Store>& s) const {
    return store.bytes(s.m);
  }
  template <class Store>
  std::size_t bytes_for(const typename Store::Options& o, Shape tracked) const {
    return Store::bytes_for(tracked.size(), state::Moment::first, o);
  }

  // In place: c holds the coefficients on entry and the update sign(...) on exit.
  template <class Store>
  optim::RuleOutput update(const Store& store, State<Store>& st, HostView<float> c, std::int64_t,
                           HostView<float>, const random::Key& key, HostView<const float>) const {
    std::vector<float> m(static_cast<std::size_t>(c.size()));
    store.load(st.m, 0, c.size(), m.data());
    const float b1 = static_cast<float>(options.beta1), b2 = static_cast<float>(options.beta2);
    for (index_t i = 0; i < c.rows; ++i)
      for (index_t j = 0; j < c.cols; ++j) {
        float& x = c(i, j);
        float& mm = m[static_cast<std::size_t>(i * c.cols + j)];
        const float interp = b1 * mm + (1 - b1) * x;
        mm = b2 * mm + (1 - b2) * x;
        x = static_cast<float>((interp > 0) - (interp < 0));
      }
    store.store(st.m, 0, c.size(), m.data(), key);
    optim::RuleOutput out;
    out.weight.step_size = static_cast<float>(options.lr);
    out.weight.decay_multiplier = static_cast<float>(1.0 - options.lr * options.weight_decay);
    out.detail_divisor =
        1.0f;  // GWT's details pass through unnormalised (a choice of this example)
    return out;
  }
  template <class Store>
  void update_apply(const Store& store, State<Store>& st, HostView<const float> g,
                    HostView<float> w, std::int64_t t, float alpha, const random::Key& key) const {
    std::vector<float> c(static_cast<std::size_t>(g.size()));
    HostView<float> cv(c.data(), g.rows, g.cols);
    cpu::as_eigen(cv) = cpu::as_eigen(g);
    const auto out = update(store, st, cv, t, {}, key, w);
    for (index_t i = 0; i < w.rows; ++i)
      for (index_t j = 0; j < w.cols; ++j)
        w(i, j) = optim::apply_update(w(i, j), alpha * cv(i, j), out.weight);
  }
};

}  // namespace slimgrad

using namespace slimgrad;

int main() {
  // Least squares: find W (32×64) with X Wᵀ = Y for random X and a random target.
  const index_t m = 32, n = 64, samples = 512;
  std::vector<float> x(static_cast<std::size_t>(samples * n)),
      target(static_cast<std::size_t>(m * n));
  random::fill_gaussian(host_view(x.data(), samples, n), {1, 1, 0}, 1.0);
  random::fill_gaussian(host_view(target.data(), m, n), {2, 1, 0}, 0.3);
  cpu::RowMatrix X = cpu::as_eigen(host_view<const float>(x.data(), samples, n));
  cpu::RowMatrix T = cpu::as_eigen(host_view<const float>(target.data(), m, n));
  cpu::RowMatrix Y = X * T.transpose();
  cpu::RowMatrix W = cpu::RowMatrix::Zero(m, n), G(m, n);

  using GwtLion = Optimizer<lion::Lion, transforms::Dwt<transforms::Haar, 1>, state::Q8Block<256>,
                            backend::cpu, residual::WaveletDetails>;
  GwtLion::Options o;
  o.rule.lr = 3e-3;
  o.residual.scale = 1.0;
  o.store.min_8bit_size = 0;
  o.fallback.min_size = 0;
  GwtLion opt(o);
  for (int step = 0; step <= 400; ++step) {
    const cpu::RowMatrix R = X * W.transpose() - Y;  // samples × m
    G = R.transpose() * X / static_cast<float>(samples);
    if (step % 100 == 0)
      std::printf("step %3d  loss %.5f\n", step,
                  0.5 * R.squaredNorm() / static_cast<double>(samples));
    Param p{"w", cpu::as_view(W), cpu::as_view(static_cast<const cpu::RowMatrix&>(G))};
    opt.step(std::span<const Param>(&p, 1));
  }
  std::printf("%s: %zu bytes of optimizer state for %ld parameters (fp32 Adam: %ld)\n",
              GwtLion::composition().c_str(), opt.state_bytes(), static_cast<long>(m * n),
              static_cast<long>(8 * m * n));
  return 0;
}
