// Must not compile: a device view handed where a host view is expected.
#include <slimgrad/slimgrad.hpp>

int main() {
  float* p = nullptr;
  slimgrad::DeviceView<float> d = slimgrad::device_view(p, 2, 2);
  slimgrad::HostView<float> h = d;
  (void)h;
}
