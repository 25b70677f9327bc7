#include "catch.hpp"

#include <cmath>
#include <map>
#include <type_traits>
#include <limits>

#include <fasterai/core/sequential.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>

namespace nn = torch::nn;
using namespace fasterai;
namespace g = fasterai::granularity;
namespace m = fasterai::method;
namespace c = fasterai::criteria;
namespace s = fasterai::schedule;

namespace {

// Conv(4->8, 3x3) -> BN -> ReLU -> Conv(8->8, 3x3) -> flatten -> Linear(8*4 -> 5) on 4x6x6.
nn::Sequential small_net() {
  fasterai::NamedSequential features;
  features->push_back("0", nn::Conv2d(nn::Conv2dOptions(4, 8, 3)));
  features->push_back("1", nn::BatchNorm2d(8));
  features->push_back("2", nn::ReLU());
  features->push_back("3", nn::Conv2d(nn::Conv2dOptions(8, 8, 3)));
  nn::Sequential model;
  model->push_back("features", features);
  model->push_back("flatten", nn::Flatten());
  model->push_back("fc", nn::Linear(8 * 2 * 2, 5));
  return model;
}

std::map<std::string, torch::Tensor> snapshot(const nn::Sequential& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters()) out[p.key()] = p.value().detach().clone();
  for (const auto& b : model->named_buffers()) out[b.key()] = b.value().detach().clone();
  return out;
}

bool unchanged(const nn::Sequential& model, const std::map<std::string, torch::Tensor>& before) {
  for (const auto& p : model->named_parameters())
    if (!p.value().allclose(before.at(p.key()), 0, 0, /*equal_nan=*/true)) return false;
  return true;
}

std::int64_t zero_filters(const torch::Tensor& w) {
  return w.reshape({w.size(0), -1}).abs().sum(1).eq(0).sum().item<std::int64_t>();
}

}  // namespace

TEST_CASE("VGG16-BN, Filter/Local/L1 at 40%: 39.06% in the 64-filter layers, 39.84% elsewhere",
          "[sparsifier][article]") {
  torch::manual_seed(0);
  auto model = models::vgg16_bn(10);
  FilterSparsifier<> sparsifier(model);
  sparsifier.prune(40);
  const auto report = sparsifier.report();
  REQUIRE(report.layers.size() == 13);
  for (const auto& l : report.layers) {
    INFO(l.name);
    const auto filters = model->named_parameters()[l.name + ".weight"].size(0);
    CHECK(std::round(l.percent() * 100) / 100 == (filters == 64 ? 39.06 : 39.84));
  }
  CHECK(sparsifier.sparsity() == 40.0);
  // The foundation's report agrees for the convolutions; the classifier is untouched.
  const auto all = sparsity_report(model);
  CHECK(all.layers.size() == 16);
  CHECK(all.layers.back().zeros == 0);
}

TEST_CASE("Local removes exactly floor(n * s / 100) groups per layer", "[sparsifier][local]") {
  torch::manual_seed(1);
  auto model = small_net();
  for (double sparsity : {0.0, 10.0, 25.0, 50.0, 99.0}) {
    Sparsifier<g::Filter, m::Local, c::L1> sp(model, SparsifierOptions().include_linear(true));
    sp.prune(sparsity);
    INFO("sparsity " << sparsity);
    const auto p = model->named_parameters();
    CHECK(zero_filters(p["features.0.weight"]) == std::int64_t(8 * sparsity / 100));
    CHECK(zero_filters(p["features.3.weight"]) == std::int64_t(8 * sparsity / 100));
    // fc's outputs are the model's: the Pruner could never remove them, so they are not zeroed.
    CHECK(zero_filters(p["fc.weight"]) == 0);
    CHECK(sp.mask("features.0").sum().item<std::int64_t>() == std::int64_t(8 * sparsity / 100) * 36);
  }
  Sparsifier<g::Weight, m::Local, c::L1> w(model);
  w.prune(30);
  CHECK(model->named_parameters()["features.3.weight"].eq(0).sum().item<std::int64_t>() >=
        std::int64_t(8 * 8 * 9 * 30 / 100));
  CHECK(w.mask("features.3").sum().item<std::int64_t>() == std::int64_t(8 * 8 * 9 * 30 / 100));
}

TEST_CASE("ties are broken by position and results are deterministic", "[sparsifier][local]") {
  auto model = small_net();
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters()) p.fill_(1.0);  // every group ties
  FilterSparsifier<> sp(model);
  sp.prune(50);
  auto expected = torch::zeros({8}, torch::kBool);
  expected.narrow(0, 0, 4).fill_(true);  // the first four filters go
  CHECK(sp.mask("features.0").reshape({8, -1}).all(1).equal(expected));

  torch::manual_seed(7);
  auto a = small_net();
  auto b = clone_model(a);
  Sparsifier<g::Kernel, m::Global, c::L1> sa(a), sb(b);
  sa.prune(35);
  sb.prune(35);
  for (const auto& name : sa.layer_names()) CHECK(sa.mask(name).equal(sb.mask(name)));
}

TEST_CASE("Filter granularity zeroes the whole channel: filter, bias, BN gamma and beta",
          "[sparsifier][filter]") {
  torch::manual_seed(2);
  auto model = small_net();
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.uniform_(0.5, 1.5);  // BN beta nonzero
  }
  FilterSparsifier<> sp(model);
  sp.prune(50);
  const auto p = model->named_parameters();
  const auto zero = p["features.0.weight"].reshape({8, -1}).abs().sum(1).eq(0);
  CHECK(zero.sum().item<int>() == 4);
  CHECK(p["features.0.bias"].masked_select(zero).eq(0).all().item<bool>());
  CHECK(p["features.1.weight"].masked_select(zero).eq(0).all().item<bool>());
  CHECK(p["features.1.bias"].masked_select(zero).eq(0).all().item<bool>());
  CHECK(p["features.1.bias"].masked_select(~zero).ne(0).all().item<bool>());
  // Downstream the channel is exactly zero, whatever the input.
  model->eval();
  auto x = torch::randn({3, 4, 6, 6});
  nn::Sequential head;  // conv -> BN -> ReLU
  int i = 0;
  for (const auto& l : layers(model)) {
    if (i++ == 3) break;
    head->push_back(std::to_string(i), l.module);
  }
  auto y = head->forward(x);
  CHECK(y.index_select(1, zero.nonzero().flatten()).abs().max().item<float>() == 0.0f);
}

TEST_CASE("Global removes floor(N * s / 100) groups over all layers, each keeps one",
          "[sparsifier][global]") {
  torch::manual_seed(3);
  auto model = small_net();
  Sparsifier<g::Weight, m::Global, c::L1> sp(model, SparsifierOptions().include_linear(true));
  sp.prune(60);
  std::int64_t total = 0, pruned = 0;
  for (const auto& name : sp.layer_names()) {
    total += sp.mask(name).numel();
    pruned += sp.mask(name).sum().item<std::int64_t>();
  }
  CHECK(pruned == total * 60 / 100);
  // One threshold: every pruned |w| is <= every kept |w| (measured on a fresh copy).
  float max_pruned = 0, min_kept = std::numeric_limits<float>::max();
  auto fresh = small_net();
  std::vector<torch::Tensor> abs_before;
  for (const auto& l : prunable_layers(fresh)) abs_before.push_back(l.weight().detach().abs().clone());
  Sparsifier<g::Weight, m::Global, c::L1> sg(fresh, SparsifierOptions().include_linear(true));
  sg.prune(60);
  size_t i = 0;
  for (const auto& name : sg.layer_names()) {
    const auto mask = sg.mask(name);
    if (mask.any().item<bool>()) max_pruned = std::max(max_pruned, abs_before[i].masked_select(mask).max().item<float>());
    if ((~mask).any().item<bool>()) min_kept = std::min(min_kept, abs_before[i].masked_select(~mask).min().item<float>());
    ++i;
  }
  CHECK(max_pruned <= min_kept);

  // A layer whose weights are all tiny would lose every group; it keeps its best one.
  auto tiny = small_net();
  {
    torch::NoGradGuard no_grad;
    tiny->named_parameters()["features.0.weight"].mul_(1e-6);
  }
  Sparsifier<g::Filter, m::Global, c::L1> keep(tiny, SparsifierOptions().normalize(false));
  keep.prune(50);
  CHECK(zero_filters(tiny->named_parameters()["features.0.weight"]) == 7);
}

TEST_CASE("criteria: Taylor uses gradients, Movement the initial weights, Random its seed",
          "[sparsifier][criteria]") {
  torch::manual_seed(4);
  auto model = small_net();
  {
    Sparsifier<g::Weight, m::Local, c::Taylor> taylor(model);
    const auto before = snapshot(model);
    CHECK_THROWS_WITH(taylor.prune(50), Catch::Contains("gradient") && Catch::Contains("features.0") &&
                                            Catch::Contains("backward"));
    CHECK(unchanged(model, before));
    model->forward(torch::randn({4, 4, 6, 6})).square().sum().backward();
    const auto w = model->named_parameters()["features.0.weight"];
    const auto score = (w * w.grad()).square().detach().flatten();
    taylor.prune(50);
    const auto mask = taylor.mask("features.0").flatten();
    CHECK(score.masked_select(mask).max().item<float>() <= score.masked_select(~mask).min().item<float>());
  }
  {
    auto net = small_net();
    Sparsifier<g::Weight, m::Local, c::Movement> movement(net);
    torch::NoGradGuard no_grad;
    auto w = net->named_parameters()["features.3.weight"];
    const auto w0 = w.clone();
    w.copy_(w0 * 0.5);  // every weight moves toward zero ...
    w.view(-1).narrow(0, 0, 10).copy_(w0.view(-1).narrow(0, 0, 10) * 2);  // ... but ten grow
    movement.prune(90);
    CHECK(movement.mask("features.3").view(-1).narrow(0, 0, 10).any().item<bool>() == false);
  }
  {
    auto a = small_net(), b = clone_model(a);
    RandomSparsifier<> ra(a, SparsifierOptions().seed(42)), rb(b, SparsifierOptions().seed(42));
    ra.prune(50);
    rb.prune(50);
    CHECK(ra.mask("features.3").equal(rb.mask("features.3")));
    auto d = clone_model(a);
    RandomSparsifier<> rd(d, SparsifierOptions().seed(43));
    rd.prune(50);
    CHECK_FALSE(ra.mask("features.3").equal(rd.mask("features.3")));
  }
}

TEST_CASE("step follows the schedule and recomputes masks only when the count changes",
          "[sparsifier][schedule]") {
  torch::manual_seed(5);
  auto model = small_net();
  Sparsifier<g::Weight, m::Local, c::L1, s::Gradual> sp(model, SparsifierOptions(80).start(20));
  sp.step(0.0);
  CHECK(sp.sparsity() == 20.0);
  sp.step(0.5);
  CHECK(sp.sparsity() == Approx(80 + (20 - 80) * 0.125));
  const auto mask = sp.mask("features.3");
  {
    // A kept weight made zero, ahead of a pruned one: a recomputation would select it (ties go
    // to the earliest positions) and drop the last pruned weight. The same count of groups
    // recomputes nothing, so the mask stays as it is.
    const auto kept = (~mask).flatten().nonzero().flatten();
    const auto pruned = mask.flatten().nonzero().flatten();
    REQUIRE(kept[0].item<std::int64_t>() < pruned[-1].item<std::int64_t>());
    torch::NoGradGuard no_grad;
    model->named_parameters()["features.3.weight"].view({-1})[kept[0].item<std::int64_t>()] = 0.0f;
  }
  sp.step(0.5000001);
  CHECK(sp.mask("features.3").equal(mask));
  {
    // No count changes and nothing is selected, yet the weights are still checked: a NaN is
    // named, and the mask stays.
    auto w = model->named_parameters()["features.3.weight"].view({-1});
    const auto saved = w[0].item<float>();
    torch::NoGradGuard no_grad;
    w[0] = std::nan("");
    CHECK_THROWS_WITH(sp.step(0.5000002), Catch::Contains("NaN or Inf") && Catch::Contains("features.3"));
    CHECK(sp.mask("features.3").equal(mask));
    w[0] = saved;
  }
  sp.prune(sp.sparsity());  // a forced recomputation at the same count does select it
  CHECK_FALSE(sp.mask("features.3").equal(mask));
  sp.step(1.0);
  CHECK(sp.sparsity() == 80.0);
  CHECK(sp.mask("features.3").sum().item<std::int64_t>() == 8 * 8 * 9 * 80 / 100);
  CHECK(sp.name() == "Weight/Local/L1/Gradual");

  // A user's callable is a schedule too.
  auto square = [](double p) { return p * p; };
  Sparsifier<g::Filter, m::Local, c::L1, decltype(square)> custom(model, SparsifierOptions(50), square);
  custom.step(0.5);
  CHECK(custom.sparsity() == 12.5);
  CHECK(custom.name() == "Filter/Local/L1/custom schedule");
}

TEST_CASE("per-layer targets, include and exclude select what is pruned", "[sparsifier][select]") {
  auto model = small_net();
  Sparsifier<g::Filter, m::Local, c::L1, s::Linear> sp(
      model, SparsifierOptions(50).include_linear(true).exclude({"features.3"})
                 .layer_targets({{"features.0", 25.0}}));
  CHECK(sp.layer_names() == std::vector<std::string>{"features.0", "fc"});
  sp.step(1.0);
  CHECK(zero_filters(model->named_parameters()["features.0.weight"]) == 2);
  CHECK(zero_filters(model->named_parameters()["fc.weight"]) == 0);  // the model's output
  CHECK(zero_filters(model->named_parameters()["features.3.weight"]) == 0);
  Sparsifier<g::Filter, m::Local, c::L1> only(model, SparsifierOptions().include({"fc"}));
  CHECK(only.layer_names() == std::vector<std::string>{"fc"});
}

TEST_CASE("Constant keeps the masks in force: the article's iterative pruning",
          "[sparsifier][schedule]") {
  torch::manual_seed(6);
  auto model = small_net();
  FilterSparsifier<> first(model);
  first.prune(25);
  FilterSparsifier<s::Constant> keep(model);
  CHECK(keep.sparsity() == 25.0);
  CHECK(keep.mask("features.0").equal(first.mask("features.0")));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(1.0);  // an update that would revive weights
  }
  keep.step(0.7);
  CHECK(zero_filters(model->named_parameters()["features.0.weight"]) == 2);
  CHECK(keep.sparsity() == 25.0);
}

TEMPLATE_TEST_CASE("masks stay in force through 100 optimizer steps", "[sparsifier][training]",
                   (Sparsifier<g::Weight, m::Global, c::L1>),
                   (Sparsifier<g::Filter, m::Local, c::L1>),
                   (Sparsifier<g::NM<2, 4>, m::Local, c::L1>)) {
  for (int optimizer_kind = 0; optimizer_kind < 2; ++optimizer_kind) {
    torch::manual_seed(8);
    auto model = small_net();
    TestType sp(model, SparsifierOptions().include_linear(true));
    sp.prune(50);
    std::unique_ptr<torch::optim::Optimizer> opt;
    if (optimizer_kind == 0)
      opt = std::make_unique<torch::optim::SGD>(model->parameters(),
          torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-2));
    else
      opt = std::make_unique<torch::optim::Adam>(model->parameters(),
          torch::optim::AdamOptions(1e-2).weight_decay(1e-2));
    for (int step = 0; step < 100; ++step) {
      opt->zero_grad();
      model->forward(torch::randn({8, 4, 6, 6})).square().mean().backward();
      sp.mask_gradients();
      opt->step();
      sp.apply();
      for (const auto& name : sp.layer_names()) {
        const auto w = model->named_parameters()[name + ".weight"];
        REQUIRE(w.masked_select(sp.mask(name)).abs().sum().template item<float>() == 0.0f);
      }
    }
    // The weights did train: unpruned ones moved.
    CHECK(sp.report().global_percent() < 60.0);
  }
}

TEST_CASE("bad input raises a clear error and changes nothing", "[sparsifier][errors]") {
  auto model = small_net();
  const auto before = snapshot(model);
  FilterSparsifier<> sp(model);
  CHECK_THROWS_WITH(sp.prune(100), Catch::Contains("sparsity") && Catch::Contains("100") &&
                                       Catch::Contains("[0, 100)"));
  CHECK_THROWS_WITH(sp.prune(-1), Catch::Contains("sparsity") && Catch::Contains("-1"));
  CHECK_THROWS_WITH(sp.step(1.5), Catch::Contains("progress") && Catch::Contains("1.5"));
  CHECK(unchanged(model, before));
  CHECK_FALSE(sp.mask("features.0").defined());

  CHECK_THROWS_WITH(FilterSparsifier<>(model, SparsifierOptions().include({"features.9"})),
                    Catch::Contains("include") && Catch::Contains("features.9") &&
                        Catch::Contains("features.0, features.3, fc"));
  CHECK_THROWS_WITH(FilterSparsifier<>(model, SparsifierOptions().exclude({"features.1"})),
                    Catch::Contains("exclude") && Catch::Contains("features.1"));
  CHECK_THROWS_WITH(FilterSparsifier<>(model, SparsifierOptions().exclude({"features.0", "features.3"})),
                    Catch::Contains("no selected layer"));
  nn::Sequential no_conv(nn::Linear(3, 3));
  CHECK_THROWS_WITH(FilterSparsifier<>(no_conv), Catch::Contains("no selected layer"));
  nn::Sequential six_inputs(nn::Conv2d(6, 4, 3));
  CHECK_THROWS_WITH((Sparsifier<g::NM<2, 4>, m::Local, c::L1>(six_inputs)),
                    Catch::Contains("'0'") && Catch::Contains("6") && Catch::Contains("multiple of M = 4"));
  CHECK_THROWS_WITH((Sparsifier<g::NM<2, 4>, m::Local, c::L1>(model, SparsifierOptions(60))),
                    Catch::Contains("at most 50"));
  CHECK_THROWS_WITH((Sparsifier<g::Filter, m::Global, c::L1>(model, SparsifierOptions().layer_targets({{"features.0", 10}}))),
                    Catch::Contains("layer_targets"));
  CHECK_THROWS_WITH(FilterSparsifier<>(model, SparsifierOptions().layer_targets({{"fc", 10}})),
                    Catch::Contains("layer_targets") && Catch::Contains("fc"));

  FilterSparsifier<> ok(model);
  ok.prune(25);
  const auto mask = ok.mask("features.0").clone();
  {
    torch::NoGradGuard no_grad;
    model->named_parameters()["features.3.weight"][0][0][0][0] = std::nan("");
  }
  const auto with_nan = snapshot(model);
  CHECK_THROWS_WITH(ok.prune(50), Catch::Contains("NaN or Inf") && Catch::Contains("features.3"));
  CHECK(ok.mask("features.0").equal(mask));  // masks as they were
  CHECK(ok.sparsity() == 25.0);
  CHECK(unchanged(model, with_nan));
}

// ---- Any module ----------------------------------------------------------------------------

namespace {

// A stem and two residual blocks on one 8-channel stream, each with a 6-channel branch.
struct ResidualImpl : nn::Module {
  nn::Conv2d stem{nullptr}, a1{nullptr}, b1{nullptr}, a2{nullptr}, b2{nullptr};
  nn::BatchNorm2d bn_stem{nullptr}, bn_a1{nullptr}, bn_b1{nullptr}, bn_a2{nullptr}, bn_b2{nullptr};
  nn::Linear fc{nullptr};
  ResidualImpl() {
    auto conv = [&](const char* name, std::int64_t in, std::int64_t out) {
      return register_module(name, nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)));
    };
    auto bn = [&](const char* name, std::int64_t n) { return register_module(name, nn::BatchNorm2d(n)); };
    stem = conv("stem", 3, 8), bn_stem = bn("bn_stem", 8);
    a1 = conv("a1", 8, 6), bn_a1 = bn("bn_a1", 6), b1 = conv("b1", 6, 8), bn_b1 = bn("bn_b1", 8);
    a2 = conv("a2", 8, 6), bn_a2 = bn("bn_a2", 6), b2 = conv("b2", 6, 8), bn_b2 = bn("bn_b2", 8);
    fc = register_module("fc", nn::Linear(8, 4));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn_stem(stem(x)));
    x = torch::relu(x + bn_b1(b1(torch::relu(bn_a1(a1(x))))));
    x = torch::relu(x + bn_b2(b2(torch::relu(bn_a2(a2(x))))));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(Residual);

torch::Tensor zero_rows(const torch::Tensor& w) { return w.reshape({w.size(0), -1}).eq(0).all(1); }

using FilterLocal = Sparsifier<g::Filter, m::Local, c::L1>;
using FilterGlobal = Sparsifier<g::Filter, m::Global, c::L1>;

}  // namespace

// Filter granularity needs the coupling: on a user's module it takes an example input; a
// Sequential's is static; other granularities need none.
static_assert(!std::is_constructible_v<FilterLocal, const Residual&, SparsifierOptions>);
static_assert(std::is_constructible_v<FilterLocal, Residual&, torch::Tensor, SparsifierOptions>);
static_assert(std::is_constructible_v<FilterLocal, const nn::Sequential&, SparsifierOptions>);
static_assert(std::is_constructible_v<Sparsifier<g::Weight, m::Local, c::L1>, const Residual&, SparsifierOptions>);

TEST_CASE("Filter on a user's module zeroes a residual stream's channels in every member",
          "[sparsifier][filter][graph]") {
  torch::manual_seed(41);
  Residual net;
  {
    torch::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.uniform_(0.5, 1.5);  // every bias and β nonzero
  }
  const auto x = torch::randn({2, 3, 6, 6});
  FilterLocal sp(net, x, SparsifierOptions(50));
  CHECK(sp.layer_names() == std::vector<std::string>{"stem", "a1", "b1", "a2", "b2"});
  sp.prune(50);
  // The stream (8 units) loses floor(8 * 0.5) = 4, the same in stem, b1 and b2, with their
  // biases and BatchNorms; each branch (6 units) loses 3.
  const auto stream = zero_rows(net->stem->weight);
  CHECK(stream.sum().item<int>() == 4);
  CHECK(torch::equal(zero_rows(net->b1->weight), stream));
  CHECK(torch::equal(zero_rows(net->b2->weight), stream));
  for (const auto* t : {&net->stem->bias, &net->b1->bias, &net->bn_stem->weight, &net->bn_stem->bias,
                        &net->bn_b1->bias, &net->bn_b2->weight})
    CHECK(torch::equal(t->eq(0), stream));
  CHECK(zero_rows(net->a1->weight).sum().item<int>() == 3);
  CHECK(torch::equal(net->bn_a1->bias.eq(0), zero_rows(net->a1->weight)));
  CHECK(zero_rows(net->fc->weight).sum().item<int>() == 0);  // the output is never pruned
  // The units are chosen by the sum of the members' L1 norms: the 4 lowest sums.
  auto fresh = Residual();
  {
    torch::NoGradGuard no_grad;
    for (auto& p : fresh->parameters()) p.uniform_(0.5, 1.5);
  }
  auto l1 = [](const nn::Conv2d& c) { return c->weight.abs().reshape({c->weight.size(0), -1}).sum(1); };
  const auto sums = l1(fresh->stem) + l1(fresh->b1) + l1(fresh->b2);
  FilterLocal again(fresh, x, SparsifierOptions(50));
  again.prune(50);
  const auto chosen = std::get<1>(sums.sort()).narrow(0, 0, 4);
  CHECK(zero_rows(fresh->stem->weight).index_select(0, chosen).all().item<bool>());
}

TEST_CASE("Global Filter normalizes by each group's mean, so a group of small weights survives",
          "[sparsifier][global][graph]") {
  torch::manual_seed(42);
  auto run = [](bool normalize) {
    Residual net;
    {
      torch::NoGradGuard no_grad;
      net->a1->weight.mul_(1e-3);  // one branch of tiny filters
    }
    FilterGlobal sp(net, torch::randn({1, 3, 6, 6}), SparsifierOptions(40).normalize(normalize));
    sp.prune(40);
    return zero_rows(net->a1->weight).sum().item<int>();
  };
  const int raw = run(false), normalized = run(true);
  CHECK(raw == 5);          // raw sums: the tiny branch goes first, down to the one unit it keeps
  CHECK(normalized < raw);  // normalized: it is judged against its own mean
}

TEST_CASE("Weight granularity on a user's module needs no example and names layers fully",
          "[sparsifier][graph]") {
  torch::manual_seed(43);
  Residual net;
  Sparsifier<g::Weight, m::Local, c::L1> sp(net, SparsifierOptions(30).include_linear(true));
  CHECK(sp.layer_names().back() == "fc");
  sp.prune(30);
  for (const auto& name : sp.layer_names()) {
    const auto& mask = sp.mask(name);
    CHECK(mask.sum().item<std::int64_t>() == mask.numel() * 30 / 100);
  }
}

TEST_CASE("Filter on a user's module: a bad example changes nothing", "[sparsifier][errors][graph]") {
  torch::manual_seed(44);
  Residual net;
  std::map<std::string, torch::Tensor> before;
  for (const auto& p : net->named_parameters()) before[p.key()] = p.value().detach().clone();
  CHECK_THROWS_WITH(FilterLocal(net, torch::randn({1, 5, 6, 6}), SparsifierOptions(30)),
                    Catch::Contains("forward failed") && Catch::Contains("[1, 5, 6, 6]"));
  {
    torch::NoGradGuard no_grad;
    CHECK_THROWS_WITH(FilterLocal(net, torch::randn({1, 3, 6, 6}), SparsifierOptions(30)),
                      Catch::Contains("NoGradGuard"));
  }
  for (const auto& p : net->named_parameters()) CHECK(torch::equal(p.value(), before[p.key()]));
}

TEST_CASE("round_to keeps channel counts at multiples, pruning less where needed", "[sparsifier][graph]") {
  torch::manual_seed(45);
  Residual net;
  const auto x = torch::randn({1, 3, 6, 6});
  FilterLocal sp(net, x, SparsifierOptions(50).round_to(4));
  sp.prune(50);
  CHECK(zero_rows(net->stem->weight).sum().item<int>() == 4);  // 8 -> 4 kept: already a multiple
  CHECK(zero_rows(net->a1->weight).sum().item<int>() == 2);    // 6 -> 3 kept would not be: 4 kept
  Residual other;
  FilterGlobal global(other, x, SparsifierOptions(50).round_to(4));
  global.prune(50);
  for (const auto* conv : {&other->stem, &other->a1, &other->a2}) {
    const auto n = (*conv)->weight.size(0);
    const auto kept = n - zero_rows((*conv)->weight).sum().item<int>();
    CHECK((kept % 4 == 0 || kept == n));  // a multiple of 4, or every channel
  }
  CHECK_THROWS_WITH(FilterLocal(net, x, SparsifierOptions(50).round_to(0)),
                    Catch::Contains("round_to") && Catch::Contains(">= 1"));
}
