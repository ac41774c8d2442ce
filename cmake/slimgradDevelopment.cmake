# Settings for slimgrad's own programs (tests, tools, benchmarks, examples): never exported.

add_library(slimgrad_dev INTERFACE)
target_link_libraries(slimgrad_dev INTERFACE slimgrad::slimgrad)
target_compile_options(slimgrad_dev INTERFACE -Wall -Wextra -Wpedantic -Wshadow -Wconversion
                                              $<$<BOOL:${SLIMGRAD_WERROR}>:-Werror>)
# GCC 12 reports -Wrestrict false positives inside libstdc++'s std::string at -O2/-O3 (GCC bug
# 105329); they are not in our code.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  target_compile_options(slimgrad_dev INTERFACE -Wno-restrict)
endif()
if(SLIMGRAD_NATIVE)
  target_compile_options(slimgrad_dev INTERFACE -march=native)
  # With AVX-512 enabled, GCC (12 here) reports -Wmaybe-uninitialized inside Eigen's AVX-512
  # GEMM packing (ptranspose in gemm_pack_rhs: the _mm512_unpack*_ps intrinsics' deliberately
  # self-initialised operand), after inlining into our functions, so -isystem does not hide it.
  # It is not in our code; only this warning is turned off, only for GCC, only for the native
  # build (the default build compiles our AVX-512 kernels through target attributes and keeps
  # the warning).
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(slimgrad_dev INTERFACE -Wno-maybe-uninitialized)
  endif()
endif()
if(SLIMGRAD_SANITIZE)
  target_compile_options(slimgrad_dev INTERFACE -fsanitize=address,undefined
                                                -fno-sanitize-recover=undefined
                                                -fno-omit-frame-pointer)
  target_link_options(slimgrad_dev INTERFACE -fsanitize=address,undefined)
endif()

# slimgrad_blas: Eigen's matrix products (GEMM, GEMV) through OpenBLAS (EIGEN_USE_BLAS). On the
# CPU backend the projections of GaLore, Flora, CompAct and VeLoRA are flop-bound, and Debian's
# OpenBLAS (run-time dispatched kernels, no -march=native needed) runs this machine's sgemm 2.5x
# faster than Eigen's own GEMM in the default build. The OpenMP flavour (libopenblas-openmp-dev,
# installed by tools/setup.sh) makes its threads follow OMP_NUM_THREADS like ours; a product
# called inside one of our parallel regions runs on one thread. OpenBLAS' sgemm is deterministic
# for a given shape and thread count, so the bit-exact tests (resume, conformance) hold.
# EIGEN_USE_BLAS changes the definition of Eigen's product templates: every translation unit
# linked into one program must agree on it, hence one interface target that whole programs link.
add_library(slimgrad_blas INTERFACE)
set(SLIMGRAD_HAS_BLAS OFF)
if(SLIMGRAD_BLAS)
  if(NOT DEFINED BLA_VENDOR)
    set(BLA_VENDOR OpenBLAS)
  endif()
  find_package(BLAS)
  if(BLAS_FOUND)
    set(SLIMGRAD_HAS_BLAS ON)
    target_compile_definitions(slimgrad_blas INTERFACE EIGEN_USE_BLAS)
    target_link_libraries(slimgrad_blas INTERFACE BLAS::BLAS)
    # Debian chooses the flavour behind libopenblas.so by alternatives: the pthreads one would
    # spawn its own threads (OPENBLAS_NUM_THREADS) beside OpenMP's, and oversubscribe the cores.
    foreach(lib IN LISTS BLAS_LIBRARIES)
      file(REAL_PATH "${lib}" real)
      if(real MATCHES "openblas" AND NOT real MATCHES "openmp")
        message(WARNING "slimgrad: ${lib} is ${real}, not the OpenMP flavour of OpenBLAS: its "
                        "threads follow OPENBLAS_NUM_THREADS, not OMP_NUM_THREADS "
                        "(install libopenblas-openmp-dev, or configure with -DSLIMGRAD_BLAS=OFF)")
      endif()
    endforeach()
  else()
    message(STATUS "slimgrad: no OpenBLAS found; Eigen's own matrix products are used")
  endif()
endif()
message(STATUS "slimgrad: OpenBLAS for Eigen's products (SLIMGRAD_BLAS): ${SLIMGRAD_HAS_BLAS}")

if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()
