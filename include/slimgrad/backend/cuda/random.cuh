// slimgrad/backend/cuda/random.cuh — Philox Gaussian matrices on the device (api.hpp), the same
// bits as random::fill_gaussian on the CPU: both call core/philox.hpp's box_muller4, which uses
// only correctly rounded double operations fenced against contraction.
#pragma once

#include <cstdint>

#include "../../core/philox.hpp"
#include "common.cuh"

namespace slimgrad::cuda {

namespace detail {

/// One thread per Philox block: elements 4b .. 4b+3 of the row-major matrix (index i·cols + j,
/// whatever the leading dimension).
template <class T>
__global__ void __launch_bounds__(256)
    gaussian_kernel(DeviceView<T> out, random::Key key, double stddev, std::uint64_t blocks) {
  const std::uint64_t b = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= blocks) return;
  double z[4];
  random::box_muller4(random::block_bits(key, b), z);
  const auto total = static_cast<std::uint64_t>(out.rows) * static_cast<std::uint64_t>(out.cols);
  const auto cols = static_cast<std::uint64_t>(out.cols);
#pragma unroll
  for (int lane = 0; lane < 4; ++lane) {
    const std::uint64_t e = 4 * b + static_cast<std::uint64_t>(lane);
    if (e < total)
      out(static_cast<index_t>(e / cols), static_cast<index_t>(e % cols)) =
          static_cast<T>(random::detail::mul_rn(z[lane], stddev));
  }
}

}  // namespace detail

template <class T>
void fill_gaussian(DeviceView<T> out, const random::Key& key, double stddev, stream_t stream) {
  static_assert(std::is_same_v<T, float>, "slimgrad cuda: fill_gaussian writes floats");
  const auto total = static_cast<std::uint64_t>(out.size());
  if (total == 0) return;
  require(total <= random::max_elements,
          "cuda::fill_gaussian: a Key addresses at most 2^34 elements");
  const std::uint64_t blocks = (total + 3) / 4;
  detail::gaussian_kernel<T>
      <<<static_cast<unsigned>((blocks + 255) / 256), 256, 0, stream>>>(out, key, stddev, blocks);
  detail::check_launch("fill_gaussian");
}

}  // namespace slimgrad::cuda
