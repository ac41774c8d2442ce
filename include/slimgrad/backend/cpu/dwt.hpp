// slimgrad/backend/cpu/dwt.hpp — GWT's multi-level orthonormal DWT (algorithms.md §1.1) on the
// CPU backend. State cost: 0 bytes per parameter; workspace: one grown-once scratch buffer per
// impl object (about 2·K + 8·N_1 floats per thread for Axis::rows, (2·N_1 + 1)·64 floats per
// thread for Axis::cols plus a copy of the strip when running in place), see workspace_bytes().
//
// Design (the transform is bandwidth-bound, so every line is read once and written once):
//   * Axis::rows: each row (16 KB for n = 4096) goes through all L levels while it is in L1;
//     intermediate approximations live in per-thread scratch, details and a_L are written
//     straight into their packed slots. Rows run in parallel (OpenMP, dynamic chunks of 8).
//   * Outputs of 16 MiB or more (larger than a typical last-level cache share) are finished
//     per row in L1 and then copied out with non-temporal stores, so that writing them costs no
//     read-for-ownership; smaller outputs are written in place so that they stay cached.
//   * Haar has its own butterfly loops; they are written so that g++/clang auto-vectorise them
//     at -O3 with plain SSE2 (no -march=native needed).
//   * Db2/Db4: the boundary is materialised first, into the two polyphase halves (even and odd
//     samples) of the extended input; the convolution itself is then one branch-free loop with
//     contiguous loads that vectorises. The inverse of mode 'zero' never touches the boundary
//     (pywt's "valid" reconstruction); the inverse of 'periodization' pads the coefficients
//     circularly by F/2 - 1 and rotates the result.
//   * Axis::cols: strips of 64 columns; each output row is a weighted sum of F (forward) or F
//     (inverse: F/2 approximation + F/2 detail) input rows, vectorised across the strip.
//
// IN PLACE. forward(s, G, coeffs) may run in place when G and coeffs start at the same address
// with the same leading dimension (coeffs is the wider/taller view of the same buffer: the
// caller allocates m×K, or K×n, and views its leading m×n block as G). inverse(s, coeffs, out)
// likewise when out is the leading block of coeffs. In place costs one extra in-cache copy per
// line. Any other overlap between input and output is rejected with slimgrad::Error.
//
// Not thread-safe per object: the scratch is shared by calls on one impl; use one impl per
// calling thread (the OpenMP threads inside one call each get their own slice).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../../core/concepts.hpp"
#include "../../transforms/dwt.hpp"
#include "common.hpp"

namespace slimgrad {

namespace cpu::detail {

/// F float taps, indexed by int (the kernels' loop counters).
template <int F>
struct Taps {
  float v[F];
  constexpr float operator[](int k) const { return v[k]; }
};

template <int F>
constexpr Taps<F> to_float_taps(const double (&taps)[F]) {
  Taps<F> out{};
  for (int k = 0; k < F; ++k)
    out.v[k] = static_cast<float>(taps[k]);
  return out;
}

/// The float taps the kernels run on: rec_lo / rec_hi (see wavelets.hpp for why).
template <class W>
struct DwtTaps {
  static constexpr int F = W::filter_length;
  static constexpr int H = F / 2;
  static constexpr Taps<F> lo = to_float_taps<F>(W::rec_lo);
  static constexpr Taps<F> hi = to_float_taps<F>(W::rec_hi);
};

using transforms::BoundaryMode;
using transforms::DwtLayout;

// ---- Haar, one line ---------------------------------------------------------------------------

/// One forward Haar level of n samples into m = ceil(n/2) approximation and detail samples.
/// Odd n: the missing partner of the last sample is 0 (zero) or the sample itself
/// (periodization); both modes agree otherwise.
template <class W>
inline void haar_forward_line(const float* __restrict x, index_t n, float* __restrict lo,
                              float* __restrict hi, BoundaryMode mode) {
  constexpr float h0 = DwtTaps<W>::lo[0], h1 = DwtTaps<W>::lo[1];
  constexpr float g0 = DwtTaps<W>::hi[0], g1 = DwtTaps<W>::hi[1];
  const index_t half = n / 2;
  for (index_t o = 0; o < half; ++o) {
    const float x0 = x[2 * o], x1 = x[2 * o + 1];
    lo[o] = h0 * x0 + h1 * x1;
    hi[o] = g0 * x0 + g1 * x1;
  }
  if (n % 2 != 0) {
    const float x0 = x[n - 1];
    const float x1 = mode == BoundaryMode::periodization ? x0 : 0.0f;
    lo[half] = h0 * x0 + h1 * x1;
    hi[half] = g0 * x0 + g1 * x1;
  }
}

/// One inverse Haar level: t samples (t = 2m or 2m - 1) from m approximation/detail samples.
template <class W>
inline void haar_inverse_line(const float* __restrict a, const float* __restrict d, index_t t,
                              float* __restrict x) {
  constexpr float h0 = DwtTaps<W>::lo[0], h1 = DwtTaps<W>::lo[1];
  constexpr float g0 = DwtTaps<W>::hi[0], g1 = DwtTaps<W>::hi[1];
  const index_t half = t / 2;
  for (index_t p = 0; p < half; ++p) {
    const float ap = a[p], dp = d[p];
    x[2 * p] = h0 * ap + g0 * dp;
    x[2 * p + 1] = h1 * ap + g1 * dp;
  }
  if (t % 2 != 0) x[t - 1] = h0 * a[half] + g0 * d[half];
}

// ---- general even-length filters, one line ------------------------------------------------------

/// Extended sample j of x (zero or periodic, as transforms::detail::dwt_source_index).
inline float extended_sample(const float* x, index_t j, index_t n, BoundaryMode mode) {
  const index_t i = transforms::detail::dwt_source_index(j, n, mode);
  return i < 0 ? 0.0f : x[i];
}

/// One forward level with an F-tap filter: n samples into m approximation and detail samples.
/// ye/yo (m + F/2 - 1 floats each) receive the even and odd samples of the extended input
///   y[i] = x_ext[i + shift],  c[o] = sum_k h[k] y[2o + k]
/// so that the convolution below has no boundary cases.
template <class W>
inline void filter_forward_line(const float* __restrict x, index_t n, index_t m, BoundaryMode mode,
                                float* __restrict ye, float* __restrict yo, float* __restrict lo,
                                float* __restrict hi) {
  constexpr int H = DwtTaps<W>::H;
  constexpr auto fl = DwtTaps<W>::lo;
  constexpr auto fh = DwtTaps<W>::hi;
  const index_t shift = transforms::detail::dwt_forward_shift(DwtTaps<W>::F, mode);  // <= 0
  const index_t pairs = m + H - 1;
  // Pairs mm with both 2mm+shift and 2mm+1+shift inside [0, n) are plain copies.
  const index_t first = std::min(pairs, (1 - shift) / 2);
  const index_t last = std::max(first, std::min(pairs, (n - shift) / 2));
  for (index_t mm = 0; mm < first; ++mm) {
    ye[mm] = extended_sample(x, 2 * mm + shift, n, mode);
    yo[mm] = extended_sample(x, 2 * mm + 1 + shift, n, mode);
  }
  const float* xs = x + shift;  // in range for every mm in [first, last)
  for (index_t mm = first; mm < last; ++mm) {
    ye[mm] = xs[2 * mm];
    yo[mm] = xs[2 * mm + 1];
  }
  for (index_t mm = last; mm < pairs; ++mm) {
    ye[mm] = extended_sample(x, 2 * mm + shift, n, mode);
    yo[mm] = extended_sample(x, 2 * mm + 1 + shift, n, mode);
  }
  for (index_t o = 0; o < m; ++o) {
    float l = 0.0f, h = 0.0f;
    for (int q = 0; q < H; ++q) {
      const float e = ye[o + q], od = yo[o + q];
      l += fl[2 * q] * e + fl[2 * q + 1] * od;
      h += fh[2 * q] * e + fh[2 * q + 1] * od;
    }
    lo[o] = l;
    hi[o] = h;
  }
}

/// The polyphase synthesis sum v[2p + r] = sum_q h[2q + r] c[p + F/2 - 1 - q] for p in
/// [0, pairs), written interleaved into v; the last odd sample is skipped when `odd_tail`.
template <class W>
inline void filter_synthesis(const float* __restrict a, const float* __restrict d, index_t pairs,
                             bool odd_tail, float* __restrict v) {
  constexpr int H = DwtTaps<W>::H;
  constexpr auto fl = DwtTaps<W>::lo;
  constexpr auto fh = DwtTaps<W>::hi;
  const index_t full = odd_tail ? pairs - 1 : pairs;
  for (index_t p = 0; p < full; ++p) {
    float e = 0.0f, od = 0.0f;
    for (int q = 0; q < H; ++q) {
      const float ap = a[p + H - 1 - q], dp = d[p + H - 1 - q];
      e += fl[2 * q] * ap + fh[2 * q] * dp;
      od += fl[2 * q + 1] * ap + fh[2 * q + 1] * dp;
    }
    v[2 * p] = e;
    v[2 * p + 1] = od;
  }
  if (odd_tail) {
    const index_t p = pairs - 1;
    float e = 0.0f;
    for (int q = 0; q < H; ++q)
      e += fl[2 * q] * a[p + H - 1 - q] + fh[2 * q] * d[p + H - 1 - q];
    v[2 * p] = e;
  }
}

/// One inverse level with an F-tap filter: t samples from m approximation/detail samples.
/// Scratch (periodization only): aext, dext (m + F/2 - 1 floats each) and v (2m floats).
template <class W>
inline void filter_inverse_line(const float* __restrict a, const float* __restrict d, index_t m,
                                index_t t, BoundaryMode mode, float* __restrict aext,
                                float* __restrict dext, float* __restrict v, float* __restrict x) {
  constexpr int H = DwtTaps<W>::H;
  if (mode == BoundaryMode::zero) {
    filter_synthesis<W>(a, d, (t + 1) / 2, t % 2 != 0, x);
    return;
  }
  // Periodization: coefficient index p - q wraps; pad by H - 1 on the left, then the output
  // is the synthesis rotated by H - 1 (transforms::detail::dwt_inverse_phase).
  const index_t padded = m + H - 1;
  for (index_t j = 0; j < padded; ++j) {
    const index_t i = transforms::detail::wrap_index(j - (H - 1), m);
    aext[j] = a[i];
    dext[j] = d[i];
  }
  filter_synthesis<W>(aext, dext, m, false, v);
  const index_t period = 2 * m;
  const index_t rot = H - 1;
  if (rot < period) {
    const index_t head = std::min(t, period - rot);
    std::memcpy(x, v + rot, static_cast<std::size_t>(head) * sizeof(float));
    if (t > head) std::memcpy(x + head, v, static_cast<std::size_t>(t - head) * sizeof(float));
  } else {
    for (index_t i = 0; i < t; ++i)
      x[i] = v[transforms::detail::wrap_index(i + rot, period)];
  }
}

// ---- whole rows ---------------------------------------------------------------------------------

/// Per-thread scratch of the row kernels, carved out of one float buffer.
struct RowScratch {
  float* in;     // copy of the input line (in place only): K floats
  float* stage;  // the finished output line before its streaming copy: K floats
  float* ping;   // intermediate approximations: max N_l floats each
  float* pong;
  float* ye;  // forward polyphase halves: max N_l + F/2 floats each
  float* yo;
  float* aext;  // inverse periodization padding: max N_l + F/2 floats each
  float* dext;
  float* v;  // inverse periodization synthesis: 2 max N_l floats

  static constexpr std::size_t round_up(std::size_t n) { return (n + 15) / 16 * 16; }
  static std::size_t floats(const DwtLayout& lay) {
    const auto k = static_cast<std::size_t>(lay.total);
    const auto nm = static_cast<std::size_t>(lay.max_level_length());
    const auto h = static_cast<std::size_t>(lay.filter_length / 2);
    return 2 * round_up(k) + 2 * round_up(nm) + 4 * round_up(nm + h) + round_up(2 * nm);
  }
  static RowScratch carve(float* base, const DwtLayout& lay) {
    const auto k = static_cast<std::size_t>(lay.total);
    const auto nm = static_cast<std::size_t>(lay.max_level_length());
    const auto h = static_cast<std::size_t>(lay.filter_length / 2);
    RowScratch s{};
    float* p = base;
    s.in = p, p += round_up(k);
    s.stage = p, p += round_up(k);
    s.ping = p, p += round_up(nm);
    s.pong = p, p += round_up(nm);
    s.ye = p, p += round_up(nm + h);
    s.yo = p, p += round_up(nm + h);
    s.aext = p, p += round_up(nm + h);
    s.dext = p, p += round_up(nm + h);
    s.v = p;
    return s;
  }
};

/// All levels of one line: x (n samples) into the packed coefficients out (K floats).
template <class W>
inline void forward_row(const float* x, float* out, const DwtLayout& lay, const RowScratch& s) {
  const float* src = x;
  index_t n = lay.n;
  for (int l = 1; l <= lay.levels; ++l) {
    const index_t m = lay.length[l];
    float* a = l == lay.levels ? out : (l % 2 == 1 ? s.ping : s.pong);
    float* d = out + lay.detail_offset[l];
    if constexpr (W::filter_length == 2)
      haar_forward_line<W>(src, n, a, d, lay.mode);
    else
      filter_forward_line<W>(src, n, m, lay.mode, s.ye, s.yo, a, d);
    src = a;
    n = m;
  }
}

/// All levels of one line: packed coefficients c (K floats) into x (n samples).
template <class W>
inline void inverse_row(const float* c, float* x, const DwtLayout& lay, const RowScratch& s) {
  const float* a = c;
  for (int l = lay.levels; l >= 1; --l) {
    const index_t m = lay.length[l];
    const index_t t = lay.length[l - 1];
    const float* d = c + lay.detail_offset[l];
    float* dst = l == 1 ? x : ((lay.levels - l) % 2 == 0 ? s.ping : s.pong);
    if constexpr (W::filter_length == 2)
      haar_inverse_line<W>(a, d, t, dst);
    else
      filter_inverse_line<W>(a, d, m, t, lay.mode, s.aext, s.dext, s.v, dst);
    a = dst;
  }
}

// ---- streaming stores -------------------------------------------------------------------------

/// Output matrices at least this large are written with non-temporal stores: they do not fit
/// in the last-level cache anyway, and skipping the read-for-ownership of every written line
/// cuts the memory traffic of a pass from 3 to 2 matrix sizes. Smaller outputs are written
/// normally so that the next step (Adam on a_L) finds them in cache.
inline constexpr std::size_t dwt_streaming_bytes = std::size_t{16} << 20;

/// dst[0, n) = src[0, n) with non-temporal stores where the target is 16-byte aligned (SSE2,
/// the x86-64 baseline); a plain copy elsewhere. Call store_fence() before others read dst.
inline void stream_copy(float* dst, const float* src, index_t n) {
#if defined(__SSE2__)
  index_t i = 0;
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15u) != 0; ++i)
    dst[i] = src[i];
  for (; i + 16 <= n; i += 16) {
    const __m128 a = _mm_loadu_ps(src + i), b = _mm_loadu_ps(src + i + 4);
    const __m128 c = _mm_loadu_ps(src + i + 8), d = _mm_loadu_ps(src + i + 12);
    _mm_stream_ps(dst + i, a);
    _mm_stream_ps(dst + i + 4, b);
    _mm_stream_ps(dst + i + 8, c);
    _mm_stream_ps(dst + i + 12, d);
  }
  for (; i + 4 <= n; i += 4)
    _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  for (; i < n; ++i)
    dst[i] = src[i];
#else
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
#endif
}

/// Orders this thread's non-temporal stores before its later stores (and the barrier after).
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- column strips ------------------------------------------------------------------------------

/// Columns per strip for Axis::cols: a multiple of the vector width and of a cache line.
inline constexpr index_t dwt_strip = 64;
/// Lanes per accumulator block in the strip kernels.
inline constexpr index_t dwt_lane_block = 16;

/// out[j] (and out2[j]) = weighted sums of `taps` input rows, for j in [0, w). Accumulates in
/// locals so the compiler need not prove that rows and outputs do not alias.
template <int Taps>
inline void weighted_rows(const float* const (&rows)[Taps], const float (&wa)[Taps],
                          const float (&wb)[Taps], index_t w, float* out_a, float* out_b) {
  index_t j0 = 0;
  for (; j0 + dwt_lane_block <= w; j0 += dwt_lane_block) {
    float acc_a[dwt_lane_block] = {}, acc_b[dwt_lane_block] = {};
    for (int k = 0; k < Taps; ++k) {
      const float* r = rows[k] + j0;
      for (index_t j = 0; j < dwt_lane_block; ++j) {
        acc_a[j] += wa[k] * r[j];
        acc_b[j] += wb[k] * r[j];
      }
    }
    for (index_t j = 0; j < dwt_lane_block; ++j) {
      out_a[j0 + j] = acc_a[j];
      if (out_b != nullptr) out_b[j0 + j] = acc_b[j];
    }
  }
  for (; j0 < w; ++j0) {
    float sa = 0.0f, sb = 0.0f;
    for (int k = 0; k < Taps; ++k) {
      sa += wa[k] * rows[k][j0];
      sb += wb[k] * rows[k][j0];
    }
    out_a[j0] = sa;
    if (out_b != nullptr) out_b[j0] = sb;
  }
}

/// One forward level across a strip of w columns: rows of src (n rows, stride ss) into m
/// approximation rows (lo, stride ls) and m detail rows (hi, stride hs).
template <class W>
inline void forward_strip_level(const float* src, index_t ss, index_t n, index_t m,
                                BoundaryMode mode, const float* zeros, index_t w, float* lo,
                                index_t ls, float* hi, index_t hs) {
  constexpr int F = DwtTaps<W>::F;
  float wl[F], wh[F];
  for (int k = 0; k < F; ++k) {
    wl[k] = DwtTaps<W>::lo[k];
    wh[k] = DwtTaps<W>::hi[k];
  }
  const index_t shift = transforms::detail::dwt_forward_shift(F, mode);
  for (index_t o = 0; o < m; ++o) {
    const float* rows[F];
    for (int k = 0; k < F; ++k) {
      const index_t i = transforms::detail::dwt_source_index(2 * o + k + shift, n, mode);
      rows[k] = i < 0 ? zeros : src + i * ss;
    }
    weighted_rows<F>(rows, wl, wh, w, lo + o * ls, hi + o * hs);
  }
}

/// One inverse level across a strip: t output rows from m approximation rows (a, stride as)
/// and m detail rows (d, stride ds).
template <class W>
inline void inverse_strip_level(const float* a, index_t as, const float* d, index_t ds, index_t m,
                                index_t t, BoundaryMode mode, index_t w, float* x, index_t xs) {
  constexpr int F = DwtTaps<W>::F;
  constexpr int H = DwtTaps<W>::H;
  for (index_t i = 0; i < t; ++i) {
    const index_t u = transforms::detail::dwt_inverse_phase(i, m, F, mode);
    const index_t p = u / 2;
    const auto r = static_cast<int>(u % 2);
    const float* rows[2 * H];
    float wt[2 * H], unused[2 * H];
    for (int q = 0; q < H; ++q) {
      const index_t c = transforms::detail::dwt_inverse_index(p, q, m, F, mode);
      rows[2 * q] = a + c * as;
      rows[2 * q + 1] = d + c * ds;
      wt[2 * q] = DwtTaps<W>::lo[2 * q + r];
      wt[2 * q + 1] = DwtTaps<W>::hi[2 * q + r];
      unused[2 * q] = unused[2 * q + 1] = 0.0f;
    }
    weighted_rows<2 * H>(rows, wt, unused, w, x + i * xs, nullptr);
  }
}

/// Per-thread scratch of the strip kernels.
struct StripScratch {
  float* in;  // copy of the input strip (in place only): lines × strip floats
  float* ping;
  float* pong;
  float* zeros;  // one zero row (mode 'zero' padding)

  static std::size_t floats(const DwtLayout& lay, index_t in_rows) {
    const auto w = static_cast<std::size_t>(dwt_strip);
    return (static_cast<std::size_t>(in_rows) +
            2 * static_cast<std::size_t>(lay.max_level_length()) + 1) *
           w;
  }
  static StripScratch carve(float* base, const DwtLayout& lay, index_t in_rows) {
    const auto w = static_cast<std::size_t>(dwt_strip);
    const auto nm = static_cast<std::size_t>(lay.max_level_length());
    StripScratch s{};
    s.in = base;
    s.ping = s.in + static_cast<std::size_t>(in_rows) * w;
    s.pong = s.ping + nm * w;
    s.zeros = s.pong + nm * w;
    std::fill(s.zeros, s.zeros + w, 0.0f);
    return s;
  }
};

/// require() without building the message unless it fails: forward/inverse run every step,
/// and slimgrad::require takes a std::string (a heap allocation for any long message).
inline void dwt_require(bool ok, const char* message) {
  if (!ok) require(false, message);
}

/// cpu::require_shape, with its message built only on failure.
template <class T>
void dwt_require_shape(const HostView<T>& v, Shape expected, const char* what) {
  if (v.rows != expected.rows || v.cols != expected.cols || v.ld < v.cols ||
      (v.data == nullptr && !v.empty()))
    require_shape(v, expected, what);
}

/// First address past the last element of a view (as an integer, to compare any two views).
template <class T>
std::uintptr_t view_end(const HostView<T>& v) {
  return reinterpret_cast<std::uintptr_t>(v.data + (v.rows - 1) * v.ld + v.cols);
}
template <class T>
std::uintptr_t view_begin(const HostView<T>& v) {
  return reinterpret_cast<std::uintptr_t>(v.data);
}

/// false: disjoint; true: the supported in-place configuration (same start, same leading
/// dimension); throws on any other overlap.
inline bool check_aliasing(HostView<const float> in, HostView<float> out, const char* what) {
  if (in.empty() || out.empty()) return false;
  const bool disjoint = view_end(in) <= view_begin(out) || view_end(out) <= view_begin(in);
  if (disjoint) return false;
  if (in.data != out.data || in.ld != out.ld)
    require(false, std::string(what) +
                       ": input and output overlap; in place they must start at the same address "
                       "with the same leading dimension");
  return true;
}

}  // namespace cpu::detail

/// GWT's DWT on the CPU: see the top of this file for the kernels, the in-place rules and the
/// scratch it grows once; see transforms/dwt.hpp for the semantics and the coefficient layout.
/// State cost: 0 bytes per parameter (State is empty).
template <class Wavelet, int Levels>
struct impl<transforms::Dwt<Wavelet, Levels>, backend::cpu> {
  using Transform = transforms::Dwt<Wavelet, Levels>;
  using Options = typename Transform::Options;
  /// No per-tensor state: the filters are constants.
  struct State {};

  impl() = default;
  /// Validates the options (an enum cast from a bad integer is rejected).
  explicit impl(const Options& options) : options_(options) {
    require(options.mode == transforms::BoundaryMode::zero ||
                options.mode == transforms::BoundaryMode::periodization,
            "dwt: boundary mode must be zero or periodization");
    require(options.axis == transforms::Axis::rows || options.axis == transforms::Axis::cols,
            "dwt: axis must be rows or cols");
  }

  const Options& options() const { return options_; }

  /// Validates the gradient shape (both dimensions at least 1); returns the empty state.
  State init(Shape g, std::uint64_t /*tensor_id*/) const {
    require(g.rows > 0 && g.cols > 0, "dwt transform: zero-size tensor");
    return {};
  }
  /// m×K (Axis::rows) or K×n (Axis::cols); see transforms/dwt.hpp.
  Shape coeff_shape(Shape g) const { return Transform::coeff_shape(g, options_); }
  /// The packed layout of one transformed line of a gradient of shape g.
  transforms::DwtLayout layout(Shape g) const {
    return Transform::layout(Transform::line_length(g, options_), options_.mode);
  }
  std::size_t state_bytes(Shape) const { return 0; }
  /// Bytes of scratch this object holds now (grown on first use, then reused).
  std::size_t workspace_bytes() const { return scratch_.capacity() * sizeof(float); }

  /// The a_L block: the leading N_L columns (rows axis) or rows (cols axis) of coeffs.
  /// Throws when coeffs' packed extent K is not the packed length of any input length.
  HostView<float> tracked(HostView<float> coeffs) const { return tracked_block(coeffs); }
  HostView<const float> tracked(HostView<const float> coeffs) const {
    return tracked_block(coeffs);
  }

  /// Nothing to refresh: the basis is fixed.
  bool refresh(State&, HostView<const float>, index_t) { return false; }

  /// coeffs = wavedec(G) in the packed layout. In place when coeffs starts at G's address
  /// with G's leading dimension (see the top of this file).
  void forward(const State&, HostView<const float> g, HostView<float> coeffs) {
    cpu::detail::dwt_require(g.rows > 0 && g.cols > 0, "dwt forward: zero-size gradient");
    cpu::detail::dwt_require(g.ld >= g.cols && g.data != nullptr,
                             "dwt forward: invalid gradient view");
    cpu::detail::dwt_require_shape(coeffs, coeff_shape(g.shape()), "dwt forward output");
    const bool in_place = cpu::detail::check_aliasing(g, coeffs, "dwt forward");
    const transforms::DwtLayout lay = layout(g.shape());
    if (options_.axis == transforms::Axis::rows)
      forward_rows(g, coeffs, lay, in_place);
    else
      forward_cols(g, coeffs, lay, in_place);
  }

  /// out = waverec(coeffs)[:, :n] (or [:m, :] for cols). In place when out starts at
  /// coeffs' address with coeffs' leading dimension.
  void inverse(const State&, HostView<const float> coeffs, HostView<float> out) {
    cpu::detail::dwt_require(out.rows > 0 && out.cols > 0, "dwt inverse: zero-size output");
    cpu::detail::dwt_require(out.ld >= out.cols && out.data != nullptr,
                             "dwt inverse: invalid output view");
    cpu::detail::dwt_require_shape(coeffs, coeff_shape(out.shape()), "dwt inverse coefficients");
    const bool in_place = cpu::detail::check_aliasing(coeffs, out, "dwt inverse");
    const transforms::DwtLayout lay = layout(out.shape());
    if (options_.axis == transforms::Axis::rows)
      inverse_rows(coeffs, out, lay, in_place);
    else
      inverse_cols(coeffs, out, lay, in_place);
  }

 private:
  template <class T>
  HostView<T> tracked_block(HostView<T> coeffs) const {
    const bool rows = options_.axis == transforms::Axis::rows;
    const index_t k = rows ? coeffs.cols : coeffs.rows;
    const index_t a =
        transforms::dwt_approx_length_for_total(k, Transform::filter_length, Levels, options_.mode);
    if (a <= 0)
      require(false, "dwt tracked: the coefficient buffer's extent " + std::to_string(k) +
                         " is not the packed length of any input");
    return rows ? coeffs.block(0, 0, coeffs.rows, a) : coeffs.block(0, 0, a, coeffs.cols);
  }

  static bool streaming(HostView<float> out) {
    return static_cast<std::size_t>(out.size()) * sizeof(float) >= cpu::detail::dwt_streaming_bytes;
  }

  /// Runs body(i, scratch) for i in [0, count) over OpenMP threads, each with its own slice of
  /// `per_thread` floats of the grown-once scratch.
  template <class Body>
  void run(index_t count, index_t work_per_item, std::size_t per_thread, Body&& body) {
    per_thread = (per_thread + 15) / 16 * 16;  // slices start on their own cache lines
    int threads = 1;
#if defined(_OPENMP)
    if (count > 1 && count * work_per_item >= (index_t{1} << 15))
      threads = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(count)));
#endif
    const std::size_t need = per_thread * static_cast<std::size_t>(threads);
    if (scratch_.size() < need) scratch_.resize(need);
    float* base = scratch_.data();
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
      float* mine = base + per_thread * static_cast<std::size_t>(omp_get_thread_num());
      // Dynamic chunks of contiguous lines: a thread that loses its core on a shared machine
      // does not hold the others up at the barrier, and each chunk is still a sequential stream.
#pragma omp for schedule(dynamic, 8) nowait
      for (index_t i = 0; i < count; ++i)
        body(i, mine);
      cpu::detail::store_fence();
    }
#else
    for (index_t i = 0; i < count; ++i)
      body(i, base);
    cpu::detail::store_fence();
#endif
  }

  void forward_rows(HostView<const float> g, HostView<float> c, const transforms::DwtLayout& lay,
                    bool in_place) {
    using cpu::detail::RowScratch;
    const bool stream = streaming(c);
    run(g.rows, g.cols * 2, RowScratch::floats(lay), [&](index_t i, float* ws) {
      const RowScratch s = RowScratch::carve(ws, lay);
      const float* x = g.row(i);
      if (in_place) {
        std::memcpy(s.in, x, static_cast<std::size_t>(g.cols) * sizeof(float));
        x = s.in;
      }
      if (stream) {
        cpu::detail::forward_row<Wavelet>(x, s.stage, lay, s);
        cpu::detail::stream_copy(c.row(i), s.stage, c.cols);
      } else {
        cpu::detail::forward_row<Wavelet>(x, c.row(i), lay, s);
      }
    });
  }

  void inverse_rows(HostView<const float> c, HostView<float> out, const transforms::DwtLayout& lay,
                    bool in_place) {
    using cpu::detail::RowScratch;
    const bool stream = streaming(out);
    run(out.rows, out.cols * 2, RowScratch::floats(lay), [&](index_t i, float* ws) {
      const RowScratch s = RowScratch::carve(ws, lay);
      const float* ci = c.row(i);
      if (in_place) {
        std::memcpy(s.in, ci, static_cast<std::size_t>(c.cols) * sizeof(float));
        ci = s.in;
      }
      if (stream) {
        cpu::detail::inverse_row<Wavelet>(ci, s.stage, lay, s);
        cpu::detail::stream_copy(out.row(i), s.stage, out.cols);
      } else {
        cpu::detail::inverse_row<Wavelet>(ci, out.row(i), lay, s);
      }
    });
  }

  void forward_cols(HostView<const float> g, HostView<float> c, const transforms::DwtLayout& lay,
                    bool in_place) {
    using cpu::detail::StripScratch;
    const index_t sw = cpu::detail::dwt_strip;
    const index_t strips = (g.cols + sw - 1) / sw;
    const index_t in_rows = in_place ? g.rows : 0;
    run(strips, g.rows * sw * 2, StripScratch::floats(lay, in_rows), [&](index_t b, float* ws) {
      const StripScratch s = StripScratch::carve(ws, lay, in_rows);
      const index_t c0 = b * sw;
      const index_t w = std::min(sw, g.cols - c0);
      const float* src = g.data + c0;
      index_t ss = g.ld;
      if (in_place) {
        for (index_t r = 0; r < g.rows; ++r)
          std::memcpy(s.in + r * sw, g.row(r) + c0, static_cast<std::size_t>(w) * sizeof(float));
        src = s.in;
        ss = sw;
      }
      index_t n = lay.n;
      for (int l = 1; l <= lay.levels; ++l) {
        const index_t m = lay.length[l];
        const bool last = l == lay.levels;
        float* a = last ? c.data + c0 : (l % 2 == 1 ? s.ping : s.pong);
        const index_t as = last ? c.ld : sw;
        cpu::detail::forward_strip_level<Wavelet>(src, ss, n, m, lay.mode, s.zeros, w, a, as,
                                                  c.row(lay.detail_offset[l]) + c0, c.ld);
        src = a;
        ss = as;
        n = m;
      }
    });
  }

  void inverse_cols(HostView<const float> c, HostView<float> out, const transforms::DwtLayout& lay,
                    bool in_place) {
    using cpu::detail::StripScratch;
    const index_t sw = cpu::detail::dwt_strip;
    const index_t strips = (out.cols + sw - 1) / sw;
    const index_t in_rows = in_place ? c.rows : 0;
    run(strips, c.rows * sw * 2, StripScratch::floats(lay, in_rows), [&](index_t b, float* ws) {
      const StripScratch s = StripScratch::carve(ws, lay, in_rows);
      const index_t c0 = b * sw;
      const index_t w = std::min(sw, out.cols - c0);
      const float* base = c.data + c0;
      index_t cs = c.ld;
      if (in_place) {
        for (index_t r = 0; r < c.rows; ++r)
          std::memcpy(s.in + r * sw, c.row(r) + c0, static_cast<std::size_t>(w) * sizeof(float));
        base = s.in;
        cs = sw;
      }
      const float* a = base;
      index_t as = cs;
      for (int l = lay.levels; l >= 1; --l) {
        const bool last = l == 1;
        float* dst = last ? out.data + c0 : ((lay.levels - l) % 2 == 0 ? s.ping : s.pong);
        const index_t xs = last ? out.ld : sw;
        cpu::detail::inverse_strip_level<Wavelet>(a, as, base + lay.detail_offset[l] * cs, cs,
                                                  lay.length[l], lay.length[l - 1], lay.mode, w,
                                                  dst, xs);
        a = dst;
        as = xs;
      }
    });
  }

  Options options_{};
  std::vector<float> scratch_;
};

static_assert(transform_policy<transforms::Dwt<transforms::Haar, 2>, backend::cpu>);
static_assert(transform_policy<transforms::Dwt<transforms::Db4, 1>, backend::cpu>);

}  // namespace slimgrad
