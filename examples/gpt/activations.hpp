// examples/gpt/activations.hpp — `--activations none|velora|compact`: which LinearLayer each
// attention and MLP projection of the model uses. The compressed ones are slimgrad's
// activation::AnyLinear (backend/cpu/activation.hpp) behind the model's LinearLayer interface.
//
//   none     the exact layer (saves its N×in input)
//   velora   VeLoRA on all four projections (c_attn, attn.c_proj, c_fc, mlp.c_proj): sub-tokens
//            of `subtoken` features (default 8, so the saved input shrinks 8×), v from the first
//            training batch, `scale` 1; v is saved in checkpoints, so resume stays bit-exact.
//   compact  CompAct on every projection but attn.o_proj (the paper keeps o_proj exact), with the
//            `compact` recipe's projection settings (ratio 1/4, T, seed, sketch: `--set`), so that
//            codec and optimizer regenerate the same P; the weight gradients are m×r and go to the
//            recipe as they are. Needs `--optimizer compact`.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <slimgrad/core/error.hpp>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

#include "model.hpp"
#include "registry.hpp"

namespace gpt {

/// A projection whose saved input is compressed by an activation codec.
class CompressedLinear final : public LinearLayer<float> {
 public:
  CompressedLinear(const std::string& name, Index in, Index out,
                   const slimgrad::activation::Settings& s)
      : layer_(name, in, out, s) {}
  void set_step(std::uint64_t step) override { layer_.set_step(static_cast<std::int64_t>(step)); }
  void forward(const Mat<float>& x, const ConstMatMap<float>& w, Mat<float>& y,
               bool keep) override {
    const auto xv = slimgrad::host_view<const float>(x.data(), x.rows(), x.cols());
    const auto wv = slimgrad::host_view<const float>(w.data(), w.rows(), w.cols());
    const auto yv = slimgrad::host_view(y.data(), y.rows(), y.cols());
    if (keep)
      layer_.forward(xv, wv, {}, yv);
    else
      layer_.infer(xv, wv, {}, yv);
  }
  void backward(const Mat<float>& dy, const ConstMatMap<float>& w, MatMap<float> dw,
                Mat<float>& dx) override {
    layer_.backward(slimgrad::host_view<const float>(dy.data(), dy.rows(), dy.cols()),
                    slimgrad::host_view<const float>(w.data(), w.rows(), w.cols()),
                    slimgrad::host_view(dx.data(), dx.rows(), dx.cols()),
                    slimgrad::host_view(dw.data(), dw.rows(), layer_.grad_shape().cols), {});
  }
  std::size_t saved_bytes() const override { return layer_.saved_bytes(); }
  std::size_t state_bytes() const override { return layer_.state_bytes(); }
  Index grad_cols(Index) const override { return layer_.grad_shape().cols; }
  std::vector<float> codec_state() const override { return layer_.codec_state(); }
  void load_codec_state(const std::vector<float>& s) override { layer_.load_codec_state(s); }

 private:
  slimgrad::activation::AnyLinear layer_;
};

/// Installs the layers named by `kind` on the projections of `model`. Throws a sentence for an
/// unknown kind or setting.
/// `compact` takes the projection settings of the optimizer (`optimizer_options`: the recipe's
/// key → value map).
inline void configure_activations(Model<float>& model, const std::string& kind,
                                  const std::vector<std::string>& settings, std::uint64_t seed,
                                  const std::map<std::string, std::string>& optimizer_options) {
  using slimgrad::require;
  namespace act = slimgrad::activation;
  if (kind == "none") {
    require(settings.empty(), "--activations none takes no --act-set settings");
    return;
  }
  require(kind == "velora" || kind == "compact",
          "unknown --activations '" + kind + "' (expected none, velora or compact)");
  act::Settings s;
  s.kind = act::parse_kind(kind);
  Index subtoken = 8;
  s.velora.seed = seed;
  if (s.kind == act::Kind::compact) {
    require(settings.empty(),
            "--activations compact takes its settings from the compact recipe (--set ratio=..., "
            "--set update_gap=...), not --act-set");
    auto get = [&](const char* key) {
      const auto it = optimizer_options.find(key);
      require(it != optimizer_options.end(),
              "--activations compact needs --optimizer compact (its weight gradients are m×r, "
              "which only the compact recipe takes)");
      return it->second;
    };
    s.compact.rank = std::stol(get("rank"));
    s.compact.ratio = std::stod(get("ratio"));
    s.compact.update_gap = std::stol(get("update_gap"));
    s.compact.seed = std::stoull(get("seed"));
    s.compact.keep_matrix = get("keep_matrix") == "true";
    s.compact.sketch = get("sketch") == "count" ? slimgrad::transforms::Sketch::count
                                                : slimgrad::transforms::Sketch::gaussian;
  }
  for (const std::string& text : settings) {
    const auto eq = text.find('=');
    require(eq != std::string::npos && eq > 0,
            "--act-set expects key=value (e.g. --act-set subtoken=8), got '" + text + "'");
    const std::string key = text.substr(0, eq), value = text.substr(eq + 1);
    try {
      if (kind == "velora" && key == "subtoken")
        subtoken = std::stol(value);
      else if (kind == "velora" && key == "scale")
        s.velora.scale = std::stod(value);
      else if (kind == "velora" && key == "init")
        s.velora.init = value == "batch"
                            ? act::VeloraInit::batch_average
                            : (require(value == "once",
                                       "velora init expects once or batch, got '" + value + "'"),
                               act::VeloraInit::batch_average_once);
      else if (kind == "compact" && key == "ratio")
        s.compact.ratio = std::stod(value);
      else if (kind == "compact" && key == "update_gap")
        s.compact.update_gap = std::stol(value);
      else
        throw slimgrad::Error(
            "slimgrad: unknown --act-set key '" + key + "' for " + kind +
            (kind == "velora" ? " (known: subtoken, scale, init)" : " (known: ratio, update_gap)"));
    } catch (const std::logic_error&) {
      throw slimgrad::Error("slimgrad: --act-set " + key + " expects a number, got '" + value +
                            "'");
    }
  }
  require(subtoken >= 1, "--act-set subtoken must be >= 1");
  const Config& c = model.config();
  for (Index l = 0; l < c.layers; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    const struct {
      LinearKind kind;
      const char* name;
    } projections[] = {{LinearKind::attn_qkv, "attn.c_attn"},
                       {LinearKind::attn_proj, "attn.o_proj"},
                       {LinearKind::mlp_fc, "mlp.c_fc"},
                       {LinearKind::mlp_proj, "mlp.c_proj"}};
    for (const auto& pr : projections) {
      if (s.kind == act::Kind::compact && pr.kind == LinearKind::attn_proj) continue;
      const TensorInfo& t = model.info(p + pr.name);
      act::Settings layer = s;
      if (s.kind == act::Kind::velora) {
        require(t.cols % subtoken == 0, "--act-set subtoken=" + std::to_string(subtoken) +
                                            " does not divide the input width " +
                                            std::to_string(t.cols) + " of " + t.name);
        layer.velora.groups = t.cols / subtoken;
      }
      model.set_linear(l, pr.kind,
                       std::make_unique<CompressedLinear>(t.name, t.cols, t.rows, layer));
    }
  }
}

/// The tensors the optimizer steps: the model's, where `split_qkv` hands each attn.c_attn over
/// as its three C×C row blocks attn.c_attn.{q,k,v} (contiguous in the row-major weight), as
/// LLaMA's q_proj, k_proj and v_proj are three tensors. A recipe's per-tensor statistics
/// (APOLLO-Mini's tensor-wise scale, the norm-growth limiter) then see each projection alone, as
/// in the papers' LLaMA runs, instead of one scale for q, k and v together. Needs full weight
/// gradients (not CompAct's m×r ones).
inline std::vector<TensorInfo> optimizer_tensors(const Model<float>& model, bool split_qkv) {
  std::vector<TensorInfo> out;
  const std::string qkv = std::string(".") + Model<float>::linear_name(LinearKind::attn_qkv);
  for (const TensorInfo& t : model.tensors()) {
    if (!split_qkv || !t.name.ends_with(qkv)) {
      out.push_back(t);
      continue;
    }
    slimgrad::require(model.grad_cols(t) == t.cols, "--split-qkv needs full weight gradients of " +
                                                        t.name + " (not --activations compact)");
    const Index c = t.rows / 3;
    for (Index k = 0; k < 3; ++k) {
      TensorInfo part = t;
      part.name = t.name + "." + "qkv"[k];
      part.offset = t.offset + static_cast<std::size_t>(k * c * t.cols);
      part.rows = c;
      out.push_back(part);
    }
  }
  return out;
}

/// The optimizer roles of `tensors` (optimizer_tensors): the attention and MLP projections
/// compressed, the rest plain; the attention output projections take the recipe's full path
/// where it has one (CompAct leaves o_proj uncompressed: algorithms.md §4.2 step 4).
inline void set_roles(const Model<float>& model, const std::vector<TensorInfo>& tensors,
                      slimgrad::tools::AnyOptimizer& opt) {
  for (const TensorInfo& t : tensors)
    opt.set_role(t.name, {t.rows, t.cols},
                 t.compressible ? slimgrad::ParamRole::compressed : slimgrad::ParamRole::plain);
  if (opt.has_full_path())
    for (Index l = 0; l < model.config().layers; ++l)
      opt.set_full_path("h." + std::to_string(l) + "." +
                        Model<float>::linear_name(LinearKind::attn_proj));
}
inline void set_roles(const Model<float>& model, slimgrad::tools::AnyOptimizer& opt) {
  set_roles(model, model.tensors(), opt);
}

/// Before each step's forward: every projection takes its weight's optimizer step count, so that
/// a CompAct layer's P is the one the optimizer will use for that weight, also after a step
/// skipped for a non-finite gradient.
inline void sync_steps(Model<float>& model, const slimgrad::tools::AnyOptimizer& opt) {
  model.set_steps([&](const std::string& name) { return opt.step_count(name); });
}

}  // namespace gpt
