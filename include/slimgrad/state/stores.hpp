// slimgrad/state/stores.hpp — StateStore descriptors: how one moment tensor of an optimizer is
// held in memory (design.md §1).
//
// A store descriptor names a format in its type and its runtime knobs in Options; the backend
// implementation impl<Store, Backend> (backend/<name>/stores.hpp) owns the buffers and converts
// between the stored format and fp32 working values. The update rule always computes in fp32:
// it either works in place on direct() memory (fp32 formats) or loads a range of elements into
// fp32 scratch, updates it and stores it back.
//
// Contract of impl<S, Backend> for the elementwise stores (Fp32, Bf16, Q8Block<B>):
//
//   impl(); explicit impl(const S::Options&)      validates the options (Error on bad values)
//   Buffer make(index_t count, Moment kind)       one zero-initialised moment tensor
//   size_t bytes(const Buffer&)                    exact bytes held (data + absmax + ...)
//   static size_t bytes_for(count, kind, opts)     the same number without a buffer
//   static constexpr index_t alignment            ranges start at a multiple of it and end at a
//                                                  multiple or at count
//   float* direct(Buffer&)                         fp32 data if the format is fp32, else nullptr
//   void load(const Buffer&, begin, end, float*)   stored → fp32 for elements [begin, end)
//   void store(Buffer&, begin, end, const float*, const random::Key&)   fp32 → stored
//
// Factored (Adafactor) adds make(Shape, Moment), accumulate() and inverse_sqrt_factors().
#pragma once

#include <cstdint>

#include "../core/config.hpp"

namespace slimgrad::state {

/// Which moment a buffer holds. The 8-bit store picks its code map from it: the first moment is
/// signed, the second moment (a running mean of squares) is non-negative.
enum class Moment : std::uint8_t { first, second };

/// Plain float32: 4 bytes per element. load/store are copies, direct() gives the data so the
/// rule works in place.
struct Fp32 {
  struct Options {};
  static constexpr const char* name = "fp32";
};

/// bfloat16: 2 bytes per element. Stores round to nearest even, or stochastically (unbiased)
/// when `stochastic_rounding` is set; element e then uses the Philox word of index e under the
/// key passed to store() (numeric.hpp documents the rounding exactly). The pure-bf16 recipe of
/// the GaLore-family papers keeps states this way (algorithms.md §0.5, §8.8). `seed` is for the
/// caller to build the store() key from (Key{seed, tensor id, step}); the store itself uses only
/// the key it is given.
struct Bf16 {
  struct Options {
    bool stochastic_rounding = false;
    std::uint64_t seed = 0;
  };
  static constexpr const char* name = "bf16";
};

/// Blockwise dynamic 8-bit quantisation (bitsandbytes, Dettmers et al. 2022, "8-bit Optimizers
/// via Block-wise Quantization"; algorithms.md §6.5): one uint8 code per element plus one fp32
/// absmax per block of `Block` consecutive elements of the flattened tensor, i.e. 1 + 4/Block
/// bytes per element. Tensors with fewer than `min_8bit_size` elements stay fp32 (as in
/// bitsandbytes). Block = 256 is current bitsandbytes, 2048 the paper and GaLore-era default.
template <int Block = 256>
struct Q8Block {
  static_assert(Block > 0, "slimgrad: Q8Block needs a positive block size");
  struct Options {
    index_t min_8bit_size = 4096;
  };
  static constexpr const char* name = "q8block";
  static constexpr int block = Block;
};

/// Adafactor's factored second moment (Shazeer & Stern 2018; HF transformers' Adafactor,
/// algorithms.md §6.3): for an m×n matrix, a row vector r (m floats) and a column vector c
/// (n floats) with v̂_ij = r_i·c_j / mean(r); (m + n)·4 bytes instead of 4mn. First moments and
/// 1-D tensors are kept elementwise in fp32. `eps1` is added to g² before the means.
struct Factored {
  struct Options {
    float eps1 = 1e-30f;
  };
  static constexpr const char* name = "factored";
};

}  // namespace slimgrad::state
