#include "catch.hpp"

#include <cmath>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/transform/fc_decomposer.hpp>

#include "transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

template <class M>
concept decomposable = requires(FCDecomposer d, M m) { d.decompose(m, 0.5); };
static_assert(decomposable<nn::Sequential>);
static_assert(!decomposable<nn::Linear>);

namespace {

nn::Sequential mlp(bool bias) {
  nn::Sequential m;
  m->push_back("flatten", nn::Flatten());
  NamedSequential head;
  head->push_back("0", nn::Linear(nn::LinearOptions(48, 20).bias(bias)));
  head->push_back("1", nn::ReLU());
  head->push_back("2", nn::Linear(nn::LinearOptions(20, 7).bias(bias)));
  m->push_back("head", head);
  return m;
}

// ‖W − W_L‖_F computed from the factors, and the Eckart–Young value √(Σ discarded σ²), both in
// double.
std::pair<double, double> factorization_errors(const torch::Tensor& w, const torch::Tensor& first,
                                               const torch::Tensor& second, std::int64_t rank) {
  const auto wd = w.to(torch::kFloat64);
  const auto approx = second.to(torch::kFloat64).mm(first.to(torch::kFloat64));
  const double error = (wd - approx).norm().item<double>();
  const auto s = torch::linalg_svdvals(wd);  // ATen's: Debian's 2.x has no <torch/linalg.h>
  const double eckart_young = s.narrow(0, rank, s.size(0) - rank).pow(2).sum().sqrt().item<double>();
  return {error, eckart_young};
}

}  // namespace

TEST_CASE("FCDecomposer replaces each Linear by its truncated SVD", "[fc_decomposer]") {
  for (bool bias : {true, false}) {
    for (double p : {0.0, 0.25, 0.5, 0.9, 0.99}) {
      INFO("bias " << bias << ", percent_removed " << p);
      torch::manual_seed(21);
      auto model = mlp(bias);
      const auto before = snapshot(*model);
      FCDecomposer decomposer;
      auto small = decomposer.decompose(model, p);
      CHECK(unchanged(before, *model));

      const auto params = small->named_parameters();
      const auto original = model->named_parameters();
      // L = max(1, floor((1 − p)·min(out, in))).
      const std::int64_t l0 = std::max<std::int64_t>(1, std::int64_t(std::floor((1 - p) * 20 + 1e-9)));
      const std::int64_t l1 = std::max<std::int64_t>(1, std::int64_t(std::floor((1 - p) * 7 + 1e-9)));
      REQUIRE(params.contains("head.0.0.weight"));
      CHECK(params["head.0.0.weight"].sizes() == std::vector<std::int64_t>{l0, 48});
      CHECK(params["head.0.1.weight"].sizes() == std::vector<std::int64_t>{20, l0});
      CHECK(params["head.2.0.weight"].sizes() == std::vector<std::int64_t>{l1, 20});
      CHECK(params["head.2.1.weight"].sizes() == std::vector<std::int64_t>{7, l1});
      CHECK_FALSE(params.contains("head.0.0.bias"));  // the first factor has no bias
      CHECK(params.contains("head.0.1.bias") == bias);
      if (bias) CHECK(torch::equal(params["head.0.1.bias"], original["head.0.bias"]));

      for (const auto& [name, rank] : {std::pair{std::string("head.0"), l0}, {std::string("head.2"), l1}}) {
        const auto [error, eckart_young] =
            factorization_errors(original[name + ".weight"], params[name + ".0.weight"],
                                 params[name + ".1.weight"], rank);
        const double scale = original[name + ".weight"].to(torch::kFloat64).norm().item<double>();
        INFO(name << ": error " << error << ", Eckart-Young " << eckart_young);
        CHECK(std::abs(error - eckart_young) <= 1e-6 * scale);
      }

      const auto& report = decomposer.report();
      REQUIRE(report.layers.size() == 2);
      CHECK(report.layers[0].name == "head.0");
      CHECK(report.layers[0].rank == l0);
      CHECK(report.factorized() == 2);
      const std::int64_t b = bias ? 1 : 0;
      CHECK(count_parameters(small) == l0 * (48 + 20) + 20 * b + l1 * (20 + 7) + 7 * b);
      CHECK(report.parameters_saved() == count_parameters(model) - count_parameters(small));
    }
  }
}

TEST_CASE("FCDecomposer at full rank reproduces the layer", "[fc_decomposer]") {
  torch::manual_seed(22);
  auto model = mlp(true);
  model->eval();
  const auto x = torch::randn({5, 3, 4, 4});
  auto full = FCDecomposer().decompose(model, 0.0);
  torch::NoGradGuard no_grad;
  CHECK(relative_error(full->forward(x), model->forward(x)) <= 1e-5);
}

TEST_CASE("FCDecomposer factorizes the chosen layers only", "[fc_decomposer]") {
  torch::manual_seed(23);
  auto model = mlp(true);
  FCDecomposer decomposer(FCDecomposerOptions().layers({"head.2"}));
  auto small = decomposer.decompose(model, 0.5);
  const auto params = small->named_parameters();
  CHECK(params.contains("head.0.weight"));
  CHECK(params.contains("head.2.0.weight"));
  CHECK(decomposer.report().layers.size() == 1);
  CHECK(torch::equal(params["head.0.weight"], model->named_parameters()["head.0.weight"]));

  FCDecomposer unknown(FCDecomposerOptions().layers({"head.1"}));
  CHECK_THROWS_AS(unknown.decompose(model, 0.5), argument_error);
  CHECK_THROWS_WITH(unknown.decompose(model, 0.5), Catch::Contains("'head.1'"));
}

TEST_CASE("FCDecomposer can leave layers whose factorization would not be smaller",
          "[fc_decomposer]") {
  torch::manual_seed(24);
  nn::Sequential model;
  model->push_back("square", nn::Linear(16, 16));  // at 0.5: 8·(16 + 16) = 16·16, no gain
  model->push_back("wide", nn::Linear(16, 64));    // at 0.5: 8·80 = 640 < 1024
  FCDecomposer all;
  auto every = all.decompose(model, 0.5);
  CHECK(all.report().factorized() == 2);
  FCDecomposer profitable(FCDecomposerOptions().only_if_smaller(true));
  auto some = profitable.decompose(model, 0.5);
  CHECK(profitable.report().factorized() == 1);
  CHECK_FALSE(profitable.report().layers[0].factorized);
  CHECK(profitable.report().layers[0].parameters_after == profitable.report().layers[0].parameters_before);
  CHECK(some->named_parameters().contains("square.weight"));
  CHECK(some->named_parameters().contains("wide.0.weight"));
  CHECK(count_parameters(some) == 16 * 16 + 16 + 8 * 80 + 64);
}

TEST_CASE("FCDecomposer's preview predicts the decomposition without computing it",
          "[fc_decomposer]") {
  torch::manual_seed(25);
  auto model = models::compact_vgg();
  FCDecomposer decomposer;
  const auto preview = decomposer.preview(model, 0.7);
  auto small = decomposer.decompose(model, 0.7);
  REQUIRE(preview.layers.size() == decomposer.report().layers.size());
  for (std::size_t i = 0; i < preview.layers.size(); ++i) {
    CHECK(preview.layers[i].name == decomposer.report().layers[i].name);
    CHECK(preview.layers[i].rank == decomposer.report().layers[i].rank);
  }
  CHECK(count_parameters(model) - preview.parameters_saved() == count_parameters(small));
}

TEST_CASE("FCDecomposer rejects bad arguments and reports a no-op", "[fc_decomposer][errors]") {
  auto model = mlp(true);
  for (double p : {-0.1, 1.0, 1.5, std::nan("")}) {
    INFO("percent_removed " << p);
    CHECK_THROWS_AS(FCDecomposer().decompose(model, p), argument_error);
    CHECK_THROWS_WITH(FCDecomposer().decompose(model, p),
                      Catch::Contains("percent_removed") && Catch::Contains("[0, 1)"));
  }
  nn::Sequential convs;
  convs->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3)));
  FCDecomposer decomposer;
  auto same = decomposer.decompose(convs, 0.5);
  CHECK_FALSE(decomposer.report().changed());
  CHECK(decomposer.report().layers.empty());
  CHECK(count_parameters(same) == count_parameters(convs));
}
