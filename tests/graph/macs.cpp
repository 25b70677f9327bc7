#include "catch.hpp"
#include "hand_built.hpp"

#include <algorithm>

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
TEST_CASE("PrunedMacs predicts the MACs after the Pruner without changing the model", "[statistics][graph]") {
  // conv a: 2 -> 4 channels, 3x3 on 4x4 (16 * 4 * 18 = 1152 MACs); conv b: 4 -> 3, 1x1 (192).
  nn::Sequential m(nn::Conv2d(nn::Conv2dOptions(2, 4, 3).padding(1)), nn::ReLU(), nn::Conv2d(nn::Conv2dOptions(4, 3, 1)));
  const auto example = torch::randn({1, 2, 4, 4});
  {
    const PrunedMacs macs(m, example);
    CHECK(macs.total() == 1152 + 192);
    CHECK(macs.after_pruning() == macs.total());  // no zero channel: nothing goes
  }
  {
    torch::NoGradGuard no_grad;
    m[0]->as<nn::Conv2d>()->weight[1].zero_();
    m[0]->as<nn::Conv2d>()->bias[1].zero_();
  }
  const PrunedMacs macs(m, example);
  const auto removed = macs.removed_now();
  CHECK(std::count(removed.begin(), removed.end(), 1) == 1);
  // One of a's 4 filters goes, and b's input channel that read it.
  CHECK(macs.after(removed) == 1152 * 3 / 4 + 192 * 3 / 4);
  CHECK(macs.after_pruning() == 1152 * 3 / 4 + 192 * 3 / 4);
  CHECK(m[0]->as<nn::Conv2d>()->weight.size(0) == 4);  // the model is as it was
  CHECK_THROWS_WITH(macs.after(std::vector<char>(removed.size() + 1, 0)),
                    Catch::Contains("'removed' = ") && Catch::Contains("one flag per unit"));
}
