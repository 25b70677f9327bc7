#include <catch2/catch.hpp>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/transform/pruner.hpp>

#include "transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

// The Pruner takes Sequential-like models only.
template <class M>
concept prunable_by_pruner = requires(Pruner p, M m) { p.prune(m); };
static_assert(prunable_by_pruner<nn::Sequential>);
static_assert(prunable_by_pruner<NamedSequential>);
static_assert(!prunable_by_pruner<nn::Linear>);
static_assert(!prunable_by_pruner<nn::Conv2d>);

namespace {

// conv1(3→6) BN ReLU MaxPool conv2(6→8) BN ReLU AdaptiveAvgPool(2×2) Flatten fc(32→5).
nn::Sequential two_convs(bool bias = true) {
  nn::Sequential m;
  m->push_back("conv1", nn::Conv2d(nn::Conv2dOptions(3, 6, 3).padding(1).bias(bias)));
  m->push_back("bn1", nn::BatchNorm2d(6));
  m->push_back("relu1", nn::ReLU());
  m->push_back("pool1", nn::MaxPool2d(2));
  m->push_back("conv2", nn::Conv2d(nn::Conv2dOptions(6, 8, 3).padding(1).bias(bias)));
  m->push_back("bn2", nn::BatchNorm2d(8));
  m->push_back("relu2", nn::ReLU());
  m->push_back("avgpool", nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions({2, 2})));
  m->push_back("flatten", nn::Flatten());
  m->push_back("fc", nn::Linear(32, 5));
  randomize_batch_norms(*m);
  return m;
}

torch::Tensor run(nn::Sequential& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return m->forward(x);
}

}  // namespace

TEST_CASE("Pruner removes zero channels from conv, BatchNorm, next conv and Linear", "[pruner]") {
  torch::manual_seed(1);
  auto model = two_convs();
  const auto all = walk(model);
  for (std::int64_t c : {1, 4}) zero_channel(all, 0, c);
  for (std::int64_t c : {0, 2, 7}) zero_channel(all, 4, c);
  model->eval();
  const auto before = snapshot(*model);
  const auto x = torch::randn({2, 3, 8, 8});
  const auto y = run(model, x);

  Pruner pruner;
  auto pruned = pruner.prune(model);
  CHECK(unchanged(before, *model));
  const auto p = pruned->named_parameters();
  CHECK(p["conv1.weight"].sizes() == std::vector<std::int64_t>{4, 3, 3, 3});
  CHECK(p["conv1.bias"].sizes() == std::vector<std::int64_t>{4});
  CHECK(p["bn1.weight"].sizes() == std::vector<std::int64_t>{4});
  CHECK(pruned->named_buffers()["bn1.running_var"].sizes() == std::vector<std::int64_t>{4});
  CHECK(p["conv2.weight"].sizes() == std::vector<std::int64_t>{5, 4, 3, 3});
  CHECK(p["bn2.bias"].sizes() == std::vector<std::int64_t>{5});
  CHECK(p["fc.weight"].sizes() == std::vector<std::int64_t>{5, 20});
  CHECK(pruned->named_children()[0].value()->as<nn::Conv2dImpl>()->options.out_channels() == 4);

  // The kept values are the original ones: channels {0, 2, 3, 5} of conv1 and {1, 3, 4, 5, 6}
  // of conv2; channel c of conv2 owns fc inputs [4c, 4c + 4).
  const auto keep1 = torch::tensor({0, 2, 3, 5}, torch::kLong);
  const auto keep2 = torch::tensor({1, 3, 4, 5, 6}, torch::kLong);
  const auto w2 = model->named_parameters()["conv2.weight"];
  CHECK(torch::equal(p["conv2.weight"], w2.index_select(0, keep2).index_select(1, keep1)));
  const auto fc_in = (keep2.unsqueeze(1) * 4 + torch::arange(4).unsqueeze(0)).reshape({-1});
  CHECK(torch::equal(p["fc.weight"], model->named_parameters()["fc.weight"].index_select(1, fc_in)));
  CHECK(torch::equal(pruned->named_buffers()["bn1.running_mean"],
                     model->named_buffers()["bn1.running_mean"].index_select(0, keep1)));

  const auto& report = pruner.report();
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].name == "conv1");
  CHECK(report.layers[0].removed() == 2);
  CHECK(report.layers[1].removed() == 3);
  CHECK(report.channels_removed() == 5);
  CHECK(report.changed());

  CHECK(!pruned->is_training());
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);
  // Channels are independent in a BatchNorm, so train mode (batch statistics) agrees as well.
  model->train();
  pruned->train();
  CHECK(relative_error(run(pruned, x), run(model, x)) <= 1e-5);
}

TEST_CASE("Pruner keeps a zero filter whose BatchNorm emits a constant", "[pruner]") {
  torch::manual_seed(2);
  auto model = two_convs();
  const auto all = walk(model);
  zero_channel(all, 0, 3);
  {
    torch::NoGradGuard no_grad;
    zero_channel(all, 0, 1);
    all[1].as<nn::BatchNorm2dImpl>()->bias[1].fill_(0.5);  // β ≠ 0: channel 1 is constant
  }
  model->eval();
  const auto x = torch::randn({2, 3, 8, 8});
  const auto y = run(model, x);
  Pruner pruner;
  auto pruned = pruner.prune(model);
  CHECK(pruned->named_parameters()["conv1.weight"].size(0) == 5);
  CHECK(pruner.report().layers[0].constant_channels == 1);
  CHECK(pruner.report().layers[0].removed() == 1);
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);
}

TEST_CASE("Pruner leaves each convolution at least one channel", "[pruner]") {
  torch::manual_seed(3);
  auto model = two_convs(/*bias=*/false);
  const auto all = walk(model);
  for (std::int64_t c = 0; c < 6; ++c) zero_channel(all, 0, c);
  model->eval();
  const auto x = torch::randn({2, 3, 8, 8});
  const auto y = run(model, x);
  auto pruned = Pruner().prune(model);
  CHECK(pruned->named_parameters()["conv1.weight"].sizes() == std::vector<std::int64_t>{1, 3, 3, 3});
  CHECK(pruned->named_parameters()["conv2.weight"].size(1) == 1);
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);
}

TEST_CASE("Pruner on a model without zero channels is a reported no-op copy", "[pruner]") {
  torch::manual_seed(4);
  auto model = two_convs();
  const auto before = snapshot(*model);
  Pruner pruner;
  auto pruned = pruner.prune(model);
  CHECK_FALSE(pruner.report().changed());
  CHECK(pruner.report().channels_removed() == 0);
  CHECK(unchanged(before, *pruned));
  CHECK(pruned->is_training() == model->is_training());
  // A copy, not a view: changing it leaves the input alone.
  {
    torch::NoGradGuard no_grad;
    for (auto& t : pruned->parameters()) t.add_(1.0);
  }
  CHECK(unchanged(before, *model));
}

TEST_CASE("Pruner works on the nested VGG zoo and keeps torchvision's names", "[pruner][vgg]") {
  torch::manual_seed(5);
  auto model = models::vgg11_bn(10);
  randomize_batch_norms(*model);
  const auto zeroed = zero_smallest_filters(*model, 40.0);
  model->eval();
  const auto before = snapshot(*model);
  const auto x = torch::randn({1, 3, 32, 32});
  const auto y = run(model, x);
  Pruner pruner;
  auto pruned = pruner.prune(model);
  CHECK(unchanged(before, *model));
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);

  std::vector<std::string> names_before, names_after;
  for (const auto& p : model->named_parameters()) names_before.push_back(p.key());
  for (const auto& p : pruned->named_parameters()) names_after.push_back(p.key());
  CHECK(names_before == names_after);

  // Predicted count: VGG11's widths minus floor(40%) each, 3×3 kernels, bias and BN.
  const std::vector<std::int64_t> widths{64, 128, 256, 256, 512, 512, 512, 512};
  std::int64_t expected = 0, in = 3;
  for (std::size_t i = 0; i < widths.size(); ++i) {
    const std::int64_t out = widths[i] - zeroed[i];
    expected += in * out * 9 + out + 2 * out;
    in = out;
  }
  expected += in * 49 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10;
  CHECK(count_parameters(pruned) == expected);
  CHECK(pruner.report().layers.size() == widths.size());
}

TEST_CASE("Pruner keeps the channels that reach the model's output", "[pruner]") {
  torch::manual_seed(6);
  nn::Sequential model;
  model->push_back("conv1", nn::Conv2d(nn::Conv2dOptions(2, 4, 3).padding(1)));
  model->push_back("relu", nn::ReLU());
  model->push_back("conv2", nn::Conv2d(nn::Conv2dOptions(4, 3, 1)));
  const auto all = walk(model);
  zero_channel(all, 0, 2);
  zero_channel(all, 2, 1);  // an output channel of the model: must stay
  model->eval();
  const auto x = torch::randn({2, 2, 5, 5});
  const auto y = run(model, x);
  Pruner pruner;
  auto pruned = pruner.prune(model);
  CHECK(pruned->named_parameters()["conv1.weight"].size(0) == 3);
  CHECK(pruned->named_parameters()["conv2.weight"].sizes() == std::vector<std::int64_t>{3, 3, 1, 1});
  CHECK(pruner.report().layers[1].removed() == 0);
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);
}

TEST_CASE("Pruner refuses layers it cannot see through, naming them", "[pruner][errors]") {
  torch::manual_seed(7);
  auto with = [](auto layer) {
    nn::Sequential m;
    m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3).padding(1)));
    m->push_back("act", layer);
    m->push_back("conv2", nn::Conv2d(nn::Conv2dOptions(4, 4, 3).padding(1)));
    return m;
  };
  // sigmoid(0) = 0.5: a zero channel would not stay zero.
  auto sigmoid = with(nn::Sigmoid());
  const auto before = snapshot(*sigmoid);
  CHECK_THROWS_AS(Pruner().prune(sigmoid), argument_error);
  CHECK_THROWS_WITH(Pruner().prune(sigmoid),
                    Catch::Contains("'act'") && Catch::Contains("Sigmoid") &&
                        Catch::Contains("'conv'"));
  CHECK(unchanged(before, *sigmoid));

  auto dropout2d = with(nn::Dropout2d());
  CHECK_THROWS_WITH(Pruner().prune(dropout2d), Catch::Contains("'act'"));

  nn::Sequential grouped;
  grouped->push_back("conv", nn::Conv2d(nn::Conv2dOptions(4, 4, 3).groups(2)));
  CHECK_THROWS_WITH(Pruner().prune(grouped), Catch::Contains("'conv'") && Catch::Contains("grouped"));

  nn::Sequential linear_4d;  // a Linear without Flatten acts on the width, not the channels
  linear_4d->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3)));
  linear_4d->push_back("fc", nn::Linear(2, 2));
  CHECK_THROWS_WITH(Pruner().prune(linear_4d), Catch::Contains("'fc'"));

  nn::Sequential partial_flatten;
  partial_flatten->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3)));
  partial_flatten->push_back("flat", nn::Flatten(nn::FlattenOptions().start_dim(2)));
  CHECK_THROWS_WITH(Pruner().prune(partial_flatten), Catch::Contains("'flat'"));
}

TEST_CASE("Pruner keeps the dtype of the model", "[pruner]") {
  torch::manual_seed(8);
  auto model = two_convs();
  model->to(torch::kFloat64);
  const auto all = walk(model);
  zero_channel(all, 0, 0);
  zero_channel(all, 4, 5);
  model->eval();
  const auto x = torch::randn({2, 3, 8, 8}, torch::kFloat64);
  const auto y = run(model, x);
  auto pruned = Pruner().prune(model);
  for (const auto& p : pruned->parameters()) CHECK(p.scalar_type() == torch::kFloat64);
  CHECK(pruned->named_buffers()["bn1.num_batches_tracked"].scalar_type() == torch::kLong);
  CHECK(relative_error(run(pruned, x), y) <= 1e-12);
}
