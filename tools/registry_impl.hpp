// tools/registry_impl.hpp — private to tools/registry*.cpp: the type-erased wrapper and the
// helpers that turn a recipe's defaults plus `--set` settings into an AnyOptimizer. The
// instantiations are split over two translation units (registry.cpp and registry_gwt.cpp, the
// nine GWT wavelet × level choices) so that a 2-core build compiles them in parallel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <slimgrad/slimgrad.hpp>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "registry.hpp"

namespace slimgrad::tools::detail {

/// The type-erased wrapper: forwards to the one optimizer it holds.
template <class Opt>
class Erased final : public AnyOptimizer {
 public:
  Erased(std::string name, const typename Opt::Options& o,
         std::map<std::string, std::string> type_keys)
      : name_(std::move(name)), type_keys_(std::move(type_keys)), opt_(o) {}

  const std::string& name() const override { return name_; }
  std::string composition() const override { return Opt::composition(); }
  std::map<std::string, std::string> options() const override {
    typename Opt::Options o = opt_.options();
    auto m = fields::to_map(o);
    m.insert(type_keys_.begin(), type_keys_.end());
    return m;
  }
  index_t update_gap() const override {
    if constexpr (requires { opt_.options().transform.update_gap; })
      return opt_.options().transform.update_gap;
    else
      return 0;
  }
  void set_role(const std::string& param, Shape shape, ParamRole role) override {
    using Transform = typename Opt::TransformImpl;
    if (role == ParamRole::compressed &&
        !std::is_same_v<Transform, impl<transforms::Identity, backend::cpu>>) {
      const Transform t(opt_.options().transform);
      try {
        (void)t.init(shape, 0);  // the transform's own sentence, e.g. rank above min(m, n)
      } catch (const Error& e) {
        std::string why = e.what();
        if (why.rfind("slimgrad: ", 0) == 0) why.erase(0, 10);
        throw Error("slimgrad: parameter '" + param + "' cannot be compressed by " + name_ + ": " +
                    why);
      }
    }
    typename Opt::Override o;
    o.role = role;
    opt_.set_override(param, o);
  }
  bool has_full_path() const override { return is_compact; }
  void set_full_path(const std::string& param) override {
    if constexpr (is_compact)
      opt_.set_override(param, recipes::compact_full_path(opt_.options()));
    else
      throw Error("slimgrad: optimizer " + name_ + " has no full path for uncompressed layers");
  }
  std::int64_t step_count(std::string_view param) const override { return opt_.step_count(param); }
  StepReport step(std::span<const Param> params) override { return opt_.step(params); }
  std::size_t state_bytes() const override { return opt_.state_bytes(); }
  std::size_t state_bytes(std::string_view param) const override { return opt_.state_bytes(param); }
  std::size_t predicted_state_bytes(std::string_view param, Shape shape) const override {
    return opt_.predicted_state_bytes(param, shape);
  }
  bool is_compressed(std::string_view param) const override { return opt_.is_compressed(param); }
  std::size_t workspace_bytes() const override { return opt_.workspace_bytes(); }
  void set_lr(double lr) override { opt_.set_lr(lr); }
  io::TensorFile to_checkpoint() const override { return opt_.to_checkpoint(); }
  void from_checkpoint(const io::TensorFile& file) override { opt_.from_checkpoint(file); }

 private:
  static constexpr bool is_compact =
      std::is_same_v<typename Opt::Options, typename recipes::CompAct<>::Options>;
  std::string name_;
  std::map<std::string, std::string> type_keys_;
  Opt opt_;
};

/// Applies the run-time settings (type-level keys are skipped: the caller consumed them).
template <class Options>
void apply(Options& o, const std::string& recipe, const std::vector<Setting>& settings,
           const std::vector<std::string>& type_keys) {
  const auto known = fields::to_map(o);
  for (const Setting& s : settings) {
    if (std::find(type_keys.begin(), type_keys.end(), s.key) != type_keys.end()) continue;
    if (known.find(s.key) == known.end()) {
      std::string list;
      for (const auto& [k, v] : known)
        list += (list.empty() ? "" : ", ") + k;
      for (const auto& k : type_keys)
        list += ", " + k;
      throw Error("slimgrad: unknown option '" + s.key + "' for optimizer " + recipe +
                  " (known: " + list + ")");
    }
    fields::set(o, s.key, s.value);
  }
}

/// The last value given for `key`, or `fallback`.
inline std::string last_value(const std::vector<Setting>& settings, const std::string& key,
                              const std::string& fallback) {
  std::string v = fallback;
  for (const Setting& s : settings)
    if (s.key == key) v = s.value;
  return v;
}

template <class Opt>
std::unique_ptr<AnyOptimizer> build(const std::string& recipe, typename Opt::Options o,
                                    const std::vector<Setting>& settings,
                                    std::map<std::string, std::string> type_keys = {}) {
  std::vector<std::string> keys;
  for (const auto& kv : type_keys)
    keys.push_back(kv.first);
  apply(o, recipe, settings, keys);
  return std::make_unique<Erased<Opt>>(recipe, o, std::move(type_keys));
}

/// gwt with the type-level keys wavelet and levels (tools/registry_gwt.cpp).
std::unique_ptr<AnyOptimizer> make_gwt(const std::vector<Setting>& settings);

}  // namespace slimgrad::tools::detail
