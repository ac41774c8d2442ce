// examples/gpt/main.cpp — `slimgrad-gpt`: trains a character-level GPT on a text file with any
// slimgrad recipe. The command line is a contract (tools/compare_gpt.py and tools/demo.sh rely on
// it): see --help.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <slimgrad/core/error.hpp>
#include <string>

#include "registry.hpp"
#include "trainer.hpp"

int main(int argc, char** argv) {
  gpt::Options o;
  CLI::App app{
      "slimgrad-gpt: a character-level GPT (nanoGPT's architecture, forward and backward by hand "
      "on Eigen + OpenMP) trained on a text file, its parameters stepped by a slimgrad recipe "
      "chosen at run time. Defaults are nanoGPT's shakespeare_char CPU configuration."};
  app.option_defaults()->always_capture_default();
  app.add_option("--data", o.data, "training text (any file; bytes are the tokens)")->required();
  app.add_option("--optimizer", o.optimizer, "recipe: " + slimgrad::tools::recipe_names());
  app.add_option("--set", o.sets, "recipe setting key=value (repeatable; see `slimgrad memory`)")
      ->take_all()
      ->allow_extra_args(false);
  app.add_option("--activations", o.activations,
                 "saved inputs of the attention and MLP projections: none, velora or compact");
  app.add_option("--act-set", o.activation_sets,
                 "activation-compression setting key=value (repeatable)")
      ->allow_extra_args(false);
  app.add_flag("--split-qkv", o.split_qkv,
               "the optimizer steps attn.c_attn as three tensors q, k, v (as LLaMA's q_proj, "
               "k_proj, v_proj), so per-tensor statistics see each alone");
  app.add_option("--layers", o.layers, "transformer blocks");
  app.add_option("--heads", o.heads, "attention heads per block");
  app.add_option("--width", o.width, "embedding width (a multiple of --heads)");
  app.add_option("--block", o.block, "context length in bytes");
  app.add_option("--batch", o.batch, "sequences per step");
  app.add_option("--steps", o.steps, "training steps");
  app.add_option("--decay-steps", o.decay_steps,
                 "step where the cosine reaches --min-lr (0: --steps)");
  app.add_option("--lr", o.lr, "peak learning rate");
  app.add_option("--min-lr", o.min_lr, "final learning rate of the cosine schedule");
  app.add_option("--warmup", o.warmup, "linear warm-up steps");
  app.add_option("--weight-decay", o.weight_decay,
                 "decoupled weight decay of the 2-D weights (applied by the trainer)");
  app.add_option("--clip", o.clip, "global gradient-norm clipping (0: off)");
  app.add_option("--beta2", o.beta2, "the recipe's beta2 (when it has one)");
  app.add_option("--eval-every", o.eval_every, "evaluate every N steps (0: only at the end)");
  app.add_option("--eval-batches", o.eval_batches, "validation batches per evaluation");
  app.add_option("--seed", o.seed, "seed of initialisation, batches and sampling");
  app.add_option("--save", o.save, "write model + optimizer checkpoint here at the end");
  app.add_option("--resume", o.resume, "continue from this checkpoint (bit-exact)");
  app.add_option("--json", o.json, "write a JSON summary here at the end");
  app.add_option("--log", o.log, "per-step log: CSV, or JSON lines if the name ends in .jsonl");
  app.add_option("--sample", o.sample_chars, "bytes of sampled text to print at the end");
  app.add_flag("--quiet", o.quiet, "no progress output");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    gpt::train(o, std::cerr);
  } catch (const std::exception& e) {
    std::string why = e.what();
    if (why.rfind("slimgrad: ", 0) == 0) why.erase(0, 10);
    std::fprintf(stderr, "slimgrad-gpt: error: %s\n", why.c_str());
    return 1;
  }
  return 0;
}
