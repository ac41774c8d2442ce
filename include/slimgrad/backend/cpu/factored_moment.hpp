// slimgrad/backend/cpu/factored_moment.hpp — what the Adafactor and Flora rules share on the CPU
// backend (Flora is Adafactor with a compressed momentum, algorithms.md §6.3): the factored
// second moment and the scaled update X / sqrt(v̂), the update clipping, the weight's step and
// the plain path. Written once so that both rules round alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../../optim/adam.hpp"
#include "../../state/stores.hpp"
#include "common.hpp"
#include "stores.hpp"

namespace slimgrad::cpu::factored {

using Store = impl<state::Factored, backend::cpu>;

/// The second-moment store with Adafactor's ε1.
inline Store store(double eps1) {
  return Store(state::Factored::Options{static_cast<float>(eps1)});
}

/// v ← β̂2·v + (1 − β̂2)·(X² + ε1) (β̂2 in double: 1 − β̂2 rounds once, as torch), then in place
/// X ← X / sqrt(v̂): HF's `_approx_sq_grad(row, col).mul_(grad)` for matrices,
/// `exp_avg_sq.rsqrt().mul_(grad)` for vectors.
inline void precondition(Store& f, Store::Buffer& v, HostView<float> c, double beta2_hat) {
  f.accumulate(v, c, beta2_hat);
  if (v.factored) {
    std::vector<float> rf(static_cast<std::size_t>(c.rows)), cf(static_cast<std::size_t>(c.cols));
    f.inverse_sqrt_factors(v, rf.data(), cf.data());
    parallel_for(c.rows, c.cols, [&](index_t i) {
      float* x = c.row(i);
      const float r = rf[static_cast<std::size_t>(i)];
      for (index_t j = 0; j < c.cols; ++j)
        x[j] = (r * cf[static_cast<std::size_t>(j)]) * x[j];
    });
  } else {
    const float* full = v.full.data();
    parallel_for(c.rows, c.cols, [&](index_t i) {
      float* x = c.row(i);
      for (index_t j = 0; j < c.cols; ++j)
        x[j] = (1.0f / std::sqrt(full[i * c.cols + j])) * x[j];
    });
  }
}

/// Update clipping, then the step size: X ← (X / d)·ρ with d = max(RMS(X)/threshold, 1).
/// Returns d (GWT divides its details by it).
inline float clip_and_scale(HostView<float> c, double threshold, double rho) {
  const double rms = frobenius(c) / std::sqrt(static_cast<double>(c.size()));
  const float divisor = static_cast<float>(std::max(rms / threshold, 1.0));
  const float rho_f = static_cast<float>(rho);
  parallel_for(c.rows, c.cols, [&](index_t i) {
    float* x = c.row(i);
    for (index_t j = 0; j < c.cols; ++j)
      x[j] = (x[j] / divisor) * rho_f;
  });
  return divisor;
}

/// How the weight takes X (ρ already folded in): W ← W − ρ·λ·W, then W ← W − X.
inline optim::RuleOutput output(double weight_decay, double rho, float divisor) {
  optim::RuleOutput out;
  out.weight.step_size = 1.0f;
  out.weight.decay_alpha = static_cast<float>(-weight_decay * rho);
  out.weight.decay_before = true;
  out.detail_divisor = divisor;
  return out;
}

/// The plain path: g is copied into `scratch` (the rules need whole-tensor passes before the
/// weights move), update(c) turns it into the update in place, and w takes α times it.
template <class Update>
void plain_step(std::vector<float>& scratch, HostView<const float> g, HostView<float> w,
                float alpha, Update&& update) {
  scratch.resize(static_cast<std::size_t>(g.size()));
  HostView<float> c(scratch.data(), g.rows, g.cols, g.cols);
  as_eigen(c) = as_eigen(g);
  const optim::RuleOutput out = update(c);
  parallel_for(w.rows, w.cols, [&](index_t i) {
    float* wr = w.row(i);
    const float* u = c.row(i);
    for (index_t j = 0; j < w.cols; ++j)
      wr[j] = optim::apply_update(wr[j], alpha == 1.0f ? u[j] : alpha * u[j], out.weight);
  });
}

}  // namespace slimgrad::cpu::factored
