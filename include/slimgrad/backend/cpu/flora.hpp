// slimgrad/backend/cpu/flora.hpp — the Flora rule (optim/flora.hpp) on the CPU backend. The
// second moment lives in a Factored store and takes Adafactor's code (factored_moment.hpp); the
// momentum (compressed r×n or m×r, or whole for tensors that are not compressed) in the optimizer's
// Store, fp32 in the recipe. The projection P is a function of its Philox key (seed, tensor id,
// epoch), so state is m + n + r·max(m, n) floats per compressed matrix and checkpoints keep the
// seed. The current epoch's P of each tensor is cached (it changes every κ steps; drawing it costs
// r·min(m, n) Gaussians per tensor per step): that cache is workspace, not state — r·min(m, n)
// floats per compressed matrix, reported by workspace_bytes() and never saved.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

#include "../../core/philox.hpp"
#include "../../optim/adam.hpp"
#include "../../optim/flora.hpp"
#include "../../state/stores.hpp"
#include "common.hpp"
#include "factored_moment.hpp"
#include "stores.hpp"

namespace slimgrad {

template <>
struct impl<optim::Flora, backend::cpu> {
  using Rule = optim::Flora;
  using FactoredImpl = impl<state::Factored, backend::cpu>;
  Rule::Options options;

  impl() = default;
  explicit impl(const Rule::Options& o) : options(o) { Rule::validate(o); }

  template <class Store>
  struct State {
    FactoredImpl::Buffer v;                   ///< factored for matrices, elementwise for vectors
    std::optional<typename Store::Buffer> m;  ///< momentum: C when compressed, else m×n
  };

  template <class Store>
  State<Store> make(const Store& store, Shape tracked) const {
    State<Store> s{factored().make(tracked, state::Moment::second), std::nullopt};
    if (options.beta1 > 0) s.m = store.make(momentum_shape(tracked).size(), state::Moment::first);
    return s;
  }
  template <class Store>
  std::size_t bytes(const Store& store, const State<Store>& s) const {
    return factored().bytes(s.v) + (s.m ? store.bytes(*s.m) : 0);
  }
  template <class Store>
  std::size_t bytes_for(const typename Store::Options& o, Shape tracked) const {
    return FactoredImpl::bytes_for(tracked, state::Moment::second, {}) +
           (options.beta1 > 0
                ? Store::bytes_for(momentum_shape(tracked).size(), state::Moment::first, o)
                : 0);
  }

  /// In place: `c` holds the gradient on entry and the final update (lr and clipping folded
  /// in) on exit; the weight takes W ← W − lr·λ·W − c. `key.stream` (the tensor id) names the
  /// projections. `denom` is not produced.
  template <class Store>
  optim::RuleOutput update(const Store& store, State<Store>& st, HostView<float> c, std::int64_t t,
                           HostView<float> /*denom*/, const random::Key& key,
                           HostView<const float> weight) const {
    const optim::Adafactor::Options af = Rule::adafactor(options);
    const double rms_w = cpu::frobenius(weight) / std::sqrt(static_cast<double>(weight.size()));
    const double lr = optim::Adafactor::step_size(af, t, rms_w);
    FactoredImpl f = factored();
    cpu::factored::precondition(f, st.v, c, optim::Adafactor::beta2_hat(af, t));
    if (st.m) momentum(store, *st.m, c, t, key);
    // Clipping, then the step size: out ← (out / max(RMS(out)/d, 1))·lr.
    const float divisor = cpu::factored::clip_and_scale(c, options.clip_threshold, lr);
    return cpu::factored::output(options.weight_decay, lr, divisor);
  }

  /// The plain path (cpu::factored::plain_step).
  template <class Store>
  void update_apply(const Store& store, State<Store>& st, HostView<const float> g,
                    HostView<float> w, std::int64_t t, float alpha, const random::Key& key) const {
    thread_local std::vector<float> scratch;
    cpu::factored::plain_step(scratch, g, w, alpha, [&](HostView<float> c) {
      return update(store, st, c, t, {}, key, w);
    });
  }

  /// Bytes of the projection cache (workspace: rebuilt from the keys after a load).
  std::size_t workspace_bytes() const {
    std::size_t b = 0;
    for (const auto& [stream, c] : cache_)
      b += static_cast<std::size_t>(c.p.size()) * sizeof(float);
    return b;
  }

  /// The projection of `shape` for epoch `epoch`: r×m (left, m < n) or n×r (right), entries
  /// N(0, 1/r) from Philox key (seed, stream, epoch).
  cpu::RowMatrix projection(Shape shape, std::uint64_t stream, std::uint32_t epoch) const {
    const bool left = shape.rows < shape.cols;
    cpu::RowMatrix p(left ? options.rank : shape.cols, left ? shape.rows : options.rank);
    random::fill_gaussian(cpu::as_view(p), {options.seed, stream, epoch},
                          1.0 / std::sqrt(static_cast<double>(options.rank)));
    return p;
  }

 private:
  struct Cached {
    Shape shape;
    std::uint32_t epoch = 0;
    cpu::RowMatrix p;
  };
  // Per tensor id: the projection of the current epoch (the optimizer steps tensors one at a
  // time; each step is parallel inside).
  mutable std::unordered_map<std::uint64_t, Cached> cache_;

  const cpu::RowMatrix& cached_projection(Shape shape, std::uint64_t stream,
                                          std::uint32_t epoch) const {
    auto [it, fresh] = cache_.try_emplace(stream);
    Cached& c = it->second;
    if (fresh || c.epoch != epoch || c.shape != shape) {
      c.p = projection(shape, stream, epoch);
      c.shape = shape;
      c.epoch = epoch;
    }
    return c.p;
  }

  FactoredImpl factored() const { return cpu::factored::store(options.eps1); }

  Shape momentum_shape(Shape shape) const {
    return Rule::compressed(options, shape) ? Rule::compressed_shape(options, shape) : shape;
  }

  // The official order: out = U·(1−β1) + up(C)·β1, then (at t ≡ 0 mod κ) C ← down_new(up(C)),
  // then C ← C·β1 + down(U)·(1−β1); uncompressed: out = U·(1−β1) + M·β1, M ← out. Scalars are
  // Python floats rounded to float, as torch's tensor-scalar kernels do.
  template <class Store>
  void momentum(const Store& store, typename Store::Buffer& mb, HostView<float> u, std::int64_t t,
                const random::Key& key) const {
    const float b1 = static_cast<float>(options.beta1);
    const float a1 = static_cast<float>(1.0 - options.beta1);
    const Shape shape = u.shape();
    const Shape ms = momentum_shape(shape);
    thread_local std::vector<float> mbuf;
    float* m = store.direct(mb);
    if (m == nullptr) {
      mbuf.resize(static_cast<std::size_t>(ms.size()));
      m = mbuf.data();
      store.load(mb, 0, ms.size(), m);
    }
    if (!Rule::compressed(options, shape)) {
      cpu::parallel_for(u.rows, u.cols, [&](index_t i) {
        float* x = u.row(i);
        float* mi = m + i * u.cols;
        for (index_t j = 0; j < u.cols; ++j) {
          x[j] = x[j] * a1 + mi[j] * b1;
          mi[j] = x[j];
        }
      });
    } else {
      const bool left = shape.rows < shape.cols;
      const auto k = static_cast<std::uint64_t>(options.kappa);
      const auto epoch = static_cast<std::uint32_t>(static_cast<std::uint64_t>(t - 1) / k);
      cpu::MapMatrix cm(m, ms.rows, ms.cols, Eigen::OuterStride<>(ms.cols));
      const cpu::RowMatrix& p = cached_projection(shape, key.stream, epoch);
      cpu::RowMatrix raw = cpu::as_eigen(HostView<const float>(u));
      cpu::RowMatrix up(shape.rows, shape.cols);
      if (left)
        up.noalias() = p.transpose() * cm;
      else
        up.noalias() = cm * p.transpose();
      cpu::MapMatrix out = cpu::as_eigen(u);
      out = (raw.array() * a1 + up.array() * b1).matrix();
      cpu::RowMatrix down(ms.rows, ms.cols);
      const cpu::RowMatrix* pa = &p;
      cpu::RowMatrix next;
      if (static_cast<std::uint64_t>(t) % k == 0) {  // resample and transfer the momentum
        next = projection(shape, key.stream, epoch + 1);
        if (left)
          down.noalias() = next * up;
        else
          down.noalias() = up * next;
        cm = down;
        pa = &next;
      }
      if (left)
        down.noalias() = *pa * raw;
      else
        down.noalias() = raw * *pa;
      cm = (cm.array() * b1 + down.array() * a1).matrix();
      if (pa == &next) {  // the new epoch's P is the current one from here on
        Cached& c = cache_[key.stream];
        c.p = std::move(next);
        c.epoch = epoch + 1;
      }
    }
    if (store.direct(mb) == nullptr) store.store(mb, 0, ms.size(), m, key);
  }
};

}  // namespace slimgrad
