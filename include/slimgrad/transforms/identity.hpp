// slimgrad/transforms/identity.hpp — the identity transform: the optimizer keeps full-size
// state (plain AdamW, Adafactor, 8-bit Adam). State cost: 0 bytes.
#pragma once

#include "../core/view.hpp"

namespace slimgrad::transforms {

/// Coefficients are the gradient itself; every coefficient is tracked.
struct Identity {
  struct Options {};
  static constexpr const char* name = "identity";
  static constexpr Shape coeff_shape(Shape g) { return g; }
};

}  // namespace slimgrad::transforms
