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
// With check_finite, a pass before the step reads the gradients (+4 bytes per fp32 gradient,
// +2 for bf16) and a kernel of one thread per tensor turns its flags into each tensor's skip
// and scalars, which the step kernel reads per unit.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
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

/// x / absmax, correctly rounded, from a reciprocal computed once per block: q0 = x·(1/b)
/// rounded, then one FMA correction (Markstein: with 1/b correctly rounded and q0 within an ulp
/// of x/b, q0 + (x − b·q0)·(1/b) rounds to x/b). Exact away from underflow; the 8-bit code of a
/// quotient below 2^-24 does not depend on its last bits (no midpoint lies there), and a divisor
/// whose reciprocal would not be normal takes the division itself.
struct Q8Divisor {
  float b, r;
  bool fast;
  __device__ explicit Q8Divisor(float absmax)
      : b(absmax), r(1.0f / absmax), fast(absmax > 0x1p-125f && absmax < 0x1p125f) {}
  __device__ float divide(float x) const {
    if (!fast) return x / b;
#if SLIMGRAD_DEVICE_PASS
    const float q0 = __fmul_rn(x, r);                // a product on its own: never contracted
    if (!(fabsf(q0) <= 0x1.fffffep127f)) return q0;  // ±inf (then |x/b| is huge too) or NaN
    return __fmaf_rn(__fmaf_rn(-b, q0, x), r, q0);
#else
    return x / b;  // not reached: kernels run on the device
#endif
  }
};

/// A code map as the kernels read it: the values, and the cell table (state::q8::nearest_code)
/// split in its halves of positive and negative values, each indexed by
/// state::q8::cell_index of the magnitude.
struct Q8Map {
  const float* code;
  const std::uint32_t* pos;
  const std::uint32_t* neg;
};

inline constexpr int q8_cells = state::q8::cells_per_sign;

/// Dynamic shared memory of the maps (36.5 KiB): the signed map's values and both halves of its
/// cells, the unsigned map's values and its positive half only (a second moment
/// is never negative; a negative value, were one to reach the quantiser, reads the global
/// table). The midpoints are not staged: the cells replace them. Against the whole CodeMap of
/// both maps (50 KiB) this left more of each multiprocessor's 256 KiB to L1, and the 8-bit step
/// ran 5% faster (BENCHMARKS.md).
inline constexpr std::size_t q8_smem_bytes = (2 * state::q8::map_size + 3 * q8_cells) * 4;

/// Copies the maps into `smem` (the whole block) and returns them in maps[0] (signed) and
/// maps[1] (unsigned).
__device__ inline void q8_stage_maps(unsigned char* smem, Q8Map (&maps)[2]) {
  constexpr int n = state::q8::map_size;
  auto* dst = reinterpret_cast<std::uint32_t*>(smem);
  const state::q8::CodeMap& sm = state::q8::signed_code_map();
  const state::q8::CodeMap& um = state::q8::unsigned_code_map();
  const auto* sc = reinterpret_cast<const std::uint32_t*>(sm.code);
  const auto* uc = reinterpret_cast<const std::uint32_t*>(um.code);
  // [signed values][signed cells, both halves][unsigned values][unsigned cells, positive half]
  constexpr int s_cells = n, u_code = n + 2 * q8_cells, u_cells = u_code + n;
  for (int j = static_cast<int>(threadIdx.x); j < n; j += blockDim.x) {
    dst[j] = sc[j];
    dst[u_code + j] = uc[j];
  }
  for (int j = static_cast<int>(threadIdx.x); j < 2 * q8_cells; j += blockDim.x) {
    dst[s_cells + j] = sm.cell[j];
    if (j < q8_cells) dst[u_cells + j] = um.cell[j];
  }
  __syncthreads();
  maps[0] = Q8Map{reinterpret_cast<const float*>(dst), dst + s_cells, dst + s_cells + q8_cells};
  maps[1] = Q8Map{reinterpret_cast<const float*>(dst + u_code), dst + u_cells, um.cell + q8_cells};
}

/// state::q8::nearest_code(map, x) over a Q8Map: the same steps, the cell entry read from the
/// half of x's sign.
__device__ inline std::uint8_t q8_nearest(const Q8Map& map, float x) {
  const std::uint32_t bits = numeric::float_bits(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0;
  std::uint32_t clamped = 0;
  const std::uint32_t i = state::q8::cell_index(bits & 0x7FFFFFFFu, clamped);
  const bool negative = (bits >> 31) != 0;
  const std::uint32_t entry = negative ? map.neg[i] : map.pos[i];
  const std::uint32_t key =
      (clamped & state::q8::cell_low_mask) ^ (negative ? state::q8::cell_low_mask : 0u);
  return static_cast<std::uint8_t>((entry & 0xFFu) + (key >= (entry >> 8) ? 1u : 0u));
}

/// state::q8::quantize with the division above and the shared cell-table search (one table
/// load and one comparison). The sign of code[c] is read from the index: the signed map is
/// negative below index 127 and +0 or positive from there (the GPU test compares every code
/// with the CPU's).
__device__ inline std::uint8_t q8_quantize(const Q8Map& map, bool is_signed, float value,
                                           float absmax, const Q8Divisor& d) {
  const float normalised = absmax > 0.0f ? d.divide(value) : 0.0f;
  std::uint8_t c = q8_nearest(map, normalised);
  if (is_signed && (c < 127) != ((numeric::float_bits(value) >> 31) != 0))
    c = static_cast<std::uint8_t>(value > 0.0f ? c + 1 : c - 1);
  return c;
}

// 4 blocks of 256 threads per multiprocessor (at most 64 registers): the 8-bit step is bound
// by latency and instruction issue, and 3 blocks (80 registers) left the schedulers idle.
// Check: the finite check ran (check_finite), so each tensor's skip and scalars come from
// `tensors` (tensor_step_kernel); without it the kernel is the one of the unchecked step.
template <class Store, Precision P, bool Check>
__global__ void __launch_bounds__(256, 4)
    adam_kernel(const AdamEntry* __restrict__ entries, const index_t* __restrict__ unit_begin,
                int ntensors, index_t units, optim::AdamStep s, bool stochastic, std::uint64_t seed,
                std::uint32_t epoch, const StepScalars* __restrict__ device_scalars,
                const AdamTensorStep* __restrict__ tensors) {
  if (device_scalars != nullptr) {  // a graph's replay: this step's scalars, not the capture's
    s = device_scalars->adam;
    if constexpr (std::is_same_v<Store, state::Bf16>) epoch = device_scalars->epoch;
  }
  using PW = typename Params<P>::W;
  using PG = typename Params<P>::G;
  constexpr bool q8 = is_q8<Store>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  Q8Map maps[2];
  if constexpr (q8) q8_stage_maps(smem, maps);
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const index_t nwarps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  index_t u = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (u >= units) return;
  // A warp's units ascend, so its tensor is searched for only when the unit leaves the tensor
  // (a search per unit, eight dependent loads before the unit's own, cost the 8-bit step 5%).
  int k = find_tensor(unit_begin, ntensors, u);
  for (; u < units; u += nwarps) {
    if (u >= unit_begin[k + 1]) k = find_tensor(unit_begin, ntensors, u);
    std::int32_t mode = 0;
    if constexpr (Check) {
      mode = tensors[k].mode;
      if (mode == 1) continue;  // a non-finite gradient: nothing of the tensor is written
    }
    const AdamEntry e = entries[k];
    const index_t base = (u - unit_begin[k]) * adam_unit;
    // A whole unit (all but a tensor's last) takes a path without per-element bounds checks.
    // Own: the tensor lags, so its scalars are its own step's (read from memory); otherwise
    // they are the kernel's arguments, as in the unchecked step.
    auto unit = [&](auto whole, auto own) {
      constexpr bool Full = decltype(whole)::value;
      constexpr bool Own = decltype(own)::value;
      const optim::AdamStep& st = [&]() -> const optim::AdamStep& {
        if constexpr (Own)
          return tensors[k].adam;
        else
          return s;
      }();
      std::uint32_t ep = epoch;
      if constexpr (Own) ep = tensors[k].epoch;
      const bool vec = e.vec != 0;
      float g[2][4], w[2][4], m[2][4], v[2][4];
      index_t at[2];
      bool full[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        at[h] = base + h * 128 + lane * 4;
        full[h] = vec && (Full || at[h] + 4 <= e.count);
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
          if (Full || at[h] + 4 <= e.count) {
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
            const bool in = Full || at[h] + l < e.count;
            const auto c_m = static_cast<std::uint8_t>(wm >> (8 * l));
            const auto c_v = static_cast<std::uint8_t>(wv >> (8 * l));
            m[h][l] = in ? maps[0].code[c_m] * am : 0.0f;  // state::q8::dequantize
            v[h][l] = in ? maps[1].code[c_v] * av : 0.0f;
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
          optim::adam_moments(g[h][l], m[h][l], v[h][l], st);
          w[h][l] = optim::apply_update(w[h][l], m[h][l] / optim::adam_denominator(v[h][l], st),
                                        st.weight);
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
            if (Full || at[h] + l < e.count) {
              nm = state::q8::absmax_update(nm, m[h][l]);
              nv = state::q8::absmax_update(nv, v[h][l]);
            }
        // Across the warp: the lanes' values are >= +0 and not NaN, so their bits order as
        // they do, and one redux.sync.max per moment (sm_80+) replaces five shuffles and
        // compares.
        nm = numeric::float_from_bits(__reduce_max_sync(0xFFFFFFFFu, numeric::float_bits(nm)));
        nv = numeric::float_from_bits(__reduce_max_sync(0xFFFFFFFFu, numeric::float_bits(nv)));
        if (lane == 0) {
          e.m_absmax[base / adam_unit] = nm;
          e.v_absmax[base / adam_unit] = nv;
        }
        auto* cm = static_cast<std::uint8_t*>(e.m);
        auto* cv = static_cast<std::uint8_t*>(e.v);
        const Q8Divisor dm(nm), dv(nv);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          std::uint8_t qm[4], qv[4];
#pragma unroll
          for (int l = 0; l < 4; ++l) {
            qm[l] = q8_quantize(maps[0], true, m[h][l], nm, dm);
            qv[l] = q8_quantize(maps[1], false, v[h][l], nv, dv);
          }
          if (Full || at[h] + 4 <= e.count) {
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
        const random::Key km{seed, e.id, ep};
        const random::Key kv{seed, ~e.id, ep};  // the CPU's independent second-moment words
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          store_bf16_moment4(static_cast<std::uint16_t*>(e.m), at[h], e.count, stochastic, km,
                             m[h]);
          store_bf16_moment4(static_cast<std::uint16_t*>(e.v), at[h], e.count, stochastic, kv,
                             v[h]);
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          store4(static_cast<float*>(e.m), at[h], e.count, Full || at[h] + 4 <= e.count, m[h]);
          store4(static_cast<float*>(e.v), at[h], e.count, Full || at[h] + 4 <= e.count, v[h]);
        }
      }
    };
    auto run = [&](auto whole) {
      if constexpr (Check) {
        if (mode == 2) return unit(whole, std::true_type{});
      }
      unit(whole, std::false_type{});
    };
    if (base + adam_unit <= e.count)
      run(std::true_type{});
    else
      run(std::false_type{});
  }
}

/// Whether 4 gradient samples [i, i+4) (masked at n) are all finite: exponent bits not all set.
__device__ inline bool finite4(const float* p, index_t i, index_t n, bool vec) {
  std::uint32_t b[4] = {0, 0, 0, 0};
  if (vec) {
    const uint4 q = *reinterpret_cast<const uint4*>(p + i);  // cached: the step reads it again
    b[0] = q.x, b[1] = q.y, b[2] = q.z, b[3] = q.w;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (i + l < n) b[l] = numeric::float_bits(p[i + l]);
  }
  bool ok = true;
#pragma unroll
  for (int l = 0; l < 4; ++l)
    ok = ok && (b[l] & 0x7f800000u) != 0x7f800000u;
  return ok;
}
__device__ inline bool finite4(const std::uint16_t* p, index_t i, index_t n, bool vec) {
  std::uint32_t b[2] = {0, 0};
  if (vec) {
    const uint2 q = *reinterpret_cast<const uint2*>(p + i);
    b[0] = q.x, b[1] = q.y;
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (i + l < n) b[l / 2] |= std::uint32_t{p[i + l]} << (16 * (l % 2));
  }
  const auto ok = [](std::uint32_t h) { return (h & 0x7f80u) != 0x7f80u; };
  return ok(b[0]) && ok(b[0] >> 16) && ok(b[1]) && ok(b[1] >> 16);
}

/// check_finite's pass: a warp takes finite_units consecutive units of the step's layout at a
/// time (their loads in flight together, one tensor search per tensor met), bad[k] ← 1 when
/// tensor k's gradient holds a NaN or an infinity.
inline constexpr int finite_units = 8;
template <Precision P>
__global__ void __launch_bounds__(256)
    adam_finite_kernel(const AdamEntry* __restrict__ entries,
                       const index_t* __restrict__ unit_begin, int ntensors, index_t units,
                       std::int32_t* __restrict__ bad) {
  using PG = typename Params<P>::G;
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const index_t nwarps = static_cast<index_t>(gridDim.x) * (blockDim.x / 32);
  const index_t warp = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  for (index_t u0 = warp * finite_units; u0 < units; u0 += nwarps * finite_units) {
    bool ok[finite_units];
    int of[finite_units];
    int k = -1;
#pragma unroll
    for (int j = 0; j < finite_units; ++j) {
      const index_t u = u0 + j;
      ok[j] = true;
      of[j] = -1;
      if (u < units) {
        if (k < 0 || u >= unit_begin[k + 1]) k = find_tensor(unit_begin, ntensors, u);
        of[j] = k;
        const AdamEntry& e = entries[k];
        const index_t base = (u - unit_begin[k]) * adam_unit;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const index_t at = base + h * 128 + lane * 4;
          if (at < e.count)
            ok[j] = finite4(static_cast<const PG*>(e.g), at, e.count,
                            e.vec != 0 && at + 4 <= e.count) &&
                    ok[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < finite_units; ++j)  // of[j] is the same on every lane
      if (of[j] >= 0 && __any_sync(0xFFFFFFFFu, !ok[j]) && lane == 0) bad[of[j]] = 1;
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
  if (options.check_finite) {
    for (int a = 0; a < 3; ++a)
      c.take<std::int32_t>(tensors.size());
    c.take<detail::AdamTensorStep>(tensors.size());
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
  if (options.check_finite) {
    const std::size_t n = tensors.size();
    flags_.bad = c.take<std::int32_t>(n);
    flags_.skipped = c.take<std::int32_t>(n);
    flags_.skips = c.take<std::int32_t>(n);
    flags_.steps = c.take<detail::AdamTensorStep>(n);
    if (n > 0)  // bad, skipped and skips are adjacent regions: zero them together
      detail::check(cudaMemsetAsync(flags_.bad, 0,
                                    static_cast<std::size_t>(reinterpret_cast<char*>(flags_.steps) -
                                                             reinterpret_cast<char*>(flags_.bad)),
                                    stream),
                    "cudaMemsetAsync");
  }
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

namespace detail {
/// Bytes of one moment's data and of its absmax array, in the CPU store's layout.
template <class Store>
std::pair<std::size_t, std::size_t> moment_bytes(const MomentBuffers& mb) {
  const auto count = static_cast<std::size_t>(mb.count);
  if (mb.quantized) return {count, (count + adam_unit - 1) / adam_unit * sizeof(float)};
  if constexpr (std::is_same_v<Store, state::Bf16>) return {count * sizeof(std::uint16_t), 0};
  return {count * sizeof(float), 0};
}
}  // namespace detail

template <class Store>
void MultiTensorAdam<Store>::read_moments(index_t tensor, void* m, void* v, float* m_absmax,
                                          float* v_absmax) const {
  const MomentBuffers mb = moments(tensor);
  const auto [data, absmax] = detail::moment_bytes<Store>(mb);
  require(data == 0 || (m != nullptr && v != nullptr), "cuda::read_moments: null moment pointer");
  require(absmax == 0 || (m_absmax != nullptr && v_absmax != nullptr),
          "cuda::read_moments: null absmax pointer");
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (data) {
    detail::check(cudaMemcpy(m, mb.m, data, cudaMemcpyDeviceToHost), "cudaMemcpy");
    detail::check(cudaMemcpy(v, mb.v, data, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
  if (absmax) {
    detail::check(cudaMemcpy(m_absmax, mb.m_absmax, absmax, cudaMemcpyDeviceToHost), "cudaMemcpy");
    detail::check(cudaMemcpy(v_absmax, mb.v_absmax, absmax, cudaMemcpyDeviceToHost), "cudaMemcpy");
  }
}

template <class Store>
void MultiTensorAdam<Store>::write_moments(index_t tensor, const void* m, const void* v,
                                           const float* m_absmax, const float* v_absmax) {
  const MomentBuffers mb = moments(tensor);
  const auto [data, absmax] = detail::moment_bytes<Store>(mb);
  require(data == 0 || (m != nullptr && v != nullptr), "cuda::write_moments: null moment pointer");
  require(absmax == 0 || (m_absmax != nullptr && v_absmax != nullptr),
          "cuda::write_moments: null absmax pointer");
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (data) {
    detail::check(cudaMemcpy(mb.m, m, data, cudaMemcpyHostToDevice), "cudaMemcpy");
    detail::check(cudaMemcpy(mb.v, v, data, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  if (absmax) {
    detail::check(cudaMemcpy(mb.m_absmax, m_absmax, absmax, cudaMemcpyHostToDevice), "cudaMemcpy");
    detail::check(cudaMemcpy(mb.v_absmax, v_absmax, absmax, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
}

template <class Store>
void MultiTensorAdam<Store>::set_steps(std::int64_t t) {
  require(t >= 0, "cuda::MultiTensorAdam::set_steps: the step count must be >= 0");
  t_ = t;
}

template <class Store>
std::vector<index_t> MultiTensorAdam<Store>::last_skipped() const {
  require(options_.check_finite, "cuda::MultiTensorAdam::last_skipped: check_finite is off");
  std::vector<std::int32_t> flags(moments_.size());
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  if (!flags.empty())
    detail::check(cudaMemcpy(flags.data(), flags_.skipped, flags.size() * sizeof(std::int32_t),
                             cudaMemcpyDeviceToHost),
                  "cudaMemcpy");
  std::vector<index_t> out;
  for (std::size_t k = 0; k < flags.size(); ++k)
    if (flags[k]) out.push_back(static_cast<index_t>(k));
  return out;
}

template <class Store>
std::int64_t MultiTensorAdam<Store>::tensor_steps(index_t tensor) const {
  (void)moments(tensor);  // range check
  if (!options_.check_finite) return t_;
  std::int32_t skips = 0;
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(
      cudaMemcpy(&skips, flags_.skips + tensor, sizeof(std::int32_t), cudaMemcpyDeviceToHost),
      "cudaMemcpy");
  return t_ - skips;
}

template <class Store>
void MultiTensorAdam<Store>::set_tensor_steps(index_t tensor, std::int64_t steps) {
  (void)moments(tensor);
  require(steps >= 0 && steps <= t_,
          "cuda::MultiTensorAdam::set_tensor_steps: a tensor's count must be in [0, steps()]");
  if (!options_.check_finite) {
    require(steps == t_,
            "cuda::MultiTensorAdam::set_tensor_steps: without check_finite every tensor has "
            "steps() steps");
    return;
  }
  require(t_ - steps <= 0x7fffffff, "cuda::MultiTensorAdam::set_tensor_steps: lag too large");
  const auto skips = static_cast<std::int32_t>(t_ - steps);
  detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  detail::check(
      cudaMemcpy(flags_.skips + tensor, &skips, sizeof(std::int32_t), cudaMemcpyHostToDevice),
      "cudaMemcpy");
}

template <class Store>
void MultiTensorAdam<Store>::set_lr(double lr) {
  require(std::isfinite(lr) && lr >= 0,
          "cuda::MultiTensorAdam::set_lr: lr must be finite and >= 0");
  options_.rule.lr = lr;
}

template <class Store>
StepScalars MultiTensorAdam<Store>::scalars(std::int64_t t) const {
  require(t >= 1, "cuda::MultiTensorAdam::scalars: steps count from 1");
  return {optim::Adam::step_scalars(options_.rule, t), static_cast<std::uint32_t>(t - 1),
          options_.rule.lr};
}

template <class Store>
void MultiTensorAdam<Store>::step(stream_t stream) {
  launch(stream, scalars(t_ + 1), nullptr);
}

template <class Store>
void MultiTensorAdam<Store>::step(stream_t stream, const StepScalars* device_scalars) {
  require(device_scalars != nullptr, "cuda::MultiTensorAdam::step: null device scalars");
  launch(stream, scalars(t_ + 1), device_scalars);
}

template <class Store>
void MultiTensorAdam<Store>::launch(stream_t stream, const StepScalars& sc,
                                    const StepScalars* device_scalars) {
  t_ += 1;
  if (units_ == 0) return;
  const auto* entries = static_cast<const detail::AdamEntry*>(table_);
  const auto* begin = reinterpret_cast<const index_t*>(
      static_cast<const char*>(table_) +
      detail::Carver::round_up(moments_.size() * sizeof(detail::AdamEntry)));
  constexpr int threads = 256;
  static const int sms = detail::sm_count();
  const index_t warps_needed = units_;
  const index_t blocks_needed = (warps_needed + threads / 32 - 1) / (threads / 32);
  const index_t max_blocks = static_cast<index_t>(sms) * 4;  // one wave (launch bounds)
  const auto blocks =
      static_cast<unsigned>(blocks_needed < max_blocks ? blocks_needed : max_blocks);
  bool stochastic = false;
  if constexpr (std::is_same_v<Store, state::Bf16>) stochastic = options_.store.stochastic_rounding;
  const auto n = static_cast<int>(moments_.size());
  const bool check = options_.check_finite;
  auto launch_kernel = [&](auto finite_kernel, auto kernel, auto checked_kernel) {
    if (check) {
      const index_t per_block = threads / 32 * detail::finite_units;
      const index_t finite_needed = (units_ + per_block - 1) / per_block;
      const auto finite_blocks = static_cast<unsigned>(
          finite_needed < index_t{sms} * 8 ? finite_needed : index_t{sms} * 8);
      finite_kernel<<<finite_blocks, threads, 0, stream>>>(entries, begin, n, units_, flags_.bad);
      detail::check_launch("MultiTensorAdam::step (finite check)");
      detail::launch_tensor_step(flags_.bad, flags_.skipped, flags_.skips, flags_.steps, n,
                                 options_.rule, static_cast<long long>(t_), device_scalars, stream,
                                 "MultiTensorAdam::step (tensor scalars)");
    }
    const std::size_t smem = detail::is_q8<Store>::value ? detail::q8_smem_bytes : 0;
    (check ? checked_kernel : kernel)<<<blocks, threads, smem, stream>>>(
        entries, begin, n, units_, sc.adam, stochastic, options_.seed, sc.epoch, device_scalars,
        flags_.steps);
  };
  using detail::adam_finite_kernel;
  using detail::adam_kernel;
  switch (options_.precision) {
    case Precision::fp32:
      launch_kernel(adam_finite_kernel<Precision::fp32>, adam_kernel<Store, Precision::fp32, false>,
                    adam_kernel<Store, Precision::fp32, true>);
      break;
    case Precision::bf16:
      launch_kernel(adam_finite_kernel<Precision::bf16>, adam_kernel<Store, Precision::bf16, false>,
                    adam_kernel<Store, Precision::bf16, true>);
      break;
    case Precision::fp32_master:
      launch_kernel(adam_finite_kernel<Precision::fp32_master>,
                    adam_kernel<Store, Precision::fp32_master, false>,
                    adam_kernel<Store, Precision::fp32_master, true>);
      break;
  }
  detail::check_launch("MultiTensorAdam::step");
}

namespace detail {
template <class T>
__global__ void q8_quantize_kernel(const T* x, const T* absmax, std::uint8_t* codes, index_t n,
                                   bool is_signed) {
  extern __shared__ __align__(16) unsigned char smem[];
  Q8Map maps[2];
  q8_stage_maps(smem, maps);
  const Q8Map& map = maps[is_signed ? 0 : 1];
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    codes[i] = q8_quantize(map, is_signed, x[i], absmax[i], Q8Divisor(absmax[i]));
}
}  // namespace detail

template <class T>
void q8_quantize_codes(const T* x, const T* absmax, std::uint8_t* codes, index_t n,
                       state::Moment kind, stream_t stream) {
  static_assert(std::is_same_v<T, float>, "slimgrad cuda: q8_quantize_codes reads floats");
  if (n <= 0) return;
  const index_t blocks = (n + 255) / 256;
  detail::q8_quantize_kernel<T>
      <<<static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 256, detail::q8_smem_bytes,
         stream>>>(x, absmax, codes, n, kind == state::Moment::first);
  detail::check_launch("q8_quantize_codes");
}

}  // namespace slimgrad::cuda
