#pragma once
// The VGG family as nested, named `torch::nn::Sequential`s whose parameter names, shapes and
// initialization equal torchvision's (`features.0.weight`, `classifier.6.bias`), so weights
// saved from Python load as they are. `flatten` is a module here (torchvision calls
// torch.flatten in forward); it has no parameters, so the state_dict keys are unchanged.

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>

namespace fasterai::models {

// Channels of each 3x3 convolution; 0 stands for a 2x2 max-pool (torchvision's "M").
using VGGConfig = std::vector<int>;

namespace detail {

inline const VGGConfig& vgg_config(int depth) {
  static const VGGConfig a{64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0};
  static const VGGConfig b{64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0};
  static const VGGConfig d{64,  64,  0,   128, 128, 0,   256, 256, 256,
                           0,   512, 512, 512, 0,   512, 512, 512, 0};
  static const VGGConfig e{64,  64,  0,   128, 128, 0,   256, 256, 256, 256, 0,
                           512, 512, 512, 512, 0,   512, 512, 512, 512, 0};
  switch (depth) {
    case 11: return a;
    case 13: return b;
    case 16: return d;
    case 19: return e;
    default:
      fasterai::detail::throw_argument_error("fasterai::models::vgg", "depth", depth,
                                             "one of 11, 13, 16, 19");
  }
}

// torchvision's VGG initialization: Kaiming-normal (fan_out, ReLU) convolutions, unit BatchNorm,
// N(0, 0.01) linear layers, zero biases.
inline void init_like_torchvision(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules(/*include_self=*/false)) {
    if (auto* conv = m->as<torch::nn::Conv2dImpl>()) {
      torch::nn::init::kaiming_normal_(conv->weight, 0.0, torch::kFanOut, torch::kReLU);
      if (conv->bias.defined()) conv->bias.zero_();
    } else if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      bn->weight.fill_(1.0);
      bn->bias.zero_();
    } else if (auto* lin = m->as<torch::nn::LinearImpl>()) {
      lin->weight.normal_(0.0, 0.01);
      lin->bias.zero_();
    }
  }
}

// Conv3x3 [-> BatchNorm] -> ReLU per entry, max-pool for 0, named "0", "1", ... like
// torchvision's `make_layers`.
inline fasterai::NamedSequential make_features(const VGGConfig& config, bool batch_norm,
                                           int in_channels) {
  using namespace torch::nn;
  fasterai::NamedSequential features;
  int index = 0;
  auto add = [&](auto module) { features->push_back(std::to_string(index++), module); };
  for (int v : config) {
    if (v == 0) {
      add(MaxPool2d(MaxPool2dOptions(2).stride(2)));
      continue;
    }
    add(Conv2d(Conv2dOptions(in_channels, v, 3).padding(1)));
    if (batch_norm) add(BatchNorm2d(v));
    add(ReLU(ReLUOptions().inplace(true)));
    in_channels = v;
  }
  return features;
}

}  // namespace detail

// A VGG of depth 11, 13, 16 or 19 for 3x224x224 inputs (any size >= 32 works: the adaptive
// pool brings the features to 7x7).
inline torch::nn::Sequential vgg(int depth, bool batch_norm, std::int64_t num_classes = 1000) {
  using namespace torch::nn;
  fasterai::detail::check_argument(num_classes >= 1, "fasterai::models::vgg", "num_classes",
                                   num_classes, "a count >= 1");
  Sequential model;
  model->push_back("features", detail::make_features(detail::vgg_config(depth), batch_norm, 3));
  model->push_back("avgpool", AdaptiveAvgPool2d(AdaptiveAvgPool2dOptions({7, 7})));
  model->push_back("flatten", Flatten());
  fasterai::NamedSequential classifier;
  classifier->push_back("0", Linear(512 * 7 * 7, 4096));
  classifier->push_back("1", ReLU(ReLUOptions().inplace(true)));
  classifier->push_back("2", Dropout(0.5));
  classifier->push_back("3", Linear(4096, 4096));
  classifier->push_back("4", ReLU(ReLUOptions().inplace(true)));
  classifier->push_back("5", Dropout(0.5));
  classifier->push_back("6", Linear(4096, num_classes));
  model->push_back("classifier", classifier);
  detail::init_like_torchvision(*model);
  return model;
}

inline torch::nn::Sequential vgg11(std::int64_t num_classes = 1000) { return vgg(11, false, num_classes); }
inline torch::nn::Sequential vgg11_bn(std::int64_t num_classes = 1000) { return vgg(11, true, num_classes); }
inline torch::nn::Sequential vgg13(std::int64_t num_classes = 1000) { return vgg(13, false, num_classes); }
inline torch::nn::Sequential vgg13_bn(std::int64_t num_classes = 1000) { return vgg(13, true, num_classes); }
inline torch::nn::Sequential vgg16(std::int64_t num_classes = 1000) { return vgg(16, false, num_classes); }
inline torch::nn::Sequential vgg16_bn(std::int64_t num_classes = 1000) { return vgg(16, true, num_classes); }
inline torch::nn::Sequential vgg19(std::int64_t num_classes = 1000) { return vgg(19, false, num_classes); }
inline torch::nn::Sequential vgg19_bn(std::int64_t num_classes = 1000) { return vgg(19, true, num_classes); }

}  // namespace fasterai::models
