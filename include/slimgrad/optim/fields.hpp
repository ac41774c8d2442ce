// slimgrad/optim/fields.hpp — every run-time hyper-parameter by name.
//
// One visitor per Options type lists its fields as (key, reference). The same list parses
// `--set key=value` on the command line, writes the hyper-parameters into checkpoint metadata,
// and compares a checkpoint's settings with an optimizer's, so a new option is named once.
// Keys are the peers' names where one exists (lr, beta1, eps, rank, update_gap, scale, ...).
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "../core/error.hpp"
#include "../core/orientation.hpp"
#include "../state/stores.hpp"
#include "../transforms/compact_projection.hpp"
#include "../transforms/dwt.hpp"
#include "../transforms/grassmann.hpp"
#include "../transforms/identity.hpp"
#include "../transforms/random_projection.hpp"
#include "../transforms/svd_projection.hpp"
#include "adafactor.hpp"
#include "adam.hpp"
#include "flora.hpp"
#include "optimizer.hpp"
#include "residual.hpp"

namespace slimgrad::fields {

/// The names of an enum's values, for parsing and printing.
template <class E>
struct enum_names;

template <>
struct enum_names<optim::AdamConvention> {
  static constexpr std::pair<optim::AdamConvention, const char*> values[] = {
      {optim::AdamConvention::torch, "torch"},
      {optim::AdamConvention::hf, "hf"},
      {optim::AdamConvention::bnb, "bnb"}};
};
template <>
struct enum_names<ProjType> {
  static constexpr std::pair<ProjType, const char*> values[] = {
      {ProjType::std_, "std"},
      {ProjType::reverse_std, "reverse_std"},
      {ProjType::left, "left"},
      {ProjType::right, "right"}};
};
template <>
struct enum_names<transforms::Sketch> {
  static constexpr std::pair<transforms::Sketch, const char*> values[] = {
      {transforms::Sketch::gaussian, "gaussian"}, {transforms::Sketch::count, "count"}};
};
template <>
struct enum_names<transforms::SvdMethod> {
  static constexpr std::pair<transforms::SvdMethod, const char*> values[] = {
      {transforms::SvdMethod::exact, "exact"}, {transforms::SvdMethod::randomized, "randomized"}};
};
template <>
struct enum_names<transforms::BoundaryMode> {
  static constexpr std::pair<transforms::BoundaryMode, const char*> values[] = {
      {transforms::BoundaryMode::zero, "zero"},
      {transforms::BoundaryMode::periodization, "periodization"}};
};
template <>
struct enum_names<transforms::Axis> {
  static constexpr std::pair<transforms::Axis, const char*> values[] = {
      {transforms::Axis::rows, "rows"}, {transforms::Axis::cols, "cols"}};
};
template <>
struct enum_names<residual::ScaleGranularity> {
  static constexpr std::pair<residual::ScaleGranularity, const char*> values[] = {
      {residual::ScaleGranularity::channel, "channel"},
      {residual::ScaleGranularity::tensor, "tensor"}};
};

template <class T>
concept named_enum = std::is_enum_v<T> && requires {
  enum_names<T>::values;
};

// ---- the field lists ------------------------------------------------------------------------

template <class V>
void visit(optim::Adam::Options& o, V&& v) {
  v("lr", o.lr);
  v("beta1", o.beta1);
  v("beta2", o.beta2);
  v("eps", o.eps);
  v("weight_decay", o.weight_decay);
  v("adam_mode", o.convention);
}
template <class V>
void visit(optim::Adafactor::Options& o, V&& v) {
  v("lr", o.lr);
  v("eps1", o.eps1);
  v("eps2", o.eps2);
  v("clip_threshold", o.clip_threshold);
  v("decay_rate", o.decay_rate);
  v("beta1", o.beta1);
  v("weight_decay", o.weight_decay);
  v("relative_step", o.relative_step);
  v("scale_parameter", o.scale_parameter);
  v("warmup_init", o.warmup_init);
}
template <class V>
void visit(optim::Flora::Options& o, V&& v) {
  v("lr", o.lr);
  v("eps1", o.eps1);
  v("eps2", o.eps2);
  v("clip_threshold", o.clip_threshold);
  v("decay_rate", o.decay_rate);
  v("beta1", o.beta1);
  v("weight_decay", o.weight_decay);
  v("relative_step", o.relative_step);
  v("scale_parameter", o.scale_parameter);
  v("warmup_init", o.warmup_init);
  v("rank", o.rank);
  v("kappa", o.kappa);
  v("seed", o.seed);
}
template <class V>
void visit(transforms::Identity::Options&, V&&) {}
template <class V>
void visit(transforms::RandomProjection::Options& o, V&& v) {
  v("rank", o.rank);
  v("update_gap", o.update_gap);
  v("proj_type", o.proj_type);
  v("seed", o.seed);
  v("keep_matrix", o.keep_matrix);
}
template <class V>
void visit(transforms::CompactProjection::Options& o, V&& v) {
  v("rank", o.rank);
  v("ratio", o.ratio);
  v("update_gap", o.update_gap);
  v("seed", o.seed);
  v("keep_matrix", o.keep_matrix);
  v("sketch", o.sketch);
}
template <class V>
void visit(transforms::SvdProjection::Options& o, V&& v) {
  v("rank", o.rank);
  v("update_gap", o.update_gap);
  v("proj_type", o.proj_type);
  v("svd", o.method);
  v("oversampling", o.oversampling);
  v("power_iterations", o.power_iterations);
  v("seed", o.seed);
}
template <class V>
void visit(transforms::Grassmann::Options& o, V&& v) {
  v("rank", o.rank);
  v("update_gap", o.update_gap);
  v("eta", o.eta);
  v("proj_type", o.proj_type);
  v("reorth_every", o.reorth_every);
  v("svd", o.init_method);
  v("oversampling", o.oversampling);
  v("power_iterations", o.power_iterations);
  v("seed", o.seed);
}
template <class V>
void visit(state::Fp32::Options&, V&&) {}
template <class V>
void visit(state::Bf16::Options& o, V&& v) {
  v("stochastic_rounding", o.stochastic_rounding);
}
template <class V>
void visit(state::Factored::Options& o, V&& v) {
  v("factored_eps1", o.eps1);
}
template <class V>
void visit_common(residual::Common& o, V&& v) {
  v("scale", o.scale);
  v("limiter_gamma", o.limiter_gamma);
}
template <class V>
void visit(residual::Drop::Options& o, V&& v) {
  visit_common(o, v);
}
template <class V>
void visit(residual::WaveletDetails::Options& o, V&& v) {
  visit_common(o, v);
}
template <class V>
void visit(residual::Recovery::Options& o, V&& v) {
  visit_common(o, v);
  v("recovery_scaling", o.recovery_scaling);
  v("projection_aware", o.projection_aware);
}
template <class V>
void visit(residual::ChannelScale::Options& o, V&& v) {
  visit_common(o, v);
  v("scale_type", o.granularity);
  v("scale_front", o.scale_front);
}
template <class V>
void visit(Fallback& o, V&& v) {
  v("fallback_min_dim", o.min_dim);
  v("fallback_max_aspect", o.max_aspect);
  v("fallback_min_size", o.min_size);
}

/// Visits every field of an Optimizer's Options: rule, transform, store, residual, fallback and
/// the optimizer's own seed (stochastic rounding), in that order.
template <class Options, class V>
void visit_all(Options& o, V&& v) {
  if constexpr (requires { visit(o.rule, v); }) visit(o.rule, v);
  // Dwt<W, L>::Options and Q8Block<B>::Options are members of templates (not deducible), so
  // they are recognised by their fields; a user policy's Options simply has no named fields.
  if constexpr (requires { visit(o.transform, v); }) {
    visit(o.transform, v);
  } else if constexpr (requires { o.transform.mode, o.transform.axis; }) {
    v("mode", o.transform.mode);
    v("axis", o.transform.axis);
  }
  if constexpr (requires { visit(o.store, v); })
    visit(o.store, v);
  else if constexpr (requires { o.store.min_8bit_size; })
    v("min_8bit_size", o.store.min_8bit_size);
  if constexpr (requires { visit(o.residual, v); }) visit(o.residual, v);
  visit(o.fallback, v);
  v("sr_seed", o.seed);
}

// ---- values as text ---------------------------------------------------------------------------

template <class T>
std::string to_text(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else if constexpr (named_enum<T>) {
    for (const auto& [e, name] : enum_names<T>::values)
      if (e == value) return name;
    return "?";
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.17g", static_cast<double>(value));
    return buf;
  } else {
    return std::to_string(value);
  }
}

/// Parses `text` into `value`; throws Error naming `key` on a malformed value.
template <class T>
void from_text(std::string_view key, std::string_view text, T& value) {
  const std::string where = "option '" + std::string(key) + "'";
  if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "1" || text == "on") {
      value = true;
    } else if (text == "false" || text == "0" || text == "off") {
      value = false;
    } else {
      throw Error("slimgrad: " + where + " expects true or false, got '" + std::string(text) + "'");
    }
  } else if constexpr (named_enum<T>) {
    std::string allowed;
    for (const auto& [e, name] : enum_names<T>::values) {
      if (text == name) {
        value = e;
        return;
      }
      allowed += (allowed.empty() ? "" : ", ") + std::string(name);
    }
    throw Error("slimgrad: " + where + " expects one of " + allowed + ", got '" +
                std::string(text) + "'");
  } else if constexpr (std::is_floating_point_v<T>) {
    const std::string s(text);
    char* end = nullptr;
    const double d = std::strtod(s.c_str(), &end);
    if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(d))
      throw Error("slimgrad: " + where + " expects a finite number, got '" + s + "'");
    value = static_cast<T>(d);
  } else {
    T parsed{};
    const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), parsed);
    if (ec != std::errc() || ptr != text.data() + text.size())
      throw Error("slimgrad: " + where + " expects an integer, got '" + std::string(text) + "'");
    value = parsed;
  }
}

/// All fields of `o` as key → text.
template <class Options>
std::map<std::string, std::string> to_map(Options& o) {
  std::map<std::string, std::string> out;
  visit_all(o, [&](const char* key, auto& value) { out[key] = to_text(value); });
  return out;
}

/// Sets the field `key` of `o` from `text` (every field of that name: `seed` names the
/// transform's seed). Throws Error for an unknown key, listing the known ones.
template <class Options>
void set(Options& o, std::string_view key, std::string_view text) {
  bool found = false;
  std::string known;
  visit_all(o, [&](const char* k, auto& value) {
    if (key == k) {
      from_text(key, text, value);
      found = true;
    }
    known += (known.empty() ? "" : ", ") + std::string(k);
  });
  if (!found)
    throw Error("slimgrad: unknown option '" + std::string(key) +
                "' for this optimizer (known: " + known + ")");
}

}  // namespace slimgrad::fields
