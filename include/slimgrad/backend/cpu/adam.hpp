// slimgrad/backend/cpu/adam.hpp — the Adam rule on the CPU backend, for any elementwise store.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../core/philox.hpp"
#include "../../optim/adam.hpp"
#include "../../state/stores.hpp"
#include "adam8bit_fused.hpp"
#include "adam_avx512.hpp"
#include "common.hpp"
#include "elementwise.hpp"

namespace slimgrad {

template <>
struct impl<optim::Adam, backend::cpu> {
  using Rule = optim::Adam;
  Rule::Options options;
  bool fused = true;  ///< the fused 8-bit kernel where it applies (bit-identical; off for tests)

  impl() = default;
  explicit impl(const Rule::Options& o) : options(o) { Rule::validate(o); }

  /// The moments of one tensor, in the store's format.
  template <class Store>
  struct State {
    typename Store::Buffer m, v;
  };

  template <class Store>
  State<Store> make(const Store& store, Shape tracked) const {
    static_assert(!std::is_same_v<Store, impl<state::Factored, backend::cpu>>,
                  "slimgrad: Adam keeps elementwise moments; the factored second moment belongs "
                  "to the Adafactor rule (optim::Adafactor)");
    return {store.make(tracked.size(), state::Moment::first),
            store.make(tracked.size(), state::Moment::second)};
  }
  template <class Store>
  std::size_t bytes(const Store& store, const State<Store>& s) const {
    return store.bytes(s.m) + store.bytes(s.v);
  }

  /// The bytes make() would hold for `tracked` coefficients, without allocating.
  template <class Store>
  static std::size_t bytes_for(const typename Store::Options& o, Shape tracked) {
    return Store::bytes_for(tracked.size(), state::Moment::first, o) +
           Store::bytes_for(tracked.size(), state::Moment::second, o);
  }

  /// In place: `c` holds the tracked coefficients X on entry and N = M/D on exit; `denom`
  /// (same shape, or empty) receives D. Returns how the weight takes the step. `key` names the
  /// random words of stochastic rounding (epoch = step). Adam does not read the weights.
  template <class Store>
  optim::RuleOutput update(const Store& store, State<Store>& st, HostView<float> c, std::int64_t t,
                           HostView<float> denom, const random::Key& key,
                           HostView<const float> /*weight*/) const {
    const optim::AdamStep s = Rule::step_scalars(options, t);
    const index_t cols = c.cols;
    cpu::for_each_chunk(c.size(), Store::alignment, chunk_for<Store>, [&](index_t b, index_t e) {
      Chunk<Store> ch(store, st, b, e);
      cpu::for_each_segment(b, e, cols, [&](index_t off, index_t row, index_t col0, index_t len) {
        Arr x(c.row(row) + col0, len), m(ch.m + off, len), v(ch.v + off, len);
        moments(x, m, v, s);
        Arr root = sqrt_of(v);
        if (denom.empty()) {
          x = m / (root / s.denom_divisor + s.eps);
        } else {
          Arr d(denom.row(row) + col0, len);
          d = root / s.denom_divisor + s.eps;
          x = m / d;
        }
      });
      ch.commit(store, st, key);
    });
    return {s.weight, 0.0f};
  }

  /// Calls f(M, V) with both moments as fp32 `tracked`-shaped views (the store's memory when it
  /// is fp32, else a widened copy that is narrowed back afterwards). For whole-tensor edits such
  /// as SubTrack++'s moment rotation.
  template <class Store, class F>
  void with_moments(const Store& store, State<Store>& st, Shape tracked, const random::Key& key,
                    F&& f) const {
    float* dm = store.direct(st.m);
    float* dv = store.direct(st.v);
    if (dm && dv) {
      f(HostView<float>(dm, tracked.rows, tracked.cols),
        HostView<float>(dv, tracked.rows, tracked.cols));
      return;
    }
    std::vector<float> m(static_cast<std::size_t>(tracked.size())), v(m.size());
    store.load(st.m, 0, tracked.size(), m.data());
    store.load(st.v, 0, tracked.size(), v.data());
    f(host_view(m.data(), tracked.rows, tracked.cols),
      host_view(v.data(), tracked.rows, tracked.cols));
    store.store(st.m, 0, tracked.size(), m.data(), key);
    random::Key kv = key;
    kv.stream = ~key.stream;
    store.store(st.v, 0, tracked.size(), v.data(), kv);
  }

  /// The identity-transform fast path: one pass reads g, m, v, w and writes m, v, w, with
  /// w taking u = α·m/D. On processors with AVX-512, contiguous tensors take a fused kernel:
  /// fp32 moments one pass of AVX-512 with prefetch (adam_avx512.hpp; the chunked Eigen path
  /// below is SSE2 in a baseline build and runs at about 65% of memcpy on one core), 8-bit
  /// moments the block kernel (adam8bit_fused.hpp).
  template <class Store>
  void update_apply(const Store& store, State<Store>& st, HostView<const float> g,
                    HostView<float> w, std::int64_t t, float alpha, const random::Key& key) const {
    const optim::AdamStep s = Rule::step_scalars(options, t);
    if constexpr (cpu::q8::block_of < Store >> 0) {
      if (fused && st.m.quantized && st.v.quantized && g.ld == g.cols && w.ld == w.cols &&
          cpu::q8::adam_fused_supported()) {
        cpu::q8::adam_step_fused<cpu::q8::block_of<Store>>(st.m, st.v, g.data, w.data, g.size(), s,
                                                           alpha);
        return;
      }
    }
#if SLIMGRAD_AVX512
    if (float* dm = store.direct(st.m), *dv = store.direct(st.v);
        fused && dm && dv && g.ld == g.cols && w.ld == w.cols && cpu::avx512::supported()) {
      cpu::avx512::adam_step_fp32(g.data, w.data, dm, dv, g.size(), s, alpha);
      return;
    }
#endif
    const index_t cols = g.cols;
    cpu::for_each_chunk(g.size(), Store::alignment, chunk_for<Store>, [&](index_t b, index_t e) {
      Chunk<Store> ch(store, st, b, e);
      cpu::for_each_segment(b, e, cols, [&](index_t off, index_t row, index_t col0, index_t len) {
        ConstArr gr(g.row(row) + col0, len);
        Arr wr(w.row(row) + col0, len), m(ch.m + off, len), v(ch.v + off, len);
        moments(gr, m, v, s);
        Arr root = sqrt_of(v);
        const optim::WeightUpdate& p = s.weight;
        if (p.decay_before && p.decay_multiplier != 1.0f) wr = wr * p.decay_multiplier;
        if (p.decay_before && p.decay_alpha != 0.0f) wr = wr + p.decay_alpha * wr;
        if (alpha == 1.0f)
          wr = wr + (-p.step_size) * (m / (root / s.denom_divisor + s.eps));
        else
          wr = wr + (-p.step_size) * (alpha * (m / (root / s.denom_divisor + s.eps)));
        if (!p.decay_before && p.decay_multiplier != 1.0f) wr = wr * p.decay_multiplier;
        if (!p.decay_before && p.decay_alpha != 0.0f) wr = wr + p.decay_alpha * wr;
      });
      ch.commit(store, st, key);
    });
  }

 private:
  // Chunks of 2048 elements: g, w, m and v of one chunk (32 KB) stay in L1 across the three
  // vectorised statements of a segment. A blockwise store (the 8-bit one) also dequantises m and
  // v into scratch and quantises them back: 1024 elements keep all of that in L1 (its step was
  // about 10% faster than with 2048 on a Zen 5 core).
  static constexpr index_t chunk_target = 2048;
  template <class Store>
  static constexpr index_t chunk_for = Store::alignment > 1 ? 1024 : chunk_target;
  using Arr = Eigen::Map<Eigen::ArrayXf>;
  using ConstArr = Eigen::Map<const Eigen::ArrayXf>;

  // The CPU form of optim::adam_moments, vectorised by Eigen (whose sqrt is the vector
  // instruction, where a plain sqrtf loop stays scalar to honour errno). Same operations in the
  // same order as the scalar kernel the CUDA backend shares, so both round alike.
  // sqrt(v) of one segment, correctly rounded, in a thread-local buffer.
  static Arr sqrt_of(const Arr& v) {
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<std::size_t>(v.size()))
      buf.resize(static_cast<std::size_t>(v.size()));
    cpu::sqrt_n(v.data(), buf.data(), v.size());
    return Arr(buf.data(), v.size());
  }

  template <class G>
  static void moments(const G& g, Arr& m, Arr& v, const optim::AdamStep& s) {
    m = m * s.beta1 + s.one_minus_beta1 * g;
    v = v * s.beta2 + s.one_minus_beta2 * g * g;
  }

  // The moments of one chunk as fp32: the store's own memory when it is fp32, else a
  // thread-local scratch that is written back by commit().
  template <class Store>
  struct Chunk {
    index_t begin, end;
    float* m;
    float* v;
    bool direct;
    Chunk(const Store& store, State<Store>& st, index_t b, index_t e) : begin(b), end(e) {
      float* dm = store.direct(st.m);
      float* dv = store.direct(st.v);
      direct = dm != nullptr && dv != nullptr;
      if (direct) {
        m = dm + b;
        v = dv + b;
        return;
      }
      thread_local std::vector<float> scratch;
      scratch.resize(static_cast<std::size_t>(2 * (e - b)));
      m = scratch.data();
      v = scratch.data() + (e - b);
      store.load(st.m, b, e, m);
      store.load(st.v, b, e, v);
    }
    void commit(const Store& store, State<Store>& st, const random::Key& key) {
      if (direct) return;
      store.store(st.m, begin, end, m, key);
      random::Key kv = key;
      kv.stream = ~key.stream;  // independent rounding words for the second moment
      store.store(st.v, begin, end, v, kv);
    }
  };
};

}  // namespace slimgrad
