// slimgrad/backend/cpu/optimizer.hpp — the optimizer engine on the CPU backend.
//
// One step of a compressed parameter (design.md §1):
//   refresh the transform (basis / seed) when due → forward G into coefficients → the rule turns
//   the tracked block into N in place → the residual policy builds U (m×n) → W takes −c·U.
// The identity transform with Drop and no limiter takes a fused path instead: one pass over
// g, moments and w (28 bytes per parameter for fp32 Adam). A transform that accepts_coefficients
// (CompAct's) also takes a gradient born compressed: an m×r view skips the forward map, so no
// m×n gradient ever exists for such a layer.
//
// Workspace: the coefficient buffer, the update U and, for the policies that need them, a copy
// of the raw tracked coefficients, the denominators and a second m×n buffer (Recovery). Each is
// grown once to the largest parameter and reused: workspace_bytes() reports the total.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "../../core/concepts.hpp"
#include "../../core/orientation.hpp"
#include "../../io/checkpoint.hpp"
#include "../../io/safetensors.hpp"
#include "../../optim/adam.hpp"
#include "../../optim/fields.hpp"
#include "../../optim/optimizer.hpp"
#include "../../optim/residual.hpp"
#include "../../transforms/identity.hpp"
#include "common.hpp"
#include "grassmann.hpp"
#include "gwt_fused.hpp"
#include "identity.hpp"

namespace slimgrad {

namespace detail {
// A policy implementation's options, whether it exposes them as a member or an accessor.
template <class Impl>
const auto& options_of(const Impl& x) {
  if constexpr (requires { x.options(); })
    return x.options();
  else
    return x.options;
}
}  // namespace detail

template <class Rule, class Transform, class Store, class Residual>
class Optimizer<Rule, Transform, Store, backend::cpu, Residual> {
 public:
  using RuleImpl = impl<Rule, backend::cpu>;
  using TransformImpl = impl<Transform, backend::cpu>;
  using StoreImpl = impl<Store, backend::cpu>;
  using RuleState = typename RuleImpl::template State<StoreImpl>;
  using TransformState = typename TransformImpl::State;
  static_assert(transform_policy<Transform, backend::cpu>,
                "slimgrad: the Transform does not satisfy the transform contract (concepts.hpp)");

  /// Every hyper-parameter, grouped by the policy it belongs to.
  struct Options {
    typename Rule::Options rule{};
    typename Transform::Options transform{};
    typename Store::Options store{};
    typename Residual::Options residual{};
    Fallback fallback{};
    std::uint64_t seed = 0;  ///< random words of stochastic rounding
    bool fused = true;       ///< fused kernels where they exist (bit-identical; off for tests)
  };

  /// Per-parameter settings, given before the parameter's first step.
  struct Override {
    std::optional<ParamRole> role;
    double lr_scale = 1.0;  ///< this parameter's lr = the optimizer's lr × lr_scale
    /// This parameter's decoupled weight decay instead of the rule's (e.g. 0 for norms and
    /// biases, as the peers' param groups do).
    std::optional<double> weight_decay;
    std::optional<typename Transform::Options> transform;
    std::optional<typename Residual::Options> residual;
  };

  explicit Optimizer(const Options& o = {})
      : options_(o), rule_(o.rule), transform_(o.transform), store_(o.store) {
    if constexpr (requires { rule_.fused; }) rule_.fused = o.fused;
    residual::validate(o.residual);
    require(o.fallback.min_dim >= 1 && o.fallback.min_size >= 0 && o.fallback.max_aspect >= 1.0,
            "optimizer: fallback thresholds must be min_dim >= 1, min_size >= 0, max_aspect >= 1");
  }

  const Options& options() const { return options_; }

  /// Sets the learning rate of the next steps (schedules call this every step).
  void set_lr(double lr) {
    require(std::isfinite(lr) && lr >= 0, "optimizer: lr must be finite and >= 0");
    options_.rule.lr = lr;
    rule_.options.lr = lr;
  }

  /// Per-parameter settings. Refused once the parameter has state (they would change its
  /// layout or its history).
  void set_override(std::string name, Override o) {
    require(!name.empty(), "optimizer: an override needs a parameter name");
    require(slots_.find(name) == slots_.end(),
            "optimizer: parameter '" + name +
                "' already has state; set overrides before its first step");
    require(std::isfinite(o.lr_scale) && o.lr_scale >= 0,
            "optimizer: lr_scale of '" + name + "' must be finite and >= 0");
    if (o.weight_decay) {
      require(
          requires { rule_.options.weight_decay; },
          "optimizer: the rule has no weight decay to override for '" + name + "'");
      require(std::isfinite(*o.weight_decay) && *o.weight_decay >= 0,
              "optimizer: weight_decay of '" + name + "' must be finite and >= 0");
    }
    if (o.transform) TransformImpl check(*o.transform);
    if (o.residual) residual::validate(*o.residual);
    overrides_[std::move(name)] = std::move(o);
  }

  /// One step over `params`. Every argument is checked before anything changes; a parameter
  /// whose gradient holds NaN or Inf is skipped (weights, state and step count untouched) and
  /// named in the report.
  StepReport step(std::span<const Param> params) {
    std::vector<std::pair<std::string, Slot>> fresh;
    std::set<std::string_view> seen;
    for (const Param& p : params) {
      const std::string name(p.name);
      require(!p.name.empty(), "optimizer: a parameter has an empty name");
      require(seen.insert(p.name).second, "optimizer: parameter '" + name + "' appears twice");
      require(p.weight.rows > 0 && p.weight.cols > 0,
              "optimizer: parameter '" + name + "' has zero size");
      const bool born_compressed = gradient_is_coefficients(p);
      require(p.grad.shape() == p.weight.shape() || born_compressed,
              "optimizer: gradient of '" + name + "' is " + shape_str(p.grad.shape()) +
                  " but its weight is " + shape_str(p.weight.shape()));
      require(p.weight.data && p.grad.data, "optimizer: parameter '" + name + "' has a null view");
      require(p.weight.ld >= p.weight.cols && p.grad.ld >= p.grad.cols,
              "optimizer: parameter '" + name + "' has a leading dimension below its width");
      const auto it = slots_.find(p.name);
      if (it != slots_.end()) {
        require(it->second.shape == p.weight.shape(),
                "optimizer: parameter '" + name + "' was " + shape_str(it->second.shape) +
                    " and is now " + shape_str(p.weight.shape()));
      } else {
        fresh.emplace_back(name, make_slot(name, p.weight.shape()));
      }
      require(!born_compressed ||
                  (it != slots_.end() ? it->second.compressed : fresh.back().second.compressed),
              "optimizer: gradient of '" + name + "' is " + shape_str(p.grad.shape()) +
                  " (compressed) but the parameter takes the plain rule; give it "
                  "ParamRole::compressed");
    }

    StepReport report;
    std::set<std::string, std::less<>> fresh_names;
    for (auto& entry : fresh) {
      fresh_names.insert(entry.first);
      slots_.emplace(entry.first, std::move(entry.second));
    }
    for (const Param& p : params) {
      const auto it = slots_.find(p.name);
      if (step_one(p, it->second)) {
        ++it->second.step;
        ++report.stepped;
      } else {
        report.skipped.emplace_back(p.name);
        if (fresh_names.count(p.name)) slots_.erase(it);  // a new parameter leaves no trace
      }
    }
    return report;
  }

  /// Exact bytes of optimizer state: moments in their store format, transform state (bases,
  /// seeds), limiter scalars and step counters.
  std::size_t state_bytes() const {
    std::size_t total = 0;
    for (const auto& [name, slot] : slots_)
      total += slot_bytes(slot);
    return total;
  }
  std::size_t state_bytes(std::string_view name) const {
    const auto it = slots_.find(name);
    require(it != slots_.end(), "optimizer: no state for parameter '" + std::string(name) + "'");
    return slot_bytes(it->second);
  }
  /// The state bytes a parameter of `shape` will hold, without creating it.
  std::size_t predicted_state_bytes(std::string_view name, Shape shape) const {
    std::size_t bytes = sizeof(std::int64_t) + rule_state_bytes(name, shape);
    if (!decide_compressed(name, shape)) return bytes;
    bytes += transform_for_name(name).state_bytes(shape);
    if (residual_options_for(name).limiter_gamma > 0) bytes += sizeof(float);
    return bytes;
  }
  /// Bytes of the reusable workspace held now (the optimizer's and the transforms', e.g. the
  /// tile of a regenerated projection).
  std::size_t workspace_bytes() const {
    std::size_t bytes = (coeffs_.capacity() + raw_.capacity() + denom_.capacity() +
                         update_.capacity() + extra_.capacity() + rotation_.capacity()) *
                        sizeof(float);
    if constexpr (requires { transform_.workspace_bytes(); }) {
      bytes += transform_.workspace_bytes();
      for (const auto& [name, slot] : slots_)
        if (slot.own_transform) bytes += slot.own_transform->workspace_bytes();
    }
    return bytes;
  }

  /// Number of steps a parameter has taken (0 if unknown).
  std::int64_t step_count(std::string_view name) const {
    const auto it = slots_.find(name);
    return it == slots_.end() ? 0 : it->second.step;
  }
  /// Whether a parameter goes through the transform (it must have state).
  bool is_compressed(std::string_view name) const {
    const auto it = slots_.find(name);
    require(it != slots_.end(), "optimizer: no state for parameter '" + std::string(name) + "'");
    return it->second.compressed;
  }
  std::size_t size() const { return slots_.size(); }

  // Moving a run between backends (backend/cuda/transfer.hpp): the moments of a parameter in
  // the store's own format, which the CUDA optimizer copies to and from device memory.

  /// Creates a parameter's state as its first step would (zero moments, step 0), without
  /// stepping; nothing happens if it has state. Error (nothing changed) for a bad name or shape.
  void add_state(std::string_view name, Shape shape) {
    require(!name.empty(), "optimizer: a parameter has an empty name");
    require(shape.rows > 0 && shape.cols > 0,
            "optimizer: parameter '" + std::string(name) + "' has zero size");
    if (slots_.find(name) != slots_.end()) return;
    slots_.emplace(std::string(name), make_slot(std::string(name), shape));
  }
  /// A parameter's rule state (Adam: m and v in the store's format).
  RuleState& rule_state(std::string_view name) { return slot_of(name).rs; }
  const RuleState& rule_state(std::string_view name) const {
    const auto it = slots_.find(name);
    require(it != slots_.end(), "optimizer: no state for parameter '" + std::string(name) + "'");
    return it->second.rs;
  }
  /// A compressed parameter's transform state (bases and refresh counters: the CUDA optimizer,
  /// backend/cuda/optimizer.hpp, copies its device bases in and out).
  TransformState& transform_state(std::string_view name) {
    Slot& s = slot_of(name);
    require(s.ts.has_value(), "optimizer: parameter '" + std::string(name) + "' is not compressed");
    return *s.ts;
  }
  const TransformState& transform_state(std::string_view name) const {
    const auto it = slots_.find(name);
    require(it != slots_.end() && it->second.ts.has_value(),
            "optimizer: parameter '" + std::string(name) + "' has no transform state");
    return *it->second.ts;
  }
  /// The norm-growth limiter's remembered norm of a parameter (negative or NaN: unset).
  float limiter_state(std::string_view name) const {
    const auto it = slots_.find(name);
    require(it != slots_.end(), "optimizer: no state for parameter '" + std::string(name) + "'");
    return it->second.limiter;
  }
  void set_limiter_state(std::string_view name, float remembered) {
    slot_of(name).limiter = remembered;
  }
  /// Sets the number of steps a parameter has taken (its next step is steps + 1).
  void set_step_count(std::string_view name, std::int64_t steps) {
    require(steps >= 0, "optimizer: negative step count for '" + std::string(name) + "'");
    slot_of(name).step = steps;
  }

  /// The composition as text, e.g. "adam/dwt<haar,2>/fp32/wavelet_details".
  static std::string composition() {
    std::string t = Transform::name;
    if constexpr (requires {
                    Transform::levels;
                    Transform::wavelet::name;
                  })
      t += "<" + std::string(Transform::wavelet::name) + "," + std::to_string(Transform::levels) +
           ">";
    std::string st = Store::name;
    if constexpr (requires { Store::block; }) st += "<" + std::to_string(Store::block) + ">";
    return std::string(Rule::name) + "/" + t + "/" + st + "/" + Residual::name;
  }

  /// The whole optimizer state as named tensors plus metadata (see io/checkpoint.hpp).
  io::TensorFile to_checkpoint() const {
    io::TensorFile f;
    nlohmann::json names = nlohmann::json::array();
    for (const auto& [name, slot] : slots_) {
      names.push_back(name);
      io::StateWriter w(f, name);
      w.values<std::int64_t>("shape", {2},
                             std::vector<std::int64_t>{slot.shape.rows, slot.shape.cols});
      w.i64("step", slot.step);
      w.i64("compressed", slot.compressed ? 1 : 0);
      w.f32("limiter", slot.limiter);
      write_rule_state(w, slot.rs);
      if (slot.compressed) write_transform_state(w, *slot.ts);
    }
    Options o = options_;
    f.metadata["format"] = io::checkpoint_format;
    f.metadata["version"] = io::checkpoint_version;
    f.metadata["composition"] = composition();
    f.metadata["options"] = nlohmann::json(fields::to_map(o)).dump();
    f.metadata["params"] = names.dump();
    f.metadata["checksum"] = std::to_string(io::checksum(f));
    return f;
  }

  /// Replaces the whole state with the checkpoint's. Refuses (slimgrad::Error, nothing changed)
  /// a file of another format, version or composition, one whose structural settings (every
  /// transform and store option) differ from this optimizer's, one whose shapes do not match, or
  /// one whose checksum fails. Learning rate, betas and other rule settings are this
  /// optimizer's own (schedules may change them).
  void from_checkpoint(const io::TensorFile& f) {
    auto meta = [&](const char* key) -> const std::string& {
      const auto it = f.metadata.find(key);
      require(it != f.metadata.end(), std::string("checkpoint: metadata '") + key + "' is missing");
      return it->second;
    };
    require(meta("format") == io::checkpoint_format,
            "checkpoint: not a slimgrad optimizer checkpoint (format '" + meta("format") + "')");
    require(meta("version") == io::checkpoint_version, "checkpoint: version " + meta("version") +
                                                           " is not supported (this build reads " +
                                                           io::checkpoint_version + ")");
    require(meta("composition") == composition(),
            "checkpoint: the composition differs: the file was written by " + meta("composition") +
                ", this optimizer is " + composition());
    require(meta("checksum") == std::to_string(io::checksum(f)),
            "checkpoint: checksum mismatch (the file is corrupted)");
    check_structural_options(meta("options"));
    nlohmann::json names;
    try {
      names = nlohmann::json::parse(meta("params"));
    } catch (const nlohmann::json::exception&) {
      throw Error("slimgrad: checkpoint: metadata 'params' is not a JSON list of names");
    }
    require(names.is_array(), "checkpoint: metadata 'params' is not a JSON list of names");
    std::size_t data_bytes = 0;
    for (const auto& entry : f.tensors)
      data_bytes += entry.second.data.size();
    std::map<std::string, Slot, std::less<>> fresh;
    for (const auto& jn : names) {
      require(jn.is_string() && !jn.get<std::string>().empty(),
              "checkpoint: metadata 'params' holds a non-name");
      const std::string name = jn.get<std::string>();
      io::StateReader r(f, name);
      std::vector<std::int64_t> shape(2);
      r.vector("shape", shape);
      require(shape[0] > 0 && shape[1] > 0, "checkpoint: '" + name + "' has a non-positive shape");
      require(shape[0] <= (std::int64_t{1} << 40) / shape[1],
              "checkpoint: '" + name + "' has an impossible shape");
      const Shape sh{static_cast<index_t>(shape[0]), static_cast<index_t>(shape[1])};
      // The moments must be in the file: a shape whose state would exceed the file's bytes is
      // a corrupt (or hostile) file, refused before anything is allocated.
      require(rule_state_bytes(name, sh) <= data_bytes,
              "checkpoint: '" + name + "' claims a shape whose state is larger than the file");
      Slot slot = make_slot(name, sh);
      slot.step = r.i64("step");
      require(slot.step >= 0, "checkpoint: '" + name + "' has a negative step count");
      require((r.i64("compressed") != 0) == slot.compressed,
              "checkpoint: '" + name + "' was " + (slot.compressed ? "plain" : "compressed") +
                  " when saved and is " + (slot.compressed ? "compressed" : "plain") +
                  " here (different fallback settings or overrides)");
      slot.limiter = r.f32("limiter");
      read_rule_state(r, slot.rs);
      if (slot.compressed) {
        TransformImpl& t = slot.own_transform ? *slot.own_transform : transform_;
        read_transform_state(r, *slot.ts);
        if constexpr (requires { t.restore(*slot.ts); }) t.restore(*slot.ts);
      }
      require(fresh.emplace(name, std::move(slot)).second,
              "checkpoint: parameter '" + name + "' is listed twice");
    }
    slots_.swap(fresh);
  }

  /// Writes the checkpoint atomically (a temporary file renamed into place).
  void save(const std::filesystem::path& path) const { io::write(path, to_checkpoint()); }
  /// Reads a checkpoint; on any error the optimizer is unchanged.
  void load(const std::filesystem::path& path) { from_checkpoint(io::read(path)); }

 private:
  struct Slot {
    Shape shape;
    bool compressed = false;
    std::int64_t step = 0;
    double lr_scale = 1.0;
    std::optional<double> weight_decay;            // overridden
    std::unique_ptr<TransformImpl> own_transform;  // when the transform options are overridden
    std::optional<typename Residual::Options> residual;
    std::optional<TransformState> ts;
    RuleState rs;
    float limiter = -1.0f;  // norm-growth limiter memory; < 0: unset
    std::uint64_t id = 0;   // tensor_id(name)
  };

  // Transform and store settings decide what the state means: they must match the file's.
  void check_structural_options(const std::string& text) const {
    nlohmann::json saved;
    try {
      saved = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw Error("slimgrad: checkpoint: metadata 'options' is not JSON");
    }
    require(saved.is_object(), "checkpoint: metadata 'options' is not a JSON object");
    Options o = options_;
    auto check = [&](const char* key, auto& value) {
      const auto it = saved.find(key);
      require(it != saved.end() && it->is_string(),
              std::string("checkpoint: option '") + key + "' is missing from the file");
      require(it->template get<std::string>() == fields::to_text(value),
              std::string("checkpoint: option '") + key + "' was " +
                  it->template get<std::string>() + " when saved and is " + fields::to_text(value) +
                  " here");
    };
    if constexpr (requires { fields::visit(o.transform, check); })
      fields::visit(o.transform, check);
    else if constexpr (requires { o.transform.mode, o.transform.axis; }) {
      check("mode", o.transform.mode);
      check("axis", o.transform.axis);
    }
    if constexpr (requires { fields::visit(o.store, check); })
      fields::visit(o.store, check);
    else if constexpr (requires { o.store.min_8bit_size; })
      check("min_8bit_size", o.store.min_8bit_size);
    check("sr_seed", o.seed);
  }

  template <class RS>
  static void write_rule_state(io::StateWriter& w, const RS& rs) {
    if constexpr (requires { rs.m.has_value(); }) {  // Adafactor: v, optional m
      io::write_buffer(w, "v", rs.v);
      if (rs.m) io::write_buffer(w, "m", *rs.m);
    } else if constexpr (requires { rs.m, rs.v; }) {  // Adam
      io::write_buffer(w, "m", rs.m);
      io::write_buffer(w, "v", rs.v);
    } else if constexpr (requires { rs.write(w); }) {  // a user rule's own state
      rs.write(w);
    }
  }
  template <class RS>
  static void read_rule_state(const io::StateReader& r, RS& rs) {
    if constexpr (requires { rs.m.has_value(); }) {
      io::read_buffer(r, "v", rs.v);
      require(r.has("m") == rs.m.has_value(),
              "checkpoint: the first moment is " + std::string(r.has("m") ? "present" : "absent") +
                  " in the file but " + (rs.m ? "expected" : "not expected") + " (beta1 differs)");
      if (rs.m) io::read_buffer(r, "m", *rs.m);
    } else if constexpr (requires { rs.m, rs.v; }) {
      io::read_buffer(r, "m", rs.m);
      io::read_buffer(r, "v", rs.v);
    } else if constexpr (requires { rs.read(r); }) {
      rs.read(r);
    }
  }
  // Bases (SvdProjection, Grassmann), epochs (RandomProjection); nothing for Dwt and Identity.
  static void write_transform_state(io::StateWriter& w, const TransformState& ts) {
    if constexpr (requires { ts.basis, ts.refresh_count, ts.last_refresh_step; }) {
      w.values<float>(
          "basis", {ts.basis.rows(), ts.basis.cols()},
          std::span<const float>(ts.basis.data(), static_cast<std::size_t>(ts.basis.size())));
      w.i64("refresh_count", static_cast<std::int64_t>(ts.refresh_count));
      w.i64("failure_count", static_cast<std::int64_t>(ts.failure_count));
      w.i64("last_refresh_step", ts.last_refresh_step);
      w.i64("last_refresh_status", static_cast<std::int64_t>(ts.last_refresh_status));
      w.i64("last_failure", static_cast<std::int64_t>(ts.last_failure));
      w.i64("provisional", ts.provisional ? 1 : 0);
    }
    if constexpr (requires { ts.tracking_count, ts.last_angle, ts.last_sigma; }) {
      w.i64("tracking_count", static_cast<std::int64_t>(ts.tracking_count));
      w.f64("last_angle", ts.last_angle);
      w.f64("last_sigma", ts.last_sigma);
    }
    if constexpr (requires { ts.epoch, ts.ready; }) {
      w.i64("epoch", ts.epoch);
      w.i64("ready", ts.ready ? 1 : 0);
    }
    if constexpr (requires { ts.write(w); }) ts.write(w);
  }
  static void read_transform_state(const io::StateReader& r, TransformState& ts) {
    if constexpr (requires { ts.basis, ts.refresh_count, ts.last_refresh_step; }) {
      const auto& shape = r.shape("basis");
      const Shape expected = transforms::SvdProjection::basis_shape(ts.shape, ts.side, ts.rank);
      const bool empty = shape.size() == 2 && shape[0] * shape[1] == 0;
      require(
          shape.size() == 2 && (empty || (shape[0] == expected.rows && shape[1] == expected.cols)),
          "checkpoint: basis has shape " + io::detail::shape_string(shape) + ", expected " +
              std::to_string(expected.rows) + "x" + std::to_string(expected.cols));
      ts.basis.resize(empty ? 0 : expected.rows, empty ? 0 : expected.cols);
      r.values<float>("basis",
                      std::span<float>(ts.basis.data(), static_cast<std::size_t>(ts.basis.size())));
      for (index_t i = 0; i < ts.basis.size(); ++i)
        require(std::isfinite(ts.basis.data()[i]), "checkpoint: basis holds a non-finite value");
      ts.refresh_count = static_cast<std::uint64_t>(r.i64("refresh_count"));
      ts.failure_count = static_cast<std::uint64_t>(r.i64("failure_count"));
      ts.last_refresh_step = r.i64("last_refresh_step");
      const auto status = r.i64("last_refresh_status"), failure = r.i64("last_failure");
      require(status >= 0 && status <= 4 && failure >= 0 && failure <= 3,
              "checkpoint: refresh status out of range");
      ts.last_refresh_status = static_cast<transforms::RefreshStatus>(status);
      ts.last_failure = static_cast<transforms::RefreshFailure>(failure);
      // Files written before the flag was saved lack it: their bases count as final.
      const std::int64_t provisional = r.has("provisional") ? r.i64("provisional") : 0;
      require(provisional == 0 || provisional == 1,
              "checkpoint: provisional flag out of range (0 or 1)");
      require(provisional == 0 || ts.basis.size() > 0,
              "checkpoint: a provisional basis is flagged but the basis is empty");
      ts.provisional = provisional == 1;
    }
    if constexpr (requires { ts.tracking_count, ts.last_angle, ts.last_sigma; }) {
      ts.tracking_count = static_cast<std::uint64_t>(r.i64("tracking_count"));
      ts.last_angle = r.f64("last_angle");
      ts.last_sigma = r.f64("last_sigma");
    }
    if constexpr (requires { ts.epoch, ts.ready; }) {
      const auto epoch = r.i64("epoch");
      require(epoch >= 0 && epoch <= 0xffffffffll, "checkpoint: projection epoch out of range");
      ts.epoch = static_cast<std::uint32_t>(epoch);
      ts.ready = r.i64("ready") != 0;
    }
    if constexpr (requires { ts.read(r); }) ts.read(r);
  }

  // The bytes of the rule's state (moments) of a parameter, without creating it.
  std::size_t rule_state_bytes(std::string_view name, Shape shape) const {
    if (!decide_compressed(name, shape))
      return rule_.template bytes_for<StoreImpl>(options_.store, shape);
    const TransformImpl& t = transform_for_name(name);
    const Shape cs = t.coeff_shape(shape);
    const Shape tracked = t.tracked(HostView<float>(nullptr, cs.rows, cs.cols)).shape();
    return rule_.template bytes_for<StoreImpl>(options_.store, tracked);
  }

  static std::string shape_str(Shape s) {
    return std::to_string(s.rows) + "x" + std::to_string(s.cols);
  }

  const Override* override_for(std::string_view name) const {
    const auto it = overrides_.find(name);
    return it == overrides_.end() ? nullptr : &it->second;
  }
  const TransformImpl& transform_for_name(std::string_view name) const {
    thread_local std::optional<TransformImpl> tmp;
    const Override* o = override_for(name);
    if (o && o->transform) return tmp.emplace(*o->transform);
    return transform_;
  }
  const typename Residual::Options& residual_options_for(std::string_view name) const {
    const Override* o = override_for(name);
    return o && o->residual ? *o->residual : options_.residual;
  }

  // A gradient already in the transform's coefficient space (transforms::CompactProjection:
  // the m×r gradient of activation::CompAct), told apart from a full one by its shape.
  bool gradient_is_coefficients(const Param& p) const {
    if constexpr (requires { Transform::accepts_coefficients; }) {
      const Shape cs = transform_for_name(p.name).coeff_shape(p.weight.shape());
      return cs != p.weight.shape() && p.grad.shape() == cs;
    } else {
      return false;
    }
  }

  bool decide_compressed(std::string_view name, Shape shape) const {
    const Override* o = override_for(name);
    const ParamRole role = o && o->role ? *o->role : ParamRole::automatic;
    if (std::is_same_v<Transform, transforms::Identity> || role == ParamRole::plain) return false;
    if (role == ParamRole::compressed) return true;
    const Fallback& f = options_.fallback;
    const index_t lo = std::min(shape.rows, shape.cols), hi = std::max(shape.rows, shape.cols);
    if (lo < f.min_dim || shape.size() < f.min_size) return false;
    if (static_cast<double>(hi) > f.max_aspect * static_cast<double>(lo)) return false;
    // A transform that cannot take the shape (e.g. a rank above min(m, n)) leaves it plain.
    try {
      (void)transform_for_name(name).init(shape, 0);
    } catch (const Error&) {
      return false;
    }
    return true;
  }

  Slot make_slot(const std::string& name, Shape shape) const {
    Slot s;
    s.shape = shape;
    s.id = tensor_id(name);
    s.compressed = decide_compressed(name, shape);
    if (const Override* o = override_for(name)) {
      s.lr_scale = o->lr_scale;
      s.weight_decay = o->weight_decay;
      if (o->transform) s.own_transform = std::make_unique<TransformImpl>(*o->transform);
      s.residual = o->residual;
    }
    if (s.compressed) {
      const TransformImpl& t = s.own_transform ? *s.own_transform : transform_;
      s.ts.emplace(t.init(shape, s.id));  // throws a clear error (e.g. rank > min(m, n))
      const Shape cs = t.coeff_shape(shape);
      s.rs = rule_.make(store_, t.tracked(HostView<float>(nullptr, cs.rows, cs.cols)).shape());
    } else {
      s.rs = rule_.make(store_, shape);
    }
    return s;
  }

  Slot& slot_of(std::string_view name) {
    const auto it = slots_.find(name);
    require(it != slots_.end(), "optimizer: no state for parameter '" + std::string(name) + "'");
    return it->second;
  }

  std::size_t slot_bytes(const Slot& s) const {
    std::size_t bytes = sizeof(std::int64_t) + rule_.bytes(store_, s.rs);
    if (s.compressed) {
      const TransformImpl& t = s.own_transform ? *s.own_transform : transform_;
      bytes += t.state_bytes(s.shape);
      const auto& ro = s.residual ? *s.residual : options_.residual;
      if (ro.limiter_gamma > 0) bytes += sizeof(float);
    }
    return bytes;
  }

  static HostView<float> workspace(std::vector<float>& buf, Shape s) {
    if (buf.size() < static_cast<std::size_t>(s.size()))
      buf.resize(static_cast<std::size_t>(s.size()));
    return HostView<float>(buf.data(), s.rows, s.cols, s.cols);
  }

  RuleImpl rule_for(const Slot& s) const {
    RuleImpl r = rule_;
    r.options.lr = options_.rule.lr * s.lr_scale;
    if constexpr (requires { r.options.weight_decay; })
      if (s.weight_decay) r.options.weight_decay = *s.weight_decay;
    return r;
  }

  // One parameter's step. False, with nothing changed, when its gradient holds NaN or Inf.
  bool step_one(const Param& p, Slot& slot) {
    const RuleImpl rule = rule_for(slot);
    const random::Key key{options_.seed, slot.id, static_cast<std::uint32_t>(slot.step)};
    const std::int64_t t = slot.step + 1;
    TransformImpl& tr = slot.own_transform ? *slot.own_transform : transform_;
    const auto& ro = slot.residual ? *slot.residual : options_.residual;
    if constexpr (requires {
                    Transform::levels;
                    typename Transform::wavelet;
                  } &&
                  std::is_same_v<Residual, residual::WaveletDetails> &&
                  std::is_same_v<Rule, optim::Adam>) {
      if (slot.compressed && options_.fused) {
        const std::optional<bool> taken =
            cpu::gwt_adam_fused_step<typename Transform::wavelet, Transform::levels>(
                rule, store_, slot.rs, detail::options_of(tr), p.grad, p.weight, t, ro.scale,
                ro.limiter_gamma, slot.limiter);
        if (taken) return *taken;
      }
    }
    if (!cpu::all_finite(p.grad)) return false;
    if (!slot.compressed) {
      rule.update_apply(store_, slot.rs, p.grad, p.weight, t, 1.0f, key);
      return true;
    }
    if constexpr (std::is_same_v<Transform, transforms::Identity> &&
                  std::is_same_v<Residual, residual::Drop>) {
      if (ro.limiter_gamma == 0) {
        rule.update_apply(store_, slot.rs, p.grad, p.weight, t, static_cast<float>(ro.scale), key);
        return true;
      }
    }
    TransformState& ts = *slot.ts;
    const Shape cs = tr.coeff_shape(slot.shape);
    refresh(tr, ts, ro, rule, slot, p.grad, cs, key);
    HostView<float> coeffs = workspace(coeffs_, cs);
    if (p.grad.shape() == cs && cs != slot.shape)  // born compressed (CompAct): take it as is
      cpu::as_eigen(coeffs) = cpu::as_eigen(p.grad);
    else
      tr.forward(ts, p.grad, coeffs);
    HostView<float> c = tr.tracked(coeffs);
    HostView<float> raw, denom;
    if constexpr (Residual::needs_raw) {
      raw = workspace(raw_, c.shape());
      cpu::as_eigen(raw) = cpu::as_eigen(HostView<const float>(c));
    }
    if constexpr (Residual::needs_denominator) denom = workspace(denom_, c.shape());
    const optim::RuleOutput out = rule.update(store_, slot.rs, c, t, denom, key, p.weight);
    HostView<float> u = workspace(update_, slot.shape);
    finish(tr, ts, ro, slot.limiter, p.grad, coeffs, c, raw, denom, out, u);
    apply(p.weight, u, out.weight);
    return true;
  }

  // Refreshes the transform when due; with SubTrack++'s projection-aware moments, rotates the
  // rule's moments into the new basis: C = S_newᵀ S_old (algorithms.md §2.3(a), §8.9: at the
  // switch, with the actual old and new bases).
  void refresh(TransformImpl& tr, TransformState& ts, const typename Residual::Options& ro,
               const RuleImpl& rule, Slot& slot, HostView<const float> g, Shape cs,
               const random::Key& key) {
    if constexpr (
        std::is_same_v<Residual, residual::Recovery> &&
        requires { tr.refresh(ts, g, index_t{}, HostView<float>{}); } &&
        requires(RuleState & st) {
          rule.with_moments(store_, st, Shape{}, key, [](HostView<float>, HostView<float>) {});
        }) {
      if (ro.projection_aware && slot.step > 0) {
        const index_t r = detail::options_of(tr).rank;
        HostView<float> rotation = workspace(rotation_, {r, r});
        if (tr.refresh(ts, g, slot.step, rotation)) {
          const Shape tracked = tr.tracked(HostView<float>(nullptr, cs.rows, cs.cols)).shape();
          rule.with_moments(store_, slot.rs, tracked, key,
                            [&](HostView<float> m, HostView<float> v) {
                              cpu::rotate_moments(ts.side, rotation, m, v);
                            });
        }
        return;
      }
    }
    (void)ro, (void)rule, (void)cs, (void)key;
    tr.refresh(ts, g, slot.step);
  }

  // The residual policy: builds U from N (in c), the raw coefficients and the statistics.
  void finish(TransformImpl& tr, const TransformState& ts, const typename Residual::Options& ro,
              float& limiter, HostView<const float> g, HostView<float> coeffs, HostView<float> c,
              HostView<float> raw, HostView<float> denom, const optim::RuleOutput& out,
              HostView<float> u) {
    const float alpha = static_cast<float>(ro.scale);
    if constexpr (std::is_same_v<Residual, residual::Drop>) {
      if (coeffs.shape() != c.shape()) cpu::zero_outside(coeffs, c.shape());
      limit(c, ro.limiter_gamma, limiter);
      tr.inverse(ts, coeffs, u);
      if (alpha != 1.0f) cpu::scale(u, alpha);
    } else if constexpr (std::is_same_v<Residual, residual::WaveletDetails>) {
      const float rho = limit(c, ro.limiter_gamma, limiter);
      normalise_details(tr, g.shape(), coeffs, denom, out.detail_divisor, rho);
      tr.inverse(ts, coeffs, u);
      if (alpha != 1.0f) cpu::scale(u, alpha);
    } else if constexpr (std::is_same_v<Residual, residual::Recovery>) {
      if (!ro.recovery_scaling) {  // SubTrack-Grad: GaLore's back-map of N alone
        limit(c, ro.limiter_gamma, limiter);
        tr.inverse(ts, c, u);
        if (alpha != 1.0f) cpu::scale(u, alpha);
        return;
      }
      // Λ = (G − Expand(C)) ⊙ φ, φ = ‖N‖/(‖C‖ + 1e-8) per channel of the non-projected side.
      HostView<float> lambda = workspace(extra_, g.shape());
      tr.inverse(ts, raw, lambda);
      const Side side = ts.side;
      const std::vector<float> phi = channel_ratio(c, raw, side);
      cpu::parallel_for(g.rows, g.cols, [&](index_t i) {
        const float* gr = g.row(i);
        float* lr = lambda.row(i);
        for (index_t j = 0; j < g.cols; ++j)
          lr[j] = (gr[j] - lr[j]) * phi[static_cast<std::size_t>(side == Side::left ? j : i)];
      });
      limit(lambda, ro.limiter_gamma, limiter);
      tr.inverse(ts, c, u);
      cpu::parallel_for(u.rows, u.cols, [&](index_t i) {
        float* ur = u.row(i);
        const float* lr = lambda.row(i);
        for (index_t j = 0; j < u.cols; ++j)
          ur[j] = alpha * ur[j] + lr[j];
      });
    } else if constexpr (std::is_same_v<Residual, residual::ChannelScale>) {
      // APOLLO: U = G ⊙ s; the limiter and sqrt(scale) in APOLLO's order.
      const Side side = ts.side;
      std::vector<float> s;
      if (ro.granularity == residual::ScaleGranularity::channel) {
        s = channel_ratio(c, raw, side);
      } else {
        s.assign(1, static_cast<float>(cpu::frobenius(c) / (cpu::frobenius(raw) + 1e-8)));
      }
      const bool per_tensor = s.size() == 1;
      cpu::parallel_for(g.rows, g.cols, [&](index_t i) {
        const float* gr = g.row(i);
        float* ur = u.row(i);
        for (index_t j = 0; j < g.cols; ++j) {
          const std::size_t k =
              per_tensor ? 0 : static_cast<std::size_t>(side == Side::left ? j : i);
          ur[j] = gr[j] * s[k];
        }
      });
      const float root = static_cast<float>(std::sqrt(ro.scale));
      if (ro.scale_front) cpu::scale(u, root);
      limit(u, ro.limiter_gamma, limiter);
      if (!ro.scale_front) cpu::scale(u, root);
    } else {
      static_assert(
          !std::is_same_v<Residual, Residual>,
          "slimgrad: unknown residual policy (Drop, WaveletDetails, Recovery or ChannelScale)");
    }
  }

  // The norm-growth limiter on v in place; returns ρ (1 when off or on its first call).
  static float limit(HostView<float> v, double gamma, float& remembered) {
    if (gamma <= 0) return 1.0f;
    const double rho = residual::limiter_divisor(cpu::frobenius(v), gamma, remembered);
    const float rf = static_cast<float>(rho);
    if (rf != 1.0f) cpu::divide(v, rf);
    return rf;
  }

  // ‖N‖/(‖C‖ + 1e-8) per channel of the non-projected side: columns of r×n coefficients (left),
  // rows of m×r coefficients (right).
  static std::vector<float> channel_ratio(HostView<const float> n, HostView<const float> c,
                                          Side side) {
    if (side == Side::right) {
      std::vector<float> out(static_cast<std::size_t>(n.rows));
      cpu::parallel_for(n.rows, n.cols, [&](index_t i) {
        double nn = 0, cc = 0;
        for (index_t j = 0; j < n.cols; ++j) {
          nn += static_cast<double>(n(i, j)) * n(i, j);
          cc += static_cast<double>(c(i, j)) * c(i, j);
        }
        out[static_cast<std::size_t>(i)] =
            static_cast<float>(std::sqrt(nn) / (std::sqrt(cc) + 1e-8));
      });
      return out;
    }
    std::vector<double> nn(static_cast<std::size_t>(n.cols), 0.0), cc(nn.size(), 0.0);
    for (index_t i = 0; i < n.rows; ++i)
      for (index_t j = 0; j < n.cols; ++j) {
        nn[static_cast<std::size_t>(j)] += static_cast<double>(n(i, j)) * n(i, j);
        cc[static_cast<std::size_t>(j)] += static_cast<double>(c(i, j)) * c(i, j);
      }
    std::vector<float> out(nn.size());
    for (std::size_t j = 0; j < nn.size(); ++j)
      out[j] = static_cast<float>(std::sqrt(nn[j]) / (std::sqrt(cc[j]) + 1e-8));
    return out;
  }

  // GWT (algorithms.md §1.2 step 4): detail j of level l is divided by (D[ancestor]·ρ), the
  // ancestor being approximation coefficient j >> (L − l), as the official code's
  // repeat_interleave of the denominator does.
  static void normalise_details(const TransformImpl& tr, Shape shape, HostView<float> coeffs,
                                HostView<float> denom, float divisor, float rho) {
    if constexpr (requires { Transform::levels; }) {
      constexpr int L = Transform::levels;
      const auto& o = detail::options_of(tr);
      const bool rows = o.axis == transforms::Axis::rows;
      const index_t lines = rows ? coeffs.rows : coeffs.cols;
      const auto layout = Transform::layout(rows ? shape.cols : shape.rows, o.mode);
      cpu::parallel_for(lines, layout.total, [&](index_t line) {
        for (int l = 1; l <= L; ++l) {
          const index_t off = layout.detail_offset[l], len = layout.length[l];
          const int shift = L - l;
          for (index_t j = 0; j < len; ++j) {
            float& d = rows ? coeffs(line, off + j) : coeffs(off + j, line);
            if (divisor > 0) {
              d = d / (divisor * rho);
            } else {
              const float den = rows ? denom(line, j >> shift) : denom(j >> shift, line);
              d = d / (den * rho);
            }
          }
        }
      });
    } else {
      static_assert(!std::is_same_v<Transform, Transform>,
                    "slimgrad: residual::WaveletDetails needs a wavelet transform (Dwt<W, L>)");
    }
  }
  // W ← W − c·U with decoupled decay, in the rule's order.
  static void apply(HostView<float> w, HostView<const float> u, const optim::WeightUpdate& wu) {
    cpu::parallel_for(w.rows, w.cols,
                      [&](index_t i) { cpu::apply_row(w.row(i), u.row(i), w.cols, wu); });
  }

  Options options_;
  RuleImpl rule_;
  TransformImpl transform_;
  StoreImpl store_;
  std::map<std::string, Slot, std::less<>> slots_;
  std::map<std::string, Override, std::less<>> overrides_;
  std::vector<float> coeffs_, raw_, denom_, update_, extra_, rotation_;
};

}  // namespace slimgrad
