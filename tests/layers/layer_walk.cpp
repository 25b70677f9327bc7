#include "catch.hpp"

#include <range/v3/range/conversion.hpp>
#include <range/v3/view/transform.hpp>

#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/models/vgg.hpp>

namespace nn = torch::nn;
using namespace fasterai;

static std::vector<std::string> names(auto&& range) {
  return range | ranges::views::transform([](const Layer& l) { return l.name; }) |
         ranges::to<std::vector>();
}

TEST_CASE("the layer walk lists nested leaves in forward order with state_dict names",
          "[layer_walk]") {
  fasterai::NamedSequential inner;
  inner->push_back("conv", nn::Conv2d(3, 4, 3));
  inner->push_back("bn", nn::BatchNorm2d(4));
  nn::Sequential model;
  model->push_back("body", inner);
  model->push_back("relu", nn::ReLU());
  model->push_back("flat", nn::Flatten());
  model->push_back("fc", nn::Linear(4, 2));

  const auto all = layers(model);
  CHECK(names(all) == std::vector<std::string>{"body.conv", "body.bn", "relu", "flat", "fc"});
  const auto kinds = all | ranges::views::transform([](const Layer& l) { return l.kind; }) |
                     ranges::to<std::vector>();
  CHECK(kinds == std::vector<LayerKind>{LayerKind::Conv2d, LayerKind::BatchNorm2d,
                                        LayerKind::ReLU, LayerKind::Flatten, LayerKind::Linear});
  CHECK(names(layers(model, LayerKind::Linear)) == std::vector<std::string>{"fc"});
  CHECK(names(prunable_layers(model)) == std::vector<std::string>{"body.conv", "fc"});

  // Each name is the prefix of the layer's parameters in the model's state_dict.
  const auto params = model->named_parameters();
  for (const Layer& l : prunable_layers(model)) {
    REQUIRE(params.contains(l.name + ".weight"));
    CHECK(params[l.name + ".weight"].is_same(l.weight()));
  }
}

TEST_CASE("the layer walk shares the model's layers", "[layer_walk]") {
  nn::Sequential model(nn::Linear(3, 2));
  const Layer fc = *layers(model).begin();
  torch::NoGradGuard no_grad;
  fc.weight().fill_(7.0);
  CHECK(model->named_parameters()["0.weight"].eq(7.0).all().item<bool>());
  const nn::AnyModule relu{nn::ReLU()};
  CHECK_THROWS_WITH((Layer{"x", LayerKind::ReLU, relu, relu.ptr()}.weight()),
                    Catch::Contains("no prunable weight"));
}

TEST_CASE("VGG16-BN walks to 13 convolutions and 3 linear layers", "[layer_walk]") {
  auto model = models::vgg16_bn(10);
  CHECK(ranges::distance(layers(model, LayerKind::Conv2d)) == 13);
  CHECK(ranges::distance(layers(model, LayerKind::BatchNorm2d)) == 13);
  CHECK(ranges::distance(layers(model, LayerKind::Linear)) == 3);
  CHECK(names(layers(model, LayerKind::Linear)) ==
        std::vector<std::string>{"classifier.0", "classifier.3", "classifier.6"});
  CHECK(layers(model).begin()->name == "features.0");
}
