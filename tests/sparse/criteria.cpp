#include "catch.hpp"

#include <cmath>
#include <vector>

#include <fasterai/sparse/sparsifier.hpp>

namespace nn = torch::nn;
using namespace fasterai;
namespace g = fasterai::granularity;
namespace m = fasterai::method;
namespace c = fasterai::criteria;

namespace {

torch::Tensor none() { return {}; }

// Scores per group, as the sparsifier sees them: the granularity sums the criteria's scores.
template <class G, class C>
torch::Tensor group_scores(const torch::Tensor& w) {
  return G::group_scores(C::score(w, none(), C::init(w, 0))).reshape({-1});
}

void check_close(const torch::Tensor& actual, const std::vector<double>& expected) {
  REQUIRE(actual.numel() == static_cast<std::int64_t>(expected.size()));
  const auto a = actual.to(torch::kFloat64).reshape({-1});
  for (std::size_t i = 0; i < expected.size(); ++i)
    CHECK(a[static_cast<std::int64_t>(i)].item<double>() == Approx(expected[i]).epsilon(1e-6).margin(1e-9));
}

// LAMP by its definition, one group at a time (independent of the vectorized version).
std::vector<double> lamp_by_definition(const std::vector<double>& squares) {
  std::vector<double> out;
  for (double u : squares) {
    double at_least = 0;
    for (double v : squares)
      if (v >= u) at_least += v;
    out.push_back(at_least > 0 ? u / at_least : 0.0);
  }
  return out;
}

// Conv(1 -> 3, 1x2) -> Conv(3 -> 1, 1x1): the first layer's three filters can be pruned (the
// second's output is the model's).
nn::Sequential two_convs(const torch::Tensor& filters) {
  nn::Sequential model(nn::Conv2d(nn::Conv2dOptions(1, 3, {1, 2}).bias(false)),
                       nn::Conv2d(nn::Conv2dOptions(3, 1, 1).bias(false)));
  torch::NoGradGuard no_grad;
  model[0]->as<nn::Conv2d>()->weight.copy_(filters.reshape({3, 1, 1, 2}));
  model[1]->as<nn::Conv2d>()->weight.fill_(1.0);
  return model;
}

std::vector<bool> pruned_filters(const torch::Tensor& mask) {
  std::vector<bool> out;
  const auto rows = mask.reshape({mask.size(0), -1}).all(1);
  for (std::int64_t i = 0; i < rows.numel(); ++i) out.push_back(rows[i].item<bool>());
  return out;
}

}  // namespace

TEST_CASE("L2 scores each group by its norm: |w| for Weight, the filter's norm for Filter",
          "[criteria]") {
  const auto w = torch::tensor({3.0f, 4.0f, 1.0f, 0.0f, 0.0f, -2.0f, 2.0f, 1.0f, -2.0f}).reshape({3, 1, 1, 3});
  // Filters [3, 4, 1], [0, 0, -2], [2, 1, -2]: norms sqrt(26), 2, 3.
  check_close(group_scores<g::Filter, c::L2<g::Filter>>(w), {std::sqrt(26.0), 2.0, 3.0});
  CHECK(c::L2<g::Weight>::score(w, none(), none()).equal(w.abs()));
  // Vector granularity on a conv weight: each kernel row [o, i, h, :] is a group, here a filter.
  check_close(group_scores<g::Vector, c::L2<g::Vector>>(w), {std::sqrt(26.0), 2.0, 3.0});
  // A Linear [out, in] under Filter: each row.
  const auto linear = torch::tensor({1.0f, 2.0f, 2.0f, 0.0f, 0.0f, 0.0f}).reshape({2, 3});
  check_close(group_scores<g::Filter, c::L2<g::Filter>>(linear), {3.0, 0.0});
  CHECK(c::L2<g::Filter>::score(linear, none(), none()).sizes() == linear.sizes());
}

TEST_CASE("LAMP: squared norm over the sum of the squared norms at least as large, per layer",
          "[criteria]") {
  // Single weights [1, -2, 3, 4]: squares 1, 4, 9, 16 -> 1/30, 4/29, 9/25, 16/16.
  const auto w = torch::tensor({1.0f, -2.0f, 3.0f, 4.0f}).reshape({1, 4});
  check_close(c::LAMP<g::Weight>::score(w, none(), none()), {1.0 / 30, 4.0 / 29, 9.0 / 25, 1.0});

  // Ties count on both sides: equal weights score equally; a zero layer scores zero.
  check_close(c::LAMP<g::Weight>::score(torch::tensor({2.0f, 1.0f, 2.0f}).reshape({3, 1}), none(), none()),
              {4.0 / 8, 1.0 / 9, 4.0 / 8});
  check_close(c::LAMP<g::Weight>::score(torch::zeros({2, 2}), none(), none()), {0, 0, 0, 0});

  // Filters of a conv: squared norms 26, 4, 9.
  const auto conv = torch::tensor({3.0f, 4.0f, 1.0f, 0.0f, 0.0f, -2.0f, 2.0f, 1.0f, -2.0f}).reshape({3, 1, 1, 3});
  check_close(group_scores<g::Filter, c::LAMP<g::Filter>>(conv), {26.0 / 26, 4.0 / 39, 9.0 / 35});

  // Against the definition on random layers, and scale invariant (a layer's scores do not
  // depend on its overall magnitude: what lets one threshold compare layers).
  torch::manual_seed(3);
  const auto r = torch::randn({6, 4, 3, 3});
  const auto squares = r.to(torch::kFloat64).square().sum({1, 2, 3});
  check_close(group_scores<g::Filter, c::LAMP<g::Filter>>(r),
              lamp_by_definition(std::vector<double>(squares.data_ptr<double>(), squares.data_ptr<double>() + 6)));
  const auto flat = r.to(torch::kFloat64).square().reshape({-1});
  check_close(c::LAMP<g::Weight>::score(r, none(), none()),
              lamp_by_definition(std::vector<double>(flat.data_ptr<double>(), flat.data_ptr<double>() + flat.numel())));
  CHECK(torch::allclose(c::LAMP<g::Kernel>::score(r * 1000, none(), none()),
                        c::LAMP<g::Kernel>::score(r, none(), none()), 1e-5, 1e-7));
}

TEST_CASE("FPGM: a filter's summed distance to the layer's other filters", "[criteria]") {
  // Filters [0, 0], [3, 4], [6, 8] on a line: distances 5, 10, 5 -> 15, 10, 15. The middle one,
  // the geometric median, is the most replaceable though the zero filter is the smallest.
  const auto w = torch::tensor({0.0f, 0.0f, 3.0f, 4.0f, 6.0f, 8.0f}).reshape({3, 1, 1, 2});
  check_close(group_scores<g::Filter, c::FPGM>(w), {15.0, 10.0, 15.0});
  // A Linear's rows, against the definition.
  torch::manual_seed(4);
  const auto r = torch::randn({5, 7});
  std::vector<double> expected;
  for (std::int64_t i = 0; i < 5; ++i) {
    double sum = 0;
    for (std::int64_t j = 0; j < 5; ++j) sum += (r[i] - r[j]).to(torch::kFloat64).norm().item<double>();
    expected.push_back(sum);
  }
  check_close(group_scores<g::Filter, c::FPGM>(r), expected);
}

TEST_CASE("a Sparsifier with L2, LAMP or FPGM prunes what the criterion says", "[criteria][sparsifier]") {
  SECTION("Filter/Local/L2 removes the smallest norm, where L1 removes the smallest sum") {
    // Filters [3, 3] (L1 6, L2 4.24), [5, 0] (5, 5), [10, 10].
    const auto filters = torch::tensor({3.0f, 3.0f, 5.0f, 0.0f, 10.0f, 10.0f});
    auto a = two_convs(filters);
    Sparsifier<g::Filter, m::Local, c::L2<g::Filter>> l2(a, SparsifierOptions().include({"0"}));
    l2.prune(34);  // floor(3 * 0.34) = 1 filter
    CHECK(pruned_filters(l2.mask("0")) == std::vector<bool>{true, false, false});
    auto b = two_convs(filters);
    Sparsifier<g::Filter, m::Local, c::L1> l1(b, SparsifierOptions().include({"0"}));
    l1.prune(34);
    CHECK(pruned_filters(l1.mask("0")) == std::vector<bool>{false, true, false});
  }
  SECTION("Filter/Local/FPGM removes the geometric median, not the zero filter") {
    auto model = two_convs(torch::tensor({0.0f, 0.0f, 3.0f, 4.0f, 6.0f, 8.0f}));
    Sparsifier<g::Filter, m::Local, c::FPGM> fpgm(model, SparsifierOptions().include({"0"}));
    fpgm.prune(34);
    CHECK(pruned_filters(fpgm.mask("0")) == std::vector<bool>{false, true, false});
    const auto w = model[0]->as<nn::Conv2d>()->weight;
    CHECK(w[1].abs().sum().item<float>() == 0.0f);
    CHECK(w[2].abs().sum().item<float>() == 14.0f);  // [6, 8] kept
  }
  SECTION("Weight/Global/LAMP: each layer loses its relatively small weights; L1 empties one layer") {
    // Layer a: [1, 2, 3, 4] -> LAMP 1/30, 4/29, 9/25, 1; layer b: [10, 20, 30, 50] -> 100/3900,
    // 400/3800, 900/3400, 1. The four lowest: b0, a0, b1, a1.
    auto make = [] {
      nn::Sequential model(nn::Linear(nn::LinearOptions(4, 1).bias(false)),
                           nn::Linear(nn::LinearOptions(1, 4).bias(false)));
      torch::NoGradGuard no_grad;
      model[0]->as<nn::Linear>()->weight.copy_(torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}).reshape({1, 4}));
      model[1]->as<nn::Linear>()->weight.copy_(torch::tensor({10.0f, 20.0f, 30.0f, 50.0f}).reshape({4, 1}));
      return model;
    };
    auto model = make();
    Sparsifier<g::Weight, m::Global, c::LAMP<g::Weight>> lamp(model, SparsifierOptions().include_linear(true));
    lamp.prune(50);
    const auto expected = torch::tensor({true, true, false, false});
    CHECK(lamp.mask("0").reshape({-1}).equal(expected));
    CHECK(lamp.mask("1").reshape({-1}).equal(expected));
    auto plain = make();
    Sparsifier<g::Weight, m::Global, c::L1> l1(plain, SparsifierOptions().include_linear(true));
    l1.prune(50);  // the four smallest are all of layer a; it keeps its largest
    CHECK(l1.mask("0").reshape({-1}).equal(torch::tensor({true, true, true, false})));
    CHECK(l1.mask("1").reshape({-1}).equal(torch::tensor({false, false, false, false})));
  }
  SECTION("Filter/Global/LAMP<Filter> and the criteria's names") {
    auto model = two_convs(torch::tensor({0.5f, 0.5f, 3.0f, 4.0f, 6.0f, 8.0f}));
    Sparsifier<g::Filter, m::Global, c::LAMP<g::Filter>> lamp(
        model, SparsifierOptions().include({"0"}).normalize(false));
    lamp.prune(34);
    CHECK(pruned_filters(lamp.mask("0")) == std::vector<bool>{true, false, false});
    CHECK(lamp.name() == "Filter/Global/LAMP/OneShot");
  }
}

TEST_CASE("SecondOrderTaylor: w² times the squared gradients summed over the batches scored",
          "[criteria]") {
  const auto w = torch::tensor({1.0f, -2.0f, 3.0f});
  auto state = c::SecondOrderTaylor::init(w, 0);
  CHECK(state.equal(torch::zeros({3})));
  // batch 1: g = [1, 1, 0] -> Σg² = [1, 1, 0]; score w²·Σg² = [1, 4, 0]
  CHECK(c::SecondOrderTaylor::score(w, torch::tensor({1.0f, 1.0f, 0.0f}), state).equal(torch::tensor({1.0f, 4.0f, 0.0f})));
  // batch 2: g = [0, -1, 2] -> Σg² = [1, 2, 4]; score = [1, 8, 36]
  CHECK(c::SecondOrderTaylor::score(w, torch::tensor({0.0f, -1.0f, 2.0f}), state).equal(torch::tensor({1.0f, 8.0f, 36.0f})));
  CHECK(state.equal(torch::tensor({1.0f, 2.0f, 4.0f})));
  // The weight is read as it is now: a weight that moved to 0 scores 0 whatever its history.
  CHECK(c::SecondOrderTaylor::score(torch::tensor({0.0f, 1.0f, 1.0f}), torch::zeros({3}), state)
            .equal(torch::tensor({0.0f, 2.0f, 4.0f})));
}

TEST_CASE("a Sparsifier with SecondOrderTaylor accumulates over its steps; Taylor sees one batch",
          "[criteria][sparsifier]") {
  // Filters [1, 1], [1, 1], [1, 1]: equal weights, so the gradients alone decide. Batch 1 gives
  // the first filter the largest gradient, batch 2 the second; summed, the third is the least
  // important, while the last batch alone (what Taylor sees) makes the first one the least.
  auto model = two_convs(torch::ones({6}));
  auto& w = model[0]->as<nn::Conv2d>()->weight;
  auto set_grad = [&](std::vector<float> per_filter) {
    w.mutable_grad() = torch::tensor(per_filter).reshape({3, 1, 1, 1}).expand({3, 1, 1, 2}).contiguous();
  };
  Sparsifier<g::Filter, m::Local, c::SecondOrderTaylor, schedule::Linear> second(
      model, SparsifierOptions(34).include({"0"}));
  set_grad({3, 1, 0.5});
  second.step(0.0);  // scores batch 1, prunes nothing yet
  set_grad({0, 2, 0.5});
  second.step(1.0);  // Σg² per weight: [9, 5, 0.5]
  CHECK(pruned_filters(second.mask("0")) == std::vector<bool>{false, false, true});

  auto other = two_convs(torch::ones({6}));
  auto& v = other[0]->as<nn::Conv2d>()->weight;
  v.mutable_grad() = torch::tensor({0.0f, 2.0f, 0.5f}).reshape({3, 1, 1, 1}).expand({3, 1, 1, 2}).contiguous();
  Sparsifier<g::Filter, m::Local, c::Taylor> taylor(other, SparsifierOptions().include({"0"}));
  taylor.prune(34);
  CHECK(pruned_filters(taylor.mask("0")) == std::vector<bool>{true, false, false});
  CHECK(second.name() == "Filter/Local/SecondOrderTaylor/Linear");
}

TEST_CASE("BNScale: a channel scores the |γ| of the norm reading it, summed over a coupled unit",
          "[criteria][sparsifier]") {
  // conv(1→4) → BN(4) → ReLU → conv(4→2): the filters' norms say filter 0 is the least
  // important, the BatchNorm's γ says filter 2.
  auto make = [] {
    nn::Sequential model(nn::Conv2d(nn::Conv2dOptions(1, 4, 1)), nn::BatchNorm2d(4), nn::ReLU(),
                         nn::Conv2d(nn::Conv2dOptions(4, 2, 1)));
    torch::NoGradGuard no_grad;
    model[0]->as<nn::Conv2d>()->weight.copy_(torch::tensor({0.1f, 1.0f, 2.0f, 3.0f}).reshape({4, 1, 1, 1}));
    model[1]->as<nn::BatchNorm2d>()->weight.copy_(torch::tensor({1.0f, -0.5f, 0.25f, 2.0f}));
    return model;
  };
  auto model = make();
  Sparsifier<g::Filter, m::Local, c::BNScale> slim(model, SparsifierOptions().include({"0"}));
  slim.prune(50);  // two of four: |γ| = [1, 0.5, 0.25, 2] -> channels 2 and 1
  CHECK(pruned_filters(slim.mask("0")) == std::vector<bool>{false, true, true, false});
  // Pruning a channel zeroes its γ and β too, as for every criterion with Filter granularity.
  CHECK(model[1]->as<nn::BatchNorm2d>()->weight.equal(torch::tensor({1.0f, 0.0f, 0.0f, 2.0f})));
  auto plain = make();
  Sparsifier<g::Filter, m::Local, c::L1> l1(plain, SparsifierOptions().include({"0"}));
  l1.prune(50);
  CHECK(pruned_filters(l1.mask("0")) == std::vector<bool>{true, true, false, false});

  // Global over two layers with normalize(false) is network slimming's one threshold on |γ|.
  nn::Sequential two(nn::Conv2d(nn::Conv2dOptions(1, 2, 1)), nn::BatchNorm2d(2), nn::ReLU(),
                     nn::Conv2d(nn::Conv2dOptions(2, 2, 1)), nn::BatchNorm2d(2), nn::ReLU(),
                     nn::Conv2d(nn::Conv2dOptions(2, 1, 1)));
  {
    torch::NoGradGuard no_grad;
    two[1]->as<nn::BatchNorm2d>()->weight.copy_(torch::tensor({0.1f, 0.4f}));
    two[4]->as<nn::BatchNorm2d>()->weight.copy_(torch::tensor({5.0f, 0.3f}));
  }
  Sparsifier<g::Filter, m::Global, c::BNScale> global(two, SparsifierOptions().include({"0", "3"}).normalize(false));
  global.prune(50);  // two of four units: the lowest |γ|, 0.1 and 0.3, one in each layer
  CHECK(pruned_filters(global.mask("0")) == std::vector<bool>{true, false});
  CHECK(pruned_filters(global.mask("3")) == std::vector<bool>{false, true});
}

TEST_CASE("BNScale refuses a layer whose channels no norm reads, the model untouched", "[criteria][sparsifier]") {
  auto model = two_convs(torch::tensor({1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f}));
  const auto before = model[0]->as<nn::Conv2d>()->weight.clone();
  using Slim = Sparsifier<g::Filter, m::Local, c::BNScale>;
  CHECK_THROWS_WITH(Slim(model, SparsifierOptions().include({"0"})),
                    Catch::Contains("criteria") && Catch::Contains("BNScale") && Catch::Contains("layer '0'") &&
                        Catch::Contains("BatchNorm"));
  CHECK(model[0]->as<nn::Conv2d>()->weight.equal(before));
}
