// examples/gpt (slimgrad-gpt): the hand-written backward pass against central finite differences
// in double precision, the float model against the double one, bit-exact resume from a
// checkpoint, and the bad-input sentences.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <slimgrad/slimgrad.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "activations.hpp"
#include "model.hpp"
#include "registry.hpp"
#include "trainer.hpp"

namespace {

using gpt::Config;
using gpt::Index;
using gpt::Model;

Config tiny() {
  Config c;
  c.vocab = 7;
  c.block = 5;
  c.layers = 2;
  c.heads = 2;
  c.width = 8;
  return c;
}

// Deterministic tokens and a non-trivial parameter point (LayerNorm gains away from 1, weights
// large enough that attention is not uniform).
void prepare(Model<double>& m, std::vector<std::uint8_t>& x, std::vector<std::uint8_t>& y,
             Index B) {
  m.init(7);
  const slimgrad::random::Key key{11, 0, 0};
  for (std::size_t i = 0; i < m.num_params(); ++i)
    m.params()[i] += static_cast<double>(slimgrad::random::gaussian(key, i, 0.4));
  const Index N = B * m.config().block;
  for (Index i = 0; i < N; ++i) {
    x.push_back(static_cast<std::uint8_t>((i * 5 + 3) % m.config().vocab));
    y.push_back(static_cast<std::uint8_t>((i * 3 + 1) % m.config().vocab));
  }
}

}  // namespace

TEST_CASE("gpt: backward matches central finite differences (double)") {
  Model<double> m(tiny());
  std::vector<std::uint8_t> x, y;
  const Index B = 2;
  prepare(m, x, y, B);
  m.forward(x.data(), y.data(), B);
  m.backward();
  const std::vector<double> g(m.grads(), m.grads() + m.num_params());
  double worst = 0;
  std::string where;
  const double h = 1e-5;
  for (const gpt::TensorInfo& t : m.tensors()) {
    double gmax = 0;
    for (Index i = 0; i < t.size(); ++i)
      gmax = std::max(gmax, std::abs(g[t.offset + static_cast<std::size_t>(i)]));
    CHECK_MESSAGE(gmax > 1e-4, t.name << " has a vanishing gradient: the check would be vacuous");
    for (Index i = 0; i < t.size(); ++i) {
      double& p = m.params()[t.offset + static_cast<std::size_t>(i)];
      const double keep = p;
      p = keep + h;
      const double lp = m.forward(x.data(), y.data(), B, false);
      p = keep - h;
      const double lm = m.forward(x.data(), y.data(), B, false);
      p = keep;
      const double fd = (lp - lm) / (2 * h);
      const double err =
          std::abs(fd - g[t.offset + static_cast<std::size_t>(i)]) / (1e-6 + std::abs(fd));
      if (err > worst) {
        worst = err;
        where = t.name + "[" + std::to_string(i) + "]";
      }
    }
  }
  INFO("worst relative error at " << where);
  CHECK(worst < 1e-5);
}

TEST_CASE("gpt: the float model computes the double model's loss and gradients") {
  Model<double> md(tiny());
  Model<float> mf(tiny());
  std::vector<std::uint8_t> x, y;
  const Index B = 3;
  prepare(md, x, y, B);
  for (std::size_t i = 0; i < md.num_params(); ++i)
    mf.params()[i] = static_cast<float>(md.params()[i]);
  for (std::size_t i = 0; i < md.num_params(); ++i)
    md.params()[i] = static_cast<double>(mf.params()[i]);
  const double ld = md.forward(x.data(), y.data(), B);
  const double lf = mf.forward(x.data(), y.data(), B);
  CHECK(std::abs(ld - lf) < 1e-5);
  md.backward();
  mf.backward();
  double gmax = 0, dmax = 0;
  for (std::size_t i = 0; i < md.num_params(); ++i) {
    gmax = std::max(gmax, std::abs(md.grads()[i]));
    dmax = std::max(dmax, std::abs(md.grads()[i] - static_cast<double>(mf.grads()[i])));
  }
  CHECK(dmax < 1e-5 * gmax + 1e-7);
}

namespace {

struct TempDir {
  std::filesystem::path dir;
  TempDir() {
    dir = std::filesystem::temp_directory_path() /
          ("slimgrad_gpt_test_" + std::to_string(reinterpret_cast<std::uintptr_t>(this)));
    std::filesystem::create_directories(dir);
  }
  ~TempDir() { std::filesystem::remove_all(dir); }
  std::string file(const std::string& name, const std::string& text) const {
    const auto p = dir / name;
    std::ofstream(p, std::ios::binary) << text;
    return p.string();
  }
};

// A few kilobytes of English (varied enough that a batch is not trivially predictable).
std::string text() {
  const char* lines[] = {
      "The quick brown fox jumps over the lazy dog.\n", "Sphinx of black quartz, judge my vow!\n",
      "How vexingly quick daft zebras jump.\n", "Pack my box with five dozen liquor jugs.\n"};
  std::string s;
  for (int i = 0; i < 60; ++i)
    s += lines[(i * 7 + i / 3) % 4];
  return s;
}

gpt::Options small(const std::string& data) {
  gpt::Options o;
  o.data = data;
  o.layers = 1;
  o.heads = 2;
  o.width = 16;
  o.block = 8;
  o.batch = 4;
  o.steps = 6;
  o.warmup = 2;
  o.eval_every = 0;
  o.eval_batches = 2;
  o.sample_chars = 0;
  o.quiet = true;
  return o;
}

std::string error_of(const gpt::Options& o) {
  std::ostringstream sink;
  try {
    gpt::train(o, sink);
  } catch (const slimgrad::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("gpt: resume from a checkpoint is bit-exact") {
  TempDir tmp;
  const std::string data = tmp.file("text.txt", text());
  struct Recipe {
    const char* name;
    std::vector<std::string> sets;
  };
  const Recipe recipes[] = {{"adamw", {}},
                            {"adamw+velora", {}},
                            {"gwt", {"levels=1"}},
                            {"galore", {"rank=4", "update_gap=2"}},
                            {"adam8bit", {}}};
  for (const Recipe& rc : recipes) {
    INFO(rc.name);
    std::ostringstream sink;
    gpt::Options full = small(data);
    const std::string name = rc.name;
    full.optimizer = name.substr(0, name.find('+'));
    if (name.ends_with("+velora")) {
      full.activations = "velora";  // v is learned from the first batch: it must be saved
      full.activation_sets = {"subtoken=4", "init=once"};
    }
    full.sets = rc.sets;
    const gpt::Result a = gpt::train(full, sink);

    gpt::Options first = full;
    first.steps = 3;
    first.decay_steps = full.steps;
    first.save = (tmp.dir / "ckpt.safetensors").string();
    const gpt::Result half = gpt::train(first, sink);
    gpt::Options second = full;
    second.resume = first.save;
    const gpt::Result b = gpt::train(second, sink);
    REQUIRE(a.parameters.size() == b.parameters.size());
    CHECK(a.parameters == b.parameters);
    CHECK(half.parameters != a.parameters);
    CHECK(a.train_loss == b.train_loss);
    CHECK(a.val_loss == b.val_loss);
  }
}

TEST_CASE("gpt: training lowers the loss and reports its memory") {
  TempDir tmp;
  gpt::Options o = small(tmp.file("text.txt", text()));
  o.steps = 40;
  o.lr = 1e-2;
  o.eval_every = 20;
  std::ostringstream sink;
  const gpt::Result r = gpt::train(o, sink);
  REQUIRE(r.val_curve.size() == 3);
  CHECK(r.val_curve.back().second < r.val_curve.front().second - 0.5);
  const std::size_t n = r.parameters.size();
  CHECK(r.param_bytes == n * 4);
  // adamw: fp32 m and v for every parameter, a step counter per tensor (2 + 6 + 1 tensors).
  CHECK(r.optimizer_state_bytes == n * 8 + 9 * 8);
  // Linear inputs of one block: qkv and c_proj take N×C, c_fc N×C, mlp c_proj N×4C.
  CHECK(r.linear_saved_bytes == static_cast<std::size_t>(4 * 8 * (16 + 16 + 16 + 64) * 4));
  CHECK(r.saved_activation_bytes > r.linear_saved_bytes);
}

TEST_CASE("gpt: bad input fails with one clear sentence") {
  TempDir tmp;
  const std::string data = tmp.file("text.txt", text());
  auto contains = [](const std::string& s, const std::string& part) {
    INFO(s);
    CHECK(s.find(part) != std::string::npos);
  };
  gpt::Options o = small((tmp.dir / "missing.txt").string());
  contains(error_of(o), "does not exist");
  o.data = tmp.file("empty.txt", "");
  contains(error_of(o), "is empty");
  o = small(data);
  o.block = 1000;
  contains(error_of(o), "too short for --block 1000");
  o = small(data);
  o.width = 10;
  o.heads = 4;
  contains(error_of(o), "--width (10) must be a positive multiple of --heads (4)");
  o = small(data);
  o.optimizer = "sgdx";
  contains(error_of(o), "unknown optimizer 'sgdx'");
  o = small(data);
  o.sets = {"ranks=3"};
  contains(error_of(o), "unknown option 'ranks'");

  // A checkpoint of another model, of another optimizer, and a file that is no checkpoint.
  o = small(data);
  o.save = (tmp.dir / "a.safetensors").string();
  std::ostringstream sink;
  gpt::train(o, sink);
  gpt::Options wider = small(data);
  wider.width = 32;
  wider.resume = o.save;
  contains(error_of(wider), "is of another model");
  gpt::Options other = small(data);
  other.optimizer = "adafactor";
  other.resume = o.save;
  contains(error_of(other), "holds adamw state, this run uses adafactor");
  gpt::Options junk = small(data);
  junk.resume = data;
  CHECK(error_of(junk) != "(no error)");
}

TEST_CASE("gpt: VeLoRA projections save subtoken-times fewer bytes and still train") {
  TempDir tmp;
  gpt::Options o = small(tmp.file("text.txt", text()));
  o.steps = 40;
  o.lr = 1e-2;
  o.eval_every = 20;
  o.activations = "velora";
  o.activation_sets = {"subtoken=4"};
  std::ostringstream sink;
  const gpt::Result r = gpt::train(o, sink);
  REQUIRE(r.val_curve.size() == 3);
  CHECK(r.val_curve.back().second < r.val_curve.front().second - 0.5);
  // 4 projections of one block, N = 4·8 tokens, in = 16, 16, 16, 64: in/4 floats per token.
  CHECK(r.linear_saved_bytes == static_cast<std::size_t>(4 * 8 * (16 + 16 + 16 + 64) / 4 * 4));
  CHECK(r.activation_state_bytes == static_cast<std::size_t>(4 * 4 * 4));  // v: 4 floats each

  auto message = [&](const std::string& kind, std::vector<std::string> sets) {
    gpt::Options bad = small(o.data);
    bad.activations = kind;
    bad.activation_sets = std::move(sets);
    return error_of(bad);
  };
  CHECK(message("velora", {"subtoken=3"}).find("does not divide the input width 16") !=
        std::string::npos);
  CHECK(message("velora", {"rank=3"}).find("unknown --act-set key 'rank'") != std::string::npos);
  CHECK(message("lowrank", {}).find("unknown --activations 'lowrank'") != std::string::npos);
  CHECK(message("compact", {}).find("needs --optimizer compact") != std::string::npos);
}

TEST_CASE("gpt: CompAct projections hand the compact recipe m×r gradients and still train") {
  TempDir tmp;
  gpt::Options o = small(tmp.file("text.txt", text()));
  o.steps = 40;
  o.lr = 1e-2;
  o.eval_every = 20;
  o.optimizer = "compact";
  o.sets = {"update_gap=10"};
  o.activations = "compact";
  std::ostringstream sink;
  const gpt::Result r = gpt::train(o, sink);
  REQUIRE(r.val_curve.size() == 3);
  CHECK(r.val_curve.back().second < r.val_curve.front().second - 0.5);
  // c_attn, c_fc (in 16 → r 4) and mlp.c_proj (in 64 → r 16) keep N×r floats; attn.o_proj
  // keeps its whole N×16 input.
  CHECK(r.linear_saved_bytes == static_cast<std::size_t>(4 * 8 * (4 + 16 + 4 + 16) * 4));

  // Resume is bit-exact with CompAct too (P is regenerated from seed and step).
  gpt::Options full = o;
  full.steps = 6;
  full.eval_every = 0;
  const gpt::Result a = gpt::train(full, sink);
  gpt::Options first = full;
  first.steps = 3;
  first.decay_steps = 6;
  first.save = (tmp.dir / "c.safetensors").string();
  gpt::train(first, sink);
  gpt::Options second = full;
  second.resume = first.save;
  CHECK(gpt::train(second, sink).parameters == a.parameters);
}

TEST_CASE("gpt: after a skipped step, each CompAct layer projects with the optimizer's P") {
  // The first step's gradient of one projection holds a NaN: the optimizer skips that weight
  // (its count stays 0) and steps the others. With update_gap 1, P changes at every step, so the
  // skipped layer's next compressed gradient must use epoch 0's P, which the optimizer will use
  // for that weight, and not the trainer's iteration's (1).
  namespace tools = slimgrad::tools;
  Config c = tiny();
  c.layers = 1;
  c.width = 16;
  const Index B = 2;
  Model<float> m(c);
  m.init(5);
  Model<float> exact(c);  // the same weights, exact layers: full weight gradients
  auto opt = tools::make_optimizer("compact", {{"update_gap", "1"}});
  const auto settings = opt->options();
  gpt::configure_activations(m, "compact", {}, 5, settings);
  gpt::set_roles(m, *opt);
  std::vector<std::uint8_t> x, y;
  for (Index i = 0; i < B * c.block; ++i) {
    x.push_back(static_cast<std::uint8_t>((i * 5 + 3) % c.vocab));
    y.push_back(static_cast<std::uint8_t>((i * 3 + 1) % c.vocab));
  }
  std::vector<slimgrad::Param> params;
  for (const gpt::TensorInfo& t : m.tensors())
    params.push_back(
        {t.name, slimgrad::host_view(m.params() + t.offset, t.rows, t.cols),
         slimgrad::host_view<const float>(m.grads() + t.offset, t.rows, m.grad_cols(t))});
  const std::string skipped = "h.0.mlp.c_fc", stepped = "h.0.attn.c_attn";
  gpt::sync_steps(m, *opt);
  m.forward(x.data(), y.data(), B, true);
  m.backward();
  m.grads()[m.info(skipped).offset + 3] = NAN;
  const slimgrad::StepReport report = opt->step(params);
  REQUIRE(report.skipped == std::vector<std::string>{skipped});
  CHECK(opt->step_count(skipped) == 0);
  CHECK(opt->step_count(stepped) == 1);
  // attn.o_proj took the compact recipe's full path: plain Adam state on its full gradient.
  CHECK_FALSE(opt->is_compressed("h.0.attn.o_proj"));
  CHECK(opt->is_compressed(stepped));

  gpt::sync_steps(m, *opt);
  m.forward(x.data(), y.data(), B, true);
  m.backward();
  std::copy(m.params(), m.params() + m.num_params(), exact.params());
  exact.forward(x.data(), y.data(), B, true);
  exact.backward();

  // Ĝ = G Pᵀ with the P of `step`, G the exact model's full gradient.
  slimgrad::activation::CompAct::Options co;
  co.rank = std::stol(settings.at("rank"));
  co.ratio = std::stod(settings.at("ratio"));
  co.update_gap = std::stol(settings.at("update_gap"));
  co.seed = std::stoull(settings.at("seed"));
  co.keep_matrix = settings.at("keep_matrix") == "true";
  auto projected = [&](const std::string& name, std::int64_t step) {
    const gpt::TensorInfo& t = m.info(name);
    slimgrad::activation::Linear<slimgrad::activation::CompAct> ref(name, t.cols, t.rows, co);
    ref.set_step(step);
    auto projection = ref.codec().projection();
    const Index r = ref.grad_shape().cols;
    std::vector<float> out(static_cast<std::size_t>(t.rows * r));
    projection.times_transpose(
        ref.codec().state(),
        slimgrad::host_view<const float>(exact.grads() + t.offset, t.rows, t.cols),
        slimgrad::host_view(out.data(), t.rows, r));
    return out;
  };
  // Largest difference between the layer's Ĝ and `want`, relative to want's largest entry.
  auto mismatch = [&](const std::string& name, const std::vector<float>& want) {
    const float* got = m.grads() + m.info(name).offset;
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      diff = std::max(diff, std::abs(static_cast<double>(got[i]) - want[i]));
      scale = std::max(scale, std::abs(static_cast<double>(want[i])));
    }
    REQUIRE(scale > 0);
    return diff / scale;
  };
  CHECK(mismatch(skipped, projected(skipped, opt->step_count(skipped))) < 1e-4);
  CHECK(mismatch(stepped, projected(stepped, opt->step_count(stepped))) < 1e-4);
  // The check tells the two P apart: the trainer's iteration would have given epoch 1's.
  CHECK(mismatch(skipped, projected(skipped, 1)) > 0.1);
}

TEST_CASE("gpt: only a recipe with a full path takes one") {
  auto adamw = slimgrad::tools::make_optimizer("adamw", {});
  CHECK_FALSE(adamw->has_full_path());
  CHECK_THROWS_WITH_AS(adamw->set_full_path("h.0.attn.o_proj"),
                       doctest::Contains("has no full path"), slimgrad::Error);
  CHECK(slimgrad::tools::make_optimizer("compact", {})->has_full_path());
}

TEST_CASE("gpt: --split-qkv steps q, k and v of attn.c_attn as three tensors") {
  Config c = tiny();
  Model<float> m(c);
  const std::vector<gpt::TensorInfo> whole = gpt::optimizer_tensors(m, false);
  const std::vector<gpt::TensorInfo> split = gpt::optimizer_tensors(m, true);
  REQUIRE(whole.size() == m.tensors().size());
  REQUIRE(split.size() == whole.size() + 2 * static_cast<std::size_t>(c.layers));
  std::size_t covered = 0;  // the parts tile the flat buffer exactly as the tensors do
  for (const gpt::TensorInfo& t : split) {
    CHECK(t.offset == covered);
    covered += static_cast<std::size_t>(t.size());
  }
  CHECK(covered == m.num_params());
  const auto q = std::find_if(split.begin(), split.end(), [](const gpt::TensorInfo& t) {
    return t.name == "h.1.attn.c_attn.q";
  });
  REQUIRE(q != split.end());
  CHECK(q->rows == c.width);
  CHECK(q->cols == c.width);
  CHECK(q->compressible);
  CHECK((q + 1)->name == "h.1.attn.c_attn.k");
  CHECK((q + 2)->name == "h.1.attn.c_attn.v");
  CHECK((q + 2)->offset == q->offset + 2 * static_cast<std::size_t>(c.width * c.width));

  TempDir tmp;
  const std::string data = tmp.file("text.txt", text());
  std::ostringstream sink;
  // Adam is element-wise: the split changes nothing but the tensor names.
  gpt::Options o = small(data);
  const gpt::Result adam = gpt::train(o, sink);
  o.split_qkv = true;
  const gpt::Result adam_split = gpt::train(o, sink);
  CHECK(adam.parameters == adam_split.parameters);
  // APOLLO-Mini's tensor-wise scale and limiter are per tensor: the split changes the steps, and
  // each of the two extra tensors per layer holds a step count, Philox seed and epoch, its 1×C
  // projection and a limiter norm.
  o = small(data);
  o.optimizer = "apollo-mini";
  o.sets = {"scale_front=true"};
  const gpt::Result mini = gpt::train(o, sink);
  o.split_qkv = true;
  const gpt::Result mini_split = gpt::train(o, sink);
  CHECK(mini.parameters != mini_split.parameters);
  CHECK(mini_split.optimizer_state_bytes ==
        mini.optimizer_state_bytes + 2 * static_cast<std::size_t>(o.layers) *
                                         static_cast<std::size_t>(8 + 16 + 4 * o.width + 4));
  // Resume is bit-exact with the split, and a checkpoint must be resumed the way it was trained.
  gpt::Options first = o;
  first.steps = 3;
  first.decay_steps = o.steps;
  first.save = (tmp.dir / "split.safetensors").string();
  gpt::train(first, sink);
  gpt::Options second = o;
  second.resume = first.save;
  CHECK(gpt::train(second, sink).parameters == mini_split.parameters);
  second.split_qkv = false;
  CHECK(error_of(second).find("was trained with --split-qkv") != std::string::npos);
  // CompAct's weight gradients are m×r: they cannot be cut into q, k and v.
  gpt::Options compact = small(data);
  compact.optimizer = "compact";
  compact.activations = "compact";
  compact.split_qkv = true;
  CHECK(error_of(compact).find("--split-qkv needs full weight gradients") != std::string::npos);
}
