#include "catch.hpp"
#include "hand_built.hpp"

#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/layers/sparsity_report.hpp>

using namespace fasterai;

using testing::hand_built;

TEST_CASE("parameter counts, nonzeros and size on a hand-built model", "[statistics]") {
  auto m = hand_built();
  const std::int64_t params = (4 * 3 * 9 + 4) + (4 + 4) + (64 * 5 + 5);
  CHECK(count_parameters(m) == params);
  // Buffers: running mean, running var (4 floats each) and num_batches_tracked (one int64).
  CHECK(model_size_bytes(m) == params * 4 + 8 * 4 + 8);
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.fill_(1.0);
  CHECK(count_nonzero_parameters(m) == params);
  m->named_parameters()["conv.weight"].narrow(0, 0, 2).zero_();  // 2 of 4 filters
  m->named_parameters()["fc.bias"].zero_();
  CHECK(count_nonzero_parameters(m) == params - 2 * 27 - 5);
}

TEST_CASE("counts print with thousands separators", "[statistics]") {
  CHECK(with_thousands(134'309'962) == "134,309,962");
  CHECK(with_thousands(999) == "999");
  CHECK(with_thousands(1000) == "1,000");
  CHECK(with_thousands(0) == "0");
  CHECK(with_thousands(-61'430'022) == "-61,430,022");
}
