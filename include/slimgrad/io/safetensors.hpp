// slimgrad/io/safetensors.hpp — reading and writing safetensors files: named tensors plus
// string metadata, the checkpoint format of optimizer state and of the slimgrad CLI
// (design.md §5 item 4: optimizer state as plain named tensors + metadata).
//
// Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, then N
// bytes of a JSON object {"NAME": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {"key": "value", ...}}, then the byte buffer; [b, e) is relative to the
// buffer start.
//
// Contract:
// - Reading never trusts the input. Every malformed file is reported as slimgrad::Error with a
//   sentence naming the problem; nothing is read outside the input (parse() works on memory and
//   is the entry point for fuzzing; read() runs the same checks on a file and reads each tensor
//   straight into its own buffer). Tensors may not overlap; gaps between tensors and bytes
//   after the last one are allowed (the official writer leaves none, other writers may).
// - Writing is deterministic: "__metadata__" first (omitted when empty), then the tensors sorted
//   by name (the order of TensorFile's map), packed back to back from offset 0; the JSON header
//   is padded with spaces so that the buffer starts at a multiple of 8 bytes. write() goes
//   through a temporary file in the destination directory and a rename, so a failure never
//   leaves a partial file under the destination name.
// - Data bytes are copied unchanged: little-endian hosts only (checked at compile time).
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "../core/error.hpp"

namespace slimgrad::io {

static_assert(std::endian::native == std::endian::little,
              "slimgrad/io/safetensors.hpp supports little-endian hosts only: safetensors stores "
              "little-endian data and this implementation copies the bytes unchanged");

/// Element types of a safetensors tensor (the subset slimgrad reads and writes).
enum class Dtype : std::uint8_t { F32, F64, BF16, F16, U8, I8, I32, I64 };

/// Bytes per element of `d`.
constexpr std::size_t element_size(Dtype d) noexcept {
  switch (d) {
    case Dtype::F64:
    case Dtype::I64:
      return 8;
    case Dtype::F32:
    case Dtype::I32:
      return 4;
    case Dtype::BF16:
    case Dtype::F16:
      return 2;
    case Dtype::U8:
    case Dtype::I8:
      return 1;
  }
  return 0;
}

/// The format's name of `d` ("F32", "BF16", ...).
constexpr std::string_view dtype_name(Dtype d) noexcept {
  switch (d) {
    case Dtype::F32:
      return "F32";
    case Dtype::F64:
      return "F64";
    case Dtype::BF16:
      return "BF16";
    case Dtype::F16:
      return "F16";
    case Dtype::U8:
      return "U8";
    case Dtype::I8:
      return "I8";
    case Dtype::I32:
      return "I32";
    case Dtype::I64:
      return "I64";
  }
  return "?";
}

/// The dtype named `name` in the format's spelling, or nullopt for any other name.
inline std::optional<Dtype> parse_dtype(std::string_view name) noexcept {
  for (Dtype d : {Dtype::F32, Dtype::F64, Dtype::BF16, Dtype::F16, Dtype::U8, Dtype::I8, Dtype::I32,
                  Dtype::I64})
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

/// dtype_of<T>::value: the dtype of a C++ element type with one unambiguous dtype. BF16 and F16
/// have none (both are 16-bit patterns): pass the dtype explicitly with std::uint16_t.
template <class T>
struct dtype_of;
template <>
struct dtype_of<float> : std::integral_constant<Dtype, Dtype::F32> {};
template <>
struct dtype_of<double> : std::integral_constant<Dtype, Dtype::F64> {};
template <>
struct dtype_of<std::uint8_t> : std::integral_constant<Dtype, Dtype::U8> {};
template <>
struct dtype_of<std::int8_t> : std::integral_constant<Dtype, Dtype::I8> {};
template <>
struct dtype_of<std::int32_t> : std::integral_constant<Dtype, Dtype::I32> {};
template <>
struct dtype_of<std::int64_t> : std::integral_constant<Dtype, Dtype::I64> {};
template <class T>
inline constexpr Dtype dtype_of_v = dtype_of<T>::value;

namespace detail {

/// Largest header accepted: the official implementation's limit, far above any real header.
inline constexpr std::uint64_t max_header_bytes = std::uint64_t{100} << 20;
/// A valid header nests three deep (object → entry → shape); deeper input is rejected early.
inline constexpr int max_json_depth = 8;

/// a * b, or nullopt on u64 overflow.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

/// Bytes of a tensor of `shape` and `dtype`, or nullopt when a dimension is negative or the
/// size does not fit in 64 bits.
inline std::optional<std::uint64_t> byte_size(const std::vector<std::int64_t>& shape, Dtype dtype) {
  std::uint64_t n = element_size(dtype);
  bool zero = false;
  for (std::int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d == 0) zero = true;
  }
  if (zero) return 0;
  for (std::int64_t d : shape) {
    auto next = checked_mul(n, static_cast<std::uint64_t>(d));
    if (!next) return std::nullopt;
    n = *next;
  }
  return n;
}

}  // namespace detail

/// One tensor: dtype, shape (row-major, empty for a scalar) and its raw little-endian bytes.
/// Memory: exactly numel × element_size bytes of data plus the shape.
struct Tensor {
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> data;

  /// Number of elements (1 for a scalar). Throws on a negative or overflowing shape.
  std::int64_t numel() const {
    auto bytes = detail::byte_size(shape, Dtype::U8);
    require(bytes.has_value() &&
                *bytes <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
            "tensor shape " + detail::shape_string(shape) + " is negative or too large");
    return static_cast<std::int64_t>(*bytes);
  }

  /// A tensor of `shape` holding a copy of `values` stored as `dtype`; sizeof(T) must equal
  /// element_size(dtype) (e.g. std::uint16_t bit patterns for BF16 and F16).
  template <class T>
  static Tensor from_values(std::vector<std::int64_t> shape, std::span<const T> values,
                            Dtype dtype = dtype_of_v<T>) {
    static_assert(std::is_trivially_copyable_v<T>, "tensor elements must be trivially copyable");
    require(sizeof(T) == element_size(dtype), "a " + std::to_string(sizeof(T)) +
                                                  "-byte C++ type cannot hold " +
                                                  std::string(dtype_name(dtype)) + " elements");
    Tensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    const std::int64_t n = t.numel();
    require(static_cast<std::uint64_t>(n) == values.size(),
            "tensor shape " + detail::shape_string(t.shape) + " holds " + std::to_string(n) +
                " elements, but " + std::to_string(values.size()) + " values were given");
    t.data.resize(values.size_bytes());
    if (!values.empty()) std::memcpy(t.data.data(), values.data(), values.size_bytes());
    return t;
  }

  /// The convenient float32 path: a F32 tensor of `shape` holding a copy of `values`.
  static Tensor f32(std::vector<std::int64_t> shape, std::span<const float> values) {
    return from_values<float>(std::move(shape), values, Dtype::F32);
  }

  /// A copy of the elements as T; throws unless the tensor's dtype is `expected` and
  /// sizeof(T) matches it.
  template <class T>
  std::vector<T> values(Dtype expected = dtype_of_v<T>) const {
    static_assert(std::is_trivially_copyable_v<T>, "tensor elements must be trivially copyable");
    require(dtype == expected, "tensor is " + std::string(dtype_name(dtype)) + ", expected " +
                                   std::string(dtype_name(expected)));
    require(sizeof(T) == element_size(dtype), "a " + std::to_string(sizeof(T)) +
                                                  "-byte C++ type cannot hold " +
                                                  std::string(dtype_name(dtype)) + " elements");
    const auto bytes = detail::byte_size(shape, dtype);
    require(bytes.has_value() && *bytes == data.size(),
            "tensor data holds " + std::to_string(data.size()) +
                " bytes, which does not match its shape " + detail::shape_string(shape));
    const std::size_t n = data.size() / sizeof(T);
    std::vector<T> out(n);
    if (n) std::memcpy(out.data(), data.data(), data.size());
    return out;
  }

  /// The elements of a F32 tensor as floats (throws for any other dtype).
  std::vector<float> to_f32() const { return values<float>(Dtype::F32); }
};

/// The contents of a safetensors file: tensors sorted by name, and string metadata.
/// Memory: the tensors' bytes plus names.
struct TensorFile {
  std::map<std::string, Tensor, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;

  /// Adds `tensor` under `name`; throws if the name is taken or reserved, or the data size
  /// does not match shape × element size.
  void add(std::string name, Tensor tensor) {
    require(name != "__metadata__", "'__metadata__' is reserved and cannot name a tensor");
    require(!tensors.contains(name), "a tensor named '" + name + "' is already present");
    auto bytes = detail::byte_size(tensor.shape, tensor.dtype);
    require(bytes.has_value() && *bytes == tensor.data.size(),
            "tensor '" + name + "' has " + std::to_string(tensor.data.size()) +
                " bytes of data, which does not match its shape " +
                detail::shape_string(tensor.shape) + " and dtype " +
                std::string(dtype_name(tensor.dtype)));
    tensors.emplace(std::move(name), std::move(tensor));
  }

  /// Adds a F32 tensor of `shape` holding a copy of `values`.
  void add_f32(std::string name, std::vector<std::int64_t> shape, std::span<const float> values) {
    add(std::move(name), Tensor::f32(std::move(shape), values));
  }

  bool contains(std::string_view name) const { return tensors.find(name) != tensors.end(); }

  /// The tensor named `name`; throws if there is none.
  const Tensor& at(std::string_view name) const {
    auto it = tensors.find(name);
    require(it != tensors.end(), "there is no tensor named '" + std::string(name) + "'");
    return it->second;
  }
};

namespace detail {

/// One validated header entry.
struct HeaderEntry {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

/// A validated header: entries sorted by name, and the metadata.
struct Header {
  std::vector<HeaderEntry> entries;
  std::map<std::string, std::string, std::less<>> metadata;
};

[[noreturn]] inline void fail(std::string_view where, const std::string& problem) {
  throw Error("slimgrad: " + std::string(where) + ": " + problem);
}

/// What a JSON value is, with its article ("an integer", "a string", ...), for messages.
inline std::string json_kind(const nlohmann::json& j) {
  if (j.is_number_float()) return "a floating-point number";
  if (j.is_number()) return "an integer";
  if (j.is_null()) return "null";
  const std::string name = j.type_name();
  return (name[0] == 'a' || name[0] == 'o' ? "an " : "a ") + name;
}

/// A non-negative JSON integer, or a failure naming `what`.
inline std::uint64_t json_size(const nlohmann::json& j, std::string_view where,
                               const std::string& what) {
  if (j.is_number_unsigned()) return j.get<std::uint64_t>();
  if (j.is_number_integer()) {
    const auto v = j.get<std::int64_t>();
    if (v >= 0) return static_cast<std::uint64_t>(v);  // "-0" parses as a signed zero
    fail(where, what + " is negative (" + std::to_string(v) + ")");
  }
  if (j.is_number_float()) fail(where, what + " is not an integer (" + j.dump() + ")");
  fail(where, what + " is " + json_kind(j) + ", expected a non-negative integer");
}

/// Parses and validates the JSON header of a file whose byte buffer has `buffer_size` bytes.
/// `where` names the input in error messages.
inline Header parse_header(std::string_view text, std::uint64_t buffer_size,
                           std::string_view where) {
  using nlohmann::json;
  // nlohmann keeps the last of duplicate keys silently; a header with duplicates is ambiguous,
  // so record them (and runaway nesting) while parsing.
  std::vector<std::set<std::string>> open_objects;
  std::optional<std::string> duplicate;
  bool too_deep = false;
  json::parser_callback_t watch = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
        open_objects.emplace_back();
        [[fallthrough]];
      case json::parse_event_t::array_start:
        if (depth >= max_json_depth) too_deep = true;
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key:
        if (!open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get<std::string>()).second && !duplicate)
          duplicate = parsed.get<std::string>();
        break;
      default:
        break;
    }
    return !too_deep;  // stop building values once the input is known to be invalid
  };
  json root;
  try {
    root = json::parse(text.begin(), text.end(), watch);
  } catch (const json::exception& e) {
    std::string_view detail = e.what();  // drop nlohmann's "[json.exception.parse_error.101] "
    if (auto cut = detail.find("] "); cut != std::string_view::npos) detail.remove_prefix(cut + 2);
    fail(where, "the header is not valid JSON (" + std::string(detail) + ")");
  }
  if (too_deep)
    fail(where, "the header nests deeper than " + std::to_string(max_json_depth) +
                    " levels; a safetensors header nests three");
  if (duplicate) fail(where, "the header has the key '" + *duplicate + "' more than once");
  if (!root.is_object()) fail(where, "the header is " + json_kind(root) + ", expected an object");

  Header header;
  for (const auto& [name, value] : root.items()) {
    if (name == "__metadata__") {
      if (!value.is_object())
        fail(where, "__metadata__ is " + json_kind(value) + ", expected an object of strings");
      for (const auto& [key, v] : value.items()) {
        if (!v.is_string())
          fail(where, "metadata value of '" + key + "' is " + json_kind(v) + ", expected a string");
        header.metadata.emplace(key, v.get<std::string>());
      }
      continue;
    }
    const std::string tensor = "tensor '" + name + "'";
    if (!value.is_object())
      fail(where, tensor + " is described by " + json_kind(value) +
                      ", expected an object with dtype, shape and data_offsets");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!value.contains(field)) fail(where, tensor + " has no " + field);

    HeaderEntry e;
    e.name = name;
    const json& dtype = value["dtype"];
    if (!dtype.is_string())
      fail(where, tensor + " has a dtype that is " + json_kind(dtype) + ", expected a string");
    auto parsed_dtype = parse_dtype(dtype.get<std::string>());
    if (!parsed_dtype)
      fail(where, tensor + " has unknown dtype '" + dtype.get<std::string>() +
                      "' (supported: F32, F64, BF16, F16, U8, I8, I32, I64)");
    e.dtype = *parsed_dtype;

    const json& shape = value["shape"];
    if (!shape.is_array())
      fail(where, tensor + " has a shape that is " + json_kind(shape) +
                      ", expected an array of non-negative integers");
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const std::uint64_t d =
          json_size(shape[i], where, tensor + ": shape entry " + std::to_string(i));
      if (d > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(where, tensor + ": shape entry " + std::to_string(i) + " is too large");
      e.shape.push_back(static_cast<std::int64_t>(d));
    }

    const json& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2)
      fail(where, tensor + " has data_offsets " + offsets.dump() + ", expected [begin, end]");
    e.begin = json_size(offsets[0], where, tensor + ": data_offsets begin");
    e.end = json_size(offsets[1], where, tensor + ": data_offsets end");
    const std::string range = "[" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")";
    if (e.begin > e.end)
      fail(where, tensor + " has data_offsets " + range + " that end before they begin");
    if (e.end > buffer_size)
      fail(where, tensor + " has data_offsets " + range + " outside the " +
                      std::to_string(buffer_size) + "-byte data buffer");
    auto bytes = byte_size(e.shape, e.dtype);
    if (!bytes || *bytes != e.end - e.begin)
      fail(where,
           tensor + " has data_offsets " + range + " (" + std::to_string(e.end - e.begin) +
               " bytes), which does not match its shape " + shape_string(e.shape) + " × " +
               std::to_string(element_size(e.dtype)) + "-byte " + std::string(dtype_name(e.dtype)) +
               " = " +
               (bytes ? std::to_string(*bytes) + " bytes" : std::string("more than 2^64 bytes")));
    header.entries.push_back(std::move(e));
  }

  // Overlap: sort the non-empty ranges by start; each must begin at or after the previous end.
  std::vector<const HeaderEntry*> by_offset;
  for (const auto& e : header.entries)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const HeaderEntry* a, const HeaderEntry* b) { return a->begin < b->begin; });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    const HeaderEntry& a = *by_offset[i - 1];
    const HeaderEntry& b = *by_offset[i];
    if (b.begin < a.end)
      fail(where, "tensors '" + a.name + "' [" + std::to_string(a.begin) + ", " +
                      std::to_string(a.end) + ") and '" + b.name + "' [" + std::to_string(b.begin) +
                      ", " + std::to_string(b.end) + ") overlap in the data buffer");
  }
  return header;
}

/// The little-endian u64 in the first 8 bytes of `p`.
inline std::uint64_t load_u64(const std::byte* p) {
  std::uint64_t v = 0;
  std::memcpy(&v, p, 8);
  return v;
}

/// Checks the header length `n` against the `after` bytes that follow the length prefix.
inline void check_header_length(std::uint64_t n, std::uint64_t after, std::string_view where) {
  if (n > max_header_bytes)
    fail(where, "the header length " + std::to_string(n) + " exceeds the limit of " +
                    std::to_string(max_header_bytes) +
                    " bytes (corrupt or not a safetensors file)");
  if (n > after)
    fail(where, "the header length " + std::to_string(n) + " is larger than the " +
                    std::to_string(after) +
                    " bytes after the length prefix (truncated or not a "
                    "safetensors file)");
}

/// The JSON header for `file`, padded with spaces to a multiple of 8 bytes, and the total size
/// of its data buffer. Validates every tensor first.
inline std::pair<std::string, std::uint64_t> make_header(const TensorFile& file) {
  nlohmann::ordered_json root = nlohmann::ordered_json::object();
  if (!file.metadata.empty()) {
    auto& meta = root["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : file.metadata)
      meta[k] = v;
  }
  std::uint64_t offset = 0;
  for (const auto& [name, t] : file.tensors) {
    require(name != "__metadata__", "'__metadata__' is reserved and cannot name a tensor");
    auto bytes = byte_size(t.shape, t.dtype);
    require(bytes.has_value() && *bytes == t.data.size(),
            "tensor '" + name + "' has " + std::to_string(t.data.size()) +
                " bytes of data, which does not match its shape " + shape_string(t.shape) +
                " and dtype " + std::string(dtype_name(t.dtype)));
    auto& entry = root[name] = nlohmann::ordered_json::object();
    entry["dtype"] = std::string(dtype_name(t.dtype));
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + *bytes};
    offset += *bytes;
  }
  std::string text;
  try {
    text = root.dump();
  } catch (const nlohmann::json::exception&) {
    throw Error("slimgrad: a tensor name or metadata string is not valid UTF-8");
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return {std::move(text), offset};
}

/// Writes through a temporary file in the destination directory, renamed over `path` only
/// after `body(FILE*)` and the flush succeeded; on any failure the temporary file is removed.
template <class Body>
void write_atomically(const std::filesystem::path& path, Body&& body) {
  namespace fs = std::filesystem;
  const std::string where = "cannot write '" + path.string() + "'";
  require(!path.empty() && path.has_filename(), where + ": the path names no file");
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw Error("slimgrad: " + where + ": it is a directory");
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();

  std::random_device rd;
  fs::path tmp;
  std::FILE* f = nullptr;
  for (int attempt = 0; attempt < 16 && !f; ++attempt) {
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp%08x", static_cast<unsigned>(rd()));
    std::string name = path.filename().string();  // appended in steps: g++ 12 -Wrestrict
    name.insert(0, 1, '.');
    name.append(suffix);
    tmp = dir / name;
    errno = 0;
    f = std::fopen(tmp.c_str(), "wbx");  // "x": never reuse an existing file
    if (!f && errno != EEXIST) break;
  }
  if (!f)
    throw Error("slimgrad: " + where + ": cannot create a temporary file in '" + dir.string() +
                "': " + std::strerror(errno));
  struct Cleanup {
    std::FILE*& f;
    const fs::path& tmp;
    bool armed = true;
    ~Cleanup() {
      if (!armed) return;
      if (f) std::fclose(f);
      std::error_code ignored;
      fs::remove(tmp, ignored);
    }
  } cleanup{f, tmp};

  body(f);
  bool ok = std::fflush(f) == 0 && !std::ferror(f);
#if defined(__unix__) || defined(__APPLE__)
  ok = ok && ::fsync(::fileno(f)) == 0;
#endif
  const int saved = errno;
  const int closed = std::fclose(f);
  f = nullptr;
  if (!ok || closed != 0)
    throw Error("slimgrad: " + where + ": writing '" + tmp.string() +
                "' failed: " + std::strerror(ok ? errno : saved));
  fs::rename(tmp, path, ec);
  if (ec)
    throw Error("slimgrad: " + where + ": renaming the temporary file failed: " + ec.message());
  cleanup.armed = false;
}

inline void write_bytes(std::FILE* f, const void* p, std::size_t n) {
  if (n && std::fwrite(p, 1, n, f) != n)
    throw Error(std::string("slimgrad: writing a safetensors file failed: ") +
                std::strerror(errno));
}

}  // namespace detail

/// The file `file` as safetensors bytes (see the header comment for the layout).
inline std::vector<std::byte> serialize(const TensorFile& file) {
  auto [header, data_bytes] = detail::make_header(file);
  std::vector<std::byte> out(8 + header.size() + data_bytes);
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  std::size_t pos = 8 + header.size();
  for (const auto& [name, t] : file.tensors) {
    if (!t.data.empty()) std::memcpy(out.data() + pos, t.data.data(), t.data.size());
    pos += t.data.size();
  }
  return out;
}

/// Parses safetensors bytes held in memory. Throws Error naming the problem for any malformed
/// input; never reads outside `bytes`.
inline TensorFile parse(std::span<const std::byte> bytes) {
  constexpr std::string_view where = "safetensors data";
  if (bytes.size() < 8)
    detail::fail(where, "it is " + std::to_string(bytes.size()) +
                            " bytes long, shorter than the 8-byte header length");
  const std::uint64_t n = detail::load_u64(bytes.data());
  detail::check_header_length(n, bytes.size() - 8, where);
  const auto* text = reinterpret_cast<const char*>(bytes.data() + 8);
  const std::uint64_t buffer_size = bytes.size() - 8 - n;
  detail::Header header =
      detail::parse_header(std::string_view(text, static_cast<std::size_t>(n)), buffer_size, where);
  const std::byte* buffer = bytes.data() + 8 + n;
  TensorFile out;
  out.metadata = std::move(header.metadata);
  for (auto& e : header.entries) {
    Tensor t;
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    t.data.assign(buffer + e.begin, buffer + e.end);
    out.tensors.emplace(std::move(e.name), std::move(t));
  }
  return out;
}

/// Reads the safetensors file at `path`, with the checks of parse(); each tensor is read
/// straight into its own buffer (no second copy of the file in memory).
inline TensorFile read(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  const std::string where = "safetensors file '" + path.string() + "'";
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) detail::fail(where, "it does not exist");
  if (fs::is_directory(status)) detail::fail(where, "it is a directory");
  if (!fs::is_regular_file(status)) detail::fail(where, "it is not a regular file");
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) detail::fail(where, "cannot get its size: " + ec.message());

  errno = 0;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) detail::fail(where, std::string("cannot open it: ") + std::strerror(errno));
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{f};
  auto read_exact = [&](void* dst, std::size_t n, std::uint64_t at) {
    if (n == 0) return;
    if (std::fseek(f, static_cast<long>(at), SEEK_SET) != 0 || std::fread(dst, 1, n, f) != n)
      detail::fail(where, std::string("reading it failed: ") +
                              (std::feof(f) ? "the file ended early" : std::strerror(errno)));
  };

  if (size < 8)
    detail::fail(where, "it is " + std::to_string(size) +
                            " bytes long, shorter than the 8-byte header length");
  std::array<std::byte, 8> prefix{};
  read_exact(prefix.data(), 8, 0);
  const std::uint64_t n = detail::load_u64(prefix.data());
  detail::check_header_length(n, size - 8, where);
  std::string text(static_cast<std::size_t>(n), '\0');
  read_exact(text.data(), text.size(), 8);
  detail::Header header = detail::parse_header(text, size - 8 - n, where);

  TensorFile out;
  out.metadata = std::move(header.metadata);
  for (auto& e : header.entries) {
    Tensor t;
    t.dtype = e.dtype;
    t.shape = std::move(e.shape);
    t.data.resize(static_cast<std::size_t>(e.end - e.begin));
    read_exact(t.data.data(), t.data.size(), 8 + n + e.begin);
    out.tensors.emplace(std::move(e.name), std::move(t));
  }
  return out;
}

/// Writes `file` to `path` atomically (temporary file + rename; see the header comment). The
/// tensors are validated before anything is created.
inline void write(const std::filesystem::path& path, const TensorFile& file) {
  const std::string header = detail::make_header(file).first;
  detail::write_atomically(path, [&](std::FILE* f) {
    const std::uint64_t n = header.size();
    detail::write_bytes(f, &n, 8);
    detail::write_bytes(f, header.data(), header.size());
    for (const auto& [name, t] : file.tensors)
      detail::write_bytes(f, t.data.data(), t.data.size());
  });
}

}  // namespace slimgrad::io
