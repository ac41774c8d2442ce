// slimgrad/backend/cpu/activation.hpp — the activation codecs and the compressed linear layer on
// the CPU backend (activation/codecs.hpp, activation/linear.hpp).
//
// A codec implementation has one job: turn the layer input X into what is saved (compress) and
// turn dY plus the saved form into the weight gradient (weight_grad, accumulating). The layer
// around it does the exact parts (Y = X Wᵀ + b, dX = dY W, db = Σ dY) with Eigen GEMMs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "../../activation/codecs.hpp"
#include "../../activation/linear.hpp"
#include "../../core/orientation.hpp"
#include "../../core/philox.hpp"
#include "common.hpp"
#include "compact_projection.hpp"

namespace slimgrad {

/// The exact layer: saves X itself.
template <>
struct impl<activation::None, backend::cpu> {
  using Policy = activation::None;

  impl(Shape weight, const Policy::Options&, std::uint64_t /*tensor_id*/) : weight_(weight) {}

  Shape grad_shape() const { return weight_; }
  index_t saved_cols() const { return weight_.cols; }
  std::size_t state_bytes() const { return 0; }
  void set_step(std::int64_t /*step*/) {}
  std::vector<float> save_state() const { return {}; }
  void load_state(std::span<const float> s) {
    require(s.empty(), "linear (none): the codec has no state to load");
  }

  void compress(HostView<const float> x, HostView<float> saved) {
    cpu::as_eigen(saved) = cpu::as_eigen(x);
  }
  /// dw += dYᵀ X.
  void weight_grad(HostView<const float> dy, HostView<const float> saved, HostView<float> dw) {
    cpu::as_eigen(dw).noalias() += cpu::as_eigen(dy).transpose() * cpu::as_eigen(saved);
  }

 private:
  Shape weight_;
};

/// VeLoRA (algorithms.md §3.1): z = X_sub v per sub-token; dW = s · (dYᵀ Z) ⊗ v.
template <>
struct impl<activation::VeLoRA, backend::cpu> {
  using Policy = activation::VeLoRA;

  impl(Shape weight, const Policy::Options& o, std::uint64_t tensor_id)
      : options_(o), weight_(weight) {
    require(o.groups >= 1, "velora: groups must be at least 1, got " + std::to_string(o.groups));
    require(weight.cols % o.groups == 0, "velora: groups " + std::to_string(o.groups) +
                                             " does not divide in_features " +
                                             std::to_string(weight.cols));
    require(std::isfinite(o.scale), "velora: scale must be finite");
    d_ = weight.cols / o.groups;
    v_ = Policy::placeholder(d_, o.seed, tensor_id);
  }

  Shape grad_shape() const { return weight_; }
  index_t saved_cols() const { return options_.groups; }
  /// v (D' floats).
  std::size_t state_bytes() const { return v_.size() * sizeof(float); }
  void set_step(std::int64_t /*step*/) {}

  /// What a checkpoint needs to resume: {1 if a batch set v else 0, v[0], …, v[D'−1]}.
  std::vector<float> save_state() const {
    std::vector<float> out{initialised_ ? 1.0f : 0.0f};
    out.insert(out.end(), v_.begin(), v_.end());
    return out;
  }
  /// Restores save_state()'s output; refuses (nothing changed) one of another size or a non-finite
  /// value.
  void load_state(std::span<const float> s) {
    require(s.size() == v_.size() + 1, "velora: state has " + std::to_string(s.size()) +
                                           " values, expected " + std::to_string(v_.size() + 1) +
                                           " (the flag and v of D' = " + std::to_string(d_) + ")");
    require(s[0] == 0.0f || s[0] == 1.0f, "velora: state flag must be 0 or 1");
    for (float e : s)
      require(std::isfinite(e), "velora: state holds a non-finite value");
    initialised_ = s[0] == 1.0f;
    std::copy(s.begin() + 1, s.end(), v_.begin());
  }

  /// The projection vector v (D' floats, unit norm).
  const std::vector<float>& vector() const { return v_; }
  /// Whether a training batch has set v (false: the random placeholder).
  bool initialised() const { return initialised_; }
  index_t subtoken_size() const { return d_; }

  void compress(HostView<const float> x, HostView<float> saved) {
    if (!initialised_ || options_.init == activation::VeloraInit::batch_average) set_vector(x);
    const index_t g = options_.groups, d = d_;
    const float* v = v_.data();
    cpu::parallel_for(x.rows, x.cols, [&](index_t i) {
      const float* xr = x.row(i);
      float* zr = saved.row(i);
      for (index_t k = 0; k < g; ++k)
        zr[k] = Policy::project(xr + k * d, v, d);
    });
  }

  /// dw += s · (dYᵀ Z) ⊗ v: H = dYᵀ Z is m×G, then dw[i, g·D' + j] += s·H[i, g]·v[j].
  void weight_grad(HostView<const float> dy, HostView<const float> saved, HostView<float> dw) {
    h_.resize(dw.rows, options_.groups);
    h_.noalias() = cpu::as_eigen(dy).transpose() * cpu::as_eigen(saved);
    const float s = static_cast<float>(options_.scale);
    const index_t g = options_.groups, d = d_;
    const float* v = v_.data();
    cpu::parallel_for(dw.rows, dw.cols, [&](index_t i) {
      float* wr = dw.row(i);
      for (index_t k = 0; k < g; ++k) {
        const float f = s * h_(i, k);
        float* block = wr + k * d;
        for (index_t j = 0; j < d; ++j)
          block[j] = Policy::expand(block[j], f, v[j]);
      }
    });
  }

 private:
  Policy::Options options_;
  Shape weight_;
  index_t d_ = 0;
  std::vector<float> v_;
  bool initialised_ = false;
  cpu::RowMatrix h_;

  // v = mean of the batch's sub-tokens, normalised (no centring), summed in the order that
  // VeLoRA::chunk_sum fixes for every backend. A batch whose mean is zero leaves v as it was.
  void set_vector(HostView<const float> x) {
    const index_t g = options_.groups, d = d_, c = Policy::init_chunk;
    const index_t chunks = (x.rows + c - 1) / c;
    std::vector<double> partial(static_cast<std::size_t>(chunks * d));
    cpu::parallel_for(chunks, c * x.cols, [&](index_t q) {
      const index_t rows = std::min(c, x.rows - q * c);
      for (index_t j = 0; j < d; ++j)
        partial[static_cast<std::size_t>(q * d + j)] =
            Policy::chunk_sum(x.row(q * c), x.ld, rows, g, d, j);
    });
    std::vector<double> sum(static_cast<std::size_t>(d), 0.0);
    for (index_t q = 0; q < chunks; ++q)
      for (index_t j = 0; j < d; ++j)
        sum[static_cast<std::size_t>(j)] += partial[static_cast<std::size_t>(q * d + j)];
    const double norm = Policy::sum_norm(sum.data(), d);
    if (norm == 0.0) return;
    for (std::size_t j = 0; j < sum.size(); ++j)
      v_[j] = static_cast<float>(sum[j] / norm);
    initialised_ = true;
  }
};

/// CompAct (algorithms.md §4.2): Z = X Pᵀ; the weight gradient is Ĝ = dYᵀ Z (m×r).
template <>
struct impl<activation::CompAct, backend::cpu> {
  using Policy = activation::CompAct;
  using Projection = impl<transforms::CompactProjection, backend::cpu>;

  impl(Shape weight, const Policy::Options& o, std::uint64_t tensor_id)
      : projection_(o), state_(projection_.init(weight, tensor_id)) {
    projection_.set_epoch(state_, 0);
  }

  Shape grad_shape() const { return {state_.shape.rows, state_.rank}; }
  index_t saved_cols() const { return state_.rank; }
  /// Seed and epoch, P if it is kept (keep_matrix), and the buffer of one tile of P otherwise.
  std::size_t state_bytes() const {
    return projection_.state_bytes(state_.shape) + projection_.workspace_bytes();
  }
  /// The epoch of optimizer step k: k / update_gap (the optimizer's schedule).
  void set_step(std::int64_t step) {
    projection_.set_epoch(state_, transforms::RandomProjection::epoch_at(
                                      static_cast<index_t>(step), projection_.options.update_gap));
  }
  /// P is a function of (seed, name, step): nothing to save.
  std::vector<float> save_state() const { return {}; }
  void load_state(std::span<const float> s) {
    require(s.empty(), "compact: the codec has no state to load (P comes from the seed)");
  }
  std::uint32_t epoch() const { return state_.epoch; }
  index_t rank() const { return state_.rank; }
  /// The projection (its transform and state): P = generate(state).
  const Projection& projection() const { return projection_; }
  const Projection::State& state() const { return state_; }

  void compress(HostView<const float> x, HostView<float> saved) {
    projection_.times_transpose(state_, x, saved);
  }
  /// dw += dYᵀ Z (= G Pᵀ).
  void weight_grad(HostView<const float> dy, HostView<const float> saved, HostView<float> dw) {
    cpu::as_eigen(dw).noalias() += cpu::as_eigen(dy).transpose() * cpu::as_eigen(saved);
  }

 private:
  Projection projection_;
  Projection::State state_;
};

static_assert(activation::codec_policy<activation::None, backend::cpu>);
static_assert(activation::codec_policy<activation::VeLoRA, backend::cpu>);
static_assert(activation::codec_policy<activation::CompAct, backend::cpu>);

}  // namespace slimgrad

namespace slimgrad::activation {

/// The compressed linear layer on the CPU backend (see activation/linear.hpp).
template <class Codec>
class Linear<Codec, backend::cpu> {
 public:
  using CodecImpl = impl<Codec, backend::cpu>;

  /// `name` keys the codec's randomness (CompAct's P: use the parameter's name in the
  /// optimizer so both regenerate the same matrix). Throws on a bad shape or bad options.
  Linear(std::string_view name, index_t in_features, index_t out_features,
         const typename Codec::Options& o = {})
      : name_(name),
        weight_(checked_shape(in_features, out_features)),
        codec_(weight_, o, tensor_id(name)) {}

  const std::string& name() const { return name_; }
  /// out × in.
  Shape weight_shape() const { return weight_; }
  /// The shape of the dW that backward() accumulates into: out × in, or out × r for CompAct.
  Shape grad_shape() const { return codec_.grad_shape(); }

  /// The optimizer step the next forward passes belong to (CompAct resamples P every
  /// update_gap steps; the others ignore it). Call it once per step, before the first
  /// micro-batch: P stays fixed until the next call. Refused while a backward is pending.
  void set_step(std::int64_t step) {
    require(step >= 0, "linear '" + name_ + "': negative step");
    require(!pending_, "linear '" + name_ + "': set_step() while a forward awaits its backward");
    codec_.set_step(step);
  }

  /// Y = X Wᵀ + b, exactly; saves the compressed X for backward() (replacing what an earlier
  /// forward saved). b may be empty (no bias). Y must not overlap X.
  void forward(HostView<const float> x, HostView<const float> w, HostView<const float> b,
               HostView<float> y) {
    check_forward(x, w, b, y);
    saved_.resize(static_cast<std::size_t>(x.rows * codec_.saved_cols()));
    const HostView<float> s = saved_view(x.rows);
    codec_.compress(x, s);
    matmul_bias(x, w, b, y);
    tokens_ = x.rows;
    pending_ = true;
  }

  /// Y = X Wᵀ + b without saving anything (evaluation).
  void infer(HostView<const float> x, HostView<const float> w, HostView<const float> b,
             HostView<float> y) const {
    check_forward(x, w, b, y);
    matmul_bias(x, w, b, y);
  }

  /// From the last forward's saved activation: dX = dY W (or dX += dY W with accumulate_dx),
  /// db += Σ dY, dW += the codec's weight gradient. dX and db may be empty (not wanted).
  void backward(HostView<const float> dy, HostView<const float> w, HostView<float> dx,
                HostView<float> dw, HostView<float> db, bool accumulate_dx = false) {
    require(pending_, "linear '" + name_ + "': backward() without its forward()");
    require(dy.rows == tokens_ && dy.cols == weight_.rows,
            "linear '" + name_ + "': dY is " + shape_text(dy.shape()) + " but the forward had " +
                std::to_string(tokens_) + " tokens and " + std::to_string(weight_.rows) +
                " outputs (" + shape_text({tokens_, weight_.rows}) + ")");
    cpu::require_shape(dy, {tokens_, weight_.rows}, "linear dY");
    cpu::require_shape(w, weight_, "linear W");
    if (!dx.empty()) cpu::require_shape(dx, {tokens_, weight_.cols}, "linear dX");
    cpu::require_shape(dw, grad_shape(), "linear dW");
    if (!db.empty()) cpu::require_shape(db, {1, weight_.rows}, "linear db");

    if (!dx.empty()) {
      if (accumulate_dx)
        cpu::as_eigen(dx).noalias() += cpu::as_eigen(dy) * cpu::as_eigen(w);
      else
        cpu::as_eigen(dx).noalias() = cpu::as_eigen(dy) * cpu::as_eigen(w);
    }
    if (!db.empty()) cpu::as_eigen(db) += cpu::as_eigen(dy).colwise().sum();
    codec_.weight_grad(dy, saved_view(tokens_), dw);
    pending_ = false;
  }

  /// Whether a forward's activation awaits its backward.
  bool pending() const { return pending_; }
  /// What the last forward saved: tokens × (n, G or r).
  HostView<const float> saved() const {
    return HostView<const float>(saved_.data(), tokens_, codec_.saved_cols(), codec_.saved_cols());
  }
  /// Bytes of the activation buffer held now (measured from the buffer, not from a formula).
  std::size_t saved_bytes() const { return saved_.capacity() * sizeof(float); }
  /// What the exact layer would hold for the last forward's tokens: tokens × in floats.
  std::size_t uncompressed_bytes() const {
    return static_cast<std::size_t>(tokens_ * weight_.cols) * sizeof(float);
  }
  /// The codec's own state: VeLoRA's v, CompAct's kept P.
  std::size_t state_bytes() const { return codec_.state_bytes(); }
  /// Frees the activation buffer (it is reused between micro-batches otherwise).
  void release() {
    require(!pending_, "linear '" + name_ + "': release() while a forward awaits its backward");
    std::vector<float>().swap(saved_);
  }

  const CodecImpl& codec() const { return codec_; }
  /// The codec's state for a checkpoint (VeLoRA's v and its flag; empty for the others).
  std::vector<float> codec_state() const { return codec_.save_state(); }
  /// Restores codec_state()'s output (Error, nothing changed, if it does not fit).
  void load_codec_state(std::span<const float> s) { codec_.load_state(s); }

 private:
  std::string name_;
  Shape weight_;
  CodecImpl codec_;
  std::vector<float> saved_;
  index_t tokens_ = 0;
  bool pending_ = false;

  static Shape checked_shape(index_t in, index_t out) {
    require(in >= 1 && out >= 1, "linear: in_features and out_features must be at least 1, got " +
                                     std::to_string(in) + " and " + std::to_string(out));
    return {out, in};
  }
  static std::string shape_text(Shape s) {
    return std::to_string(s.rows) + "x" + std::to_string(s.cols);
  }
  HostView<float> saved_view(index_t tokens) {
    return host_view(saved_.data(), tokens, codec_.saved_cols());
  }

  void check_forward(HostView<const float> x, HostView<const float> w, HostView<const float> b,
                     HostView<float> y) const {
    require(x.rows >= 1, "linear '" + name_ + "': X has no tokens");
    require(x.cols == weight_.cols, "linear '" + name_ + "': X has " + std::to_string(x.cols) +
                                        " features, the layer takes " +
                                        std::to_string(weight_.cols));
    cpu::require_shape(x, {x.rows, weight_.cols}, "linear X");
    cpu::require_shape(w, weight_, "linear W");
    if (!b.empty()) cpu::require_shape(b, {1, weight_.rows}, "linear b");
    cpu::require_shape(y, {x.rows, weight_.rows}, "linear Y");
  }

  static void matmul_bias(HostView<const float> x, HostView<const float> w, HostView<const float> b,
                          HostView<float> y) {
    cpu::as_eigen(y).noalias() = cpu::as_eigen(x) * cpu::as_eigen(w).transpose();
    if (!b.empty()) cpu::as_eigen(y).rowwise() += cpu::as_eigen(b).row(0);
  }
};

/// Which codec an AnyLinear runs.
enum class Kind : std::uint8_t { none, velora, compact };

/// "none", "velora" or "compact"; throws a sentence otherwise.
inline Kind parse_kind(std::string_view s) {
  if (s == "none") return Kind::none;
  if (s == "velora") return Kind::velora;
  if (s == "compact") return Kind::compact;
  throw Error("slimgrad: unknown activation codec '" + std::string(s) +
              "' (expected none, velora or compact)");
}

/// The codec choice and every codec's options (only the chosen one's are used).
struct Settings {
  Kind kind = Kind::none;
  VeLoRA::Options velora{};
  CompAct::Options compact{};
};

/// A Linear whose codec is chosen at run time (e.g. from `--activations velora`).
class AnyLinear {
 public:
  AnyLinear(std::string_view name, index_t in_features, index_t out_features, const Settings& s)
      : layer_(make(name, in_features, out_features, s)) {}

  Kind kind() const { return static_cast<Kind>(layer_.index()); }
  const std::string& name() const {
    return std::visit([](const auto& l) -> const std::string& { return l.name(); }, layer_);
  }
  Shape weight_shape() const {
    return std::visit([](const auto& l) { return l.weight_shape(); }, layer_);
  }
  Shape grad_shape() const {
    return std::visit([](const auto& l) { return l.grad_shape(); }, layer_);
  }
  void set_step(std::int64_t step) {
    std::visit([&](auto& l) { l.set_step(step); }, layer_);
  }
  void forward(HostView<const float> x, HostView<const float> w, HostView<const float> b,
               HostView<float> y) {
    std::visit([&](auto& l) { l.forward(x, w, b, y); }, layer_);
  }
  void infer(HostView<const float> x, HostView<const float> w, HostView<const float> b,
             HostView<float> y) const {
    std::visit([&](const auto& l) { l.infer(x, w, b, y); }, layer_);
  }
  void backward(HostView<const float> dy, HostView<const float> w, HostView<float> dx,
                HostView<float> dw, HostView<float> db, bool accumulate_dx = false) {
    std::visit([&](auto& l) { l.backward(dy, w, dx, dw, db, accumulate_dx); }, layer_);
  }
  bool pending() const {
    return std::visit([](const auto& l) { return l.pending(); }, layer_);
  }
  std::size_t saved_bytes() const {
    return std::visit([](const auto& l) { return l.saved_bytes(); }, layer_);
  }
  std::size_t uncompressed_bytes() const {
    return std::visit([](const auto& l) { return l.uncompressed_bytes(); }, layer_);
  }
  std::size_t state_bytes() const {
    return std::visit([](const auto& l) { return l.state_bytes(); }, layer_);
  }
  void release() {
    std::visit([](auto& l) { l.release(); }, layer_);
  }
  std::vector<float> codec_state() const {
    return std::visit([](const auto& l) { return l.codec_state(); }, layer_);
  }
  void load_codec_state(std::span<const float> s) {
    std::visit([&](auto& l) { l.load_codec_state(s); }, layer_);
  }

 private:
  // Alternatives in Kind's order.
  using Variant = std::variant<Linear<None>, Linear<VeLoRA>, Linear<CompAct>>;
  Variant layer_;

  static Variant make(std::string_view name, index_t in, index_t out, const Settings& s) {
    switch (s.kind) {
      case Kind::velora:
        return Variant(std::in_place_index<1>, name, in, out, s.velora);
      case Kind::compact:
        return Variant(std::in_place_index<2>, name, in, out, s.compact);
      case Kind::none:
        break;
    }
    return Variant(std::in_place_index<0>, name, in, out, None::Options{});
  }
};

}  // namespace slimgrad::activation
