// GPU tests: skipped (exit code 77, which ctest reports as "Skipped") where no CUDA device is
// found, e.g. on CI, which compiles them with nvcc but has no GPU.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("test_cuda: no CUDA device found; skipped");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
