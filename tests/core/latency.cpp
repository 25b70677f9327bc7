#include "catch.hpp"

#include <fasterai/core/latency.hpp>

namespace nn = torch::nn;
using namespace fasterai;

TEST_CASE("latency harness reports ordered statistics and restores state", "[latency]") {
  nn::Sequential m(nn::Linear(16, 16), nn::ReLU(), nn::Linear(16, 4));
  m->train();
  const int threads = torch::get_num_threads();
  const auto s = measure_latency(m, torch::randn({1, 16}), LatencyOptions().warmup(2).runs(9));
  CHECK(s.runs == 9);
  CHECK(s.min_ms > 0);
  CHECK(s.min_ms <= s.median_ms);
  CHECK(s.median_ms <= s.max_ms);
  CHECK(s.iqr_ms >= 0);
  CHECK(s.iqr_ms <= s.max_ms - s.min_ms);
  CHECK(m->is_training());
  CHECK(torch::get_num_threads() == threads);
  CHECK(torch::GradMode::is_enabled());  // the NoGradGuard ended with the call
}

TEST_CASE("latency harness rejects bad options", "[latency]") {
  nn::Sequential m(nn::Linear(2, 2));
  const auto x = torch::randn({1, 2});
  CHECK_THROWS_WITH(measure_latency(m, x, LatencyOptions().runs(0)),
                    Catch::Contains("runs") && Catch::Contains("0") && Catch::Contains(">= 1"));
  CHECK_THROWS_WITH(measure_latency(m, x, LatencyOptions().warmup(-1)), Catch::Contains("warmup"));
  CHECK_THROWS_WITH(measure_latency(m, x, LatencyOptions().threads(0)), Catch::Contains("threads"));
}

TEST_CASE("latency harness restores mode and threads when forward throws", "[latency]") {
  nn::Sequential m(nn::Linear(2, 2));
  m->train();
  const int threads = torch::get_num_threads();
  CHECK_THROWS(measure_latency(m, torch::randn({1, 3}), LatencyOptions().threads(threads + 1)));
  CHECK(m->is_training());
  CHECK(torch::get_num_threads() == threads);
}
