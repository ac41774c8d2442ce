// Helpers of the GPU tests: device buffers, copies, float comparison in ulps, and the set-up of
// an engine test (fp32 tensors on the device, an engine with a workspace of its own).
#pragma once

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <slimgrad/backend/cuda/api.hpp>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace slimgrad::test {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

/// Owning device allocation (cudaMalloc: 256-byte aligned).
struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  explicit DeviceBuffer(std::size_t n) : bytes(n) {
    if (n) cuda_check(cudaMalloc(&ptr, n), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  template <class T>
  T* as(std::size_t offset_elements = 0) const {
    return static_cast<T*>(ptr) + offset_elements;
  }
};

template <class T>
void upload(void* dst, const std::vector<T>& src) {
  cuda_check(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
}
template <class T>
std::vector<T> download(const void* src, std::size_t n) {
  std::vector<T> out(n);
  cuda_check(cudaMemcpy(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
  return out;
}

/// Distance in units in the last place between two floats (0 for bit-equal values; NaN pairs
/// with equal bits count as equal, any other NaN as far apart).
inline std::int64_t ulp_distance(float a, float b) {
  std::int32_t ia = 0, ib = 0;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  if (ia == ib) return 0;
  if (std::isnan(a) || std::isnan(b)) return std::int64_t{1} << 40;
  auto ordered = [](std::int32_t i) -> std::int64_t {
    return i < 0 ? -std::int64_t(i & 0x7FFFFFFF) : i;
  };
  const std::int64_t d = ordered(ia) - ordered(ib);
  return d < 0 ? -d : d;
}
inline std::int64_t max_ulp(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::int64_t m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const std::int64_t d = ulp_distance(a[i], b[i]);
    m = d > m ? d : m;
  }
  return m;
}

inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v)
    x = dist(gen);
  return v;
}

/// fp32 tensors on the device: owned weight and gradient buffers and their cuda::Tensor list
/// (what an engine's constructor takes).
struct DeviceTensors {
  std::vector<std::unique_ptr<DeviceBuffer>> w, g;
  std::vector<cuda::Tensor> tensors;

  /// A rows×cols tensor named `id`, its weights uploaded (left as allocated when empty).
  void add(index_t rows, index_t cols, const std::vector<float>& weights = {},
           std::uint64_t id = 0) {
    const auto n = static_cast<std::size_t>(rows * cols);
    w.push_back(std::make_unique<DeviceBuffer>(n * 4));
    g.push_back(std::make_unique<DeviceBuffer>(n * 4));
    if (!weights.empty()) upload(w.back()->ptr, weights);
    tensors.push_back({w.back()->ptr, g.back()->ptr, nullptr, rows, cols, id});
  }
  void set_grad(std::size_t k, const std::vector<float>& grad) const { upload(g[k]->ptr, grad); }
  std::vector<float> weights(std::size_t k) const {
    return download<float>(w[k]->ptr, static_cast<std::size_t>(tensors[k].size()));
  }
};

/// An engine (MultiTensorAdam, MultiTensorGwt, MultiTensorLowRank) over `tensors` with a
/// workspace of its own, of the size it asks for.
template <class Engine>
struct WithWorkspace {
  DeviceBuffer ws;
  Engine engine;
  WithWorkspace(std::span<const cuda::Tensor> tensors, const typename Engine::Options& o,
                cuda::stream_t stream = nullptr)
      : ws(Engine::workspace_bytes(tensors, o)), engine(tensors, o, ws.ptr, ws.bytes, stream) {}
};

}  // namespace slimgrad::test
