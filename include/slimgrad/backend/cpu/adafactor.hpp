// slimgrad/backend/cpu/adafactor.hpp — the Adafactor rule on the CPU backend. The second moment
// lives in a Factored store (row and column vectors for matrices); the optional first moment in
// the optimizer's Store.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../../optim/adafactor.hpp"
#include "../../state/stores.hpp"
#include "common.hpp"
#include "elementwise.hpp"
#include "factored_moment.hpp"
#include "stores.hpp"

namespace slimgrad {

template <>
struct impl<optim::Adafactor, backend::cpu> {
  using Rule = optim::Adafactor;
  using FactoredImpl = impl<state::Factored, backend::cpu>;
  Rule::Options options;

  impl() = default;
  explicit impl(const Rule::Options& o) : options(o) { Rule::validate(o); }

  template <class Store>
  struct State {
    FactoredImpl::Buffer v;                   ///< factored for matrices, elementwise for vectors
    std::optional<typename Store::Buffer> m;  ///< β1 momentum, when β1 > 0
  };

  template <class Store>
  State<Store> make(const Store& store, Shape tracked) const {
    State<Store> s{factored().make(tracked, state::Moment::second), std::nullopt};
    if (options.beta1 > 0) s.m = store.make(tracked.size(), state::Moment::first);
    return s;
  }
  template <class Store>
  std::size_t bytes(const Store& store, const State<Store>& s) const {
    return factored().bytes(s.v) + (s.m ? store.bytes(*s.m) : 0);
  }
  template <class Store>
  std::size_t bytes_for(const typename Store::Options& o, Shape tracked) const {
    return FactoredImpl::bytes_for(tracked, state::Moment::second, {}) +
           (options.beta1 > 0 ? Store::bytes_for(tracked.size(), state::Moment::first, o) : 0);
  }

  /// In place: `c` holds X on entry and the final update N (ρ, clipping and momentum folded in)
  /// on exit. `weight` gives RMS(W) for parameter scaling. `denom` is not produced (GWT's
  /// details are divided by the clipping divisor instead, as waveadafactor does).
  template <class Store>
  optim::RuleOutput update(const Store& store, State<Store>& st, HostView<float> c, std::int64_t t,
                           HostView<float> /*denom*/, const random::Key& key,
                           HostView<const float> weight) const {
    const double rms_w = cpu::frobenius(weight) / std::sqrt(static_cast<double>(weight.size()));
    const double rho = Rule::step_size(options, t, rms_w);
    FactoredImpl f = factored();
    cpu::factored::precondition(f, st.v, c, Rule::beta2_hat(options, t));
    const float divisor = cpu::factored::clip_and_scale(c, options.clip_threshold, rho);
    if (st.m) momentum(store, *st.m, c, key);
    return cpu::factored::output(options.weight_decay, rho, divisor);
  }

  /// The plain path (cpu::factored::plain_step).
  template <class Store>
  void update_apply(const Store& store, State<Store>& st, HostView<const float> g,
                    HostView<float> w, std::int64_t t, float alpha, const random::Key& key) const {
    cpu::factored::plain_step(scratch_, g, w, alpha, [&](HostView<float> c) {
      return update(store, st, c, t, {}, key, w);
    });
  }

 private:
  mutable std::vector<float> scratch_;

  FactoredImpl factored() const { return cpu::factored::store(options.eps1); }

  // m ← β1·m + (1−β1)·u; u ← m (HF: exp_avg.mul_(β1).add_(update, alpha=1−β1)).
  template <class Store>
  void momentum(const Store& store, typename Store::Buffer& m, HostView<float> c,
                const random::Key& key) const {
    const float b1 = static_cast<float>(options.beta1),
                a1 = static_cast<float>(1.0 - options.beta1);
    const index_t cols = c.cols;
    cpu::for_each_chunk(c.size(), Store::alignment, 8192, [&](index_t b, index_t e) {
      float* direct = store.direct(m);
      thread_local std::vector<float> tmp;
      float* mm = direct ? direct + b : (tmp.resize(static_cast<std::size_t>(e - b)), tmp.data());
      if (!direct) store.load(m, b, e, mm);
      cpu::for_each_segment(b, e, cols, [&](index_t off, index_t row, index_t col0, index_t len) {
        float* x = c.row(row) + col0;
        for (index_t j = 0; j < len; ++j) {
          mm[off + j] = mm[off + j] * b1 + a1 * x[j];
          x[j] = mm[off + j];
        }
      });
      if (!direct) store.store(m, b, e, mm, key);
    });
  }
};

}  // namespace slimgrad
