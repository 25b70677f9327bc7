#include "catch.hpp"

#include <cmath>
#include <numbers>

#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/schedule.hpp>
#include <fasterai/sparse/sparsifier.hpp>

using namespace fasterai;

static_assert(schedule_policy<schedule::OneShot> && schedule_policy<schedule::Gradual> &&
              schedule_policy<schedule::Iterative> && schedule_policy<schedule::Constant>);
static_assert(schedule_policy<schedule::DSD> && schedule_policy<schedule::OneCycle>);
static_assert(schedule_policy<double (*)(double)>);
static_assert(!schedule_policy<int> && !schedule_policy<std::string>);

TEST_CASE("schedules at p = 0, 0.5, 1 follow their formulas", "[schedule]") {
  CHECK(schedule::OneShot{}(0.0) == 1.0);
  CHECK(schedule::OneShot{}(0.5) == 1.0);
  CHECK(schedule::Linear{}(0.0) == 0.0);
  CHECK(schedule::Linear{}(0.5) == 0.5);
  CHECK(schedule::Linear{}(1.0) == 1.0);
  CHECK(schedule::Cos{}(0.0) == 0.0);
  CHECK(schedule::Cos{}(0.5) == Approx(0.5).margin(1e-15));
  CHECK(schedule::Cos{}(1.0) == 1.0);
  CHECK(schedule::Cos{}(0.25) == Approx((1 - std::cos(std::numbers::pi / 4)) / 2));
  CHECK(schedule::Gradual{}(0.0) == 0.0);
  CHECK(schedule::Gradual{}(0.5) == 0.875);  // 1 - 0.5^3
  CHECK(schedule::Gradual{}(1.0) == 1.0);
  CHECK(schedule::Iterative{4}(0.0) == 0.0);
  CHECK(schedule::Iterative{4}(0.5) == 0.5);
  CHECK(schedule::Iterative{4}(0.74) == 0.5);
  CHECK(schedule::Iterative{4}(0.75) == 0.75);
  CHECK(schedule::Iterative{4}(1.0) == 1.0);
  CHECK_THROWS_WITH(schedule::Iterative{0}(0.5), Catch::Contains("steps") && Catch::Contains(">= 1"));
}

TEST_CASE("Gradual is Zhu & Gupta's s_f + (s_i - s_f)(1 - p)^3 and is monotone", "[schedule]") {
  const double si = 10, sf = 80;
  double previous = -1;
  for (int i = 0; i <= 100; ++i) {
    const double p = i / 100.0;
    const double s = si + (sf - si) * schedule::Gradual{}(p);
    CHECK(s == Approx(sf + (si - sf) * std::pow(1 - p, 3)).margin(1e-12));
    CHECK(s >= previous);
    previous = s;
  }
  // Never above the target, even with a nonzero start (the published overshoot bug).
  CHECK(si + (sf - si) * schedule::Gradual{}(1.0) == sf);
}

// No unbalanced bracket in a test name: CMake does not split a list inside [ ], and
// catch_discover_tests would fold every later test into this one.
TEST_CASE("DSD: dense, then the target from sparse_from until dense_from, then dense again", "[schedule]") {
  const schedule::DSD dsd;  // thirds
  CHECK(dsd(0.0) == 0.0);
  CHECK(dsd(0.33) == 0.0);
  CHECK(dsd(1.0 / 3.0) == 1.0);
  CHECK(dsd(0.5) == 1.0);
  CHECK(dsd(0.66) == 1.0);
  CHECK(dsd(2.0 / 3.0) == 0.0);
  CHECK(dsd(1.0) == 0.0);
  const schedule::DSD from_start{0.0, 0.8};
  CHECK(from_start(0.0) == 1.0);
  CHECK(from_start(0.79) == 1.0);
  CHECK(from_start(0.8) == 0.0);
  CHECK_THROWS_WITH((schedule::DSD{0.5, 0.5}(0.1)), Catch::Contains("sparse_from") && Catch::Contains("0.5") &&
                                                         Catch::Contains("[0, dense_from)"));
  CHECK_THROWS_WITH((schedule::DSD{-0.1, 0.5}(0.1)), Catch::Contains("sparse_from") && Catch::Contains("-0.1"));
  CHECK_THROWS_WITH((schedule::DSD{0.2, 1.5}(0.1)), Catch::Contains("dense_from") && Catch::Contains("1.5"));
}

TEST_CASE("DSD through a Sparsifier: the pruned weights are masked, then free to train again",
          "[schedule][sparsifier]") {
  torch::nn::Sequential model(torch::nn::Linear(torch::nn::LinearOptions(4, 1).bias(false)));
  auto& w = model[0]->as<torch::nn::Linear>()->weight;
  {
    torch::NoGradGuard no_grad;
    w.copy_(torch::tensor({{1.0f, -2.0f, 3.0f, -4.0f}}));
  }
  Sparsifier<granularity::Weight, method::Local, criteria::L1, schedule::DSD> dsd(
      model, SparsifierOptions(50).include_linear(true), schedule::DSD{0.25, 0.75});
  dsd.step(0.1);
  CHECK(dsd.sparsity() == 0.0);
  CHECK(w.equal(torch::tensor({{1.0f, -2.0f, 3.0f, -4.0f}})));
  dsd.step(0.5);
  CHECK(dsd.sparsity() == 50.0);
  CHECK(w.equal(torch::tensor({{0.0f, 0.0f, 3.0f, -4.0f}})));
  w.mutable_grad() = torch::ones({1, 4});
  dsd.mask_gradients();
  CHECK(w.grad().equal(torch::tensor({{0.0f, 0.0f, 1.0f, 1.0f}})));
  dsd.step(0.9);  // dense again: nothing masked, the pruned weights restart from zero
  CHECK(dsd.sparsity() == 0.0);
  CHECK(!dsd.mask("0").any().item<bool>());
  w.mutable_grad() = torch::ones({1, 4});
  dsd.mask_gradients();
  CHECK(w.grad().equal(torch::ones({1, 4})));
  {
    torch::NoGradGuard no_grad;
    w.sub_(w.grad());
  }
  dsd.apply();
  CHECK(w.equal(torch::tensor({{-1.0f, -1.0f, 2.0f, -5.0f}})));
}

TEST_CASE("OneCycle: (1 + exp(beta - alpha)) / (1 + exp(beta - alpha p)), from near 0 to exactly 1", "[schedule]") {
  const schedule::OneCycle one_cycle;  // α = 14, β = 6, as Python fasterai's sched_onecycle
  CHECK(one_cycle(1.0) == 1.0);
  CHECK(one_cycle(0.0) == Approx((1 + std::exp(-8.0)) / (1 + std::exp(6.0))).epsilon(1e-14));
  CHECK(one_cycle(0.0) < 0.003);
  // At the steepest point p = β/α the logistic is halfway: (1 + e^-8) / 2.
  CHECK(one_cycle(6.0 / 14.0) == Approx((1 + std::exp(-8.0)) / 2).epsilon(1e-14));
  CHECK(one_cycle(0.25) == Approx((1 + std::exp(-8.0)) / (1 + std::exp(2.5))).epsilon(1e-14));
  double previous = 0;
  for (int i = 0; i <= 100; ++i) {
    const double f = one_cycle(i / 100.0);
    CHECK(f > previous);
    CHECK(f <= 1.0);
    previous = f;
  }
  CHECK((schedule::OneCycle{20, 10}(0.5)) == Approx((1 + std::exp(-10.0)) / 2).epsilon(1e-14));
  CHECK_THROWS_WITH((schedule::OneCycle{0, 0}(0.5)), Catch::Contains("alpha") && Catch::Contains("> 0"));
  CHECK_THROWS_WITH((schedule::OneCycle{14, 20}(0.5)), Catch::Contains("beta") && Catch::Contains("20"));
  CHECK_THROWS_WITH((schedule::OneCycle{14, -1}(0.5)), Catch::Contains("beta") && Catch::Contains("-1"));
}
