// slimgrad/optim/adafactor.hpp — the Adafactor rule with HF transformers' semantics
// (Shazeer & Stern 2018; algorithms.md §6.3; the copy in galore_torch/adafactor.py).
//
// Second moment factored into row and column means for matrices (4(m + n) bytes), elementwise
// for vectors; update clipping by its RMS; relative step size and parameter scaling; optional
// first moment β1 (4 bytes per element in the store's format). The step size ρ and the clipping
// are folded into N, so the weight takes W ← W − ρλW − N.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../core/error.hpp"
#include "adam.hpp"

namespace slimgrad::optim {

struct Adafactor {
  /// HF transformers' defaults (relative step on, parameter scaling on, no β1).
  struct Options {
    double lr = 1e-3;  ///< used only when relative_step is off
    double eps1 = 1e-30;
    double eps2 = 1e-3;
    double clip_threshold = 1.0;
    double decay_rate = -0.8;
    double beta1 = 0.0;  ///< 0: no first moment (HF's beta1=None)
    double weight_decay = 0.0;
    bool relative_step = true;
    bool scale_parameter = true;
    bool warmup_init = false;
  };
  static constexpr const char* name = "adafactor";

  static void validate(const Options& o) {
    require(std::isfinite(o.lr) && o.lr >= 0, "adafactor: lr must be finite and >= 0");
    require(std::isfinite(o.eps1) && o.eps1 >= 0, "adafactor: eps1 must be finite and >= 0");
    require(std::isfinite(o.eps2) && o.eps2 >= 0, "adafactor: eps2 must be finite and >= 0");
    require(std::isfinite(o.clip_threshold) && o.clip_threshold > 0,
            "adafactor: clip_threshold must be finite and > 0");
    require(std::isfinite(o.decay_rate) && o.decay_rate < 0, "adafactor: decay_rate must be < 0");
    require(std::isfinite(o.beta1) && o.beta1 >= 0 && o.beta1 < 1,
            "adafactor: beta1 must be in [0, 1) (0: no first moment)");
    require(std::isfinite(o.weight_decay) && o.weight_decay >= 0,
            "adafactor: weight_decay must be finite and >= 0");
    require(!o.warmup_init || o.relative_step, "adafactor: warmup_init needs relative_step");
  }

  /// ρ of step t: HF's _get_lr, with rms_w the RMS of the weights before the update.
  static double step_size(const Options& o, std::int64_t t, double rms_w) {
    double rel = o.lr;
    if (o.relative_step) {
      const double min_step = o.warmup_init ? 1e-6 * static_cast<double>(t) : 1e-2;
      rel = std::min(min_step, 1.0 / std::sqrt(static_cast<double>(t)));
    }
    const double scale = o.scale_parameter ? std::max(o.eps2, rms_w) : 1.0;
    return scale * rel;
  }
  /// β̂2 of step t: 1 − t^decay_rate.
  static double beta2_hat(const Options& o, std::int64_t t) {
    return 1.0 - std::pow(static_cast<double>(t), o.decay_rate);
  }
};

}  // namespace slimgrad::optim
