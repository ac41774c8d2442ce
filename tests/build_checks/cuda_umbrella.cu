// The CUDA umbrella compiles under nvcc without Eigen, and the shared host/device math is
// callable from a kernel.
#include <slimgrad/cuda.cuh>

__global__ void touch(slimgrad::DeviceView<float> v) {
  const slimgrad::index_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < v.rows)
    v(i, 0) = static_cast<float>(slimgrad::side_for(v.shape()) == slimgrad::Side::right);
}

// The same Gaussian generator as the CPU backend (bit-identity is tested on the GPU machine).
__global__ void gaussian_tile(slimgrad::DeviceView<float> out, slimgrad::random::Key key) {
  const slimgrad::index_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < out.size())
    out(i / out.cols, i % out.cols) =
        slimgrad::random::gaussian(key, static_cast<std::uint64_t>(i), 1.0);
}

void launch_touch(slimgrad::DeviceView<float> v) {
  touch<<<1, 32>>>(v);
}
void launch_gaussian(slimgrad::DeviceView<float> v, slimgrad::random::Key key) {
  gaussian_tile<<<static_cast<unsigned>((v.size() + 127) / 128), 128>>>(v, key);
}
