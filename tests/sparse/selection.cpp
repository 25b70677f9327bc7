#include <catch2/catch.hpp>

#include <fasterai/sparse/selection.hpp>

using fasterai::detail::kth_smallest;
using fasterai::detail::select_lowest;

TEST_CASE("radix select finds the k-th smallest, negatives and ties included", "[selection]") {
  torch::manual_seed(3);
  auto a = torch::randn({1000});
  auto b = torch::randn({777});
  auto sorted = std::get<0>(torch::cat({a, b}).sort());
  for (std::int64_t k : {1, 2, 500, 1776, 1777})
    CHECK(kth_smallest({a, b}, k) == sorted[k - 1].item<float>());
  CHECK(kth_smallest({torch::tensor({-0.0f, 0.0f, -1.0f})}, 2) == 0.0f);
}

TEST_CASE("select_lowest selects exactly k, ties to the earliest positions", "[selection]") {
  auto a = torch::tensor({3.f, 1.f, 2.f, 1.f});
  auto b = torch::tensor({1.f, 0.f});
  auto m = select_lowest({a, b}, 3);  // 0, then two of the three 1s: a[1], a[3]
  CHECK(m[0].equal(torch::tensor({false, true, false, true})));
  CHECK(m[1].equal(torch::tensor({false, true})));
  m = select_lowest({a, b}, 4);
  CHECK(m[1].equal(torch::tensor({true, true})));
  m = select_lowest({a, b}, 0);
  CHECK(m[0].sum().item<int>() + m[1].sum().item<int>() == 0);
  m = select_lowest({a, b}, 6);
  CHECK(m[0].all().item<bool>());
}
