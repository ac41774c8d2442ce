// The fused kernels are bit-identical to the generic engine path: GWT (backend/cpu/gwt_fused.hpp)
// 8-bit Adam (backend/cpu/adam8bit_fused.hpp) and fp32 Adam (backend/cpu/adam_avx512.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <vector>

using namespace slimgrad;

namespace {

template <class W, int L>
void compare(Shape shape, transforms::BoundaryMode mode, double gamma) {
  using Opt = Optimizer<optim::Adam, transforms::Dwt<W, L>, state::Fp32, backend::cpu,
                        residual::WaveletDetails>;
  typename Opt::Options o;
  o.rule = {.lr = 1e-2, .eps = 1e-6, .weight_decay = 0.1, .convention = optim::AdamConvention::hf};
  o.transform.mode = mode;
  o.residual.scale = 0.25;
  o.residual.limiter_gamma = gamma;
  o.fallback.min_size = 0;
  Opt fused(o), generic([&] {
    auto g = o;
    g.fused = false;
    return g;
  }());
  std::vector<float> wf(static_cast<std::size_t>(shape.size())), g(wf.size());
  random::fill_gaussian(host_view(wf.data(), shape.rows, shape.cols), {3, 1, 0}, 0.1);
  auto wg = wf;
  for (std::uint32_t k = 0; k < 6; ++k) {
    // Growing gradients so that the limiter engages.
    random::fill_gaussian(host_view(g.data(), shape.rows, shape.cols), {4, 1, k}, 1.0 + 0.5 * k);
    Param pf{"w", host_view(wf.data(), shape.rows, shape.cols),
             host_view<const float>(g.data(), shape.rows, shape.cols)};
    Param pg{"w", host_view(wg.data(), shape.rows, shape.cols),
             host_view<const float>(g.data(), shape.rows, shape.cols)};
    fused.step(std::span<const Param>(&pf, 1));
    generic.step(std::span<const Param>(&pg, 1));
  }
  INFO(shape.rows << "x" << shape.cols << " levels " << L << " gamma " << gamma);
  CHECK(wf == wg);
  CHECK(io::serialize(fused.to_checkpoint()) != std::vector<std::byte>{});
}

// Steps an optimizer with the fused kernels and one without (`fused` off) side by side over
// tensors of the given shapes (weights from key {seed, 1, 0}, gradients from {seed + 1, i, k},
// one zero gradient among non-zero ones at step 2) and checks that weights and state agree bit
// for bit and that the weights moved.
template <class Opt>
void fused_equals_generic(const typename Opt::Options& o, std::vector<Shape> shapes,
                          std::uint32_t seed) {
  auto go = o;
  go.fused = false;
  Opt fused(o), generic(go);
  std::vector<std::string> names;
  std::vector<std::vector<float>> wf, g;
  for (const Shape& s : shapes) {
    names.push_back("p" + std::to_string(names.size()));
    wf.emplace_back(static_cast<std::size_t>(s.size()));
    random::fill_gaussian(host_view(wf.back().data(), s.rows, s.cols), {seed, 1, 0}, 0.1);
    g.emplace_back(wf.back().size());
  }
  const auto w0 = wf;
  auto wg = wf;
  for (std::uint32_t k = 0; k < 5; ++k) {
    std::vector<Param> pf, pg;
    for (std::size_t i = 0; i < shapes.size(); ++i) {
      const Shape s = shapes[i];
      random::fill_gaussian(host_view(g[i].data(), s.rows, s.cols),
                            {seed + 1, static_cast<std::uint32_t>(i), k}, 1e-3 * (k + 1));
      if (k == 2) g[i][3] = 0.0f;
      pf.push_back({names[i], host_view(wf[i].data(), s.rows, s.cols),
                    host_view<const float>(g[i].data(), s.rows, s.cols)});
      pg.push_back({names[i], host_view(wg[i].data(), s.rows, s.cols),
                    host_view<const float>(g[i].data(), s.rows, s.cols)});
    }
    fused.step(pf);
    generic.step(pg);
  }
  CHECK(wf == wg);
  CHECK(io::serialize(fused.to_checkpoint()) == io::serialize(generic.to_checkpoint()));
  CHECK(wf != w0);  // the weights moved
}

}  // namespace

TEST_CASE("fused GWT equals the generic path bit for bit") {
  using transforms::BoundaryMode;
  for (double gamma : {0.0, 1.01}) {
    // Rows of a multiple of 2^L take the AVX-512 Haar rows where the processor has AVX-512
    // (gwt_haar_avx512.hpp): whole vectors, partial last vectors at every level (200: 100, 50;
    // 776: 388, 194, 97) and three levels.
    compare<transforms::Haar, 2>({48, 64}, BoundaryMode::zero, gamma);
    compare<transforms::Haar, 2>({7, 200}, BoundaryMode::zero, gamma);
    // Two levels take blocks of 64 samples in registers: a half block last (96, 1376 as in
    // LLaMA's MLP) and a row shorter than one block (36).
    compare<transforms::Haar, 2>({9, 96}, BoundaryMode::zero, gamma);
    compare<transforms::Haar, 2>({3, 1376}, BoundaryMode::zero, gamma);
    compare<transforms::Haar, 2>({4, 36}, BoundaryMode::periodization, gamma);
    compare<transforms::Haar, 3>({5, 776}, BoundaryMode::periodization, gamma);
    compare<transforms::Haar, 2>({33, 37}, BoundaryMode::zero, gamma);
    compare<transforms::Haar, 3>({20, 129}, BoundaryMode::periodization, gamma);
    compare<transforms::Db2, 2>({16, 45}, BoundaryMode::zero, gamma);
    compare<transforms::Db4, 1>({9, 70}, BoundaryMode::periodization, gamma);
  }
}

TEST_CASE("fused GWT skips a non-finite gradient without touching anything") {
  auto o = recipes::gwt_options();
  o.fallback.min_size = 0;
  recipes::Gwt<> opt(o);
  std::vector<float> w(24 * 40, 0.5f), g(w.size(), 0.1f);
  Param p{"w", host_view(w.data(), 24, 40), host_view<const float>(g.data(), 24, 40)};
  opt.step(std::span<const Param>(&p, 1));
  const auto before_w = w;
  const auto before_state = io::serialize(opt.to_checkpoint());
  g[517] = NAN;
  const auto rep = opt.step(std::span<const Param>(&p, 1));
  CHECK(rep.skipped.size() == 1);
  CHECK(w == before_w);
  CHECK(io::serialize(opt.to_checkpoint()) == before_state);
}

TEST_CASE("fused 8-bit Adam equals the generic path bit for bit (weights, codes, absmax)") {
  if (!cpu::q8::adam_fused_supported()) MESSAGE("no AVX-512 here: both runs take the generic path");
  for (auto convention :
       {optim::AdamConvention::bnb, optim::AdamConvention::torch, optim::AdamConvention::hf}) {
    auto o = recipes::adam8bit_options();
    o.rule.convention = convention;
    o.rule.weight_decay = 0.1;
    o.store.min_8bit_size = 0;
    INFO("convention " << static_cast<int>(convention));
    // 37×300: 43 whole blocks of 256 and a partial one, blocks straddling rows.
    fused_equals_generic<recipes::Adam8bit<>>(o, {{37, 300}, {8, 256}, {1, 100}}, 5);
  }
}

TEST_CASE("fused fp32 Adam equals the generic path bit for bit") {
  if (!cpu::avx512::supported()) MESSAGE("no AVX-512 here: both runs take the generic path");
  for (auto convention :
       {optim::AdamConvention::torch, optim::AdamConvention::hf, optim::AdamConvention::bnb}) {
    auto o = recipes::adamw_options();
    o.rule.convention = convention;
    o.rule.weight_decay = 0.1;
    INFO("convention " << static_cast<int>(convention));
    // 37×300: a partial last vector; 40×1000: several parallel chunks (prefetch up to the end);
    // 1×5: a partial vector alone.
    fused_equals_generic<recipes::AdamW<>>(o, {{37, 300}, {40, 1000}, {1, 5}}, 7);
  }
}
