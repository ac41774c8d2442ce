// slimgrad/optim/residual.hpp — what happens to the part of the gradient that carries no state,
// and the norm-growth limiter (design.md §1; algorithms.md §0.3, §1.2, §2.3, §6.1).
//
// One step reads: G → transform → (tracked coefficients C, residual E); the rule turns C into a
// normalised N; the residual policy builds the full-size update U from N, E and the rule's
// statistics; the weight takes W ← W − c·U. The policies:
//   Drop            GaLore: E is discarded, U = α·Expand(N).
//   WaveletDetails  GWT: each detail coefficient is divided by the rule's denominator of its
//                   ancestor approximation coefficient and by the limiter factor ρ, then
//                   U = α·IDWT(NL(N), details).
//   Recovery        Fira / SubTrack++: Λ = (G − Expand(C)) ⊙ φ with per-channel
//                   φ = ‖N‖/‖C‖ on the non-projected side, U = α·Expand(N) + NL(Λ).
//   ChannelScale    APOLLO: U = G ⊙ s, s = ‖N‖/‖C‖ per channel (or per tensor), limited by NL
//                   and scaled by sqrt(scale) before or after the limiter.
// State: one float per tensor for the limiter (when enabled).
#pragma once

#include <cmath>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/error.hpp"

namespace slimgrad::residual {

/// Options shared by every policy: the back-map scale α and the norm-growth limiter γ
/// (γ = 0: off; GWT, APOLLO and SubTrack++ use 1.01).
struct Common {
  double scale = 1.0;
  double limiter_gamma = 0.0;
};

inline void validate(const Common& c) {
  require(std::isfinite(c.scale), "residual: scale must be finite");
  require(c.limiter_gamma == 0.0 || (std::isfinite(c.limiter_gamma) && c.limiter_gamma >= 1.0),
          "residual: limiter_gamma must be 0 (off) or >= 1");
}

struct Drop {
  struct Options : Common {};
  static constexpr const char* name = "drop";
  static constexpr bool needs_raw = false;
  static constexpr bool needs_denominator = false;
};

struct WaveletDetails {
  struct Options : Common {};
  static constexpr const char* name = "wavelet_details";
  static constexpr bool needs_raw = false;
  static constexpr bool needs_denominator = true;
};

/// Options: `recovery_scaling` off makes it Drop (SubTrack-Grad); `projection_aware` rotates
/// the rule's moments into the new basis at every basis change (SubTrack++ §2.3(a); needs a
/// transform whose refresh() reports the rotation, e.g. Grassmann).
struct Recovery {
  struct Options : Common {
    bool recovery_scaling = true;
    bool projection_aware = false;
  };
  static constexpr const char* name = "recovery";
  static constexpr bool needs_raw = true;
  static constexpr bool needs_denominator = false;
};

enum class ScaleGranularity : std::uint8_t { channel, tensor };

struct ChannelScale {
  struct Options : Common {
    ScaleGranularity granularity = ScaleGranularity::channel;
    bool scale_front =
        false;  ///< multiply by sqrt(scale) before the limiter (APOLLO-Mini 60M/130M)
  };
  static constexpr const char* name = "channel_scale";
  static constexpr bool needs_raw = true;
  static constexpr bool needs_denominator = false;
};

/// The norm-growth limiter (Fira; algorithms.md §0.3) for an update of Frobenius norm `norm`:
/// returns the divisor ρ ≥ 1 and updates the remembered norm. `remembered` < 0 (or NaN) means
/// unset. Host/device: the CUDA backend runs it on the device, so a step needs no host sync.
SLIMGRAD_HOST_DEVICE inline double limiter_divisor(double norm, double gamma, float& remembered) {
  if (gamma <= 0.0) return 1.0;
  if (!(remembered >= 0.0f)) {
    remembered = static_cast<float>(norm);
    return 1.0;
  }
  const double ratio = norm / (static_cast<double>(remembered) + 1e-8);
  const double rho = (ratio > gamma ? ratio : gamma) / gamma;  // fmax: a NaN ratio gives gamma
  remembered = static_cast<float>(norm / rho);
  return rho;
}

}  // namespace slimgrad::residual
