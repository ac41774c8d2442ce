// examples/gpt/model.hpp — a character-level GPT (nanoGPT's architecture without biases or
// dropout, as its shakespeare_char configuration) with forward and backward written by hand,
// llm.c style, on Eigen GEMMs and OpenMP.
//
//   x0 = wte[token] + wpe[position]
//   per block: x += attn(ln_1(x)); x += mlp(ln_2(x))   (pre-LayerNorm, causal multi-head)
//   logits = ln_f(x) · wteᵀ                             (the head is tied to the embedding)
//
// Templated on the scalar so that a test can check the gradients against finite differences in
// double; the trainer uses float. Parameters and gradients live in two flat buffers of the
// model's own, in PyTorch's out×in layout; `tensors()` names the pieces that slimgrad steps.
//
// Every projection is a LinearLayer that keeps its input for the weight gradient: the saved input
// is what activation compression (VeLoRA, CompAct) replaces, so a compressed layer is one
// `set_linear` call. Everything else the backward pass needs (the residual stream,
// LayerNorm statistics, attention probabilities, the MLP pre-activation) is kept in full.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <slimgrad/core/error.hpp>
#include <slimgrad/core/philox.hpp>
#include <string>
#include <unsupported/Eigen/SpecialFunctions>
#include <utility>
#include <vector>

namespace gpt {

using Index = Eigen::Index;

template <class S>
using Mat = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class S>
using MatMap = Eigen::Map<Mat<S>>;
template <class S>
using ConstMatMap = Eigen::Map<const Mat<S>>;
template <class S>
using StridedMap = Eigen::Map<Mat<S>, 0, Eigen::OuterStride<>>;
template <class S>
using ConstStridedMap = Eigen::Map<const Mat<S>, 0, Eigen::OuterStride<>>;

/// The shape of the model.
struct Config {
  Index vocab = 0;    ///< V: distinct byte values of the corpus
  Index block = 64;   ///< T: context length
  Index layers = 4;   ///< L
  Index heads = 4;    ///< NH
  Index width = 128;  ///< C (the MLP is 4C wide)

  /// Refuses inconsistent dimensions with one sentence.
  void validate() const {
    slimgrad::require(
        vocab >= 2 && vocab <= 256,
        "gpt: the vocabulary must hold 2 to 256 byte values, got " + std::to_string(vocab));
    slimgrad::require(block >= 1, "gpt: --block must be >= 1");
    slimgrad::require(layers >= 1, "gpt: --layers must be >= 1");
    slimgrad::require(heads >= 1, "gpt: --heads must be >= 1");
    slimgrad::require(width >= 1 && width % heads == 0,
                      "gpt: --width (" + std::to_string(width) +
                          ") must be a positive multiple of --heads (" + std::to_string(heads) +
                          ")");
  }
  friend bool operator==(const Config&, const Config&) = default;
};

/// The linear layers of a block, by kind (activation compression is chosen per kind).
enum class LinearKind { attn_qkv, attn_proj, mlp_fc, mlp_proj };

/// One linear layer without bias, y = x Wᵀ (x: N×in, W: out×in), and what it keeps between
/// forward and backward. The model owns W, dW and the activations; a layer owns only what it
/// saves. This is where activation compression plugs in (activations.hpp wraps slimgrad's
/// activation::AnyLinear).
template <class S>
class LinearLayer {
 public:
  virtual ~LinearLayer() = default;
  /// The training step the next forward belongs to (seeded projections are resampled by it).
  virtual void set_step(std::uint64_t step) = 0;
  /// y = x Wᵀ; with `keep`, saves what backward() needs.
  virtual void forward(const Mat<S>& x, const ConstMatMap<S>& w, Mat<S>& y, bool keep) = 0;
  /// dW += the weight gradient and dx = dy W, from what forward() saved.
  virtual void backward(const Mat<S>& dy, const ConstMatMap<S>& w, MatMap<S> dw, Mat<S>& dx) = 0;
  /// Bytes of the saved activation held now.
  virtual std::size_t saved_bytes() const = 0;
  /// Bytes of the layer's own state (a codec's projection), 0 for the exact layer.
  virtual std::size_t state_bytes() const = 0;
  /// Columns of the weight gradient backward() writes: in, or r for a layer whose gradient is
  /// born compressed (CompAct: out×r, stored at the start of dW's buffer).
  virtual Index grad_cols(Index in) const { return in; }
  /// The codec's learned state (VeLoRA's v) for checkpoints; empty for stateless layers.
  virtual std::vector<float> codec_state() const { return {}; }
  /// Restores codec_state()'s output.
  virtual void load_codec_state(const std::vector<float>& s) {
    slimgrad::require(s.empty(), "an exact linear layer has no codec state to load");
  }
};

/// The exact layer: saves a copy of x; dW = dyᵀ x.
template <class S>
class ExactLinear final : public LinearLayer<S> {
 public:
  void set_step(std::uint64_t) override {}
  void forward(const Mat<S>& x, const ConstMatMap<S>& w, Mat<S>& y, bool keep) override {
    y.noalias() = x * w.transpose();
    if (keep) x_ = x;
  }
  void backward(const Mat<S>& dy, const ConstMatMap<S>& w, MatMap<S> dw, Mat<S>& dx) override {
    dw.noalias() += dy.transpose() * x_;
    dx.noalias() = dy * w;
  }
  std::size_t saved_bytes() const override {
    return static_cast<std::size_t>(x_.size()) * sizeof(S);
  }
  std::size_t state_bytes() const override { return 0; }

 private:
  Mat<S> x_;
};

/// One named parameter tensor inside the flat buffer.
struct TensorInfo {
  std::string name;
  std::size_t offset = 0;
  Index rows = 0, cols = 0;
  bool matrix = false;        ///< a 2-D weight (nanoGPT decays these, not the LayerNorm gains)
  bool compressible = false;  ///< an attention or MLP projection (slimgrad's compressed role)
  Index size() const { return rows * cols; }
};

/// The forward/backward of one GPT. Not thread-safe; internally parallel.
template <class S>
class Model {
 public:
  explicit Model(const Config& c) : c_(c) {
    c_.validate();
    const Index C = c.width, V = c.vocab, T = c.block;
    add("wte", V, C, true, false);
    add("wpe", T, C, true, false);
    for (Index l = 0; l < c.layers; ++l) {
      const std::string p = "h." + std::to_string(l) + ".";
      add(p + "ln_1", 1, C, false, false);
      add(p + "attn.c_attn", 3 * C, C, true, true);
      // nanoGPT's attn.c_proj, named as LLaMA's o_proj (the trainer gives it the full path of
      // the recipes that have one: CompAct's).
      add(p + "attn.o_proj", C, C, true, true);
      add(p + "ln_2", 1, C, false, false);
      add(p + "mlp.c_fc", 4 * C, C, true, true);
      add(p + "mlp.c_proj", C, 4 * C, true, true);
    }
    add("ln_f", 1, C, false, false);
    params_.assign(total_, S(0));
    grads_.assign(total_, S(0));
    linears_.resize(static_cast<std::size_t>(4 * c.layers));
    for (auto& s : linears_)
      s = std::make_unique<ExactLinear<S>>();
  }

  const Config& config() const { return c_; }
  const std::vector<TensorInfo>& tensors() const { return info_; }
  std::size_t num_params() const { return total_; }
  S* params() { return params_.data(); }
  const S* params() const { return params_.data(); }
  S* grads() { return grads_.data(); }
  const S* grads() const { return grads_.data(); }

  /// nanoGPT's initialisation: N(0, 0.02²) for every matrix, N(0, (0.02/√(2L))²) for the two
  /// residual projections of each block, LayerNorm gains 1. Drawn with Philox (seed, stream =
  /// tensor index), so it does not depend on the scalar type beyond rounding.
  void init(std::uint64_t seed) {
    for (std::size_t t = 0; t < info_.size(); ++t) {
      const TensorInfo& ti = info_[t];
      S* p = params_.data() + ti.offset;
      if (!ti.matrix) {
        std::fill(p, p + ti.size(), S(1));
        continue;
      }
      const bool residual = ti.name.ends_with("c_proj") || ti.name.ends_with("o_proj");
      const double sigma = residual ? 0.02 / std::sqrt(2.0 * static_cast<double>(c_.layers)) : 0.02;
      const slimgrad::random::Key key{seed, t, 0};
      for (Index i = 0; i < ti.size(); ++i)
        p[i] =
            static_cast<S>(slimgrad::random::gaussian(key, static_cast<std::uint64_t>(i), sigma));
    }
  }

  /// Replaces one linear layer (block `layer`, kind `kind`), e.g. by a compressed one.
  void set_linear(Index layer, LinearKind kind, std::unique_ptr<LinearLayer<S>> linear) {
    linears_[static_cast<std::size_t>(4 * layer + static_cast<Index>(kind))] = std::move(linear);
  }
  /// The gradient shape of parameter `t`: rows × grad_cols (see LinearLayer::grad_cols).
  Index grad_cols(const TensorInfo& t) const {
    for (Index l = 0; l < c_.layers; ++l)
      for (Index k = 0; k < 4; ++k)
        if (t.name == "h." + std::to_string(l) + "." + linear_name(static_cast<LinearKind>(k)))
          return linears_[static_cast<std::size_t>(4 * l + k)]->grad_cols(t.cols);
    return t.cols;
  }
  /// The name of a block's projection of kind `k` (after "h.<l>.").
  static const char* linear_name(LinearKind k) {
    switch (k) {
      case LinearKind::attn_qkv:
        return "attn.c_attn";
      case LinearKind::attn_proj:
        return "attn.o_proj";
      case LinearKind::mlp_fc:
        return "mlp.c_fc";
      case LinearKind::mlp_proj:
        break;
    }
    return "mlp.c_proj";
  }
  /// Every projection's codec state by parameter name (see LinearLayer::codec_state).
  std::vector<std::pair<std::string, std::vector<float>>> codec_states() const {
    std::vector<std::pair<std::string, std::vector<float>>> out;
    for (Index l = 0; l < c_.layers; ++l)
      for (Index k = 0; k < 4; ++k)
        out.emplace_back("h." + std::to_string(l) + "." + linear_name(static_cast<LinearKind>(k)),
                         linears_[static_cast<std::size_t>(4 * l + k)]->codec_state());
    return out;
  }
  /// Restores the codec state of the projection named `name`.
  void load_codec_state(const std::string& name, const std::vector<float>& s) {
    for (Index l = 0; l < c_.layers; ++l)
      for (Index k = 0; k < 4; ++k)
        if (name == "h." + std::to_string(l) + "." + linear_name(static_cast<LinearKind>(k)))
          return linears_[static_cast<std::size_t>(4 * l + k)]->load_codec_state(s);
    throw slimgrad::Error("slimgrad: no projection named '" + name + "'");
  }
  /// Hands each projection the step its next forward belongs to: `steps_of(name)`, the number
  /// of optimizer steps its weight has taken. Per parameter, because an optimizer skips a
  /// parameter whose gradient holds NaN/Inf without counting the step, and CompAct's P must
  /// follow the optimizer's count.
  template <class StepsOf>
  void set_steps(const StepsOf& steps_of) {
    for (Index l = 0; l < c_.layers; ++l)
      for (Index k = 0; k < 4; ++k)
        linears_[static_cast<std::size_t>(4 * l + k)]->set_step(static_cast<std::uint64_t>(
            steps_of("h." + std::to_string(l) + "." + linear_name(static_cast<LinearKind>(k)))));
  }

  /// Forward over B sequences of T tokens (tokens and targets are B×T, row-major). Returns the
  /// mean cross-entropy. With `for_backward`, keeps what backward() needs.
  double forward(const std::uint8_t* tokens, const std::uint8_t* targets, Index B,
                 bool for_backward = true) {
    slimgrad::require(B >= 1, "gpt: the batch must hold at least one sequence");
    resize(B);
    const Index T = c_.block, V = c_.vocab, N = B * T;
    for (Index i = 0; i < N; ++i)
      slimgrad::require(tokens[i] < V && targets[i] < V, "gpt: a token is outside the vocabulary");
    tokens_.assign(tokens, tokens + N);
    targets_.assign(targets, targets + N);
    // Embedding.
    const ConstMatMap<S> wte = W("wte"), wpe = W("wpe");
    for (Index n = 0; n < N; ++n)
      xs(0).row(n) = wte.row(tokens[n]) + wpe.row(n % T);
    for (Index l = 0; l < c_.layers; ++l) {
      Layer& a = layer_[static_cast<std::size_t>(l)];
      const std::string p = "h." + std::to_string(l) + ".";
      // Attention.
      layernorm_forward(xs(l), W(p + "ln_1"), a.ln1_mean, a.ln1_rstd, buf_n_c_);
      linear_forward(l, LinearKind::attn_qkv, buf_n_c_, W(p + "attn.c_attn"), a.qkv, for_backward);
      attention_forward(a, B);
      linear_forward(l, LinearKind::attn_proj, atty_, W(p + "attn.o_proj"), buf_n_c2_,
                     for_backward);
      a.xmid = xs(l) + buf_n_c2_;
      // MLP.
      layernorm_forward(a.xmid, W(p + "ln_2"), a.ln2_mean, a.ln2_rstd, buf_n_c_);
      linear_forward(l, LinearKind::mlp_fc, buf_n_c_, W(p + "mlp.c_fc"), a.fch, for_backward);
      gelu_forward(a.fch, buf_n_4c_);
      linear_forward(l, LinearKind::mlp_proj, buf_n_4c_, W(p + "mlp.c_proj"), buf_n_c2_,
                     for_backward);
      xs(l + 1) = a.xmid + buf_n_c2_;
    }
    layernorm_forward(xs(c_.layers), W("ln_f"), lnf_mean_, lnf_rstd_, lnf_out_);
    // Head (tied) and cross-entropy; probs_ keeps softmax for the backward pass.
    probs_.noalias() = lnf_out_ * wte.transpose();
    std::vector<double> losses(static_cast<std::size_t>(N));
#pragma omp parallel for schedule(static)
    for (Index n = 0; n < N; ++n) {
      auto row = probs_.row(n);
      const S mx = row.maxCoeff();
      row = (row.array() - mx).exp();
      const S sum = row.sum();
      row /= sum;
      losses[static_cast<std::size_t>(n)] =
          -std::log(std::max(static_cast<double>(row(targets[n])), 1e-300));
    }
    double loss = 0;
    for (double v : losses)
      loss += v;
    return loss / static_cast<double>(N);
  }

  /// Backward of the last forward: gradients overwrite grads().
  void backward() {
    const Index T = c_.block, N = B_ * T;
    std::fill(grads_.begin(), grads_.end(), S(0));
    // d logits = (softmax − onehot) / N.
    Mat<S>& dlogits = probs_;
    const S invN = S(1) / static_cast<S>(N);
    for (Index n = 0; n < N; ++n) {
      dlogits(n, targets_[static_cast<std::size_t>(n)]) -= S(1);
    }
    dlogits *= invN;
    MatMap<S> dwte = G("wte");
    const ConstMatMap<S> wte = W("wte");
    dwte.noalias() += dlogits.transpose() * lnf_out_;
    Mat<S>& dx = dx_;
    buf_n_c_.noalias() = dlogits * wte;  // d lnf_out
    dx.setZero();
    layernorm_backward(xs(c_.layers), W("ln_f"), lnf_mean_, lnf_rstd_, buf_n_c_, G("ln_f"), dx);
    for (Index l = c_.layers - 1; l >= 0; --l) {
      Layer& a = layer_[static_cast<std::size_t>(l)];
      const std::string p = "h." + std::to_string(l) + ".";
      // dx is d x_{l+1} = d xmid (residual) and d mlp_out.
      linear_backward(l, LinearKind::mlp_proj, dx, W(p + "mlp.c_proj"), G(p + "mlp.c_proj"),
                      buf_n_4c_);
      gelu_backward(a.fch, buf_n_4c_);  // buf_n_4c_ becomes d fch
      linear_backward(l, LinearKind::mlp_fc, buf_n_4c_, W(p + "mlp.c_fc"), G(p + "mlp.c_fc"),
                      buf_n_c_);
      layernorm_backward(a.xmid, W(p + "ln_2"), a.ln2_mean, a.ln2_rstd, buf_n_c_, G(p + "ln_2"),
                         dx);
      // dx is now d xmid.
      linear_backward(l, LinearKind::attn_proj, dx, W(p + "attn.o_proj"), G(p + "attn.o_proj"),
                      buf_n_c2_);  // d atty
      attention_backward(a, buf_n_c2_, dqkv_);
      linear_backward(l, LinearKind::attn_qkv, dqkv_, W(p + "attn.c_attn"), G(p + "attn.c_attn"),
                      buf_n_c_);
      layernorm_backward(xs(l), W(p + "ln_1"), a.ln1_mean, a.ln1_rstd, buf_n_c_, G(p + "ln_1"), dx);
    }
    // Embeddings (serial scatter: deterministic).
    MatMap<S> dwpe = G("wpe");
    for (Index n = 0; n < N; ++n) {
      dwte.row(tokens_[static_cast<std::size_t>(n)]) += dx.row(n);
      dwpe.row(n % T) += dx.row(n);
    }
  }

  /// Bytes of the linear layers' saved inputs (what activation compression acts on).
  std::size_t linear_saved_bytes() const {
    std::size_t b = 0;
    for (const auto& l : linears_)
      b += l->saved_bytes();
    return b;
  }
  /// Bytes of the linear layers' own state (activation codecs' projections).
  std::size_t linear_state_bytes() const {
    std::size_t b = 0;
    for (const auto& l : linears_)
      b += l->state_bytes();
    return b;
  }
  /// Bytes of everything else the backward pass keeps (residual stream, LayerNorm statistics,
  /// q/k/v, attention probabilities, MLP pre-activation, softmax).
  std::size_t other_saved_bytes() const {
    std::size_t n = 0;
    for (const Mat<S>& m : x_)
      n += static_cast<std::size_t>(m.size());
    for (const Layer& a : layer_)
      n += static_cast<std::size_t>(a.ln1_mean.size() + a.ln1_rstd.size() + a.qkv.size() +
                                    a.att.size() + a.xmid.size() + a.ln2_mean.size() +
                                    a.ln2_rstd.size() + a.fch.size());
    n += static_cast<std::size_t>(lnf_mean_.size() + lnf_rstd_.size() + lnf_out_.size() +
                                  probs_.size());
    return n * sizeof(S);
  }

  /// Softmax of the last forward's row n (position n % T of sequence n / T), vocab entries.
  const S* probs_row(Index n) const {
    return probs_.data() + n * c_.vocab;
  }

  /// A parameter tensor by name (throws for an unknown name).
  const TensorInfo& info(const std::string& name) const {
    for (const TensorInfo& t : info_)
      if (t.name == name) return t;
    throw slimgrad::Error("gpt: no parameter named '" + name + "'");
  }

 private:
  using Vec = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  struct Layer {
    Vec ln1_mean, ln1_rstd, ln2_mean, ln2_rstd;
    Mat<S> qkv;   // N×3C
    Mat<S> att;   // (B·NH·T)×T softmax probabilities (0 above the diagonal)
    Mat<S> xmid;  // N×C residual after attention
    Mat<S> fch;   // N×4C MLP pre-activation
  };

  void add(const std::string& name, Index rows, Index cols, bool matrix, bool compressible) {
    info_.push_back({name, total_, rows, cols, matrix, compressible});
    total_ += static_cast<std::size_t>(rows * cols);
  }
  std::size_t index_of(const std::string& name) const {
    // Tensors are few (2 + 6L + 1); a linear search per use keeps the code plain.
    for (std::size_t i = 0; i < info_.size(); ++i)
      if (info_[i].name == name) return i;
    throw slimgrad::Error("gpt: no parameter named '" + name + "'");
  }
  ConstMatMap<S> W(const std::string& name) const {
    const TensorInfo& t = info_[index_of(name)];
    return ConstMatMap<S>(params_.data() + t.offset, t.rows, t.cols);
  }
  MatMap<S> G(const std::string& name) {
    const TensorInfo& t = info_[index_of(name)];
    return MatMap<S>(grads_.data() + t.offset, t.rows, t.cols);
  }

  void resize(Index B) {
    if (B == B_) return;
    B_ = B;
    const Index C = c_.width, T = c_.block, N = B * T, NH = c_.heads;
    x_.assign(static_cast<std::size_t>(c_.layers + 1), Mat<S>(N, C));
    layer_.assign(static_cast<std::size_t>(c_.layers), Layer{});
    for (Layer& a : layer_) {
      a.ln1_mean.resize(N);
      a.ln1_rstd.resize(N);
      a.ln2_mean.resize(N);
      a.ln2_rstd.resize(N);
      a.qkv.resize(N, 3 * C);
      a.att.resize(B * NH * T, T);
      a.xmid.resize(N, C);
      a.fch.resize(N, 4 * C);
    }
    lnf_mean_.resize(N);
    lnf_rstd_.resize(N);
    lnf_out_.resize(N, C);
    probs_.resize(N, c_.vocab);
    buf_n_c_.resize(N, C);
    atty_.resize(N, C);
    buf_n_c2_.resize(N, C);
    buf_n_4c_.resize(N, 4 * C);
    dqkv_.resize(N, 3 * C);
    dx_.resize(N, C);
  }

  Mat<S>& xs(Index l) {
    return x_[static_cast<std::size_t>(l)];
  }

  LinearLayer<S>& linear(Index l, LinearKind k) {
    return *linears_[static_cast<std::size_t>(4 * l + static_cast<Index>(k))];
  }

  void linear_forward(Index l, LinearKind k, const Mat<S>& x, const ConstMatMap<S>& w, Mat<S>& y,
                      bool keep) {
    linear(l, k).forward(x, w, y, keep);
  }
  void linear_backward(Index l, LinearKind k, const Mat<S>& dy, const ConstMatMap<S>& w,
                       MatMap<S> dw, Mat<S>& dx) {
    linear(l, k).backward(dy, w, dw, dx);
  }

  static constexpr double ln_eps = 1e-5;
  static constexpr double sqrt1_2 = 0.70710678118654752440;

  static void layernorm_forward(const Mat<S>& x, const ConstMatMap<S>& w, Vec& mean, Vec& rstd,
                                Mat<S>& out) {
    const Index N = x.rows(), C = x.cols();
#pragma omp parallel for schedule(static)
    for (Index n = 0; n < N; ++n) {
      const auto r = x.row(n);
      const S m = r.sum() / static_cast<S>(C);
      const S var = (r.array() - m).square().sum() / static_cast<S>(C);
      const S s = S(1) / std::sqrt(var + static_cast<S>(ln_eps));
      mean(n) = m;
      rstd(n) = s;
      out.row(n) = ((r.array() - m) * s) * w.row(0).array();
    }
  }
  // dx += LayerNorm backward of dout; dw += Σ_n dout ∘ x̂ (a column sum: deterministic).
  static void layernorm_backward(const Mat<S>& x, const ConstMatMap<S>& w, const Vec& mean,
                                 const Vec& rstd, Mat<S>& dout, MatMap<S> dw, Mat<S>& dx) {
    const Index N = x.rows(), C = x.cols();
    // dout becomes dout ∘ x̂ after its row has been used (saves a buffer).
#pragma omp parallel for schedule(static)
    for (Index n = 0; n < N; ++n) {
      const auto norm = (x.row(n).array() - mean(n)) * rstd(n);
      const auto dnorm = dout.row(n).array() * w.row(0).array();
      const S mean_d = dnorm.sum() / static_cast<S>(C);
      const S mean_dn = (dnorm * norm).sum() / static_cast<S>(C);
      dx.row(n).array() += rstd(n) * (dnorm - mean_d - norm * mean_dn);
      dout.row(n).array() *= norm;
    }
    dw.row(0) += dout.colwise().sum();
  }

  // GELU over contiguous chunks as Eigen arrays, so that erf and exp are vectorised (Eigen's
  // float erf is a rational approximation accurate to a few ulp on [-4, 4] and ±1 outside;
  // double takes std::erf), as torch's GELU kernel is. Chunks spread the work over the threads.
  static constexpr Index gelu_chunk = 4096;
  using ArrayMap = Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>;
  using ConstArrayMap = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>;
  static void gelu_forward(const Mat<S>& x, Mat<S>& y) {
    const Index n = x.size(), chunks = (n + gelu_chunk - 1) / gelu_chunk;
#pragma omp parallel for schedule(static)
    for (Index c = 0; c < chunks; ++c) {
      const Index begin = c * gelu_chunk, len = std::min(gelu_chunk, n - begin);
      const ConstArrayMap v(x.data() + begin, len);
      ArrayMap(y.data() + begin, len) = S(0.5) * v * (S(1) + (v * static_cast<S>(sqrt1_2)).erf());
    }
  }
  // d ← d ∘ GELU'(x) (exact erf GELU, as torch.nn.GELU()).
  static void gelu_backward(const Mat<S>& x, Mat<S>& d) {
    const Index n = x.size(), chunks = (n + gelu_chunk - 1) / gelu_chunk;
    const S inv_sqrt_2pi = static_cast<S>(0.3989422804014327);
#pragma omp parallel for schedule(static)
    for (Index c = 0; c < chunks; ++c) {
      const Index begin = c * gelu_chunk, len = std::min(gelu_chunk, n - begin);
      const ConstArrayMap v(x.data() + begin, len);
      ArrayMap(d.data() + begin, len) *= S(0.5) * (S(1) + (v * static_cast<S>(sqrt1_2)).erf()) +
                                         v * inv_sqrt_2pi * (S(-0.5) * v.square()).exp();
    }
  }

  // Causal self-attention per (sequence, head): att = softmax(q kᵀ/√hs, causal), y = att v.
  void attention_forward(Layer& a, Index B) {
    const Index C = c_.width, T = c_.block, NH = c_.heads, hs = C / NH;
    const S scale = S(1) / std::sqrt(static_cast<S>(hs));
#pragma omp parallel for schedule(static)
    for (Index bh = 0; bh < B * NH; ++bh) {
      const Index b = bh / NH, h = bh % NH;
      const S* base = a.qkv.data() + b * T * 3 * C;
      ConstStridedMap<S> q(base + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      ConstStridedMap<S> k(base + C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      ConstStridedMap<S> v(base + 2 * C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      auto att = a.att.middleRows(bh * T, T);
      att.noalias() = (q * k.transpose()) * scale;
      for (Index t = 0; t < T; ++t) {
        auto row = att.row(t);
        const S mx = row.head(t + 1).maxCoeff();
        row.head(t + 1) = (row.head(t + 1).array() - mx).exp();
        row.head(t + 1) /= row.head(t + 1).sum();
        row.tail(T - t - 1).setZero();
      }
      StridedMap<S> y(atty_.data() + b * T * C + h * hs, T, hs, Eigen::OuterStride<>(C));
      y.noalias() = att * v;
    }
  }
  void attention_backward(const Layer& a, const Mat<S>& datty, Mat<S>& dqkv) {
    const Index C = c_.width, T = c_.block, NH = c_.heads, hs = C / NH;
    const S scale = S(1) / std::sqrt(static_cast<S>(hs));
#pragma omp parallel for schedule(static)
    for (Index bh = 0; bh < B_ * NH; ++bh) {
      const Index b = bh / NH, h = bh % NH;
      const S* base = a.qkv.data() + b * T * 3 * C;
      S* dbase = dqkv.data() + b * T * 3 * C;
      ConstStridedMap<S> q(base + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      ConstStridedMap<S> k(base + C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      ConstStridedMap<S> v(base + 2 * C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      StridedMap<S> dq(dbase + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      StridedMap<S> dk(dbase + C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      StridedMap<S> dv(dbase + 2 * C + h * hs, T, hs, Eigen::OuterStride<>(3 * C));
      ConstStridedMap<S> dy(datty.data() + b * T * C + h * hs, T, hs, Eigen::OuterStride<>(C));
      const auto att = a.att.middleRows(bh * T, T);
      dv.noalias() = att.transpose() * dy;
      Mat<S> datt = dy * v.transpose();  // T×T
      for (Index t = 0; t < T; ++t) {
        const S dot = (datt.row(t).array() * att.row(t).array()).sum();
        datt.row(t) = (att.row(t).array() * (datt.row(t).array() - dot)) * scale;
      }
      dq.noalias() = datt * k;
      dk.noalias() = datt.transpose() * q;
    }
  }

  Config c_;
  std::vector<TensorInfo> info_;
  std::size_t total_ = 0;
  std::vector<S> params_, grads_;
  std::vector<std::unique_ptr<LinearLayer<S>>> linears_;
  // Activations of the last forward (batch B_).
  Index B_ = 0;
  std::vector<std::uint8_t> tokens_, targets_;
  std::vector<Mat<S>> x_;  // residual stream entering each block, and after the last
  std::vector<Layer> layer_;
  Vec lnf_mean_, lnf_rstd_;
  Mat<S> lnf_out_, probs_;
  // Scratch (not saved for backward).
  Mat<S> atty_, buf_n_c_, buf_n_c2_, buf_n_4c_, dqkv_, dx_;
};

}  // namespace gpt
