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
    CHECK(kth_smallest({a, b}, k).value == sorted[k - 1].item<float>());
  const auto t = kth_smallest({torch::tensor({1.0f, -1.0f, 1.0f, 2.0f, 1.0f})}, 3);
  CHECK(t.value == 1.0f);
  CHECK(t.ties_taken == 2);
  CHECK(t.ties_total == 3);
}

TEST_CASE("select_lowest selects exactly k, ties to the earliest positions", "[selection]") {
  auto a = torch::tensor({3.f, 1.f, 2.f, 1.f});
  auto b = torch::tensor({1.f, 0.f});
  auto sel = select_lowest({a, b}, 3);
  auto m = sel.masks;
  CHECK(sel.counts == std::vector<std::int64_t>{2, 1});  // 0, then two of the three 1s: a[1], a[3]
  CHECK(m[0].equal(torch::tensor({false, true, false, true})));
  CHECK(m[1].equal(torch::tensor({false, true})));
  m = select_lowest({a, b}, 4).masks;
  CHECK(m[1].equal(torch::tensor({true, true})));
  m = select_lowest({a, b}, 0).masks;
  CHECK(m[0].sum().item<int>() + m[1].sum().item<int>() == 0);
  m = select_lowest({a, b}, 6).masks;
  CHECK(m[0].all().item<bool>());
}

TEST_CASE("select_lowest handles ties spread over many chunks", "[selection]") {
  // 1M values, half of them exactly zero: the chunked tie quota must keep position order.
  auto v = torch::rand({1 << 20});
  v.view({-1, 2}).select(1, 0).zero_();
  const std::int64_t k = 300'000;
  const auto m = select_lowest({v}, k).masks.front();
  CHECK(m.sum().item<std::int64_t>() == k);
  const auto zeros = v.eq(0).nonzero().flatten();
  CHECK(m.index_select(0, zeros.narrow(0, 0, k)).all().item<bool>());
  CHECK_FALSE(m.index_select(0, zeros.narrow(0, k, zeros.numel() - k)).any().item<bool>());
}
