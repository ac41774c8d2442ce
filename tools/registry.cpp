// tools/registry.cpp — the instantiations behind tools/registry.hpp (all but GWT's, which are in
// tools/registry_gwt.cpp), the recipe list and the LLaMA shapes of algorithms.md §0.5.
#include <algorithm>
#include <string>

#include "registry_impl.hpp"

namespace slimgrad::tools {
namespace {

using detail::build;
using detail::last_value;

const char* const gwt_keys = "wavelet (haar|db2|db4), levels (1..3)";
const char* const adam8bit_keys = "block (256|2048)";

const std::vector<RecipeInfo> recipes_ = {
    {"adamw", "torch.optim.AdamW: fp32 m and v (8 bytes per parameter)", "", "fp32 m, v"},
    {"adam8bit", "bitsandbytes' blockwise 8-bit AdamW (about 2 bytes per parameter)", adam8bit_keys,
     "block 256"},
    {"adafactor", "HF transformers' Adafactor: factored second moment, no beta1", "",
     "factored v, no m"},
    {"galore", "GaLore: Adam on top-r SVD coefficients, refreshed every T steps", "",
     "rank 128, T 200, exact SVD"},
    {"gwt", "GWT: Adam on the Haar approximation, details normalised", gwt_keys, "haar, 2 levels"},
    {"subtrack", "SubTrack-Grad: Grassmann-tracked rank-r subspace", "", "rank 128, T 200"},
    {"subtrack++", "SubTrack++: subtrack + recovery scaling, projection-aware moments, limiter", "",
     "rank 128, T 200"},
    {"apollo", "APOLLO: channel-wise scale from Adam in a random rank-r space", "",
     "rank 256, channel"},
    {"apollo-mini", "APOLLO-Mini: rank 1, tensor-wise scale", "", "rank 1, tensor"},
    {"compact", "CompAct: Adam on the m x r gradient G P^T (seeded P); o_proj keeps full Adam", "",
     "r = n/4, T 50, alpha 0.25"},
    {"flora", "Flora: Adafactor with momentum compressed by a seeded rank-r projection", "",
     "rank 128, kappa 1000"},
};

template <int B>
std::unique_ptr<AnyOptimizer> build_adam8bit(const std::vector<Setting>& settings) {
  using Opt = Optimizer<optim::Adam, transforms::Identity, state::Q8Block<B>, backend::cpu>;
  const auto d = recipes::adam8bit_options();
  typename Opt::Options o;
  o.rule = d.rule;
  o.store.min_8bit_size = d.store.min_8bit_size;
  o.residual = d.residual;
  o.fallback = d.fallback;
  o.seed = d.seed;
  return build<Opt>("adam8bit", o, settings, {{"block", std::to_string(B)}});
}

std::unique_ptr<AnyOptimizer> make_adam8bit(const std::vector<Setting>& settings) {
  const std::string block = last_value(settings, "block", "256");
  if (block == "256") return build_adam8bit<256>(settings);
  require(block == "2048", "option 'block' of adam8bit expects 256 or 2048, got '" + block + "'");
  return build_adam8bit<2048>(settings);
}

}  // namespace

std::vector<Setting> parse_settings(const std::vector<std::string>& texts) {
  std::vector<Setting> out;
  for (const std::string& t : texts) {
    const auto eq = t.find('=');
    require(eq != std::string::npos && eq > 0,
            "--set expects key=value (e.g. --set lr=0.01), got '" + t + "'");
    out.push_back({t.substr(0, eq), t.substr(eq + 1)});
  }
  return out;
}

const std::vector<RecipeInfo>& recipe_list() {
  return recipes_;
}

std::string recipe_names() {
  std::string s;
  for (const RecipeInfo& r : recipes_)
    s += (s.empty() ? "" : ", ") + std::string(r.name);
  return s;
}

std::unique_ptr<AnyOptimizer> make_optimizer(const std::string& recipe,
                                             const std::vector<Setting>& settings) {
  if (recipe == "adamw") return build<recipes::AdamW<>>(recipe, recipes::adamw_options(), settings);
  if (recipe == "adam8bit") return make_adam8bit(settings);
  if (recipe == "adafactor")
    return build<recipes::Adafactor<>>(recipe, recipes::adafactor_options(), settings);
  if (recipe == "galore")
    return build<recipes::GaLore<>>(recipe, recipes::galore_options(), settings);
  if (recipe == "gwt") return detail::make_gwt(settings);
  if (recipe == "subtrack" || recipe == "subtrack++")
    return build<recipes::SubTrack<>>(recipe, recipes::subtrack_options(recipe == "subtrack++"),
                                      settings);
  if (recipe == "apollo")
    return build<recipes::Apollo<>>(recipe, recipes::apollo_options(), settings);
  if (recipe == "apollo-mini")
    return build<recipes::Apollo<>>(recipe, recipes::apollo_mini_options(), settings);
  if (recipe == "compact")
    return build<recipes::CompAct<>>(recipe, recipes::compact_options(), settings);
  if (recipe == "flora") return build<recipes::Flora<>>(recipe, recipes::flora_options(), settings);
  throw Error("slimgrad: unknown optimizer '" + recipe + "' (expected one of " + recipe_names() +
              ")");
}

// ---- model shapes ------------------------------------------------------------------------------

const std::vector<LlamaConfig>& llama_models() {
  static const std::vector<LlamaConfig> models = {
      {"llama-60m", 512, 1376, 8, 8, 32000},     {"llama-130m", 768, 2048, 12, 12, 32000},
      {"llama-350m", 1024, 2736, 16, 24, 32000}, {"llama-1b", 2048, 5461, 32, 24, 32000},
      {"llama-7b", 4096, 11008, 32, 32, 32000},
  };
  return models;
}

const LlamaConfig& llama_model(const std::string& name) {
  std::string known;
  for (const LlamaConfig& c : llama_models()) {
    if (name == c.name) return c;
    known += (known.empty() ? "" : ", ") + std::string(c.name);
  }
  throw Error("slimgrad: unknown model '" + name + "' (expected one of " + known + ")");
}

std::vector<ModelTensor> llama_tensors(const LlamaConfig& c) {
  const index_t h = c.hidden, f = c.intermediate;
  std::vector<ModelTensor> t;
  const auto compressed = ParamRole::compressed, plain = ParamRole::plain;
  t.push_back({"embed_tokens", {c.vocabulary, h}, false, "embed_tokens", plain, false});
  for (index_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (const std::string n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      t.push_back({p + "self_attn." + n, {h, h}, false, "attn q,k,v,o", compressed, n == "o_proj"});
    t.push_back({p + "mlp.gate_proj", {f, h}, false, "mlp gate,up", compressed, false});
    t.push_back({p + "mlp.up_proj", {f, h}, false, "mlp gate,up", compressed, false});
    t.push_back({p + "mlp.down_proj", {h, f}, false, "mlp down", compressed, false});
    t.push_back({p + "input_layernorm", {1, h}, true, "norms", plain, false});
    t.push_back({p + "post_attention_layernorm", {1, h}, true, "norms", plain, false});
  }
  t.push_back({"norm", {1, h}, true, "norms", plain, false});
  t.push_back({"lm_head", {c.vocabulary, h}, false, "lm_head", plain, false});
  return t;
}

std::vector<ModelTensor> shape_tensors(const std::string& list) {
  const std::string usage =
      "--shapes expects a comma-separated list of ROWSxCOLS or N (e.g. 4096x4096,4096), got '" +
      list + "'";
  auto number = [&](const std::string& s) -> index_t {
    const bool digits = !s.empty() && s.size() <= 9 && std::all_of(s.begin(), s.end(), [](char ch) {
      return ch >= '0' && ch <= '9';
    });
    require(digits && std::stol(s) > 0, usage);
    return std::stol(s);
  };
  std::vector<ModelTensor> out;
  std::size_t begin = 0;
  while (true) {
    const auto comma = list.find(',', begin);
    const std::string item = list.substr(begin, comma == std::string::npos ? comma : comma - begin);
    const auto x = item.find_first_of("xX");
    ModelTensor t;
    if (x == std::string::npos) {
      t.shape = {1, number(item)};
      t.vector = true;
    } else {
      t.shape = {number(item.substr(0, x)), number(item.substr(x + 1))};
      t.vector = false;
    }
    t.name = "shape" + std::to_string(out.size()) + "." + item;
    t.group = item;
    t.role = ParamRole::automatic;
    t.full_path = false;
    out.push_back(std::move(t));
    if (comma == std::string::npos) break;
    begin = comma + 1;
  }
  return out;
}

void apply_role(AnyOptimizer& opt, const ModelTensor& t) {
  if (t.role != ParamRole::automatic) opt.set_role(t.name, t.shape, t.role);
  if (t.full_path && opt.has_full_path()) opt.set_full_path(t.name);
}

std::vector<std::string> group_order(const std::vector<ModelTensor>& tensors) {
  std::vector<std::string> groups;
  for (const ModelTensor& t : tensors)
    if (std::find(groups.begin(), groups.end(), t.group) == groups.end()) groups.push_back(t.group);
  return groups;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace slimgrad::tools
