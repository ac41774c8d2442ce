// A two-layer network on real text (tinyshakespeare), trained with each activation codec: the
// compressed runs must reach the exact-gradient run's held-out loss within 0.3 nats.
//
// Model: the previous 4 characters, each through a fixed random 16-dim embedding, concatenated
// (64 features) → Linear 64→128 → tanh → Linear 128→vocab → softmax cross-entropy. Both linear
// layers are activation::Linear with the codec under test; biases are trained too. Exact and
// VeLoRA runs use AdamW (λ 0); the CompAct run uses the `compact` recipe on the m×r gradients.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

using namespace slimgrad;

namespace {

constexpr index_t context = 4, embed = 16, in1 = context * embed, hidden = 128;
constexpr index_t batch = 128, steps = 300, eval_tokens = 2048;

std::string read_text() {
  // The shared data directory: next to the repository (CI: ../shared) or /work/shared.
  const std::filesystem::path repo = std::filesystem::path(SLIMGRAD_TEST_DATA_DIR) / ".." / "..";
  for (const auto& p : {repo / ".." / "shared" / "data" / "tinyshakespeare.txt",
                        std::filesystem::path("/work/shared/data/tinyshakespeare.txt")}) {
    std::ifstream f(p, std::ios::binary);
    if (f) return std::string(std::istreambuf_iterator<char>(f), {});
  }
  return {};
}

struct Data {
  std::vector<int> ids;
  index_t vocab = 0;
  std::vector<float> table;  // vocab × embed, fixed
};

Data load() {
  const std::string text = read_text();
  REQUIRE_MESSAGE(text.size() > 100000, "tinyshakespeare.txt not found next to the repository");
  Data d;
  std::vector<int> map(256, -1);
  for (char c : text)
    map[static_cast<unsigned char>(c)] = 0;
  for (int& m : map)
    if (m == 0) m = static_cast<int>(d.vocab++);
  d.ids.reserve(text.size());
  for (char c : text)
    d.ids.push_back(map[static_cast<unsigned char>(c)]);
  d.table.resize(static_cast<std::size_t>(d.vocab * embed));
  random::fill_gaussian(host_view(d.table.data(), d.vocab, embed), {2024, 1, 0}, 1.0);
  return d;
}

// X rows and targets for the positions `pos` (each ≥ context).
void gather(const Data& d, const std::vector<std::size_t>& pos, std::vector<float>& x,
            std::vector<int>& target) {
  x.resize(pos.size() * in1);
  target.resize(pos.size());
  for (std::size_t t = 0; t < pos.size(); ++t) {
    for (index_t c = 0; c < context; ++c) {
      const int id = d.ids[pos[t] - static_cast<std::size_t>(context - c)];
      std::copy_n(d.table.begin() + id * embed, embed,
                  x.begin() + static_cast<std::ptrdiff_t>(t) * in1 + c * embed);
    }
    target[t] = d.ids[pos[t]];
  }
}

// Mean cross-entropy of logits (rows × vocab); writes dlogits = (softmax − onehot)/rows if given.
double cross_entropy(std::vector<float>& logits, const std::vector<int>& target, index_t vocab,
                     bool grad) {
  double loss = 0;
  const std::size_t rows = target.size();
  for (std::size_t t = 0; t < rows; ++t) {
    float* l = logits.data() + static_cast<index_t>(t) * vocab;
    const float mx = *std::max_element(l, l + vocab);
    double sum = 0;
    for (index_t j = 0; j < vocab; ++j)
      sum += std::exp(double(l[j]) - mx);
    loss += std::log(sum) + mx - l[target[t]];
    if (grad) {
      for (index_t j = 0; j < vocab; ++j)
        l[j] = static_cast<float>(std::exp(double(l[j]) - mx) / sum / double(rows));
      l[target[t]] -= 1.0f / static_cast<float>(rows);
    }
  }
  return loss / static_cast<double>(rows);
}

// Trains with codec `s` and returns the held-out loss.
double train(const Data& d, const activation::Settings& s) {
  const index_t vocab = d.vocab;
  activation::AnyLinear l1("fc1.weight", in1, hidden, s), l2("fc2.weight", hidden, vocab, s);
  std::vector<float> w1(static_cast<std::size_t>(hidden * in1)),
      w2(static_cast<std::size_t>(vocab * hidden)), b1(static_cast<std::size_t>(hidden), 0.0f),
      b2(static_cast<std::size_t>(vocab), 0.0f);
  random::fill_gaussian(host_view(w1.data(), hidden, in1), {7, 1, 0}, 1.0 / std::sqrt(in1));
  random::fill_gaussian(host_view(w2.data(), vocab, hidden), {7, 2, 0}, 1.0 / std::sqrt(hidden));
  const Shape g1s = l1.grad_shape(), g2s = l2.grad_shape();
  std::vector<float> g1(static_cast<std::size_t>(g1s.size())),
      g2(static_cast<std::size_t>(g2s.size())), gb1(b1.size()), gb2(b2.size());

  const bool compact = s.kind == activation::Kind::compact;
  recipes::AdamW<>::Options ao;
  ao.rule.lr = 3e-3;
  ao.rule.weight_decay = 0;
  recipes::AdamW<> adam(ao);
  recipes::CompAct<>::Options co = recipes::compact_options();
  co.transform = s.compact;
  co.fallback.min_size = 0;
  recipes::CompAct<> comp(co);

  const std::size_t train_end = d.ids.size() * 9 / 10;
  std::vector<float> x, h, a, logits, dlogits, dh;
  std::vector<int> target;
  std::vector<std::size_t> pos(batch);
  std::uint64_t rng = 0x9e3779b97f4a7c15ull;
  auto next = [&](std::size_t lo, std::size_t hi) {  // xorshift: the same batches for each codec
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return lo + static_cast<std::size_t>(rng % (hi - lo));
  };
  auto forward = [&](index_t rows, bool training) {
    h.resize(static_cast<std::size_t>(rows * hidden));
    logits.resize(static_cast<std::size_t>(rows * vocab));
    const auto xv = host_view(static_cast<const float*>(x.data()), rows, in1);
    const auto w1v = host_view(static_cast<const float*>(w1.data()), hidden, in1);
    const auto b1v = host_view(static_cast<const float*>(b1.data()), 1, hidden);
    const auto w2v = host_view(static_cast<const float*>(w2.data()), vocab, hidden);
    const auto b2v = host_view(static_cast<const float*>(b2.data()), 1, vocab);
    training ? l1.forward(xv, w1v, b1v, host_view(h.data(), rows, hidden))
             : l1.infer(xv, w1v, b1v, host_view(h.data(), rows, hidden));
    a = h;
    for (float& e : a)
      e = std::tanh(e);
    const auto av = host_view(static_cast<const float*>(a.data()), rows, hidden);
    training ? l2.forward(av, w2v, b2v, host_view(logits.data(), rows, vocab))
             : l2.infer(av, w2v, b2v, host_view(logits.data(), rows, vocab));
  };

  for (index_t k = 0; k < steps; ++k) {
    l1.set_step(comp.step_count("fc1.weight"));
    l2.set_step(comp.step_count("fc2.weight"));
    for (auto& p : pos)
      p = next(static_cast<std::size_t>(context), train_end);
    gather(d, pos, x, target);
    forward(batch, true);
    cross_entropy(logits, target, vocab, true);
    std::fill(g1.begin(), g1.end(), 0.0f);
    std::fill(g2.begin(), g2.end(), 0.0f);
    std::fill(gb1.begin(), gb1.end(), 0.0f);
    std::fill(gb2.begin(), gb2.end(), 0.0f);
    dh.resize(static_cast<std::size_t>(batch * hidden));
    l2.backward(host_view(static_cast<const float*>(logits.data()), batch, vocab),
                host_view(static_cast<const float*>(w2.data()), vocab, hidden),
                host_view(dh.data(), batch, hidden), host_view(g2.data(), g2s.rows, g2s.cols),
                host_view(gb2.data(), 1, vocab));
    for (std::size_t i = 0; i < dh.size(); ++i)
      dh[i] *= 1.0f - a[i] * a[i];
    l1.backward(host_view(static_cast<const float*>(dh.data()), batch, hidden),
                host_view(static_cast<const float*>(w1.data()), hidden, in1), {},
                host_view(g1.data(), g1s.rows, g1s.cols), host_view(gb1.data(), 1, hidden));
    const Param params[] = {
        {"fc1.weight", host_view(w1.data(), hidden, in1), host_view(g1.data(), g1s.rows, g1s.cols)},
        {"fc2.weight", host_view(w2.data(), vocab, hidden),
         host_view(g2.data(), g2s.rows, g2s.cols)},
        {"fc1.bias", host_view(b1.data(), 1, hidden), host_view(gb1.data(), 1, hidden)},
        {"fc2.bias", host_view(b2.data(), 1, vocab), host_view(gb2.data(), 1, vocab)}};
    compact ? comp.step(params) : adam.step(params);
  }
  // Held-out loss on fixed positions of the last tenth.
  std::vector<std::size_t> eval(static_cast<std::size_t>(eval_tokens));
  for (std::size_t i = 0; i < eval.size(); ++i)
    eval[i] = train_end + context + i * 37 % (d.ids.size() - train_end - context);
  gather(d, eval, x, target);
  forward(eval_tokens, false);
  return cross_entropy(logits, target, vocab, false);
}

}  // namespace

TEST_CASE("two-layer network on tinyshakespeare: each codec near the exact-gradient loss") {
  const Data d = load();
  activation::Settings s;
  s.kind = activation::Kind::none;
  const double exact = train(d, s);
  s.kind = activation::Kind::velora;
  // D' = 2 for fc1 (64 features), 4 for fc2 (128). The inputs here are nearly isotropic (random
  // embeddings, tanh features), the hardest case for a rank-1 sub-token code: at D' = 8/16
  // (groups 8) the held-out loss is 3.26, at D' = 4/8 2.95 (measured 2026-11-22).
  s.velora.groups = 32;
  const double velora = train(d, s);
  s.kind = activation::Kind::compact;
  s.compact.ratio = 0.25;  // r = n/4
  s.compact.update_gap = 50;
  const double compact = train(d, s);
  s.compact.sketch = transforms::Sketch::count;
  const double count = train(d, s);
  MESSAGE("held-out loss after " << steps << " steps: exact " << exact << ", velora " << velora
                                 << ", compact " << compact << ", compact with a count sketch "
                                 << count << " (ln vocab " << std::log(d.vocab) << ")");
  // Measured: exact 2.571, velora 2.814, compact 2.789 (2.777 with the count sketch). A wrong
  // weight gradient (e.g. a P that differs between the layer and the optimizer: 6.04 with another
  // seed) leaves it above 3.3.
  CHECK(exact < 2.6);  // well beyond the unigram entropy (about 3.3 nats)
  CHECK(velora < exact + 0.3);
  CHECK(compact < exact + 0.3);
  CHECK(count < exact + 0.3);
}
