#include "catch.hpp"

#include <fasterai/train/regularizer.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;

namespace {

void set(torch::Tensor t, std::vector<float> values) {
  torch::NoGradGuard no_grad;
  t.copy_(torch::tensor(values).reshape(t.sizes()));
}

// conv(1→2, 1×1) → BN(2) → ReLU → conv(2→3, 1×1): the first conv's two channels are removable
// units; the last conv's are the model's output (kept).
torch::nn::Sequential conv_bn() {
  using namespace torch::nn;
  Sequential m(Conv2d(Conv2dOptions(1, 2, 1)), BatchNorm2d(2), ReLU(), Conv2d(Conv2dOptions(2, 3, 1)));
  set(m[0]->as<Conv2d>()->weight, {3, 0});
  set(m[0]->as<Conv2d>()->bias, {4, 0});
  set(m[1]->as<BatchNorm2d>()->weight, {12, 3});
  set(m[1]->as<BatchNorm2d>()->bias, {0, 4});
  set(m[3]->as<Conv2d>()->weight, {1, -2, 3, -4, 5, -6});
  set(m[3]->as<Conv2d>()->bias, {0.5, -0.5, 1});
  return m;
}

// Two convolutions added into one stream, read by a third: each channel of the sum is one unit
// made by both.
struct ResidualImpl : torch::nn::Module {
  torch::nn::Conv2d a{nullptr}, b{nullptr}, head{nullptr};
  ResidualImpl() {
    using namespace torch::nn;
    a = register_module("a", Conv2d(Conv2dOptions(1, 2, 1).bias(false)));
    b = register_module("b", Conv2d(Conv2dOptions(1, 2, 1).bias(false)));
    head = register_module("head", Conv2d(Conv2dOptions(2, 3, 1).bias(false)));
  }
  torch::Tensor forward(torch::Tensor x) { return head(torch::relu(a(x) + b(x))); }
};
TORCH_MODULE(Residual);

}  // namespace

TEST_CASE("L1: the sum of |w| over the selected layers, gradient sign(w)", "[regularizer]") {
  auto m = conv_bn();
  SparsityPenalty conv_only(m, Penalty::L1);
  CHECK(conv_only.layer_names() == std::vector<std::string>{"0", "3"});
  // |3| + |0| + (1 + 2 + 3 + 4 + 5 + 6): biases and norms are not weights.
  CHECK(conv_only().item<double>() == 24.0);
  conv_only().backward();
  CHECK(torch::equal(m[0]->as<torch::nn::Conv2d>()->weight.grad().flatten(), torch::tensor({1.0f, 0.0f})));
  CHECK(torch::equal(m[3]->as<torch::nn::Conv2d>()->weight.grad().flatten(),
                     torch::tensor({1.0f, -1.0f, 1.0f, -1.0f, 1.0f, -1.0f})));
  CHECK(!m[0]->as<torch::nn::Conv2d>()->bias.grad().defined());

  SparsityPenalty first(m, Penalty::L1, PenaltyOptions().exclude({"3"}));
  CHECK(first().item<double>() == 3.0);

  auto mlp = fixtures::mlp(4, 3);
  CHECK_THROWS_WITH(SparsityPenalty(mlp, Penalty::L1), Contains("model") && Contains("include_linear"));
  double expected = 0;
  for (const auto& p : mlp->named_parameters())
    if (p.key().ends_with("weight")) expected += p.value().abs().sum().item<double>();
  CHECK(SparsityPenalty(mlp, Penalty::L1, PenaltyOptions().include_linear(true))().item<double>() ==
        Approx(expected).epsilon(1e-6));
}

TEST_CASE("GroupLasso: Σ over removable units of the norm of everything the unit's removal zeroes",
          "[regularizer]") {
  auto m = conv_bn();
  SparsityPenalty group_lasso(m, Penalty::GroupLasso);
  CHECK(group_lasso.units() == 2);  // the output conv's channels are the model's output
  CHECK(group_lasso.layer_names() == std::vector<std::string>{"0"});
  // unit 0: √(3² + 4² + 12² + 0²) = 13; unit 1: √(0² + 0² + 3² + 4²) = 5.
  CHECK(group_lasso().item<double>() == Approx(18.0).epsilon(1e-7));
  CHECK(torch::allclose(group_lasso.unit_norms(), torch::tensor({13.0f, 5.0f})));
  group_lasso().backward();
  // d‖θ_u‖/dθ = θ/‖θ_u‖
  auto conv = m[0]->as<torch::nn::Conv2d>();
  auto bn = m[1]->as<torch::nn::BatchNorm2d>();
  CHECK(torch::allclose(conv->weight.grad().flatten(), torch::tensor({3.0f / 13, 0.0f})));
  CHECK(torch::allclose(conv->bias.grad(), torch::tensor({4.0f / 13, 0.0f})));
  CHECK(torch::allclose(bn->weight.grad(), torch::tensor({12.0f / 13, 3.0f / 5})));
  CHECK(torch::allclose(bn->bias.grad(), torch::tensor({0.0f, 4.0f / 5})));
  CHECK(!m[3]->as<torch::nn::Conv2d>()->weight.grad().defined());  // its units are kept: no penalty

  // A unit that is already zero adds 0 and gets a zero gradient, not NaN (√ at 0).
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  set(bn->weight, {12, 0});
  set(bn->bias, {0, 0});
  CHECK(group_lasso().item<double>() == Approx(13.0).epsilon(1e-7));
  group_lasso().backward();
  CHECK(bn->weight.grad()[1].item<float>() == 0.0f);
  CHECK(bn->bias.grad()[1].item<float>() == 0.0f);
  CHECK(conv->weight.grad().isfinite().all().item<bool>());
}

TEST_CASE("GroupLasso on a traced model: a residual channel is one unit of every conv writing it",
          "[regularizer]") {
  Residual m;
  set(m->a->weight, {1, 2});
  set(m->b->weight, {2, 0});
  SparsityPenalty group_lasso(m, torch::ones({1, 1, 2, 2}), Penalty::GroupLasso);
  CHECK(group_lasso.units() == 2);
  // unit 0: √(1² + 2²), unit 1: √(2² + 0²)
  CHECK(group_lasso().item<double>() == Approx(std::sqrt(5.0) + 2.0).epsilon(1e-7));
  group_lasso().backward();
  CHECK(torch::allclose(m->a->weight.grad().flatten(), torch::tensor({float(1 / std::sqrt(5.0)), 1.0f})));
  CHECK(torch::allclose(m->b->weight.grad().flatten(), torch::tensor({float(2 / std::sqrt(5.0)), 0.0f})));

  // Leaving one writer out leaves the stream's units unpenalised: none is left.
  CHECK_THROWS_WITH(SparsityPenalty(m, torch::ones({1, 1, 2, 2}), Penalty::GroupLasso, PenaltyOptions().exclude({"b"})),
                    Contains("model") && Contains("removable unit"));
  // Without an example there is no graph for a module that is not a Sequential.
  CHECK_THROWS_WITH(SparsityPenalty(static_cast<const Residual&>(m), Penalty::GroupLasso),
                    Contains("example") && Contains("GroupLasso"));
  CHECK(SparsityPenalty(static_cast<const Residual&>(m), Penalty::L1)().item<double>() ==
        Approx(5.0 + m->head->weight.abs().sum().item<double>()).epsilon(1e-6));
}

TEST_CASE("BNScale: network slimming's Σ |γ| over the norms, gradient sign(γ)", "[regularizer]") {
  using namespace torch::nn;
  Sequential m(Conv2d(Conv2dOptions(1, 3, 1)), BatchNorm2d(3), ReLU(), Conv2d(Conv2dOptions(3, 2, 1)),
               BatchNorm2d(2), BatchNorm2d(BatchNorm2dOptions(2).affine(false)));
  set(m[1]->as<BatchNorm2d>()->weight, {0.5, -2, 0});
  set(m[4]->as<BatchNorm2d>()->weight, {-1, 0.25});
  SparsityPenalty slim(m, Penalty::BNScale);
  CHECK(slim.layer_names() == std::vector<std::string>{"1", "4"});  // "5" has no γ
  CHECK(slim().item<double>() == 3.75);
  slim().backward();
  CHECK(torch::equal(m[1]->as<BatchNorm2d>()->weight.grad(), torch::tensor({1.0f, -1.0f, 0.0f})));
  CHECK(torch::equal(m[4]->as<BatchNorm2d>()->weight.grad(), torch::tensor({-1.0f, 1.0f})));
  CHECK(!m[1]->as<BatchNorm2d>()->bias.grad().defined());
  CHECK(SparsityPenalty(m, Penalty::BNScale, PenaltyOptions().exclude({"1"}))().item<double>() == 1.25);
  CHECK_THROWS_WITH(SparsityPenalty(m, Penalty::BNScale, PenaltyOptions().exclude({"1", "4"})),
                    Contains("model") && Contains("norm layer"));
  CHECK_THROWS_WITH(slim.unit_norms(), Contains("penalty") && Contains("BNScale") && Contains("GroupLasso"));
}

TEST_CASE("Regularizer adds strength · penalty to training losses only", "[regularizer]") {
  auto m = conv_bn();
  Regularizer reg(m, RegularizerOptions(0.5).penalty(Penalty::GroupLasso));
  TrainingState s;
  s.model = m.ptr().get();
  s.loss = torch::tensor(1.0f);
  reg.after_loss(s);
  CHECK(s.loss.item<double>() == Approx(1.0 + 0.5 * 18.0).epsilon(1e-7));
  s.loss.backward();
  CHECK(torch::allclose(m[1]->as<torch::nn::BatchNorm2d>()->weight.grad(), torch::tensor({0.5f * 12 / 13, 0.5f * 3 / 5})));

  s.training = false;
  s.loss = torch::tensor(1.0f);
  reg.after_loss(s);
  CHECK(s.loss.item<double>() == 1.0);
}

TEST_CASE("Regularizer and SparsityPenalty refuse bad arguments by name, the model untouched",
          "[regularizer]") {
  auto m = conv_bn();
  const auto before = fixtures::snapshot(*m);
  CHECK_THROWS_WITH(Regularizer(m, RegularizerOptions(-1e-4)), Contains("strength") && Contains("-0.0001") && Contains(">= 0"));
  CHECK_THROWS_WITH(Regularizer(m, RegularizerOptions(std::nan(""))), Contains("strength") && Contains("nan"));
  CHECK_THROWS_WITH(Regularizer(m, RegularizerOptions(1e-4).layers(PenaltyOptions().exclude({"features.0"}))),
                    Contains("exclude") && Contains("features.0") && Contains("0, 1, 2, 3"));
  CHECK_THROWS_WITH(SparsityPenalty(m, Penalty::L1, PenaltyOptions().exclude({"9"})), Contains("exclude") && Contains("= 9"));
  CHECK(fixtures::same(before, fixtures::snapshot(*m)));
  CHECK(fixtures::grads_zero(*m));
}

TEST_CASE("training with GroupLasso drives the hidden units' norms down", "[regularizer]") {
  // Same data, same initial weights, same optimizer: only the penalty differs.
  const auto data = fixtures::blobs(256, 32, 3);
  auto train = [&](double strength) {
    torch::manual_seed(5);
    auto m = fixtures::mlp(16, 3);
    SparsityPenalty group_lasso(m, Penalty::GroupLasso, PenaltyOptions().include_linear(true));
    REQUIRE(group_lasso.units() == 16);
    const auto initial = group_lasso.unit_norms();
    torch::optim::SGD sgd(m->parameters(), torch::optim::SGDOptions(0.05));
    for (int epoch = 0; epoch < 40; ++epoch)
      for (const auto& b : data) {
        sgd.zero_grad();
        auto loss = torch::nn::functional::cross_entropy(m->forward(b.data), b.target) + strength * group_lasso();
        loss.backward();
        sgd.step();
      }
    return std::pair{initial, group_lasso.unit_norms()};
  };
  const auto [initial, plain] = train(0.0);
  const auto [same_initial, regularized] = train(0.1);
  REQUIRE(torch::equal(initial, same_initial));
  CHECK(regularized.sum().item<double>() < 0.5 * plain.sum().item<double>());
  CHECK(regularized.sum().item<double>() < initial.sum().item<double>());
  // Whole units go to (near) zero, not every weight a little.
  CHECK((regularized < 0.05).sum().item<std::int64_t>() > (plain < 0.05).sum().item<std::int64_t>());
}
