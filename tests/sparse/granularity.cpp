#include "catch.hpp"

#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/granularity.hpp>

using namespace fasterai;
namespace g = fasterai::granularity;

static_assert(granularity_policy<g::Weight> && granularity_policy<g::Vector> &&
              granularity_policy<g::Kernel> && granularity_policy<g::Filter> &&
              granularity_policy<g::NM<2, 4>>);
static_assert(!granularity_policy<int>);

TEST_CASE("groups of each granularity on a conv weight [4, 3, 2, 5]", "[granularity]") {
  const auto s = torch::arange(4 * 3 * 2 * 5, torch::kFloat32).reshape({4, 3, 2, 5});
  CHECK(g::Weight::group_scores(s).sizes() == torch::IntArrayRef({4, 3, 2, 5}));
  CHECK(g::Vector::group_scores(s).sizes() == torch::IntArrayRef({4, 3, 2, 1}));
  CHECK(g::Kernel::group_scores(s).sizes() == torch::IntArrayRef({4, 3, 1, 1}));
  CHECK(g::Filter::group_scores(s).sizes() == torch::IntArrayRef({4, 1, 1, 1}));
  // A group's score is the sum over its elements.
  CHECK(g::Filter::group_scores(s)[1].item<float>() == s[1].sum().item<float>());
  CHECK(g::Vector::group_scores(s)[2][1][0][0].item<float>() == s[2][1][0].sum().item<float>());
  // A pruned group expands to exactly its elements.
  auto pruned = torch::zeros({4, 3, 1, 1}, torch::kBool);
  pruned[2][1] = true;
  auto mask = g::Kernel::expand(pruned, s);
  CHECK(mask.sizes() == s.sizes());
  CHECK(mask.sum().item<std::int64_t>() == 10);
  CHECK(mask[2][1].all().item<bool>());
}

TEST_CASE("a Linear weight is a 1x1 convolution for every granularity", "[granularity]") {
  const auto s = torch::rand({6, 8});
  CHECK(g::Filter::group_scores(s).sizes() == torch::IntArrayRef({6, 1}));
  CHECK(g::Kernel::group_scores(s).sizes() == torch::IntArrayRef({6, 8}));
  CHECK(g::Vector::group_scores(s).sizes() == torch::IntArrayRef({6, 8}));
  CHECK(g::NM<2, 4>::group_scores(s).sizes() == torch::IntArrayRef({6, 2}));
}

TEST_CASE("counts: floor(n * s / 100) groups, N:M counts blocks", "[granularity]") {
  CHECK(g::Filter::groups_to_prune(64, 40) == 25);    // 39.06%
  CHECK(g::Filter::groups_to_prune(512, 40) == 204);  // 39.84%
  CHECK(g::Weight::groups_to_prune(10, 30) == 3);
  CHECK(g::Weight::groups_to_prune(10, 0) == 0);
  CHECK(g::NM<2, 4>::max_sparsity() == 50.0);
  CHECK(g::NM<2, 4>::groups_to_prune(100, 50) == 100);  // every block becomes 2:4
  CHECK(g::NM<2, 4>::groups_to_prune(100, 25) == 50);
  CHECK(g::NM<1, 4>::groups_to_prune(8, 75) == 8);
}

TEST_CASE("N:M keeps the N largest of every M consecutive input weights", "[granularity]") {
  // Conv weight [2, 8, 1, 1]: blocks run along the input channels.
  const auto s = torch::tensor({1.f, 5.f, 3.f, 2.f, 8.f, 7.f, 6.f, 9.f,  //
                                4.f, 4.f, 4.f, 4.f, 0.f, 1.f, 2.f, 3.f})
                     .reshape({2, 8, 1, 1});
  const auto groups = g::NM<2, 4>::group_scores(s);
  CHECK(groups.sizes() == torch::IntArrayRef({2, 1, 1, 2}));
  CHECK(groups.flatten().equal(torch::tensor({3.f, 13.f, 8.f, 1.f})));
  const auto mask = g::NM<2, 4>::expand(torch::ones_like(groups, torch::kBool), s);
  const auto expected = torch::tensor({1, 0, 0, 1, 0, 1, 1, 0,  //
                                       1, 1, 0, 0, 1, 1, 0, 0})  // ties: earliest go first
                            .to(torch::kBool)
                            .reshape({2, 8, 1, 1});
  CHECK(mask.equal(expected));
  CHECK_NOTHROW(g::NM<2, 4>::check(s, "conv"));
  CHECK_THROWS_WITH((g::NM<2, 4>::check(torch::zeros({2, 6, 3, 3}), "features.3")),
                    Catch::Contains("features.3") && Catch::Contains("6") &&
                        Catch::Contains("multiple of M = 4"));
}
