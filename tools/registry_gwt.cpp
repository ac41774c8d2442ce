// tools/registry_gwt.cpp — the GWT instantiations of the registry: Dwt<W, L> for the wavelets
// haar, db2, db4 and levels 1..3 (type-level keys `wavelet` and `levels`).
#include "registry_impl.hpp"

namespace slimgrad::tools::detail {
namespace {

template <class W, int L>
std::unique_ptr<AnyOptimizer> build_gwt(const std::vector<Setting>& settings,
                                        std::map<std::string, std::string> type_keys) {
  using Opt = Optimizer<optim::Adam, transforms::Dwt<W, L>, state::Fp32, backend::cpu,
                        residual::WaveletDetails>;
  const auto d = recipes::gwt_options();  // Haar level 2: every field but the transform's type
  typename Opt::Options o;
  o.rule = d.rule;
  o.transform.mode = d.transform.mode;
  o.transform.axis = d.transform.axis;
  o.store = d.store;
  o.residual = d.residual;
  o.fallback = d.fallback;
  o.seed = d.seed;
  return build<Opt>("gwt", o, settings, std::move(type_keys));
}

template <class W>
std::unique_ptr<AnyOptimizer> gwt_levels(int levels, const std::vector<Setting>& settings,
                                         std::map<std::string, std::string> type_keys) {
  switch (levels) {
    case 1:
      return build_gwt<W, 1>(settings, std::move(type_keys));
    case 2:
      return build_gwt<W, 2>(settings, std::move(type_keys));
    default:
      return build_gwt<W, 3>(settings, std::move(type_keys));
  }
}

}  // namespace

std::unique_ptr<AnyOptimizer> make_gwt(const std::vector<Setting>& settings) {
  const std::string wavelet = last_value(settings, "wavelet", "haar");
  const std::string levels = last_value(settings, "levels", "2");
  require(wavelet == "haar" || wavelet == "db2" || wavelet == "db4",
          "option 'wavelet' of gwt expects haar, db2 or db4, got '" + wavelet + "'");
  require(levels == "1" || levels == "2" || levels == "3",
          "option 'levels' of gwt expects 1, 2 or 3, got '" + levels + "'");
  const int l = levels[0] - '0';
  std::map<std::string, std::string> keys{{"wavelet", wavelet}, {"levels", levels}};
  if (wavelet == "haar") return gwt_levels<transforms::Haar>(l, settings, std::move(keys));
  if (wavelet == "db2") return gwt_levels<transforms::Db2>(l, settings, std::move(keys));
  return gwt_levels<transforms::Db4>(l, settings, std::move(keys));
}

}  // namespace slimgrad::tools::detail
