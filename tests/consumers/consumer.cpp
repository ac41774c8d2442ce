// A downstream program: includes the umbrella header and runs a transform.
#include <cstdio>
#include <slimgrad/slimgrad.hpp>
#include <vector>

int main() {
  slimgrad::impl<slimgrad::transforms::Identity, slimgrad::backend::cpu> t;
  std::vector<float> g = {1, 2, 3, 4}, c(4);
  auto s = t.init({2, 2}, slimgrad::tensor_id("w"));
  t.forward(s, slimgrad::host_view<const float>(g.data(), 2, 2),
            slimgrad::host_view(c.data(), 2, 2));
  if (c != g) return 1;
  std::puts("consumer ok");
  return 0;
}
