// slimgrad/backend/cpu/random_projection.hpp — seeded Gaussian projection on the CPU backend.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../../core/concepts.hpp"
#include "../../transforms/random_projection.hpp"
#include "common.hpp"

namespace slimgrad {

template <>
struct impl<transforms::RandomProjection, backend::cpu> {
  using Policy = transforms::RandomProjection;

  struct State {
    Shape shape;
    Side side = Side::right;
    std::uint64_t stream = 0;  ///< the tensor id
    std::uint32_t epoch = 0;
    bool ready = false;     ///< a matrix has been generated (refresh ran at least once)
    cpu::RowMatrix matrix;  ///< P, kept only when Options::keep_matrix
  };

  Policy::Options options;

  impl() : impl(Policy::Options{}) {}
  explicit impl(const Policy::Options& o) : options(o) {
    require(o.rank >= 1,
            "random projection: rank must be at least 1, got " + std::to_string(o.rank));
    require(o.update_gap >= 1, "random projection: update_gap must be at least 1, got " +
                                   std::to_string(o.update_gap));
  }

  State init(Shape g, std::uint64_t tensor_id) const {
    require(g.rows > 0 && g.cols > 0, "random projection: zero-size tensor");
    State s;
    s.shape = g;
    s.side = side_for(g, options.proj_type);
    s.stream = tensor_id;
    const index_t dim = projected_dim(g, s.side);
    require(options.rank <= dim, "random projection: rank " + std::to_string(options.rank) +
                                     " exceeds the projected dimension " + std::to_string(dim) +
                                     " of a " + std::to_string(g.rows) + "x" +
                                     std::to_string(g.cols) + " tensor");
    require(static_cast<std::uint64_t>(options.rank * dim) < random::max_elements,
            "random projection: matrix too large for one Philox stream");
    return s;
  }

  Shape coeff_shape(Shape g) const {
    return projected_shape(g, side_for(g, options.proj_type), options.rank);
  }
  std::size_t state_bytes(Shape g) const {
    const std::size_t seed_and_epoch = 16;
    if (!options.keep_matrix) return seed_and_epoch;
    const Shape p = Policy::matrix_shape(g, side_for(g, options.proj_type), options.rank);
    return seed_and_epoch + static_cast<std::size_t>(p.size()) * sizeof(float);
  }
  HostView<float> tracked(HostView<float> coeffs) const { return coeffs; }
  HostView<const float> tracked(HostView<const float> coeffs) const { return coeffs; }

  /// The key naming the matrix of `state`'s current epoch.
  random::Key key(const State& s) const { return {options.seed, s.stream, s.epoch}; }

  /// Resamples when k % update_gap == 0 (k counted before the increment). The gradient is not
  /// read: the matrix depends on (seed, tensor id, k / update_gap) only.
  bool refresh(State& s, HostView<const float> g, index_t step) {
    cpu::require_shape(g, s.shape, "random projection gradient");
    require(step >= 0, "random projection: negative step");
    if (s.ready && step % options.update_gap != 0) return false;
    s.epoch = Policy::epoch_at(step, options.update_gap);
    s.ready = true;
    if (options.keep_matrix) generate(s, s.matrix);
    return true;
  }

  /// coeffs = G Pᵀ (right) or Pᵀ G (left).
  void forward(const State& s, HostView<const float> g, HostView<float> coeffs) {
    check_ready(s);
    cpu::require_shape(g, s.shape, "random projection gradient");
    cpu::require_shape(coeffs, coeff_shape(s.shape), "random projection coefficients");
    const cpu::RowMatrix& p = matrix(s);
    if (s.side == Side::right)
      cpu::as_eigen(coeffs).noalias() = cpu::as_eigen(g) * p.transpose();
    else
      cpu::as_eigen(coeffs).noalias() = p.transpose() * cpu::as_eigen(g);
  }

  /// out = N P (right) or P N (left): the back-map of an update in coefficient space.
  void inverse(const State& s, HostView<const float> coeffs, HostView<float> out) {
    check_ready(s);
    cpu::require_shape(coeffs, coeff_shape(s.shape), "random projection coefficients");
    cpu::require_shape(out, s.shape, "random projection output");
    const cpu::RowMatrix& p = matrix(s);
    if (s.side == Side::right)
      cpu::as_eigen(out).noalias() = cpu::as_eigen(coeffs) * p;
    else
      cpu::as_eigen(out).noalias() = p * cpu::as_eigen(coeffs);
  }

  /// After a checkpoint load (epoch and ready restored): regenerates the kept matrix.
  void restore(State& s) const {
    if (s.ready && options.keep_matrix) generate(s, s.matrix);
  }

  /// Writes P of the current epoch into `out` (shape from Policy::matrix_shape).
  void generate(const State& s, cpu::RowMatrix& out) const {
    const Shape p = Policy::matrix_shape(s.shape, s.side, options.rank);
    out.resize(p.rows, p.cols);
    random::fill_gaussian(cpu::as_view(out), key(s), Policy::stddev(options.rank));
  }

 private:
  cpu::RowMatrix scratch_;  // the regenerated matrix when keep_matrix is off (grown once)

  void check_ready(const State& s) const {
    require(s.ready, "random projection: refresh() must run (at step 0) before forward/inverse");
  }
  const cpu::RowMatrix& matrix(const State& s) {
    if (options.keep_matrix) return s.matrix;
    generate(s, scratch_);
    return scratch_;
  }
};

static_assert(transform_policy<transforms::RandomProjection, backend::cpu>);

}  // namespace slimgrad
