// slimgrad/backend/cpu/identity.hpp — the identity transform on the CPU backend.
#pragma once

#include <cstdint>

#include "../../core/concepts.hpp"
#include "../../transforms/identity.hpp"
#include "common.hpp"

namespace slimgrad {

template <>
struct impl<transforms::Identity, backend::cpu> {
  struct State {};

  impl() = default;
  explicit impl(const transforms::Identity::Options&) {}

  State init(Shape g, std::uint64_t /*tensor_id*/) const {
    require(g.rows > 0 && g.cols > 0, "identity transform: zero-size tensor");
    return {};
  }
  Shape coeff_shape(Shape g) const { return transforms::Identity::coeff_shape(g); }
  std::size_t state_bytes(Shape) const { return 0; }
  HostView<float> tracked(HostView<float> coeffs) const { return coeffs; }
  HostView<const float> tracked(HostView<const float> coeffs) const { return coeffs; }
  bool refresh(State&, HostView<const float>, index_t) { return false; }

  void forward(const State&, HostView<const float> g, HostView<float> coeffs) {
    cpu::require_shape(coeffs, g.shape(), "identity forward output");
    cpu::as_eigen(coeffs) = cpu::as_eigen(g);
  }
  void inverse(const State&, HostView<const float> coeffs, HostView<float> out) {
    cpu::require_shape(out, coeffs.shape(), "identity inverse output");
    cpu::as_eigen(out) = cpu::as_eigen(coeffs);
  }
};

static_assert(transform_policy<transforms::Identity, backend::cpu>);

}  // namespace slimgrad
