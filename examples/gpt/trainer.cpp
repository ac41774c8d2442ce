// examples/gpt/trainer.cpp — see trainer.hpp.
#include "trainer.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <numbers>
#include <ostream>
#include <slimgrad/io/checkpoint.hpp>
#include <slimgrad/io/safetensors.hpp>
#include <sstream>

#include "activations.hpp"
#include "registry.hpp"

namespace gpt {
namespace {

using slimgrad::require;
namespace tools = slimgrad::tools;
namespace io = slimgrad::io;

constexpr const char* checkpoint_format = "slimgrad-gpt-1";
constexpr const char* model_prefix = "gpt.model/";
constexpr const char* codec_prefix = "gpt.codec/";

// Philox streams of the trainer's random draws (the model's init uses the tensor index).
constexpr std::uint64_t train_stream = 1001, eval_stream = 1002, sample_stream = 1003;

std::uint64_t draw(std::uint64_t seed, std::uint64_t stream, std::uint64_t epoch, std::uint64_t i) {
  const slimgrad::random::Key key{seed, stream, static_cast<std::uint32_t>(epoch)};
  const auto bits = slimgrad::random::block_bits(key, i);
  return (static_cast<std::uint64_t>(bits.v[0]) << 32) | bits.v[1];
}

/// B windows of T+1 tokens from `split`: inputs and next-token targets.
void batch(const std::vector<std::uint8_t>& split, Index B, Index T, std::uint64_t seed,
           std::uint64_t stream, std::uint64_t epoch, std::vector<std::uint8_t>& x,
           std::vector<std::uint8_t>& y) {
  const auto range = static_cast<std::uint64_t>(split.size()) - static_cast<std::uint64_t>(T);
  x.resize(static_cast<std::size_t>(B * T));
  y.resize(x.size());
  for (Index b = 0; b < B; ++b) {
    const auto start =
        static_cast<std::size_t>(draw(seed, stream, epoch, static_cast<std::uint64_t>(b)) % range);
    for (Index t = 0; t < T; ++t) {
      x[static_cast<std::size_t>(b * T + t)] = split[start + static_cast<std::size_t>(t)];
      y[static_cast<std::size_t>(b * T + t)] = split[start + static_cast<std::size_t>(t) + 1];
    }
  }
}

std::size_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<std::size_t>(u.ru_maxrss) * 1024;  // Linux: kilobytes
}

std::string hex(const std::vector<std::uint8_t>& v) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (std::uint8_t b : v) {
    s += digits[b >> 4];
    s += digits[b & 15];
  }
  return s;
}

std::string config_text(const Config& c) {
  return "vocab " + std::to_string(c.vocab) + ", block " + std::to_string(c.block) + ", layers " +
         std::to_string(c.layers) + ", heads " + std::to_string(c.heads) + ", width " +
         std::to_string(c.width);
}

std::string duration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  return buf;
}

std::string mib(std::size_t bytes) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(2) << static_cast<double>(bytes) / (1024.0 * 1024.0)
     << " MiB";
  return os.str();
}

/// The optimizer: the recipe's defaults, then the trainer's (weight_decay 0: the trainer decays;
/// beta2), then the user's settings, which win.
std::unique_ptr<tools::AnyOptimizer> make_optimizer(const Options& o) {
  const auto user = tools::parse_settings(o.sets);
  const auto probe = tools::make_optimizer(o.optimizer, user);
  const auto keys = probe->options();
  std::vector<tools::Setting> settings;
  if (keys.contains("weight_decay")) settings.push_back({"weight_decay", "0"});
  if (keys.contains("beta2")) {
    std::ostringstream b2;
    b2 << std::setprecision(17) << o.beta2;
    settings.push_back({"beta2", b2.str()});
  }
  settings.insert(settings.end(), user.begin(), user.end());
  return tools::make_optimizer(o.optimizer, settings);
}

class Log {
 public:
  explicit Log(const std::string& path) {
    if (path.empty()) return;
    jsonl_ = path.ends_with(".jsonl") || path.ends_with(".json");
    f_.open(path);
    require(f_.good(), "cannot open the log file '" + path + "'");
    if (!jsonl_) f_ << "step,lr,train_loss,val_loss,step_ms\n";
  }
  void row(long step, double lr, double train, double val, double ms) {
    if (!f_.is_open()) return;
    f_ << std::setprecision(9);
    if (jsonl_) {
      nlohmann::json j = {{"step", step}, {"lr", lr}, {"step_ms", ms}};
      if (!std::isnan(train)) j["train_loss"] = train;
      if (!std::isnan(val)) j["val_loss"] = val;
      f_ << j.dump() << "\n";
    } else {
      f_ << step << "," << lr << ",";
      if (!std::isnan(train)) f_ << train;
      f_ << ",";
      if (!std::isnan(val)) f_ << val;
      f_ << "," << ms << "\n";
    }
    f_.flush();
  }

 private:
  std::ofstream f_;
  bool jsonl_ = false;
};

void check_options(const Options& o) {
  require(o.batch >= 1, "--batch must be >= 1");
  require(o.steps >= 0, "--steps must be >= 0");
  require(o.decay_steps >= 0, "--decay-steps must be >= 0");
  require(std::isfinite(o.lr) && o.lr > 0, "--lr must be finite and > 0");
  require(std::isfinite(o.min_lr) && o.min_lr >= 0 && o.min_lr <= o.lr,
          "--min-lr must be in [0, --lr]");
  require(o.warmup >= 0, "--warmup must be >= 0");
  require(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "--weight-decay must be >= 0");
  require(std::isfinite(o.clip) && o.clip >= 0, "--clip must be >= 0 (0: no clipping)");
  require(std::isfinite(o.beta2) && o.beta2 >= 0 && o.beta2 < 1, "--beta2 must be in [0, 1)");
  require(o.eval_every >= 0, "--eval-every must be >= 0 (0: only at the end)");
  require(o.eval_batches >= 1, "--eval-batches must be >= 1");
  require(o.sample_chars >= 0, "--sample must be >= 0");
}

}  // namespace

Corpus load_corpus(const std::string& path, Index block) {
  require(!path.empty(), "--data names no file");
  std::error_code ec;
  require(std::filesystem::is_regular_file(path, ec),
          "the data file '" + path + "' does not exist or is not a regular file");
  std::ifstream f(path, std::ios::binary);
  require(f.good(), "cannot read the data file '" + path + "'");
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(f)),
                                        std::istreambuf_iterator<char>());
  require(!bytes.empty(), "the data file '" + path + "' is empty");
  std::array<bool, 256> seen{};
  for (std::uint8_t b : bytes)
    seen[b] = true;
  Corpus c;
  std::array<std::uint8_t, 256> id{};
  for (int b = 0; b < 256; ++b)
    if (seen[static_cast<std::size_t>(b)]) {
      id[static_cast<std::size_t>(b)] = static_cast<std::uint8_t>(c.vocab.size());
      c.vocab.push_back(static_cast<std::uint8_t>(b));
    }
  require(c.vocab.size() >= 2, "the data file '" + path + "' holds a single distinct byte");
  const std::size_t n_train = bytes.size() * 9 / 10;
  const auto need = static_cast<std::size_t>(block) + 1;
  require(n_train >= need && bytes.size() - n_train >= need,
          "the data file '" + path + "' (" + std::to_string(bytes.size()) +
              " bytes) is too short for --block " + std::to_string(block) +
              ": its train and validation splits (90/10) must each hold block + 1 bytes");
  for (std::size_t i = 0; i < bytes.size(); ++i)
    (i < n_train ? c.train : c.val).push_back(id[bytes[i]]);
  return c;
}

double learning_rate(const Options& o, long it) {
  const long decay = o.decay_steps > 0 ? o.decay_steps : o.steps;
  if (it < o.warmup) return o.lr * static_cast<double>(it + 1) / static_cast<double>(o.warmup + 1);
  if (it > decay) return o.min_lr;
  const double ratio =
      decay > o.warmup ? static_cast<double>(it - o.warmup) / static_cast<double>(decay - o.warmup)
                       : 1.0;
  const double coeff = 0.5 * (1.0 + std::cos(std::numbers::pi * ratio));
  return o.min_lr + coeff * (o.lr - o.min_lr);
}

Result train(const Options& o, std::ostream& out) {
  // Everything is checked before the first step.
  check_options(o);
  Config cfg;
  cfg.block = o.block;
  cfg.layers = o.layers;
  cfg.heads = o.heads;
  cfg.width = o.width;
  require(o.block >= 1, "--block must be >= 1");
  const Corpus corpus = load_corpus(o.data, o.block);
  cfg.vocab = static_cast<Index>(corpus.vocab.size());
  cfg.validate();
  Model<float> model(cfg);
  model.init(o.seed);
  auto opt = make_optimizer(o);
  require(o.activations != "compact" || o.optimizer == "compact",
          "--activations compact needs --optimizer compact (its weight gradients are m×r, which "
          "only the compact recipe takes)");
  configure_activations(model, o.activations, o.activation_sets, o.seed, opt->options());
  const std::vector<TensorInfo> opt_tensors = optimizer_tensors(model, o.split_qkv);
  set_roles(model, opt_tensors, *opt);

  long start = 0;
  if (!o.resume.empty()) {
    io::TensorFile f = io::read(o.resume);
    auto meta = [&](const std::string& key) -> std::string {
      const auto it = f.metadata.find(key);
      require(it != f.metadata.end(),
              "'" + o.resume + "' is not a slimgrad-gpt checkpoint (no '" + key + "')");
      return it->second;
    };
    require(meta("gpt.format") == checkpoint_format,
            "'" + o.resume + "' is a checkpoint of format " + meta("gpt.format") + ", expected " +
                checkpoint_format);
    require(meta("gpt.config") == config_text(cfg),
            "the checkpoint '" + o.resume + "' is of another model (" + meta("gpt.config") +
                "); this run has " + config_text(cfg));
    require(meta("gpt.vocab") == hex(corpus.vocab),
            "the checkpoint '" + o.resume + "' was trained on another vocabulary than '" + o.data +
                "'");
    require(meta("gpt.activations") == o.activations,
            "the checkpoint '" + o.resume + "' was trained with --activations " +
                meta("gpt.activations") + ", this run uses " + o.activations);
    require(meta("gpt.optimizer") == o.optimizer, "the checkpoint '" + o.resume + "' holds " +
                                                      meta("gpt.optimizer") +
                                                      " state, this run uses " + o.optimizer);
    const auto split = f.metadata.find("gpt.split_qkv");  // absent: written before the option
    require((split != f.metadata.end() && split->second == "1") == o.split_qkv,
            "the checkpoint '" + o.resume + "' was trained " + (o.split_qkv ? "without" : "with") +
                " --split-qkv; resume it the same way");
    io::TensorFile model_part, opt_part;
    opt_part.metadata = f.metadata;
    for (auto& [name, t] : f.tensors)
      (name.starts_with("gpt.") ? model_part : opt_part).add(name, std::move(t));
    require(meta("gpt.model_checksum") == std::to_string(io::checksum(model_part)),
            "the checkpoint '" + o.resume + "' is corrupted (model checksum mismatch)");
    std::vector<float> weights(model.num_params());
    for (const TensorInfo& t : model.tensors()) {
      const auto it = model_part.tensors.find(model_prefix + t.name);
      require(it != model_part.tensors.end(),
              "the checkpoint '" + o.resume + "' lacks the weights of '" + t.name + "'");
      require(it->second.shape == std::vector<std::int64_t>{t.rows, t.cols},
              "the checkpoint '" + o.resume + "' has weights of '" + t.name + "' of another shape");
      const std::vector<float> v = it->second.to_f32();
      std::copy(v.begin(), v.end(), weights.begin() + static_cast<std::ptrdiff_t>(t.offset));
    }
    std::vector<std::pair<std::string, std::vector<float>>> codecs = model.codec_states();
    for (auto& [name, state] : codecs) {
      if (state.empty()) continue;
      const auto it = model_part.tensors.find(codec_prefix + name);
      require(
          it != model_part.tensors.end(),
          "the checkpoint '" + o.resume + "' lacks the activation codec state of '" + name + "'");
      state = it->second.to_f32();
    }
    const long step = std::stol(meta("gpt.step"));
    require(step >= 0 && step <= o.steps, "the checkpoint '" + o.resume + "' is at step " +
                                              std::to_string(step) + ", beyond --steps " +
                                              std::to_string(o.steps));
    opt->from_checkpoint(opt_part);  // throws with nothing changed
    for (const auto& [name, state] : codecs)
      if (!state.empty()) model.load_codec_state(name, state);
    std::copy(weights.begin(), weights.end(), model.params());
    start = step;
  }

  Log log(o.log);
  const bool tty = !o.quiet && isatty(STDERR_FILENO) && &out == &std::cerr;
  std::vector<std::uint8_t> x, y;
  Result r;
  r.param_bytes = model.num_params() * sizeof(float);
  r.grad_bytes = r.param_bytes;
  auto evaluate = [&]() {
    double sum = 0;
    for (long i = 0; i < o.eval_batches; ++i) {
      batch(corpus.val, o.batch, o.block, o.seed, eval_stream, static_cast<std::uint64_t>(i), x, y);
      sum += model.forward(x.data(), y.data(), o.batch, false);
    }
    return sum / static_cast<double>(o.eval_batches);
  };
  if (!o.quiet)
    out << "slimgrad-gpt: " << model.num_params() << " parameters (" << config_text(cfg) << "), "
        << corpus.train.size() << " train / " << corpus.val.size()
        << " validation bytes, optimizer " << o.optimizer << " (" << opt->composition()
        << "), activations " << o.activations << "\n";
  if (start == 0 && o.eval_every > 0 && o.steps > 0) {
    const double v = evaluate();
    r.val_curve.emplace_back(0, v);
    log.row(0, learning_rate(o, 0), NAN, v, NAN);
    if (!o.quiet) out << "step 0: val loss " << std::fixed << std::setprecision(4) << v << "\n";
  }

  std::vector<slimgrad::Param> params;
  for (const TensorInfo& t : opt_tensors)
    params.push_back(
        {t.name, slimgrad::host_view(model.params() + t.offset, t.rows, t.cols),
         slimgrad::host_view<const float>(model.grads() + t.offset, t.rows, model.grad_cols(t))});
  std::vector<double> step_ms;
  const auto t0 = std::chrono::steady_clock::now();
  double last_val = r.val_curve.empty() ? NAN : r.val_curve.back().second;
  for (long it = start; it < o.steps; ++it) {
    const auto s0 = std::chrono::steady_clock::now();
    const double lr = learning_rate(o, it);
    batch(corpus.train, o.batch, o.block, o.seed, train_stream, static_cast<std::uint64_t>(it), x,
          y);
    sync_steps(model, *opt);
    const double loss = model.forward(x.data(), y.data(), o.batch, true);
    model.backward();
    if (it == start) {
      r.saved_activation_bytes = model.linear_saved_bytes() + model.other_saved_bytes();
      r.linear_saved_bytes = model.linear_saved_bytes();
      r.activation_state_bytes = model.linear_state_bytes();
    }
    // Global-norm clipping (torch.nn.utils.clip_grad_norm_: scale by clip/(norm + 1e-6)).
    float* g = model.grads();
    const std::size_t n = model.num_params();
    if (o.clip > 0) {
      double sq = 0;
      for (std::size_t i = 0; i < n; ++i)
        sq += static_cast<double>(g[i]) * static_cast<double>(g[i]);
      const double norm = std::sqrt(sq);
      if (norm > o.clip) {
        const auto scale = static_cast<float>(o.clip / (norm + 1e-6));
        for (std::size_t i = 0; i < n; ++i)
          g[i] *= scale;
      }
    }
    if (o.weight_decay > 0) {
      const auto mult = static_cast<float>(1.0 - lr * o.weight_decay);
      for (const TensorInfo& t : model.tensors())
        if (t.matrix) {
          float* w = model.params() + t.offset;
          for (Index i = 0; i < t.size(); ++i)
            w[i] *= mult;
        }
    }
    opt->set_lr(lr);
    const auto report = opt->step(params);
    if (!report.skipped.empty())
      throw slimgrad::Error("slimgrad: the gradient of '" + report.skipped.front() +
                            "' holds NaN or Inf at step " + std::to_string(it + 1) +
                            " (lower --lr?)");
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s0).count();
    step_ms.push_back(ms);
    r.train_loss = loss;
    const long done = it + 1;
    double val = NAN;
    if ((o.eval_every > 0 && done % o.eval_every == 0) || done == o.steps) {
      val = evaluate();
      last_val = val;
      r.val_curve.emplace_back(done, val);
    }
    log.row(done, lr, loss, val, ms);
    if (tty) {
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double eta =
          elapsed / static_cast<double>(done - start) * static_cast<double>(o.steps - done);
      const int width = 30;
      const int filled = static_cast<int>(width * done / std::max(1L, o.steps));
      out << "\r[" << std::string(static_cast<std::size_t>(filled), '#')
          << std::string(static_cast<std::size_t>(width - filled), '.') << "] " << done << "/"
          << o.steps << " loss " << std::fixed << std::setprecision(4) << loss << " val "
          << last_val << " " << std::setprecision(1) << ms << " ms/step ETA " << duration(eta)
          << "   " << std::flush;
      if (!std::isnan(val)) out << "\n";
    } else if (!o.quiet && !std::isnan(val)) {
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double eta =
          elapsed / static_cast<double>(done - start) * static_cast<double>(o.steps - done);
      out << "step " << done << "/" << o.steps << ": train loss " << std::fixed
          << std::setprecision(4) << loss << ", val loss " << val << ", " << std::setprecision(1)
          << ms << " ms/step, ETA " << duration(eta) << "\n";
    }
  }
  r.steps = o.steps;
  r.val_loss = last_val;
  r.optimizer_state_bytes = opt->state_bytes();
  if (!step_ms.empty()) r.median_step_ms = tools::median(step_ms);

  if (!o.save.empty()) {
    io::TensorFile f = opt->to_checkpoint();
    io::TensorFile model_part;
    for (const TensorInfo& t : model.tensors())
      model_part.add(model_prefix + t.name,
                     io::Tensor::f32({t.rows, t.cols},
                                     std::span<const float>(model.params() + t.offset,
                                                            static_cast<std::size_t>(t.size()))));
    for (const auto& [name, state] : model.codec_states())
      if (!state.empty())
        model_part.add(codec_prefix + name,
                       io::Tensor::f32({static_cast<std::int64_t>(state.size())}, state));
    f.metadata["gpt.format"] = checkpoint_format;
    f.metadata["gpt.activations"] = o.activations;
    f.metadata["gpt.config"] = config_text(cfg);
    f.metadata["gpt.vocab"] = hex(corpus.vocab);
    f.metadata["gpt.optimizer"] = o.optimizer;
    f.metadata["gpt.split_qkv"] = o.split_qkv ? "1" : "0";
    f.metadata["gpt.step"] = std::to_string(o.steps);
    f.metadata["gpt.model_checksum"] = std::to_string(io::checksum(model_part));
    for (auto& [name, t] : model_part.tensors)
      f.add(name, std::move(t));
    io::write(o.save, f);
  }

  // A sample: the first `block` validation bytes as the prompt, then sampling at temperature 1.
  if (o.sample_chars > 0) {
    std::vector<std::uint8_t> ctx(corpus.val.begin(), corpus.val.begin() + o.block);
    for (long i = 0; i < o.sample_chars; ++i) {
      model.forward(ctx.data(), ctx.data(), 1, false);
      const float* p = model.probs_row(o.block - 1);
      const double u =
          static_cast<double>(draw(o.seed, sample_stream, 0, static_cast<std::uint64_t>(i)) >> 11) *
          0x1p-53;
      double acc = 0;
      Index next = cfg.vocab - 1;
      for (Index v = 0; v < cfg.vocab; ++v) {
        acc += static_cast<double>(p[v]);
        if (u < acc) {
          next = v;
          break;
        }
      }
      r.sample += static_cast<char>(corpus.vocab[static_cast<std::size_t>(next)]);
      ctx.erase(ctx.begin());
      ctx.push_back(static_cast<std::uint8_t>(next));
    }
  }
  r.peak_rss_bytes = peak_rss_bytes();
  r.parameters.assign(model.params(), model.params() + model.num_params());

  if (!o.quiet) {
    if (!r.sample.empty()) out << "\n--- sample ---\n" << r.sample << "\n--------------\n";
    out << "memory: parameters " << mib(r.param_bytes) << ", gradients " << mib(r.grad_bytes)
        << ", optimizer state " << mib(r.optimizer_state_bytes) << ", saved activations "
        << mib(r.saved_activation_bytes) << " (linear-layer inputs " << mib(r.linear_saved_bytes)
        << "), peak RSS " << mib(r.peak_rss_bytes) << "\n";
    out << "final: val loss " << std::fixed << std::setprecision(4) << r.val_loss << ", train loss "
        << r.train_loss << ", median step " << std::setprecision(1) << r.median_step_ms << " ms\n";
  }
  if (!o.json.empty()) {
    nlohmann::json j = {{"optimizer", o.optimizer},
                        {"composition", opt->composition()},
                        {"settings", opt->options()},
                        {"activations", o.activations},
                        {"split_qkv", o.split_qkv},
                        {"lr", o.lr},
                        {"val_loss", r.val_loss},
                        {"train_loss", r.train_loss},
                        {"steps", r.steps},
                        {"parameters", model.num_params()},
                        {"param_bytes", r.param_bytes},
                        {"grad_bytes", r.grad_bytes},
                        {"optimizer_state_bytes", r.optimizer_state_bytes},
                        {"saved_activation_bytes", r.saved_activation_bytes},
                        {"linear_saved_activation_bytes", r.linear_saved_bytes},
                        {"activation_codec_state_bytes", r.activation_state_bytes},
                        {"peak_rss_bytes", r.peak_rss_bytes},
                        {"median_step_ms", r.median_step_ms},
                        {"val_curve", r.val_curve},
                        {"sample", r.sample}};
    std::ofstream f(o.json);
    require(f.good(), "cannot write the JSON file '" + o.json + "'");
    f << j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  return r;
}

}  // namespace gpt
