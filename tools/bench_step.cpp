// tools/bench_step.cpp — `slimgrad bench step`: the time of one optimizer step over every weight
// of a LLaMA model (random weights and gradients, allocated once), in steady state and, for the
// recipes whose transform is refreshed every T steps, amortised over one refresh per T steps;
// with the rate against the bytes a step must move (design.md §4).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <CLI/CLI.hpp>
#include <slimgrad/core/error.hpp>
#include "cli.hpp"
#include "registry.hpp"

namespace slimgrad::tools {
namespace {

struct BenchStepArgs {
  std::string optimizer;
  std::vector<std::string> sets;
  std::string model;
  std::string shapes;
  int repeat = 5;
  int refresh_repeat = 3;
  std::uint64_t seed = 0;
  bool json = false;
};

/// Uniform values in [-scale, scale) from splitmix64: fast enough that filling 2 × 58M floats
/// costs a fraction of a second (the values only need to be finite and varied).
void fill(std::vector<float>& v, std::uint64_t seed, float scale) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (float& f : v) {
    x += 0x9E3779B97F4A7C15ull;
    std::uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * 0x1p-24f;  // [0, 1)
    f = scale * (2.0f * u - 1.0f);
  }
}

/// The model's weights and gradients, allocated once, and the Param list over them.
struct Workload {
  std::vector<ModelTensor> tensors;
  std::vector<std::vector<float>> weights, grads;
  std::vector<Param> params;
  std::size_t count = 0;  // parameters

  Workload(std::vector<ModelTensor> t, std::uint64_t seed) : tensors(std::move(t)) {
    weights.resize(tensors.size());
    grads.resize(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const Shape s = tensors[i].shape;
      weights[i].resize(static_cast<std::size_t>(s.size()));
      grads[i].resize(static_cast<std::size_t>(s.size()));
      fill(weights[i], seed + 2 * i, 0.05f);
      fill(grads[i], seed + 2 * i + 1, 0.01f);
      params.push_back({tensors[i].name, host_view(weights[i].data(), s.rows, s.cols),
                        host_view<const float>(grads[i].data(), s.rows, s.cols)});
      count += static_cast<std::size_t>(s.size());
    }
  }
};

std::unique_ptr<AnyOptimizer> make(const BenchStepArgs& args, std::vector<Setting> settings,
                                   const Workload& w) {
  auto opt = make_optimizer(args.optimizer, settings);
  for (const ModelTensor& t : w.tensors)
    apply_role(*opt, t);
  return opt;
}

double timed_step(AnyOptimizer& opt, const Workload& w) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const StepReport rep = opt.step(w.params);
  const auto t1 = clock::now();
  require(rep.stepped == static_cast<index_t>(w.params.size()),
          "bench step: a parameter was skipped (non-finite gradient)");
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

void run_bench_step(const BenchStepArgs& args) {
  require(args.repeat >= 1, "--repeat must be at least 1, got " + std::to_string(args.repeat));
  require(args.refresh_repeat >= 1,
          "--refresh-repeat must be at least 1, got " + std::to_string(args.refresh_repeat));
  const std::vector<Setting> settings = parse_settings(args.sets);
  require(args.model.empty() != args.shapes.empty(),
          "bench step needs exactly one of --model (llama-60m ... llama-7b) and --shapes");
  std::vector<ModelTensor> tensors =
      args.model.empty() ? shape_tensors(args.shapes) : llama_tensors(llama_model(args.model));
  {  // every settings or shape error, and a model too large for memory, before the allocation
    auto check = make_optimizer(args.optimizer, settings);
    double need = 0;
    for (const ModelTensor& t : tensors) {
      apply_role(*check, t);
      need += 8.0 * static_cast<double>(t.shape.size()) +
              static_cast<double>(check->predicted_state_bytes(t.name, t.shape));
    }
    const double have =
        static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
    require(have <= 0 || need < have,
            "bench step: this needs " + std::to_string(static_cast<long>(need / 0x1p30)) +
                " GiB (fp32 weights, gradients and optimizer state) but the machine has " +
                std::to_string(static_cast<long>(have / 0x1p30)) + " GiB");
  }
  const std::string model = args.model.empty() ? "shapes " + args.shapes : args.model;
  Workload w(std::move(tensors), args.seed);

  // Steady state: step 0 creates the state (and takes the first refresh), step 1 warms the
  // workspace; then only steps k with k % T != 0 are timed (a refresh step is run untimed).
  auto opt = make(args, settings, w);
  const index_t gap = opt->update_gap();
  const double first_ms = timed_step(*opt, w);
  timed_step(*opt, w);
  std::int64_t k = 2;
  std::vector<double> steady;
  while (static_cast<int>(steady.size()) < args.repeat) {
    const double ms = timed_step(*opt, w);
    if (gap == 0 || k % gap != 0) steady.push_back(ms);
    ++k;
  }
  const std::string composition = opt->composition();
  std::size_t compressed = 0;
  for (const ModelTensor& t : w.tensors)
    compressed += opt->is_compressed(t.name) ? 1 : 0;
  const std::size_t state = opt->state_bytes();
  const std::size_t workspace = opt->workspace_bytes();
  opt.reset();

  // A refresh step: the same recipe with update_gap 1 refreshes at every step; after its
  // step 0 (the first basis), each step is what step k = T, 2T, ... costs.
  std::vector<double> refresh;
  if (gap > 0) {
    std::vector<Setting> every = settings;
    every.push_back({"update_gap", "1"});
    auto r = make(args, every, w);
    timed_step(*r, w);
    for (int i = 0; i < args.refresh_repeat; ++i)
      refresh.push_back(timed_step(*r, w));
  }

  const double med = median(steady);
  const double min_ms = *std::min_element(steady.begin(), steady.end());
  const double bytes = 2.0 * static_cast<double>(state) + 12.0 * static_cast<double>(w.count);
  const double gbps = bytes / (med * 1e-3) / 1e9;
  const double refresh_ms = refresh.empty() ? 0.0 : median(refresh);
  const double t = static_cast<double>(gap);
  const double amortized = gap > 0 ? (refresh_ms + (t - 1.0) * med) / t : med;
  int threads = 1;
#if defined(_OPENMP)
  threads = omp_get_max_threads();
#endif

  if (args.json) {
    nlohmann::json j = {{"command", "bench step"},
                        {"optimizer", args.optimizer},
                        {"composition", composition},
                        {"settings", args.sets},
                        {"model", args.model.empty() ? "shapes" : args.model},
                        {"params", w.count},
                        {"tensors", w.tensors.size()},
                        {"compressed_tensors", compressed},
                        {"threads", threads},
                        {"repeat", args.repeat},
                        {"seed", args.seed},
                        {"first_step_ms", first_ms},
                        {"median_ms", med},
                        {"min_ms", min_ms},
                        {"state_bytes", state},
                        {"workspace_bytes", workspace},
                        {"bytes", bytes},
                        {"gbps", gbps}};
    if (!args.shapes.empty()) j["shapes"] = args.shapes;
    if (gap > 0) {
      j["update_gap"] = gap;
      j["refresh_repeat"] = args.refresh_repeat;
      j["refresh_ms"] = refresh_ms;
      j["amortized_ms"] = amortized;
      j["amortized_gbps"] = bytes / (amortized * 1e-3) / 1e9;
    }
    std::printf("%s\n", j.dump().c_str());
    return;
  }
  std::printf("bench step: %s = %s on %s, %zu params in %zu tensors (%zu compressed)\n",
              args.optimizer.c_str(), composition.c_str(), model.c_str(), w.count, w.tensors.size(),
              compressed);
  std::printf("  %d thread%s, %d repeats, seed %llu%s", threads, threads == 1 ? "" : "s",
              args.repeat, static_cast<unsigned long long>(args.seed),
              args.sets.empty() ? "" : ", settings:");
  for (const std::string& s : args.sets)
    std::printf(" %s", s.c_str());
  std::printf("\n");
  std::printf("  first step (creates the state)  %10.2f ms\n", first_ms);
  std::printf("  steady step        median %10.2f ms  (min %.2f ms)  %6.2f GB/s\n", med, min_ms,
              gbps);
  if (gap > 0) {
    std::printf("  refresh step       median %10.2f ms  (%d repeats)\n", refresh_ms,
                args.refresh_repeat);
    std::printf("  amortised over T = %ld: (refresh + %ld x steady)/%ld = %.2f ms  %6.2f GB/s\n",
                gap, gap - 1, gap, amortized, bytes / (amortized * 1e-3) / 1e9);
  }
  std::printf("  bytes = 2 x state + 12 x params = 2 x %zu + 12 x %zu = %.0f\n", state, w.count,
              bytes);
  std::printf(
      "  (state read and written, fp32 weights read and written, fp32 gradients read;\n"
      "   workspace traffic not counted; workspace %zu bytes)\n",
      workspace);
}

}  // namespace

void add_bench_step_command(CLI::App& bench) {
  auto args = std::make_shared<BenchStepArgs>();
  CLI::App* cmd =
      bench.add_subcommand("step", "Time one optimizer step over every weight of a LLaMA model");
  add_recipe_options(cmd, args->optimizer, args->sets, recipe_names())->required();
  add_model_options(cmd, args->model, args->shapes,
                    "Instead of --model: tensors MxN or N, comma-separated (roles by the "
                    "recipe's fallback rules)");
  cmd->add_option("--repeat", args->repeat, "Timed steady steps")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--refresh-repeat", args->refresh_repeat,
                  "Timed refresh steps (recipes with update_gap)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "Seed of the random weights and gradients")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "Print exactly one JSON object on stdout");
  cmd->footer(
      "Weights U(-0.05, 0.05) and gradients U(-0.01, 0.01) for every tensor of the model\n"
      "(see 'slimgrad memory'), allocated once; the same gradients every step. Attention and\n"
      "MLP matrices take the transform, embedding, lm_head and norms the plain rule (with\n"
      "--shapes, the recipe's fallback rules decide).\n"
      "Steady step: step 0 (creates the state) and step 1 are untimed; the median of --repeat\n"
      "further steps, skipping any step k with k % T == 0. Refresh step (galore, subtrack,\n"
      "apollo: a transform refreshed every T = update_gap steps): the median of\n"
      "--refresh-repeat steps of the same recipe with update_gap 1, after its step 0;\n"
      "amortised = (refresh + (T - 1) x steady) / T.\n"
      "bytes = 2 x state_bytes + 12 x params: the state read and written, fp32 weights read\n"
      "and written, fp32 gradients read (the minimum traffic; workspace not counted).\n"
      "GB/s = bytes / time. Threads: OMP_NUM_THREADS.\n"
      "--json keys: median_ms, min_ms, bytes, gbps, first_step_ms, state_bytes,\n"
      "workspace_bytes, params, tensors, compressed_tensors, threads, repeat, seed,\n"
      "composition; with a refreshed transform also update_gap, refresh_ms, amortized_ms,\n"
      "amortized_gbps.");
  cmd->callback([args] { run_bench_step(*args); });
}

}  // namespace slimgrad::tools
