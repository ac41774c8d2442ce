// slimgrad/optim/optimizer.hpp — the composition: Optimizer<Rule, Transform, Store, Backend,
// Residual> (design.md §1, §2).
//
// Structure is in the template arguments, numbers at run time. One optimizer object serves a
// set of named parameters — views of the caller's memory, row-major m×n in PyTorch's out×in
// layout (a 1-D tensor is 1×n) — and creates each parameter's state lazily, keyed by its name.
// Parameters that the transform should not compress (1-D, embedding-like or too small, see
// Fallback) take the plain rule: the same Rule and Store on the identity transform, with no
// scale and no limiter, as the peers' param groups do.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../core/backend.hpp"
#include "../core/view.hpp"
#include "residual.hpp"

namespace slimgrad {

/// Whether a parameter goes through the transform.
enum class ParamRole : std::uint8_t {
  automatic,   ///< decided by Fallback from its shape
  compressed,  ///< always through the transform (an error if the transform cannot take it)
  plain        ///< always the plain rule
};

/// A parameter handed to step(): its name (the key of its state), its weights and its gradient.
struct Param {
  std::string_view name;
  HostView<float> weight;
  HostView<const float> grad;
};

/// What a step did.
struct StepReport {
  std::vector<std::string> skipped;  ///< tensors whose gradient held NaN or Inf: untouched
  index_t stepped = 0;               ///< tensors that took the step
};

/// When ParamRole::automatic keeps a tensor on the plain rule.
struct Fallback {
  index_t min_dim = 2;       ///< fewer rows or columns than this (1-D tensors): plain
  double max_aspect = 16.0;  ///< max(m,n)/min(m,n) above this (embeddings, heads): plain
  index_t min_size = 4096;   ///< fewer elements than this: plain
};

/// The primary template: only backends with an implementation define the class.
template <class Rule, class Transform, class Store, class Backend = backend::cpu,
          class Residual = residual::Drop>
class Optimizer {
  static_assert(!std::is_same_v<Backend, Backend>,
                "slimgrad: Optimizer has no implementation for this backend. For backend::cpu "
                "include <slimgrad/slimgrad.hpp>.");
};

}  // namespace slimgrad
