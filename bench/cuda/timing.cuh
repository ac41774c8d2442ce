// bench/cuda/timing.cuh — what the CUDA benchmark programs share: exiting on a runtime error and
// timing work on the default stream with CUDA events.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace slimgrad::bench {

inline void check(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
    std::exit(1);
  }
}

/// Collects the milliseconds of each time(f) call (events around f, on the default stream).
struct Timer {
  cudaEvent_t a{}, b{};
  std::vector<float> t;
  Timer() {
    check(cudaEventCreate(&a));
    check(cudaEventCreate(&b));
  }
  template <class F>
  void time(F&& f) {
    check(cudaEventRecord(a));
    f();
    check(cudaEventRecord(b));
    check(cudaEventSynchronize(b));
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  float median() {
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
};

/// The median of `reps` timings of f after `warmup` untimed calls.
template <class F>
float median_ms(F&& f, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i)
    f();
  Timer timer;
  for (int i = 0; i < reps; ++i)
    timer.time(f);
  return timer.median();
}

}  // namespace slimgrad::bench
