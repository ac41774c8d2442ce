// slimgrad/activation/linear.hpp — a linear layer that saves a compressed activation, for
// trainers that own their forward and backward passes (llm.c style).
//
// The trainer owns X, W, b, Y, dY, dX, dW and db (row-major, tokens × features; W is out × in,
// PyTorch's layout) and hands views to the layer; the layer owns only what it saves between
// forward and backward (and the codec's small state: VeLoRA's v, CompAct's P). Usage:
//
//   activation::Linear<activation::CompAct> fc("layers.0.mlp.up_proj", n, m, {.ratio = 0.25});
//   fc.set_step(opt.step_count("layers.0.mlp.up_proj"));  // once per optimizer step
//   fc.forward(x, w, b, y);                               // per micro-batch
//   fc.backward(dy, w, dx, dw, db);                       // dW, db accumulate (+=)
//
// dW has grad_shape(): out × in for None and VeLoRA, out × r for CompAct (the gradient the
// `compact` recipe takes as it is). The CPU implementation is backend/cpu/activation.hpp, which
// also provides activation::AnyLinear (the codec chosen at run time).
#pragma once

#include <type_traits>

#include "../core/backend.hpp"
#include "codecs.hpp"

namespace slimgrad::activation {

/// The primary template: only backends with an implementation define the class.
template <class Codec, class Backend = backend::cpu>
class Linear {
  static_assert(!std::is_same_v<Backend, Backend>,
                "slimgrad: activation::Linear has no implementation for this backend. For "
                "backend::cpu include <slimgrad/slimgrad.hpp>.");
};

}  // namespace slimgrad::activation
