// The fused GWT kernel (backend/cpu/gwt_fused.hpp) is bit-identical to the generic engine path.
#include <doctest/doctest.h>

#include <cmath>
#include <slimgrad/slimgrad.hpp>
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

}  // namespace

TEST_CASE("fused GWT equals the generic path bit for bit") {
  using transforms::BoundaryMode;
  for (double gamma : {0.0, 1.01}) {
    compare<transforms::Haar, 2>({48, 64}, BoundaryMode::zero, gamma);
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
