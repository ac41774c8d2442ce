// slimgrad/backend/cuda/optimizer.hpp — Optimizer<Rule, Transform, Store, backend::cuda,
// Residual>: the CPU optimizer's interface over the CUDA multi-tensor classes of api.hpp.
//
// Plain C++ (the CPU headers and api.hpp; no CUDA header, no Eigen in any .cu file): a .cpp
// trainer includes this header, and its one .cu file instantiates the classes the composition
// uses (MultiTensorAdam<Store>, MultiTensorGwt<W, L> or MultiTensorLowRank<Transform>) and the
// byte helpers device_allocate, device_free, copy_to_host, copy_to_device<std::byte>.
//
// What it offers, as the CPU optimizer does: named parameters (device views, contiguous) in
// fp32 (Param), bf16 (ParamBf16: the step in fp32 from the widened values, the weight rounded
// once) or fp32 master weights with bf16 gradients and an optional bf16 model copy
// (ParamMaster), the precision fixed by the first step; step(params) → StepReport, set_lr,
// step_count, state_bytes (the CPU's exact accounting: the GPU holds the same moments, bases and
// limiter scalars), is_compressed, per-parameter overrides (set_override: role, lr_scale,
// weight_decay, transform and residual options, with the CPU's checks, before the first step),
// the non-finite gradient skip, and checkpoints in the CPU's safetensors format — a file written
// on either backend loads on the other. Parameters the fallback (or an override) keeps plain
// take MultiTensorAdam<Store>; the others the composition's engine:
//   Identity                        → MultiTensorAdam<Store> (torch, hf, bnb; Fp32, Bf16, Q8Block)
//   Dwt<Haar, L> + WaveletDetails   → MultiTensorGwt<Haar, L> (Fp32 state)
//   SvdProjection / Grassmann + Drop → MultiTensorLowRank<Transform> (Fp32 state, no limiter)
//   SvdProjection / Grassmann + Recovery → the same, with recovery scaling and its limiter
//                                   (Fira; SubTrack++ with Grassmann, its projection-aware
//                                   moments included; SvdProjection refuses projection_aware)
// Parameters whose overrides give the same settings share one engine; each distinct setting
// (an lr scale, a weight decay, a rank) is an engine of its own, one more launch per step.
// The engines are built at the first step, for the parameters of that step: their launch tables
// hold the device pointers, so every later step must pass the same parameters with the same
// buffers (a trainer's persistent parameter and gradient buffers). Work is enqueued on the
// stream given at construction.
// Non-finite gradients (DeviceOptions::check_finite, on by default): a tensor whose gradient
// holds NaN or Inf is skipped — weights and moments untouched, and its own step count too (its
// later steps take their own bias corrections, as on the CPU). The flags stay on the device; step()
// waits for them to name the skipped tensors in its report (DeviceOptions::report_skips; off,
// step() never synchronises and last_skipped() reads them on request). The plain path's check is a
// pass of its own over the gradients (4 more bytes per fp32 parameter: see MultiTensorAdam).
// bf16 and fp32-master parameters: every engine steps in fp32 from the widened values and rounds
// the weight once (the plain and GWT kernels in registers; the low-rank engine through fp32
// copies in its workspace: 4 bytes per parameter for the gradients, 4 more for bf16 weights).
// Checkpoints go through a CPU optimizer of the same composition and overrides, which takes the
// GPU's state (transfer.hpp's copies, the low-rank bases, the per-tensor counts) and writes or
// reads the file, so both backends share one loader and its checks. Per-tensor step counts that
// differ (skips) load into every engine: the plain and GWT ones with check_finite, the low-rank
// one always (it always checks). DeviceOptions::refresh_batch sizes the low-rank engine's
// batched randomized refresh.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../../slimgrad.hpp"
#include "api.hpp"
#include "transfer.hpp"

namespace slimgrad {

namespace cuda {

/// A parameter handed to the CUDA optimizer's step(): device views (fp32, contiguous rows).
struct Param {
  std::string_view name;
  DeviceView<float> weight;
  DeviceView<const float> grad;
};

/// bf16 parameters and gradients (bf16 bits; Precision::bf16, the peers' pure-bf16 runs): the
/// step is computed in fp32 from the widened values, the weight rounded once to nearest even.
struct ParamBf16 {
  std::string_view name;
  DeviceView<std::uint16_t> weight;
  DeviceView<const std::uint16_t> grad;
};

/// fp32 master weights with bf16 gradients (Precision::fp32_master); after each step the bf16
/// model copy (weight_bf16: weight's shape, contiguous; may be null) gets the rounded weight.
struct ParamMaster {
  std::string_view name;
  DeviceView<float> weight;
  DeviceView<const std::uint16_t> grad;
  std::uint16_t* weight_bf16 = nullptr;
};

/// Settings of the CUDA engines that the CPU optimizer does not have.
struct DeviceOptions {
  bool tf32 = true;     ///< MultiTensorLowRank: TF32 tensor cores for the large GEMMs
  int lanes = 8;        ///< MultiTensorLowRank: refresh lanes
  bool batched = true;  ///< MultiTensorLowRank: one batched GEMM per shape group
  /// MultiTensorLowRank: the most tensors per batched eigensolver call of the randomized
  /// refresh (>= 1); its scratch grows with it (BENCHMARKS.md gives GaLore's trade-off).
  int refresh_batch = 64;
  /// Skip a tensor whose gradient holds NaN or Inf, as the CPU does (plain path and GWT; the
  /// low-rank engine always checks). Off saves the plain path's check pass (one more read of
  /// the gradients) for a trainer that checks its gradients itself.
  bool check_finite = true;
  /// step() waits for the device to name the skipped tensors in its report, as the CPU's does.
  /// Off: step() never synchronises (a steady step is then launches only; the report counts
  /// every tensor as stepped) and last_skipped() reads the flags when asked.
  bool report_skips = true;
};

namespace detail {
template <class Transform>
struct engine_of {
  using type = void;
};
template <class W, int L>
struct engine_of<transforms::Dwt<W, L>> {
  using type = MultiTensorGwt<W, L>;
};
template <>
struct engine_of<transforms::SvdProjection> {
  using type = MultiTensorLowRank<transforms::SvdProjection>;
};
template <>
struct engine_of<transforms::Grassmann> {
  using type = MultiTensorLowRank<transforms::Grassmann>;
};

/// A device allocation owned by the optimizer (its engines' workspace).
struct DeviceMemory {
  std::byte* ptr = nullptr;
  explicit DeviceMemory(std::size_t bytes) : ptr(device_allocate<std::byte>(bytes)) {}
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() { device_free(ptr); }
};

template <class T>
void to_host(T* host, const void* device, std::size_t count, stream_t stream) {
  copy_to_host(reinterpret_cast<std::byte*>(host), static_cast<const std::byte*>(device),
               count * sizeof(T), stream);
}
template <class T>
void to_device(void* device, const T* host, std::size_t count, stream_t stream) {
  copy_to_device(static_cast<std::byte*>(device), reinterpret_cast<const std::byte*>(host),
                 count * sizeof(T), stream);
}

/// One parameter of any precision, as step() checks and binds it.
struct RawParam {
  std::string_view name;
  Shape shape, grad_shape;
  bool contiguous = false;
  void* weight = nullptr;
  const void* grad = nullptr;
  std::uint16_t* copy = nullptr;
};
inline RawParam raw(const Param& p) {
  return {p.name,         p.weight.shape(),
          p.grad.shape(), p.weight.contiguous() && p.grad.contiguous(),
          p.weight.data,  p.grad.data};
}
inline RawParam raw(const ParamBf16& p) {
  return {p.name,         p.weight.shape(),
          p.grad.shape(), p.weight.contiguous() && p.grad.contiguous(),
          p.weight.data,  p.grad.data};
}
inline RawParam raw(const ParamMaster& p) {
  return {
      p.name,        p.weight.shape(), p.grad.shape(), p.weight.contiguous() && p.grad.contiguous(),
      p.weight.data, p.grad.data,      p.weight_bf16};
}
}  // namespace detail
}  // namespace cuda

template <class Rule, class Transform, class Store, class Residual>
class Optimizer<Rule, Transform, Store, backend::cuda, Residual> {
  using Cpu = Optimizer<Rule, Transform, Store, backend::cpu, Residual>;
  using Engine = typename cuda::detail::engine_of<Transform>::type;
  using Plain = cuda::MultiTensorAdam<Store>;
  static constexpr bool identity = std::is_same_v<Transform, transforms::Identity>;
  static constexpr bool lowrank = std::is_same_v<Transform, transforms::SvdProjection> ||
                                  std::is_same_v<Transform, transforms::Grassmann>;
  static constexpr bool wavelet = !identity && !lowrank && !std::is_void_v<Engine>;
  static constexpr bool recovery = std::is_same_v<Residual, residual::Recovery>;
  static_assert(std::is_same_v<Rule, optim::Adam>, "slimgrad cuda: Optimizer runs Adam only");
  static_assert(identity ||
                    (wavelet && std::is_same_v<Residual, residual::WaveletDetails> &&
                     std::is_same_v<Store, state::Fp32>) ||
                    (lowrank && (std::is_same_v<Residual, residual::Drop> || recovery) &&
                     std::is_same_v<Store, state::Fp32>),
                "slimgrad cuda: Optimizer composes Identity (any store), Dwt<Haar, L> with "
                "WaveletDetails, or SvdProjection / Grassmann with Drop or Recovery (Fp32 state)");
  // The engine of the compressed parameters (none with Identity: a placeholder type).
  using Compressed = std::conditional_t<std::is_void_v<Engine>, Plain, Engine>;

 public:
  using Options = typename Cpu::Options;
  using Override = typename Cpu::Override;

  explicit Optimizer(const Options& o = {}, cuda::stream_t stream = nullptr,
                     const cuda::DeviceOptions& device = {})
      : options_(o), stream_(stream), device_(device), accounting_(o) {
    require(device.refresh_batch >= 1,
            "cuda optimizer: DeviceOptions::refresh_batch must be at least 1, got " +
                std::to_string(device.refresh_batch));
    check_engine(o.transform, o.residual);
  }

  const Options& options() const { return options_; }
  static std::string composition() { return Cpu::composition(); }

  void set_lr(double lr) {
    require(std::isfinite(lr) && lr >= 0, "optimizer: lr must be finite and >= 0");
    options_.rule.lr = lr;
    for (auto& g : plain_)
      g.engine->set_lr(lr * g.lr_scale);
    if constexpr (!identity)
      for (auto& g : engines_)
        g.engine->set_lr(lr * g.lr_scale);
  }

  /// Per-parameter settings, as on the CPU (role, lr_scale, weight_decay, transform and
  /// residual options), with the CPU's checks; given before the first step (the engines are
  /// built then). Parameters with the same settings share an engine: each distinct setting
  /// costs one more launch per step (a low-rank engine also its refresh lanes).
  void set_override(std::string name, Override o) {
    require(!bound() && !pending_, "optimizer: parameter '" + name +
                                       "' already has state; set overrides before its first step");
    check_engine(o.transform ? *o.transform : options_.transform,
                 o.residual ? *o.residual : options_.residual);
    accounting_.set_override(name, o);  // the CPU's checks; throws with nothing changed
    overrides_[std::move(name)] = std::move(o);
  }

  /// One step of every parameter (the same ones, with the same buffers, at every step), in one
  /// precision: fp32 (Param), bf16 (ParamBf16) or fp32 master weights with bf16 gradients
  /// (ParamMaster), fixed by the first step.
  StepReport step(std::span<const cuda::Param> params) {
    return step_raw(raws(params), cuda::Precision::fp32);
  }
  StepReport step(std::span<const cuda::ParamBf16> params) {
    return step_raw(raws(params), cuda::Precision::bf16);
  }
  StepReport step(std::span<const cuda::ParamMaster> params) {
    return step_raw(raws(params), cuda::Precision::fp32_master);
  }

  /// The parameters the last step skipped (non-finite gradients), by name; synchronises.
  std::vector<std::string> last_skipped() const {
    std::vector<std::string> out;
    std::vector<std::vector<index_t>> plain(plain_.size()), packed(engines_.size());
    if (device_.check_finite)
      for (std::size_t k = 0; k < plain_.size(); ++k)
        plain[k] = plain_[k].engine->last_skipped();
    if constexpr (wavelet) {
      if (device_.check_finite)
        for (std::size_t k = 0; k < engines_.size(); ++k) {
          const auto& e = *engines_[k].engine;
          std::vector<std::int32_t> flags(static_cast<std::size_t>(e.tensors()));
          cuda::detail::to_host(flags.data(), e.skipped(), flags.size(), stream_);
          for (std::size_t i = 0; i < flags.size(); ++i)
            if (flags[i]) packed[k].push_back(static_cast<index_t>(i));
        }
    } else if constexpr (lowrank) {
      for (std::size_t k = 0; k < engines_.size(); ++k)
        packed[k] = engines_[k].engine->last_skipped();
    }
    for (const Entry& e : entries_) {
      const auto& list = e.compressed ? packed[e.group] : plain[e.group];
      if (std::find(list.begin(), list.end(), e.index) != list.end()) out.push_back(e.name);
    }
    return out;
  }

  /// Steps a parameter has taken (a skipped step does not count on the plain path, GWT and the
  /// low-rank engine; synchronises for those); 0 for an unknown parameter.
  std::int64_t step_count(std::string_view name) const {
    if (pending_) return pending_shapes_.count(name) ? pending_->step_count(name) : 0;
    const Entry* e = find(name);
    return e ? tensor_steps(*e) : 0;
  }
  bool is_compressed(std::string_view name) const {
    const Entry* e = find(name);
    require(e != nullptr, "optimizer: no state for parameter '" + std::string(name) + "'");
    return e->compressed;
  }
  /// Exact bytes of optimizer state, accounted as on the CPU (the same moments, bases and
  /// limiter scalars; step counters counted per parameter).
  std::size_t state_bytes() const {
    std::size_t total = 0;
    for (const Entry& e : entries_)
      total += accounting_.predicted_state_bytes(e.name, e.shape);
    return total;
  }
  std::size_t state_bytes(std::string_view name) const {
    const Entry* e = find(name);
    require(e != nullptr, "optimizer: no state for parameter '" + std::string(name) + "'");
    return accounting_.predicted_state_bytes(e->name, e->shape);
  }
  std::size_t size() const { return entries_.size(); }

  /// The whole state in the CPU optimizer's checkpoint format: a CPU optimizer of the same
  /// composition and overrides takes the GPU's state (synchronous copies) and writes the file.
  io::TensorFile to_checkpoint() const {
    require(!pending_, "cuda optimizer: a loaded checkpoint is applied at the first step");
    const auto holder = make_cpu();
    for (const Entry& e : entries_) {
      holder->add_state(e.name, e.shape);
      require(holder->is_compressed(e.name) == e.compressed,
              "cuda optimizer: '" + e.name + "' is compressed on one backend only");
      auto& rs = holder->rule_state(e.name);
      const std::int64_t steps = tensor_steps(e);
      if (!e.compressed) {
        const auto [m, ma] = cuda::detail::host_moment(rs.m);
        const auto [v, va] = cuda::detail::host_moment(rs.v);
        plain_[e.group].engine->read_moments(e.index, m, v, ma, va);
      } else if constexpr (wavelet) {
        float limiter = -1.0f;
        engines_[e.group].engine->read_state(e.index, rs.m.data.data(), rs.v.data.data(), limiter);
        holder->set_limiter_state(e.name, limiter >= 0.0f ? limiter : -1.0f);
      } else if constexpr (lowrank) {
        const auto& engine = *engines_[e.group].engine;
        engine.read_moments(e.index, rs.m.data.data(), rs.v.data.data());
        auto& ts = holder->transform_state(e.name);
        if (steps_ > 0) {  // refreshes ran at k ≡ 0 mod T, k < steps_
          const Shape bs = engine.basis_shape(e.index);
          ts.basis.resize(bs.rows, bs.cols);
          engine.read_basis(e.index, ts.basis.data());
          const index_t gap = engines_[e.group].update_gap;
          ts.refresh_count = static_cast<std::uint64_t>((steps_ + gap - 1) / gap);
          ts.last_refresh_step = (steps_ - 1) / gap * gap;
          std::tie(ts.last_refresh_status, ts.last_failure) = engine.refresh_status(e.index);
          ts.provisional = engine.provisional(e.index);
        }
        if constexpr (recovery) holder->set_limiter_state(e.name, engine.read_limiter(e.index));
      }
      holder->set_step_count(e.name, steps);
    }
    return holder->to_checkpoint();
  }

  /// Replaces the whole state with the checkpoint's: every check of the CPU loader (format,
  /// version, composition, structural options, shapes, checksum, values), then the parameters
  /// must be this optimizer's (or, before the first step, become the first step's). The
  /// engines' count is the largest; a parameter may lag behind it (skipped steps) in the
  /// low-rank engine, and on the plain and GWT paths when check_finite is on. On any error
  /// nothing changes.
  void from_checkpoint(const io::TensorFile& f) {
    auto holder = make_cpu();
    holder->from_checkpoint(f);  // throws, with nothing changed here, on any defect of the file
    std::map<std::string, Shape, std::less<>> shapes;
    std::int64_t count = 0;
    for (const auto& jn : nlohmann::json::parse(f.metadata.at("params"))) {
      const std::string name = jn.get<std::string>();
      io::StateReader r(f, name);
      std::vector<std::int64_t> shape(2);
      r.vector("shape", shape);
      shapes.emplace(name, Shape{static_cast<index_t>(shape[0]), static_cast<index_t>(shape[1])});
      count = std::max(count, holder->step_count(name));
    }
    for (const auto& [name, shape] : shapes) {
      const std::int64_t s = holder->step_count(name);
      const bool may_lag = (holder->is_compressed(name) && lowrank) ||
                           ((!holder->is_compressed(name) || wavelet) && device_.check_finite);
      require(s == count || may_lag,
              "cuda optimizer: the checkpoint's parameters have different step counts ('" + name +
                  "' " + std::to_string(s) + ", another " + std::to_string(count) +
                  "); without check_finite the plain and GWT engines step their parameters "
                  "together");
    }
    if (bound()) {
      require(shapes.size() == entries_.size(),
              "cuda optimizer: the checkpoint holds other parameters than this optimizer");
      for (const Entry& e : entries_) {
        const auto it = shapes.find(e.name);
        require(it != shapes.end() && it->second == e.shape,
                "cuda optimizer: parameter '" + e.name + "' is not in the checkpoint with shape " +
                    std::to_string(e.shape.rows) + "x" + std::to_string(e.shape.cols));
      }
      steps_ = count;
      apply(*holder);
    } else {
      pending_ = std::move(holder);
      pending_shapes_ = std::move(shapes);
      steps_ = count;
    }
  }

  void save(const std::filesystem::path& path) const { io::write(path, to_checkpoint()); }
  void load(const std::filesystem::path& path) { from_checkpoint(io::read(path)); }

 private:
  struct Entry {
    std::string name;
    Shape shape;
    bool compressed = false;
    std::size_t group = 0;  // in plain_ or engines_
    index_t index = 0;      // in its group's engine
    const void* weight = nullptr;
    const void* grad = nullptr;
    const void* copy = nullptr;
  };
  template <class E>
  struct Group {
    std::string key;  // the effective options and lr_scale, as text
    double lr_scale = 1.0;
    index_t update_gap = 1;  // low-rank: the refresh period
    std::vector<cuda::Tensor> tensors;
    typename E::Options options;
    std::unique_ptr<cuda::detail::DeviceMemory> ws;
    std::unique_ptr<E> engine;
  };

  // What the engines cannot do, refused before anything changes.
  static void check_engine(const typename Transform::Options& t,
                           const typename Residual::Options& r) {
    if constexpr (lowrank && recovery) {
      require(!r.projection_aware || std::is_same_v<Transform, transforms::Grassmann>,
              "cuda optimizer: projection-aware moments rotate at a tracking step: Grassmann "
              "only on the GPU");
      require(r.recovery_scaling || r.limiter_gamma == 0,
              "cuda optimizer: the low-rank engine limits the recovered residual only");
    } else if constexpr (lowrank) {
      require(r.limiter_gamma == 0,
              "cuda optimizer: the low-rank engine has no norm-growth limiter");
    }
    if constexpr (wavelet)
      require(t.axis == transforms::Axis::rows, "cuda optimizer: GWT transforms along rows only");
    (void)t, (void)r;
  }

  std::unique_ptr<Cpu> make_cpu() const {
    auto c = std::make_unique<Cpu>(options_);
    for (const auto& [name, o] : overrides_)
      c->set_override(name, o);
    return c;
  }

  template <class P>
  static std::vector<cuda::detail::RawParam> raws(std::span<const P> params) {
    std::vector<cuda::detail::RawParam> out;
    out.reserve(params.size());
    for (const P& p : params)
      out.push_back(cuda::detail::raw(p));
    return out;
  }

  StepReport step_raw(const std::vector<cuda::detail::RawParam>& params, cuda::Precision p) {
    std::vector<const cuda::detail::RawParam*> sorted;
    for (const cuda::detail::RawParam& r : params) {
      const std::string name(r.name);
      require(!r.name.empty(), "optimizer: a parameter has an empty name");
      require(r.shape.rows > 0 && r.shape.cols > 0,
              "optimizer: parameter '" + name + "' has zero size");
      require(r.grad_shape == r.shape,
              "optimizer: gradient of '" + name + "' has another shape than its weight");
      require(r.weight && r.grad, "optimizer: parameter '" + name + "' has a null view");
      require(r.contiguous, "cuda optimizer: parameter '" + name + "' is not contiguous");
      sorted.push_back(&r);
    }
    std::sort(sorted.begin(), sorted.end(),
              [](const auto* a, const auto* b) { return a->name < b->name; });
    for (std::size_t i = 1; i < sorted.size(); ++i)
      require(sorted[i]->name != sorted[i - 1]->name,
              "optimizer: parameter '" + std::string(sorted[i]->name) + "' appears twice");
    if (bound()) {
      require(p == precision_,
              "cuda optimizer: every step takes the parameters' precision of the first step");
      require(sorted.size() == entries_.size(),
              "cuda optimizer: every step takes the parameters of the first step");
      for (std::size_t i = 0; i < sorted.size(); ++i) {
        const Entry& e = entries_[i];
        require(sorted[i]->name == e.name && sorted[i]->weight == e.weight &&
                    sorted[i]->grad == e.grad && sorted[i]->copy == e.copy,
                "cuda optimizer: every step takes the parameters of the first step, with the "
                "same device buffers ('" +
                    std::string(sorted[i]->name) + "' differs)");
      }
    } else {
      if (pending_) {
        require(sorted.size() == pending_shapes_.size(),
                "cuda optimizer: the loaded checkpoint holds other parameters than this step");
        for (const auto* r : sorted) {
          const auto it = pending_shapes_.find(r->name);
          require(it != pending_shapes_.end() && it->second == r->shape,
                  "cuda optimizer: parameter '" + std::string(r->name) +
                      "' is not in the loaded checkpoint with this shape");
        }
      }
      bind(sorted, p);
      if (pending_) {
        apply(*pending_);
        pending_.reset();
        pending_shapes_.clear();
      }
    }
    for (auto& g : plain_)
      g.engine->step(stream_);
    if constexpr (!identity)
      for (auto& g : engines_)
        g.engine->step(stream_);
    ++steps_;
    StepReport report;
    report.stepped = static_cast<index_t>(entries_.size());
    if (device_.report_skips) {
      report.skipped = last_skipped();
      report.stepped -= static_cast<index_t>(report.skipped.size());
    }
    return report;
  }

  bool bound() const { return !entries_.empty(); }
  const Entry* find(std::string_view name) const {
    const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                     [](const Entry& e, std::string_view n) { return e.name < n; });
    return it != entries_.end() && it->name == name ? &*it : nullptr;
  }
  std::int64_t tensor_steps(const Entry& e) const {
    if (!e.compressed) return plain_[e.group].engine->tensor_steps(e.index);
    if constexpr (lowrank || wavelet) return engines_[e.group].engine->tensor_steps(e.index);
    return steps_;
  }

  // The rule of a parameter: its lr scale and weight decay (the CPU's rule_for).
  optim::Adam::Options rule_of(const Override* o) const {
    optim::Adam::Options r = options_.rule;
    if (o) {
      r.lr *= o->lr_scale;
      if (o->weight_decay) r.weight_decay = *o->weight_decay;
    }
    return r;
  }

  template <class E, class MakeOptions>
  static void add_to_group(std::vector<Group<E>>& groups, std::string key, double lr_scale,
                           const cuda::Tensor& t, Entry& e, MakeOptions&& make) {
    auto it =
        std::find_if(groups.begin(), groups.end(), [&](const Group<E>& g) { return g.key == key; });
    if (it == groups.end()) {
      Group<E> g;
      g.key = std::move(key);
      g.lr_scale = lr_scale;
      make(g);
      groups.push_back(std::move(g));
      it = groups.end() - 1;
    }
    e.group = static_cast<std::size_t>(it - groups.begin());
    e.index = static_cast<index_t>(it->tensors.size());
    it->tensors.push_back(t);
  }

  void bind(const std::vector<const cuda::detail::RawParam*>& sorted, cuda::Precision precision) {
    std::vector<Entry> entries;
    std::vector<Group<Plain>> plain;
    std::vector<Group<Compressed>> compressed;
    const auto probe = make_cpu();  // the CPU engine's decision: plain (Fallback) or compressed
    for (const auto* p : sorted) {
      probe->add_state(p->name, p->shape);
      Entry e{std::string(p->name), p->shape, probe->is_compressed(p->name)};
      e.weight = p->weight;
      e.grad = p->grad;
      e.copy = p->copy;
      cuda::Tensor t;
      t.weight = p->weight;
      t.grad = p->grad;
      t.weight_bf16 = p->copy;
      t.rows = e.shape.rows;
      t.cols = e.shape.cols;
      t.id = tensor_id(e.name);
      const auto ov = overrides_.find(e.name);
      const Override* o = ov == overrides_.end() ? nullptr : &ov->second;
      // The group: every option this parameter's step reads, as text, and its lr scale.
      Options effective = options_;
      effective.rule = rule_of(o);
      effective.rule.lr = options_.rule.lr;  // set_lr scales it per group
      if (o && o->transform) effective.transform = *o->transform;
      if (o && o->residual) effective.residual = *o->residual;
      const double lr_scale = o ? o->lr_scale : 1.0;
      std::string key = fields::to_text(lr_scale);
      auto add = [&](const char* k, const auto& v) {
        key += ";" + (k + ("=" + fields::to_text(v)));
      };
      if (e.compressed)
        fields::visit_all(effective, add);
      else
        fields::visit(effective.rule, add);  // a plain parameter reads only the rule
      if (!e.compressed) {
        add_to_group(plain, std::move(key), lr_scale, t, e, [&](Group<Plain>& g) {
          g.options.rule = rule_of(o);
          g.options.store = options_.store;
          g.options.seed = options_.seed;
          g.options.precision = precision;
          g.options.check_finite = device_.check_finite;
        });
      } else if constexpr (!identity) {
        add_to_group(compressed, std::move(key), lr_scale, t, e, [&](Group<Compressed>& g) {
          auto& c = g.options;
          c.rule = rule_of(o);
          if constexpr (wavelet) {
            c.residual = effective.residual;
            c.mode = effective.transform.mode;
            c.precision = precision;
            c.check_finite = device_.check_finite;
          } else {
            c.transform = effective.transform;
            c.scale = effective.residual.scale;
            c.tf32 = device_.tf32;
            c.lanes = device_.lanes;
            c.batched = device_.batched;
            c.refresh_batch = device_.refresh_batch;
            c.precision = precision;
            g.update_gap = effective.transform.update_gap;
            if constexpr (recovery) {
              c.recovery_scaling = effective.residual.recovery_scaling;
              c.limiter_gamma = effective.residual.limiter_gamma;
              c.projection_aware = effective.residual.projection_aware;
            }
          }
        });
      }
      entries.push_back(std::move(e));
    }
    // Engines built (their constructors check every tensor) before this object changes.
    auto build = [&](auto& groups) {
      for (auto& g : groups) {
        using E = typename std::remove_reference_t<decltype(*g.engine)>;
        const std::size_t bytes = E::workspace_bytes(g.tensors, g.options);
        g.ws = std::make_unique<cuda::detail::DeviceMemory>(bytes);
        g.engine = std::make_unique<E>(g.tensors, g.options, g.ws->ptr, bytes, stream_);
      }
    };
    build(plain);
    if constexpr (!identity) build(compressed);
    // Nothing above changed this object; now it takes everything at once.
    entries_ = std::move(entries);
    plain_ = std::move(plain);
    engines_ = std::move(compressed);
    precision_ = precision;
    for (auto& g : plain_)
      g.engine->set_steps(steps_);
    for (auto& g : engines_)
      g.engine->set_steps(steps_);
  }

  // Writes a validated state (a CPU optimizer that loaded the file) into the bound engines.
  void apply(const Cpu& holder) {
    for (auto& g : plain_)
      g.engine->set_steps(steps_);
    for (auto& g : engines_)
      g.engine->set_steps(steps_);
    for (const Entry& e : entries_) {
      const auto& rs = holder.rule_state(e.name);
      if (!e.compressed) {
        const auto [m, ma] = cuda::detail::host_moment(rs.m);
        const auto [v, va] = cuda::detail::host_moment(rs.v);
        auto& engine = *plain_[e.group].engine;
        engine.write_moments(e.index, m, v, ma, va);
        engine.set_tensor_steps(e.index, holder.step_count(e.name));
      } else if constexpr (wavelet) {
        engines_[e.group].engine->write_state(e.index, rs.m.data.data(), rs.v.data.data(),
                                              holder.limiter_state(e.name));
        engines_[e.group].engine->set_tensor_steps(e.index, holder.step_count(e.name));
      } else if constexpr (lowrank) {
        auto& engine = *engines_[e.group].engine;
        engine.write_moments(e.index, rs.m.data.data(), rs.v.data.data());
        engine.set_tensor_steps(e.index, holder.step_count(e.name));
        const auto& ts = holder.transform_state(e.name);
        if (ts.basis.size() > 0) {
          engine.write_basis(e.index, ts.basis.data());
          engine.set_provisional(e.index, ts.provisional);
        }
        if constexpr (recovery) engine.write_limiter(e.index, holder.limiter_state(e.name));
      }
    }
  }

  Options options_;
  cuda::stream_t stream_ = nullptr;
  cuda::DeviceOptions device_;
  Cpu accounting_;  // predicted_state_bytes and the overrides' checks: the CPU's accounting
  std::map<std::string, Override, std::less<>> overrides_;
  std::vector<Entry> entries_;  // sorted by name
  cuda::Precision precision_ = cuda::Precision::fp32;
  std::vector<Group<Plain>> plain_;  // one engine per distinct setting of the plain parameters
  std::vector<Group<Compressed>> engines_;
  std::unique_ptr<Cpu> pending_;  // a loaded checkpoint, until the first step binds the engines
  std::map<std::string, Shape, std::less<>> pending_shapes_;
  std::int64_t steps_ = 0;
};

}  // namespace slimgrad
