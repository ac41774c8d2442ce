// slimgrad/optim/adam.hpp — the Adam rule: descriptor and per-element math (host/device).
//
// Two conventions (algorithms.md §0.2), one element kernel:
//   torch  (torch.optim.AdamW): decay W ← W(1 − lr·λ) before the update; denominator
//          sqrt(V)/sqrt(1−β2^t) + ε; step size lr/(1−β1^t).
//   hf     (the GaLore/GWT/APOLLO/SubTrack "HF-AdamW"): denominator sqrt(V) + ε on the raw V;
//          step size lr·sqrt(1−β2^t)/(1−β1^t); decay W ← W − lr·λ·W after the update.
//   bnb    (bitsandbytes' Adam kernels, 8-bit blockwise and 32-bit; algorithms.md §6.5):
//          denominator sqrt(V) + ε·sqrt(1−β2^t); step size lr·sqrt(1−β2^t)/(1−β1^t); decay
//          W ← W·(1 − lr·λ) after the update; scalars computed in float as the kernels do.
// State: two moment tensors of the tracked coefficients, held by the StateStore (fp32: 8 bytes
// per tracked coefficient).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace slimgrad::optim {

enum class AdamConvention : std::uint8_t { torch, hf, bnb };

/// How a weight takes its update u: w ← w − step_size·u, with decoupled weight decay before or
/// after it. Scalars are computed in double and rounded once to float, as PyTorch rounds a
/// Python scalar: torch's `w.mul_(1 − lr·λ)` is the multiplier, HF's `w.add_(w, alpha=−lr·λ)`
/// the alpha.
struct WeightUpdate {
  float step_size = 0.0f;
  float decay_multiplier = 1.0f;  ///< w ← w·multiplier (1: none)
  float decay_alpha = 0.0f;       ///< w ← w + alpha·w (0: none)
  bool decay_before = true;
};

/// What a rule's update returns: how the weight takes the step, and for GWT's detail
/// normalisation either the per-coefficient denominators (written by the rule) or, for rules
/// without them (Adafactor), one divisor for every detail coefficient.
struct RuleOutput {
  WeightUpdate weight;
  float detail_divisor = 0.0f;  ///< > 0: divide details by this instead of the denominators
};

/// Scalars of one Adam step, computed once per tensor and step.
struct AdamStep {
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float eps;
  float denom_divisor;  ///< sqrt(1−β2^t) for torch, 1 for hf (the raw V)
  WeightUpdate weight;  ///< c = lr/(1−β1^t) (torch) or lr·sqrt(1−β2^t)/(1−β1^t) (hf)
};

/// The Adam rule. Options are run-time hyper-parameters; defaults are torch.optim.AdamW's.
struct Adam {
  struct Options {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-8;
    double weight_decay = 1e-2;
    AdamConvention convention = AdamConvention::torch;
  };
  static constexpr const char* name = "adam";
  static constexpr int moments = 2;

  static void validate(const Options& o) {
    require(std::isfinite(o.lr) && o.lr >= 0, "adam: lr must be finite and >= 0");
    require(std::isfinite(o.beta1) && o.beta1 >= 0 && o.beta1 < 1, "adam: beta1 must be in [0, 1)");
    require(std::isfinite(o.beta2) && o.beta2 >= 0 && o.beta2 < 1, "adam: beta2 must be in [0, 1)");
    require(std::isfinite(o.eps) && o.eps > 0, "adam: eps must be finite and > 0");
    require(std::isfinite(o.weight_decay) && o.weight_decay >= 0,
            "adam: weight_decay must be finite and >= 0");
  }

  /// The scalars of step t = k + 1 (t >= 1). Host and device: the CUDA backend computes the
  /// scalars of a tensor whose count lags after a skipped step on the device, with the same
  /// expressions (the C library's pow/powf on each side; double results rounded to float).
  SLIMGRAD_HOST_DEVICE static AdamStep step_scalars(const Options& o, std::int64_t t) {
    const double bc1 = 1.0 - pow(o.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - pow(o.beta2, static_cast<double>(t));
    AdamStep s{};
    s.beta1 = static_cast<float>(o.beta1);
    s.beta2 = static_cast<float>(o.beta2);
    s.one_minus_beta1 = static_cast<float>(1.0 - o.beta1);
    s.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
    s.eps = static_cast<float>(o.eps);
    if (o.convention == AdamConvention::torch) {
      s.denom_divisor = static_cast<float>(sqrt(bc2));
      s.weight.step_size = static_cast<float>(o.lr / bc1);
      s.weight.decay_multiplier = static_cast<float>(1.0 - o.lr * o.weight_decay);
      s.weight.decay_before = true;
    } else if (o.convention == AdamConvention::bnb) {
      // bitsandbytes (csrc/kernels.cu, kOptimizerStatic8bit2StateBlockwise and
      // kOptimizer32bit2State): the weight decays after the step, and every scalar is a float
      // expression. (1.0f − β) matters beyond rounding: 1 − 0.999f is 0.00099998713, 1.3e-5
      // away from 0.001, and the moments it feeds are re-quantised every step, so torch's
      // scalars would land a fraction of the elements on other 8-bit codes.
      const float b1 = s.beta1, b2 = s.beta2, lr = static_cast<float>(o.lr);
      const float tf = static_cast<float>(t);
      const float c1 = 1.0f - powf(b1, tf);
      const float c2 = sqrtf(1.0f - powf(b2, tf));
      s.one_minus_beta1 = 1.0f - b1;
      s.one_minus_beta2 = 1.0f - b2;
      s.eps = c2 * static_cast<float>(o.eps);
      s.denom_divisor = 1.0f;
      s.weight.step_size = (lr * c2) / c1;
      if (o.weight_decay > 0)
        s.weight.decay_multiplier = 1.0f - lr * static_cast<float>(o.weight_decay);
      s.weight.decay_before = false;
    } else {
      s.denom_divisor = 1.0f;
      s.weight.step_size = static_cast<float>(o.lr * sqrt(bc2) / bc1);
      s.weight.decay_alpha = static_cast<float>(-o.lr * o.weight_decay);
      s.weight.decay_before = false;
    }
    return s;
  }
};

/// Moment update for one element, in PyTorch's operation order:
/// m ← m·β1 + (1−β1)·g;  v ← v·β2 + (1−β2)·g·g.
SLIMGRAD_HOST_DEVICE inline void adam_moments(float g, float& m, float& v, const AdamStep& s) {
  m = m * s.beta1 + s.one_minus_beta1 * g;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
}

/// The denominator D = sqrt(v)/divisor + ε (GWT divides its details by it too).
SLIMGRAD_HOST_DEVICE inline float adam_denominator(float v, const AdamStep& s) {
  return sqrtf(v) / s.denom_divisor + s.eps;
}

/// w after taking update u (already scaled by α): decay and step in the convention's order.
SLIMGRAD_HOST_DEVICE inline float apply_update(float w, float u, const WeightUpdate& p) {
  if (p.decay_before) {
    if (p.decay_multiplier != 1.0f) w = w * p.decay_multiplier;
    if (p.decay_alpha != 0.0f) w = w + p.decay_alpha * w;
    return w + (-p.step_size) * u;
  }
  w = w + (-p.step_size) * u;
  if (p.decay_multiplier != 1.0f) w = w * p.decay_multiplier;
  if (p.decay_alpha != 0.0f) w = w + p.decay_alpha * w;
  return w;
}

}  // namespace slimgrad::optim
