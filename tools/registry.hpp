// tools/registry.hpp — the optimizers and model shapes that `slimgrad replay`, `slimgrad memory`
// and `slimgrad bench step` share.
//
// The library's optimizers are compositions fixed at compile time (design.md §1); the tool picks
// one at run time. AnyOptimizer is a small type-erased interface over Optimizer<...>, and
// make_optimizer() maps a recipe name plus `--set key=value` settings onto one instantiation. The
// instantiations (18: adamw, adam8bit × 2 block sizes, adafactor, galore, gwt × 3 wavelets × 3
// levels, subtrack, apollo, compact, flora) live in tools/registry.cpp and tools/registry_gwt.cpp
// only (two translation units that a 2-core build compiles side by side), so the subcommands that
// use them compile quickly.
//
// Settings: the run-time keys are those of optim/fields.hpp (fields::set); a few keys choose the
// instantiation instead (type-level keys): `wavelet` and `levels` for gwt, `block` for adam8bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <slimgrad/core/view.hpp>
#include <slimgrad/io/safetensors.hpp>
#include <slimgrad/optim/optimizer.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace slimgrad::tools {

/// One `--set key=value`, split at the first '='.
struct Setting {
  std::string key;
  std::string value;
};

/// Splits every `key=value`; throws a sentence for text without '=' or with an empty key.
std::vector<Setting> parse_settings(const std::vector<std::string>& texts);

/// A run-time handle on one Optimizer<Rule, Transform, Store, backend::cpu, Residual>.
class AnyOptimizer {
 public:
  virtual ~AnyOptimizer() = default;

  /// The registry name it was made from ("gwt", "subtrack++", ...).
  virtual const std::string& name() const = 0;
  /// The composition, e.g. "adam/dwt<haar,2>/fp32/wavelet_details".
  virtual std::string composition() const = 0;
  /// Every hyper-parameter as key → text (fields::to_map plus the type-level keys).
  virtual std::map<std::string, std::string> options() const = 0;
  /// T of a transform refreshed every T steps (GaLore, SubTrack, APOLLO); 0 for the others.
  virtual index_t update_gap() const = 0;

  /// Fixes a parameter's role before its first step. ParamRole::compressed is checked here
  /// against `shape` (e.g. a rank above min(m, n) is refused with a sentence).
  virtual void set_role(const std::string& param, Shape shape, ParamRole role) = 0;
  /// Whether the recipe has a path of its own for the layers it leaves uncompressed: CompAct's
  /// attention output projection (o_proj) takes the full gradient and full Adam, its update
  /// scaled by α·scale_o_proj (algorithms.md §4.2 step 4; recipes::compact_full_path).
  virtual bool has_full_path() const = 0;
  /// Gives `param` that path, before its first step (it replaces what set_role() fixed). The
  /// caller says which layers take it: the recipe does not guess from names. Throws a sentence
  /// for a recipe without one.
  virtual void set_full_path(const std::string& param) = 0;
  /// Number of steps `param` has taken (0 before its first). A step skipped for a NaN/Inf
  /// gradient does not count: a layer whose randomness follows the optimizer's schedule
  /// (CompAct's P) must be handed this count, not the trainer's iteration.
  virtual std::int64_t step_count(std::string_view param) const = 0;

  /// One optimizer step over `params` (Optimizer::step).
  virtual StepReport step(std::span<const Param> params) = 0;

  /// Exact bytes of state held now (Optimizer::state_bytes).
  virtual std::size_t state_bytes() const = 0;
  /// Exact bytes of one parameter's state (it must have state).
  virtual std::size_t state_bytes(std::string_view param) const = 0;
  /// The state bytes a parameter will hold, without allocating it.
  virtual std::size_t predicted_state_bytes(std::string_view param, Shape shape) const = 0;
  /// Whether a parameter that has state goes through the transform.
  virtual bool is_compressed(std::string_view param) const = 0;
  /// Bytes of the reusable workspace held now.
  virtual std::size_t workspace_bytes() const = 0;

  /// Sets the learning rate of the next steps (Optimizer::set_lr; schedules call it every step).
  virtual void set_lr(double lr) = 0;
  /// The whole state as named tensors plus metadata (Optimizer::to_checkpoint).
  virtual io::TensorFile to_checkpoint() const = 0;
  /// Replaces the state with a checkpoint's; on any error nothing changes
  /// (Optimizer::from_checkpoint).
  virtual void from_checkpoint(const io::TensorFile& file) = 0;
};

/// A recipe the registry can make.
struct RecipeInfo {
  const char* name;
  const char* summary;     ///< one line for --help
  const char* type_keys;   ///< the type-level keys it takes ("" if none)
  const char* highlights;  ///< its main settings at default, for tables
};

/// Every recipe, in the order tables list them.
const std::vector<RecipeInfo>& recipe_list();

/// "adamw, adam8bit, ..." for messages and help.
std::string recipe_names();

/// The optimizer for `recipe` with the recipe's defaults, then `settings` applied in order (a
/// later setting of the same key wins). Throws a sentence for an unknown recipe, an unknown key
/// (listing the known ones), a malformed or out-of-range value.
std::unique_ptr<AnyOptimizer> make_optimizer(const std::string& recipe,
                                             const std::vector<Setting>& settings);

// ---- model shapes ------------------------------------------------------------------------------

/// A LLaMA configuration of the GaLore C4 benchmark (algorithms.md §0.5).
struct LlamaConfig {
  const char* name;  ///< "llama-60m", ...
  index_t hidden;
  index_t intermediate;
  index_t heads;
  index_t layers;
  index_t vocabulary;
};

/// llama-60m, llama-130m, llama-350m, llama-1b, llama-7b.
const std::vector<LlamaConfig>& llama_models();

/// The configuration called `name`; throws a sentence listing the known ones otherwise.
const LlamaConfig& llama_model(const std::string& name);

/// One weight tensor of a model, in PyTorch's out×in layout (a vector is 1×n).
struct ModelTensor {
  std::string name;   ///< e.g. "layers.3.mlp.down_proj"
  Shape shape;        ///< rows × cols
  bool vector;        ///< a 1-D tensor (RMSNorm weights)
  std::string group;  ///< the table row it is counted in
  ParamRole role;     ///< compressed (attention, MLP) or plain (embedding, head, norms)
  bool full_path;     ///< o_proj: a recipe with a full path (compact) leaves it uncompressed
};

/// Gives `opt` the role of `t` (unless automatic) and, if the recipe has one, its full path for
/// the tensors that take it.
void apply_role(AnyOptimizer& opt, const ModelTensor& t);

/// The weights of a LLaMA model: per layer q, k, v, o (hidden×hidden), gate and up
/// (intermediate×hidden), down (hidden×intermediate), two RMSNorm vectors (hidden); the embedding
/// and an untied lm_head (vocabulary×hidden); the final norm (hidden). Attention and MLP matrices
/// are compressed, the rest takes the plain rule, as the peers' param groups do (algorithms.md
/// §0.4); o_proj is marked for the full path of the recipes that have one (CompAct's).
std::vector<ModelTensor> llama_tensors(const LlamaConfig& model);

/// Tensors from "MxN,N,..." (a bare N is a 1×N vector), each its own group, role automatic (the
/// recipe's fallback rules decide). Throws a sentence on malformed text.
std::vector<ModelTensor> shape_tensors(const std::string& list);

/// The groups of `tensors` in first-appearance order.
std::vector<std::string> group_order(const std::vector<ModelTensor>& tensors);

/// Median of a non-empty sample.
double median(std::vector<double> v);

}  // namespace slimgrad::tools
