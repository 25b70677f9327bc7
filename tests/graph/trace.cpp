// Tracing: the graph of users' own modules, its couplings, barriers and errors.

#include "catch.hpp"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include <fasterai/core/sequential.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>

namespace nn = torch::nn;
using namespace fasterai;

namespace {

struct ResidualNetImpl : nn::Module {
  nn::Conv2d stem{nullptr}, a{nullptr}, b{nullptr};
  nn::BatchNorm2d bn_stem{nullptr}, bn_a{nullptr}, bn_b{nullptr};
  nn::Linear fc{nullptr};
  ResidualNetImpl() {
    stem = register_module("stem", nn::Conv2d(nn::Conv2dOptions(3, 8, 3).padding(1).bias(false)));
    bn_stem = register_module("bn_stem", nn::BatchNorm2d(8));
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(8, 6, 3).padding(1).bias(false)));
    bn_a = register_module("bn_a", nn::BatchNorm2d(6));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(6, 8, 3).padding(1).bias(false)));
    bn_b = register_module("bn_b", nn::BatchNorm2d(8));
    fc = register_module("fc", nn::Linear(8 * 4 * 4, 5));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn_stem(stem(x)));
    auto y = bn_a(a(x));
    y.relu_();  // in place
    y = bn_b(b(y));
    x = torch::relu(x + y);
    x = torch::adaptive_avg_pool2d(x, {4, 4});
    return fc(torch::flatten(x, 1));
  }
};
TORCH_MODULE(ResidualNet);

std::int64_t node_of(const Graph& g, const std::string& module) {
  const auto n = g.nodes_of(module);
  REQUIRE(n.size() == 1);
  return n.front();
}

std::int64_t group_of(const Graph& g, const std::string& module) {
  const auto& node = g.nodes()[node_of(g, module)];
  return g.units()[g.units_of(node.output).front()].group;
}

}  // namespace

TEST_CASE("trace: a residual block couples the stream, a branch conv is its own group", "[graph]") {
  ResidualNet net;
  const Graph g = trace(net, torch::randn({2, 3, 8, 8}));
  INFO(g);
  CHECK(group_of(g, "stem") == group_of(g, "b"));  // added together: one residual stream
  CHECK(group_of(g, "a") != group_of(g, "stem"));
  const auto& stream = g.groups()[group_of(g, "stem")];
  CHECK(stream.producers == std::vector<std::string>{"b", "stem"});
  CHECK(stream.units.size() == 8);
  CHECK(g.groups()[group_of(g, "a")].units.size() == 6);
  // The channels of stem and b pair up one by one: unit k holds channel k of both.
  CHECK(g.units_of(g.nodes()[node_of(g, "stem")].output) == g.units_of(g.nodes()[node_of(g, "b")].output));
  // The Linear reads 16 features per channel of the stream.
  const auto& fc = g.nodes()[node_of(g, "fc")];
  CHECK(fc.kind == OpKind::Layer);
  CHECK(fc.rule->kind == "Linear");
  const auto fc_in = g.units_of(fc.inputs.front());
  REQUIRE(fc_in.size() == 128);
  for (int c = 0; c < 8; ++c)
    for (int k = 0; k < 16; ++k) CHECK(fc_in[c * 16 + k] == stream.units[c]);
  // The output (fc) and the input are held; nothing else is.
  CHECK(g.units()[g.units_of(fc.output).front()].fixed);
  CHECK_FALSE(g.units()[stream.units.front()].fixed);
  CHECK(g.untraced_layers().empty());
  CHECK(g.nodes()[node_of(g, "bn_a")].kind == OpKind::Norm);
}

TEST_CASE("trace: leaves the model as it was (modes, requires_grad, statistics)", "[graph]") {
  ResidualNet net;
  net->train();
  net->bn_a->eval();
  net->a->weight.set_requires_grad(false);
  const auto mean = net->bn_a->running_mean.clone();
  trace(net, torch::randn({2, 3, 8, 8}));
  CHECK(net->is_training());
  CHECK_FALSE(net->bn_a->is_training());
  CHECK(net->bn_b->is_training());
  CHECK_FALSE(net->a->weight.requires_grad());
  CHECK(net->b->weight.requires_grad());
  CHECK(torch::equal(net->bn_a->running_mean, mean));
  CHECK(net->bn_b->num_batches_tracked.item<std::int64_t>() == 0);
}

namespace {

struct ConcatNetImpl : nn::Module {
  nn::Conv2d a{nullptr}, b{nullptr}, dw{nullptr}, grouped{nullptr}, head{nullptr};
  ConcatNetImpl() {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(3, 4, 1)));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(3, 6, 3).padding(1)));
    dw = register_module("dw", nn::Conv2d(nn::Conv2dOptions(10, 10, 3).padding(1).groups(10)));
    grouped = register_module("grouped", nn::Conv2d(nn::Conv2dOptions(10, 4, 1).groups(2)));
    head = register_module("head", nn::Conv2d(nn::Conv2dOptions(4, 2, 1)));
  }
  torch::Tensor forward(torch::Tensor x) {
    auto y = torch::cat({a(x), b(x)}, 1);
    y = torch::relu6(dw(y));
    return head(grouped(y));
  }
};
TORCH_MODULE(ConcatNet);

}  // namespace

TEST_CASE("trace: cat offsets channels, depthwise couples in and out, grouped couples a group", "[graph]") {
  ConcatNet net;
  const Graph g = trace(net, torch::randn({1, 3, 5, 5}));
  INFO(g);
  const auto a = g.units_of(g.nodes()[node_of(g, "a")].output);
  const auto b = g.units_of(g.nodes()[node_of(g, "b")].output);
  const auto dw = g.units_of(g.nodes()[node_of(g, "dw")].output);
  const auto grouped_node = g.nodes()[node_of(g, "grouped")];
  const auto grouped = g.units_of(grouped_node.output);
  REQUIRE(dw.size() == 10);
  // The depthwise conv's channel c is channel c of the cat, which is a's or b's.
  for (int c = 0; c < 4; ++c) CHECK(dw[c] == a[c]);
  for (int c = 0; c < 6; ++c) CHECK(dw[4 + c] == b[c]);
  // ReLU6 keeps zeros (hardtanh between 0 and 6).
  // The grouped conv (2 groups of 5 inputs, 2 outputs): each group is one unit that swallows
  // its five input channels.
  CHECK(grouped[0] == grouped[1]);
  CHECK(grouped[2] == grouped[3]);
  CHECK(grouped[0] != grouped[2]);
  CHECK(grouped[0] == a[0]);
  CHECK(grouped[0] == b[0]);  // input channel 4 (b's first) is in the first group
  CHECK(grouped[2] == b[1]);
  CHECK(g.groups().size() >= 2);
  // The head's output is the model's output.
  CHECK(g.units()[g.units_of(g.output()).front()].fixed);
}

namespace {

struct FlipNetImpl : nn::Module {
  nn::Conv2d a{nullptr}, b{nullptr}, c{nullptr};
  FlipNetImpl() {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(3, 4, 1)));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(4, 4, 1)));
    c = register_module("c", nn::Conv2d(nn::Conv2dOptions(4, 2, 1)));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(a(x));
    return c(b(x).flip({1}));  // the channels reversed: an operation the graph does not know
  }
};
TORCH_MODULE(FlipNet);

// Channels moved and moved back: NCHW -> NHWC (a Linear on the channels there) -> NCHW.
struct ChannelsLastNetImpl : nn::Module {
  nn::Conv2d a{nullptr}, c{nullptr};
  nn::Linear mix{nullptr};
  ChannelsLastNetImpl() {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(3, 4, 1)));
    mix = register_module("mix", nn::Linear(4, 6));
    c = register_module("c", nn::Conv2d(nn::Conv2dOptions(6, 2, 1)));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(a(x)).permute({0, 2, 3, 1});
    x = torch::relu(mix(x)).transpose(1, 3).transpose(2, 3);
    return c(x);
  }
};
TORCH_MODULE(ChannelsLastNet);

struct SharedNetImpl : nn::Module {
  nn::Conv2d a{nullptr}, shared{nullptr}, b{nullptr};
  SharedNetImpl() {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(3, 4, 1)));
    shared = register_module("shared", nn::Conv2d(nn::Conv2dOptions(4, 4, 3).padding(1)));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(4, 2, 1)));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(a(x));
    x = torch::relu(shared(x));
    return b(shared(x));
  }
};
TORCH_MODULE(SharedNet);

}  // namespace

TEST_CASE("trace: permutes and transposes carry the channels where they go", "[graph]") {
  ChannelsLastNet net;
  const Graph g = trace(net, torch::randn({2, 3, 5, 7}));
  INFO(g);
  CHECK(g.barriers().size() == 1);  // the model's output only
  const auto& mix = g.nodes()[node_of(g, "mix")];  // on [N·H·W, C]: matmul, then its bias
  CHECK(mix.rule->kind == "Linear");
  CHECK(g.units_of(mix.inputs.front()) == g.units_of(g.nodes()[node_of(g, "a")].output));
  const auto& c = g.nodes()[node_of(g, "c")];
  CHECK(g.values()[c.inputs.front()].channel_dim == 1);
  CHECK(g.units_of(c.inputs.front()) == g.units_of(mix.output));
  CHECK_FALSE(g.units()[g.units_of(mix.output).front()].fixed);
}

TEST_CASE("trace: one channel of a batch of one, flattened, still reaches the Linear as its features", "[graph]") {
  // [1, 1, 1, 1] -> [1, 1] fits the channels on either dimension: they stay on dimension 1, so
  // the Linear is a layer (counted, prunable), not a barrier.
  nn::Sequential net(nn::Conv2d(nn::Conv2dOptions(2, 1, 3)), nn::AdaptiveAvgPool2d(1), nn::Flatten(),
                     nn::Linear(1, 4));
  for (const std::int64_t batch : {1, 2}) {
    INFO("batch " << batch);
    const Graph g = trace(*net, torch::randn({batch, 2, 5, 5}));
    INFO(g);
    const auto& fc = g.nodes()[node_of(g, "3")];
    CHECK(fc.kind == OpKind::Layer);
    CHECK(g.values()[fc.inputs.front()].channel_dim == 1);
    CHECK(g.units_of(fc.inputs.front()) == g.units_of(g.nodes()[node_of(g, "0")].output));
  }
  CHECK(fasterai::detail::map_view({1, 1, 1, 1}, 1, 1, 1, {1, 1}).dim == 1);
  CHECK(fasterai::detail::map_view({1, 1, 3, 3}, 1, 1, 1, {1, 9}).block == 9);
  CHECK(fasterai::detail::map_view({2, 1, 1, 1}, 1, 1, 1, {2, 1}).dim == 1);
}

TEST_CASE("trace: an operation it does not know is a barrier that names what it protects", "[graph]") {
  FlipNet net;
  const Graph g = trace(net, torch::randn({1, 3, 4, 4}));
  INFO(g);
  const auto barrier = std::find_if(g.barriers().begin(), g.barriers().end(),
                                    [](const GraphBarrier& b) { return b.op == "FlipBackward0"; });
  REQUIRE(barrier != g.barriers().end());
  CHECK(std::find(barrier->layers.begin(), barrier->layers.end(), "b") != barrier->layers.end());
  CHECK(g.units()[g.units_of(g.nodes()[node_of(g, "b")].output).front()].fixed);
  CHECK_FALSE(g.units()[g.units_of(g.nodes()[node_of(g, "a")].output).front()].fixed);
}

TEST_CASE("trace: a module called twice couples its inputs and its outputs", "[graph]") {
  SharedNet net;
  const Graph g = trace(net, torch::randn({1, 3, 4, 4}));
  INFO(g);
  const auto calls = g.nodes_of("shared");
  REQUIRE(calls.size() == 2);
  // First call reads a's channels and writes shared's; the second reads shared's: all one.
  const auto a = g.units_of(g.nodes()[node_of(g, "a")].output);
  const auto out = g.units_of(g.nodes()[calls[0]].output);
  CHECK(a == out);
  CHECK(g.units_of(g.nodes()[calls[1]].output) == out);
}

TEST_CASE("trace: clear errors when tracing cannot work", "[graph][errors]") {
  ResidualNet net;
  const auto x = torch::randn({2, 3, 8, 8});
  {
    torch::NoGradGuard no_grad;
    CHECK_THROWS_WITH(trace(net, x), Catch::Contains("NoGradGuard"));
  }
  {
    c10::InferenceMode inference;
    CHECK_THROWS_WITH(trace(net, x), Catch::Contains("InferenceMode"));
  }
  CHECK_THROWS_WITH(trace(net, torch::randn({2, 5, 8, 8})),
                    Catch::Contains("forward failed") && Catch::Contains("[2, 5, 8, 8]"));
  CHECK_THROWS_WITH(trace(net, torch::Tensor()), Catch::Contains("'example'"));
  struct ConstantImpl : nn::Module {
    torch::Tensor forward(torch::Tensor x) { return torch::zeros_like(x); }
  };
  auto constant = std::make_shared<ConstantImpl>();
  CHECK_THROWS_WITH(trace(*constant, x), Catch::Contains("does not depend"));
  struct NoParametersImpl : nn::Module {
    torch::Tensor forward(torch::Tensor x) { return torch::relu(x) * 2; }
  };
  auto parameter_free = std::make_shared<NoParametersImpl>();
  CHECK_THROWS_WITH(trace(*parameter_free, x), Catch::Contains("reaches none of its parameters"));
  // The model is usable afterwards and unchanged in mode.
  CHECK(net->is_training());
  CHECK(net->forward(x).sizes() == std::vector<std::int64_t>{2, 5});
}

TEST_CASE("graph_of a Sequential agrees with its trace: same groups, same units", "[graph]") {
  torch::manual_seed(3);
  fasterai::NamedSequential stage;
  stage->push_back("0", nn::Conv2d(nn::Conv2dOptions(3, 6, 3).padding(1)));
  stage->push_back("1", nn::BatchNorm2d(6));
  stage->push_back("2", nn::ReLU());
  stage->push_back("3", nn::MaxPool2d(2));
  stage->push_back("4", nn::Conv2d(nn::Conv2dOptions(6, 8, 3).padding(1).groups(2)));
  stage->push_back("5", nn::ReLU());
  nn::Sequential model;
  model->push_back("features", stage);
  model->push_back("pool", nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions({2, 2})));
  model->push_back("flatten", nn::Flatten());
  model->push_back("fc", nn::Linear(32, 7));
  model->push_back("relu", nn::ReLU());
  model->push_back("dropout", nn::Dropout(0.5));
  model->push_back("head", nn::Linear(7, 3));
  const Graph stat = graph_of(model);
  const Graph traced = trace(model, torch::randn({2, 3, 8, 8}));
  INFO("static:\n" << stat << "traced:\n" << traced);
  auto summary = [](const Graph& g) {
    std::vector<std::pair<std::vector<std::string>, std::size_t>> out;
    for (const auto& group : g.groups())
      if (!group.producers.empty()) out.emplace_back(group.producers, group.units.size());
    std::sort(out.begin(), out.end());
    return out;
  };
  CHECK(summary(stat) == summary(traced));
  // The Linear reads 4 features per channel in both.
  for (const Graph* g : {&stat, &traced}) {
    const auto& fc = g->nodes()[g->nodes_of("fc").front()];
    CHECK(g->values()[fc.inputs.front()].channels() == 32);
    const auto conv = g->units_of(g->nodes()[g->nodes_of("features.4").front()].output);
    CHECK(g->units_of(fc.inputs.front())[5] == conv[1]);
  }
}
