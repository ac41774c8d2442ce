// slimgrad/backend/cuda/optimizer.hpp — Optimizer<Rule, Transform, Store, backend::cuda,
// Residual>: the CPU optimizer's interface over the CUDA multi-tensor classes of api.hpp.
//
// Plain C++ (the CPU headers and api.hpp; no CUDA header, no Eigen in any .cu file): a .cpp
// trainer includes this header, and its one .cu file instantiates the classes the composition
// uses (MultiTensorAdam<Store>, MultiTensorGwt<W, L> or MultiTensorLowRank<Transform>) and the
// byte helpers device_allocate, device_free, copy_to_host, copy_to_device<std::byte>.
//
// What it offers, as the CPU optimizer does: named parameters (device views, fp32, contiguous),
// step(params) → StepReport, set_lr, step_count, state_bytes (the CPU's exact accounting: the
// GPU holds the same moments, bases and limiter scalars), is_compressed, and checkpoints in the
// CPU's safetensors format — a file written on either backend loads on the other. Parameters the
// fallback keeps plain take MultiTensorAdam<Store>; the others the composition's engine:
//   Identity                        → MultiTensorAdam<Store> (torch, hf, bnb; Fp32, Bf16, Q8Block)
//   Dwt<Haar, L> + WaveletDetails   → MultiTensorGwt<Haar, L> (Fp32 state)
//   SvdProjection / Grassmann + Drop → MultiTensorLowRank<Transform> (Fp32 state, no limiter)
//   SvdProjection / Grassmann + Recovery → the same, with recovery scaling and its limiter
//                                   (Fira; SubTrack++ with Grassmann, its projection-aware
//                                   moments included; SvdProjection refuses projection_aware)
// The engines are built at the first step, for the parameters of that step: their launch tables
// hold the device pointers, so every later step must pass the same parameters with the same
// buffers (a trainer's persistent parameter and gradient buffers). Work is enqueued on the
// stream given at construction; step() synchronises with it only to report the tensors that
// GWT or the low-rank engine skipped (non-finite gradients). Checkpoints go through a CPU
// optimizer of the same composition, which takes the GPU's state (transfer.hpp's copies, the
// low-rank bases) and writes or reads the file, so both backends share one loader and its checks.
// Not offered (yet): per-parameter overrides, bf16 parameters (use the multi-tensor classes
// directly) and the non-finite gradient skip on the plain Adam path (its kernel does not check).
// The engines keep one step count (the low-rank engine also a count per tensor, which its
// checkpoints carry), so a file whose step counts differ between parameters is refused.
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

/// Settings of the CUDA engines that the CPU optimizer does not have.
struct DeviceOptions {
  bool tf32 = true;     ///< MultiTensorLowRank: TF32 tensor cores for the large GEMMs
  int lanes = 8;        ///< MultiTensorLowRank: refresh lanes
  bool batched = true;  ///< MultiTensorLowRank: one batched GEMM per shape group
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
}  // namespace detail
}  // namespace cuda

template <class Rule, class Transform, class Store, class Residual>
class Optimizer<Rule, Transform, Store, backend::cuda, Residual> {
  using Cpu = Optimizer<Rule, Transform, Store, backend::cpu, Residual>;
  using Engine = typename cuda::detail::engine_of<Transform>::type;
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
  using Compressed =
      std::conditional_t<std::is_void_v<Engine>, cuda::MultiTensorAdam<Store>, Engine>;

 public:
  using Options = typename Cpu::Options;

  explicit Optimizer(const Options& o = {}, cuda::stream_t stream = nullptr,
                     const cuda::DeviceOptions& device = {})
      : options_(o), stream_(stream), device_(device), accounting_(o) {
    if constexpr (lowrank && recovery) {
      require(!o.residual.projection_aware || std::is_same_v<Transform, transforms::Grassmann>,
              "cuda optimizer: projection-aware moments rotate at a tracking step: Grassmann "
              "only on the GPU");
      require(o.residual.recovery_scaling || o.residual.limiter_gamma == 0,
              "cuda optimizer: the low-rank engine limits the recovered residual only");
    } else if constexpr (lowrank) {
      require(o.residual.limiter_gamma == 0,
              "cuda optimizer: the low-rank engine has no norm-growth limiter");
    }
    if constexpr (wavelet)
      require(o.transform.axis == transforms::Axis::rows,
              "cuda optimizer: GWT transforms along rows only");
  }

  const Options& options() const { return options_; }
  static std::string composition() { return Cpu::composition(); }

  void set_lr(double lr) {
    require(std::isfinite(lr) && lr >= 0, "optimizer: lr must be finite and >= 0");
    options_.rule.lr = lr;
    if (plain_) plain_->set_lr(lr);
    if constexpr (!identity)
      if (engine_) engine_->set_lr(lr);
  }

  /// One step of every parameter (the same ones, with the same buffers, at every step).
  StepReport step(std::span<const cuda::Param> params) {
    std::vector<const cuda::Param*> sorted;
    for (const cuda::Param& p : params) {
      const std::string name(p.name);
      require(!p.name.empty(), "optimizer: a parameter has an empty name");
      require(p.weight.rows > 0 && p.weight.cols > 0,
              "optimizer: parameter '" + name + "' has zero size");
      require(p.grad.shape() == p.weight.shape(),
              "optimizer: gradient of '" + name + "' has another shape than its weight");
      require(p.weight.data && p.grad.data, "optimizer: parameter '" + name + "' has a null view");
      require(p.weight.ld == p.weight.cols && p.grad.ld == p.grad.cols,
              "cuda optimizer: parameter '" + name + "' is not contiguous");
      sorted.push_back(&p);
    }
    std::sort(sorted.begin(), sorted.end(),
              [](const cuda::Param* a, const cuda::Param* b) { return a->name < b->name; });
    for (std::size_t i = 1; i < sorted.size(); ++i)
      require(sorted[i]->name != sorted[i - 1]->name,
              "optimizer: parameter '" + std::string(sorted[i]->name) + "' appears twice");
    if (bound()) {
      require(sorted.size() == entries_.size(),
              "cuda optimizer: every step takes the parameters of the first step");
      for (std::size_t i = 0; i < sorted.size(); ++i) {
        const Entry& e = entries_[i];
        require(sorted[i]->name == e.name && sorted[i]->weight.data == e.weight &&
                    sorted[i]->grad.data == e.grad,
                "cuda optimizer: every step takes the parameters of the first step, with the "
                "same device buffers ('" +
                    std::string(sorted[i]->name) + "' differs)");
      }
    } else {
      if (pending_) {
        require(sorted.size() == pending_shapes_.size(),
                "cuda optimizer: the loaded checkpoint holds other parameters than this step");
        for (const cuda::Param* p : sorted) {
          const auto it = pending_shapes_.find(p->name);
          require(it != pending_shapes_.end() && it->second == p->weight.shape(),
                  "cuda optimizer: parameter '" + std::string(p->name) +
                      "' is not in the loaded checkpoint with this shape");
        }
      }
      bind(sorted);
      if (pending_) {
        apply(*pending_);
        pending_.reset();
        pending_shapes_.clear();
      }
    }
    if (plain_) plain_->step(stream_);
    if (engine_) engine_->step(stream_);
    ++steps_;
    StepReport report;
    report.stepped = static_cast<index_t>(entries_.size());
    std::vector<index_t> skipped;  // the engine's indices
    if constexpr (wavelet) {
      if (engine_) {
        std::vector<std::int32_t> flags(static_cast<std::size_t>(engine_->tensors()));
        cuda::detail::to_host(flags.data(), engine_->skipped(), flags.size(), stream_);
        for (std::size_t k = 0; k < flags.size(); ++k)
          if (flags[k]) skipped.push_back(static_cast<index_t>(k));
      }
    } else if constexpr (lowrank) {
      if (engine_) skipped = engine_->last_skipped();
    }
    for (const Entry& e : entries_)
      if (e.compressed && std::find(skipped.begin(), skipped.end(), e.index) != skipped.end()) {
        report.skipped.push_back(e.name);
        --report.stepped;
      }
    return report;
  }

  /// Steps taken (all parameters step together); 0 for an unknown parameter.
  std::int64_t step_count(std::string_view name) const {
    return find(name) || pending_shapes_.count(name) ? steps_ : 0;
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
  /// composition takes the GPU's state (synchronous copies) and writes the file.
  io::TensorFile to_checkpoint() const {
    require(!pending_, "cuda optimizer: a loaded checkpoint is applied at the first step");
    Cpu holder(options_);
    for (const Entry& e : entries_) {
      holder.add_state(e.name, e.shape);
      require(holder.is_compressed(e.name) == e.compressed,
              "cuda optimizer: '" + e.name + "' is compressed on one backend only");
      auto& rs = holder.rule_state(e.name);
      std::int64_t steps = steps_;
      if (!e.compressed) {
        const auto [m, ma] = cuda::detail::host_moment(rs.m);
        const auto [v, va] = cuda::detail::host_moment(rs.v);
        plain_->read_moments(e.index, m, v, ma, va);
      } else if constexpr (wavelet) {
        float limiter = -1.0f;
        engine_->read_state(e.index, rs.m.data.data(), rs.v.data.data(), limiter);
        holder.set_limiter_state(e.name, limiter >= 0.0f ? limiter : -1.0f);
      } else if constexpr (lowrank) {
        engine_->read_moments(e.index, rs.m.data.data(), rs.v.data.data());
        steps = engine_->tensor_steps(e.index);  // its own count: skipped steps do not count
        auto& ts = holder.transform_state(e.name);
        if (steps_ > 0) {  // refreshes ran at k ≡ 0 mod T, k < steps_
          const Shape bs = engine_->basis_shape(e.index);
          ts.basis.resize(bs.rows, bs.cols);
          engine_->read_basis(e.index, ts.basis.data());
          const index_t gap = options_.transform.update_gap;
          ts.refresh_count = static_cast<std::uint64_t>((steps_ + gap - 1) / gap);
          ts.last_refresh_step = (steps_ - 1) / gap * gap;
          std::tie(ts.last_refresh_status, ts.last_failure) = engine_->refresh_status(e.index);
        }
        if constexpr (recovery) holder.set_limiter_state(e.name, engine_->read_limiter(e.index));
      }
      holder.set_step_count(e.name, steps);
    }
    return holder.to_checkpoint();
  }

  /// Replaces the whole state with the checkpoint's: every check of the CPU loader (format,
  /// version, composition, structural options, shapes, checksum, values), then the parameters
  /// must be this optimizer's (or, before the first step, become the first step's) and share one
  /// step count. On any error nothing changes.
  void from_checkpoint(const io::TensorFile& f) {
    auto holder = std::make_unique<Cpu>(options_);
    holder->from_checkpoint(f);  // throws, with nothing changed here, on any defect of the file
    std::map<std::string, Shape, std::less<>> shapes;
    std::optional<std::int64_t> count;
    for (const auto& jn : nlohmann::json::parse(f.metadata.at("params"))) {
      const std::string name = jn.get<std::string>();
      io::StateReader r(f, name);
      std::vector<std::int64_t> shape(2);
      r.vector("shape", shape);
      shapes.emplace(name, Shape{static_cast<index_t>(shape[0]), static_cast<index_t>(shape[1])});
      const std::int64_t s = holder->step_count(name);
      require(!count || *count == s,
              "cuda optimizer: the checkpoint's parameters have different step counts (the CUDA "
              "engines step every parameter together)");
      count = s;
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
      steps_ = count.value_or(0);
      apply(*holder);
    } else {
      pending_ = std::move(holder);
      pending_shapes_ = std::move(shapes);
      steps_ = count.value_or(0);
    }
  }

  void save(const std::filesystem::path& path) const { io::write(path, to_checkpoint()); }
  void load(const std::filesystem::path& path) { from_checkpoint(io::read(path)); }

 private:
  struct Entry {
    std::string name;
    Shape shape;
    bool compressed = false;
    index_t index = 0;  // in its engine
    const float* weight = nullptr;
    const float* grad = nullptr;
  };

  bool bound() const { return !entries_.empty(); }
  const Entry* find(std::string_view name) const {
    const auto it = std::lower_bound(entries_.begin(), entries_.end(), name,
                                     [](const Entry& e, std::string_view n) { return e.name < n; });
    return it != entries_.end() && it->name == name ? &*it : nullptr;
  }

  void bind(const std::vector<const cuda::Param*>& sorted) {
    std::vector<Entry> entries;
    std::vector<cuda::Tensor> plain, compressed;
    Cpu probe(options_);  // the CPU engine's decision: plain (Fallback) or compressed
    for (const cuda::Param* p : sorted) {
      probe.add_state(p->name, p->weight.shape());
      Entry e{std::string(p->name), p->weight.shape(), probe.is_compressed(p->name)};
      e.weight = p->weight.data;
      e.grad = p->grad.data;
      cuda::Tensor t;
      t.weight = p->weight.data;
      t.grad = p->grad.data;
      t.rows = e.shape.rows;
      t.cols = e.shape.cols;
      t.id = tensor_id(e.name);
      auto& list = e.compressed ? compressed : plain;
      e.index = static_cast<index_t>(list.size());
      list.push_back(t);
      entries.push_back(std::move(e));
    }
    std::unique_ptr<cuda::detail::DeviceMemory> plain_ws, engine_ws;
    std::unique_ptr<cuda::MultiTensorAdam<Store>> plain_engine;
    std::unique_ptr<Compressed> engine;
    if (!plain.empty()) {
      typename cuda::MultiTensorAdam<Store>::Options o;
      o.rule = options_.rule;
      o.store = options_.store;
      o.seed = options_.seed;
      const std::size_t bytes = cuda::MultiTensorAdam<Store>::workspace_bytes(plain, o);
      plain_ws = std::make_unique<cuda::detail::DeviceMemory>(bytes);
      plain_engine =
          std::make_unique<cuda::MultiTensorAdam<Store>>(plain, o, plain_ws->ptr, bytes, stream_);
    }
    if constexpr (!identity) {
      if (!compressed.empty()) {
        typename Engine::Options o;
        o.rule = options_.rule;
        if constexpr (wavelet) {
          o.residual = options_.residual;
          o.mode = options_.transform.mode;
        } else {
          o.transform = options_.transform;
          o.scale = options_.residual.scale;
          o.tf32 = device_.tf32;
          o.lanes = device_.lanes;
          o.batched = device_.batched;
          if constexpr (recovery) {
            o.recovery_scaling = options_.residual.recovery_scaling;
            o.limiter_gamma = options_.residual.limiter_gamma;
            o.projection_aware = options_.residual.projection_aware;
          }
        }
        const std::size_t bytes = Engine::workspace_bytes(compressed, o);
        engine_ws = std::make_unique<cuda::detail::DeviceMemory>(bytes);
        engine = std::make_unique<Engine>(compressed, o, engine_ws->ptr, bytes, stream_);
      }
    }
    // Nothing above changed this object; now it takes everything at once.
    entries_ = std::move(entries);
    plain_ws_ = std::move(plain_ws);
    engine_ws_ = std::move(engine_ws);
    plain_ = std::move(plain_engine);
    engine_ = std::move(engine);
    if (plain_) plain_->set_steps(steps_);
    if (engine_) engine_->set_steps(steps_);
  }

  // Writes a validated state (a CPU optimizer that loaded the file) into the bound engines.
  void apply(const Cpu& holder) {
    for (const Entry& e : entries_) {
      const auto& rs = holder.rule_state(e.name);
      if (!e.compressed) {
        const auto [m, ma] = cuda::detail::host_moment(rs.m);
        const auto [v, va] = cuda::detail::host_moment(rs.v);
        plain_->write_moments(e.index, m, v, ma, va);
      } else if constexpr (wavelet) {
        engine_->write_state(e.index, rs.m.data.data(), rs.v.data.data(),
                             holder.limiter_state(e.name));
      } else if constexpr (lowrank) {
        engine_->write_moments(e.index, rs.m.data.data(), rs.v.data.data());
        const auto& ts = holder.transform_state(e.name);
        if (ts.basis.size() > 0) engine_->write_basis(e.index, ts.basis.data());
        if constexpr (recovery) engine_->write_limiter(e.index, holder.limiter_state(e.name));
      }
    }
    if (plain_) plain_->set_steps(steps_);
    if (engine_) engine_->set_steps(steps_);
  }

  Options options_;
  cuda::stream_t stream_ = nullptr;
  cuda::DeviceOptions device_;
  Cpu accounting_;              // predicted_state_bytes: the CPU's accounting of the same state
  std::vector<Entry> entries_;  // sorted by name
  std::unique_ptr<cuda::detail::DeviceMemory> plain_ws_, engine_ws_;
  std::unique_ptr<cuda::MultiTensorAdam<Store>> plain_;
  std::unique_ptr<Compressed> engine_;
  std::unique_ptr<Cpu> pending_;  // a loaded checkpoint, until the first step binds the engines
  std::map<std::string, Shape, std::less<>> pending_shapes_;
  std::int64_t steps_ = 0;
};

}  // namespace slimgrad
