// slimgrad/transforms/wavelets.hpp — orthonormal wavelet tags for transforms::Dwt (GWT,
// algorithms.md §1.1). State cost: 0 bytes (the filters are compile-time constants).
//
// Each tag holds PyWavelets' four filters for the wavelet of the same name, copied with full
// double precision from pywt 1.1.1 (`pywt.Wavelet(name).dec_lo` etc.), so that slimgrad's
// coefficients are pywt's coefficients, sign convention included. pywt's convolution reads the
// *reversed* decomposition filter, which is the reconstruction filter for an orthonormal
// wavelet (rec_lo[k] = dec_lo[F-1-k], rec_hi[k] = dec_hi[F-1-k]); the kernels therefore run on
// rec_lo / rec_hi in both directions.
#pragma once

#include <concepts>

namespace slimgrad::transforms {

/// Haar (= db1): filter length 2. The default and only wavelet in GWT's published scripts.
struct Haar {
  static constexpr const char* name = "haar";
  static constexpr int filter_length = 2;
  static constexpr double dec_lo[2] = {0.7071067811865476, 0.7071067811865476};
  static constexpr double dec_hi[2] = {-0.7071067811865476, 0.7071067811865476};
  static constexpr double rec_lo[2] = {0.7071067811865476, 0.7071067811865476};
  static constexpr double rec_hi[2] = {0.7071067811865476, -0.7071067811865476};
};

/// Daubechies 2 (two vanishing moments): filter length 4.
struct Db2 {
  static constexpr const char* name = "db2";
  static constexpr int filter_length = 4;
  static constexpr double dec_lo[4] = {-0.12940952255126037, 0.2241438680420134, 0.8365163037378079,
                                       0.48296291314453416};
  static constexpr double dec_hi[4] = {-0.48296291314453416, 0.8365163037378079,
                                       -0.2241438680420134, -0.12940952255126037};
  static constexpr double rec_lo[4] = {0.48296291314453416, 0.8365163037378079, 0.2241438680420134,
                                       -0.12940952255126037};
  static constexpr double rec_hi[4] = {-0.12940952255126037, -0.2241438680420134,
                                       0.8365163037378079, -0.48296291314453416};
};

/// Daubechies 4 (four vanishing moments): filter length 8.
struct Db4 {
  static constexpr const char* name = "db4";
  static constexpr int filter_length = 8;
  static constexpr double dec_lo[8] = {
      -0.010597401785069032, 0.0328830116668852, 0.030841381835560764, -0.18703481171909309,
      -0.027983769416859854, 0.6308807679298589, 0.7148465705529157,   0.2303778133088965};
  static constexpr double dec_hi[8] = {
      -0.2303778133088965, 0.7148465705529157,   -0.6308807679298589, -0.027983769416859854,
      0.18703481171909309, 0.030841381835560764, -0.0328830116668852, -0.010597401785069032};
  static constexpr double rec_lo[8] = {
      0.2303778133088965,   0.7148465705529157,   0.6308807679298589, -0.027983769416859854,
      -0.18703481171909309, 0.030841381835560764, 0.0328830116668852, -0.010597401785069032};
  static constexpr double rec_hi[8] = {
      -0.010597401785069032, -0.0328830116668852, 0.030841381835560764, 0.18703481171909309,
      -0.027983769416859854, -0.6308807679298589, 0.7148465705529157,   -0.2303778133088965};
};

/// A wavelet tag: a name and four even-length filters of equal length.
template <class W>
concept wavelet_tag = requires {
  { W::name } -> std::convertible_to<const char*>;
  W::filter_length;
  W::dec_lo[0];
  W::dec_hi[0];
  W::rec_lo[0];
  W::rec_hi[0];
}
&&W::filter_length >= 2 && W::filter_length % 2 == 0;

}  // namespace slimgrad::transforms
