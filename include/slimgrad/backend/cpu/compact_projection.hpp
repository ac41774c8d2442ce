// slimgrad/backend/cpu/compact_projection.hpp — CompAct's projection on the CPU backend.
//
// The matrix is RandomProjection's (right side, rank resolved per tensor, the same key and
// stddev), so the bits are RandomProjection's for the same (seed, tensor id, epoch). Unless
// keep_matrix holds P, products with P are computed tile by tile (tile_rows rows of P at a time,
// regenerated in parallel), so no r×n matrix is ever held. A CountSketch (Sketch::count) is never
// a matrix: its n (row, sign) pairs are regenerated per call, A Pᵀ is a scatter-add of each row of
// A (in column order, so every run sums in the same order) and N P a signed gather.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../../core/concepts.hpp"
#include "../../transforms/compact_projection.hpp"
#include "common.hpp"
#include "random_projection.hpp"

namespace slimgrad {

template <>
struct impl<transforms::CompactProjection, backend::cpu> {
  using Policy = transforms::CompactProjection;
  using Random = impl<transforms::RandomProjection, backend::cpu>;

  /// RandomProjection's state (side always right) plus this tensor's rank.
  struct State : Random::State {
    index_t rank = 0;
  };

  Policy::Options options;

  impl() : impl(Policy::Options{}) {}
  explicit impl(const Policy::Options& o) : options(o) {
    require(o.rank >= 0,
            "compact projection: rank must be >= 0 (0: use ratio), got " + std::to_string(o.rank));
    require(o.rank > 0 || (std::isfinite(o.ratio) && o.ratio > 0),
            "compact projection: ratio must be finite and > 0 when rank is 0");
    require(o.update_gap >= 1, "compact projection: update_gap must be at least 1, got " +
                                   std::to_string(o.update_gap));
    require(!(o.keep_matrix && o.sketch == transforms::Sketch::count),
            "compact projection: keep_matrix applies to the gaussian sketch only (a count sketch "
            "is regenerated in n Philox calls)");
  }

  /// The rank for a tensor of shape g; throws unless 1 <= r < n (r = n would compress nothing
  /// and make an m×r gradient indistinguishable from an m×n one).
  index_t rank_for(Shape g) const {
    const index_t r = Policy::rank_for(g.cols, options);
    require(r >= 1 && r < g.cols, "compact projection: rank " + std::to_string(r) +
                                      " is out of range for in_features " + std::to_string(g.cols) +
                                      " (1 <= rank < in_features)");
    return r;
  }

  State init(Shape g, std::uint64_t tensor_id) const {
    require(g.rows > 0 && g.cols > 0, "compact projection: zero-size tensor");
    State s;
    s.rank = rank_for(g);
    require(static_cast<std::uint64_t>(s.rank * g.cols) < random::max_elements,
            "compact projection: matrix too large for one Philox stream");
    s.shape = g;
    s.side = Side::right;
    s.stream = tensor_id;
    return s;
  }

  Shape coeff_shape(Shape g) const { return {g.rows, Policy::rank_for(g.cols, options)}; }
  std::size_t state_bytes(Shape g) const {
    const std::size_t seed_and_epoch = 16;
    if (!options.keep_matrix) return seed_and_epoch;
    return seed_and_epoch + static_cast<std::size_t>(coeff_shape(g).cols * g.cols) * sizeof(float);
  }
  HostView<float> tracked(HostView<float> coeffs) const { return coeffs; }
  HostView<const float> tracked(HostView<const float> coeffs) const { return coeffs; }

  /// The key naming the matrix of `state`'s current epoch (RandomProjection's).
  random::Key key(const State& s) const { return random(s).key(s); }

  /// Resamples when k % update_gap == 0. The gradient is not read, so it may be the m×n
  /// gradient or the m×r one the activation codec produced.
  bool refresh(State& s, HostView<const float> /*g*/, index_t step) {
    require(step >= 0, "compact projection: negative step");
    if (s.ready && step % options.update_gap != 0) return false;
    set_epoch(s, transforms::RandomProjection::epoch_at(step, options.update_gap));
    return true;
  }

  /// Makes `epoch` current (regenerating the kept matrix if it changed).
  void set_epoch(State& s, std::uint32_t epoch) const {
    if (s.ready && s.epoch == epoch) return;
    s.epoch = epoch;
    s.ready = true;
    if (options.keep_matrix) generate(s, s.matrix);
  }

  /// coeffs = G Pᵀ (the optimizer's path for a full-size gradient).
  void forward(const State& s, HostView<const float> g, HostView<float> coeffs) {
    check_ready(s);
    cpu::require_shape(g, s.shape, "compact projection gradient");
    cpu::require_shape(coeffs, Shape{s.shape.rows, s.rank}, "compact projection coefficients");
    times_transpose(s, g, coeffs);
  }

  /// out = N P.
  void inverse(const State& s, HostView<const float> coeffs, HostView<float> out) {
    check_ready(s);
    cpu::require_shape(coeffs, Shape{s.shape.rows, s.rank}, "compact projection coefficients");
    cpu::require_shape(out, s.shape, "compact projection output");
    if (options.sketch == transforms::Sketch::count) {
      const auto& col = count_columns(s);
      cpu::parallel_for(out.rows, out.cols, [&](index_t i) {
        const float* n = coeffs.row(i);
        float* o = out.row(i);
        for (index_t j = 0; j < out.cols; ++j)
          o[j] = col[static_cast<std::size_t>(j)].sign * n[col[static_cast<std::size_t>(j)].row];
      });
      return;
    }
    for_each_tile(s, [&](index_t r0, const cpu::ConstMapMatrix& p) {
      const auto n = cpu::as_eigen(coeffs).middleCols(r0, p.rows());
      if (r0 == 0)
        cpu::as_eigen(out).noalias() = n * p;
      else
        cpu::as_eigen(out).noalias() += n * p;
    });
  }

  /// out = A Pᵀ for any A with n columns (the activation codec's Z = X Pᵀ). No checks.
  void times_transpose(const State& s, HostView<const float> a, HostView<float> out) {
    if (options.sketch == transforms::Sketch::count) {
      const auto& col = count_columns(s);
      cpu::parallel_for(a.rows, a.cols * 2, [&](index_t t) {
        const float* x = a.row(t);
        float* o = out.row(t);
        std::fill(o, o + out.cols, 0.0f);
        for (index_t j = 0; j < a.cols; ++j)
          o[col[static_cast<std::size_t>(j)].row] += col[static_cast<std::size_t>(j)].sign * x[j];
      });
      return;
    }
    for_each_tile(s, [&](index_t r0, const cpu::ConstMapMatrix& p) {
      cpu::as_eigen(out).middleCols(r0, p.rows()).noalias() = cpu::as_eigen(a) * p.transpose();
    });
  }

  void restore(State& s) const {
    if (s.ready && options.keep_matrix) generate(s, s.matrix);
  }

  /// Writes P (r×n) of the current epoch into `out`.
  void generate(const State& s, cpu::RowMatrix& out) const {
    if (options.sketch == transforms::Sketch::gaussian) return random(s).generate(s, out);
    out.setZero(s.rank, s.shape.cols);
    const random::Key k = key(s);
    for (index_t j = 0; j < s.shape.cols; ++j) {
      const auto e = Policy::count_entry(k, s.rank, static_cast<std::uint64_t>(j));
      out(e.row, j) = e.sign;
    }
  }

  /// Rows of P regenerated per tile when P is not kept.
  static constexpr index_t tile_rows = 128;

  /// Bytes of the tile buffer (or the count sketch's column table) held now, reused by calls.
  std::size_t workspace_bytes() const {
    return static_cast<std::size_t>(tile_.size()) * sizeof(float) +
           columns_.size() * sizeof(Policy::CountEntry);
  }

 private:
  cpu::RowMatrix tile_;                      // tile_rows × n rows of a Gaussian P
  std::vector<Policy::CountEntry> columns_;  // a count sketch's (row, sign) per column

  // The count sketch's column table for state's epoch (n Philox blocks; cheap next to any use).
  const std::vector<Policy::CountEntry>& count_columns(const State& s) {
    const random::Key k = key(s);
    columns_.resize(static_cast<std::size_t>(s.shape.cols));
    for (index_t j = 0; j < s.shape.cols; ++j)
      columns_[static_cast<std::size_t>(j)] =
          Policy::count_entry(k, s.rank, static_cast<std::uint64_t>(j));
    return columns_;
  }

  // f(r0, rows [r0, r0 + t) of P) over all of P: the kept matrix at once, or regenerated tiles.
  template <class F>
  void for_each_tile(const State& s, F&& f) {
    const index_t n = s.shape.cols;
    if (options.keep_matrix) {
      f(0, cpu::ConstMapMatrix(s.matrix.data(), s.rank, n, Eigen::OuterStride<>(n)));
      return;
    }
    const random::Key k = key(s);
    const double stddev = transforms::RandomProjection::stddev(s.rank);
    tile_.resize(std::min(tile_rows, s.rank), n);
    for (index_t r0 = 0; r0 < s.rank; r0 += tile_rows) {
      const index_t t = std::min(tile_rows, s.rank - r0);
      float* base = tile_.data();
      cpu::parallel_for(t, n * 16, [&](index_t i) {
        random::fill_gaussian(HostView<float>(base + i * n, 1, n, n), k, stddev, r0 + i);
      });
      f(r0, cpu::ConstMapMatrix(base, t, n, Eigen::OuterStride<>(n)));
    }
  }

  Random random(const State& s) const {
    return Random({.rank = s.rank,
                   .update_gap = options.update_gap,
                   .proj_type = ProjType::right,
                   .seed = options.seed,
                   .keep_matrix = options.keep_matrix});
  }
  void check_ready(const State& s) const {
    require(s.ready, "compact projection: refresh() must run (at step 0) before forward/inverse");
  }
};

static_assert(transform_policy<transforms::CompactProjection, backend::cpu>);

}  // namespace slimgrad
