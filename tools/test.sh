#!/usr/bin/env bash
# Sets everything up, builds slimgrad (tests, tools, benchmarks, examples; the CUDA sources too
# when nvcc is present) with warnings as errors, and runs every test.
#   bash tools/test.sh              g++, Release, build/
#   bash tools/test.sh --sanitize   clang 14, AddressSanitizer + UBSan, build-sanitize/
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

jobs=$(nproc)
if [ "${1:-}" = "--sanitize" ]; then
  # OpenBLAS stays off here: clang's programs use LLVM's libomp and Debian's OpenBLAS brings
  # GCC's libgomp (two OpenMP runtimes in one process), and the sanitizers would not see inside
  # it anyway; this job checks our code, which is the same with or without it.
  dir=build-sanitize
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
    -DSLIMGRAD_SANITIZE=ON -DSLIMGRAD_WERROR=ON -DSLIMGRAD_CUDA=OFF -DSLIMGRAD_BUILD_BENCH=OFF \
    -DSLIMGRAD_BUILD_CHECKS=OFF -DSLIMGRAD_BLAS=OFF \
    -DPython3_EXECUTABLE=/usr/bin/python3 >/dev/null
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  dir=build
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DSLIMGRAD_WERROR=ON \
    -DPython3_EXECUTABLE=/usr/bin/python3 >/dev/null
fi
cmake --build "$dir" -j "$jobs"
ctest --test-dir "$dir" --output-on-failure -j "$jobs"
