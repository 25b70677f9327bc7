#include "catch.hpp"

#include <sstream>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/vgg.hpp>

namespace nn = torch::nn;
using namespace fasterai;

namespace {
// Conv(3->4, 3x3, pad 1) on 8x8, BN, ReLU, MaxPool 2 -> 4x4, Flatten, Linear(64 -> 5).
nn::Sequential hand_built() {
  nn::Sequential m;
  m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3).padding(1)));
  m->push_back("bn", nn::BatchNorm2d(4));
  m->push_back("relu", nn::ReLU());
  m->push_back("pool", nn::MaxPool2d(2));
  m->push_back("flatten", nn::Flatten());
  m->push_back("fc", nn::Linear(64, 5));
  return m;
}
}  // namespace

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

TEST_CASE("MAC count of convolutions and linear layers", "[statistics]") {
  auto m = hand_built();
  const auto macs = count_macs(m, {3, 8, 8});
  REQUIRE(macs.layers.size() == 2);
  CHECK(macs.layers[0].macs == 4 * 8 * 8 * 3 * 9);  // every output element: 27 MACs
  CHECK(macs.layers[1].macs == 64 * 5);
  CHECK(macs.total() == 4 * 8 * 8 * 27 + 320);
  // Strided, grouped convolution: out 6x(4x4), each output reads in/groups * k * k inputs.
  nn::Sequential g(nn::Conv2d(nn::Conv2dOptions(4, 6, 3).stride(2).padding(1).groups(2)));
  CHECK(count_macs(g, {4, 8, 8}).total() == 6 * 4 * 4 * 2 * 9);
  // VGG16 at 224x224: 15.47 GMACs, the figure commonly quoted for it.
  CHECK(count_macs(models::vgg16(1000), {3, 224, 224}).total() == 15'470'264'320);
}

TEST_CASE("MAC count of a user's module, a layer called twice counting twice", "[statistics][graph]") {
  struct TwiceImpl : nn::Module {
    nn::Conv2d conv{nullptr};
    nn::Linear fc{nullptr};
    TwiceImpl() {
      conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(3, 3, 1)));
      fc = register_module("fc", nn::Linear(48, 2));
    }
    torch::Tensor forward(torch::Tensor x) {
      x = x + torch::relu(conv(conv(x)));  // a residual around two calls of one conv
      return fc(torch::flatten(x, 1));
    }
  };
  auto m = std::make_shared<TwiceImpl>();
  torch::NoGradGuard no_grad;  // counting works under the caller's no-grad mode
  const auto macs = count_macs(*m, {3, 4, 4});
  REQUIRE(macs.layers.size() == 3);
  CHECK(macs.layers[0].name == "conv");
  CHECK(macs.layers[1].name == "conv");
  CHECK(macs.layers[0].macs == 3 * 4 * 4 * 3);
  CHECK(macs.layers[2].macs == 2 * 48);
  CHECK(macs.total() == 2 * 144 + 96);
}

TEST_CASE("MAC count restores train mode and rejects bad shapes", "[statistics]") {
  auto m = hand_built();
  m->train();
  count_macs(m, {3, 8, 8});
  CHECK(m->is_training());
  CHECK(m->named_children()["bn"]->is_training());
  CHECK_THROWS(count_macs(m, {5, 8, 8}));  // the conv expects 3 channels
  CHECK(m->named_children()["conv"]->is_training());
  CHECK_THROWS_WITH(count_macs(m, std::vector<std::int64_t>{}), Catch::Contains("input_shape"));
  CHECK_THROWS_WITH(count_macs(m, {3, 0, 8}), Catch::Contains("input_shape") &&
                                                 Catch::Contains("positive"));
}

TEST_CASE("counts print with thousands separators", "[statistics]") {
  CHECK(with_thousands(134'309'962) == "134,309,962");
  CHECK(with_thousands(999) == "999");
  CHECK(with_thousands(1000) == "1,000");
  CHECK(with_thousands(0) == "0");
  CHECK(with_thousands(-61'430'022) == "-61,430,022");
}
