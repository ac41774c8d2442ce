// examples/gpt/trainer.hpp — the training loop of slimgrad-gpt: data, schedule, clipping, weight
// decay, evaluation, logging, checkpoints and the memory report around model.hpp, with the
// optimizer chosen at run time from tools/registry.hpp (any recipe, `--set key=value`).
//
// nanoGPT's conventions, so that the numbers compare with its published ones: a 90/10 split of
// the text (train first), random windows of `block` bytes per batch row, lr warmed up linearly
// for `warmup` steps then cosine-decayed to `min_lr` at `decay_steps`, global-norm clipping,
// decoupled weight decay on the 2-D weights only (embeddings and projections, not the LayerNorm
// gains). The decay is applied here, identically for every recipe (w ← w·(1 − lr·λ) before the
// step, torch.optim.AdamW's order); the recipe's own weight_decay is set to 0 unless `--set`
// names it. Batches are drawn from Philox keyed by (seed, step), so a resumed run sees exactly
// the batches of an uninterrupted one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <string>
#include <utility>
#include <vector>

#include "model.hpp"

namespace gpt {

struct Options {
  std::string data;
  std::string optimizer = "adamw";
  std::vector<std::string> sets;     ///< the recipe's `key=value` settings
  std::string activations = "none";  ///< none | velora | compact
  std::vector<std::string> activation_sets;
  bool split_qkv = false;  ///< the optimizer sees attn.c_attn as q, k, v (optimizer_tensors)
  Index layers = 4, heads = 4, width = 128, block = 64, batch = 12;
  long steps = 2000;
  long decay_steps = 0;  ///< where the cosine reaches min_lr; 0: = steps
  double lr = 1e-3, min_lr = 1e-4;
  long warmup = 100;
  double weight_decay = 0.1, clip = 1.0, beta2 = 0.99;
  long eval_every = 250;
  long eval_batches = 20;
  std::uint64_t seed = 1337;
  std::string save, resume, json, log;
  long sample_chars = 200;
  bool quiet = false;
};

struct Result {
  double val_loss = 0, train_loss = 0;
  long steps = 0;
  std::size_t param_bytes = 0, grad_bytes = 0, optimizer_state_bytes = 0;
  std::size_t saved_activation_bytes = 0;  ///< everything the backward pass keeps
  std::size_t linear_saved_bytes = 0;      ///< of which the projections' saved inputs
  std::size_t activation_state_bytes = 0;  ///< activation codecs' own state (v, P)
  std::size_t peak_rss_bytes = 0;
  double median_step_ms = 0;
  std::vector<std::pair<long, double>> val_curve;
  std::string sample;
  std::vector<float> parameters;  ///< the final weights (the resume test compares them)
};

/// The corpus as byte tokens, its vocabulary and split.
struct Corpus {
  std::vector<std::uint8_t> vocab;  ///< byte value of each token id, ascending
  std::vector<std::uint8_t> train, val;
};

/// Reads and tokenises `path`; refuses a missing or empty file, or one whose splits are shorter
/// than block + 1 bytes.
Corpus load_corpus(const std::string& path, Index block);

/// The learning rate at step `it` (0-based): nanoGPT's get_lr.
double learning_rate(const Options& o, long it);

/// Runs the whole training described by `o`, writing progress to `out`. Throws slimgrad::Error
/// with one sentence on bad input.
Result train(const Options& o, std::ostream& out);

}  // namespace gpt
