// The fused kernels are bit-identical to the generic engine path: GWT (backend/cpu/gwt_fused.hpp)
// 8-bit Adam (backend/cpu/adam8bit_fused.hpp) and fp32 Adam (backend/cpu/adam_avx512.hpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
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
// one zero gradient among non-zero ones at step 2, then `edit(i, k, g)` if given) and checks
// that weights (bit patterns: NaN weights too) and state agree bit for bit and that the weights
// moved.
template <class Opt>
void fused_equals_generic(
    const typename Opt::Options& o, std::vector<Shape> shapes, std::uint32_t seed,
    const std::function<void(std::size_t, std::uint32_t, std::vector<float>&)>& edit = {}) {
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
      if (edit) edit(i, k, g[i]);
      pf.push_back({names[i], host_view(wf[i].data(), s.rows, s.cols),
                    host_view<const float>(g[i].data(), s.rows, s.cols)});
      pg.push_back({names[i], host_view(wg[i].data(), s.rows, s.cols),
                    host_view<const float>(g[i].data(), s.rows, s.cols)});
    }
    fused.step(pf);
    generic.step(pg);
  }
  for (std::size_t i = 0; i < shapes.size(); ++i)
    CHECK(std::memcmp(wf[i].data(), wg[i].data(), wf[i].size() * sizeof(float)) == 0);
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
  // Each convention with and without weight decay: the block loop is compiled per set of
  // operations (adam_kind).
  for (int variant = 0; variant < 6; ++variant) {
    const optim::AdamConvention convention = variant % 3 == 0   ? optim::AdamConvention::bnb
                                             : variant % 3 == 1 ? optim::AdamConvention::torch
                                                                : optim::AdamConvention::hf;
    auto o = recipes::adam8bit_options();
    o.rule.convention = convention;
    o.rule.weight_decay = variant < 3 ? 0.1 : 0.0;
    o.store.min_8bit_size = 0;
    INFO("convention " << static_cast<int>(convention) << " decay " << o.rule.weight_decay);
    // 37×300: 43 whole blocks of 256 and a partial one, blocks straddling rows. 5×300: per
    // block of 256, v subnormal (its absmax below 2^-125: the store's quantiser) and m tiny;
    // moments near 1e30; all zero (absmax 0); subnormal gradients among normal ones; a v that
    // overflows to ∞ (absmax ∞; its later steps dequantise NaN and ∞, and the weight is NaN);
    // a partial last block.
    fused_equals_generic<recipes::Adam8bit<>>(
        o, {{37, 300}, {8, 256}, {1, 100}, {5, 300}}, 5,
        [](std::size_t i, std::uint32_t k, std::vector<float>& g) {
          if (i != 3) return;
          for (std::size_t e = 0; e < 256; ++e) {
            g[e] *= 1e-17f;
            g[256 + e] *= 1e17f;
            g[512 + e] = 0.0f;
            if (e % 3 == 0) g[768 + e] = (e % 2 ? -1.0f : 1.0f) * 1e-40f;
          }
          if (k == 1) g[1024 + 5] = 3e37f;
        });
  }
}

#if SLIMGRAD_Q8_X86
namespace {

std::uint32_t bits_of(float x) {
  return numeric::float_bits(x);
}
float from_bits(std::uint32_t u) {
  return numeric::float_from_bits(u);
}

// block_codes_avx512 on 16 normalised values; returns the mask of flagged lanes.
template <bool Signed>
SLIMGRAD_Q8_TARGET("avx512f,avx512dq,avx512bw")
unsigned block_codes_on(const cpu::q8::PieceTables& tables, const float* x, int* out) {
  const cpu::q8::PieceRegs regs = cpu::q8::piece_regs(tables);
  __mmask16 ambiguous = 0;
  _mm512_storeu_si512(out,
                      cpu::q8::block_codes_avx512<Signed>(regs, _mm512_loadu_ps(x), ambiguous));
  return ambiguous;
}

// Every strided magnitude up to 1 + 8 ulp, and every midpoint and power of two ± 6 ulp, with
// the given sign: an unflagged lane's code is the exact code of each float of that sign within
// 4 ulp of it (magnitudes clamped to 1), as the fused step's division-free quantiser needs.
using Tables = const cpu::q8::PieceTables& (*)(const state::q8::CodeMap&);
template <bool Signed>
void check_block_codes(Tables tables, std::uint32_t sign, int& bad, std::size_t& flagged,
                       std::size_t& n) {
  const state::q8::CodeMap& map =
      Signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
  const std::uint32_t one = bits_of(1.0f);
  std::vector<std::uint32_t> us;
  for (std::uint32_t u = 0; u <= one + 8; u += 4093)
    us.push_back(u);
  for (float m : map.mid)
    for (std::uint32_t d = 0; d <= 12; ++d)
      if (m > 0.0f) us.push_back(bits_of(m) + d - 6);
  for (int e = -40; e <= 0; ++e)
    for (std::uint32_t d = 0; d <= 12; ++d)
      us.push_back(bits_of(std::ldexp(1.0f, e)) + d - 6);
  while (us.size() % 16)
    us.push_back(0);
  int out[16];
  float x[16];
  for (std::size_t i = 0; i < us.size(); i += 16) {
    for (std::size_t l = 0; l < 16; ++l)
      x[l] = from_bits(sign | us[i + l]);
    const unsigned ambiguous = block_codes_on<Signed>(tables(map), x, out);
    for (std::size_t l = 0; l < 16; ++l, ++n) {
      if ((ambiguous >> l) & 1u) {
        ++flagged;
        continue;
      }
      for (int d = -4; d <= 4; ++d) {
        const std::int64_t u = std::clamp<std::int64_t>(std::int64_t{us[i + l]} + d, 0, one);
        const float near = from_bits(sign | static_cast<std::uint32_t>(u));
        if (state::q8::quantize(map, Signed, near, 1.0f) != out[l] && bad++ < 10)
          MESSAGE("x " << x[l] << " code " << out[l] << " but " << near << " has "
                       << int(state::q8::quantize(map, Signed, near, 1.0f)));
      }
    }
  }
}

// The tables of the fused quantiser's clamped form (session 5), which the unclamped formulas
// must not take.
const cpu::q8::PieceTables& clamped_form_tables(const state::q8::CodeMap& map) {
  static const cpu::q8::PieceTables s =
      cpu::q8::build_piece_tables(state::q8::signed_code_map(), true);
  static const cpu::q8::PieceTables u =
      cpu::q8::build_piece_tables(state::q8::unsigned_code_map(), true);
  return &map == &state::q8::signed_code_map() ? s : u;
}

// quantize_block_avx512 against q8::quantize() on blocks of `values` (absmax taken over each
// block, as the fused step does), every block length in `lengths` from each block start.
void check_block_quantizer(bool is_signed, const std::vector<float>& values, int& bad,
                           int& blocks) {
  const state::q8::CodeMap& map =
      is_signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
  const cpu::q8::PieceRegs regs = cpu::q8::piece_regs(cpu::q8::block_piece_tables(map));
  std::vector<std::uint8_t> got(256);
  for (std::size_t b = 0; b < values.size(); b += 256)
    for (std::size_t len :
         {std::size_t{256}, std::size_t{255}, std::size_t{100}, std::size_t{17}, std::size_t{16}}) {
      const std::size_t n = std::min(len, values.size() - b);
      const float* v = values.data() + b;
      const float a = cpu::q8::absmax_portable(v, static_cast<index_t>(n));
      if (!cpu::q8::block_quantizable(a)) continue;
      ++blocks;
      if (is_signed)
        cpu::q8::quantize_block_avx512<true>(map, regs, v, static_cast<index_t>(n), a, got.data());
      else
        cpu::q8::quantize_block_avx512<false>(map, regs, v, static_cast<index_t>(n), a, got.data());
      for (std::size_t i = 0; i < n; ++i)
        if (got[i] != state::q8::quantize(map, is_signed, v[i], a) && bad++ < 10)
          CHECK_MESSAGE(false, "value " << v[i] << " absmax " << a << " got " << int(got[i])
                                        << " want "
                                        << int(state::q8::quantize(map, is_signed, v[i], a)));
    }
}

}  // namespace

TEST_CASE("fused 8-bit quantiser: unflagged codes hold for every float within 4 ulp") {
  // The full check (every float of magnitude ≤ 1 + 8 ulp, both signs of the signed map and the
  // unsigned map, zero mismatches) ran offline; this samples it densely where it could fail.
  if (!cpu::q8::adam_fused_supported()) return;
  int bad = 0;
  std::size_t flagged = 0, n = 0;
  check_block_codes<true>(cpu::q8::block_piece_tables, 0u, bad, flagged, n);
  check_block_codes<true>(cpu::q8::block_piece_tables, 0x80000000u, bad, flagged, n);
  check_block_codes<false>(cpu::q8::block_piece_tables, 0u, bad, flagged, n);
  CHECK(bad == 0);
  CHECK(n > 700000);
  CHECK(flagged > 0);       // midpoints are flagged ...
  CHECK(flagged * 50 < n);  // ... and little else
  // The check fails with the store's tables, whose piece bound at 2^-6 (a midpoint of the
  // signed map) lets a value 2 ulp below it take the code below unflagged, wrong for a value
  // 1 ulp above: the fused quantiser's bounds keep away from midpoints.
  int bad_store = 0;
  flagged = n = 0;
  check_block_codes<true>(cpu::q8::piece_tables, 0u, bad_store, flagged, n);
  CHECK(bad_store > 0);
  // It fails with the tables of the clamped form too (bounds at powers of two next to the run
  // above): the formula of the run below, unclamped, reaches a code too far across the gap.
  for (bool is_signed : {true, false}) {
    int bad_clamped = 0;
    flagged = n = 0;
    if (is_signed)
      check_block_codes<true>(clamped_form_tables, 0u, bad_clamped, flagged, n);
    else
      check_block_codes<false>(clamped_form_tables, 0u, bad_clamped, flagged, n);
    CHECK(bad_clamped > 0);
  }
}

TEST_CASE("fused 8-bit quantiser equals quantize() on midpoints, zeros, denormals, extremes") {
  if (!cpu::q8::adam_fused_supported()) return;
  for (bool is_signed : {true, false}) {
    const state::q8::CodeMap& map =
        is_signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
    int bad = 0, blocks = 0;
    for (float a :
         {1.0f, 0x1p-20f, 0x1p-125f, 0x1p125f, 3e-7f, 1234.5f, 0x1.fffffep-1f, 0x1.000002p-125f}) {
      // The block's absmax first, then every map code and midpoint times a and their
      // neighbours ± 2 ulp (for a power of two, value / absmax is the midpoint exactly), zeros
      // and subnormals; for the unsigned map only values ≥ +0 (v ≥ +0 in the step).
      std::vector<float> values;
      for (std::size_t j = 0; j < 255; ++j) {
        if (j % 64 == 0) values.push_back(is_signed && j % 128 ? -a : a);
        for (float x : {map.mid[j], map.code[j]}) {
          float y = x * a;
          for (int d = 0; d < 2; ++d)
            y = std::nextafter(y, 0.0f);
          for (int d = 0; d < 5; ++d, y = std::nextafter(y, 2.0f * y + 1.0f))
            if (!is_signed ? y >= 0.0f : true) values.push_back(std::fabs(y) <= a ? y : x * a);
        }
        if (j % 16 == 0) {
          values.push_back(0.0f);
          values.push_back(std::numeric_limits<float>::denorm_min());
          values.push_back(is_signed ? -0.0f : 0x1p-140f);
          values.push_back(is_signed ? -std::numeric_limits<float>::denorm_min() : 0x1p-149f);
        }
      }
      check_block_quantizer(is_signed, values, bad, blocks);
    }
    INFO("signed " << is_signed);
    CHECK(bad == 0);
    CHECK(blocks > 100);
  }
}
#endif  // SLIMGRAD_Q8_X86

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
