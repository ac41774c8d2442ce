// slimgrad/backend/cpu/stores.hpp — the StateStores (state/stores.hpp) on the CPU backend.
//
// Each impl owns the memory of its buffers (std::vector, zero-initialised) and converts ranges
// of elements between the stored format and fp32. The per-element math (bf16 rounding, the 8-bit
// maps and quantiser) lives in core/numeric.hpp and state/q8_math.hpp, shared with CUDA; this
// file only has loops, memory and argument checks. Loops over large ranges are split over OpenMP
// threads in chunks that start on block (and Philox-block) boundaries, so results do not depend
// on the thread count.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../../core/backend.hpp"
#include "../../core/error.hpp"
#include "../../core/numeric.hpp"
#include "../../core/philox.hpp"
#include "../../core/view.hpp"
#include "../../state/q8_math.hpp"
#include "../../state/stores.hpp"
#include "common.hpp"

namespace slimgrad {

namespace cpu::detail {

// Throws Error; [[noreturn]] so that compilers see the checked paths end here (no false
// -Warray-bounds/-Wnonnull on the code after a failed check).
[[noreturn]] inline void fail(const std::string& message) {
  throw Error("slimgrad: " + message);
}

inline void check_count(index_t count, const char* store) {
  if (count < 0)
    fail(std::string(store) + " store: element count " + std::to_string(count) + " is negative");
}

// A load/store range must lie in [0, count], start on a multiple of `alignment` and end on one or
// at count; the fp32 side must be non-null when the range is not empty. Messages are built only
// on failure: this runs on every call of the hot path.
inline void check_range(index_t count, index_t begin, index_t end, index_t alignment,
                        const void* fp32, const char* store, const char* op) {
  const bool inside = 0 <= begin && begin <= end && end <= count;
  const bool aligned_begin = begin % alignment == 0;
  const bool aligned_end = end % alignment == 0 || end == count;
  const bool pointer = fp32 != nullptr || begin == end;
  if (inside && aligned_begin && aligned_end && pointer) return;
  const std::string where = std::string(store) + " store " + op + ": ";
  if (!inside)
    fail(where + "range [" + std::to_string(begin) + ", " + std::to_string(end) +
         ") is not inside [0, " + std::to_string(count) + ")");
  if (!aligned_begin)
    fail(where + "range start " + std::to_string(begin) + " is not a multiple of the alignment " +
         std::to_string(alignment));
  if (!aligned_end)
    fail(where + "range end " + std::to_string(end) + " is neither a multiple of the alignment " +
         std::to_string(alignment) + " nor the element count " + std::to_string(count));
  fail(where + "the fp32 pointer is null");
}

// Runs body(b, e) over [begin, end) cut into chunks of `chunk` elements (the first chunk starts at
// begin, so a chunk that is a multiple of the alignment keeps every chunk aligned). Threads are
// used only when (end − begin)·cost reaches parallel_work, cost being the relative time per
// element (1 for a widening/narrowing at ~0.7 ns, 4 for stochastic rounding, 16 for 8-bit
// quantisation): about half a millisecond of work. Below that a parallel region costs more than
// it saves, and an engine that runs small tiles from its own parallel loop gets no nested
// regions.
inline constexpr index_t parallel_work = index_t{1} << 20;

template <class Body>
void for_chunks(index_t begin, index_t end, index_t chunk, index_t cost, Body&& body) {
  const index_t n = end - begin;
  if (n <= 0) return;
  const index_t chunks = (n + chunk - 1) / chunk;
  auto run = [&](index_t k) {
    const index_t b = begin + k * chunk;
    const index_t e = b + chunk < end ? b + chunk : end;
    body(b, e);
  };
#if defined(_OPENMP)
  const bool worth_it = chunks > 1 && n * cost >= parallel_work;
#pragma omp parallel for schedule(static) if (worth_it)
  for (index_t k = 0; k < chunks; ++k)
    run(k);
#else
  (void)cost;
  for (index_t k = 0; k < chunks; ++k)
    run(k);
#endif
}

inline constexpr index_t stream_chunk = index_t{1} << 14;  // elements per parallel work item

inline std::size_t to_size(index_t n) {
  return static_cast<std::size_t>(n);
}

}  // namespace cpu::detail

/// Fp32 store on the CPU: 4 bytes per element; the rule works in place through direct().
template <>
struct impl<state::Fp32, backend::cpu> {
  using Options = state::Fp32::Options;

  /// One moment tensor: `count` floats, flattened row-major.
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    std::vector<float> data;
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options&) {}

  /// A zero-initialised buffer of `count` elements.
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Fp32::name);
    return Buffer{count, kind, std::vector<float>(cpu::detail::to_size(count), 0.0f)};
  }
  /// Exact bytes held: 4·count.
  std::size_t bytes(const Buffer& b) const { return b.data.size() * sizeof(float); }
  static std::size_t bytes_for(index_t count, state::Moment, const Options&) {
    cpu::detail::check_count(count, state::Fp32::name);
    return cpu::detail::to_size(count) * sizeof(float);
  }
  /// The fp32 data itself.
  float* direct(Buffer& b) const { return b.data.data(); }
  const float* direct(const Buffer& b) const { return b.data.data(); }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Fp32::name, "load");
    if (end > begin && out != b.data.data() + begin)
      std::memmove(out, b.data.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
  }
  void store(Buffer& b, index_t begin, index_t end, const float* in,
             const random::Key& /*deterministic*/) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Fp32::name, "store");
    if (end > begin && in != b.data.data() + begin)
      std::memmove(b.data.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
  }
};

/// Bf16 store on the CPU: 2 bytes per element; round-to-nearest-even or stochastic rounding
/// (numeric.hpp) on store, exact widening on load.
template <>
struct impl<state::Bf16, backend::cpu> {
  using Options = state::Bf16::Options;

  /// One moment tensor: `count` bf16 bit patterns, flattened row-major.
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    std::vector<std::uint16_t> data;
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {}

  const Options& options() const { return options_; }

  /// A zero-initialised buffer of `count` elements (+0.0 everywhere).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Bf16::name);
    return Buffer{count, kind, std::vector<std::uint16_t>(cpu::detail::to_size(count), 0)};
  }
  /// Exact bytes held: 2·count.
  std::size_t bytes(const Buffer& b) const { return b.data.size() * sizeof(std::uint16_t); }
  static std::size_t bytes_for(index_t count, state::Moment, const Options&) {
    cpu::detail::check_count(count, state::Bf16::name);
    return cpu::detail::to_size(count) * sizeof(std::uint16_t);
  }
  /// bf16 is not fp32: the rule loads and stores.
  float* direct(Buffer&) const { return nullptr; }
  const float* direct(const Buffer&) const { return nullptr; }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Bf16::name, "load");
    const std::uint16_t* src = b.data.data();
    cpu::detail::for_chunks(begin, end, cpu::detail::stream_chunk, 1, [&](index_t lo, index_t hi) {
      for (index_t e = lo; e < hi; ++e)
        out[e - begin] = numeric::bf16_to_float(src[e]);
    });
  }

  /// Rounds in[0 .. end−begin) into elements [begin, end). With stochastic rounding, element e
  /// uses word e % 4 of Philox block e / 4 under `key` (random::block_bits), so the result depends
  /// only on (key, e, value): any tiling or thread count gives the same bits.
  void store(Buffer& b, index_t begin, index_t end, const float* in, const random::Key& key) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Bf16::name, "store");
    std::uint16_t* dst = b.data.data();
    if (!options_.stochastic_rounding) {
      cpu::detail::for_chunks(begin, end, cpu::detail::stream_chunk, 1,
                              [&](index_t lo, index_t hi) {
                                for (index_t e = lo; e < hi; ++e)
                                  dst[e] = numeric::bf16_bits_rne(in[e - begin]);
                              });
      return;
    }
    if (static_cast<std::uint64_t>(end) > random::max_elements)
      cpu::detail::fail("bf16 store: stochastic rounding addresses at most 2^34 elements per key");
    // Chunks start on multiples of 4 after the first, so each Philox block is drawn once.
    const index_t first = begin - begin % 4;
    cpu::detail::for_chunks(first, end, cpu::detail::stream_chunk, 4, [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += 4) {
        const random::Block4 bits = random::block_bits(key, static_cast<std::uint64_t>(blk / 4));
        const index_t e0 = blk < begin ? begin : blk;
        const index_t e1 = blk + 4 < hi ? blk + 4 : hi;
        for (index_t e = e0; e < e1; ++e)
          dst[e] = numeric::bf16_bits_stochastic(in[e - begin], bits.v[e - blk]);
      }
    });
  }

 private:
  Options options_{};
};

/// Q8Block<B> store on the CPU: blockwise dynamic 8-bit (state/q8_math.hpp), 1 byte per element
/// plus 4 bytes per block of B; tensors below `min_8bit_size` elements stay fp32 (4 bytes per
/// element, direct()). First moments use the signed map, second moments the unsigned map.
template <int B>
struct impl<state::Q8Block<B>, backend::cpu> {
  using Store = state::Q8Block<B>;
  using Options = typename Store::Options;

  /// One moment tensor. Either `quantized` (codes: count bytes; absmax: ceil(count/B) floats) or
  /// the fp32 fallback (fp32: count floats).
  struct Buffer {
    index_t count = 0;
    state::Moment kind = state::Moment::first;
    bool quantized = false;
    std::vector<std::uint8_t> codes;
    std::vector<float> absmax;
    std::vector<float> fp32;
  };

  static constexpr index_t alignment = B;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {
    require(options.min_8bit_size >= 0, "q8block store: min_8bit_size must not be negative");
  }

  const Options& options() const { return options_; }

  /// True when a tensor of `count` elements is held in 8 bits under `options`.
  static bool quantizes(index_t count, const Options& options) {
    return count >= options.min_8bit_size && count > 0;
  }

  /// A buffer of `count` zeros: codes point at the map's 0.0 entry (index 127 signed, 0
  /// unsigned) with absmax 0, so load() gives +0.0 (bitsandbytes zero-fills the codes, which
  /// reads back as −0.0 for the signed map: the same value).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, Store::name);
    Buffer b;
    b.count = count;
    b.kind = kind;
    b.quantized = quantizes(count, options_);
    if (b.quantized) {
      b.codes.assign(cpu::detail::to_size(count), zero_code(kind));
      b.absmax.assign(cpu::detail::to_size(blocks(count)), 0.0f);
    } else {
      b.fp32.assign(cpu::detail::to_size(count), 0.0f);
    }
    return b;
  }
  /// Exact bytes held: count + 4·ceil(count/B) when quantized, else 4·count.
  std::size_t bytes(const Buffer& b) const {
    return b.codes.size() + (b.absmax.size() + b.fp32.size()) * sizeof(float);
  }
  static std::size_t bytes_for(index_t count, state::Moment, const Options& options) {
    cpu::detail::check_count(count, Store::name);
    if (!quantizes(count, options)) return cpu::detail::to_size(count) * sizeof(float);
    return cpu::detail::to_size(count) + cpu::detail::to_size(blocks(count)) * sizeof(float);
  }
  /// The fp32 data for a small tensor, nullptr for a quantized one.
  float* direct(Buffer& b) const { return b.quantized ? nullptr : b.fp32.data(); }
  const float* direct(const Buffer& b) const { return b.quantized ? nullptr : b.fp32.data(); }

  /// Dequantises elements [begin, end): map[code]·absmax of the element's block.
  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    cpu::detail::check_range(b.count, begin, end, alignment, out, Store::name, "load");
    if (!b.quantized) {
      if (end > begin)
        std::memmove(out, b.fp32.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
      return;
    }
    const state::q8::CodeMap& map = state::q8::code_map(b.kind);
    cpu::detail::for_chunks(begin, end, chunk, cost_load, [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += B) {
        const float a = b.absmax[cpu::detail::to_size(blk / B)];
        const index_t stop = blk + B < hi ? blk + B : hi;
        for (index_t e = blk; e < stop; ++e)
          out[e - begin] = state::q8::dequantize(map, b.codes[cpu::detail::to_size(e)], a);
      }
    });
  }

  /// Quantises elements [begin, end): each block's absmax is the largest |value| among the values
  /// being stored (NaNs skipped), then every value gets its nearest code (q8_math.hpp).
  void store(Buffer& b, index_t begin, index_t end, const float* in,
             const random::Key& /*deterministic*/) const {
    cpu::detail::check_range(b.count, begin, end, alignment, in, Store::name, "store");
    if (!b.quantized) {
      if (end > begin && in != b.fp32.data() + begin)
        std::memmove(b.fp32.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
      return;
    }
    const bool is_signed = b.kind == state::Moment::first;
    const state::q8::CodeMap& map = state::q8::code_map(b.kind);
    cpu::detail::for_chunks(begin, end, chunk, cost_store, [&](index_t lo, index_t hi) {
      for (index_t blk = lo; blk < hi; blk += B) {
        const index_t stop = blk + B < hi ? blk + B : hi;
        const float* x = in + (blk - begin);
        float a = 0.0f;
        for (index_t i = 0; i < stop - blk; ++i)
          a = state::q8::absmax_update(a, x[i]);
        b.absmax[cpu::detail::to_size(blk / B)] = a;
        state::q8::quantize_n(map, is_signed, x, stop - blk, a, b.codes.data() + blk);
      }
    });
  }

 private:
  static constexpr index_t chunk =
      ((cpu::detail::stream_chunk + B - 1) / B) * B;  // whole blocks per work item
  static constexpr index_t cost_load = 1;             // relative cost per element (see for_chunks)
  static constexpr index_t cost_store = 16;           // a division and an 8-step search per element

  static index_t blocks(index_t count) { return (count + B - 1) / B; }
  static std::uint8_t zero_code(state::Moment kind) {
    return kind == state::Moment::first ? std::uint8_t{127} : std::uint8_t{0};
  }

  Options options_{};
};

/// Factored store on the CPU (Adafactor, algorithms.md §6.3; HF transformers' Adafactor). A
/// second moment of a matrix with both dimensions > 1 is held as a row vector r (m floats) and a
/// column vector c (n floats): 4(m + n) bytes. First moments, vectors and matrices with a
/// dimension of 1 (for which the factored estimate equals the elementwise one) are held
/// elementwise in fp32 (4 bytes per element) with direct/load/store like Fp32.
template <>
struct impl<state::Factored, backend::cpu> {
  using Options = state::Factored::Options;

  struct Buffer {
    Shape shape{};
    state::Moment kind = state::Moment::second;
    bool factored = false;
    std::vector<float> row;   ///< r, length m (factored)
    std::vector<float> col;   ///< c, length n (factored)
    std::vector<float> full;  ///< elementwise fp32 values (not factored)
    index_t count = 0;        ///< shape.rows · shape.cols
  };

  static constexpr index_t alignment = 1;

  impl() = default;
  explicit impl(const Options& options) : options_(options) {
    require(std::isfinite(options.eps1) && options.eps1 >= 0.0f,
            "factored store: eps1 must be finite and not negative");
  }

  const Options& options() const { return options_; }

  /// True when a `kind` moment of this shape is held as row and column vectors.
  static bool factors(Shape shape, state::Moment kind) {
    return kind == state::Moment::second && shape.rows > 1 && shape.cols > 1;
  }

  /// A zero-initialised buffer for a rows × cols tensor.
  Buffer make(Shape shape, state::Moment kind) const {
    check_shape(shape);
    Buffer b;
    b.shape = shape;
    b.kind = kind;
    b.count = shape.rows * shape.cols;
    b.factored = factors(shape, kind);
    if (b.factored) {
      b.row.assign(cpu::detail::to_size(shape.rows), 0.0f);
      b.col.assign(cpu::detail::to_size(shape.cols), 0.0f);
    } else {
      b.full.assign(cpu::detail::to_size(b.count), 0.0f);
    }
    return b;
  }
  /// A zero-initialised buffer for a vector of `count` elements (1 × count: never factored).
  Buffer make(index_t count, state::Moment kind) const {
    cpu::detail::check_count(count, state::Factored::name);
    return make(Shape{1, count}, kind);
  }

  /// Exact bytes held: 4(m + n) when factored, else 4mn.
  std::size_t bytes(const Buffer& b) const {
    return (b.row.size() + b.col.size() + b.full.size()) * sizeof(float);
  }
  static std::size_t bytes_for(Shape shape, state::Moment kind, const Options&) {
    check_shape(shape);
    if (factors(shape, kind)) return cpu::detail::to_size(shape.rows + shape.cols) * sizeof(float);
    return cpu::detail::to_size(shape.rows * shape.cols) * sizeof(float);
  }
  static std::size_t bytes_for(index_t count, state::Moment kind, const Options& options) {
    cpu::detail::check_count(count, state::Factored::name);
    return bytes_for(Shape{1, count}, kind, options);
  }

  /// The fp32 elementwise data, or nullptr for a factored buffer.
  float* direct(Buffer& b) const { return b.factored ? nullptr : b.full.data(); }
  const float* direct(const Buffer& b) const { return b.factored ? nullptr : b.full.data(); }

  void load(const Buffer& b, index_t begin, index_t end, float* out) const {
    if (b.factored)
      cpu::detail::fail(
          "factored store load: a factored second moment has no elements to load; "
          "use inverse_sqrt_factors");
    cpu::detail::check_range(b.count, begin, end, alignment, out, state::Factored::name, "load");
    if (end > begin)
      std::memmove(out, b.full.data() + begin, cpu::detail::to_size(end - begin) * sizeof(float));
  }
  void store(Buffer& b, index_t begin, index_t end, const float* in, const random::Key&) const {
    if (b.factored)
      cpu::detail::fail(
          "factored store store: a factored second moment is updated only by "
          "accumulate");
    cpu::detail::check_range(b.count, begin, end, alignment, in, state::Factored::name, "store");
    if (end > begin && in != b.full.data() + begin)
      std::memmove(b.full.data() + begin, in, cpu::detail::to_size(end - begin) * sizeof(float));
  }

  /// One Adafactor second-moment step with Q = g⊙g + eps1 (each in float, as torch's
  /// `grad**2 + eps1`): factored, r ← β̂·r + (1−β̂)·rowmean(Q) and c ← β̂·c + (1−β̂)·colmean(Q);
  /// elementwise, v ← β̂·v + (1−β̂)·Q. `beta2_hat` is 1 − t^−0.8 in Adafactor (0 at t = 1) and
  /// must be in [0, 1].
  ///
  /// Rounding follows HF's `x.mul_(beta2t).add_(mean, alpha=1.0 - beta2t)` on torch's CPU (AVX2)
  /// kernels: β and α = 1 − β̂ are each rounded once to float, x·β is rounded, then
  /// fma(mean, α, x·β). Pass β̂ in double (as HF's Python float) to get α exactly as torch does;
  /// the float overload uses α = 1 − float(β̂), which for β̂ near 1 (late steps) differs from
  /// float(1 − β̂) by up to 2^-25/(1 − β̂) relative. The means sum in double and round once, so
  /// they are within an ulp of torch's float32 mean (a pairwise float sum).
  void accumulate(Buffer& b, HostView<const float> g, double beta2_hat) {
    if (b.kind != state::Moment::second)
      cpu::detail::fail("factored store accumulate: the buffer holds a first moment");
    if (g.rows != b.shape.rows || g.cols != b.shape.cols || g.ld < g.cols ||
        (g.data == nullptr && !g.empty()))
      cpu::require_shape(g, b.shape, "factored store accumulate gradient");  // throws, says why
    if (!(beta2_hat >= 0.0 && beta2_hat <= 1.0))
      cpu::detail::fail("factored store accumulate: beta2_hat must be in [0, 1]");
    const float beta = static_cast<float>(beta2_hat);
    const float alpha = static_cast<float>(1.0 - beta2_hat);
    const float eps1 = options_.eps1;
    const index_t m = b.shape.rows, n = b.shape.cols;
    if (!b.factored) {
      float* v = b.full.data();
      cpu::parallel_for(m, n, [&](index_t i) {
        const float* gi = g.row(i);
        float* vi = v + i * n;
        for (index_t j = 0; j < n; ++j)
          vi[j] = blend(vi[j], beta, alpha, square_plus(gi[j], eps1));
      });
      return;
    }
    // Row means: one row per work item.
    float* r = b.row.data();
    cpu::parallel_for(m, n, [&](index_t i) {
      const float* gi = g.row(i);
      // Four double partial sums: a dependency chain four times shorter; the double sum differs
      // from a one-accumulator sum far below a float ulp (double carries 29 more bits).
      double acc[4] = {0.0, 0.0, 0.0, 0.0};
      index_t j = 0;
      for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; ++k)
          acc[k] += static_cast<double>(square_plus(gi[j + k], eps1));
      for (; j < n; ++j)
        acc[0] += static_cast<double>(square_plus(gi[j], eps1));
      const double sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      const float mean = static_cast<float>(sum / static_cast<double>(n));
      r[i] = blend(r[i], beta, alpha, mean);
    });
    // Column means: column strips of `strip` columns per work item, rows in order.
    col_sums_.assign(cpu::detail::to_size(n), 0.0);
    double* sums = col_sums_.data();
    constexpr index_t strip = 256;
    const index_t strips = (n + strip - 1) / strip;
    cpu::parallel_for(strips, m * strip, [&](index_t s) {
      const index_t j0 = s * strip, j1 = j0 + strip < n ? j0 + strip : n;
      for (index_t i = 0; i < m; ++i) {
        const float* gi = g.row(i);
        for (index_t j = j0; j < j1; ++j)
          sums[j] += static_cast<double>(square_plus(gi[j], eps1));
      }
    });
    float* c = b.col.data();
    for (index_t j = 0; j < n; ++j) {
      const float mean = static_cast<float>(sums[j] / static_cast<double>(m));
      c[j] = blend(c[j], beta, alpha, mean);
    }
  }
  /// The same with β̂ in float (α = 1 − β̂ computed in float; see above).
  void accumulate(Buffer& b, HostView<const float> g, float beta2_hat) {
    accumulate(b, g, static_cast<double>(beta2_hat));
  }

  /// HF Adafactor's _approx_sq_grad factors of a factored buffer: row_factor_i =
  /// rsqrt(r_i / mean(r)) (m values) and col_factor_j = rsqrt(c_j) (n values), each rsqrt
  /// computed as 1/sqrt in float like torch's, so that 1/sqrt(v̂_ij) = row_factor_i·col_factor_j.
  void inverse_sqrt_factors(const Buffer& b, float* row_factor, float* col_factor) const {
    if (!b.factored)
      cpu::detail::fail("factored store inverse_sqrt_factors: the buffer is not factored");
    if (row_factor == nullptr || col_factor == nullptr)
      cpu::detail::fail("factored store inverse_sqrt_factors: null output");
    const index_t m = b.shape.rows, n = b.shape.cols;
    double sum = 0.0;
    for (index_t i = 0; i < m; ++i)
      sum += static_cast<double>(b.row[cpu::detail::to_size(i)]);
    const float mean = static_cast<float>(sum / static_cast<double>(m));
    for (index_t i = 0; i < m; ++i)
      row_factor[i] = 1.0f / std::sqrt(b.row[cpu::detail::to_size(i)] / mean);
    for (index_t j = 0; j < n; ++j)
      col_factor[j] = 1.0f / std::sqrt(b.col[cpu::detail::to_size(j)]);
  }

 private:
  static void check_shape(Shape shape) {
    require(shape.rows >= 0 && shape.cols >= 0,
            "factored store: shape " + std::to_string(shape.rows) + "x" +
                std::to_string(shape.cols) + " has a negative dimension");
  }
  // x·β rounded, then fma(q, α, x·β): torch's mul_(β) then add_(q, alpha=α) (vec::fmadd).
  static float blend(float x, float beta, float alpha, float q) {
    return std::fma(q, alpha, x * beta);
  }
  // g² rounded to float, then + eps1 rounded to float: torch's `grad**2 + eps1`, two ops. The
  // empty asm makes the product exist as a float, so -ffp-contract cannot fuse it into an FMA.
  static float square_plus(float g, float eps1) {
    float sq = g * g;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(sq));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(sq));
#else
    volatile float fence = sq;
    sq = fence;
#endif
    return sq + eps1;
  }

  Options options_{};
  std::vector<double> col_sums_;  // grown once, reused
};

}  // namespace slimgrad
