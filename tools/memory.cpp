// tools/memory.cpp — `slimgrad memory`: the exact optimizer-state bytes of a recipe on the
// LLaMA shapes of the GaLore benchmark (algorithms.md §0.5) or on given shapes, from the engine's
// own accounting (Optimizer::predicted_state_bytes: nothing is allocated, so llama-7b is as
// cheap as llama-60m).
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <slimgrad/core/error.hpp>
#include "cli.hpp"
#include "registry.hpp"

namespace slimgrad::tools {
namespace {

struct MemoryArgs {
  std::string optimizer;
  std::vector<std::string> sets;
  std::string model;
  std::string shapes;
  bool all = false;
  bool json = false;
};

/// One group's numbers.
struct GroupBytes {
  std::string name;
  std::string shape;
  std::string role;
  std::size_t tensors = 0;
  std::size_t params = 0;
  std::size_t bytes = 0;
  std::size_t adamw_bytes = 0;
};

/// One recipe's numbers over all tensors.
struct Accounting {
  std::string optimizer;
  std::string composition;
  std::map<std::string, std::string> options;
  std::vector<GroupBytes> groups;
  std::size_t tensors = 0, params = 0, bytes = 0, adamw_bytes = 0;
};

std::string shape_of(const ModelTensor& t) {
  return t.vector ? std::to_string(t.shape.cols)
                  : std::to_string(t.shape.rows) + "x" + std::to_string(t.shape.cols);
}

const char* role_text(ParamRole r) {
  return r == ParamRole::compressed ? "compressed" : r == ParamRole::plain ? "plain" : "auto";
}

/// The state bytes of every tensor under `recipe`; the baseline is fp32 torch AdamW.
Accounting account(const std::string& recipe, const std::vector<Setting>& settings,
                   const std::vector<ModelTensor>& tensors) {
  std::unique_ptr<AnyOptimizer> opt = make_optimizer(recipe, settings);
  std::unique_ptr<AnyOptimizer> plain = make_optimizer(recipe, settings);
  const std::unique_ptr<AnyOptimizer> adamw = make_optimizer("adamw", {});
  Accounting a;
  a.optimizer = opt->name();
  a.composition = opt->composition();
  a.options = opt->options();
  for (const std::string& g : group_order(tensors)) {
    GroupBytes gb;
    gb.name = g;
    for (const ModelTensor& t : tensors) {
      if (t.group != g) continue;
      apply_role(*opt, t);
      plain->set_role(t.name, t.shape, ParamRole::plain);
      const std::size_t b = opt->predicted_state_bytes(t.name, t.shape);
      // An automatic tensor is compressed when its state differs from the plain rule's.
      const ParamRole role = t.role != ParamRole::automatic ? t.role
                             : b != plain->predicted_state_bytes(t.name, t.shape)
                                 ? ParamRole::compressed
                                 : ParamRole::plain;
      const std::string r = role_text(role);
      gb.role = gb.tensors == 0 || gb.role == r ? r : "mixed";
      const std::string s = shape_of(t);
      gb.shape = gb.tensors == 0 || gb.shape == s ? s : "mixed";
      gb.tensors += 1;
      gb.params += static_cast<std::size_t>(t.shape.size());
      gb.bytes += b;
      gb.adamw_bytes += adamw->predicted_state_bytes(t.name, t.shape);
    }
    a.tensors += gb.tensors;
    a.params += gb.params;
    a.bytes += gb.bytes;
    a.adamw_bytes += gb.adamw_bytes;
    a.groups.push_back(gb);
  }
  return a;
}

double ratio(std::size_t a, std::size_t b) {
  return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b);
}
double mib(std::size_t b) {
  return static_cast<double>(b) / (1024.0 * 1024.0);
}

nlohmann::json to_json(const Accounting& a) {
  nlohmann::json groups = nlohmann::json::array();
  for (const GroupBytes& g : a.groups)
    groups.push_back({{"name", g.name},
                      {"shape", g.shape},
                      {"role", g.role},
                      {"tensors", g.tensors},
                      {"params", g.params},
                      {"bytes", g.bytes},
                      {"bytes_per_param", ratio(g.bytes, g.params)},
                      {"adamw_bytes", g.adamw_bytes},
                      {"fraction_of_adamw", ratio(g.bytes, g.adamw_bytes)}});
  return {{"optimizer", a.optimizer},
          {"composition", a.composition},
          {"options", a.options},
          {"tensors", a.tensors},
          {"params", a.params},
          {"total_bytes", a.bytes},
          {"total_mib", mib(a.bytes)},
          {"bytes_per_param", ratio(a.bytes, a.params)},
          {"adamw_bytes", a.adamw_bytes},
          {"fraction_of_adamw", ratio(a.bytes, a.adamw_bytes)},
          {"groups", groups}};
}

std::string describe_model(const MemoryArgs& args) {
  if (args.model.empty()) return "shapes " + args.shapes;
  const LlamaConfig& c = llama_model(args.model);
  return std::string(c.name) + " (hidden " + std::to_string(c.hidden) + ", intermediate " +
         std::to_string(c.intermediate) + ", " + std::to_string(c.heads) + " heads, " +
         std::to_string(c.layers) + " layers, vocabulary " + std::to_string(c.vocabulary) + ")";
}

void print_one(const Accounting& a, const MemoryArgs& args) {
  std::printf("slimgrad memory: %s = %s on %s\n", a.optimizer.c_str(), a.composition.c_str(),
              describe_model(args).c_str());
  if (!args.sets.empty()) {
    std::printf("settings:");
    for (const std::string& s : args.sets)
      std::printf(" %s", s.c_str());
    std::printf("\n");
  }
  std::printf("\n%-14s %7s %-11s %-10s %13s %15s %10s %8s %8s\n", "group", "tensors", "shape",
              "role", "params", "state bytes", "MiB", "B/param", "of AdamW");
  auto row = [](const std::string& name, std::size_t tensors, const std::string& shape,
                const std::string& role, std::size_t params, std::size_t bytes, std::size_t adamw) {
    std::printf("%-14s %7zu %-11s %-10s %13zu %15zu %10.2f %8.3f %7.2f%%\n", name.c_str(), tensors,
                shape.c_str(), role.c_str(), params, bytes, mib(bytes), ratio(bytes, params),
                100.0 * ratio(bytes, adamw));
  };
  for (const GroupBytes& g : a.groups)
    row(g.name, g.tensors, g.shape, g.role, g.params, g.bytes, g.adamw_bytes);
  row("total", a.tensors, "", "", a.params, a.bytes, a.adamw_bytes);
  std::printf(
      "\nState: moments in their store format, transform state (bases, projection matrices,\n"
      "seeds), limiter scalars and one 8-byte step counter per tensor. 'of AdamW': against\n"
      "fp32 torch AdamW on the same tensors, %zu bytes (%.2f MiB). fp32 weights: %.2f MiB.\n",
      a.adamw_bytes, mib(a.adamw_bytes), mib(4 * a.params));
}

void print_all(const std::vector<Accounting>& all, const MemoryArgs& args) {
  const Accounting& first = all.front();
  std::printf("slimgrad memory --all: %s, %zu params in %zu tensors; optimizer state only\n\n",
              describe_model(args).c_str(), first.params, first.tensors);
  std::printf("%-12s %-42s %-26s %15s %10s %8s %8s\n", "optimizer", "composition", "settings",
              "state bytes", "MiB", "B/param", "of AdamW");
  for (const Accounting& a : all) {
    std::string hl;
    for (const RecipeInfo& r : recipe_list())
      if (a.optimizer == r.name) hl = r.highlights;
    std::printf("%-12s %-42s %-26s %15zu %10.2f %8.3f %7.2f%%\n", a.optimizer.c_str(),
                a.composition.c_str(), hl.c_str(), a.bytes, mib(a.bytes), ratio(a.bytes, a.params),
                100.0 * ratio(a.bytes, a.adamw_bytes));
  }
  std::printf(
      "\nAttention and MLP matrices take each recipe's transform, embedding, lm_head and norms\n"
      "the plain rule (as the papers' param groups do). Exact bytes: moments in their store\n"
      "format, bases / projection matrices, limiter scalars, 8-byte step counters.\n"
      "fp32 weights: %.2f MiB. 'slimgrad memory --optimizer NAME' breaks one recipe down.\n",
      mib(4 * first.params));
}

void run_memory(const MemoryArgs& args) {
  require(args.model.empty() != args.shapes.empty(),
          "memory needs exactly one of --model (llama-60m ... llama-7b) and --shapes");
  require(args.all != !args.optimizer.empty(),
          "memory needs exactly one of --optimizer NAME and --all");
  require(!args.all || args.sets.empty(),
          "--set applies to one optimizer; use --optimizer NAME instead of --all");
  const std::vector<Setting> settings = parse_settings(args.sets);
  const std::vector<ModelTensor> tensors =
      args.model.empty() ? shape_tensors(args.shapes) : llama_tensors(llama_model(args.model));

  if (!args.all) {
    const Accounting a = account(args.optimizer, settings, tensors);
    if (args.json) {
      nlohmann::json j = to_json(a);
      j["command"] = "memory";
      j["model"] = args.model.empty() ? "shapes" : args.model;
      if (!args.shapes.empty()) j["shapes"] = args.shapes;
      std::printf("%s\n", j.dump().c_str());
    } else {
      print_one(a, args);
    }
    return;
  }
  std::vector<Accounting> all;
  for (const RecipeInfo& r : recipe_list())
    all.push_back(account(r.name, {}, tensors));
  if (args.json) {
    nlohmann::json recipes = nlohmann::json::array();
    for (const Accounting& a : all)
      recipes.push_back(to_json(a));
    nlohmann::json j = {{"command", "memory"},
                        {"model", args.model.empty() ? "shapes" : args.model},
                        {"tensors", all.front().tensors},
                        {"params", all.front().params},
                        {"adamw_bytes", all.front().adamw_bytes},
                        {"recipes", recipes}};
    if (!args.shapes.empty()) j["shapes"] = args.shapes;
    std::printf("%s\n", j.dump().c_str());
  } else {
    print_all(all, args);
  }
}

}  // namespace

void add_memory_command(CLI::App& app) {
  auto args = std::make_shared<MemoryArgs>();
  CLI::App* cmd = app.add_subcommand(
      "memory", "Exact optimizer-state bytes of a recipe on LLaMA shapes (or given shapes)");
  add_recipe_options(cmd, args->optimizer, args->sets, recipe_names());
  add_model_options(cmd, args->model, args->shapes, "Tensors MxN or N, comma-separated");
  cmd->add_flag("--all", args->all, "One table over every recipe (with their defaults)");
  cmd->add_flag("--json", args->json, "Print exactly one JSON object on stdout");
  cmd->footer(
      "Counts what Optimizer::state_bytes() would hold after the first step, without\n"
      "allocating: moments in their store format (fp32, 8-bit codes + block absmax, factored),\n"
      "bases and projection matrices, limiter scalars and one 8-byte step counter per tensor.\n"
      "Workspace (grown once to the largest tensor and shared) is not state and not counted.\n"
      "--model: the GaLore-benchmark LLaMA (algorithms.md 0.5): per layer q,k,v,o (HxH),\n"
      "gate, up (IxH), down (HxI), two RMSNorm vectors (H); embedding and untied lm_head\n"
      "(32000xH), final norm (H). Attention and MLP matrices are compressed, the rest takes the\n"
      "plain rule. --shapes: each tensor's role is decided by the recipe's fallback rules.\n"
      "'of AdamW' compares with fp32 torch AdamW (8 bytes per parameter + 8 per tensor).\n"
      "--json keys: total_bytes, params, tensors, bytes_per_param, fraction_of_adamw,\n"
      "adamw_bytes, composition, options, groups[] (name, shape, role, tensors, params, bytes,\n"
      "bytes_per_param, fraction_of_adamw); with --all: recipes[] of those objects.");
  cmd->callback([args] { run_memory(*args); });
}

}  // namespace slimgrad::tools
