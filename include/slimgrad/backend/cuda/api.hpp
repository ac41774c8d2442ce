// slimgrad/backend/cuda/api.hpp — host-callable declarations of the CUDA backend (design.md §3).
//
// Plain C++: a .cpp trainer (g++, clang, with or without Eigen) includes this header and calls
// the CUDA backend; exactly one .cu file of the program includes <slimgrad/cuda.cuh> and
// instantiates the classes it uses (`template class slimgrad::cuda::MultiTensorAdam<...>;`),
// fmt's header-only/compiled split. No CUDA header is needed here: a stream is the runtime's
// opaque `CUstream_st*` (cudaStream_t), declared below.
//
// Memory and streams belong to the caller. Every object is built in two steps: the static
// workspace_bytes(...) says how much device memory it needs; the constructor takes a device
// buffer of at least that size (aligned to workspace_alignment) and a stream, and only enqueues
// asynchronous work on it (zeroing the state, uploading the launch table). A steady-state step()
// then allocates nothing and never synchronises with the host: it is a fixed number of kernel
// launches on the caller's stream (one for Adam over every tensor, three with its finite check;
// three for GWT with its limiter or finite check, one without), whose per-step scalars travel as
// kernel arguments, or, for a step captured in a CUDA graph, are read from a caller-owned device
// StepScalars. Errors of the arguments are reported with slimgrad::Error before anything is
// enqueued; a failed launch throws slimgrad::Error with the runtime's message.
//
// Precision of parameters and gradients (the optimizer state is the Store's business):
//   fp32         weights and gradients fp32;
//   bf16         weights and gradients bf16 (the peers' pure-bf16 runs): the step is computed
//                in fp32 from the widened values and the weight is rounded once, to nearest even;
//   fp32_master  fp32 master weights, bf16 gradients; after the step the bf16 model copy
//                (Tensor::weight_bf16, when given) receives the rounded master weight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "../../core/config.hpp"
#include "../../core/orientation.hpp"
#include "../../core/philox.hpp"
#include "../../core/view.hpp"
#include "../../optim/adam.hpp"
#include "../../optim/residual.hpp"
#include "../../state/stores.hpp"
#include "../../transforms/dwt.hpp"
#include "../../transforms/grassmann.hpp"
#include "../../transforms/svd_projection.hpp"

struct CUstream_st;

namespace slimgrad::cuda {

/// The CUDA runtime's stream handle (cudaStream_t); nullptr is the legacy default stream.
using stream_t = CUstream_st*;

/// Every region carved out of a workspace starts on a multiple of this many bytes.
inline constexpr std::size_t workspace_alignment = 256;

enum class Precision : std::uint8_t { fp32, bf16, fp32_master };

/// One parameter tensor, contiguous row-major rows × cols (PyTorch's out×in layout), living on
/// the device. The pointers must stay valid for the optimizer's lifetime (the launch table
/// holds them), as a trainer's persistent parameter and gradient buffers do.
struct Tensor {
  void* weight = nullptr;                ///< fp32 (fp32, fp32_master) or bf16 bits (bf16)
  const void* grad = nullptr;            ///< fp32 (fp32) or bf16 bits (bf16, fp32_master)
  std::uint16_t* weight_bf16 = nullptr;  ///< fp32_master only: bf16 copy written after a step
  index_t rows = 0;
  index_t cols = 0;
  /// Names the tensor's random words (stochastic rounding: Key{seed, id, step}); the CPU engine
  /// uses tensor_id(name), so the same id gives the same bits on both backends.
  std::uint64_t id = 0;
  index_t size() const { return rows * cols; }
};

/// Where one tensor's moments live in the workspace (device pointers), in the Store's format:
/// fp32 floats, bf16 bits, or 8-bit codes with one fp32 absmax per block (quantized). The
/// layout is the CPU store's, so the same bytes can be checkpointed on either backend.
struct MomentBuffers {
  void* m = nullptr;
  void* v = nullptr;
  float* m_absmax = nullptr;  ///< quantized only
  float* v_absmax = nullptr;
  bool quantized = false;
  index_t count = 0;
};

/// The per-step scalars of one optimizer step, for steps captured in a CUDA graph: a captured
/// launch replays its kernel arguments, so step(stream, device_scalars) has the kernels read
/// these from device memory instead, where the caller writes scalars(t) before each replay
/// (e.g. a cudaMemcpyAsync from pinned memory, inside or outside the graph).
struct StepScalars {
  optim::AdamStep adam{};   ///< optim::Adam::step_scalars(rule with the current lr, t)
  std::uint32_t epoch = 0;  ///< t − 1: names stochastic rounding's random words (Adam, Bf16)
  /// The current lr (MultiTensorAdam with check_finite: the scalars of a tensor whose count
  /// lags after a skip are computed on the device from the rule's options with this lr).
  double lr = 0;
};

namespace detail {
/// What MultiTensorAdam's step kernel reads per tensor under check_finite (device memory):
/// mode 0 takes the step's shared scalars, 1 skips the tensor, 2 takes the scalars and
/// stochastic-rounding epoch of the tensor's own step (it lags after a skip).
struct AdamTensorStep {
  std::int32_t mode;
  std::uint32_t epoch;
  optim::AdamStep adam;
};

/// Test hook, not an API (as cpu::detail::svd_injected_failures): bit k set makes the next SVD
/// refresh of MultiTensorLowRank's tensor k report a breakdown (as a failed Cholesky factor) and
/// clears the bit. It lets the tests reach the failure paths that a real breakdown (rare,
/// input-dependent) would take.
inline thread_local std::uint64_t svd_injected_failures = 0;
}  // namespace detail

/// Adam (any convention: torch, hf, bnb) over a list of tensors, one launch per step for all of
/// them. Store: state::Fp32, state::Bf16 (nearest-even or stochastic rounding) or
/// state::Q8Block<256> (bitsandbytes' blockwise 8-bit: dequantise, update, requantise in one
/// pass; tensors under min_8bit_size stay fp32, as on the CPU). The per-element math is the
/// CPU's (optim/adam.hpp, state/q8_math.hpp, core/numeric.hpp), so a program built with
/// -fmad=false reproduces impl<Adam, backend::cpu>::update_apply bit for bit.
///
/// With Options::check_finite, a tensor whose gradient holds a NaN or an infinity is skipped by
/// the step, as the CPU optimizer skips it: weights, moments (codes and absmax) and the tensor's
/// own step count untouched; its later steps take the bias corrections (and the stochastic
/// rounding epoch) of its own count. The check is a pass of its own over the gradients before
/// the step (a tensor must be known clean before any of its blocks is written, and a tensor
/// spans many warps), so it costs the gradient's bytes once more (4 of 28 per fp32 parameter,
/// 4 of 16.1 for 8-bit): it is off by default, for trainers that check their gradients already
/// (a global-norm clip does); Optimizer<…, backend::cuda> turns it on (DeviceOptions). The
/// flags stay on the device (skipped()); last_skipped() and tensor_steps() read them.
template <class Store>
class MultiTensorAdam {
 public:
  struct Options {
    optim::Adam::Options rule{};
    typename Store::Options store{};
    Precision precision = Precision::fp32;
    std::uint64_t seed = 0;     ///< stochastic rounding: Key{seed, Tensor::id, step − 1}
    bool check_finite = false;  ///< skip tensors whose gradient is not finite (see above)
  };

  static std::size_t workspace_bytes(std::span<const Tensor> tensors, const Options& options);
  MultiTensorAdam(std::span<const Tensor> tensors, const Options& options, void* workspace,
                  std::size_t workspace_size, stream_t stream);

  /// Step t = steps() + 1 of every tensor.
  void step(stream_t stream);
  /// The same launch with the per-step scalars read from `device_scalars` (device memory, at
  /// least until the kernel has run): capturable in a CUDA graph whose replays take whatever
  /// the caller wrote there (scalars(t) of the step being replayed). Counts one step on the
  /// host, as step() does; replays do not, so a caller that replays sets set_steps() itself.
  void step(stream_t stream, const StepScalars* device_scalars);
  /// What step t reads: Adam's scalars with the current learning rate, and the epoch t − 1.
  StepScalars scalars(std::int64_t t) const;
  /// The learning rate of the following steps (a schedule; finite, >= 0).
  void set_lr(double lr);
  std::int64_t steps() const { return t_; }
  /// Exact bytes of optimizer state (the moments; the launch table is not state).
  std::size_t state_bytes() const { return state_bytes_; }
  MomentBuffers moments(index_t tensor) const;
  index_t tensors() const { return static_cast<index_t>(moments_.size()); }

  /// Checkpoints across backends: copies tensor k's moments to or from host memory in the CPU
  /// store's layout (the bytes of impl<Store, backend::cpu>::Buffer: fp32 floats, bf16 bits, or
  /// 8-bit codes plus one absmax per block, whose pointers are ignored for fp32 formats), with
  /// synchronous copies (not for the steady-state step). With set_steps() a run resumes on
  /// either backend from the other's state.
  void read_moments(index_t tensor, void* m, void* v, float* m_absmax, float* v_absmax) const;
  void write_moments(index_t tensor, const void* m, const void* v, const float* m_absmax,
                     const float* v_absmax);
  /// The number of steps taken so far (the next step() is t + 1). Tensors that lag keep their
  /// lag (steps() − tensor_steps()): set it with set_tensor_steps() after this.
  void set_steps(std::int64_t t);

  /// check_finite only (else nullptr / an Error). Device array, one int per tensor: 1 when the
  /// last step skipped it.
  const std::int32_t* skipped() const { return flags_.skipped; }
  /// The tensors the last step skipped (ascending; synchronises with the device).
  std::vector<index_t> last_skipped() const;
  /// Steps tensor k has taken: steps() minus its skips (synchronises).
  std::int64_t tensor_steps(index_t tensor) const;
  /// Sets tensor k's own count (0 <= steps <= steps(); a checkpoint's count), synchronously.
  void set_tensor_steps(index_t tensor, std::int64_t steps);
  /// Whether tensors may lag (Options::check_finite skips them).
  bool check_finite() const { return options_.check_finite; }

 private:
  /// Device state of the finite check: per tensor the check's flag (cleared by the step that
  /// reads it), the last step's skip, the number of skips, and what the step kernel reads.
  struct Flags {
    std::int32_t* bad = nullptr;
    std::int32_t* skipped = nullptr;
    std::int32_t* skips = nullptr;
    detail::AdamTensorStep* steps = nullptr;
  };
  Options options_;
  std::vector<MomentBuffers> moments_;
  void* table_ = nullptr;  // device: one entry per tensor, then the unit prefix sums
  Flags flags_;
  index_t units_ = 0;
  std::int64_t t_ = 0;
  std::size_t state_bytes_ = 0;
  void launch(stream_t stream, const StepScalars& s, const StepScalars* device_scalars);
};

/// GWT's step (algorithms.md §1.2) over a list of tensors: L-level DWT along each row, Adam on
/// the approximation (fp32 moments, m × N_L per tensor as on the CPU), details divided by their
/// ancestor's denominator and the limiter's ρ, inverse DWT, W ← W − c·α·U. Fused per group of
/// 2^L samples of a row, which a thread transforms in registers: one pass over G, the moments
/// and W. The norm-growth limiter (γ > 0) needs ‖N‖ per tensor before a weight moves: a first
/// pass reads G and the moments (‖N‖ and the finite check), and a one-block-per-tensor kernel
/// turns per-block sums into ρ (a fixed order: runs are deterministic). Options::
/// optimistic_limiter (without the finite check) steps with ρ = 1 while summing ‖N‖² (pass A)
/// and reads again only a tensor the limiter scales (pass B: W += c·f·(1 − 1/ρ)·u, u
/// recomputed): an unlimited tensor's weights are the CPU's bits, a limited one's differ from
/// the CPU's by rounding (tests/cuda/test_gwt.cpp states the bound). Without the limiter, the
/// finite check alone reads G before the step. A tensor the finite check skips keeps its own
/// step count (tensor_steps): its later steps take the bias corrections of that count, as on the
/// CPU (a kernel of one thread per tensor computes them on the device before the step). Haar
/// only.
template <class Wavelet, int Levels>
class MultiTensorGwt {
 public:
  struct Options {
    optim::Adam::Options rule{};
    residual::WaveletDetails::Options residual{};
    transforms::BoundaryMode mode = transforms::BoundaryMode::zero;
    Precision precision = Precision::fp32;
    /// Skip a tensor whose gradient holds a NaN or infinity (the CPU engine's rule): a read of
    /// G (4 B/param in fp32) before the step. A trainer that already checks its gradients (a
    /// global-norm clip does) can turn it off and save that read.
    bool check_finite = true;
    /// With the limiter and without the finite check: the optimistic step (pass A with ρ = 1,
    /// pass B for the limited tensors). It moves 16 + 14·f B/param against the two-pass step's
    /// 22 (fp32), f the fraction of tensors the limiter scales in a step: a win only while
    /// f < 3/7, and a real run limits about half of them (BENCHMARKS.md), so it is off by default.
    bool optimistic_limiter = false;
  };

  static std::size_t workspace_bytes(std::span<const Tensor> tensors, const Options& options);
  MultiTensorGwt(std::span<const Tensor> tensors, const Options& options, void* workspace,
                 std::size_t workspace_size, stream_t stream);

  void step(stream_t stream);
  /// For CUDA graphs: the kernels read Adam's scalars from `device_scalars` (see
  /// MultiTensorAdam::step(stream, device_scalars); with check_finite, a tensor that lags takes
  /// its own scalars from the epoch and lr there).
  void step(stream_t stream, const StepScalars* device_scalars);
  StepScalars scalars(std::int64_t t) const;
  void set_lr(double lr);
  std::int64_t steps() const { return t_; }
  std::size_t state_bytes() const { return state_bytes_; }
  /// Device pointers: the moments of tensor k (fp32, m × N_L).
  MomentBuffers moments(index_t tensor) const;
  /// Device array, one int per tensor: 1 when the last step skipped it (non-finite gradient).
  const std::int32_t* skipped() const { return skipped_; }
  /// Device array, one float per tensor: the limiter's remembered norm (NaN: unset).
  float* limiter_state() const { return limiter_; }
  /// Device array, one float per tensor: the divisor ρ the limiter applied in the last step (1:
  /// inactive, or a skipped tensor; 0 before the first step with the limiter on).
  const float* limiter_divisors() const { return rho_; }
  index_t tensors() const { return static_cast<index_t>(moments_.size()); }

  /// Checkpoints across backends (backend/cuda/transfer.hpp): tensor k's moments (fp32,
  /// m × N_L floats each, the CPU optimizer's layout) and the limiter's remembered norm
  /// (negative or NaN: unset), with synchronous copies (not for the steady-state step).
  void read_state(index_t tensor, float* m, float* v, float& limiter) const;
  void write_state(index_t tensor, const float* m, const float* v, float limiter);
  /// The number of steps taken so far (the next step() is t + 1). Tensors that lag keep their
  /// lag (steps() − tensor_steps()): set it with set_tensor_steps() after this.
  void set_steps(std::int64_t t);
  /// Steps tensor k has taken: steps() minus its skips (check_finite; synchronises). A skipped
  /// tensor's later steps take the bias corrections of its own count, as on the CPU.
  std::int64_t tensor_steps(index_t tensor) const;
  /// Sets tensor k's own count (0 <= steps <= steps(); below steps() only with check_finite),
  /// synchronously.
  void set_tensor_steps(index_t tensor, std::int64_t steps);
  /// Whether tensors may lag (Options::check_finite skips them).
  bool check_finite() const { return options_.check_finite; }

 private:
  Options options_;
  std::vector<MomentBuffers> moments_;
  void* table_ = nullptr;
  double* partial_ = nullptr;    // ‖N‖² per unit
  std::int32_t* bad_ = nullptr;  // non-finite flag per unit (the two-pass step)
  float* rho_ = nullptr;
  std::int32_t* skipped_ = nullptr;
  float* limiter_ = nullptr;
  std::uint32_t* unit_tensor_ = nullptr;   // the tensor of each unit (a load instead of a search)
  std::int32_t* skips_ = nullptr;          // per tensor: steps skipped (check_finite)
  detail::AdamTensorStep* own_ = nullptr;  // per tensor: the scalars of its own step
  index_t units_ = 0;
  int limit_grid_ = 1;  // blocks of pass B
  std::int64_t t_ = 0;
  std::size_t state_bytes_ = 0;
  void launch(stream_t stream, const StepScalars& s, const StepScalars* device_scalars);
};

/// GaLore (Transform = transforms::SvdProjection, algorithms.md §5) and SubTrack-Grad
/// (transforms::Grassmann, §2.2) over a list of fp32 tensors, with the CPU's orientation rules
/// (side_for: the smaller side is projected) and stored layouts (basis m×r on the left, P r×n on
/// the right; coefficients and moments r×n or m×r, row-major). A steady step is three pieces of
/// work on the caller's stream: R = projection of G (one batched cuBLAS GEMM per shape group),
/// Adam on every coefficient (one kernel; N = M/D overwrites R), and one batched GEMM per group
/// that updates W in place, W ← β·W + α'·Back(N), which expresses the convention's decoupled
/// decay exactly up to rounding (hf: β = 1 − lr·λ, α' = −c·α·β). With Options::tf32 (the
/// default) the GEMMs run on TF32 tensor cores (10-bit mantissa products, fp32 accumulation);
/// off, they are plain fp32 (the tests compare with the CPU that way).
///
/// Refresh (GaLore: k ≡ 0 mod T; SubTrack: its SVD at k = 0, then a geodesic step at k ≡ 0 mod
/// T, k > 0) runs inside the step that is due. The randomized SVD runs on the caller's stream
/// from the calling thread, batched (below); exact refreshes and tracking steps are spread over
/// Options::lanes internal streams (forked from and joined back into the caller's stream with
/// events), each with its own cuBLAS and cuSOLVER handle created at construction and fed by its
/// own host thread during the refresh. The steady step and the batched refresh use one more
/// cuBLAS handle (and cuSOLVER handle), also created at construction and bound to the caller's
/// stream at each step. Every cuBLAS handle gets its workspace from the caller's buffer, so no
/// step allocates. The refresh's cuSOLVER calls may synchronise with the host internally; the
/// steady step never does.
///   randomized (SvdMethod::randomized): Ω from Philox (Key{seed, Tensor::id, k/T}, the CPU's
///     bits), Y = ĜΩ, q power iterations orthonormalised by shifted Cholesky-QR, then Q by
///     Cholesky-QR2, Bᵀ = ĜᵀQ and the top-r eigenvectors of BBᵀ (ℓ×ℓ): S = Q·V, canonical
///     signs. The large products run per tensor; the Grams, Cholesky factorisations and
///     triangular solves batched over runs of up to 16 tensors of one shape, the eigenproblems
///     in one cusolverDnXsyevBatched call per Options::refresh_batch tensors of one ℓ. The CPU
///     uses Householder QR and an SVD of R: same subspace.
///   exact: the top-r eigenvectors of ĜĜᵀ (dim0×dim0, fp32 GEMM + syevd), canonical signs.
///   Grassmann tracking: the CPU's step (A = SᵀĜ, W = ĜAᵀ, B = (I − SSᵀ)W twice, top
///     eigenvector of BᵀB by ten normalised squarings and three power steps on cuBLAS (no
///     host sync), u = −Bv/‖Bv‖, θ = ησ, rank-1 geodesic update), then Cholesky-QR (R with a
///     positive diagonal: the CPU's Householder Q) every reorth_every-th tracking step (counted
///     whether or not the step turned the basis). A tensor whose first SVD failed (the identity
///     basis, RefreshStatus::identity_basis) runs the SVD again at the next tracking step instead,
///     as the CPU (the flags are read then: one host sync after a refresh that may have failed);
///     with projection_aware, a retry that installs its basis rotates the moments with
///     C = S_newᵀ I, as the CPU's refresh reports it.
/// SubTrack++'s recovery scaling with its limiter: Options::recovery_scaling (per tensor after
/// the update GEMM: Λ from one more GEMM, φ from C and N, ‖Λ‖ and ρ on the device, W += −c·Λ/ρ)
/// and its projection-aware moments: Options::projection_aware (Grassmann; on the tracking lane
/// after a step that turned the basis, C = S_newᵀS_old and the CPU's rotate_moments on cuBLAS).
/// Parameters in bf16 or fp32 master weights with bf16 gradients (Options::precision, as
/// MultiTensorAdam): the step widens the bf16 gradients (and, in bf16 mode, the weights) into fp32
/// copies in the workspace, runs the fp32 step on them, and rounds the weights back once to nearest
/// even (fp32_master: the master weight into Tensor::weight_bf16). Costs 4 bytes of workspace per
/// parameter for the gradients, 4 more in bf16 mode for the weights, and two passes over them.
template <class Transform>
class MultiTensorLowRank {
 public:
  struct Options {
    optim::Adam::Options rule{};              ///< the recipes use the hf convention, ε 1e-6
    typename Transform::Options transform{};  ///< rank, T, method / η, ...
    double scale = 0.25;                      ///< α of the back-projection
    bool tf32 = true;                         ///< TF32 tensor cores for the large GEMMs
    /// Streams (each with a host thread) that exact refreshes and tracking steps spread over.
    int lanes = 8;
    /// One batched cuBLAS GEMM per shape group (true) or one GEMM per tensor (false).
    bool batched = true;
    /// Randomized refresh: the most tensors (of one sketch width ℓ) whose Rayleigh–Ritz
    /// eigenproblems go to one batched cuSOLVER call. Its scratch (per tensor: Q, dim0×ℓ; BBᵀ,
    /// ℓ×ℓ; the eigensolver's workspace, about 5ℓ² floats) is part of the workspace, so this
    /// trades memory for refresh time (the call's time is mostly per call).
    int refresh_batch = 64;
    Precision precision = Precision::fp32;  ///< parameters and gradients (see above)
    /// SubTrack++ / Fira recovery scaling (residual::Recovery, algorithms.md §2.3(b)): the
    /// update adds Λ = (G − Expand(C)) ⊙ φ, φ = ‖N‖/(‖C‖ + 1e-8) per channel of the
    /// non-projected side, divided by the norm-growth limiter's ρ: U = α·Expand(N) + NL(Λ).
    /// Costs a coefficient-sized copy of C and one m×n buffer (the largest tensor) of
    /// workspace, and per tensor one more GEMM and two passes over m×n.
    bool recovery_scaling = false;
    double limiter_gamma = 0.0;  ///< γ of the limiter on Λ (0: off; SubTrack++: 1.01)
    /// SubTrack++'s projection-aware Adam (residual::Recovery::Options::projection_aware,
    /// algorithms.md §2.3(a); Grassmann only): when a tracking step turns a tensor's basis,
    /// its moments are carried into the new one as cpu::rotate_moments does (raw moments,
    /// C = S_newᵀS_old): M ← C M, V ← |(C⊙C)(V − M²) + (C M)²| (left; M Cᵀ on the right). On
    /// the tracking lane, fp32 GEMMs; costs 2·r·dim1 floats of scratch per lane.
    bool projection_aware = false;
  };

  static std::size_t workspace_bytes(std::span<const Tensor> tensors, const Options& options);
  MultiTensorLowRank(std::span<const Tensor> tensors, const Options& options, void* workspace,
                     std::size_t workspace_size, stream_t stream);
  ~MultiTensorLowRank();
  MultiTensorLowRank(const MultiTensorLowRank&) = delete;
  MultiTensorLowRank& operator=(const MultiTensorLowRank&) = delete;

  /// Step t = steps() + 1 of every tensor (k = steps(): refreshes first when k is due).
  void step(stream_t stream);
  /// The steady step (no refresh may be due: refreshes run host threads and cuSOLVER, so a
  /// caller runs those steps with step(stream)) with the per-step scalars read from
  /// `device_scalars` (device memory; epoch = t − 1 gives the lagging tensors their own t):
  /// capturable in a CUDA graph whose replays take what the caller wrote there, scalars(t).
  /// Counts one step on the host; replays do not (set_steps()).
  void step(stream_t stream, const StepScalars* device_scalars);
  /// What step t reads: Adam's scalars with the current learning rate, and the epoch t − 1.
  StepScalars scalars(std::int64_t t) const;
  /// The learning rate of the following steps (a schedule; finite, >= 0).
  void set_lr(double lr);
  /// Runs the refresh that step k = steps() would run (SVD or tracking) now, on every tensor,
  /// without an Adam step (benchmarks time it on its own).
  void refresh(stream_t stream);
  /// Whether the next step() refreshes (some tensor has no basis, or k is due).
  bool refresh_due() const;
  std::int64_t steps() const;
  void set_steps(std::int64_t t);
  /// Exact bytes of state: the moments (8 bytes per coefficient) and the fp32 bases.
  std::size_t state_bytes() const;
  index_t tensors() const;
  Side side(index_t tensor) const;
  Shape basis_shape(index_t tensor) const;  ///< m×r (left) or r×n (right)
  Shape coeff_shape(index_t tensor) const;  ///< r×n (left) or m×r (right)
  /// Synchronous copies in the CPU state's layout (checkpoints, tests): the basis as
  /// BasisState::basis stores it; writing one marks the tensor's basis as present and final
  /// (not provisional).
  void read_basis(index_t tensor, float* host) const;
  void write_basis(index_t tensor, const float* host);
  /// BasisState::provisional of `tensor` (synchronous): its basis is the identity of a failed
  /// first refresh, which Grassmann's next due step replaces by a new SVD. Checkpoints keep it;
  /// set_provisional(true) needs a basis (after write_basis).
  bool provisional(index_t tensor) const;
  void set_provisional(index_t tensor, bool provisional);
  void read_moments(index_t tensor, float* m, float* v) const;
  void write_moments(index_t tensor, const float* m, const float* v);
  /// The limiter's remembered norm of Λ (recovery scaling with limiter_gamma > 0; −1: unset or
  /// no limiter), as the CPU's checkpoint stores it.
  float read_limiter(index_t tensor) const;
  void write_limiter(index_t tensor, float norm);

  /// Robustness, as the CPU optimizer: a tensor whose gradient holds NaN or Inf is skipped by
  /// that step (weights, moments, basis and its own step count untouched; its later steps take
  /// the bias corrections of its own count). The flags stay on the device; these reads
  /// synchronise, so a steady step never waits for the host. Deviation: the refresh schedule
  /// (and the refresh's Philox epoch) follows steps(), not the tensor's own count: the counts
  /// live on the device, and the host, which launches a refresh (cuSOLVER, lane threads), would
  /// have to read them before every step to find a lagging tensor's due step.
  /// The tensors the last step skipped (ascending indices).
  std::vector<index_t> last_skipped() const;
  /// Steps tensor `tensor` has taken (steps() minus its skips).
  std::int64_t tensor_steps(index_t tensor) const;
  /// Sets tensor k's own count (0 <= steps <= steps(); a checkpoint's count after set_steps),
  /// synchronously: its later steps take the bias corrections of that count.
  void set_tensor_steps(index_t tensor, std::int64_t steps);
  /// The last refresh's outcome for `tensor`, as the CPU's state keeps it: a failed refresh
  /// (Cholesky or eigensolver breakdown, a non-finite result) keeps the previous basis
  /// (kept_previous) or, with none yet, installs the first r coordinate vectors
  /// (identity_basis, provisional: Grassmann retries the SVD at its next due step); it never
  /// installs a non-finite basis. Deviation: the CPU first tries the other SVD method (exact ↔
  /// randomized; status fallback_method); here the workspace holds the configured method's
  /// buffers only (the exact refresh's dim0² Gram and eigensolver workspace per lane, or the
  /// randomized batch's sketches), and the verdict is known only on the device, so the identity
  /// is installed at once. An all-zero (finite) gradient is no failure, as on the CPU: every
  /// direction is a singular vector, and both backends install the first r coordinate vectors
  /// with status ok, not provisional (the device decides from the refresh's gradient scan).
  std::pair<transforms::RefreshStatus, transforms::RefreshFailure> refresh_status(
      index_t tensor) const;

  struct State;  // defined in backend/cuda/lowrank.cuh

 private:
  std::unique_ptr<State> s_;
};

/// Device memory and synchronous copies for host code (backend/cuda/optimizer.hpp): cudaMalloc,
/// cudaFree, and copies on `stream` that return once done. T = std::byte (a template only so
/// that the one .cu file instantiates it, like everything else here).
template <class T>
T* device_allocate(std::size_t bytes);
template <class T>
void device_free(T* p) noexcept;
template <class T>
void copy_to_host(T* host, const T* device, std::size_t bytes, stream_t stream);
template <class T>
void copy_to_device(T* device, const T* host, std::size_t bytes, stream_t stream);

/// `out` (device, row-major, any leading dimension) ← N(0, stddev²) values named by `key`: the
/// same bits as random::fill_gaussian on the CPU. T = float (a template only so that the one
/// .cu file instantiates it, like everything else here).
template <class T>
void fill_gaussian(DeviceView<T> out, const random::Key& key, double stddev, stream_t stream);

/// codes[i] = the 8-bit code of x[i] in a block whose absmax is absmax[i] (the signed map for
/// Moment::first): the device's quantiser, equal to state::q8::quantize for every pair of
/// floats. T = float.
template <class T>
void q8_quantize_codes(const T* x, const T* absmax, std::uint8_t* codes, index_t n,
                       state::Moment kind, stream_t stream);

/// The L-level DWT of every row of g (m × n) into coeffs (m × K, pywt's packed layout, see
/// transforms/dwt.hpp), and back (out: m × n). Haar only; contiguous rows.
template <class Wavelet, int Levels>
void dwt_forward_rows(DeviceView<const float> g, DeviceView<float> coeffs,
                      transforms::BoundaryMode mode, stream_t stream);
template <class Wavelet, int Levels>
void dwt_inverse_rows(DeviceView<const float> coeffs, DeviceView<float> out,
                      transforms::BoundaryMode mode, stream_t stream);

}  // namespace slimgrad::cuda
