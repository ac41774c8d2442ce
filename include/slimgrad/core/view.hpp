// slimgrad/core/view.hpp — non-owning row-major matrix views at the library boundary.
//
// A trainer hands slimgrad (pointer, rows, cols, leading dimension) views of its parameters
// and gradients, in PyTorch's out×in layout; slimgrad owns only its own state (design.md §2
// rule 5). The memory space is part of the type.
#pragma once

#include <cstddef>
#include <type_traits>

#include "backend.hpp"
#include "config.hpp"

namespace slimgrad {

/// Shape of a row-major matrix: rows × cols. A vector is 1 × n.
struct Shape {
  index_t rows = 0;
  index_t cols = 0;
  SLIMGRAD_HOST_DEVICE constexpr index_t size() const { return rows * cols; }
  friend constexpr bool operator==(const Shape&, const Shape&) = default;
};

/// A row-major view: element (i, j) lives at data[i * ld + j], with ld >= cols.
template <class T, class Space = host_space>
struct MatrixView {
  using value_type = std::remove_const_t<T>;
  using memory_space = Space;

  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t ld = 0;  ///< leading dimension (elements between the starts of consecutive rows)

  constexpr MatrixView() = default;
  SLIMGRAD_HOST_DEVICE constexpr MatrixView(T* p, index_t r, index_t c, index_t leading)
      : data(p), rows(r), cols(c), ld(leading) {}
  SLIMGRAD_HOST_DEVICE constexpr MatrixView(T* p, index_t r, index_t c)
      : data(p), rows(r), cols(c), ld(c) {}

  /// A view of non-const elements converts to a view of const elements, never the reverse.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) SLIMGRAD_HOST_DEVICE
      constexpr MatrixView(const MatrixView<U, Space>& other)
      : data(other.data), rows(other.rows), cols(other.cols), ld(other.ld) {}

  SLIMGRAD_HOST_DEVICE constexpr Shape shape() const { return {rows, cols}; }
  SLIMGRAD_HOST_DEVICE constexpr index_t size() const { return rows * cols; }
  SLIMGRAD_HOST_DEVICE constexpr bool empty() const { return rows == 0 || cols == 0; }
  SLIMGRAD_HOST_DEVICE constexpr bool contiguous() const { return ld == cols || rows <= 1; }
  SLIMGRAD_HOST_DEVICE constexpr T* row(index_t i) const { return data + i * ld; }
  SLIMGRAD_HOST_DEVICE constexpr T& operator()(index_t i, index_t j) const {
    return data[i * ld + j];
  }

  /// The sub-matrix of rows [r0, r0+nr) and columns [c0, c0+nc), sharing memory.
  SLIMGRAD_HOST_DEVICE constexpr MatrixView block(index_t r0, index_t c0, index_t nr,
                                                  index_t nc) const {
    return MatrixView(data + r0 * ld + c0, nr, nc, ld);
  }
};

template <class T>
using HostView = MatrixView<T, host_space>;
template <class T>
using DeviceView = MatrixView<T, device_space>;

/// Views a contiguous host buffer as rows × cols.
template <class T>
constexpr HostView<T> host_view(T* data, index_t rows, index_t cols) {
  return HostView<T>(data, rows, cols, cols);
}
/// Views a contiguous device buffer as rows × cols.
template <class T>
constexpr DeviceView<T> device_view(T* data, index_t rows, index_t cols) {
  return DeviceView<T>(data, rows, cols, cols);
}

}  // namespace slimgrad
