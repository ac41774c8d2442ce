// slimgrad/transforms/dwt.hpp — the multi-level 1-D orthonormal discrete wavelet transform of
// GWT (arXiv 2501.07237; algorithms.md §1.1). State cost: 0 bytes per parameter (no basis, no
// seed; the filters are compile-time constants). The optimizer keeps its state on the level-L
// approximation only: about n/2^L of every n coefficients.
//
// Semantics are exactly PyWavelets' (pywt 1.1.1, checked against it in tests/transforms):
//   forward  = pywt.wavedec(x, wavelet, level=L, mode=mode, axis=...)
//   inverse  = pywt.waverec(coeffs, wavelet, mode=mode, axis=...)[..., :n]
// with mode 'zero' (zero padding, the GWT default) or 'periodization'. Per level, a sequence of
// length N gives an approximation and a detail of equal length
//   zero:           floor((N + F - 1) / 2)      (F = filter length)
//   periodization:  ceil(N / 2)                 (odd N: the last sample is repeated once)
// pywt's waverec reconstructs one sample too many after a level whose input length was odd and
// drops it before the next level (and leaves it at the end); slimgrad crops the same way and
// returns exactly n samples, so inverse(forward(x)) == x up to float rounding for every
// wavelet, mode and length.
//
// Levels beyond pywt.dwt_max_level(n, F) are allowed, as in pywt (which only warns): every
// coefficient then feels the boundary, and in mode 'zero' the lengths stop shrinking (they
// settle at F - 2 or F - 1). The layout below gives the exact lengths in every case.
//
// COEFFICIENT LAYOUT (the contract other code relies on). For every transformed line (a row of
// G for Axis::rows, a column for Axis::cols) the coefficients are packed in pywt's wavedec
// order:
//
//     [ a_L | d_L | d_{L-1} | ... | d_1 ]        total length K = N_L + sum_{l=1..L} N_l
//
// where N_l = length of a_l = length of d_l (N_0 = n). a_L starts at 0; d_l starts at
// DwtLayout::detail_offset[l]. For Axis::rows the coefficients of G (m×n) are m×K (row i packs
// row i of G); for Axis::cols they are K×n (column j packs column j of G). The tracked block is
// the a_L part: columns [0, N_L) (rows) or rows [0, N_L) (cols).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "../core/config.hpp"
#include "../core/error.hpp"
#include "../core/view.hpp"
#include "wavelets.hpp"

namespace slimgrad::transforms {

/// How a level extends its input past the ends (pywt's mode names).
enum class BoundaryMode : std::uint8_t {
  zero,          ///< pywt 'zero': zeros outside the signal; lengths floor((N+F-1)/2)
  periodization  ///< pywt 'periodization': periodic, lengths ceil(N/2); orthogonal for even N
};

/// Which axis of an m×n matrix the 1-D transform runs along.
enum class Axis : std::uint8_t {
  rows,  ///< along each row, i.e. along n = in_features (GWT; pywt axis=-1 / axis=1)
  cols   ///< along each column, i.e. along m (pywt axis=0)
};

/// The most levels a Dwt may have. Far beyond any useful depth: n would have to exceed 2^30
/// for level 30 to still halve the length.
inline constexpr int dwt_max_levels = 30;

/// Lengths and offsets of the packed coefficients of one transformed line (see the layout
/// contract at the top of this file). Plain data, usable on host and device.
struct DwtLayout {
  index_t n = 0;   ///< input length along the transformed axis (N_0)
  int levels = 0;  ///< L
  BoundaryMode mode = BoundaryMode::zero;
  int filter_length = 0;                    ///< F
  index_t length[dwt_max_levels + 1] = {};  ///< length[l] = N_l = len(a_l) = len(d_l); [0] = n
  index_t detail_offset[dwt_max_levels + 1] = {};  ///< offset of d_l for l = 1..L ([0] unused)
  index_t total = 0;                               ///< K, the packed length

  /// Offset of a_L: always 0.
  SLIMGRAD_HOST_DEVICE constexpr index_t approx_offset() const { return 0; }
  /// Length of a_L: the tracked coefficients per line.
  SLIMGRAD_HOST_DEVICE constexpr index_t approx_length() const { return length[levels]; }
  /// Length of d_l (= length of a_l), l = 1..L.
  SLIMGRAD_HOST_DEVICE constexpr index_t detail_length(int l) const { return length[l]; }
  /// The longest a_l over l = 1..L (mode 'zero' can lengthen a tiny input; see above).
  SLIMGRAD_HOST_DEVICE constexpr index_t max_level_length() const {
    index_t m = 0;
    for (int l = 1; l <= levels; ++l)
      m = length[l] > m ? length[l] : m;
    return m;
  }
};

/// Length of the approximation (and of the detail) one level makes of n samples, as pywt's
/// dwt_coeff_len.
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_level_length(index_t n, int filter_length,
                                                        BoundaryMode mode) {
  if (n <= 0) return 0;
  return mode == BoundaryMode::periodization ? (n + 1) / 2 : (n + filter_length - 1) / 2;
}

/// The packed layout of an L-level transform of a line of n samples. levels must be in
/// [1, dwt_max_levels] (Dwt checks this at compile time); n = 0 gives an all-zero layout.
SLIMGRAD_HOST_DEVICE constexpr DwtLayout dwt_layout(index_t n, int filter_length, int levels,
                                                    BoundaryMode mode) {
  DwtLayout out;
  out.n = n;
  out.levels = levels;
  out.mode = mode;
  out.filter_length = filter_length;
  out.length[0] = n;
  for (int l = 1; l <= levels; ++l)
    out.length[l] = dwt_level_length(out.length[l - 1], filter_length, mode);
  index_t offset = out.length[levels];  // a_L first
  for (int l = levels; l >= 1; --l) {
    out.detail_offset[l] = offset;
    offset += out.length[l];
  }
  out.total = n > 0 ? offset : 0;
  return out;
}

/// N_L for the input lengths whose packed length is `total`, or -1 when no input length packs
/// to `total`. Well defined: every N_l is non-decreasing in n, so inputs with equal K have
/// equal N_L. Lets tracked() find a_L from the coefficient buffer's width alone.
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_approx_length_for_total(index_t total, int filter_length,
                                                                   int levels, BoundaryMode mode) {
  if (total <= 0) return -1;
  // K(n) >= n, so n lies in [1, total]; find the smallest n with K(n) >= total.
  index_t lo = 1, hi = total;
  while (lo < hi) {
    const index_t mid = lo + (hi - lo) / 2;
    if (dwt_layout(mid, filter_length, levels, mode).total >= total)
      hi = mid;
    else
      lo = mid + 1;
  }
  const DwtLayout l = dwt_layout(lo, filter_length, levels, mode);
  return l.total == total ? l.approx_length() : -1;
}

namespace detail {

/// Non-negative remainder (periodic extension of tiny inputs wraps more than once).
SLIMGRAD_HOST_DEVICE constexpr index_t wrap_index(index_t i, index_t period) {
  const index_t r = i % period;
  return r < 0 ? r + period : r;
}

/// Where sample j of the extended input comes from: an index in [0, n), or -1 for a zero.
/// Periodization extends an odd-length input by repeating its last sample once (pywt), then
/// repeats the even-length result periodically.
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_source_index(index_t j, index_t n, BoundaryMode mode) {
  if (j >= 0 && j < n) return j;
  if (mode == BoundaryMode::zero) return -1;
  const index_t padded = n + (n % 2);
  const index_t k = wrap_index(j, padded);
  return k < n ? k : n - 1;
}

/// Shift of the forward convolution: coefficient o of a level is
///   c[o] = sum_{k<F} h[k] * x_ext[2*o + k + dwt_forward_shift(F, mode)]
/// with h = rec_lo (approximation) or rec_hi (detail). This is pywt's downsampling_convolution
/// (zero: output index 2o+1 of the full convolution; periodization: index F/2 + 2o).
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_forward_shift(int filter_length, BoundaryMode mode) {
  return mode == BoundaryMode::zero ? index_t{2} - filter_length : index_t{1} - filter_length / 2;
}

/// The inverse of one level is the transpose of the forward (the filter bank is orthonormal)
/// cropped to the target length; pywt's idwt computes the same sums. Output sample t is
///   x[t] = sum_{q<F/2} rec_lo[2q+r] * a[i_q] + rec_hi[2q+r] * d[i_q]
/// with (p, r) from dwt_inverse_phase and i_q = dwt_inverse_index(p, q, ...).
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_inverse_phase(index_t t, index_t m, int filter_length,
                                                         BoundaryMode mode) {
  // zero: u = t; periodization: u = (t - shift) mod 2m. Returns u; p = u / 2, r = u % 2.
  return mode == BoundaryMode::zero ? t
                                    : wrap_index(t - dwt_forward_shift(filter_length, mode), 2 * m);
}
SLIMGRAD_HOST_DEVICE constexpr index_t dwt_inverse_index(index_t p, int q, index_t m,
                                                         int filter_length, BoundaryMode mode) {
  // In mode 'zero' every index lands inside [0, m) for t < n (pywt's "valid" reconstruction).
  return mode == BoundaryMode::zero ? p + filter_length / 2 - 1 - q : wrap_index(p - q, m);
}

}  // namespace detail

/// GWT's transform: an L-level orthonormal DWT with wavelet W along one axis of the gradient.
/// W is transforms::Haar, Db2 or Db4 (any wavelet_tag); Levels in [1, dwt_max_levels].
/// State cost: 0 bytes. Run it with impl<Dwt<W, L>, backend::cpu> (backend/cpu/dwt.hpp).
template <class Wavelet, int Levels>
struct Dwt {
  static_assert(wavelet_tag<Wavelet>, "Dwt: Wavelet must be a wavelet tag such as Haar or Db2");
  static_assert(Levels >= 1 && Levels <= dwt_max_levels, "Dwt: Levels must be in [1, 30]");

  using wavelet = Wavelet;
  static constexpr int levels = Levels;
  static constexpr int filter_length = Wavelet::filter_length;
  static constexpr const char* name = "dwt";

  /// Runtime choices (they change no storage type, only lengths and loops).
  struct Options {
    BoundaryMode mode = BoundaryMode::zero;  ///< GWT's default is pywt 'zero'
    Axis axis = Axis::rows;                  ///< GWT transforms along n (each row)
  };

  /// The packed layout of one transformed line of n samples.
  SLIMGRAD_HOST_DEVICE static constexpr DwtLayout layout(index_t n, BoundaryMode mode) {
    return dwt_layout(n, filter_length, Levels, mode);
  }
  /// Length of the transformed axis of g.
  SLIMGRAD_HOST_DEVICE static constexpr index_t line_length(Shape g, const Options& o) {
    return o.axis == Axis::rows ? g.cols : g.rows;
  }
  /// Shape of the coefficients of a gradient of shape g: m×K (rows) or K×n (cols).
  SLIMGRAD_HOST_DEVICE static constexpr Shape coeff_shape(Shape g, const Options& o) {
    const index_t k = layout(line_length(g, o), o.mode).total;
    return o.axis == Axis::rows ? Shape{g.rows, k} : Shape{k, g.cols};
  }
  /// Shape of the tracked block (a_L): m×N_L (rows) or N_L×n (cols).
  SLIMGRAD_HOST_DEVICE static constexpr Shape tracked_shape(Shape g, const Options& o) {
    const index_t a = layout(line_length(g, o), o.mode).approx_length();
    return o.axis == Axis::rows ? Shape{g.rows, a} : Shape{a, g.cols};
  }
};

/// pywt's name of a boundary mode.
inline const char* to_string(BoundaryMode m) {
  return m == BoundaryMode::zero ? "zero" : "periodization";
}
inline const char* to_string(Axis a) {
  return a == Axis::rows ? "rows" : "cols";
}

/// Parses pywt's mode names "zero" and "periodization" (also "zeros", "per").
inline BoundaryMode parse_boundary_mode(std::string_view s) {
  if (s == "zero" || s == "zeros" || s == "zpd") return BoundaryMode::zero;
  if (s == "periodization" || s == "per") return BoundaryMode::periodization;
  throw Error("slimgrad: unknown DWT boundary mode '" + std::string(s) +
              "' (expected zero or periodization)");
}
/// Parses "rows" and "cols".
inline Axis parse_axis(std::string_view s) {
  if (s == "rows" || s == "row") return Axis::rows;
  if (s == "cols" || s == "col" || s == "columns") return Axis::cols;
  throw Error("slimgrad: unknown DWT axis '" + std::string(s) + "' (expected rows or cols)");
}

}  // namespace slimgrad::transforms
