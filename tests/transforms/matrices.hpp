// tests/transforms/matrices.hpp — the random matrices and double-precision views that the
// projection tests (SVD, Grassmann) build their references from.
#pragma once

#include <Eigen/Dense>
#include <cstdint>
#include <random>
#include <slimgrad/backend/cpu/common.hpp>
#include <vector>

namespace slimgrad::test {

using MatD = Eigen::MatrixXd;

/// An m×n row-major matrix of N(0, scale²) floats, reproducible from the seed.
inline std::vector<float> gaussian(index_t m, index_t n, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> g(static_cast<std::size_t>(m * n));
  for (auto& x : g)
    x = nd(rng);
  return g;
}

/// A row-major m×n float buffer as a double matrix.
inline MatD to_double(const std::vector<float>& g, index_t m, index_t n) {
  MatD d(m, n);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < n; ++j)
      d(i, j) = g[static_cast<std::size_t>(i * n + j)];
  return d;
}

/// A projection basis as the dim0×r double matrix S (the basis is stored transposed, r×dim0,
/// when it multiplies on the right).
inline MatD basis_columns(const cpu::RowMatrix& basis, Side side) {
  const MatD b = basis.cast<double>();
  return side == Side::left ? b : MatD(b.transpose());
}

/// ‖SᵀS − I‖_F: zero for orthonormal columns.
inline double orthonormality(const MatD& s) {
  return (s.transpose() * s - MatD::Identity(s.cols(), s.cols())).norm();
}

}  // namespace slimgrad::test
