// tools/cli.hpp — what the subcommands of the `slimgrad` tool share: how a subcommand is
// registered, the error contract, option validators, and the wavelet/level dispatch.
//
// ADDING A SUBCOMMAND. Write tools/<name>.cpp with a function `void add_<name>_command(CLI::App&)`
// that creates the subcommand, binds its options to a shared struct and sets its callback;
// declare it below and call it from main() in tools/slimgrad.cpp; list the file in
// tools/CMakeLists.txt. `bench` subcommands register on the App returned by add_bench_command.
//
// ERROR CONTRACT (tests/tools/test_cli.py checks it). A callback reports every problem by
// throwing slimgrad::Error (use require()); main() prints exactly one line
// "slimgrad: error: <sentence>" to stderr and exits with status 1 (2 for command-line usage
// errors found by CLI11). A command writes its output file only after all its work succeeded,
// through io::write (temporary file + rename), so a failed run leaves no OUT file.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <slimgrad/backend/cpu/dwt.hpp>
#include <slimgrad/core/error.hpp>
#include <slimgrad/io/safetensors.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace slimgrad::tools {

// ---- registration (one function per subcommand file) -------------------------------------------

/// `slimgrad transform`: tools/transform.cpp.
void add_transform_command(CLI::App& app);
/// `slimgrad bench`: the group that holds the benchmark subcommands (tools/bench_transform.cpp).
CLI::App& add_bench_command(CLI::App& app);
/// `slimgrad bench transform`: tools/bench_transform.cpp.
void add_bench_transform_command(CLI::App& bench);

// ---- validators
// ----------------------------------------------------------------------------------

/// The wavelets the tool dispatches onto transforms::Haar, Db2, Db4.
enum class WaveletName { haar, db2, db4 };

/// The most DWT levels the tool dispatches (Dwt<W, 1> ... Dwt<W, 8>).
inline constexpr int max_cli_levels = 8;

inline WaveletName parse_wavelet(const std::string& s) {
  if (s == "haar") return WaveletName::haar;
  if (s == "db2") return WaveletName::db2;
  if (s == "db4") return WaveletName::db4;
  throw Error("slimgrad: unknown wavelet '" + s + "' (expected haar, db2 or db4)");
}

inline int filter_length(WaveletName w) {
  return w == WaveletName::haar ? 2 : (w == WaveletName::db2 ? 4 : 8);
}

/// CLI11 validator: one of haar, db2, db4.
inline CLI::Validator wavelet_validator() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        return (s == "haar" || s == "db2" || s == "db4")
                   ? std::string()
                   : "unknown wavelet '" + s + "' (expected haar, db2 or db4)";
      },
      "haar|db2|db4", "wavelet");
}

/// CLI11 validator: zero or periodization.
inline CLI::Validator mode_validator() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        return (s == "zero" || s == "periodization")
                   ? std::string()
                   : "unknown boundary mode '" + s + "' (expected zero or periodization)";
      },
      "zero|periodization", "mode");
}

/// CLI11 validator: an integer level in [1, max_cli_levels].
inline CLI::Validator levels_validator() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        long v = 0;
        std::size_t used = 0;
        try {
          v = std::stol(s, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != s.size() || v < 1 || v > max_cli_levels)
          return "levels must be an integer from 1 to " + std::to_string(max_cli_levels) +
                 ", got '" + s + "'";
        return std::string();
      },
      "1..8", "levels");
}

// ---- options more than one subcommand takes
// ----------------------------------------------------------------------------------

/// --wavelet, --levels and --mode, with pywt's names (transform, bench transform).
inline void add_dwt_options(CLI::App* cmd, std::string& wavelet, int& levels, std::string& mode) {
  cmd->add_option("--wavelet", wavelet, "Wavelet")
      ->check(wavelet_validator())
      ->capture_default_str();
  cmd->add_option("--levels", levels, "Decomposition levels")
      ->check(levels_validator())
      ->capture_default_str();
  cmd->add_option("--mode", mode, "Boundary mode (pywt's names)")
      ->check(mode_validator())
      ->capture_default_str();
}

/// The positional IN and OUT safetensors files of a command that writes OUT only on success.
inline void add_in_out(CLI::App* cmd, std::string& in, std::string& out) {
  cmd->add_option("IN", in, "Input safetensors file")->required();
  cmd->add_option("OUT", out, "Output safetensors file (written only on success)")->required();
}

/// --optimizer NAME and the repeatable --set key=value (replay, memory, bench step).
inline CLI::Option* add_recipe_options(CLI::App* cmd, std::string& optimizer,
                                       std::vector<std::string>& sets,
                                       const std::string& recipe_names) {
  CLI::Option* name = cmd->add_option("--optimizer", optimizer, "Recipe: " + recipe_names);
  cmd->add_option("--set", sets, "A hyper-parameter, key=value (repeatable)")
      ->allow_extra_args(false);
  return name;
}

/// --model NAME (the LLaMA shapes of the GaLore paper) or --shapes MxN,... (memory, bench step).
inline void add_model_options(CLI::App* cmd, std::string& model, std::string& shapes,
                              const std::string& shapes_help) {
  cmd->add_option("--model", model, "llama-60m, llama-130m, llama-350m, llama-1b or llama-7b");
  cmd->add_option("--shapes", shapes, shapes_help);
}

// ---- wavelet and level dispatch
// --------------------------------------------------------------------

namespace detail {
template <class W, class F, int... L>
void dispatch_levels(int levels, F& f, std::integer_sequence<int, L...>) {
  const bool done =
      ((levels == L + 1 ? (f(std::type_identity<transforms::Dwt<W, L + 1>>{}), true) : false) ||
       ...);
  require(done, "levels must be from 1 to " + std::to_string(max_cli_levels) + ", got " +
                    std::to_string(levels));
}
}  // namespace detail

/// Calls f(std::type_identity<transforms::Dwt<W, levels>>{}) for the wavelet and level chosen
/// at run time: 3 wavelets × 8 levels instantiations of f.
template <class F>
void with_dwt(WaveletName w, int levels, F&& f) {
  const auto seq = std::make_integer_sequence<int, max_cli_levels>{};
  switch (w) {
    case WaveletName::haar:
      detail::dispatch_levels<transforms::Haar>(levels, f, seq);
      return;
    case WaveletName::db2:
      detail::dispatch_levels<transforms::Db2>(levels, f, seq);
      return;
    case WaveletName::db4:
      detail::dispatch_levels<transforms::Db4>(levels, f, seq);
      return;
  }
}

// ---- tensors
// -------------------------------------------------------------------------------------

/// A dense row-major float32 matrix.
struct Matrix {
  index_t rows = 0;
  index_t cols = 0;
  std::vector<float> values;
};

/// Tensor `name` of `file` as a matrix; throws with a sentence unless it is a non-empty 2-D F32
/// tensor. `what` names the input in messages (e.g. the file name).
inline Matrix require_matrix(const io::TensorFile& file, const std::string& name,
                             const std::string& what) {
  const io::Tensor& t = file.at(name);
  require(t.dtype == io::Dtype::F32, what + ": tensor '" + name + "' is " +
                                         std::string(io::dtype_name(t.dtype)) + ", expected F32");
  require(t.shape.size() == 2, what + ": tensor '" + name + "' has " +
                                   std::to_string(t.shape.size()) + " dimension" +
                                   (t.shape.size() == 1 ? "" : "s") + " " +
                                   io::detail::shape_string(t.shape) + ", expected a 2-D matrix");
  require(t.shape[0] > 0 && t.shape[1] > 0,
          what + ": tensor '" + name + "' is empty " + io::detail::shape_string(t.shape));
  return {static_cast<index_t>(t.shape[0]), static_cast<index_t>(t.shape[1]), t.to_f32()};
}

}  // namespace slimgrad::tools
