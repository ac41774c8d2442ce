// libFuzzer target: arbitrary bytes through the safetensors reader and the optimizer's
// checkpoint loader. Any input must end in a successful load or a slimgrad::Error — never a
// crash, a sanitizer report, or a changed optimizer after an error.
//
// Built with -DSLIMGRAD_FUZZ_SEED instead, the same file is a program that writes valid
// checkpoints into the directory given as its argument: the fuzzer's seed corpus.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <slimgrad/slimgrad.hpp>
#include <span>
#include <string>
#include <vector>

namespace {

using namespace slimgrad;
using Fuzzed = recipes::GaLore<>;

Fuzzed::Options options() {
  auto o = recipes::galore_options();
  o.transform.rank = 2;
  o.transform.update_gap = 2;
  o.fallback.min_size = 0;
  return o;
}

// An optimizer with state for two parameters (one compressed, one plain).
Fuzzed trained() {
  Fuzzed opt(options());
  std::vector<float> w(8 * 6, 0.5f), g(8 * 6), b(6, 0.1f), gb(6);
  for (std::uint32_t k = 0; k < 3; ++k) {
    random::fill_gaussian(host_view(g.data(), 8, 6), {1, 1, k}, 1.0);
    random::fill_gaussian(host_view(gb.data(), 1, 6), {1, 2, k}, 1.0);
    Param ps[2] = {{"w", host_view(w.data(), 8, 6), host_view<const float>(g.data(), 8, 6)},
                   {"b", host_view(b.data(), 1, 6), host_view<const float>(gb.data(), 1, 6)}};
    opt.step(ps);
  }
  return opt;
}

}  // namespace

#if defined(SLIMGRAD_FUZZ_SEED)
int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  std::filesystem::create_directories(argv[1]);
  io::write(std::filesystem::path(argv[1]) / "galore.safetensors", trained().to_checkpoint());
  io::TensorFile small;
  small.add_f32("x", {2, 2}, std::vector<float>{1, 2, 3, 4});
  small.metadata["format"] = "slimgrad-optimizer";
  io::write(std::filesystem::path(argv[1]) / "small.safetensors", small);
  return 0;
}
#else
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Fuzzed opt = trained();
  static const std::vector<std::byte> before = io::serialize(opt.to_checkpoint());
  try {
    io::TensorFile f =
        io::parse(std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size));
    // Half of the inputs get a valid checksum, so the fuzzer also reaches the loader's checks
    // of names, dtypes, shapes and values behind it.
    if (size > 0 && (data[size - 1] & 1) != 0)
      f.metadata["checksum"] = std::to_string(io::checksum(f));
    Fuzzed fresh(options());
    fresh.from_checkpoint(f);  // a valid file may load
    opt.from_checkpoint(f);
    opt.from_checkpoint(io::parse(before));  // back to the reference state
  } catch (const Error&) {
    if (io::serialize(opt.to_checkpoint()) != before) __builtin_trap();  // changed on error
  }
  return 0;
}
#endif
