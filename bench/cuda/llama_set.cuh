// bench/cuda/llama_set.cuh — what bench_refresh and bench_subtrackpp share: a hashed fill of
// device buffers and the LLaMA-1B-like parameter set of bench/cuda/side_by_side.py (24 layers of
// q, k, v, o 2048×2048; gate, up 5461×2048; down 2048×5461: 168 fp32 tensors, 1.21 B
// parameters) as cuda::Tensor over owned weight and gradient buffers.
#pragma once

#include <slimgrad/cuda.cuh>

#include <cstdint>
#include <utility>
#include <vector>

#include "timing.cuh"

namespace slimgrad::bench {

/// x[i] ← scale · (a hash of (i, seed) mapped to [−0.5, 0.5)).
__global__ void fill_kernel(float* x, long n, unsigned seed, float scale) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed * 2246822519u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    h *= 3266489917u;
    h ^= h >> 16;
    x[i] = (static_cast<float>(h) * (1.0f / 4294967296.0f) - 0.5f) * scale;
  }
}
inline void fill(float* x, long n, unsigned seed, float scale = 1.0f, cudaStream_t s = nullptr) {
  fill_kernel<<<1024, 256, 0, s>>>(x, n, seed, scale);
  check(cudaGetLastError());
}

/// The 168 tensors, weights ~ 0.04·U and gradients ~ 2e-3·U, Tensor::id their index.
struct LlamaSet {
  std::vector<cuda::Tensor> t;
  std::vector<float*> buffers;
  LlamaSet() {
    const std::vector<std::pair<index_t, index_t>> layer = {
        {2048, 2048}, {2048, 2048}, {2048, 2048}, {2048, 2048},
        {5461, 2048}, {5461, 2048}, {2048, 5461}};
    unsigned seed = 1;
    for (int l = 0; l < 24; ++l)
      for (const auto& [rows, cols] : layer) {
        float *w, *g;
        const auto n = static_cast<std::size_t>(rows * cols);
        check(cudaMalloc(&w, n * 4));
        check(cudaMalloc(&g, n * 4));
        buffers.push_back(w);
        buffers.push_back(g);
        fill(w, static_cast<long>(n), seed++, 0.04f);
        fill(g, static_cast<long>(n), seed++, 2e-3f);
        cuda::Tensor x;
        x.weight = w;
        x.grad = g;
        x.rows = rows;
        x.cols = cols;
        x.id = static_cast<std::uint64_t>(t.size());
        t.push_back(x);
      }
    check(cudaDeviceSynchronize());
  }
  LlamaSet(const LlamaSet&) = delete;
  LlamaSet& operator=(const LlamaSet&) = delete;
  ~LlamaSet() {
    for (float* b : buffers)
      cudaFree(b);
  }
};

}  // namespace slimgrad::bench
