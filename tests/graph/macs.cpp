#include "catch.hpp"
#include "hand_built.hpp"

#include <fasterai/graph/macs.hpp>
#include <fasterai/models/vgg.hpp>

namespace nn = torch::nn;
using namespace fasterai;

using testing::hand_built;

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
