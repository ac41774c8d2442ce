// tools/transform.cpp — `slimgrad transform`: GWT's wavelet transform (algorithms.md §1.1) of
// the 2-D float32 tensors of a safetensors file, and its inverse, exactly as PyWavelets'
// wavedec/waverec along axis 1.
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli.hpp"

namespace slimgrad::tools {
namespace {

using transforms::BoundaryMode;

struct TransformArgs {
  std::string wavelet = "haar";
  int levels = 2;
  std::string mode = "zero";
  bool inverse = false;
  std::string in;
  std::string out;
};

constexpr const char* meta_prefix = "slimgrad.";
constexpr const char* meta_cols = "slimgrad.cols.";

/// Columns [offset, offset + len) of every row of the m×k row-major buffer c.
std::vector<float> columns(const std::vector<float>& c, index_t m, index_t k, index_t offset,
                           index_t len) {
  std::vector<float> v(static_cast<std::size_t>(m * len));
  for (index_t i = 0; i < m; ++i)
    std::memcpy(v.data() + i * len, c.data() + i * k + offset,
                static_cast<std::size_t>(len) * sizeof(float));
  return v;
}

/// wavedec of every matrix of `in` into NAME.a, NAME.d1..dL of `out`.
template <class D>
void forward_all(const std::map<std::string, Matrix>& in, BoundaryMode mode, io::TensorFile& out) {
  impl<D, backend::cpu> dwt(typename D::Options{mode, transforms::Axis::rows});
  for (const auto& [name, x] : in) {
    const Shape g{x.rows, x.cols};
    const auto state = dwt.init(g, 0);
    const Shape cs = dwt.coeff_shape(g);
    std::vector<float> c(static_cast<std::size_t>(cs.size()));
    dwt.forward(state, host_view(x.values.data(), x.rows, x.cols),
                host_view(c.data(), cs.rows, cs.cols));
    const transforms::DwtLayout lay = dwt.layout(g);
    const index_t na = lay.approx_length();
    out.add_f32(name + ".a", {x.rows, na}, columns(c, x.rows, cs.cols, 0, na));
    for (int l = 1; l <= D::levels; ++l)
      out.add_f32(name + ".d" + std::to_string(l), {x.rows, lay.detail_length(l)},
                  columns(c, x.rows, cs.cols, lay.detail_offset[l], lay.detail_length(l)));
    out.metadata[meta_cols + name] = std::to_string(x.cols);
  }
}

/// The parts of one NAME: its approximation and details d1..dL (index l - 1).
struct Group {
  std::optional<Matrix> a;
  std::vector<std::optional<Matrix>> d;
};

/// "a" → 0, "d<l>" → l (1..99), anything else → -1.
int part_level(const std::string& suffix) {
  if (suffix == "a") return 0;
  if (suffix.size() < 2 || suffix.size() > 3 || suffix[0] != 'd' || suffix[1] == '0') return -1;
  for (std::size_t i = 1; i < suffix.size(); ++i)
    if (suffix[i] < '0' || suffix[i] > '9') return -1;
  return std::stoi(suffix.substr(1));
}

std::string widths(const std::vector<index_t>& w, int levels) {
  std::string s = "a " + std::to_string(w[0]);
  for (int l = levels; l >= 1; --l)
    s += ", d" + std::to_string(l) + " " + std::to_string(w[static_cast<std::size_t>(l)]);
  return s;
}

/// waverec of every group of `in` into NAME of `out`.
template <class D>
void inverse_all(const std::map<std::string, Group>& groups, const io::TensorFile& file,
                 BoundaryMode mode, const std::string& what, io::TensorFile& out) {
  impl<D, backend::cpu> dwt(typename D::Options{mode, transforms::Axis::rows});
  constexpr int L = D::levels;
  for (const auto& [name, grp] : groups) {
    const Matrix& a = *grp.a;
    const index_t m = a.rows;
    std::vector<index_t> given(L + 1);  // [0] = a, [l] = d_l
    given[0] = a.cols;
    for (int l = 1; l <= L; ++l) {
      const Matrix& d = *grp.d[static_cast<std::size_t>(l - 1)];
      require(d.rows == m, what + ": '" + name + ".d" + std::to_string(l) + "' has " +
                               std::to_string(d.rows) + " rows, '" + name + ".a' has " +
                               std::to_string(m));
      given[static_cast<std::size_t>(l)] = d.cols;
    }
    // The output width: recorded by the forward pass, else pywt.waverec's.
    index_t n = mode == BoundaryMode::zero ? 2 * given[1] - D::filter_length + 2 : 2 * given[1];
    if (auto it = file.metadata.find(meta_cols + name); it != file.metadata.end()) {
      const std::string& v = it->second;
      const bool digits =
          !v.empty() && v.size() < 16 &&
          std::all_of(v.begin(), v.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
      require(digits && std::stol(v) > 0,
              what + ": metadata " + it->first + " is '" + v + "', expected a positive integer");
      n = std::stol(v);
    }
    require(n > 0, what + ": the parts of '" + name + "' (" + widths(given, L) +
                       ") are too narrow for a " + std::string(D::wavelet::name) + " transform");
    const transforms::DwtLayout lay = D::layout(n, mode);
    std::vector<index_t> expected(L + 1);
    expected[0] = lay.approx_length();
    for (int l = 1; l <= L; ++l)
      expected[static_cast<std::size_t>(l)] = lay.detail_length(l);
    require(expected == given, what + ": the parts of '" + name + "' have widths (" +
                                   widths(given, L) + "), but a " + std::string(D::wavelet::name) +
                                   " level-" + std::to_string(L) + " " +
                                   transforms::to_string(mode) + "-mode transform of width " +
                                   std::to_string(n) + " has (" + widths(expected, L) + ")");

    const index_t k = lay.total;
    std::vector<float> c(static_cast<std::size_t>(m * k));
    auto place = [&](const Matrix& part, index_t offset) {
      for (index_t i = 0; i < m; ++i)
        std::memcpy(c.data() + i * k + offset, part.values.data() + i * part.cols,
                    static_cast<std::size_t>(part.cols) * sizeof(float));
    };
    place(a, 0);
    for (int l = 1; l <= L; ++l)
      place(*grp.d[static_cast<std::size_t>(l - 1)], lay.detail_offset[l]);
    std::vector<float> x(static_cast<std::size_t>(m * n));
    const auto state = dwt.init({m, n}, 0);
    dwt.inverse(state, host_view(static_cast<const float*>(c.data()), m, k),
                host_view(x.data(), m, n));
    out.add_f32(name, {m, n}, x);
  }
}

void check_recorded_options(const io::TensorFile& file, const TransformArgs& args,
                            const std::string& what) {
  auto check = [&](const char* key, const std::string& value, const char* option) {
    auto it = file.metadata.find(std::string(meta_prefix) + key);
    if (it == file.metadata.end()) return;
    require(it->second == value, what + " was written with " + option + " " + it->second +
                                     ", but --inverse was given " + option + " " + value);
  };
  auto it = file.metadata.find(std::string(meta_prefix) + "transform");
  require(it == file.metadata.end() || it->second == "dwt",
          what + " holds a '" + (it == file.metadata.end() ? "" : it->second) +
              "' transform, not a wavelet transform");
  check("wavelet", args.wavelet, "--wavelet");
  check("levels", std::to_string(args.levels), "--levels");
  check("mode", args.mode, "--mode");
}

void run_transform(const TransformArgs& args) {
  const WaveletName wavelet = parse_wavelet(args.wavelet);
  const BoundaryMode mode = transforms::parse_boundary_mode(args.mode);
  const std::string what = "input '" + args.in + "'";
  const io::TensorFile in = io::read(args.in);
  require(!in.tensors.empty(), what + " holds no tensors");

  io::TensorFile out;
  for (const auto& [key, value] : in.metadata)  // keep the caller's metadata, not ours
    if (key.rfind(meta_prefix, 0) != 0) out.metadata[key] = value;

  if (!args.inverse) {
    std::map<std::string, Matrix> matrices;
    for (const auto& [name, t] : in.tensors)
      matrices.emplace(name, require_matrix(in, name, what));
    with_dwt(wavelet, args.levels,
             [&](auto tag) { forward_all<typename decltype(tag)::type>(matrices, mode, out); });
    out.metadata["slimgrad.transform"] = "dwt";
    out.metadata["slimgrad.wavelet"] = args.wavelet;
    out.metadata["slimgrad.levels"] = std::to_string(args.levels);
    out.metadata["slimgrad.mode"] = args.mode;
  } else {
    check_recorded_options(in, args, what);
    std::map<std::string, Group> groups;
    for (const auto& [name, t] : in.tensors) {
      const auto dot = name.rfind('.');
      const int level = dot == std::string::npos ? -1 : part_level(name.substr(dot + 1));
      require(level >= 0, what + ": tensor '" + name +
                              "' is not a wavelet part (expected NAME.a or NAME.d1 ... NAME.d" +
                              std::to_string(args.levels) + ")");
      require(level <= args.levels, what + ": tensor '" + name + "' is a level-" +
                                        std::to_string(level) + " detail, but --levels is " +
                                        std::to_string(args.levels));
      Group& g = groups[name.substr(0, dot)];
      g.d.resize(static_cast<std::size_t>(args.levels));
      Matrix part = require_matrix(in, name, what);
      if (level == 0)
        g.a = std::move(part);
      else
        g.d[static_cast<std::size_t>(level - 1)] = std::move(part);
    }
    for (const auto& [name, g] : groups) {
      require(g.a.has_value(), what + ": '" + name + "' has no approximation '" + name + ".a'");
      for (int l = 1; l <= args.levels; ++l)
        require(g.d[static_cast<std::size_t>(l - 1)].has_value(),
                what + ": '" + name + "' lacks its level-" + std::to_string(l) + " detail '" +
                    name + ".d" + std::to_string(l) + "'");
    }
    with_dwt(wavelet, args.levels, [&](auto tag) {
      inverse_all<typename decltype(tag)::type>(groups, in, mode, what, out);
    });
  }
  io::write(args.out, out);  // only now: a failure above leaves no OUT file
}

}  // namespace

void add_transform_command(CLI::App& app) {
  auto args = std::make_shared<TransformArgs>();
  CLI::App* cmd = app.add_subcommand(
      "transform",
      "Wavelet transform (GWT) of every 2-D float32 tensor of a safetensors file along its rows, "
      "as pywt.wavedec(x, WAVELET, level=LEVELS, axis=1, mode=MODE); --inverse as pywt.waverec.");
  add_dwt_options(cmd, args->wavelet, args->levels, args->mode);
  cmd->add_flag("--inverse", args->inverse,
                "Read NAME.a, NAME.d1..dL and write NAME (pywt.waverec)");
  add_in_out(cmd, args->in, args->out);
  cmd->footer(
      "Forward: for every tensor NAME of IN, OUT holds NAME.a (the level-L approximation) and\n"
      "NAME.d1 ... NAME.dL (d1 the finest detail, dL the coarsest), all m x N_l float32, plus\n"
      "metadata slimgrad.transform/wavelet/levels/mode and slimgrad.cols.NAME (the width n).\n"
      "Every tensor of IN must be a non-empty 2-D F32 tensor; any other tensor (F64, 1-D, ...)\n"
      "is an error and nothing is written. Other metadata of IN is copied to OUT.\n"
      "Inverse: every tensor of IN must be a part NAME.a or NAME.dl (l <= L) and every NAME\n"
      "needs all L + 1 parts. The width of NAME is slimgrad.cols.NAME when IN has it (so\n"
      "transform then --inverse gives back the input), else pywt.waverec's width:\n"
      "2*len(d1) - F + 2 (mode zero, F the filter length) or 2*len(d1) (periodization).\n"
      "Errors print one line 'slimgrad: error: ...' to stderr and exit 1.");
  cmd->callback([args] { run_transform(*args); });
}

}  // namespace slimgrad::tools
