// slimgrad/backend/cpu/common.hpp — what every CPU loop needs: Eigen maps of views and the
// row-parallel loop.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "../../core/error.hpp"
#include "../../core/view.hpp"

namespace slimgrad::cpu {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapMatrix = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using ConstMapMatrix = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;

/// An Eigen map of a host view (no copy).
inline MapMatrix as_eigen(HostView<float> v) {
  return MapMatrix(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld));
}
inline ConstMapMatrix as_eigen(HostView<const float> v) {
  return ConstMapMatrix(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld));
}
/// A host view of an Eigen row-major matrix (no copy).
inline HostView<float> as_view(RowMatrix& m) {
  return HostView<float>(m.data(), m.rows(), m.cols(), m.cols());
}
inline HostView<const float> as_view(const RowMatrix& m) {
  return HostView<const float>(m.data(), m.rows(), m.cols(), m.cols());
}

/// Throws unless `v` has exactly `expected` shape; `what` names the argument.
template <class T>
void require_shape(const HostView<T>& v, Shape expected, const char* what) {
  require(v.rows == expected.rows && v.cols == expected.cols,
          std::string(what) + " has shape " + std::to_string(v.rows) + "x" +
              std::to_string(v.cols) + ", expected " + std::to_string(expected.rows) + "x" +
              std::to_string(expected.cols));
  require(v.ld >= v.cols, std::string(what) + " has a leading dimension smaller than its width");
  require(v.data != nullptr || v.empty(), std::string(what) + " is null");
}

/// Runs body(i) for i in [0, n), split over OpenMP threads when there is enough work.
template <class Body>
void parallel_for(index_t n, index_t work_per_item, Body&& body) {
#if defined(_OPENMP)
  const bool worth_it = n > 1 && n * work_per_item >= (index_t{1} << 15);
#pragma omp parallel for schedule(static) if (worth_it)
  for (index_t i = 0; i < n; ++i)
    body(i);
#else
  (void)work_per_item;
  for (index_t i = 0; i < n; ++i)
    body(i);
#endif
}

/// out[i] = sqrt(in[i]), correctly rounded and vectorised. (Eigen's Array::sqrt() is an
/// approximation under its default EIGEN_FAST_MATH, and a plain std::sqrt loop stays scalar to
/// honour errno; both would break bit-agreement with the scalar kernels the CUDA backend uses.)
inline void sqrt_n(const float* in, float* out, index_t n) {
  index_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#endif
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4)
    _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#elif defined(__ARM_NEON) && defined(__aarch64__)
  for (; i + 4 <= n; i += 4)
    vst1q_f32(out + i, vsqrtq_f32(vld1q_f32(in + i)));
#endif
  for (; i < n; ++i)
    out[i] = std::sqrt(in[i]);
}

/// The OR over every element of `v` of `test(its bits)`: an integer reduction, which vectorises
/// where std::isfinite or a comparison in a short-circuit loop does not.
template <class BitTest>
std::uint32_t or_of_bits(HostView<const float> v, BitTest test) {
  std::uint32_t acc = 0;
#if defined(_OPENMP)
#pragma omp parallel for reduction(| : acc) schedule(static) if (v.size() > (1 << 16))
#endif
  for (index_t i = 0; i < v.rows; ++i) {
    const float* r = v.row(i);
    std::uint32_t row_acc = 0;
    for (index_t j = 0; j < v.cols; ++j) {
      std::uint32_t b;
      std::memcpy(&b, r + j, sizeof b);
      row_acc |= test(b);
    }
    acc |= row_acc;
  }
  return acc;
}

/// True when every element of `v` is finite (exponent bits not all ones: Inf or NaN).
inline bool all_finite(HostView<const float> v) {
  return or_of_bits(v, [](std::uint32_t b) {
           return static_cast<std::uint32_t>((b & 0x7f800000u) == 0x7f800000u);
         }) == 0;
}

/// True when every element of `v` is ±0 (bits other than the sign all clear).
inline bool all_zero(HostView<const float> v) {
  return or_of_bits(v, [](std::uint32_t b) { return b & 0x7fffffffu; }) == 0;
}

/// Σ x² of a row in double, in the one order every norm of the library takes: eight partial
/// sums (element j into lane j mod 8, each lane in order of j), combined as
/// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). Eight independent chains keep the
/// scalar loop off the add latency, and a vector kernel (8 doubles, gwt_haar_avx512.hpp) gives
/// the same bits. x² is exact in double, so a contracted multiply-add does not change them.
struct NormLanes {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  void add(index_t j, float x) { lane[j & 7] += static_cast<double>(x) * x; }
  double total() const {
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
};

/// Frobenius norm, accumulated in double (NormLanes per row): per-row sums (in parallel), then the
/// rows in order, so the result does not depend on the thread count (the limiter's ρ feeds
/// bit-exact resume).
inline double frobenius(HostView<const float> v) {
  thread_local std::vector<double> rows;
  rows.assign(static_cast<std::size_t>(v.rows), 0.0);
  double* out = rows.data();
  parallel_for(v.rows, v.cols, [&](index_t i) {
    const float* r = v.row(i);
    NormLanes s;
    for (index_t j = 0; j < v.cols; ++j)
      s.add(j, r[j]);
    out[i] = s.total();
  });
  double sum = 0.0;
  for (double s : rows)
    sum += s;
  return std::sqrt(sum);
}

/// v ← v·f.
inline void scale(HostView<float> v, float f) {
  parallel_for(v.rows, v.cols, [&](index_t i) {
    float* r = v.row(i);
    for (index_t j = 0; j < v.cols; ++j)
      r[j] *= f;
  });
}

/// v ← v / d (PyTorch's `tensor / limiter`).
inline void divide(HostView<float> v, float d) {
  parallel_for(v.rows, v.cols, [&](index_t i) {
    float* r = v.row(i);
    for (index_t j = 0; j < v.cols; ++j)
      r[j] = r[j] / d;
  });
}

/// Zeroes every coefficient outside the leading `tracked` block of `all`.
inline void zero_outside(HostView<float> all, Shape tracked) {
  parallel_for(all.rows, all.cols, [&](index_t i) {
    float* r = all.row(i);
    const index_t keep = i < tracked.rows ? tracked.cols : 0;
    std::fill(r + keep, r + all.cols, 0.0f);
  });
}

}  // namespace slimgrad::cpu
