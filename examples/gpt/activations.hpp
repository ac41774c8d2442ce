// examples/gpt/activations.hpp — `--activations none|velora|compact`: which ActivationSaver each
// linear layer of the model uses.
#pragma once

#include <cstdint>
#include <slimgrad/core/error.hpp>
#include <string>
#include <vector>

#include "model.hpp"

namespace gpt {

/// Installs the savers named by `kind` on every attention and MLP projection of `model`.
/// Throws a sentence for an unknown kind or setting.
template <class S>
void configure_activations(Model<S>& model, const std::string& kind,
                           const std::vector<std::string>& settings, std::uint64_t seed) {
  (void)model;
  (void)seed;
  if (kind == "none") {
    slimgrad::require(settings.empty(), "--activations none takes no --act-set settings");
    return;
  }
  slimgrad::require(kind != "velora" && kind != "compact",
                    "--activations " + kind + " is not available in this build yet");
  throw slimgrad::Error("slimgrad: unknown --activations '" + kind +
                        "' (expected none, velora or compact)");
}

}  // namespace gpt
