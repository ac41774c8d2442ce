// slimgrad/backend/cuda/memory.cuh — device memory and synchronous copies for host code that
// sees only api.hpp (the Optimizer facade of backend/cuda/optimizer.hpp). Templates on the byte
// type only so that the one .cu file of a program instantiates them with the rest.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <type_traits>

#include "api.hpp"
#include "common.cuh"

namespace slimgrad::cuda {

template <class T>
T* device_allocate(std::size_t bytes) {
  static_assert(std::is_same_v<T, std::byte>, "slimgrad cuda: device_allocate<std::byte>");
  void* p = nullptr;
  if (bytes) detail::check(cudaMalloc(&p, bytes), "cudaMalloc");
  return static_cast<T*>(p);
}

template <class T>
void device_free(T* p) noexcept {
  static_assert(std::is_same_v<T, std::byte>, "slimgrad cuda: device_free<std::byte>");
  if (p) (void)cudaFree(p);
}

template <class T>
void copy_to_host(T* host, const T* device, std::size_t bytes, stream_t stream) {
  static_assert(std::is_same_v<T, std::byte>, "slimgrad cuda: copy_to_host<std::byte>");
  detail::check(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream),
                "copy to host");
  detail::check(cudaStreamSynchronize(stream), "copy to host");
}

template <class T>
void copy_to_device(T* device, const T* host, std::size_t bytes, stream_t stream) {
  static_assert(std::is_same_v<T, std::byte>, "slimgrad cuda: copy_to_device<std::byte>");
  detail::check(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream),
                "copy to device");
  detail::check(cudaStreamSynchronize(stream), "copy to device");
}

}  // namespace slimgrad::cuda
