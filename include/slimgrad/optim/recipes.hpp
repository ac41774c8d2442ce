// slimgrad/optim/recipes.hpp — the published methods as compositions (design.md §1), with the
// official defaults so that published hyper-parameters carry over (algorithms.md).
//
// Each recipe is a type alias over the one engine plus a function giving its defaults:
//   recipes::Gwt<>  opt(recipes::gwt_options());
// Compositions no peer offers are spelled the same way, e.g.
//   Optimizer<optim::Adam, transforms::Dwt<transforms::Haar, 2>, state::Q8Block<256>,
//             backend::cpu, residual::WaveletDetails>
#pragma once

#include "../core/backend.hpp"
#include "../state/stores.hpp"
#include "../transforms/compact_projection.hpp"
#include "../transforms/dwt.hpp"
#include "../transforms/grassmann.hpp"
#include "../transforms/identity.hpp"
#include "../transforms/random_projection.hpp"
#include "../transforms/svd_projection.hpp"
#include "adafactor.hpp"
#include "adam.hpp"
#include "flora.hpp"
#include "optimizer.hpp"
#include "residual.hpp"

namespace slimgrad::recipes {

/// torch.optim.AdamW: 8 bytes of fp32 state per parameter.
template <class B = backend::cpu>
using AdamW = Optimizer<optim::Adam, transforms::Identity, state::Fp32, B>;

/// 8-bit blockwise Adam (bitsandbytes, block 256): about 2.03 bytes per parameter.
template <class B = backend::cpu>
using Adam8bit = Optimizer<optim::Adam, transforms::Identity, state::Q8Block<256>, B>;

/// Adafactor with HF transformers' semantics (algorithms.md §6.3): 4(m + n) bytes per matrix.
template <class B = backend::cpu>
using Adafactor = Optimizer<optim::Adafactor, transforms::Identity, state::Fp32, B>;

/// GaLore (algorithms.md §5): Adam on the top-r SVD coefficients, refreshed every T steps.
template <class B = backend::cpu>
using GaLore = Optimizer<optim::Adam, transforms::SvdProjection, state::Fp32, B, residual::Drop>;

/// GWT (algorithms.md §1): Adam on the level-L Haar approximation, details normalised.
template <class B = backend::cpu>
using Gwt = Optimizer<optim::Adam, transforms::Dwt<transforms::Haar, 2>, state::Fp32, B,
                      residual::WaveletDetails>;

/// SubTrack-Grad / SubTrack++ (algorithms.md §2): Grassmann tracking; the SubTrack++ extras
/// (recovery scaling, projection-aware moments) are options.
template <class B = backend::cpu>
using SubTrack = Optimizer<optim::Adam, transforms::Grassmann, state::Fp32, B, residual::Recovery>;

/// APOLLO and APOLLO-Mini (algorithms.md §6.1): Adam in a random rank-r space only estimates a
/// channel- or tensor-wise scale for the raw gradient.
template <class B = backend::cpu>
using Apollo =
    Optimizer<optim::Adam, transforms::RandomProjection, state::Fp32, B, residual::ChannelScale>;

/// CompAct (algorithms.md §4): Adam on the m×r gradient Ĝ = G Pᵀ that activation::CompAct
/// produces (or that the optimizer projects from a full gradient), update W ← W − lr·α·N P with
/// the same regenerated P. Layers CompAct cannot compress (o_proj) take compact_full_path().
template <class B = backend::cpu>
using CompAct =
    Optimizer<optim::Adam, transforms::CompactProjection, state::Fp32, B, residual::Drop>;

/// Flora (algorithms.md §6.4): Adafactor with its momentum compressed by a seeded rank-r
/// projection, resampled every κ steps: m + n + r·max(m, n) floats per compressed matrix.
template <class B = backend::cpu>
using Flora = Optimizer<optim::Flora, transforms::Identity, state::Fp32, B>;

namespace detail {
// The HF-AdamW of the GaLore family: ε = 1e-6, no weight decay (algorithms.md §0.2).
inline optim::Adam::Options hf_adam(double lr) {
  return {.lr = lr,
          .beta1 = 0.9,
          .beta2 = 0.999,
          .eps = 1e-6,
          .weight_decay = 0.0,
          .convention = optim::AdamConvention::hf};
}
}  // namespace detail

/// torch.optim.AdamW's defaults: lr 1e-3, β (0.9, 0.999), ε 1e-8, λ 0.01.
template <class B = backend::cpu>
typename AdamW<B>::Options adamw_options() {
  return {};
}

/// bitsandbytes' AdamW8bit defaults (lr 1e-3, ε 1e-8, λ 0.01) in its kernels' convention
/// (ε·sqrt(1−β2^t), decay after the step, float scalars; tests/optim/test_peers.cpp checks it
/// against the kernels' arithmetic).
template <class B = backend::cpu>
typename Adam8bit<B>::Options adam8bit_options() {
  typename Adam8bit<B>::Options o;
  o.rule.convention = optim::AdamConvention::bnb;
  return o;
}

/// HF transformers' Adafactor defaults: relative step, parameter scaling, no β1.
template <class B = backend::cpu>
typename Adafactor<B>::Options adafactor_options() {
  return {};
}

/// GaLore: rank 128, T 200, α 0.25, lr 0.01, HF-AdamW ε 1e-6 (algorithms.md §5.3).
template <class B = backend::cpu>
typename GaLore<B>::Options galore_options() {
  typename GaLore<B>::Options o;
  o.rule = detail::hf_adam(1e-2);
  o.transform.rank = 128;
  o.transform.update_gap = 200;
  o.residual.scale = 0.25;
  return o;
}

/// GWT: Haar, 2 levels, mode zero, α 0.25, lr 0.01, HF-AdamW ε 1e-6, limiter γ 1.01
/// (algorithms.md §1.2; the official code's defaults).
template <class B = backend::cpu>
typename Gwt<B>::Options gwt_options() {
  typename Gwt<B>::Options o;
  o.rule = detail::hf_adam(1e-2);
  o.transform.mode = transforms::BoundaryMode::zero;
  o.residual.scale = 0.25;
  o.residual.limiter_gamma = 1.01;
  return o;
}

/// SubTrack-Grad: rank 128, T 200, η 10, α 0.25, lr 1e-3, HF-AdamW ε 1e-6 (algorithms.md
/// §2.2). SubTrack++: set residual.recovery_scaling and residual.projection_aware (γ 1.01).
template <class B = backend::cpu>
typename SubTrack<B>::Options subtrack_options(bool plus_plus = false) {
  typename SubTrack<B>::Options o;
  o.rule = detail::hf_adam(1e-3);
  o.transform.rank = 128;
  o.transform.update_gap = 200;
  o.transform.eta = 10.0;
  o.residual.scale = 0.25;
  o.residual.recovery_scaling = plus_plus;
  o.residual.projection_aware = plus_plus;
  o.residual.limiter_gamma = plus_plus ? 1.01 : 0.0;
  return o;
}

/// CompAct's pretraining defaults (60M–350M): r = n/4, T 50, α 0.25, lr 0.01, no weight decay,
/// P regenerated on every use (the default; keep_matrix=true trades r·n floats for speed);
/// bias-corrected Adam M̂/(sqrt(V̂) + ε) as in the paper's Algorithm 3. SmallAdamW's ε was not
/// visible (algorithms.md §9.12): 1e-6, the GaLore code base's default, is assumed.
template <class B = backend::cpu>
typename CompAct<B>::Options compact_options() {
  typename CompAct<B>::Options o;
  o.rule = {.lr = 1e-2,
            .beta1 = 0.9,
            .beta2 = 0.999,
            .eps = 1e-6,
            .weight_decay = 0.0,
            .convention = optim::AdamConvention::torch};
  o.transform.ratio = 0.25;
  o.transform.update_gap = 50;
  o.residual.scale = 0.25;
  return o;
}

/// CompAct's o_proj scale for 60M–350M (the 1B run uses 1).
inline constexpr double compact_scale_o_proj = 0.5;

/// The override for a layer CompAct does not compress (o_proj, whose input FlashAttention keeps
/// anyway): full gradient and full Adam, the update scaled by α·scale_o_proj as the official
/// code's identity projector does. The scale goes through lr_scale, which is the same update
/// while weight decay is 0 (every CompAct run); with decay it would scale the decay too.
template <class B = backend::cpu>
typename CompAct<B>::Override compact_full_path(const typename CompAct<B>::Options& o,
                                                double scale_o_proj = compact_scale_o_proj) {
  typename CompAct<B>::Override ov;
  ov.role = ParamRole::plain;
  ov.lr_scale = o.residual.scale * scale_o_proj;
  return ov;
}

/// APOLLO: rank 256, channel-wise, scale 1, T 200, lr 0.01, γ 1.01 (algorithms.md §6.1).
template <class B = backend::cpu>
typename Apollo<B>::Options apollo_options() {
  typename Apollo<B>::Options o;
  o.rule = detail::hf_adam(1e-2);
  o.transform.rank = 256;
  o.transform.update_gap = 200;
  o.residual.granularity = residual::ScaleGranularity::channel;
  o.residual.scale = 1.0;
  o.residual.limiter_gamma = 1.01;
  return o;
}

/// APOLLO-Mini: rank 1, tensor-wise, scale 128 (α = √128), T 200, lr 0.01, γ 1.01.
template <class B = backend::cpu>
typename Apollo<B>::Options apollo_mini_options() {
  typename Apollo<B>::Options o = apollo_options<B>();
  o.transform.rank = 1;
  o.residual.granularity = residual::ScaleGranularity::tensor;
  o.residual.scale = 128.0;
  return o;
}

/// Flora: the official defaults (eps (1e-30, 1e-3), clipping 1, decay −0.8, parameter scaling,
/// no relative step, κ 1000) with rank 128, β1 0.9 and lr 1e-3.
template <class B = backend::cpu>
typename Flora<B>::Options flora_options() {
  return {};
}

}  // namespace slimgrad::recipes
