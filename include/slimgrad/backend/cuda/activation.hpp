// slimgrad/backend/cuda/activation.hpp — host-callable declarations of the compressed linear
// layer on the CUDA backend (activation/codecs.hpp; the CPU layer is activation::Linear in
// backend/cpu/activation.hpp, whose semantics this one follows).
//
// Plain C++ like api.hpp: a .cpp trainer includes this header; the one .cu file of the program
// includes <slimgrad/cuda.cuh> and instantiates the codecs it uses
// (`template class slimgrad::cuda::Linear<slimgrad::activation::CompAct>;`).
//
// Memory and streams belong to the caller. workspace_bytes(in, out, max_tokens, options) says
// how much device memory the layer needs: the saved activation of up to max_tokens tokens, the
// codec's state (VeLoRA's v and its flag; CompAct's P, r × n floats, or the count sketch's bucket
// lists, 2n + r + 1 ints, regenerated on the device when the epoch changes), the codec's scratch
// and the cuBLAS workspace. The constructor takes that buffer and a stream and only enqueues
// asynchronous work (VeLoRA's placeholder v). forward() and backward() validate their arguments on
// the host (slimgrad::Error, nothing enqueued), then enqueue cuBLAS GEMMs and a few kernels on the
// caller's stream: no allocation, no host synchronisation, so a step can be captured in a CUDA
// graph. What a capture freezes is host state: the token count and, for CompAct, whether P is
// regenerated (a forward captured right after set_step() into a new epoch regenerates P on every
// replay; one captured later does not), so capture again when CompAct's epoch changes (every
// update_gap steps).
//
//   forward    Y = X Wᵀ (+ b), exact (cuBLAS), and saved = the codec's compressed X:
//              None: X; VeLoRA: z = per-sub-token projections on v (v first set from the batch,
//              batch_average_once, in the CPU's summation order: the same bits); CompAct:
//              Z = X Pᵀ, P the CPU's Philox matrix (bit-identical); with the count sketch a
//              gather per bucket in the CPU's order (Z bit-identical too).
//   backward   dX = dY W (or +=), db += Σ dY, dW += the codec's weight gradient from what was
//              saved: dYᵀ X (None), s·(dYᵀ Z) ⊗ v (VeLoRA, out × in), dYᵀ Z (CompAct, out × r).
//
// GEMMs run in fp32 (CUBLAS_DEFAULT_MATH) unless Options::math asks for TF32 tensor cores. The
// cuBLAS handle is the caller's (Options::cublas, e.g. one per stream shared by every layer) or
// created once at construction; either way each call binds it to the call's stream and to the
// layer's cuBLAS workspace, so cuBLAS allocates nothing during a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "../../activation/codecs.hpp"
#include "../../core/config.hpp"
#include "../../core/view.hpp"
#include "api.hpp"

struct cublasContext;

namespace slimgrad::cuda {

/// cuBLAS's handle type (cublasHandle_t).
using cublas_t = cublasContext*;

enum class MathMode : std::uint8_t {
  fp32,  ///< IEEE fp32 GEMMs (the CPU layer's arithmetic)
  tf32   ///< TF32 tensor cores for the GEMMs (10-bit mantissa inputs, fp32 accumulation)
};

/// A linear layer that saves the codec's compressed activation (Codec: activation::None,
/// VeLoRA or CompAct). Views are device views, row-major, inner dimension contiguous (any
/// leading dimension); W is out × in (PyTorch's layout).
template <class Codec>
class Linear {
 public:
  struct Options {
    typename Codec::Options codec{};
    MathMode math = MathMode::fp32;
    cublas_t cublas = nullptr;  ///< the caller's handle; null: the layer creates its own
    std::size_t cublas_workspace = std::size_t{4} << 20;  ///< bytes handed to cuBLAS
  };

  /// Device bytes the layer needs for forwards of up to max_tokens tokens (Error on bad shapes
  /// or options, as the constructor).
  static std::size_t workspace_bytes(index_t in_features, index_t out_features, index_t max_tokens,
                                     const Options& options);
  /// `name` keys the codec's randomness (tensor_id(name), as on the CPU: CompAct's P matches
  /// the CPU layer's and the compact optimizer's for the same name).
  Linear(std::string_view name, index_t in_features, index_t out_features, index_t max_tokens,
         const Options& options, void* workspace, std::size_t workspace_size, stream_t stream);
  ~Linear();
  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;

  const std::string& name() const { return name_; }
  Shape weight_shape() const { return weight_; }
  /// out × in (None, VeLoRA) or out × r (CompAct).
  Shape grad_shape() const { return grad_; }
  /// Floats saved per token: in, G or r.
  index_t saved_cols() const { return saved_cols_; }

  /// The optimizer step the next forwards belong to (CompAct: epoch = step / update_gap).
  /// Refused while a backward is pending.
  void set_step(std::int64_t step);

  /// Y = X Wᵀ + b (b may be empty) and saves the compressed X (replacing the last one).
  void forward(DeviceView<const float> x, DeviceView<const float> w, DeviceView<const float> b,
               DeviceView<float> y, stream_t stream);
  /// Y = X Wᵀ + b, nothing saved.
  void infer(DeviceView<const float> x, DeviceView<const float> w, DeviceView<const float> b,
             DeviceView<float> y, stream_t stream);
  /// dX = dY W (or += with accumulate_dx), db += Σ dY, dW += the codec's weight gradient (from
  /// the last forward). dX and db may be empty (not wanted).
  void backward(DeviceView<const float> dy, DeviceView<const float> w, DeviceView<float> dx,
                DeviceView<float> dw, DeviceView<float> db, stream_t stream,
                bool accumulate_dx = false);

  bool pending() const { return pending_; }
  /// What the last forward saved (device): tokens × saved_cols().
  DeviceView<const float> saved() const {
    return DeviceView<const float>(saved_, tokens_, saved_cols_, saved_cols_);
  }
  /// Bytes of the last forward's saved activation.
  std::size_t saved_bytes() const {
    return static_cast<std::size_t>(tokens_ * saved_cols_) * sizeof(float);
  }
  /// What the exact layer would keep for the last forward: tokens × in floats.
  std::size_t uncompressed_bytes() const {
    return static_cast<std::size_t>(tokens_ * weight_.cols) * sizeof(float);
  }
  /// The codec's persistent state in the workspace: VeLoRA's v and flag, CompAct's P.
  std::size_t state_bytes() const { return state_bytes_; }

  /// The codec's state in the CPU layer's format (codec_state()/load_codec_state() of
  /// activation::Linear: VeLoRA {flag, v…}; empty for the others), with synchronous copies
  /// (checkpoints, not steps). A checkpoint resumes on either backend.
  std::vector<float> codec_state() const;
  void load_codec_state(std::span<const float> state);
  /// CompAct: P (r × n, device) of the last generated epoch; null for the others and for the
  /// count sketch (which keeps bucket lists instead).
  const float* projection() const { return p_; }

 private:
  std::string name_;
  Shape weight_, grad_;
  index_t saved_cols_ = 0, max_tokens_ = 0, d_ = 0;
  Options options_;
  bool own_cublas_ = false;
  float* saved_ = nullptr;
  float* v_ = nullptr;              // VeLoRA: v (D' floats)
  std::int32_t* flag_ = nullptr;    // VeLoRA: 1 once a batch has set v
  double* partial_ = nullptr;       // VeLoRA: the initialisation's chunk sums
  double* sum_ = nullptr;           // VeLoRA: their totals (D' doubles)
  float* ones_ = nullptr;           // max_tokens ones: db = dYᵀ·1
  float* h_ = nullptr;              // VeLoRA: H = dYᵀ Z (out × G)
  float* p_ = nullptr;              // CompAct: P (gaussian sketch)
  std::int32_t* sketch_ = nullptr;  // CompAct: the count sketch's bucket lists
  void* cublas_ws_ = nullptr;
  std::uint32_t epoch_ = 0, p_epoch_ = 0;
  bool p_ready_ = false;
  index_t tokens_ = 0;
  bool pending_ = false;
  std::size_t state_bytes_ = 0;

  void bind(stream_t stream) const;
  void check_forward(DeviceView<const float> x, DeviceView<const float> w,
                     DeviceView<const float> b, DeviceView<float> y) const;
  void matmul_bias(DeviceView<const float> x, DeviceView<const float> w, DeviceView<const float> b,
                   DeviceView<float> y, stream_t stream) const;
};

}  // namespace slimgrad::cuda
