// slimgrad/optim/flora.hpp — the Flora rule (Hao, Cao & Mou, "Flora: Low-Rank Adapters Are
// Secretly Gradient Compressors", ICML 2024; algorithms.md §6.4; the official
// flora_opt/optimizers/torch/flora.py).
//
// Adafactor (factored second moment, §6.3) whose first moment is stored compressed by a seeded
// Gaussian projection: for an m×n matrix with min(m, n) ≥ r and max/min ≤ 4, C = P·M (r×n, P
// r×m, when m < n) or C = M·P (m×r, P n×r, otherwise), entries of P N(0, 1/r). Every κ steps
// the projection is redrawn and the momentum transferred, C ← down_new(up_old(C)). Other
// tensors with β1 > 0 keep an uncompressed momentum. The order is the official code's, which
// differs from HF Adafactor's: momentum on the normalised gradient U before the clipping,
//   out = (1−β1)·U + β1·up(C);   C ← β1·C + (1−β1)·down(U);   out ← lr·out / max(1, RMS(out)/d).
// P is never stored: it is drawn from Philox with key (seed, tensor id, epoch); the epoch of the
// output at step t is (t − 1)/κ and that of the accumulation t/κ (the transfer happens at the
// end of a step t ≡ 0 mod κ). The official code draws P with torch.Generator from per-tensor
// integer seeds instead (algorithms.md §8.2: slimgrad uses Philox for every seeded matrix).
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "adafactor.hpp"

namespace slimgrad::optim {

struct Flora {
  /// The official defaults, with β1 = 0.9 and rank 128 (the official code requires lr and rank
  /// and leaves β1 off, which makes it plain Adafactor).
  struct Options {
    double lr = 1e-3;  ///< used only when relative_step is off
    double eps1 = 1e-30;
    double eps2 = 1e-3;
    double clip_threshold = 1.0;
    double decay_rate = -0.8;
    double beta1 = 0.9;  ///< 0: no first moment (then Flora is Adafactor)
    double weight_decay = 0.0;
    bool relative_step = false;
    bool scale_parameter = true;
    bool warmup_init = false;
    index_t rank = 128;      ///< r of the momentum projection
    index_t kappa = 1000;    ///< steps between projection resamples
    std::uint64_t seed = 0;  ///< Philox seed of the projections
  };
  static constexpr const char* name = "flora";

  static void validate(const Options& o) {
    Adafactor::validate(adafactor(o));
    require(o.rank >= 1, "flora: rank must be >= 1");
    require(o.kappa >= 1, "flora: kappa must be >= 1");
  }

  /// The Adafactor settings Flora shares (step size, β̂2, clipping).
  static Adafactor::Options adafactor(const Options& o) {
    Adafactor::Options a;
    a.lr = o.lr;
    a.eps1 = o.eps1;
    a.eps2 = o.eps2;
    a.clip_threshold = o.clip_threshold;
    a.decay_rate = o.decay_rate;
    a.beta1 = o.beta1;
    a.weight_decay = o.weight_decay;
    a.relative_step = o.relative_step;
    a.scale_parameter = o.scale_parameter;
    a.warmup_init = o.warmup_init;
    return a;
  }

  /// Whether a tensor of `shape` keeps its momentum compressed (the official _get_options:
  /// a matrix, β1 > 0, min(m, n) ≥ r, max/min ≤ 4, which rules out embeddings).
  static bool compressed(const Options& o, Shape shape) {
    const index_t lo = shape.rows < shape.cols ? shape.rows : shape.cols;
    const index_t hi = shape.rows < shape.cols ? shape.cols : shape.rows;
    return o.beta1 > 0 && lo > 1 && lo >= o.rank && hi <= 4 * lo;
  }
  /// The compressed momentum's shape: r×n when m < n (left projection), else m×r.
  static Shape compressed_shape(const Options& o, Shape shape) {
    return shape.rows < shape.cols ? Shape{o.rank, shape.cols} : Shape{shape.rows, o.rank};
  }
};

}  // namespace slimgrad::optim
