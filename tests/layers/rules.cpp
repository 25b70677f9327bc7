// Layer rules: the built-in kinds answer for their modules, a user's own layer kind is a barrier
// until registered and is then traced, pruned and resized through its rule.
#include "catch.hpp"

#include <cstdint>
#include <string>

#include <torch/torch.h>

#include <fasterai/graph/macs.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/layers/registry.hpp>
#include <fasterai/transform/pruner.hpp>

using namespace fasterai;
namespace nn = torch::nn;

namespace {

// A user's layer kind: a Linear whose rows are scaled by a learned per-output factor.
struct ScaledLinearImpl : nn::Module {
  std::int64_t in_features, out_features;
  torch::Tensor weight, bias, scale;
  ScaledLinearImpl(std::int64_t in, std::int64_t out) : in_features(in), out_features(out) {
    weight = register_parameter("weight", torch::randn({out, in}) / std::sqrt(double(in)));
    bias = register_parameter("bias", 0.1 * torch::randn({out}));
    scale = register_parameter("scale", 1.0 + 0.1 * torch::randn({out}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    TORCH_CHECK(x.size(-1) == in_features, "ScaledLinear: expected ", in_features, " features");
    return torch::addmm(bias, x, (weight * scale.unsqueeze(1)).t());
  }
};
TORCH_MODULE(ScaledLinear);

struct NetImpl : nn::Module {
  nn::Linear fc1{nullptr}, head{nullptr};
  ScaledLinear custom{nullptr};
  NetImpl() {
    fc1 = register_module("fc1", nn::Linear(6, 8));
    custom = register_module("custom", ScaledLinear(8, 5));
    head = register_module("head", nn::Linear(5, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(custom(torch::relu(fc1(x))))); }
};
TORCH_MODULE(Net);

LayerRule scaled_linear_rule() {
  LayerRule rule;
  rule.kind = "ScaledLinear";
  rule.role = LayerRole::Producer;
  rule.channel_dim = -1;
  // A zero row and bias make a zero output whatever the scale: the scale does not decide.
  rule.tensors = {{"weight", 0, 1}, {"bias", 0, -1}, {"scale", 0, -1, false}};
  rule.set_widths = [](nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t) {
    auto& layer = dynamic_cast<ScaledLinearImpl&>(m);
    layer.out_features = out, layer.in_features = in;
  };
  rule.macs = [](const nn::Module& m, const std::vector<std::int64_t>&, const std::vector<std::int64_t>& out) {
    return out.front() * dynamic_cast<const ScaledLinearImpl&>(m).weight.numel();
  };
  return rule;
}

}  // namespace

TEST_CASE("layer rules: the built-in kinds", "[layers]") {
  CHECK(rule_of(*nn::Conv2d(nn::Conv2dOptions(3, 4, 3)))->kind == "Conv2d");
  CHECK(rule_of(*nn::Conv1d(nn::Conv1dOptions(3, 4, 3)))->kind == "Conv1d");
  CHECK(rule_of(*nn::Linear(3, 4))->kind == "Linear");
  CHECK(rule_of(*nn::BatchNorm2d(4))->role == LayerRole::Norm);
  CHECK(rule_of(*nn::GroupNorm(nn::GroupNormOptions(2, 4)))->kind == "GroupNorm");
  CHECK(rule_of(*nn::LayerNorm(nn::LayerNormOptions({4})))->role == LayerRole::Normalizing);
  CHECK(rule_of(*nn::Embedding(10, 4))->kind == "Embedding");
  CHECK(rule_of(*nn::MultiheadAttention(8, 2))->role == LayerRole::Producer);
  CHECK(rule_of(*nn::MultiheadAttention(8, 2))->tied_widths);
  // Not understood: a LayerNorm over two dimensions, a grouped transposed convolution, a ReLU,
  // an attention with separate key/value widths or learned key/value biases.
  CHECK(rule_of(*nn::LayerNorm(nn::LayerNormOptions({4, 4}))) == nullptr);
  CHECK(rule_of(*nn::ConvTranspose2d(nn::ConvTranspose2dOptions(4, 4, 3).groups(2))) == nullptr);
  CHECK(rule_of(*nn::ReLU()) == nullptr);
  CHECK(rule_of(*nn::MultiheadAttention(nn::MultiheadAttentionOptions(8, 2).kdim(4))) == nullptr);
  CHECK(rule_of(*nn::MultiheadAttention(nn::MultiheadAttentionOptions(8, 2).add_bias_kv(true))) == nullptr);
  // The zero test follows the tensors: a zero row and bias, or γ = β = 0.
  nn::Linear linear(3, 4);
  nn::BatchNorm1d bn(4), plain(nn::BatchNorm1dOptions(4).affine(false));
  {
    torch::NoGradGuard no_grad;
    linear->weight[1].zero_();
    linear->bias[1].zero_();
    linear->weight[2].zero_();  // its bias is not zero
    bn->weight[3].zero_();
    bn->bias[3].zero_();
  }
  CHECK(fasterai::detail::zero_outputs(*rule_of(*linear), *linear, 4) == std::vector<char>{0, 1, 0, 0});
  CHECK(fasterai::detail::zero_outputs(*rule_of(*bn), *bn, 4) == std::vector<char>{0, 0, 0, 1});
  CHECK(fasterai::detail::zero_outputs(*rule_of(*plain), *plain, 4) == std::vector<char>{0, 0, 0, 0});
}

TEST_CASE("layer rules: a user's layer kind is a barrier until registered, then pruned through its rule",
          "[layers][pruner]") {
  torch::manual_seed(1);
  Net net;
  net->eval();
  const auto x = torch::randn({4, 6});
  {
    torch::NoGradGuard no_grad;
    net->fc1->weight[2].zero_();  // read by the custom layer
    net->fc1->bias[2].zero_();
    net->custom->weight[1].zero_();  // read by the head
    net->custom->bias[1].zero_();
  }
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = net->forward(x);
  }
  {
    INFO("unregistered");
    const Graph g = trace(net, x);
    INFO(g);
    const auto nodes = g.nodes_of("custom");
    REQUIRE(nodes.size() == 1);
    CHECK(g.nodes()[nodes.front()].kind == OpKind::Barrier);
    const auto snapshot = net->custom->weight.clone();
    const auto report = Pruner().prune_(net, x);
    CHECK_FALSE(report.changed());  // fc1's zero channel is read by the barrier: kept
    CHECK(torch::equal(net->custom->weight, snapshot));
  }
  register_layer<ScaledLinearImpl>(scaled_linear_rule());
  REQUIRE(rule_of(*net->custom)->kind == "ScaledLinear");
  const auto macs = count_macs(net, {6}).total();
  CHECK(macs == 6 * 8 + 8 * 5 + 5 * 3);
  const auto report = Pruner().prune_(net, x);
  CHECK(report.channels_removed() == 2);
  CHECK(net->fc1->weight.size(0) == 7);
  CHECK(net->custom->weight.sizes() == torch::IntArrayRef({4, 7}));
  CHECK(net->custom->scale.size(0) == 4);
  CHECK(net->custom->in_features == 7);
  CHECK(net->custom->out_features == 4);
  CHECK(net->head->weight.size(1) == 4);
  CHECK(count_macs(net, {6}).total() == 6 * 7 + 7 * 4 + 4 * 3);
  torch::NoGradGuard no_grad;
  CHECK((net->forward(x) - before).abs().max().item<double>() <= 1e-5 * before.abs().max().item<double>());
}

TEST_CASE("layer rules: a rule that cannot work is refused at registration", "[layers][errors]") {
  LayerRule no_widths = scaled_linear_rule();
  no_widths.set_widths = nullptr;
  CHECK_THROWS_WITH(register_layer<ScaledLinearImpl>(no_widths), Catch::Contains("ScaledLinear") &&
                                                                    Catch::Contains("set_widths"));
  LayerRule no_tensors = scaled_linear_rule();
  no_tensors.tensors.clear();
  CHECK_THROWS_WITH(register_layer<ScaledLinearImpl>(no_tensors), Catch::Contains("weight"));
}
