// Must not compile: a policy with no implementation for the chosen backend.
#include <slimgrad/slimgrad.hpp>

struct NotAPolicy {};
int main() {
  slimgrad::impl<NotAPolicy, slimgrad::backend::cpu> x;
  (void)x;
}
