// slimgrad/activation/codecs.hpp — activation codecs: what a linear layer saves for its
// backward pass (algorithms.md §3, §4).
//
// A linear layer Y = X Wᵀ + b (X: tokens × n, W: m × n) normally keeps X for dW = dYᵀ X. A codec
// keeps a compressed form of X instead and computes the weight gradient from it; dX = dY W and
// db = Σ dY stay exact. The descriptors below hold the options and the per-element math that
// every backend shares; impl<Codec, Backend> (backend/<name>/activation.hpp) runs them.
//
//   None     keeps X (n floats per token); dW = dYᵀ X exactly.
//   VeLoRA   cuts each token into G sub-tokens of D' = n/G features and keeps each one's
//            projection z on a unit vector v ∈ R^{D'} (G floats per token);
//            dW = s · dYᵀ (z ⊗ v), i.e. dW[i, g·D' + j] = s · H[i, g] · v[j] with H = dYᵀ Z.
//   CompAct  keeps Z = X Pᵀ with P the seeded r×n Gaussian of transforms::CompactProjection
//            (r floats per token); the weight gradient is the m×r Ĝ = dYᵀ Z = G Pᵀ, which the
//            `compact` recipe consumes directly.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/concepts.hpp"
#include "../core/config.hpp"
#include "../core/philox.hpp"
#include "../core/view.hpp"
#include "../transforms/compact_projection.hpp"

namespace slimgrad::activation {

/// The codec contract: impl<C, B>, for views V = view_t<B> and CV = const_view_t<B>:
///
///   impl(Shape weight, const C::Options&, uint64_t tensor_id)   validates (Error on bad input)
///   Shape   grad_shape()          the weight gradient's shape (out×in, or out×r)
///   index_t saved_cols()          what is saved per token, in floats
///   size_t  state_bytes()         the codec's own state (v, a kept P)
///   void    set_step(int64_t k)   the optimizer step the next forwards belong to
///   void    compress(CV X, V saved)                 saved = the compressed X (tokens × saved_cols)
///   void    weight_grad(CV dY, CV saved, V dW)      dW += the weight gradient
///   vector<float> save_state(); void load_state(span<const float>)   for checkpoints
template <class C, class B>
concept codec_policy = backend_tag<B> &&
    requires(impl<C, B> x, const impl<C, B> cx, const_view_t<B> cv, view_t<B> v, std::int64_t k) {
  typename C::Options;
  { cx.grad_shape() } -> std::same_as<Shape>;
  { cx.saved_cols() } -> std::same_as<index_t>;
  { cx.state_bytes() } -> std::convertible_to<std::size_t>;
  x.set_step(k);
  x.compress(cv, v);
  x.weight_grad(cv, cv, v);
};

/// The exact layer: saves the whole input.
struct None {
  struct Options {};
  static constexpr const char* name = "none";
  static std::size_t saved_bytes_per_token(index_t in_features, const Options&) {
    return static_cast<std::size_t>(in_features) * sizeof(float);
  }
};

/// How VeLoRA's projection vector v is chosen (algorithms.md §3.1 step 1).
enum class VeloraInit : std::uint8_t {
  batch_average_once,  ///< mean of the first training batch's normalised sub-tokens, then frozen
  batch_average        ///< recomputed from every training batch
};

/// VeLoRA (arXiv 2405.17991): rank-1 projection of sub-tokens.
struct VeLoRA {
  struct Options {
    index_t groups = 1;  ///< G sub-tokens per token; must divide in_features
    double scale = 1.0;  ///< velora_scale s, multiplies the weight gradient
    VeloraInit init = VeloraInit::batch_average_once;
    std::uint64_t seed = 0;  ///< the random unit placeholder used until a batch sets v
  };
  static constexpr const char* name = "velora";
  /// z: G floats per token (the paper stores fp16; slimgrad keeps fp32).
  static std::size_t saved_bytes_per_token(index_t /*in_features*/, const Options& o) {
    return static_cast<std::size_t>(o.groups) * sizeof(float);
  }
  /// z of one sub-token: its dot product with v (D' features).
  SLIMGRAD_HOST_DEVICE static float project(const float* sub, const float* v, index_t d) {
    float z = 0.0f;
    for (index_t j = 0; j < d; ++j)
      z += sub[j] * v[j];
    return z;
  }

  /// The placeholder v until a training batch sets it: a random unit vector (as the paper's
  /// code), Philox-named by (seed, tensor id, 0) so every backend starts from the same bits.
  static std::vector<float> placeholder(index_t d, std::uint64_t seed, std::uint64_t tensor_id) {
    std::vector<float> v(static_cast<std::size_t>(d));
    random::fill_gaussian(host_view(v.data(), 1, d), {seed, tensor_id, 0}, 1.0);
    double norm = 0.0;
    for (float e : v)
      norm += random::detail::mul_rn(e, e);
    norm = std::sqrt(norm);
    for (float& e : v)
      e = static_cast<float>(e / norm);
    return v;
  }

  // batch_average's v = the normalised sum of a batch's sub-tokens, in double, summed in one
  // fixed order that every backend follows (so v has the same bits everywhere): tokens in chunks
  // of init_chunk rows, each chunk's sum over (token, group) in order, then the chunks in order.

  /// Tokens per partial sum of the v initialisation.
  static constexpr index_t init_chunk = 16;
  /// Feature j of the sum of the sub-tokens of `rows` tokens (row i at x + i·ld).
  SLIMGRAD_HOST_DEVICE static double chunk_sum(const float* x, index_t ld, index_t rows,
                                               index_t groups, index_t d, index_t j) {
    double s = 0.0;
    for (index_t i = 0; i < rows; ++i)
      for (index_t k = 0; k < groups; ++k)
        s += static_cast<double>(x[i * ld + k * d + j]);
    return s;
  }
  /// The norm of the summed sub-token (D' values, in order), 0 if it cannot be normalised (a
  /// batch whose mean is zero or not finite leaves v as it was).
  SLIMGRAD_HOST_DEVICE static double sum_norm(const double* sum, index_t d) {
    double n2 = 0.0;
    for (index_t j = 0; j < d; ++j)
      n2 += random::detail::mul_rn(sum[j], sum[j]);
    const double norm = random::detail::sqrt_rn(n2);
    return norm > 0 && norm <= 1.79769313486231570815e308 ? norm : 0.0;
  }

  /// One element of the expanded weight gradient: dW[i, g·D' + j] += s·H[i, g]·v[j], with
  /// f = s·H[i, g] computed once per (i, g).
  SLIMGRAD_HOST_DEVICE static float expand(float dw, float f, float vj) { return dw + f * vj; }
};

/// CompAct (arXiv 2410.15352): a seeded Gaussian sketch of the input; the optimizer side is
/// transforms::CompactProjection with the same Options (so the same P).
struct CompAct {
  using Options = transforms::CompactProjection::Options;
  static constexpr const char* name = "compact";
  static std::size_t saved_bytes_per_token(index_t in_features, const Options& o) {
    return static_cast<std::size_t>(transforms::CompactProjection::rank_for(in_features, o)) *
           sizeof(float);
  }
};

}  // namespace slimgrad::activation
