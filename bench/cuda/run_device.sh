#!/usr/bin/env bash
# Builds and runs everything CUDA on a GPU machine in one go (the GPU tests, compute-sanitizer
# memcheck and racecheck on them, bench_cuda and the side-by-side script against torch), with
# nvcc and the host compiler directly, so the machine needs no CMake packages: only Eigen's and
# doctest's headers, found under $DEPS (default build-deps: eigen3/ and doctest/, copied from /usr/include). Logs go to $OUT.
#   OUT=/tmp/out bash bench/cuda/run_device.sh [tests|sanitize|bench|all]...
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/slimgrad-cuda}
DEPS=${DEPS:-build-deps}
B=build-device
mkdir -p "$OUT" "$B"
what=${*:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
date -u | tee -a "$OUT/device.txt"

NVCC="nvcc -std=c++20 -O3 -arch=sm_90 -fmad=false -Werror=all-warnings -Iinclude"
CXX="${CXX:-g++} -std=c++20 -O2 -fopenmp -Iinclude -isystem $DEPS/eigen3 -isystem $DEPS -isystem /usr/local/cuda/include -DSLIMGRAD_TEST_DATA_DIR=\"tests/data\""
set -x
$NVCC -c tests/cuda/instantiate.cu -o $B/instantiate.o &
tests=$(cd tests/cuda && ls *.cpp | sed 's/\.cpp$//')
for f in $tests; do $CXX -c tests/cuda/$f.cpp -o $B/$f.o & done
$NVCC -shared -Xcompiler -fPIC bench/cuda/bench_cuda.cu -o $B/libslimgrad_cuda_bench.so -lcublas -lcusolver &
$NVCC -DSLIMGRAD_BENCH_MAIN bench/cuda/bench_cuda.cu -o $B/bench_cuda -lcublas -lcusolver &
$NVCC bench/cuda/bench_activation.cu -o $B/bench_cuda_activation -lcublas &
$NVCC bench/cuda/bench_refresh.cu -o $B/bench_cuda_refresh -lcublas -lcusolver &
$NVCC bench/cuda/bench_subtrackpp.cu -o $B/bench_cuda_subtrackpp -lcublas -lcusolver &
wait
${CXX%% *} -o $B/test_cuda $(for f in $tests; do echo $B/$f.o; done) $B/instantiate.o \
  -L/usr/local/cuda/lib64 -lcudart -lcublas -lcusolver -fopenmp || exit 1
set +x
rc=0
if [[ $what == *tests* || $what == all ]]; then
  $B/test_cuda 2>&1 | tee "$OUT/tests.log" | tail -15; rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == *bench* || $what == all ]]; then
  $B/bench_cuda 2>&1 | tee "$OUT/bench_cuda.log"
  $B/bench_cuda_activation 2>&1 | tee "$OUT/bench_cuda_activation.log"
  $B/bench_cuda_refresh 2>&1 | tee "$OUT/bench_cuda_refresh.log"
  $B/bench_cuda_subtrackpp 2>&1 | tee "$OUT/bench_cuda_subtrackpp.log"
  PYTHONUNBUFFERED=1 python3 bench/cuda/side_by_side.py --lib $B/libslimgrad_cuda_bench.so \
    --json "$OUT/side_by_side.json" 2>&1 | tee "$OUT/side_by_side.log"
fi
if [[ $what == *sanitize* || $what == all ]]; then
  timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 $B/test_cuda >"$OUT/memcheck.log" 2>&1
  r=$?; echo "memcheck rc=$r"; tail -3 "$OUT/memcheck.log"; rc=$((rc | r))
  timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool racecheck --error-exitcode 9 $B/test_cuda >"$OUT/racecheck.log" 2>&1
  r=$?; echo "racecheck rc=$r"; tail -3 "$OUT/racecheck.log"; rc=$((rc | r))
fi
exit $rc
