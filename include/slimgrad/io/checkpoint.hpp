// slimgrad/io/checkpoint.hpp — optimizer state as named tensors (safetensors) and back.
//
// A checkpoint holds, per parameter NAME, tensors "NAME/<field>" (step counter, moments in
// their store's own format, bases, seeds' epochs, limiter memory) and metadata: format and
// version, the composition (rule, transform, store, residual), every hyper-parameter, the
// parameter list and a 64-bit checksum over all tensor bytes. Random projections are stored as
// their epoch (the seed is a hyper-parameter), never as matrices.
//
// Version 1 grew one optional field, so the version did not change: "NAME/provisional" (i64,
// 0 or 1; SVD-based bases) marks the identity basis of a failed first refresh, which SubTrack's
// next due step replaces by a new SVD. A file without it (written before it existed) loads as
// not provisional; an older build reading a newer file ignores it (and resumes as it used to).
//
// Reading is strict: every tensor must exist with the dtype and shape the optimizer expects,
// and the checksum must match, else slimgrad::Error names what is wrong. The optimizer builds
// the whole new state aside and swaps it in only when everything has been read.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/view.hpp"
#include "safetensors.hpp"

namespace slimgrad::io {

inline constexpr const char* checkpoint_format = "slimgrad-optimizer";
inline constexpr const char* checkpoint_version = "1";

/// 64-bit checksum of every tensor (name, dtype, shape, bytes) in name order: corruption of
/// any byte of the data is detected on load.
inline std::uint64_t checksum(const TensorFile& f) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      std::uint64_t w;
      std::memcpy(&w, b + i, 8);
      h = (h ^ w) * 0x100000001b3ull;
      h ^= h >> 29;
    }
    for (; i < n; ++i)
      h = (h ^ b[i]) * 0x100000001b3ull;
  };
  for (const auto& [name, t] : f.tensors) {
    mix(name.data(), name.size());
    const auto d = static_cast<std::uint8_t>(t.dtype);
    mix(&d, 1);
    mix(t.shape.data(), t.shape.size() * sizeof(std::int64_t));
    mix(t.data.data(), t.data.size());
  }
  return h;
}

/// Writes fields of one parameter as "PREFIX/field".
class StateWriter {
 public:
  StateWriter(TensorFile& file, std::string prefix) : file_(file), prefix_(std::move(prefix)) {}

  template <class T>
  void values(const std::string& field, std::vector<std::int64_t> shape, std::span<const T> v,
              Dtype dtype = dtype_of_v<T>) {
    file_.add(prefix_ + "/" + field, Tensor::from_values<T>(std::move(shape), v, dtype));
  }
  void i64(const std::string& field, std::int64_t v) {
    values<std::int64_t>(field, {}, std::span<const std::int64_t>(&v, 1));
  }
  void f64(const std::string& field, double v) {
    values<double>(field, {}, std::span<const double>(&v, 1));
  }
  void f32(const std::string& field, float v) {
    values<float>(field, {}, std::span<const float>(&v, 1));
  }

 private:
  TensorFile& file_;
  std::string prefix_;
};

/// Reads fields of one parameter, checking dtype and element count against what the
/// optimizer's freshly made state expects.
class StateReader {
 public:
  StateReader(const TensorFile& file, std::string prefix)
      : file_(file), prefix_(std::move(prefix)) {}

  bool has(const std::string& field) const { return file_.contains(prefix_ + "/" + field); }

  template <class T>
  void values(const std::string& field, std::span<T> out, Dtype dtype = dtype_of_v<T>) const {
    const Tensor& t = tensor(field);
    require(t.dtype == dtype, "checkpoint: '" + name(field) + "' is " +
                                  std::string(dtype_name(t.dtype)) + ", expected " +
                                  std::string(dtype_name(dtype)));
    require(t.data.size() == out.size() * sizeof(T),
            "checkpoint: '" + name(field) + "' holds " + std::to_string(t.data.size() / sizeof(T)) +
                " values, this optimizer expects " + std::to_string(out.size()) +
                " (different shapes or settings)");
    if (!out.empty()) std::memcpy(out.data(), t.data.data(), t.data.size());
  }
  template <class T>
  void vector(const std::string& field, std::vector<T>& out, Dtype dtype = dtype_of_v<T>) const {
    values<T>(field, std::span<T>(out), dtype);
  }
  std::int64_t i64(const std::string& field) const { return scalar<std::int64_t>(field); }
  double f64(const std::string& field) const { return scalar<double>(field); }
  float f32(const std::string& field) const { return scalar<float>(field); }
  /// A tensor's shape (for bases whose size is known only from the file).
  const std::vector<std::int64_t>& shape(const std::string& field) const {
    return tensor(field).shape;
  }

 private:
  const TensorFile& file_;
  std::string prefix_;

  std::string name(const std::string& field) const { return prefix_ + "/" + field; }
  const Tensor& tensor(const std::string& field) const {
    const auto it = file_.tensors.find(name(field));
    require(it != file_.tensors.end(), "checkpoint: tensor '" + name(field) + "' is missing");
    return it->second;
  }
  template <class T>
  T scalar(const std::string& field) const {
    T v{};
    values<T>(field, std::span<T>(&v, 1));
    return v;
  }
};

// ---- store buffers (recognised by their members) ---------------------------------------------

template <class Buffer>
void write_buffer(StateWriter& w, const std::string& field, const Buffer& b) {
  const auto n = static_cast<std::int64_t>(b.count);
  if constexpr (requires { b.codes, b.absmax, b.fp32, b.quantized; }) {  // Q8Block
    if (b.quantized) {
      w.values<std::uint8_t>(field + ".q8", {n}, b.codes);
      w.values<float>(field + ".absmax", {static_cast<std::int64_t>(b.absmax.size())}, b.absmax);
    } else {
      w.values<float>(field, {n}, b.fp32);
    }
  } else if constexpr (requires { b.row, b.col, b.full, b.factored; }) {  // Factored
    if (b.factored) {
      w.values<float>(field + ".row", {static_cast<std::int64_t>(b.row.size())}, b.row);
      w.values<float>(field + ".col", {static_cast<std::int64_t>(b.col.size())}, b.col);
    } else {
      w.values<float>(field, {n}, b.full);
    }
  } else if constexpr (std::is_same_v<decltype(b.data), std::vector<std::uint16_t>>) {  // Bf16
    w.values<std::uint16_t>(field, {n}, b.data, Dtype::BF16);
  } else {  // Fp32
    w.values<float>(field, {n}, b.data);
  }
}

template <class Buffer>
void read_buffer(const StateReader& r, const std::string& field, Buffer& b) {
  if constexpr (requires { b.codes, b.absmax, b.fp32, b.quantized; }) {
    if (b.quantized) {
      r.vector(field + ".q8", b.codes);
      r.vector(field + ".absmax", b.absmax);
      for (float a : b.absmax)
        require(std::isfinite(a) && a >= 0, "checkpoint: '" + field +
                                                ".absmax' holds a negative or "
                                                "non-finite block scale");
    } else {
      r.vector(field, b.fp32);
    }
  } else if constexpr (requires { b.row, b.col, b.full, b.factored; }) {
    if (b.factored) {
      r.vector(field + ".row", b.row);
      r.vector(field + ".col", b.col);
    } else {
      r.vector(field, b.full);
    }
  } else if constexpr (std::is_same_v<decltype(b.data), std::vector<std::uint16_t>>) {
    r.vector(field, b.data, Dtype::BF16);
  } else {
    r.vector(field, b.data);
  }
}

}  // namespace slimgrad::io
