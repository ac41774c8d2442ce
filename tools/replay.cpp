// tools/replay.cpp — `slimgrad replay`: runs an optimizer over recorded gradients and writes the
// final weights, so that any peer implementation (torch, the papers' code) can be compared with
// slimgrad's on the same inputs (tests/tools/test_cli.py does this for torch.optim.AdamW and GWT).
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <slimgrad/core/error.hpp>
#include <slimgrad/io/safetensors.hpp>
#include "cli.hpp"
#include "registry.hpp"

namespace slimgrad::tools {
namespace {

struct ReplayArgs {
  std::string optimizer;
  std::vector<std::string> sets;
  std::string in;
  std::string out;
  bool quiet = false;
};

/// One parameter of IN: its weights and its gradients g.<name>.<k> by k.
struct Recorded {
  std::vector<std::int64_t> shape;  // as in IN (1-D or 2-D)
  Shape view;                       // 1×n for a vector
  std::vector<float> weight;
  std::map<long, std::string> grads;  // k → tensor name
};

/// "123" → 123 (no sign, no leading zero unless "0"); -1 otherwise.
long step_index(const std::string& s) {
  if (s.empty() || s.size() > 9 || (s.size() > 1 && s[0] == '0')) return -1;
  for (char ch : s)
    if (ch < '0' || ch > '9') return -1;
  return std::stol(s);
}

std::string shape_text(const std::vector<std::int64_t>& s) {
  return io::detail::shape_string(s);
}

/// Checks a tensor of IN: F32, 1-D or 2-D, non-empty.
void check_tensor(const io::Tensor& t, const std::string& name, const std::string& what) {
  require(t.dtype == io::Dtype::F32, what + ": tensor '" + name + "' is " +
                                         std::string(io::dtype_name(t.dtype)) + ", expected F32");
  require(t.shape.size() == 1 || t.shape.size() == 2,
          what + ": tensor '" + name + "' has " + std::to_string(t.shape.size()) + " dimensions " +
              shape_text(t.shape) + ", expected 1 or 2");
  for (auto d : t.shape)
    require(d > 0, what + ": tensor '" + name + "' is empty " + shape_text(t.shape));
}

void run_replay(const ReplayArgs& args) {
  // Everything is checked before the first step: the optimizer and its settings first (cheap),
  // then the file.
  std::unique_ptr<AnyOptimizer> opt = make_optimizer(args.optimizer, parse_settings(args.sets));
  const std::string what = "input '" + args.in + "'";
  const io::TensorFile in = io::read(args.in);

  std::map<std::string, Recorded> params;
  for (const auto& [name, t] : in.tensors) {
    if (name.rfind("w.", 0) == 0 && name.size() > 2) {
      check_tensor(t, name, what);
      Recorded& r = params[name.substr(2)];
      r.shape = t.shape;
      r.view = t.shape.size() == 1
                   ? Shape{1, static_cast<index_t>(t.shape[0])}
                   : Shape{static_cast<index_t>(t.shape[0]), static_cast<index_t>(t.shape[1])};
      continue;
    }
    const auto dot = name.rfind('.');
    const long k = dot == std::string::npos ? -1 : step_index(name.substr(dot + 1));
    require(name.rfind("g.", 0) == 0 && dot > 2 && k >= 0,
            what + ": tensor '" + name +
                "' is neither weights 'w.NAME' nor a gradient 'g.NAME.K' (K = 0, 1, ...)");
  }
  require(!params.empty(), what + " holds no weights (tensors named w.NAME)");
  for (const auto& [name, t] : in.tensors) {
    if (name.rfind("g.", 0) != 0) continue;
    const auto dot = name.rfind('.');
    const std::string pname = name.substr(2, dot - 2);
    const auto it = params.find(pname);
    require(it != params.end(),
            what + ": gradient '" + name + "' has no weights 'w." + pname + "'");
    check_tensor(t, name, what);
    require(t.shape == it->second.shape, what + ": gradient '" + name + "' is " +
                                             shape_text(t.shape) + " but 'w." + pname + "' is " +
                                             shape_text(it->second.shape));
    it->second.grads[step_index(name.substr(dot + 1))] = name;
  }
  // The same K for every parameter, and every k in 0..K-1.
  const std::string first = params.begin()->first;
  const long steps =
      params.begin()->second.grads.empty() ? 0 : params.begin()->second.grads.rbegin()->first + 1;
  for (const auto& [pname, r] : params) {
    const long kmax = r.grads.empty() ? -1 : r.grads.rbegin()->first;
    for (long k = 0; k <= kmax; ++k)
      require(r.grads.count(k), what + ": gradient 'g." + pname + "." + std::to_string(k) +
                                    "' is missing ('" + pname +
                                    "' has gradients up to k = " + std::to_string(kmax) + ")");
    require(kmax + 1 == steps, what + ": parameter '" + pname + "' has " +
                                   std::to_string(kmax + 1) + " gradients but '" + first +
                                   "' has " + std::to_string(steps) +
                                   " (every parameter needs the same K)");
  }
  require(steps > 0, what + " holds no gradients (tensors named g.NAME.K)");

  // The run: every parameter steps in one opt.step call per k, in name order.
  for (auto& [pname, r] : params)
    r.weight = in.at("w." + pname).to_f32();
  std::vector<std::string> skipped;
  std::vector<std::vector<float>> grads(params.size());
  for (long k = 0; k < steps; ++k) {
    std::vector<Param> batch;
    std::size_t i = 0;
    for (auto& [pname, r] : params) {
      grads[i] = in.at(r.grads.at(k)).to_f32();
      batch.push_back({pname, host_view(r.weight.data(), r.view.rows, r.view.cols),
                       host_view<const float>(grads[i].data(), r.view.rows, r.view.cols)});
      ++i;
    }
    const StepReport rep = opt->step(batch);
    for (const std::string& s : rep.skipped)
      skipped.push_back(s + " at k = " + std::to_string(k));
  }

  io::TensorFile out;
  for (const auto& [pname, r] : params)
    out.add_f32("w." + pname, r.shape, r.weight);
  out.metadata["slimgrad.optimizer"] = opt->name();
  out.metadata["slimgrad.composition"] = opt->composition();
  out.metadata["slimgrad.options"] = nlohmann::json(opt->options()).dump();
  out.metadata["slimgrad.steps"] = std::to_string(steps);
  io::write(args.out, out);  // only now: a failure above leaves no OUT file

  if (args.quiet) return;
  std::printf("replay: %s (%s), %zu parameter%s, %ld step%s -> %s\n", opt->name().c_str(),
              opt->composition().c_str(), params.size(), params.size() == 1 ? "" : "s", steps,
              steps == 1 ? "" : "s", args.out.c_str());
  for (const auto& [pname, r] : params)
    std::printf("  %-32s %-12s %-10s state %zu bytes\n", pname.c_str(), shape_text(r.shape).c_str(),
                opt->is_compressed(pname) ? "compressed" : "plain", opt->state_bytes(pname));
  std::printf("  total state %zu bytes\n", opt->state_bytes());
  for (const std::string& s : skipped)
    std::printf("  skipped (non-finite gradient): %s\n", s.c_str());
}

}  // namespace

void add_replay_command(CLI::App& app) {
  auto args = std::make_shared<ReplayArgs>();
  CLI::App* cmd = app.add_subcommand(
      "replay",
      "Run an optimizer over recorded gradients: IN holds w.NAME and g.NAME.K, OUT gets the "
      "final w.NAME");
  add_recipe_options(cmd, args->optimizer, args->sets, recipe_names())->required();
  cmd->add_flag("--quiet", args->quiet, "Print nothing on success");
  add_in_out(cmd, args->in, args->out);
  cmd->footer(
      "IN: for every parameter NAME, w.NAME (F32, 1-D or 2-D; a vector of n is a 1 x n view)\n"
      "and its gradients g.NAME.K for K = 0 .. K-1 (F32, the shape of w.NAME); every parameter\n"
      "needs the same K, and IN may hold nothing else. Step k gives every parameter its\n"
      "g.NAME.k in one optimizer step. OUT: the final w.NAME (original shapes) and metadata\n"
      "slimgrad.optimizer/composition/options/steps. Nothing is written on failure.\n"
      "Recipes and their defaults (include/slimgrad/optim/recipes.hpp):\n"
      "  adamw        torch.optim.AdamW (lr 1e-3, eps 1e-8, weight_decay 0.01)\n"
      "  adam8bit     bitsandbytes AdamW8bit; type-level key block=256|2048\n"
      "  adafactor    HF Adafactor (relative step, parameter scaling, no beta1)\n"
      "  galore       rank 128, update_gap 200, scale 0.25, lr 0.01, HF-AdamW eps 1e-6\n"
      "  gwt          haar, 2 levels, scale 0.25, limiter 1.01, lr 0.01; type-level keys\n"
      "               wavelet=haar|db2|db4 and levels=1..3\n"
      "  subtrack     rank 128, update_gap 200, eta 10, scale 0.25, lr 1e-3\n"
      "  subtrack++   subtrack with recovery_scaling=true projection_aware=true\n"
      "               limiter_gamma=1.01\n"
      "  apollo       rank 256, channel scale, limiter 1.01, lr 0.01\n"
      "  apollo-mini  rank 1, tensor scale, scale 128\n"
      "  flora        Adafactor + momentum in a seeded rank-128 projection, kappa 1000,\n"
      "               beta1 0.9, lr 1e-3\n"
      "Keys: those of include/slimgrad/optim/fields.hpp (an unknown key lists the known\n"
      "ones). Which tensors go through the transform: the recipe's fallback rules (vectors,\n"
      "tensors under fallback_min_size elements and those with aspect above\n"
      "fallback_max_aspect take the plain rule); e.g. --set fallback_min_size=0.\n"
      "Errors print one line 'slimgrad: error: ...' to stderr and exit 1.");
  cmd->callback([args] { run_replay(*args); });
}

}  // namespace slimgrad::tools
