// slimgrad/backend/cuda/transfer.hpp — checkpoints across backends: the CUDA Adam's and GWT's
// state moves to and from the CPU optimizer that uses the same rule, store and options
// (Optimizer<Adam, Identity, Store>: recipes::AdamW, recipes::Adam8bit, …; for GWT
// Optimizer<Adam, Dwt<W, L>, Fp32, cpu, WaveletDetails>: recipes::Gwt), whose save()/load()
// write and read the one checkpoint format (io/checkpoint.hpp, safetensors). So a checkpoint
// written by a GPU run loads on the CPU and the other way round:
//
//   cuda::MultiTensorAdam<Store> gpu(tensors, …);            // tensors[k] named names[k]
//   recipes::AdamW<> cpu(options);                           // the same rule/store/seed
//   cuda::copy_state(gpu, tensors, names, cpu); cpu.save(path);         // GPU → file
//   cpu.load(path); cuda::copy_state(cpu, names, gpu);                   // file → GPU
//
// Host code (the CPU optimizer needs Eigen): include it from a .cpp, never from a .cu. The
// copies are synchronous (checkpoint time, not the steady state). Tensor::id must be
// tensor_id(names[k]), as the CPU engine names a parameter's random words (stochastic rounding).
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "../../core/orientation.hpp"
#include "../../optim/adam.hpp"
#include "../../slimgrad.hpp"
#include "../../transforms/dwt.hpp"
#include "../../transforms/identity.hpp"
#include "api.hpp"

namespace slimgrad::cuda {

/// The CPU optimizer whose checkpoints a MultiTensorAdam<Store> shares.
template <class Store, class Residual = residual::Drop>
using CpuAdam = Optimizer<optim::Adam, transforms::Identity, Store, backend::cpu, Residual>;

namespace detail {

/// The moment bytes of a CPU store buffer and its absmax (8-bit blocks; null otherwise), in the
/// layout MultiTensorAdam::read_moments/write_moments take.
template <class Buffer>
auto host_moment(Buffer& b) {
  constexpr bool c = std::is_const_v<Buffer>;
  using P = std::pair<std::conditional_t<c, const void*, void*>,
                      std::conditional_t<c, const float*, float*>>;
  if constexpr (requires { b.codes; }) {
    if (b.quantized) return P{b.codes.data(), b.absmax.data()};
    return P{b.fp32.data(), nullptr};
  } else {
    return P{b.data.data(), nullptr};
  }
}

template <class Gpu>
void check_transfer(const Gpu& gpu, std::size_t names, std::size_t tensors) {
  require(names == tensors && static_cast<index_t>(names) == gpu.tensors(),
          "cuda::copy_state: " + std::to_string(names) + " names and " + std::to_string(tensors) +
              " tensors for an optimizer of " + std::to_string(gpu.tensors()) + " tensors");
}

template <class Buffer>
void check_buffer(const Buffer& b, const MomentBuffers& mb, const std::string& name) {
  bool quantized = false;
  if constexpr (requires { b.quantized; }) quantized = b.quantized;
  require(b.count == mb.count && quantized == mb.quantized,
          "cuda::copy_state: '" + name + "' has " + std::to_string(b.count) +
              (quantized ? " 8-bit" : "") + " moments on the CPU and " + std::to_string(mb.count) +
              (mb.quantized ? " 8-bit" : "") + " on the GPU (different shapes or store options)");
}

/// The CPU's per-parameter step counts, checked for the GPU engine `to`: the engine's count is
/// the largest, and a parameter may lag behind it (skipped steps) only when `to` skips too.
template <class Cpu, class Engine>
std::int64_t engine_steps(const Cpu& from, std::span<const std::string> names, const Engine& to) {
  std::int64_t steps = 0;
  for (const auto& name : names)
    steps = std::max(steps, from.step_count(name));
  for (const auto& name : names)
    require(from.step_count(name) == steps || to.check_finite(),
            "cuda::copy_state: '" + name + "' has taken " + std::to_string(from.step_count(name)) +
                " steps and another parameter " + std::to_string(steps) +
                "; without check_finite the GPU steps every tensor together");
  return steps;
}

/// Gives every tensor of `to` its CPU count, after the moments (set_tensor_steps follows
/// set_steps).
template <class Cpu, class Engine>
void set_engine_steps(const Cpu& from, std::span<const std::string> names, std::int64_t steps,
                      Engine& to) {
  to.set_steps(steps);
  for (std::size_t k = 0; k < names.size(); ++k)
    to.set_tensor_steps(static_cast<index_t>(k), from.step_count(names[k]));
}

}  // namespace detail

/// GPU → CPU: `to` takes every tensor's moments and the step count (creating the state of a
/// parameter it does not know yet); `tensors` is the list `from` was built from, names[k] the
/// parameter name of tensors[k]. Everything is checked before anything changes.
template <class Store, class Residual>
void copy_state(const MultiTensorAdam<Store>& from, std::span<const Tensor> tensors,
                std::span<const std::string> names, CpuAdam<Store, Residual>& to) {
  detail::check_transfer(from, names.size(), tensors.size());
  for (std::size_t k = 0; k < names.size(); ++k)
    require(tensors[k].id == tensor_id(names[k]), "cuda::copy_state: tensor " + std::to_string(k) +
                                                      " has id " + std::to_string(tensors[k].id) +
                                                      ", not tensor_id(\"" + names[k] + "\")");
  // A scratch optimizer with the same options builds every state first: `to` changes only
  // once every shape and store layout has been found to match.
  CpuAdam<Store, Residual> fresh(to.options());
  for (std::size_t k = 0; k < names.size(); ++k) {
    fresh.add_state(names[k], {tensors[k].rows, tensors[k].cols});
    auto& rs = fresh.rule_state(names[k]);
    const MomentBuffers mb = from.moments(static_cast<index_t>(k));
    detail::check_buffer(rs.m, mb, names[k]);
    detail::check_buffer(rs.v, mb, names[k]);
  }
  for (std::size_t k = 0; k < names.size(); ++k) {
    to.add_state(names[k], {tensors[k].rows, tensors[k].cols});
    auto& rs = to.rule_state(names[k]);
    const auto [m, ma] = detail::host_moment(rs.m);
    const auto [v, va] = detail::host_moment(rs.v);
    from.read_moments(static_cast<index_t>(k), m, v, ma, va);
    to.set_step_count(names[k], from.tensor_steps(static_cast<index_t>(k)));
  }
}

/// CPU → GPU: `to` takes the moments of names[k] for its tensor k and each parameter's own step
/// count (they may differ only when `to` has check_finite, as after skipped steps).
template <class Store, class Residual>
void copy_state(const CpuAdam<Store, Residual>& from, std::span<const std::string> names,
                MultiTensorAdam<Store>& to) {
  detail::check_transfer(to, names.size(), names.size());
  require(!names.empty(), "cuda::copy_state: no parameters");
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& rs = from.rule_state(names[k]);  // Error if the CPU has no state for it
    detail::check_buffer(rs.m, to.moments(static_cast<index_t>(k)), names[k]);
    detail::check_buffer(rs.v, to.moments(static_cast<index_t>(k)), names[k]);
  }
  const std::int64_t steps = detail::engine_steps(from, names, to);
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& rs = from.rule_state(names[k]);
    const auto [m, ma] = detail::host_moment(rs.m);
    const auto [v, va] = detail::host_moment(rs.v);
    to.write_moments(static_cast<index_t>(k), m, v, ma, va);
  }
  detail::set_engine_steps(from, names, steps, to);
}

/// The CPU optimizer whose checkpoints a MultiTensorGwt<Wavelet, Levels> shares (recipes::Gwt
/// for Haar, 2 levels).
template <class Wavelet, int Levels>
using CpuGwt = Optimizer<optim::Adam, transforms::Dwt<Wavelet, Levels>, state::Fp32, backend::cpu,
                         residual::WaveletDetails>;

namespace detail {
/// Every parameter must take the wavelet path on the CPU (the GPU transforms every tensor): a
/// fallback threshold or override that keeps one plain is another optimizer.
template <class Wavelet, int Levels>
void check_gwt(const CpuGwt<Wavelet, Levels>& cpu, const MomentBuffers& mb,
               const std::string& name) {
  require(cpu.is_compressed(name),
          "cuda::copy_state: '" + name +
              "' takes the plain rule on the CPU (fallback or override); the GPU's GWT "
              "transforms every tensor");
  check_buffer(cpu.rule_state(name).m, mb, name);
}
}  // namespace detail

/// GPU → CPU for GWT: moments (m × N_L), the limiter's memory (unset: −1, the CPU's own value)
/// and each tensor's own step count (a skipped step does not count).
template <class Wavelet, int Levels>
void copy_state(const MultiTensorGwt<Wavelet, Levels>& from, std::span<const Tensor> tensors,
                std::span<const std::string> names, CpuGwt<Wavelet, Levels>& to) {
  detail::check_transfer(from, names.size(), tensors.size());
  CpuGwt<Wavelet, Levels> fresh(to.options());
  for (std::size_t k = 0; k < names.size(); ++k) {
    fresh.add_state(names[k], {tensors[k].rows, tensors[k].cols});
    detail::check_gwt(fresh, from.moments(static_cast<index_t>(k)), names[k]);
  }
  for (std::size_t k = 0; k < names.size(); ++k) {
    to.add_state(names[k], {tensors[k].rows, tensors[k].cols});
    auto& rs = to.rule_state(names[k]);
    float limiter = -1.0f;
    from.read_state(static_cast<index_t>(k), rs.m.data.data(), rs.v.data.data(), limiter);
    to.set_limiter_state(names[k], limiter >= 0.0f ? limiter : -1.0f);
    to.set_step_count(names[k], from.tensor_steps(static_cast<index_t>(k)));
  }
}

/// CPU → GPU for GWT; the step counts as for Adam.
template <class Wavelet, int Levels>
void copy_state(const CpuGwt<Wavelet, Levels>& from, std::span<const std::string> names,
                MultiTensorGwt<Wavelet, Levels>& to) {
  detail::check_transfer(to, names.size(), names.size());
  require(!names.empty(), "cuda::copy_state: no parameters");
  for (std::size_t k = 0; k < names.size(); ++k)
    detail::check_gwt(from, to.moments(static_cast<index_t>(k)), names[k]);
  const std::int64_t steps = detail::engine_steps(from, names, to);
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& rs = from.rule_state(names[k]);
    to.write_state(static_cast<index_t>(k), rs.m.data.data(), rs.v.data.data(),
                   from.limiter_state(names[k]));
  }
  detail::set_engine_steps(from, names, steps, to);
}

}  // namespace slimgrad::cuda
