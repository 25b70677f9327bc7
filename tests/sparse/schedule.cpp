#include "catch.hpp"

#include <cmath>
#include <numbers>

#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/schedule.hpp>

using namespace fasterai;

static_assert(schedule_policy<schedule::OneShot> && schedule_policy<schedule::Gradual> &&
              schedule_policy<schedule::Iterative> && schedule_policy<schedule::Constant>);
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
