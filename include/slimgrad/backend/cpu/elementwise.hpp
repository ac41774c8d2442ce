// slimgrad/backend/cpu/elementwise.hpp — walking a moment tensor in store-aligned chunks.
//
// Moment tensors are flat (row-major over the tracked coefficients), while the coefficients
// they pair with are a view with its own leading dimension. A chunk is a range of flat elements
// whose ends respect the store's alignment (a Q8 block never straddles two chunks); each chunk is
// visited as row segments of the view.
#pragma once

#include <algorithm>

#include "common.hpp"

namespace slimgrad::cpu {

/// Calls body(begin, end) for consecutive chunks of [0, count), each a multiple of `alignment`
/// long (but the last), about `target` elements, in parallel when there is enough work.
template <class Body>
void for_each_chunk(index_t count, index_t alignment, index_t target, Body&& body) {
  const index_t chunk = std::max(alignment, (target / alignment) * alignment);
  const index_t chunks = (count + chunk - 1) / chunk;
  parallel_for(chunks, chunk, [&](index_t c) {
    const index_t begin = c * chunk;
    body(begin, std::min(count, begin + chunk));
  });
}

/// Calls seg(flat_offset, row, col0, length) for the row segments of flat range [begin, end) in
/// a matrix of `cols` columns.
template <class Segment>
void for_each_segment(index_t begin, index_t end, index_t cols, Segment&& seg) {
  index_t e = begin;
  while (e < end) {
    const index_t row = e / cols, col = e % cols;
    const index_t len = std::min(cols - col, end - e);
    seg(e - begin, row, col, len);
    e += len;
  }
}

}  // namespace slimgrad::cpu
