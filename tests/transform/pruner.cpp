#include "catch.hpp"

#include <algorithm>
#include <sstream>
#include <type_traits>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

#include "transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

// `prune` (a pruned copy) takes Sequential-like models; `prune_` any module (see pruner_any).
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
  REQUIRE(report.layers.size() == 3);  // conv1, conv2 and fc (whose outputs are the model's)
  CHECK(report.layers[2].removed() == 0);
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
  CHECK(pruner.report().layers.size() == widths.size() + 3);  // and the classifier's Linears
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

TEST_CASE("Pruner keeps the channels around layers it cannot see through, naming them", "[pruner]") {
  torch::manual_seed(7);
  auto with = [](auto layer) {
    nn::Sequential m;
    m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3).padding(1)));
    m->push_back("act", layer);
    m->push_back("conv2", nn::Conv2d(nn::Conv2dOptions(4, 4, 3).padding(1)));
    m->push_back("relu", nn::ReLU());
    m->push_back("conv3", nn::Conv2d(nn::Conv2dOptions(4, 2, 3).padding(1)));
    return m;
  };
  auto check_barrier = [](nn::Sequential m, const std::string& what) {
    INFO(what);
    const auto all = walk(m);
    zero_channel(all, 0, 1);  // held by the barrier after 'conv'
    zero_channel(all, 2, 3);  // free: conv2 -> ReLU -> conv3
    const auto x = torch::randn({2, 3, 6, 6});
    const auto y = run(m, x);
    const auto before = snapshot(*m);
    Pruner pruner;
    auto pruned = pruner.prune(m);
    CHECK(unchanged(before, *m));
    CHECK(pruner.report().layers[0].removed() == 0);
    CHECK(pruner.report().layers[1].removed() == 1);
    CHECK(relative_error(run(pruned, x), y) <= 1e-5);
    const auto& barriers = pruner.report().barriers;
    const bool named = std::any_of(barriers.begin(), barriers.end(), [&](const GraphBarrier& b) {
      return b.op.find(what) != std::string::npos &&
             std::find(b.layers.begin(), b.layers.end(), "conv") != b.layers.end();
    });
    CHECK(named);
  };
  // sigmoid(0) = 0.5: a zero channel would not stay zero. Dropout2d drops whole channels.
  check_barrier(with(nn::Sigmoid()), "Sigmoid");
  check_barrier(with(nn::Dropout2d()), "Dropout2d");

  // A Linear without Flatten acts on the width, not the channels; a partial Flatten does not
  // lay channels out as blocks.
  for (auto kind : {0, 1}) {
    nn::Sequential m;
    m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3)));
    if (kind == 0)
      m->push_back("fc", nn::Linear(2, 2));
    else
      m->push_back("flat", nn::Flatten(nn::FlattenOptions().start_dim(2)));
    zero_channel(walk(m), 0, 1);
    Pruner pruner;
    pruner.prune(m);
    CHECK(pruner.report().layers[0].removed() == 0);
    const auto& b = pruner.report().barriers.front();
    CHECK(b.op.find(kind == 0 ? "Linear" : "Flatten") != std::string::npos);
    CHECK(b.layers == std::vector<std::string>{"conv"});
  }
}

TEST_CASE("Pruner removes whole groups of grouped and depthwise convolutions", "[pruner]") {
  torch::manual_seed(17);
  nn::Sequential m;
  m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 8, 3).padding(1)));
  m->push_back("bn", nn::BatchNorm2d(8));
  m->push_back("relu", nn::ReLU());
  m->push_back("dw", nn::Conv2d(nn::Conv2dOptions(8, 8, 3).padding(1).groups(8)));
  m->push_back("bn_dw", nn::BatchNorm2d(8));
  m->push_back("grouped", nn::Conv2d(nn::Conv2dOptions(8, 4, 1).groups(4)));
  m->push_back("relu2", nn::ReLU());
  m->push_back("head", nn::Conv2d(nn::Conv2dOptions(4, 2, 1)));
  randomize_batch_norms(*m);
  m->eval();
  const auto all = walk(m);
  // Group 1 of `grouped` reads channels 2 and 3: zero everything feeding it and its output.
  for (auto c : {2, 3}) zero_channel(all, 0, c), zero_channel(all, 3, c);
  zero_channel(all, 5, 1);
  const auto x = torch::randn({2, 3, 6, 6});
  const auto y = run(m, x);
  Pruner pruner;
  auto pruned = pruner.prune(m);
  const auto params = pruned->named_parameters();
  CHECK(params["conv.weight"].size(0) == 6);
  CHECK(params["dw.weight"].sizes() == std::vector<std::int64_t>{6, 1, 3, 3});
  CHECK(params["grouped.weight"].sizes() == std::vector<std::int64_t>{3, 2, 1, 1});
  CHECK(params["head.weight"].sizes() == std::vector<std::int64_t>{2, 3, 1, 1});
  const auto* dw = walk(pruned)[3].as<nn::Conv2dImpl>();
  CHECK(dw->options.groups() == 6);
  CHECK(dw->options.in_channels() == 6);
  CHECK(walk(pruned)[5].as<nn::Conv2dImpl>()->options.groups() == 3);
  CHECK(relative_error(run(pruned, x), y) <= 1e-5);
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
  // Whatever the model holds, even a counter that Module::to converted.
  CHECK(pruned->named_buffers()["bn1.num_batches_tracked"].scalar_type() ==
        model->named_buffers()["bn1.num_batches_tracked"].scalar_type());
  CHECK(relative_error(run(pruned, x), y) <= 1e-12);
}

// ---- Users' own modules, in place --------------------------------------------------------

namespace {

// Two residual blocks on one stream (8 channels), a branch of 6 channels inside each, a
// flatten into the classifier: the shape of a small ResNet.
struct StageImpl : nn::Cloneable<StageImpl> {
  nn::Conv2d stem{nullptr}, a1{nullptr}, b1{nullptr}, a2{nullptr}, b2{nullptr};
  nn::BatchNorm2d bn_stem{nullptr}, bn_a1{nullptr}, bn_b1{nullptr}, bn_a2{nullptr}, bn_b2{nullptr};
  nn::Linear fc{nullptr};
  bool flip = false;  // the channels reversed after block 1: an operation the graph does not know
  explicit StageImpl(bool with_flip = false) : flip(with_flip) { reset(); }
  void reset() override {
    auto conv = [&](const char* name, std::int64_t in, std::int64_t out) {
      return register_module(name, nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1).bias(false)));
    };
    auto bn = [&](const char* name, std::int64_t n) { return register_module(name, nn::BatchNorm2d(n)); };
    stem = conv("stem", 3, 8), bn_stem = bn("bn_stem", 8);
    a1 = conv("a1", 8, 6), bn_a1 = bn("bn_a1", 6), b1 = conv("b1", 6, 8), bn_b1 = bn("bn_b1", 8);
    a2 = conv("a2", 8, 6), bn_a2 = bn("bn_a2", 6), b2 = conv("b2", 6, 8), bn_b2 = bn("bn_b2", 8);
    fc = register_module("fc", nn::Linear(8 * 2 * 2, 4));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn_stem(stem(x)));
    x = torch::relu(x + bn_b1(b1(torch::relu(bn_a1(a1(x))))));
    if (flip) x = x.flip({1});
    x = torch::relu(x + bn_b2(b2(torch::relu(bn_a2(a2(x))))));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {2, 2}), 1));
  }
};
TORCH_MODULE(Stage);

// Zero output channel c of a conv and its BatchNorm, as filter sparsification does.
void zero(nn::Conv2d& conv, nn::BatchNorm2d& bn, std::int64_t c) {
  torch::NoGradGuard no_grad;
  conv->weight[c].zero_();
  bn->weight[c].zero_();
  bn->bias[c].zero_();
}

}  // namespace

TEST_CASE("prune_ removes a residual stream's channel from every member, in place", "[pruner][graph]") {
  torch::manual_seed(21);
  Stage net;
  randomize_batch_norms(*net);
  net->eval();
  const auto x = torch::randn({2, 3, 8, 8});
  // Channel 5 of the stream: zero in all three writers; channel 2 only in stem (still alive
  // through b1 and b2: must stay); channel 1 of branch a1.
  zero(net->stem, net->bn_stem, 5), zero(net->b1, net->bn_b1, 5), zero(net->b2, net->bn_b2, 5);
  zero(net->stem, net->bn_stem, 2);
  zero(net->a1, net->bn_a1, 1);
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = net->forward(x);
  }
  auto* stem_before = net->stem.get();
  const auto weight_impl = net->stem->weight.unsafeGetTensorImpl();
  const PruneReport report = Pruner().prune_(net, x);
  // The user's holders still point at the same modules and parameters.
  CHECK(net->stem.get() == stem_before);
  CHECK(net->stem->weight.unsafeGetTensorImpl() == weight_impl);
  CHECK(net->named_parameters()["stem.weight"].unsafeGetTensorImpl() == weight_impl);
  // Every member of the stream lost channel 5, and only it.
  for (auto* conv : {&net->stem, &net->b1, &net->b2}) CHECK((*conv)->weight.size(0) == 7);
  for (auto* conv : {&net->a1, &net->a2}) CHECK((*conv)->weight.size(1) == 7);
  CHECK(net->a1->weight.size(0) == 5);
  CHECK(net->b1->weight.size(1) == 5);
  CHECK(net->bn_stem->running_mean.size(0) == 7);
  CHECK(net->bn_a1->options.num_features() == 5);
  CHECK(net->fc->weight.size(1) == 28);
  CHECK(net->fc->options.in_features() == 28);
  CHECK(net->stem->options.out_channels() == 7);
  CHECK(net->b1->options.in_channels() == 5);
  std::int64_t stem_constant = 0;
  for (const auto& l : report.layers)
    if (l.name == "stem") stem_constant = l.constant_channels;
  CHECK(stem_constant == 1);  // channel 2: a zero filter the stream still fills
  torch::NoGradGuard no_grad;
  CHECK(relative_error(net->forward(x), y) <= 1e-5);
  // clone() rebuilds every module from its options: they agree with the weights.
  auto copy = std::dynamic_pointer_cast<StageImpl>(net->clone());
  CHECK(relative_error(copy->forward(x), y) <= 1e-5);
  std::ostringstream printed;
  printed << *net->stem;
  CHECK(printed.str().find("Conv2d(3, 7") != std::string::npos);
}

TEST_CASE("prune_ stops at an operation it does not know and names it", "[pruner][graph]") {
  torch::manual_seed(22);
  Stage net(/*with_flip=*/true);
  randomize_batch_norms(*net);
  net->eval();
  const auto x = torch::randn({2, 3, 8, 8});
  zero(net->stem, net->bn_stem, 5), zero(net->b1, net->bn_b1, 5), zero(net->b2, net->bn_b2, 5);
  zero(net->a1, net->bn_a1, 1);
  zero(net->a2, net->bn_a2, 3);
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = net->forward(x);
  }
  const PruneReport report = Pruner().prune_(net, x);
  // The stream crosses the flip: kept. The branches do not: pruned.
  CHECK(net->stem->weight.size(0) == 8);
  CHECK(net->b2->weight.size(0) == 8);
  CHECK(net->a1->weight.size(0) == 5);
  CHECK(net->a2->weight.size(0) == 5);
  const auto barrier = std::find_if(report.barriers.begin(), report.barriers.end(),
                                    [](const GraphBarrier& b) { return b.op == "FlipBackward0"; });
  REQUIRE(barrier != report.barriers.end());
  CHECK(std::find(barrier->layers.begin(), barrier->layers.end(), "stem") != barrier->layers.end());
  torch::NoGradGuard no_grad;
  CHECK(relative_error(net->forward(x), y) <= 1e-5);
}

TEST_CASE("prune_ refuses what it cannot trace, leaving the model as it was", "[pruner][errors]") {
  torch::manual_seed(23);
  Stage net;
  zero(net->a1, net->bn_a1, 1);
  const auto before = snapshot(*net);
  {
    torch::NoGradGuard no_grad;
    CHECK_THROWS_WITH(Pruner().prune_(net, torch::randn({1, 3, 8, 8})), Catch::Contains("NoGradGuard"));
  }
  CHECK_THROWS_WITH(Pruner().prune_(net, torch::randn({1, 4, 8, 8})),
                    Catch::Contains("forward failed") && Catch::Contains("[1, 4, 8, 8]"));
  CHECK(unchanged(before, *net));
  // A model without Conv2d or Linear has nothing to prune: a reported no-op.
  struct ScaleImpl : nn::Module {
    torch::Tensor w;
    ScaleImpl() { w = register_parameter("w", torch::ones({1})); }
    torch::Tensor forward(torch::Tensor x) { return torch::relu(x) * w; }
  };
  auto scale = std::make_shared<ScaleImpl>();
  const PruneReport report = Pruner().prune_(*scale, torch::randn({1, 3, 4, 4}));
  CHECK(report.layers.empty());
  CHECK_FALSE(report.changed());
}

TEMPLATE_TEST_CASE("the zoo: sparsified, pruned in place and folded, with unchanged outputs",
                   "[pruner][graph][zoo]", models::ResNet, models::MobileNetV2) {
  torch::manual_seed(24);
  std::vector<TestType> nets;
  if constexpr (std::is_same_v<TestType, models::ResNet>)
    nets = {models::resnet18(10), models::resnet50(10)};
  else
    nets = {models::mobilenet_v2(10)};
  for (auto& net : nets) {
    randomize_batch_norms(*net);
    net->eval();
    const auto x = torch::randn({2, 3, 64, 64});
    const auto parameters = count_parameters(net);
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(net, x, SparsifierOptions(30));
    sparsifier.prune(30);
    torch::Tensor masked;
    {
      torch::NoGradGuard no_grad;
      masked = net->forward(x);
    }
    const PruneReport report = Pruner().prune_(net, x);
    CHECK(report.changed());
    CHECK(count_parameters(net) < parameters * 3 / 4);
    BNFolder().fold_(net, x);
    torch::NoGradGuard no_grad;
    const double error = relative_error(net->forward(x), masked);
    INFO(count_parameters(net) << " parameters left of " << parameters << "; error " << error);
    CHECK(error <= 1e-5);
  }
}
