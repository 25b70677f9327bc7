#include "catch.hpp"

#include <fasterai/train/one_cycle.hpp>

#include <cmath>
#include <numbers>

using namespace fasterai;
using Catch::Contains;

TEST_CASE("one-cycle learning rate: warm-up to max_lr, then anneal", "[one_cycle]") {
  const double max_lr = 1e-2;
  OneCycle s(max_lr);
  CHECK(s.lr(0.0) == Approx(max_lr / 25));
  CHECK(s.lr(0.25) == Approx(max_lr));
  CHECK(s.lr(1.0) == Approx(max_lr / (25 * 1e4)));
  // Half-way through each phase a cosine is half-way between its ends.
  CHECK(s.lr(0.125) == Approx((max_lr / 25 + max_lr) / 2));
  CHECK(s.lr(0.625) == Approx((max_lr + max_lr / 2.5e5) / 2));
  // A cosine: at a quarter of the warm-up, start + (max - start)(1 - cos(pi/4))/2.
  const double start = max_lr / 25;
  CHECK(s.lr(0.0625) == Approx(start + (max_lr - start) * (1 - std::cos(std::numbers::pi / 4)) / 2));
  double prev = 0;
  for (int i = 0; i <= 25; ++i) {
    CHECK(s.lr(i / 100.0) >= prev);
    prev = s.lr(i / 100.0);
  }
  for (int i = 26; i <= 100; ++i) {
    CHECK(s.lr(i / 100.0) <= prev);
    prev = s.lr(i / 100.0);
  }
  CHECK(s.lr(-1) == s.lr(0));  // clamped
  CHECK(s.lr(2) == s.lr(1));
}

TEST_CASE("one-cycle momentum: 0.95 -> 0.85 at the peak -> 0.95", "[one_cycle]") {
  OneCycle s(1e-3);
  CHECK(s.momentum(0) == Approx(0.95));
  CHECK(s.momentum(0.25) == Approx(0.85));
  CHECK(s.momentum(1) == Approx(0.95));
  CHECK(s.momentum(0.125) == Approx(0.90));
  CHECK(s.momentum(0.625) == Approx(0.90));
}

TEST_CASE("one-cycle options change the shape", "[one_cycle]") {
  OneCycle s(1.0, OneCycleOptions().pct_start(0.5).div_factor(10).final_div_factor(100)
                      .max_momentum(0.9).base_momentum(0.8));
  CHECK(s.lr(0) == Approx(0.1));
  CHECK(s.lr(0.5) == Approx(1.0));
  CHECK(s.lr(1) == Approx(1e-3));
  CHECK(s.momentum(0.5) == Approx(0.8));
  OneCycle no_warmup(1.0, OneCycleOptions().pct_start(0));
  CHECK(no_warmup.lr(0) == Approx(1.0));
}

TEST_CASE("set_learning_rate and set_momentum reach every optimizer's groups", "[one_cycle]") {
  auto w = torch::zeros({2}, torch::requires_grad());
  torch::optim::Adam adam({w}, torch::optim::AdamOptions(1e-3));
  set_learning_rate(adam, 0.5);
  CHECK(set_momentum(adam, 0.85));
  const auto& a = static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options());
  CHECK(a.lr() == 0.5);
  CHECK(std::get<0>(a.betas()) == 0.85);
  CHECK(std::get<1>(a.betas()) == 0.999);  // β2 untouched

  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(0.1));
  CHECK(set_momentum(sgd, 0.9));
  CHECK(static_cast<torch::optim::SGDOptions&>(sgd.param_groups()[0].options()).momentum() == 0.9);

  torch::optim::AdamW adamw({w}, torch::optim::AdamWOptions(1e-3));
  CHECK(set_momentum(adamw, 0.8));
  torch::optim::Adagrad adagrad({w}, torch::optim::AdagradOptions(0.1));
  CHECK_FALSE(set_momentum(adagrad, 0.9));
  set_learning_rate(adagrad, 0.2);
  CHECK(adagrad.param_groups()[0].options().get_lr() == 0.2);
}

TEST_CASE("one-cycle rejects bad arguments", "[one_cycle]") {
  CHECK_THROWS_WITH(OneCycle(-1e-3), Contains("max_lr") && Contains("-0.001") && Contains("positive"));
  CHECK_THROWS_WITH(OneCycle(0), Contains("max_lr"));
  CHECK_THROWS_WITH(OneCycle(std::nan("")), Contains("max_lr"));
  CHECK_THROWS_WITH(OneCycle(1e-3, OneCycleOptions().pct_start(1)), Contains("pct_start"));
  CHECK_THROWS_WITH(OneCycle(1e-3, OneCycleOptions().div_factor(0.5)), Contains("div_factor"));
  CHECK_THROWS_WITH(OneCycle(1e-3, OneCycleOptions().final_div_factor(0)), Contains("final_div_factor"));
  CHECK_THROWS_WITH(OneCycle(1e-3, OneCycleOptions().max_momentum(1)), Contains("max_momentum"));
  CHECK_THROWS_WITH(OneCycle(1e-3, OneCycleOptions().base_momentum(-0.1)), Contains("base_momentum"));
}
