// slimgrad/core/error.hpp — the one exception type and the argument checks built on it.
//
// Every public entry point validates its input *before* touching caller memory or its own
// state, and reports a violation as slimgrad::Error with a sentence that names the argument.
#pragma once

#include <stdexcept>
#include <string>

namespace slimgrad {

/// Thrown on invalid arguments, corrupt files and impossible settings. Nothing has been
/// modified when it is thrown from a public function.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws Error(message) unless `condition` holds.
inline void require(bool condition, const std::string& message) {
  if (!condition) throw Error("slimgrad: " + message);
}

}  // namespace slimgrad
