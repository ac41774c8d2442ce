#include <doctest/doctest.h>

#include <slimgrad/slimgrad.hpp>
#include <type_traits>
#include <vector>

using namespace slimgrad;

TEST_CASE("MatrixView indexes row-major memory with a leading dimension") {
  std::vector<float> buf(3 * 5);
  for (std::size_t i = 0; i < buf.size(); ++i)
    buf[i] = static_cast<float>(i);
  HostView<float> v(buf.data(), 3, 4, 5);
  CHECK(v(0, 0) == 0.0f);
  CHECK(v(1, 0) == 5.0f);
  CHECK(v(2, 3) == 13.0f);
  CHECK(!v.contiguous());
  auto b = v.block(1, 2, 2, 2);
  CHECK(b(0, 0) == 7.0f);
  CHECK(b(1, 1) == 13.0f);
  HostView<const float> c = v;  // non-const converts to const
  CHECK(c.shape() == Shape{3, 4});
}

TEST_CASE("host and device views are different types") {
  static_assert(!std::is_convertible_v<HostView<float>, DeviceView<float>>);
  static_assert(!std::is_convertible_v<DeviceView<float>, HostView<float>>);
  static_assert(!std::is_convertible_v<HostView<const float>, HostView<float>>);
  CHECK(true);
}

TEST_CASE("orientation follows GaLore's proj_type rules") {
  CHECK(side_for({4096, 11008}) == Side::left);
  CHECK(side_for({11008, 4096}) == Side::right);
  CHECK(side_for({64, 64}) == Side::right);  // m >= n: right
  CHECK(side_for({11008, 4096}, ProjType::reverse_std) == Side::left);
  CHECK(side_for({10, 20}, ProjType::right) == Side::right);
  CHECK(projected_shape({100, 40}, Side::right, 8) == Shape{100, 8});
  CHECK(projected_shape({40, 100}, Side::left, 8) == Shape{8, 100});
  CHECK(parse_proj_type("reverse_std") == ProjType::reverse_std);
  CHECK_THROWS_AS(parse_proj_type("diagonal"), Error);
}

TEST_CASE("tensor_id is FNV-1a of the name and stable") {
  static_assert(tensor_id("") == 0xcbf29ce484222325ull);
  CHECK(tensor_id("a") == 0xaf63dc4c8601ec8cull);  // published FNV-1a 64 test vector
  CHECK(tensor_id("layers.0.q") != tensor_id("layers.0.k"));
}

TEST_CASE("identity transform satisfies the transform contract") {
  impl<transforms::Identity, backend::cpu> id;
  std::vector<float> g = {1, 2, 3, 4, 5, 6}, c(6), u(6);
  auto s = id.init({2, 3}, 1);
  id.forward(s, host_view<const float>(g.data(), 2, 3), host_view(c.data(), 2, 3));
  id.inverse(s, host_view<const float>(c.data(), 2, 3), host_view(u.data(), 2, 3));
  CHECK(u == g);
  CHECK_THROWS_AS(id.forward(s, host_view<const float>(g.data(), 2, 3), host_view(c.data(), 3, 2)),
                  Error);
  CHECK_THROWS_AS(id.init({0, 3}, 1), Error);
}
