// slimgrad/core/concepts.hpp — the roles, named as concepts.
//
// A Transform maps a gradient G (m×n) to a coefficient buffer and maps an update back
// (design.md §1). Its leading block of coefficients ("tracked") carries optimizer state; the
// rest, if any, is the residual that a residual policy handles (GWT's details). Projections
// have no stored residual: the optimizer forms G − back(forward(G)) when a policy needs it.
//
// A transform descriptor T (e.g. transforms::Dwt<Haar, 2>) holds structure in its type and
// hyper-parameters in T::Options; impl<T, Backend> (backend/<name>/) runs it. The contract of
// impl<T, Backend>, for views V = MatrixView<float, space> and CV = MatrixView<const float, space>:
//
//   impl(const T::Options&)                  validates the options (Error on bad values)
//   State init(Shape g, uint64_t tensor_id)  per-tensor state; validates the shape
//   Shape coeff_shape(Shape g)               shape forward() writes
//   CV/V  tracked(coeffs)                     the leading block that carries optimizer state
//   size_t state_bytes(Shape g)              bytes of per-tensor transform state (basis, ...)
//   bool  refresh(State&, CV G, index_t k)   update the basis/seed when due at step k (k ≡ 0
//                                            mod T, counted before the increment); true if it did
//   void  forward(const State&, CV G, V coeffs)
//   void  inverse(const State&, CV coeffs, V out)   exact inverse (DWT) or back-projection
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "backend.hpp"
#include "view.hpp"

namespace slimgrad {

/// A backend tag: a type with backend_traits.
template <class B>
concept backend_tag = requires {
  typename backend_traits<B>::memory_space;
};

template <class B>
using view_t = MatrixView<float, typename backend_traits<B>::memory_space>;
template <class B>
using const_view_t = MatrixView<const float, typename backend_traits<B>::memory_space>;

/// impl<T, B> satisfies the Transform contract above.
template <class T, class B>
concept transform_policy = backend_tag<B> &&
    requires(impl<T, B> x, const impl<T, B> cx, typename impl<T, B>::State s,
             const typename T::Options& o, Shape shape, std::uint64_t id, const_view_t<B> cg,
             view_t<B> g, index_t k) {
  typename T::Options;
  { cx.init(shape, id) } -> std::same_as<typename impl<T, B>::State>;
  { cx.coeff_shape(shape) } -> std::same_as<Shape>;
  { cx.state_bytes(shape) } -> std::convertible_to<std::size_t>;
  { cx.tracked(g) } -> std::same_as<view_t<B>>;
  { x.refresh(s, cg, k) } -> std::same_as<bool>;
  x.forward(s, cg, g);
  x.inverse(s, cg, g);
};

}  // namespace slimgrad
