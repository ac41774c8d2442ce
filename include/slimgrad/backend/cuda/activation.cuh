// slimgrad/backend/cuda/activation.cuh — cuda::Linear<Codec> (backend/cuda/activation.hpp): the
// compressed linear layer on cuBLAS, with the codecs' element math shared with the CPU
// (activation/codecs.hpp) and CompAct's P from the shared Philox generator (random.cuh).
//
// Row-major views are column-major transposes for cuBLAS: with A row-major r × c at leading
// dimension ld, cuBLAS sees Aᵀ (c × r, ld). So Y = X Wᵀ is Yᵀ = W_cmᵀ X_cm (gemm T, N),
// dX = dY W is dXᵀ = W_cm dY_cm (N, N) and dW += dYᵀ X is dWᵀ += X_cm dY_cmᵀ (N, T).
#pragma once

#include <cublas_v2.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../../activation/codecs.hpp"
#include "../../core/orientation.hpp"
#include "../../core/philox.hpp"
#include "../../transforms/compact_projection.hpp"
#include "../../transforms/random_projection.hpp"
#include "activation.hpp"
#include "blas.cuh"
#include "common.cuh"
#include "random.cuh"

namespace slimgrad::cuda {

namespace detail {

/// cuBLAS's leading dimension of a row-major view (a single row may carry any ld).
template <class T>
int blas_ld(DeviceView<T> v) {
  return static_cast<int>(v.rows <= 1 ? std::max<index_t>(v.cols, 1) : v.ld);
}

template <class T>
void check_view(DeviceView<T> v, Shape s, const std::string& what) {
  require(v.rows == s.rows && v.cols == s.cols,
          what + " is " + std::to_string(v.rows) + "x" + std::to_string(v.cols) + ", expected " +
              std::to_string(s.rows) + "x" + std::to_string(s.cols));
  require(v.rows <= 1 || v.ld >= v.cols, what + ": leading dimension below the column count");
  require(v.empty() || v.data != nullptr, what + ": null pointer");
  require(v.ld <= index_t{0x7FFFFFFF} && v.rows <= index_t{0x7FFFFFFF},
          what + ": too large for cuBLAS's int dimensions");
}

__global__ void __launch_bounds__(256) fill_kernel(float* p, index_t n, float value) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}

/// y(i, j) = b[j]: the GEMM then adds X Wᵀ (β = 1), i.e. (X Wᵀ) + b, the CPU's order.
__global__ void __launch_bounds__(256) bias_rows_kernel(DeviceView<float> y, const float* b) {
  const index_t n = y.rows * y.cols;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x)
    y(e / y.cols, e % y.cols) = b[e % y.cols];
}

/// VeLoRA's initialisation, first pass: partial[q·D' + j] = chunk q's sum of feature j (one
/// thread per (chunk, j), the CPU's order). With `once`, nothing happens after v was set.
__global__ void __launch_bounds__(128)
    velora_partial_kernel(DeviceView<const float> x, index_t groups, index_t d, double* partial,
                          const std::int32_t* flag, bool once) {
  if (once && *flag != 0) return;
  const index_t q = blockIdx.x;
  const index_t j = static_cast<index_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  constexpr index_t c = activation::VeLoRA::init_chunk;
  const index_t rows = x.rows - q * c < c ? x.rows - q * c : c;
  partial[q * d + j] = activation::VeLoRA::chunk_sum(x.row(q * c), x.ld, rows, groups, d, j);
}

/// Second pass (one block): the chunks in order, the norm, v = sum / norm, flag = 1. A batch
/// whose sum cannot be normalised leaves v (and the flag) as they were, as on the CPU.
__global__ void __launch_bounds__(256)
    velora_finish_kernel(const double* partial, index_t chunks, index_t d, double* sum, float* v,
                         std::int32_t* flag, bool once) {
  if (once && *flag != 0) return;
  for (index_t j = threadIdx.x; j < d; j += blockDim.x) {
    double s = 0.0;
    for (index_t q = 0; q < chunks; ++q)
      s += partial[q * d + j];
    sum[j] = s;
  }
  __syncthreads();
  __shared__ double norm;
  if (threadIdx.x == 0) norm = activation::VeLoRA::sum_norm(sum, d);
  __syncthreads();
  if (norm == 0.0) return;
  for (index_t j = threadIdx.x; j < d; j += blockDim.x)
    v[j] = static_cast<float>(sum[j] / norm);
  if (threadIdx.x == 0) *flag = 1;
}

/// z(t, g) = VeLoRA::project(sub-token g of token t, v).
__global__ void __launch_bounds__(256)
    velora_project_kernel(DeviceView<const float> x, const float* __restrict__ v, index_t groups,
                          index_t d, float* __restrict__ z) {
  const index_t n = x.rows * groups;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = e / groups, g = e % groups;
    z[e] = activation::VeLoRA::project(x.row(t) + g * d, v, d);
  }
}

/// dW(i, g·D' + j) = VeLoRA::expand(dW, s·H(i, g), v[j]).
__global__ void __launch_bounds__(256)
    velora_expand_kernel(const float* __restrict__ h, const float* __restrict__ v, float s,
                         index_t groups, index_t d, DeviceView<float> dw) {
  const index_t n = dw.rows * dw.cols;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = e / dw.cols, c = e % dw.cols;
    const float f = s * h[i * groups + c / d];
    float& out = dw(i, c);
    out = activation::VeLoRA::expand(out, f, v[c % d]);
  }
}

// CompAct's count sketch (transforms::CompactProjection, Sketch::count). Z(t, c) is the sum of
// ±X(t, j) over the columns j that the sketch sends to row c, in increasing j: the CPU's
// scatter-add order, so Z has the CPU's bits. Per epoch the columns are sorted into their rows
// (a stable bucket list: offsets r+1, members n, each member j or ~j for a negative sign) by
// three small kernels; a forward then reads each bucket's list.

/// packed[j] = 2·row(j) + (sign(j) < 0).
__global__ void __launch_bounds__(256)
    count_entries_kernel(random::Key key, index_t rank, index_t n, std::int32_t* packed) {
  for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const auto e =
        transforms::CompactProjection::count_entry(key, rank, static_cast<std::uint64_t>(j));
    packed[j] = static_cast<std::int32_t>(2 * e.row + (e.sign < 0 ? 1 : 0));
  }
}

/// offsets[c + 1] = the number of columns in row c (offsets[0] = 0), by one thread per row.
__global__ void __launch_bounds__(256)
    count_sizes_kernel(const std::int32_t* __restrict__ packed, index_t n, index_t rank,
                       std::int32_t* offsets) {
  const index_t c = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c == 0) offsets[0] = 0;
  if (c >= rank) return;
  std::int32_t size = 0;
  for (index_t j = 0; j < n; ++j)
    size += (packed[j] >> 1) == c;
  offsets[c + 1] = size;
}

/// The running sum of the sizes (one thread: r additions, once per epoch).
__global__ void count_scan_kernel(index_t rank, std::int32_t* offsets) {
  for (index_t c = 1; c <= rank; ++c)
    offsets[c] += offsets[c - 1];
}

/// members[offsets[c] ...]: row c's columns in increasing order, ~j where the sign is negative.
__global__ void __launch_bounds__(256)
    count_members_kernel(const std::int32_t* __restrict__ packed, index_t n, index_t rank,
                         const std::int32_t* __restrict__ offsets, std::int32_t* members) {
  const index_t c = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= rank) return;
  std::int32_t at = offsets[c];
  for (index_t j = 0; j < n; ++j)
    if ((packed[j] >> 1) == c)
      members[at++] =
          (packed[j] & 1) != 0 ? ~static_cast<std::int32_t>(j) : static_cast<std::int32_t>(j);
}

/// Z(t, c) = Σ ±X(t, j) over row c's members, in their order.
__global__ void __launch_bounds__(256)
    count_sketch_kernel(DeviceView<const float> x, index_t rank,
                        const std::int32_t* __restrict__ offsets,
                        const std::int32_t* __restrict__ members, float* __restrict__ z) {
  const index_t total = x.rows * rank;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t t = e / rank, c = e % rank;
    const float* row = x.row(t);
    float acc = 0.0f;
    for (std::int32_t i = offsets[c]; i < offsets[c + 1]; ++i) {
      const std::int32_t j = members[i];
      acc += j >= 0 ? row[j] : -row[~j];
    }
    z[e] = acc;
  }
}

inline unsigned grid_for(index_t n, unsigned threads) {
  const index_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::min<index_t>(std::max<index_t>(blocks, 1), 65536));
}

template <class Codec>
constexpr bool is_velora = std::is_same_v<Codec, activation::VeLoRA>;
template <class Codec>
constexpr bool is_compact = std::is_same_v<Codec, activation::CompAct>;

/// The layer's workspace regions; with a null base, only the byte count.
struct LinearRegions {
  float* saved = nullptr;
  void* cublas = nullptr;
  float* ones = nullptr;
  float* v = nullptr;
  std::int32_t* flag = nullptr;
  double* partial = nullptr;
  double* sum = nullptr;
  float* h = nullptr;
  float* p = nullptr;
  std::int32_t* sketch = nullptr;  // count sketch: packed (n), offsets (r + 1), members (n)
  std::size_t bytes = 0;
};

/// The codec's dimensions for an out × in layer, validated as the CPU layer validates them.
template <class Codec>
struct LinearDims {
  index_t saved_cols = 0, d = 0, rank = 0;
  LinearDims(index_t in, index_t out, const typename Codec::Options& o) {
    require(in >= 1 && out >= 1, "linear: in_features and out_features must be at least 1, got " +
                                     std::to_string(in) + " and " + std::to_string(out));
    if constexpr (is_velora<Codec>) {
      require(o.groups >= 1, "velora: groups must be at least 1, got " + std::to_string(o.groups));
      require(in % o.groups == 0, "velora: groups " + std::to_string(o.groups) +
                                      " does not divide in_features " + std::to_string(in));
      require(std::isfinite(o.scale), "velora: scale must be finite");
      saved_cols = o.groups;
      d = in / o.groups;
    } else if constexpr (is_compact<Codec>) {
      require(o.rank >= 0, "compact projection: rank must be >= 0 (0: use ratio), got " +
                               std::to_string(o.rank));
      require(o.rank > 0 || (std::isfinite(o.ratio) && o.ratio > 0),
              "compact projection: ratio must be finite and > 0 when rank is 0");
      require(o.update_gap >= 1, "compact projection: update_gap must be at least 1, got " +
                                     std::to_string(o.update_gap));
      require(!(o.keep_matrix && o.sketch == transforms::Sketch::count),
              "compact projection: keep_matrix applies to the gaussian sketch only (a count sketch "
              "is regenerated in n Philox calls)");
      rank = transforms::CompactProjection::rank_for(in, o);
      require(rank >= 1 && rank < in, "compact projection: rank " + std::to_string(rank) +
                                          " is out of range for in_features " + std::to_string(in) +
                                          " (1 <= rank < in_features)");
      require(static_cast<std::uint64_t>(rank * in) < random::max_elements,
              "compact projection: matrix too large for one Philox stream");
      saved_cols = rank;
    } else {
      saved_cols = in;
    }
  }
};

template <class Codec>
LinearRegions carve_linear(void* base, index_t in, index_t out, index_t max_tokens,
                           const typename Linear<Codec>::Options& o) {
  const LinearDims<Codec> dims(in, out, o.codec);
  Carver c{static_cast<char*>(base)};
  LinearRegions r;
  r.saved = c.take<float>(static_cast<std::size_t>(max_tokens * dims.saved_cols));
  r.cublas = c.take<char>(o.cublas_workspace);
  r.ones = c.take<float>(static_cast<std::size_t>(max_tokens));
  if constexpr (is_velora<Codec>) {
    const index_t chunks =
        (max_tokens + activation::VeLoRA::init_chunk - 1) / activation::VeLoRA::init_chunk;
    r.v = c.take<float>(static_cast<std::size_t>(dims.d));
    r.flag = c.take<std::int32_t>(1);
    r.partial = c.take<double>(static_cast<std::size_t>(chunks * dims.d));
    r.sum = c.take<double>(static_cast<std::size_t>(dims.d));
    r.h = c.take<float>(static_cast<std::size_t>(out * dims.saved_cols));
  } else if constexpr (is_compact<Codec>) {
    if (o.codec.sketch == transforms::Sketch::count)
      r.sketch = c.take<std::int32_t>(static_cast<std::size_t>(2 * in + dims.rank + 1));
    else
      r.p = c.take<float>(static_cast<std::size_t>(dims.rank * in));
  }
  r.bytes = c.bytes();
  return r;
}

}  // namespace detail

template <class Codec>
std::size_t Linear<Codec>::workspace_bytes(index_t in_features, index_t out_features,
                                           index_t max_tokens, const Options& options) {
  require(max_tokens >= 1, "cuda::Linear: max_tokens must be at least 1");
  return detail::carve_linear<Codec>(nullptr, in_features, out_features, max_tokens, options).bytes;
}

template <class Codec>
Linear<Codec>::Linear(std::string_view name, index_t in_features, index_t out_features,
                      index_t max_tokens, const Options& options, void* workspace,
                      std::size_t workspace_size, stream_t stream)
    : name_(name), weight_{out_features, in_features}, options_(options) {
  const std::size_t need = workspace_bytes(in_features, out_features, max_tokens, options);
  detail::check_workspace(workspace, workspace_size, need, "cuda::Linear");
  const detail::LinearDims<Codec> dims(in_features, out_features, options.codec);
  const detail::LinearRegions r =
      detail::carve_linear<Codec>(workspace, in_features, out_features, max_tokens, options);
  saved_cols_ = dims.saved_cols;
  d_ = dims.d;
  max_tokens_ = max_tokens;
  grad_ = detail::is_compact<Codec> ? Shape{out_features, dims.rank} : weight_;
  saved_ = r.saved;
  cublas_ws_ = r.cublas;
  v_ = r.v;
  flag_ = r.flag;
  partial_ = r.partial;
  sum_ = r.sum;
  ones_ = r.ones;
  h_ = r.h;
  p_ = r.p;
  sketch_ = r.sketch;
  if constexpr (detail::is_velora<Codec>) {
    state_bytes_ = static_cast<std::size_t>(d_) * sizeof(float);
    // The CPU's placeholder, uploaded (a pageable copy: the host vector may go once it returns).
    const std::vector<float> v =
        activation::VeLoRA::placeholder(d_, options.codec.seed, tensor_id(name_));
    detail::check(
        cudaMemcpyAsync(v_, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
    detail::check(cudaMemsetAsync(flag_, 0, sizeof(std::int32_t), stream), "cudaMemsetAsync");
  } else if constexpr (detail::is_compact<Codec>) {
    const index_t held = options.codec.sketch == transforms::Sketch::count
                             ? 2 * in_features + dims.rank + 1  // the bucket lists (int32)
                             : dims.rank * in_features;         // P
    state_bytes_ = 16 + static_cast<std::size_t>(held) * 4;
  }
  detail::fill_kernel<<<detail::grid_for(max_tokens, 256), 256, 0, stream>>>(r.ones, max_tokens,
                                                                             1.0f);
  detail::check_launch("cuda::Linear: ones");
  if (options.cublas == nullptr) {
    cublasHandle_t h = nullptr;
    detail::check_cublas(cublasCreate(&h), "cublasCreate");
    options_.cublas = h;
    own_cublas_ = true;
  }
}

template <class Codec>
Linear<Codec>::~Linear() {
  if (own_cublas_) cublasDestroy(options_.cublas);
}

template <class Codec>
void Linear<Codec>::bind(stream_t stream) const {
  cublasHandle_t h = options_.cublas;
  detail::check_cublas(cublasSetStream(h, stream), "cublasSetStream");
  detail::check_cublas(cublasSetWorkspace(h, cublas_ws_, options_.cublas_workspace),
                       "cublasSetWorkspace");
  detail::check_cublas(
      cublasSetMathMode(
          h, options_.math == MathMode::tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH),
      "cublasSetMathMode");
}

template <class Codec>
void Linear<Codec>::set_step(std::int64_t step) {
  require(step >= 0, "linear '" + name_ + "': negative step");
  require(!pending_, "linear '" + name_ + "': set_step() while a forward awaits its backward");
  if constexpr (detail::is_compact<Codec>)
    epoch_ = transforms::RandomProjection::epoch_at(static_cast<index_t>(step),
                                                    options_.codec.update_gap);
}

template <class Codec>
void Linear<Codec>::check_forward(DeviceView<const float> x, DeviceView<const float> w,
                                  DeviceView<const float> b, DeviceView<float> y) const {
  require(x.rows >= 1, "linear '" + name_ + "': X has no tokens");
  require(x.rows <= max_tokens_, "linear '" + name_ + "': X has " + std::to_string(x.rows) +
                                     " tokens, the workspace holds " + std::to_string(max_tokens_));
  require(x.cols == weight_.cols, "linear '" + name_ + "': X has " + std::to_string(x.cols) +
                                      " features, the layer takes " + std::to_string(weight_.cols));
  detail::check_view(x, {x.rows, weight_.cols}, "linear X");
  detail::check_view(w, weight_, "linear W");
  if (!b.empty()) detail::check_view(b, {1, weight_.rows}, "linear b");
  detail::check_view(y, {x.rows, weight_.rows}, "linear Y");
}

template <class Codec>
void Linear<Codec>::matmul_bias(DeviceView<const float> x, DeviceView<const float> w,
                                DeviceView<const float> b, DeviceView<float> y,
                                stream_t stream) const {
  float beta = 0.0f;
  if (!b.empty()) {
    detail::bias_rows_kernel<<<detail::grid_for(y.size(), 256), 256, 0, stream>>>(y, b.data);
    detail::check_launch("cuda::Linear: bias");
    beta = 1.0f;
  }
  const float one = 1.0f;
  detail::check_cublas(cublasSgemm(options_.cublas, CUBLAS_OP_T, CUBLAS_OP_N,
                                   static_cast<int>(weight_.rows), static_cast<int>(x.rows),
                                   static_cast<int>(weight_.cols), &one, w.data, detail::blas_ld(w),
                                   x.data, detail::blas_ld(x), &beta, y.data, detail::blas_ld(y)),
                       "cublasSgemm (Y = X Wᵀ)");
}

template <class Codec>
void Linear<Codec>::forward(DeviceView<const float> x, DeviceView<const float> w,
                            DeviceView<const float> b, DeviceView<float> y, stream_t stream) {
  check_forward(x, w, b, y);
  bind(stream);
  const index_t n = weight_.cols;
  if constexpr (detail::is_velora<Codec>) {
    const auto& o = options_.codec;
    const bool once = o.init == activation::VeloraInit::batch_average_once;
    constexpr index_t c = activation::VeLoRA::init_chunk;
    const index_t chunks = (x.rows + c - 1) / c;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((d_ + 127) / 128));
    detail::velora_partial_kernel<<<grid, 128, 0, stream>>>(x, o.groups, d_, partial_, flag_, once);
    detail::check_launch("cuda::Linear: velora init");
    detail::velora_finish_kernel<<<1, 256, 0, stream>>>(partial_, chunks, d_, sum_, v_, flag_,
                                                        once);
    detail::check_launch("cuda::Linear: velora init");
    detail::velora_project_kernel<<<detail::grid_for(x.rows * o.groups, 256), 256, 0, stream>>>(
        x, v_, o.groups, d_, saved_);
    detail::check_launch("cuda::Linear: velora projection");
  } else if constexpr (detail::is_compact<Codec>) {
    const index_t r = saved_cols_;
    const random::Key key{options_.codec.seed, tensor_id(name_), epoch_};
    const bool count = options_.codec.sketch == transforms::Sketch::count;
    std::int32_t* const packed = sketch_;
    std::int32_t* const offsets = sketch_ + n;
    std::int32_t* const members = sketch_ + n + r + 1;
    if (!p_ready_ || p_epoch_ != epoch_) {
      if (count) {
        detail::count_entries_kernel<<<detail::grid_for(n, 256), 256, 0, stream>>>(key, r, n,
                                                                                   packed);
        detail::count_sizes_kernel<<<detail::grid_for(r, 256), 256, 0, stream>>>(packed, n, r,
                                                                                 offsets);
        detail::count_scan_kernel<<<1, 1, 0, stream>>>(r, offsets);
        detail::count_members_kernel<<<detail::grid_for(r, 256), 256, 0, stream>>>(
            packed, n, r, offsets, members);
        detail::check_launch("cuda::Linear: count sketch");
      } else {
        fill_gaussian(device_view(p_, r, n), key, transforms::RandomProjection::stddev(r), stream);
      }
      p_epoch_ = epoch_;
      p_ready_ = true;
    }
    if (count) {
      detail::count_sketch_kernel<<<detail::grid_for(x.rows * r, 256), 256, 0, stream>>>(
          x, r, offsets, members, saved_);
      detail::check_launch("cuda::Linear: Z = X Pᵀ (count sketch)");
    } else {
      const float one = 1.0f, zero = 0.0f;
      detail::check_cublas(
          cublasSgemm(options_.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(r),
                      static_cast<int>(x.rows), static_cast<int>(n), &one, p_, static_cast<int>(n),
                      x.data, detail::blas_ld(x), &zero, saved_, static_cast<int>(r)),
          "cublasSgemm (Z = X Pᵀ)");
    }
  } else {
    detail::check(
        cudaMemcpy2DAsync(saved_, static_cast<std::size_t>(n) * sizeof(float), x.data,
                          static_cast<std::size_t>(detail::blas_ld(x)) * sizeof(float),
                          static_cast<std::size_t>(n) * sizeof(float),
                          static_cast<std::size_t>(x.rows), cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpy2DAsync (saved X)");
  }
  matmul_bias(x, w, b, y, stream);
  tokens_ = x.rows;
  pending_ = true;
}

template <class Codec>
void Linear<Codec>::infer(DeviceView<const float> x, DeviceView<const float> w,
                          DeviceView<const float> b, DeviceView<float> y, stream_t stream) {
  check_forward(x, w, b, y);
  bind(stream);
  matmul_bias(x, w, b, y, stream);
}

template <class Codec>
void Linear<Codec>::backward(DeviceView<const float> dy, DeviceView<const float> w,
                             DeviceView<float> dx, DeviceView<float> dw, DeviceView<float> db,
                             stream_t stream, bool accumulate_dx) {
  require(pending_, "linear '" + name_ + "': backward() without its forward()");
  require(dy.rows == tokens_ && dy.cols == weight_.rows,
          "linear '" + name_ + "': dY is " + std::to_string(dy.rows) + "x" +
              std::to_string(dy.cols) + " but the forward had " + std::to_string(tokens_) +
              " tokens and " + std::to_string(weight_.rows) + " outputs");
  detail::check_view(dy, {tokens_, weight_.rows}, "linear dY");
  detail::check_view(w, weight_, "linear W");
  if (!dx.empty()) detail::check_view(dx, {tokens_, weight_.cols}, "linear dX");
  detail::check_view(dw, grad_, "linear dW");
  if (!db.empty()) {
    detail::check_view(db, {1, weight_.rows}, "linear db");
    require(db.contiguous() || db.rows == 1, "linear db: must be contiguous");
  }
  bind(stream);
  const cublasHandle_t h = options_.cublas;
  const int m = static_cast<int>(weight_.rows), n = static_cast<int>(weight_.cols);
  const int t = static_cast<int>(tokens_);
  const float one = 1.0f, zero = 0.0f;
  if (!dx.empty())
    detail::check_cublas(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, t, m, &one, w.data,
                                     detail::blas_ld(w), dy.data, detail::blas_ld(dy),
                                     accumulate_dx ? &one : &zero, dx.data, detail::blas_ld(dx)),
                         "cublasSgemm (dX = dY W)");
  if (!db.empty())  // db += dYᵀ·1 (cuBLAS's gemv: deterministic)
    detail::check_cublas(cublasSgemv(h, CUBLAS_OP_N, m, t, &one, dy.data, detail::blas_ld(dy),
                                     ones_, 1, &one, db.data, 1),
                         "cublasSgemv (db += Σ dY)");
  const int k = static_cast<int>(saved_cols_);
  if constexpr (detail::is_velora<Codec>) {
    detail::check_cublas(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, k, m, t, &one, saved_, k, dy.data,
                                     detail::blas_ld(dy), &zero, h_, k),
                         "cublasSgemm (H = dYᵀ Z)");
    detail::velora_expand_kernel<<<detail::grid_for(dw.size(), 256), 256, 0, stream>>>(
        h_, v_, static_cast<float>(options_.codec.scale), options_.codec.groups, d_, dw);
    detail::check_launch("cuda::Linear: velora expand");
  } else {
    // dW (out × in, or out × r) += dYᵀ saved.
    detail::check_cublas(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, k, m, t, &one, saved_, k, dy.data,
                                     detail::blas_ld(dy), &one, dw.data, detail::blas_ld(dw)),
                         "cublasSgemm (dW += dYᵀ saved)");
  }
  pending_ = false;
}

template <class Codec>
std::vector<float> Linear<Codec>::codec_state() const {
  if constexpr (!detail::is_velora<Codec>) {
    return {};
  } else {
    detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    std::int32_t flag = 0;
    std::vector<float> out(static_cast<std::size_t>(d_) + 1);
    detail::check(cudaMemcpy(&flag, flag_, sizeof(flag), cudaMemcpyDeviceToHost), "cudaMemcpy");
    detail::check(cudaMemcpy(out.data() + 1, v_, static_cast<std::size_t>(d_) * sizeof(float),
                             cudaMemcpyDeviceToHost),
                  "cudaMemcpy");
    out[0] = flag != 0 ? 1.0f : 0.0f;
    return out;
  }
}

template <class Codec>
void Linear<Codec>::load_codec_state(std::span<const float> s) {
  if constexpr (!detail::is_velora<Codec>) {
    require(s.empty(), std::string(Codec::name) + ": the codec has no state to load");
  } else {
    const auto d = static_cast<std::size_t>(d_);
    require(s.size() == d + 1, "velora: state has " + std::to_string(s.size()) +
                                   " values, expected " + std::to_string(d + 1) +
                                   " (the flag and v of D' = " + std::to_string(d_) + ")");
    require(s[0] == 0.0f || s[0] == 1.0f, "velora: state flag must be 0 or 1");
    for (float e : s)
      require(std::isfinite(e), "velora: state holds a non-finite value");
    const std::int32_t flag = s[0] == 1.0f ? 1 : 0;
    detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    detail::check(cudaMemcpy(flag_, &flag, sizeof(flag), cudaMemcpyHostToDevice), "cudaMemcpy");
    detail::check(cudaMemcpy(v_, s.data() + 1, d * sizeof(float), cudaMemcpyHostToDevice),
                  "cudaMemcpy");
  }
}

}  // namespace slimgrad::cuda
