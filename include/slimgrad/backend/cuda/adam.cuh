// slimgrad/backend/cuda/adam.cuh — MultiTensorAdam (api.hpp): Adam over many tensors in one
// launch, for the Fp32, Bf16 and Q8Block<256> stores.
//
// Work unit: 256 consecutive elements of one tensor, handled by one warp (8 elements a lane, as
// two 4-wide accesses 128 elements apart, so every access of the warp is coalesced). 256 is the
// 8-bit store's block: the warp holds a whole block's new moments in registers, so dequantise →
// update → absmax (a warp reduction) → requantise is one pass over the codes. The grid is
// persistent (a few blocks per multiprocessor, each warp striding over units), so the code maps
// are staged in shared memory once per block, as bitsandbytes does. Bytes per element: w, g,
// m, v read and w, m, v written (28 for fp32; 4 + 4 + 4 + 2·(1 + 4/256)·2 ≈ 16.1 for 8-bit).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../../core/philox.hpp"
#include "../../optim/adam.hpp"
#include "../../state/q8_math.hpp"
#include "../../state/stores.hpp"
#include "common.cuh"

namespace slimgrad::cuda {

namespace detail {

template <class Store>
struct is_q8 : std::false_type {};
template <int B>
struct is_q8<state::Q8Block<B>> : std::true_type {};

inline constexpr index_t adam_unit = 256;

struct AdamEntry {
  void* w;
  const void* g;
  std::uint16_t* wcopy;
  void* m;
  void* v;
  float* m_absmax;
  float* v_absmax;
  index_t count;
  std::uint64_t id;
  std::uint32_t vec;        // 4-wide parameter accesses are aligned
  std::uint32_t quantized;  // 8-bit store: codes + absmax (else fp32 moments)
};

template <class Store>
__device__ inline void load_moments4(const AdamEntry& e, index_t i, float (&m)[4], float (&v)[4]) {
  if constexpr (std::is_same_v<Store, state::Bf16>) {
    load4(static_cast<const std::uint16_t*>(e.m), i, e.count, i + 4 <= e.count, m);
    load4(static_cast<const std::uint16_t*>(e.v), i, e.count, i + 4 <= e.count, v);
  } else {
    load4(static_cast<const float*>(e.m), i, e.count, i + 4 <= e.count, m);
    load4(static_cast<const float*>(e.v), i, e.count, i + 4 <= e.count, v);
  }
}

/// Bf16 moments: nearest even, or stochastic with word e % 4 of Philox block e / 4 (i is a
/// multiple of 4: one block per 4 elements), as impl<Bf16, cpu>::store.
__device__ inline void store_bf16_moment4(std::uint16_t* p, index_t i, index_t n, bool stochastic,
                                          const random::Key& key, const float (&x)[4]) {
  if (!stochastic) {
    store4(p, i, n, i + 4 <= n, x);
    return;
  }
  const random::Block4 bits = random::block_bits(key, static_cast<std::uint64_t>(i / 4));
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (i + l < n) p[i + l] = numeric::bf16_bits_stochastic(x[l], bits.v[l]);
}

/// The 8-bit quantiser's search, accelerated for shared memory: state::q8::nearest_code's
/// uniform binary search reads 8 midpoints per value, and a warp's 32 random lookups conflict on
/// the banks (the 8-bit step then runs at a third of the memory bandwidth). Here a value's float
/// bits pick a bucket (exponent and 7 mantissa bits of |x|, per sign) whose entry is a lower
/// bound of the midpoint count; at most one midpoint of either map lies in a bucket (7 mantissa
/// bits suffice for both maps), so one or two comparisons finish the count. The index is
/// nearest_code's for every float, ties included (tests/cuda compares them on every code,
/// midpoint and their neighbours, through q8_nearest_codes). |x| > 1, NaN, and negative values of
/// the unsigned map take the full search.
struct Q8Buckets {
  static constexpr std::uint32_t tiny = 0x33800000u;              // 2^-24: below it, no midpoint
  static constexpr int count = ((0x3F800000u - tiny) >> 16) + 1;  // |x| in [2^-24, 1]
  std::uint8_t positive[count];
  std::uint8_t negative[count];
};

/// Number of midpoints below x: nearest_code's search without its tie rule.
__device__ inline int q8_count_below(const state::q8::CodeMap& map, float x) {
  int idx = 0;
  for (int step = 128; step > 0; step >>= 1)
    idx += step * static_cast<int>(x > map.mid[idx + step - 1]);
  return idx;
}

/// Fills the buckets of one map (run by a whole block).
__device__ inline void q8_fill_buckets(const state::q8::CodeMap& map, Q8Buckets& b) {
  for (int k = static_cast<int>(threadIdx.x); k < Q8Buckets::count; k += blockDim.x) {
    const auto start = static_cast<std::uint32_t>(k) + (Q8Buckets::tiny >> 16);
    const float lo = numeric::float_from_bits(start << 16);
    const float next = numeric::float_from_bits((start + 1) << 16);
    b.positive[k] = static_cast<std::uint8_t>(q8_count_below(map, lo));
    b.negative[k] = static_cast<std::uint8_t>(q8_count_below(map, -next));
  }
}

/// state::q8::nearest_code(map, x), through the buckets.
__device__ inline std::uint8_t q8_nearest(const state::q8::CodeMap& map, const Q8Buckets& b,
                                          bool is_signed, float x) {
  const std::uint32_t bits = numeric::float_bits(x);
  const std::uint32_t mag = bits & 0x7FFFFFFFu;
  const bool neg = (bits >> 31) != 0;
  if (mag > 0x3F800000u || (neg && !is_signed)) return state::q8::nearest_code(map, x);
  int idx = is_signed ? 127 : 0;  // the midpoints below −2^-24
  if (mag >= Q8Buckets::tiny) {
    const auto k = static_cast<int>((mag >> 16) - (Q8Buckets::tiny >> 16));
    idx = neg ? b.negative[k] : b.positive[k];
  }
  while (idx < state::q8::map_size - 1 && x > map.mid[idx])
    ++idx;
  if (idx < state::q8::map_size - 1 && (idx & 1) && x == map.mid[idx]) ++idx;
  return static_cast<std::uint8_t>(idx);
}

/// state::q8::quantize through the buckets (same code for every value and absmax).
__device__ inline std::uint8_t q8_quantize(const state::q8::CodeMap& map, const Q8Buckets& b,
                                           bool is_signed, float value, float absmax) {
  const float normalised = absmax > 0.0f ? value / absmax : 0.0f;
  std::uint8_t c = q8_nearest(map, b, is_signed, normalised);
  if (is_signed && (numeric::float_bits(map.code[c]) >> 31) != (numeric::float_bits(value) >> 31))
    c = static_cast<std::uint8_t>(value > 0.0f ? c + 1 : c - 1);
  return c;
}

template <class Store, Precision P>
__global__ void __launch_bounds__(256)
    adam_kernel(const AdamEntry* __restrict__ entries, const index_t* __restrict__ unit_begin,
                int ntensors, index_t units, optim::AdamStep s, bool stochastic, std::uint64_t seed,
                std::uint32_t epoch) {
  using PW = typename Params<P>::W;
  using PG = typename Params<P>::G;
  constexpr bool q8 = is_q8<Store>::value;
  __shared__ state::q8::CodeMap maps[q8 ? 2 : 1];
  __shared__ Q8Buckets buckets[q8 ? 2 : 1];
  if constexpr (q8) {
    const state::q8::CodeMap& sm = state::q8::signed_code_map();
    const state::q8::CodeMap& um = state::q8::unsigned_code_map();
    for (int j = static_cast<int>(threadIdx.x); j < state::q8::map_size; j += blockDim.x) {
      maps[0].code[j] = sm.code[j];
      maps[1].code[j] = um.code[j];
      if (j + 1 < state::q8::map_size) {
        maps[0].mid[j] = sm.mid[j];
        maps[1].mid[j] = um.mid[j];
      }
    }
    q8_fill_buckets(sm, buckets[0]);
    q8_fill_buckets(um, buckets[1]);
    __syncthreads();
  }
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const index_t nwarps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  for (index_t u = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; u < units;
       u += nwarps) {
    const int k = find_tensor(unit_begin, ntensors, u);
    const AdamEntry e = entries[k];
    const index_t base = (u - unit_begin[k]) * adam_unit;
    const bool vec = e.vec != 0;
    float g[2][4], w[2][4], m[2][4], v[2][4];
    index_t at[2];
    bool full[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      at[h] = base + h * 128 + lane * 4;
      full[h] = vec && at[h] + 4 <= e.count;
      load4(static_cast<const PG*>(e.g), at[h], e.count, full[h], g[h]);
      load4(static_cast<const PW*>(e.w), at[h], e.count, full[h], w[h]);
    }
    const bool quantized = q8 && e.quantized != 0;
    float am = 0.0f, av = 0.0f;  // the block's absmax before the step (8-bit)
    if (quantized) {
      am = e.m_absmax[base / adam_unit];
      av = e.v_absmax[base / adam_unit];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const auto* cm = static_cast<const std::uint8_t*>(e.m);
        const auto* cv = static_cast<const std::uint8_t*>(e.v);
        std::uint32_t wm = 0, wv = 0;  // 4 codes, little-endian
        if (at[h] + 4 <= e.count) {
          wm = __ldcs(reinterpret_cast<const unsigned*>(cm + at[h]));
          wv = __ldcs(reinterpret_cast<const unsigned*>(cv + at[h]));
        } else {
          for (int l = 0; l < 4; ++l)
            if (at[h] + l < e.count)
              wm |= std::uint32_t{cm[at[h] + l]} << (8 * l),
                  wv |= std::uint32_t{cv[at[h] + l]} << (8 * l);
        }
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          const bool in = at[h] + l < e.count;
          const auto c_m = static_cast<std::uint8_t>(wm >> (8 * l));
          const auto c_v = static_cast<std::uint8_t>(wv >> (8 * l));
          m[h][l] = in ? state::q8::dequantize(maps[0], c_m, am) : 0.0f;
          v[h][l] = in ? state::q8::dequantize(maps[q8 ? 1 : 0], c_v, av) : 0.0f;
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h)
        load_moments4<std::conditional_t<q8, state::Fp32, Store>>(e, at[h], m[h], v[h]);
    }
    // The CPU's update_apply, element by element (optim/adam.hpp).
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        optim::adam_moments(g[h][l], m[h][l], v[h][l], s);
        w[h][l] =
            optim::apply_update(w[h][l], m[h][l] / optim::adam_denominator(v[h][l], s), s.weight);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      store4(static_cast<PW*>(e.w), at[h], e.count, full[h], w[h]);
      if constexpr (P == Precision::fp32_master)
        if (e.wcopy != nullptr) store4(e.wcopy, at[h], e.count, full[h], w[h]);
    }
    if (quantized) {
      // absmax of the new moments over the block (NaNs skipped, as on the CPU), then codes.
      float nm = 0.0f, nv = 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int l = 0; l < 4; ++l)
          if (at[h] + l < e.count) {
            nm = state::q8::absmax_update(nm, m[h][l]);
            nv = state::q8::absmax_update(nv, v[h][l]);
          }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        nm = state::q8::absmax_update(nm, __shfl_xor_sync(0xFFFFFFFFu, nm, off));
        nv = state::q8::absmax_update(nv, __shfl_xor_sync(0xFFFFFFFFu, nv, off));
      }
      if (lane == 0) {
        e.m_absmax[base / adam_unit] = nm;
        e.v_absmax[base / adam_unit] = nv;
      }
      auto* cm = static_cast<std::uint8_t*>(e.m);
      auto* cv = static_cast<std::uint8_t*>(e.v);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        std::uint8_t qm[4], qv[4];
#pragma unroll
        for (int l = 0; l < 4; ++l) {
          qm[l] = q8_quantize(maps[0], buckets[0], true, m[h][l], nm);
          qv[l] = q8_quantize(maps[q8 ? 1 : 0], buckets[q8 ? 1 : 0], false, v[h][l], nv);
        }
        if (at[h] + 4 <= e.count) {
          __stcs(reinterpret_cast<unsigned*>(cm + at[h]),
                 qm[0] | (qm[1] << 8) | (qm[2] << 16) | (std::uint32_t{qm[3]} << 24));
          __stcs(reinterpret_cast<unsigned*>(cv + at[h]),
                 qv[0] | (qv[1] << 8) | (qv[2] << 16) | (std::uint32_t{qv[3]} << 24));
        } else {
#pragma unroll
          for (int l = 0; l < 4; ++l)
            if (at[h] + l < e.count) cm[at[h] + l] = qm[l], cv[at[h] + l] = qv[l];
        }
      }
    } else if constexpr (std::is_same_v<Store, state::Bf16>) {
      const random::Key km{seed, e.id, epoch};
      const random::Key kv{seed, ~e.id, epoch};  // the CPU's independent second-moment words
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        store_bf16_moment4(static_cast<std::uint16_t*>(e.m), at[h], e.count, stochastic, km, m[h]);
        store_bf16_moment4(static_cast<std::uint16_t*>(e.v), at[h], e.count, stochastic, kv, v[h]);
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        store4(static_cast<float*>(e.m), at[h], e.count, at[h] + 4 <= e.count, m[h]);
        store4(static_cast<float*>(e.v), at[h], e.count, at[h] + 4 <= e.count, v[h]);
      }
    }
  }
}

template <class Store>
struct AdamStoreLayout {
  /// Bytes of one moment tensor of n elements, in the CPU store's accounting.
  static void carve(Carver& c, index_t n, const typename Store::Options& o, MomentBuffers& mb) {
    mb.count = n;
    const auto count = static_cast<std::size_t>(n);
    if constexpr (is_q8<Store>::value) {
      static_assert(Store::block == adam_unit,
                    "slimgrad cuda: MultiTensorAdam supports Q8Block<256> (a warp per block)");
      mb.quantized = n >= o.min_8bit_size && n > 0;
      if (mb.quantized) {
        const std::size_t blocks = (count + adam_unit - 1) / adam_unit;
        mb.m = c.take<std::uint8_t>(count);
        mb.v = c.take<std::uint8_t>(count);
        mb.m_absmax = c.take<float>(blocks);
        mb.v_absmax = c.take<float>(blocks);
        return;
      }
      mb.m = c.take<float>(count);
      mb.v = c.take<float>(count);
    } else if constexpr (std::is_same_v<Store, state::Bf16>) {
      mb.m = c.take<std::uint16_t>(count);
      mb.v = c.take<std::uint16_t>(count);
    } else {
      static_assert(std::is_same_v<Store, state::Fp32>,
                    "slimgrad cuda: MultiTensorAdam supports the Fp32, Bf16 and Q8Block<256> "
                    "stores");
      mb.m = c.take<float>(count);
      mb.v = c.take<float>(count);
    }
  }
  static std::size_t bytes(const MomentBuffers& mb) {
    const auto count = static_cast<std::size_t>(mb.count);
    if (mb.quantized) return 2 * (count + (count + adam_unit - 1) / adam_unit * sizeof(float));
    if constexpr (std::is_same_v<Store, state::Bf16>) return 2 * count * sizeof(std::uint16_t);
    return 2 * count * sizeof(float);
  }
  /// Zero state, enqueued: codes at the map's 0.0 entry (127 signed, 0 unsigned), absmax 0.
  static void zero(const MomentBuffers& mb, cudaStream_t stream) {
    const auto count = static_cast<std::size_t>(mb.count);
    if (count == 0) return;
    if (mb.quantized) {
      const std::size_t blocks = (count + adam_unit - 1) / adam_unit;
      check(cudaMemsetAsync(mb.m, 127, count, stream), "cudaMemsetAsync");
      check(cudaMemsetAsync(mb.v, 0, count, stream), "cudaMemsetAsync");
      check(cudaMemsetAsync(mb.m_absmax, 0, blocks * sizeof(float), stream), "cudaMemsetAsync");
      check(cudaMemsetAsync(mb.v_absmax, 0, blocks * sizeof(float), stream), "cudaMemsetAsync");
      return;
    }
    const std::size_t elem = std::is_same_v<Store, state::Bf16> ? 2 : 4;
    check(cudaMemsetAsync(mb.m, 0, count * elem, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(mb.v, 0, count * elem, stream), "cudaMemsetAsync");
  }
};

}  // namespace detail

template <class Store>
std::size_t MultiTensorAdam<Store>::workspace_bytes(std::span<const Tensor> tensors,
                                                    const Options& options) {
  detail::Carver c;
  c.take<detail::AdamEntry>(tensors.size());
  c.take<index_t>(tensors.size() + 1);
  for (const Tensor& t : tensors) {
    MomentBuffers mb;
    detail::AdamStoreLayout<Store>::carve(c, t.size(), options.store, mb);
  }
  return c.bytes();
}

template <class Store>
MultiTensorAdam<Store>::MultiTensorAdam(std::span<const Tensor> tensors, const Options& options,
                                        void* workspace, std::size_t workspace_size,
                                        stream_t stream)
    : options_(options) {
  constexpr const char* who = "cuda::MultiTensorAdam";
  optim::Adam::validate(options.rule);
  if constexpr (detail::is_q8<Store>::value)
    require(options.store.min_8bit_size >= 0, "q8block store: min_8bit_size must not be negative");
  for (std::size_t k = 0; k < tensors.size(); ++k)
    detail::check_tensor(tensors[k], options.precision, k, who);
  detail::check_workspace(workspace, workspace_size, workspace_bytes(tensors, options), who);

  detail::Carver c{static_cast<char*>(workspace)};
  auto* entries = c.take<detail::AdamEntry>(tensors.size());
  auto* begin = c.take<index_t>(tensors.size() + 1);
  table_ = entries;
  std::vector<detail::AdamEntry> host(tensors.size());
  std::vector<index_t> host_begin(tensors.size() + 1, 0);
  moments_.resize(tensors.size());
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const Tensor& t = tensors[k];
    MomentBuffers& mb = moments_[k];
    detail::AdamStoreLayout<Store>::carve(c, t.size(), options.store, mb);
    state_bytes_ += detail::AdamStoreLayout<Store>::bytes(mb);
    bool vec = false;
    switch (options.precision) {
      case Precision::fp32:
        vec = detail::Params<Precision::fp32>::aligned(t);
        break;
      case Precision::bf16:
        vec = detail::Params<Precision::bf16>::aligned(t);
        break;
      case Precision::fp32_master:
        vec = detail::Params<Precision::fp32_master>::aligned(t);
        break;
    }
    host[k] = detail::AdamEntry{t.weight, t.grad,        t.weight_bf16,         mb.m,
                                mb.v,     mb.m_absmax,   mb.v_absmax,           t.size(),
                                t.id,     vec ? 1u : 0u, mb.quantized ? 1u : 0u};
    host_begin[k + 1] = host_begin[k] + (t.size() + detail::adam_unit - 1) / detail::adam_unit;
    detail::AdamStoreLayout<Store>::zero(mb, stream);
  }
  units_ = host_begin.back();
  // Synchronous copies from pageable memory: construction is setup, not a step.
  detail::check(cudaMemcpyAsync(entries, host.data(), host.size() * sizeof(detail::AdamEntry),
                                cudaMemcpyHostToDevice, stream),
                "cudaMemcpyAsync");
  detail::check(cudaMemcpyAsync(begin, host_begin.data(), host_begin.size() * sizeof(index_t),
                                cudaMemcpyHostToDevice, stream),
                "cudaMemcpyAsync");
  detail::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

template <class Store>
MomentBuffers MultiTensorAdam<Store>::moments(index_t tensor) const {
  require(tensor >= 0 && tensor < tensors(), "cuda::MultiTensorAdam: tensor index out of range");
  return moments_[static_cast<std::size_t>(tensor)];
}

template <class Store>
void MultiTensorAdam<Store>::step(stream_t stream) {
  const std::int64_t t = t_ + 1;
  const optim::AdamStep s = optim::Adam::step_scalars(options_.rule, t);
  t_ = t;
  if (units_ == 0) return;
  const auto* entries = static_cast<const detail::AdamEntry*>(table_);
  const auto* begin = reinterpret_cast<const index_t*>(
      static_cast<const char*>(table_) +
      detail::Carver::round_up(moments_.size() * sizeof(detail::AdamEntry)));
  constexpr int threads = 256;
  static const int sms = detail::sm_count();
  const index_t warps_needed = units_;
  const index_t blocks_needed = (warps_needed + threads / 32 - 1) / (threads / 32);
  const index_t max_blocks = static_cast<index_t>(sms) * 8;
  const auto blocks =
      static_cast<unsigned>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
  bool stochastic = false;
  if constexpr (std::is_same_v<Store, state::Bf16>) stochastic = options_.store.stochastic_rounding;
  const auto n = static_cast<int>(moments_.size());
  const auto epoch = static_cast<std::uint32_t>(t - 1);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, threads, 0, stream>>>(entries, begin, n, units_, s, stochastic, options_.seed,
                                           epoch);
  };
  switch (options_.precision) {
    case Precision::fp32:
      launch(detail::adam_kernel<Store, Precision::fp32>);
      break;
    case Precision::bf16:
      launch(detail::adam_kernel<Store, Precision::bf16>);
      break;
    case Precision::fp32_master:
      launch(detail::adam_kernel<Store, Precision::fp32_master>);
      break;
  }
  detail::check_launch("MultiTensorAdam::step");
}

namespace detail {
template <class T>
__global__ void q8_nearest_kernel(const T* x, std::uint8_t* codes, index_t n, bool is_signed) {
  __shared__ state::q8::CodeMap map;
  __shared__ Q8Buckets buckets;
  const state::q8::CodeMap& src =
      is_signed ? state::q8::signed_code_map() : state::q8::unsigned_code_map();
  for (int j = static_cast<int>(threadIdx.x); j < state::q8::map_size; j += blockDim.x) {
    map.code[j] = src.code[j];
    if (j + 1 < state::q8::map_size) map.mid[j] = src.mid[j];
  }
  q8_fill_buckets(src, buckets);
  __syncthreads();
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    codes[i] = q8_nearest(map, buckets, is_signed, x[i]);
}
}  // namespace detail

template <class T>
void q8_nearest_codes(const T* x, std::uint8_t* codes, index_t n, state::Moment kind,
                      stream_t stream) {
  static_assert(std::is_same_v<T, float>, "slimgrad cuda: q8_nearest_codes reads floats");
  if (n <= 0) return;
  const index_t blocks = (n + 255) / 256;
  detail::q8_nearest_kernel<T>
      <<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, 0, stream>>>(
          x, codes, n, kind == state::Moment::first);
  detail::check_launch("q8_nearest_codes");
}

}  // namespace slimgrad::cuda
