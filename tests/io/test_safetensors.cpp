// Tests of slimgrad/io/safetensors.hpp: round trips of every dtype, a file written by an
// independent Python writer (tests/reference/gen_safetensors.py), every malformed-input case
// refused with a sentence that names the problem, atomic writing, and a mutation sweep that
// must only ever produce slimgrad::Error.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numbers>
#include <random>
#include <slimgrad/io/safetensors.hpp>
#include <string>
#include <vector>

#if defined(__unix__)
#include <unistd.h>
#endif

using namespace slimgrad;
using namespace slimgrad::io;
namespace fs = std::filesystem;

namespace {

/// Safetensors bytes from a literal header text and a data buffer; `length` overrides the
/// 8-byte header-length prefix.
std::vector<std::byte> make_bytes(const std::string& header, std::size_t buffer_bytes = 0,
                                  std::optional<std::uint64_t> length = std::nullopt) {
  std::vector<std::byte> out(8 + header.size() + buffer_bytes, std::byte{0x5a});
  const std::uint64_t n = length.value_or(header.size());
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

/// The message of the slimgrad::Error that parse() throws on `bytes` ("" if none).
std::string parse_error(const std::vector<std::byte>& bytes) {
  try {
    (void)parse(bytes);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

/// A fresh, empty directory under the system temporary directory.
fs::path fresh_dir(const std::string& tag) {
  std::random_device rd;
  fs::path dir = fs::temp_directory_path() /
                 ("slimgrad_test_" + tag + "_" + std::to_string(rd()) + std::to_string(rd()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_raw(const fs::path& p, const std::vector<std::byte>& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<std::byte> read_raw(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  std::memcpy(out.data(), c.data(), c.size());
  return out;
}

std::uint32_t bits(float f) {
  return std::bit_cast<std::uint32_t>(f);
}

/// One tensor of every dtype, with a few awkward shapes (scalar, empty, 3-D).
TensorFile all_dtypes() {
  TensorFile f;
  const std::vector<float> f32 = {1.5f,
                                  -0.0f,
                                  std::numeric_limits<float>::infinity(),
                                  std::numeric_limits<float>::denorm_min(),
                                  3.25f,
                                  -7.0f};
  f.add_f32("f32", {2, 3}, f32);
  const std::vector<double> f64 = {std::numbers::pi, -1e-300, 1e300};
  f.add("f64", Tensor::from_values<double>({3}, f64));
  const std::vector<std::uint16_t> b16 = {0x3f80, 0xc020, 0x7f80, 0x0001};
  f.add("bf16", Tensor::from_values<std::uint16_t>({2, 2}, b16, Dtype::BF16));
  f.add("f16", Tensor::from_values<std::uint16_t>({1, 4}, b16, Dtype::F16));
  const std::vector<std::uint8_t> u8 = {0, 1, 254, 255};
  f.add("u8", Tensor::from_values<std::uint8_t>({2, 1, 2}, u8));
  const std::vector<std::int8_t> i8 = {-128, 127, 0};
  f.add("i8", Tensor::from_values<std::int8_t>({3}, i8));
  const std::vector<std::int32_t> i32 = {std::numeric_limits<std::int32_t>::min(), 7};
  f.add("i32", Tensor::from_values<std::int32_t>({2}, i32));
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(),
                                         std::numeric_limits<std::int64_t>::max()};
  f.add("i64", Tensor::from_values<std::int64_t>({2}, i64));
  const std::vector<float> one = {42.0f};
  f.add_f32("scalar", {}, one);
  f.add_f32("empty", {0, 5}, std::vector<float>{});
  f.metadata["format"] = "slimgrad-test";
  f.metadata["step"] = "17";
  f.metadata["unicode"] = "\xce\xbb\xe2\x86\x92\xe2\x88\x9e";  // λ→∞
  return f;
}

void check_equal(const TensorFile& a, const TensorFile& b) {
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (const auto& entry : a.tensors) {
    const std::string& name = entry.first;
    const Tensor& t = entry.second;
    INFO("tensor ", name);
    REQUIRE(b.contains(name));
    const Tensor& u = b.at(name);
    CHECK(t.dtype == u.dtype);
    CHECK(t.shape == u.shape);
    CHECK(t.data == u.data);
  }
  CHECK(a.metadata == b.metadata);
}

}  // namespace

TEST_CASE("dtype names and element sizes") {
  const std::pair<Dtype, std::size_t> expected[] = {
      {Dtype::F32, 4}, {Dtype::F64, 8}, {Dtype::BF16, 2}, {Dtype::F16, 2},
      {Dtype::U8, 1},  {Dtype::I8, 1},  {Dtype::I32, 4},  {Dtype::I64, 8}};
  for (auto [d, size] : expected) {
    CHECK(element_size(d) == size);
    CHECK(parse_dtype(dtype_name(d)) == d);
  }
  CHECK(!parse_dtype("f32").has_value());
  CHECK(!parse_dtype("BOOL").has_value());
}

TEST_CASE("round trip of every dtype through memory and through a file") {
  const TensorFile f = all_dtypes();
  const std::vector<std::byte> bytes = serialize(f);
  check_equal(f, parse(bytes));

  const fs::path dir = fresh_dir("roundtrip");
  write(dir / "all.safetensors", f);
  check_equal(f, read(dir / "all.safetensors"));
  CHECK(read_raw(dir / "all.safetensors") == bytes);  // write() and serialize() agree
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);  // no temp
  fs::remove_all(dir);

  // Typed access checks the dtype.
  const TensorFile g = parse(bytes);
  CHECK(g.at("f32").to_f32()[0] == 1.5f);
  CHECK(bits(g.at("f32").to_f32()[1]) == 0x80000000u);
  CHECK(g.at("i64").values<std::int64_t>()[0] == std::numeric_limits<std::int64_t>::min());
  CHECK(g.at("bf16").values<std::uint16_t>(Dtype::BF16)[2] == 0x7f80);
  CHECK(g.at("scalar").numel() == 1);
  CHECK(g.at("empty").numel() == 0);
  CHECK_THROWS_WITH_AS((void)g.at("f64").to_f32(), doctest::Contains("F64, expected F32"), Error);
  CHECK_THROWS_WITH_AS((void)g.at("nope"), doctest::Contains("no tensor named 'nope'"), Error);
}

TEST_CASE("writing is deterministic: sorted names, contiguous data, 8-byte aligned header") {
  const std::vector<float> v = {1, 2, 3, 4};
  TensorFile a, b;
  a.add_f32("zeta", {4}, v);
  a.add_f32("alpha", {2, 2}, v);
  a.add("mid", Tensor::from_values<std::uint8_t>({2}, std::vector<std::uint8_t>{1, 2}));
  b.add("mid", Tensor::from_values<std::uint8_t>({2}, std::vector<std::uint8_t>{1, 2}));
  b.add_f32("alpha", {2, 2}, v);
  b.add_f32("zeta", {4}, v);
  a.metadata["k"] = b.metadata["k"] = "v";
  const auto bytes = serialize(a);
  CHECK(bytes == serialize(b));

  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  const std::string header(reinterpret_cast<const char*>(bytes.data() + 8), n);
  CHECK(header.find_last_not_of(' ') + 1 < header.size() + 1);
  CHECK(header.rfind('}') == header.find_last_not_of(' '));
  CHECK(header.find("\"__metadata__\"") == 1);  // metadata first
  CHECK(header.find("\"alpha\"") < header.find("\"mid\""));
  CHECK(header.find("\"mid\"") < header.find("\"zeta\""));
  CHECK(header.find("\"data_offsets\":[0,16]") != std::string::npos);   // alpha
  CHECK(header.find("\"data_offsets\":[16,18]") != std::string::npos);  // mid
  CHECK(header.find("\"data_offsets\":[18,34]") != std::string::npos);  // zeta
  CHECK(bytes.size() == 8 + n + 34);
}

TEST_CASE("a file written by Python (numpy + json + struct) reads back with exact values") {
  const TensorFile f = read(fs::path(SLIMGRAD_TEST_DATA_DIR) / "python_written.safetensors");
  CHECK(f.tensors.size() == 11);
  CHECK(f.metadata.at("format") == "pt");
  CHECK(f.metadata.at("writer") == "tests/reference/gen_safetensors.py");
  CHECK(f.metadata.at("unicode") == "\xce\xbb\xe2\x86\x92\xe2\x88\x9e");

  const Tensor& w = f.at("weight");
  CHECK(w.dtype == Dtype::F32);
  CHECK(w.shape == std::vector<std::int64_t>{3, 4});
  const auto wv = w.to_f32();
  for (int i = 0; i < 12; ++i)
    CHECK(wv[static_cast<std::size_t>(i)] == static_cast<float>(i) * 0.5f - 2.25f);

  const auto d = f.at("double").values<double>();
  CHECK(f.at("double").shape == std::vector<std::int64_t>{2, 2});
  CHECK(d[0] == std::numbers::pi);
  CHECK(d[1] == std::numbers::e);
  CHECK(d[2] == -1.0 / 3.0);
  CHECK(d[3] == 1e300);

  const std::vector<std::uint16_t> bf16 = {0x3f80, 0xc020, 0x3e20,
                                           0x7180};  // 1, -2.5, 0.15625, 2^100
  CHECK(f.at("bf16").values<std::uint16_t>(Dtype::BF16) == bf16);
  CHECK((bits(1.0f) >> 16) == 0x3f80u);
  CHECK((bits(0.15625f) >> 16) == 0x3e20u);
  CHECK((bits(std::ldexp(1.0f, 100)) >> 16) == 0x7180u);
  const std::vector<std::uint16_t> half = {0x0000, 0x3c00, 0xbc00, 0x3800, 0x7bff, 0x0400};
  CHECK(f.at("half").values<std::uint16_t>(Dtype::F16) == half);
  CHECK(f.at("half").shape == std::vector<std::int64_t>{2, 3});

  CHECK(f.at("u8").values<std::uint8_t>() == std::vector<std::uint8_t>{0, 1, 127, 128, 255});
  CHECK(f.at("i8").values<std::int8_t>() == std::vector<std::int8_t>{-128, -1, 0, 127});
  CHECK(f.at("i32").values<std::int32_t>() ==
        std::vector<std::int32_t>{std::numeric_limits<std::int32_t>::min(), -1, 0,
                                  std::numeric_limits<std::int32_t>::max()});
  CHECK(f.at("i64").values<std::int64_t>() ==
        std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min(), 0,
                                  std::numeric_limits<std::int64_t>::max()});
  CHECK(f.at("scalar").shape.empty());
  CHECK(f.at("scalar").to_f32() == std::vector<float>{42.0f});
  CHECK(f.at("empty").shape == std::vector<std::int64_t>{0, 3});
  CHECK(f.at("empty").data.empty());
  const auto edge = f.at("a_first_name").to_f32();
  CHECK(bits(edge[0]) == 0x80000000u);
  CHECK(bits(edge[1]) == 0x00000001u);
  CHECK(bits(edge[2]) == 0x7f7fffffu);
}

TEST_CASE("file-level problems are refused with a sentence") {
  const fs::path dir = fresh_dir("files");
  CHECK_THROWS_WITH_AS((void)read(dir / "missing.safetensors"), doctest::Contains("does not exist"),
                       Error);
  CHECK_THROWS_WITH_AS((void)read(dir), doctest::Contains("is a directory"), Error);
  write_raw(dir / "short", std::vector<std::byte>(5));
  CHECK_THROWS_WITH_AS((void)read(dir / "short"), doctest::Contains("shorter than the 8-byte"),
                       Error);
  write_raw(dir / "truncated", make_bytes("{}", 0, 64));
  CHECK_THROWS_WITH_AS((void)read(dir / "truncated"),
                       doctest::Contains("is larger than the 2 bytes"), Error);
  // A header that promises more data than the file holds.
  write_raw(dir / "cut",
            make_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8));
  CHECK_THROWS_WITH_AS((void)read(dir / "cut"), doctest::Contains("outside the 8-byte data buffer"),
                       Error);
#if defined(__unix__)
  if (::geteuid() != 0) {  // root reads everything
    write(dir / "locked", all_dtypes());
    fs::permissions(dir / "locked", fs::perms::none);
    CHECK_THROWS_WITH_AS((void)read(dir / "locked"), doctest::Contains("cannot open it"), Error);
  }
#endif
  fs::remove_all(dir);
}

TEST_CASE("every malformed header is refused with a sentence that names the problem") {
  const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  struct Case {
    const char* what;
    std::vector<std::byte> bytes;
    const char* message;
  };
  const Case cases[] = {
      {"empty input", {}, "0 bytes long, shorter than the 8-byte header length"},
      {"7 bytes", std::vector<std::byte>(7), "7 bytes long, shorter than the 8-byte"},
      {"header longer than the input", make_bytes("{}", 0, 100), "larger than the 2 bytes"},
      {"absurd header length", make_bytes("{}", 0, std::uint64_t{1} << 62), "exceeds the limit"},
      {"zero-length header", make_bytes(""), "not valid JSON"},
      {"JSON syntax error", make_bytes(R"({"a": {"dtype": )"), "not valid JSON"},
      {"invalid UTF-8", make_bytes("{\"\xff\": 1}"), "not valid JSON"},
      {"trailing garbage", make_bytes("{} x"), "not valid JSON"},
      {"header is an array", make_bytes("[1, 2]"), "the header is an array, expected an object"},
      {"header is a string", make_bytes(R"("hi")"), "the header is a string, expected an object"},
      {"entry not an object", make_bytes(R"({"a": 5})"), "tensor 'a' is described by an integer"},
      {"missing dtype", make_bytes(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", 8),
       "tensor 'a' has no dtype"},
      {"missing shape", make_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", 8),
       "tensor 'a' has no shape"},
      {"missing data_offsets", make_bytes(R"({"a":{"dtype":"F32","shape":[2]}})", 8),
       "tensor 'a' has no data_offsets"},
      {"unknown dtype", make_bytes(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
       "unknown dtype 'Q4'"},
      {"dtype not a string", make_bytes(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
       "dtype that is an integer"},
      {"negative shape",
       make_bytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "shape entry 0 is negative (-2)"},
      {"fractional shape",
       make_bytes(R"({"a":{"dtype":"F32","shape":[1,2.5],"data_offsets":[0,8]}})", 8),
       "shape entry 1 is not an integer"},
      {"string shape entry",
       make_bytes(R"({"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8),
       "shape entry 0 is a string"},
      {"shape not an array",
       make_bytes(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8),
       "shape that is an integer"},
      {"offsets beyond the buffer",
       make_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 8),
       "outside the 8-byte data buffer"},
      {"huge offsets",
       make_bytes(
           R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[18446744073709551614,18446744073709551615]}})",
           8),
       "outside the 8-byte data buffer"},
      {"offsets reversed",
       make_bytes(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8),
       "end before they begin"},
      {"negative offset",
       make_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
       "data_offsets begin is negative"},
      {"three offsets",
       make_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4,8]}})", 8),
       "expected [begin, end]"},
      {"offsets not matching shape",
       make_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "which does not match its shape [3]"},
      {"offsets not matching dtype",
       make_bytes(R"({"a":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}})", 8),
       "does not match its shape [2]"},
      {"overflowing shape",
       make_bytes(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                  8),
       "more than 2^64 bytes"},
      {"overlapping tensors",
       make_bytes(
           R"({"a":)" + ok_entry + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
           16),
       "tensors 'a' [0, 8) and 'b' [4, 12) overlap"},
      {"identical ranges", make_bytes(R"({"a":)" + ok_entry + R"(,"b":)" + ok_entry + "}", 8),
       "overlap"},
      {"metadata value not a string",
       make_bytes(R"({"__metadata__":{"step":3},"a":)" + ok_entry + "}", 8),
       "metadata value of 'step' is an integer, expected a string"},
      {"metadata not an object", make_bytes(R"({"__metadata__":["x"]})"),
       "__metadata__ is an array"},
      {"duplicate tensor names", make_bytes(R"({"a":)" + ok_entry + R"(,"a":)" + ok_entry + "}", 8),
       "the key 'a' more than once"},
      {"duplicate metadata keys", make_bytes(R"({"__metadata__":{"k":"1","k":"2"}})"),
       "the key 'k' more than once"},
      {"deep nesting", make_bytes(std::string(5000, '[') + std::string(5000, ']')),
       "nests deeper than"},
  };
  for (const Case& c : cases) {
    INFO("case: ", c.what);
    const std::string msg = parse_error(c.bytes);
    CHECK_MESSAGE(msg.find(c.message) != std::string::npos, "message was: ", msg);
    CHECK(msg.find('\n') == std::string::npos);
  }

  // The file reader reports the same problems, naming the file.
  const fs::path dir = fresh_dir("headers");
  for (const Case& c : cases) {
    INFO("file case: ", c.what);
    write_raw(dir / "bad.safetensors", c.bytes);
    try {
      (void)read(dir / "bad.safetensors");
      FAIL("no error");
    } catch (const Error& e) {
      const std::string msg = e.what();
      CHECK(msg.find(c.message) != std::string::npos);
      CHECK(msg.find("bad.safetensors") != std::string::npos);
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("valid but unusual files are accepted") {
  // Gaps between tensors, trailing bytes, unknown extra fields, whitespace padding, no metadata.
  const std::string header =
      R"(  {"b":{"dtype":"U8","shape":[2],"data_offsets":[10,12],"extra":1},)"
      R"("a":{"dtype":"U8","shape":[1,1],"data_offsets":[0,1]},"z":{"dtype":"I64","shape":[0],"data_offsets":[3,3]}}   )";
  auto bytes = make_bytes(header, 16);
  for (std::size_t i = 0; i < 16; ++i)
    bytes[8 + header.size() + i] = static_cast<std::byte>(i);
  const TensorFile f = parse(bytes);
  CHECK(f.at("a").values<std::uint8_t>() == std::vector<std::uint8_t>{0});
  CHECK(f.at("b").values<std::uint8_t>() == std::vector<std::uint8_t>{10, 11});
  CHECK(f.at("z").numel() == 0);
  CHECK(f.metadata.empty());
  CHECK(parse(make_bytes("{}")).tensors.empty());
}

TEST_CASE("writing validates first and never leaves a partial file") {
  const fs::path dir = fresh_dir("write");
  const fs::path out = dir / "out.safetensors";

  TensorFile bad;
  bad.tensors["x"] = Tensor{Dtype::F32, {3}, std::vector<std::byte>(8)};
  CHECK_THROWS_WITH_AS(write(out, bad), doctest::Contains("does not match its shape [3]"), Error);
  CHECK(!fs::exists(out));

  TensorFile reserved;
  reserved.tensors["__metadata__"] = Tensor{Dtype::U8, {0}, {}};
  CHECK_THROWS_WITH_AS(write(out, reserved), doctest::Contains("reserved"), Error);
  TensorFile t;
  CHECK_THROWS_WITH_AS(t.add("__metadata__", Tensor{}), doctest::Contains("reserved"), Error);
  t.add_f32("x", {1}, std::vector<float>{1.0f});
  CHECK_THROWS_WITH_AS(t.add_f32("x", {1}, std::vector<float>{1.0f}),
                       doctest::Contains("already present"), Error);
  CHECK_THROWS_WITH_AS(t.add_f32("y", {2, 2}, std::vector<float>{1.0f}),
                       doctest::Contains("holds 4 elements, but 1 values"), Error);

  TensorFile utf;
  utf.metadata["k"] = "\xff";
  CHECK_THROWS_WITH_AS(write(out, utf), doctest::Contains("UTF-8"), Error);
  CHECK(!fs::exists(out));

  // A directory that does not exist: nothing is created anywhere.
  CHECK_THROWS_WITH_AS(write(dir / "no" / "such" / "dir.safetensors", all_dtypes()),
                       doctest::Contains("cannot create a temporary file"), Error);
  CHECK_THROWS_WITH_AS(write(dir, all_dtypes()), doctest::Contains("is a directory"), Error);

  // Replacing an existing file: the old contents stay until the new ones are complete.
  write(out, t);
  check_equal(t, read(out));
  CHECK_THROWS_AS(write(out, bad), Error);
  check_equal(t, read(out));
  write(out, all_dtypes());
  check_equal(all_dtypes(), read(out));
  CHECK(std::distance(fs::directory_iterator(dir), fs::directory_iterator()) == 1);
  fs::remove_all(dir);
}

TEST_CASE("mutated and truncated files give slimgrad::Error or a valid result, nothing else") {
  const std::vector<std::byte> good = serialize(all_dtypes());
  const unsigned seed = 20240611;
  INFO("seed ", seed);
  std::mt19937 rng(seed);
  int errors = 0, accepted = 0;
  auto attempt = [&](const std::vector<std::byte>& bytes) {
    try {
      const TensorFile f = parse(bytes);
      for (const auto& [name, t] : f.tensors)  // what is accepted is self-consistent
        CHECK(detail::byte_size(t.shape, t.dtype) == t.data.size());
      ++accepted;
    } catch (const Error&) {
      ++errors;
    }
  };
  for (std::size_t n = 0; n < good.size(); ++n)
    attempt(std::vector<std::byte>(good.begin(), good.begin() + static_cast<long>(n)));
  const std::string alphabet = "{}[]\",:0123456789-.eE ";
  for (int i = 0; i < 3000; ++i) {
    std::vector<std::byte> b = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      const std::size_t pos = rng() % b.size();
      b[pos] = (rng() % 2) ? static_cast<std::byte>(rng() % 256)
                           : static_cast<std::byte>(alphabet[rng() % alphabet.size()]);
    }
    attempt(b);
  }
  MESSAGE("mutation sweep: ", errors, " refused, ", accepted, " accepted");
  CHECK(errors > 0);
  CHECK(accepted > 0);
}
