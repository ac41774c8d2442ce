// slimgrad/backend/cuda/blas.cuh — what the cuBLAS users of the backend (the compressed
// linear layer, the low-rank optimizers) share.
#pragma once

#include <cublas_v2.h>

#include <string>

#include "../../core/error.hpp"

namespace slimgrad::cuda::detail {

/// Throws slimgrad::Error naming the call when a cuBLAS call fails.
inline void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("slimgrad cuda: ") + what + ": " + cublasGetStatusString(s));
}

}  // namespace slimgrad::cuda::detail
