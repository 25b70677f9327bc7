#include "catch.hpp"
#include "hand_built.hpp"

#include <sstream>

#include <fasterai/layers/sparsity_report.hpp>

using namespace fasterai;

using testing::hand_built;

TEST_CASE("sparsity report lists prunable layers with exact percentages", "[statistics]") {
  auto m = hand_built();
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.fill_(1.0);
  m->named_parameters()["conv.weight"].narrow(0, 0, 1).zero_();  // 27 of 108
  m->named_parameters()["fc.weight"].narrow(0, 0, 2).zero_();    // 128 of 320
  const auto report = sparsity_report(m);
  REQUIRE(report.layers.size() == 2);
  CHECK(report.layers[0].name == "conv");
  CHECK(report.layers[0].kind == LayerKind::Conv2d);
  CHECK(report.layers[0].weights == 108);
  CHECK(report.layers[0].zeros == 27);
  CHECK(report.layers[0].percent() == 25.0);
  CHECK(report.layers[1].name == "fc");
  CHECK(report.layers[1].percent() == 40.0);
  CHECK(report.global_percent() == Approx(100.0 * 155 / 428));
  std::ostringstream os;
  os << report;
  CHECK(os.str() == "Sparsity in Conv2d conv: 25.00%\nSparsity in Linear fc: 40.00%\n");
}
