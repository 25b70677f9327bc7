#pragma once
// ResNet-18/34/50 written the way a LibTorch user writes a network: module classes with a
// hand-written forward, the residual additions as plain tensor additions. Parameter and buffer
// names, shapes and initialization equal torchvision 0.14's (`conv1.weight`,
// `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `fc.bias`), so
// `torch.save(model.state_dict())` files from Python load as they are and give PyTorch's logits.
//
// The stages `layer1`..`layer4` and the shortcut projections (`downsample`) are
// `NamedSequential`s where torchvision uses `nn.Sequential`; everything else is a member module.
// Modules are `Cloneable`, so `clone()` gives a deep copy, also after pruning has changed
// their children's shapes (children are cloned, not rebuilt from the options).

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/models/vgg.hpp>

namespace fasterai::models {

// The two residual blocks of the ResNet paper: two 3x3 convolutions (ResNet-18/34), or
// 1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50 and deeper).
enum class ResNetBlock { Basic, Bottleneck };

struct ResNetOptions {
  // Blocks per stage, four stages: {2, 2, 2, 2} is ResNet-18, {3, 4, 6, 3} with Bottleneck
  // blocks ResNet-50.
  ResNetOptions(ResNetBlock block, std::vector<std::int64_t> layers)
      : block_(block), layers_(std::move(layers)) {}
  TORCH_ARG(ResNetBlock, block);
  TORCH_ARG(std::vector<std::int64_t>, layers);
  TORCH_ARG(std::int64_t, num_classes) = 1000;
  // Start every block's last BatchNorm at gamma = 0, so each block begins as the identity
  // (torchvision's option of the same name; off by default there too).
  TORCH_ARG(bool, zero_init_residual) = false;
};

namespace detail {

inline torch::nn::Conv2d conv3x3(std::int64_t in, std::int64_t out, std::int64_t stride = 1) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false));
}

inline torch::nn::Conv2d conv1x1(std::int64_t in, std::int64_t out, std::int64_t stride = 1) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 1).stride(stride).bias(false));
}

// torchvision's `_make_layer` adds a 1x1 conv + BN projection to a stage's first block exactly
// when the block changes the resolution or the width; the block applies the same rule itself,
// so it can be rebuilt from (inplanes, planes, stride) alone.
inline fasterai::NamedSequential make_downsample(std::int64_t inplanes, std::int64_t outplanes,
                                                 std::int64_t stride) {
  if (stride == 1 && inplanes == outplanes) return fasterai::NamedSequential(nullptr);
  fasterai::NamedSequential downsample;
  downsample->push_back("0", conv1x1(inplanes, outplanes, stride));
  downsample->push_back("1", torch::nn::BatchNorm2d(outplanes));
  return downsample;
}

inline void check_block(std::string_view where, std::int64_t inplanes, std::int64_t planes,
                        std::int64_t stride) {
  fasterai::detail::check_argument(inplanes >= 1, where, "inplanes", inplanes, "a width >= 1");
  fasterai::detail::check_argument(planes >= 1, where, "planes", planes, "a width >= 1");
  fasterai::detail::check_argument(stride >= 1, where, "stride", stride, "a stride >= 1");
}

}  // namespace detail

// conv3x3 - BN - ReLU - conv3x3 - BN, plus the input (or its projection), then ReLU.
class BasicBlockImpl : public torch::nn::Cloneable<BasicBlockImpl> {
 public:
  static constexpr std::int64_t expansion = 1;

  BasicBlockImpl(std::int64_t inplanes, std::int64_t planes, std::int64_t stride = 1)
      : inplanes_(inplanes), planes_(planes), stride_(stride) {
    detail::check_block("fasterai::models::BasicBlock", inplanes, planes, stride);
    reset();
  }

  void reset() override {
    conv1 = register_module("conv1", detail::conv3x3(inplanes_, planes_, stride_));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes_));
    relu = register_module("relu", torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)));
    conv2 = register_module("conv2", detail::conv3x3(planes_, planes_));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes_));
    downsample = detail::make_downsample(inplanes_, planes_ * expansion, stride_);
    if (downsample) register_module("downsample", downsample);
  }

  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor out = relu->forward(bn1->forward(conv1->forward(x)));
    out = bn2->forward(conv2->forward(out));
    const torch::Tensor identity = downsample ? downsample->forward(x) : x;
    return relu->forward(out + identity);
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::ReLU relu{nullptr};
  fasterai::NamedSequential downsample{nullptr};  // empty when the shortcut is the identity

 private:
  std::int64_t inplanes_, planes_, stride_;
};
TORCH_MODULE(BasicBlock);

// conv1x1 (reduce) - BN - ReLU - conv3x3 (stride here, as torchvision "V1.5") - BN - ReLU -
// conv1x1 (expand by 4) - BN, plus the input (or its projection), then ReLU.
class BottleneckImpl : public torch::nn::Cloneable<BottleneckImpl> {
 public:
  static constexpr std::int64_t expansion = 4;

  BottleneckImpl(std::int64_t inplanes, std::int64_t planes, std::int64_t stride = 1)
      : inplanes_(inplanes), planes_(planes), stride_(stride) {
    detail::check_block("fasterai::models::Bottleneck", inplanes, planes, stride);
    reset();
  }

  void reset() override {
    conv1 = register_module("conv1", detail::conv1x1(inplanes_, planes_));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(planes_));
    conv2 = register_module("conv2", detail::conv3x3(planes_, planes_, stride_));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(planes_));
    conv3 = register_module("conv3", detail::conv1x1(planes_, planes_ * expansion));
    bn3 = register_module("bn3", torch::nn::BatchNorm2d(planes_ * expansion));
    relu = register_module("relu", torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)));
    downsample = detail::make_downsample(inplanes_, planes_ * expansion, stride_);
    if (downsample) register_module("downsample", downsample);
  }

  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor out = relu->forward(bn1->forward(conv1->forward(x)));
    out = relu->forward(bn2->forward(conv2->forward(out)));
    out = bn3->forward(conv3->forward(out));
    const torch::Tensor identity = downsample ? downsample->forward(x) : x;
    return relu->forward(out + identity);
  }

  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::ReLU relu{nullptr};
  fasterai::NamedSequential downsample{nullptr};  // empty when the shortcut is the identity

 private:
  std::int64_t inplanes_, planes_, stride_;
};
TORCH_MODULE(Bottleneck);

// The ResNet of torchvision (stride on the 3x3 convolution of a Bottleneck, projection
// shortcuts only where the shape changes) for 3-channel images of any size >= 32.
class ResNetImpl : public torch::nn::Cloneable<ResNetImpl> {
 public:
  explicit ResNetImpl(ResNetOptions options_) : options(std::move(options_)) {
    constexpr auto where = "fasterai::models::ResNet";
    fasterai::detail::check_argument(options.layers().size() == 4, where, "layers.size()",
                                     options.layers().size(), "4 (blocks per stage)");
    for (std::int64_t n : options.layers())
      fasterai::detail::check_argument(n >= 1, where, "layers", n, "block counts >= 1");
    fasterai::detail::check_argument(options.num_classes() >= 1, where, "num_classes",
                                     options.num_classes(), "a count >= 1");
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    const std::int64_t expansion = options.block() == ResNetBlock::Basic
                                       ? BasicBlockImpl::expansion
                                       : BottleneckImpl::expansion;
    conv1 = register_module(
        "conv1", Conv2d(Conv2dOptions(3, 64, 7).stride(2).padding(3).bias(false)));
    bn1 = register_module("bn1", BatchNorm2d(64));
    relu = register_module("relu", ReLU(ReLUOptions().inplace(true)));
    maxpool = register_module("maxpool", MaxPool2d(MaxPool2dOptions(3).stride(2).padding(1)));
    std::int64_t inplanes = 64;
    auto make_layer = [&](std::int64_t planes, std::int64_t blocks, std::int64_t stride) {
      fasterai::NamedSequential layer;
      for (std::int64_t i = 0; i < blocks; ++i) {
        const std::int64_t s = i == 0 ? stride : 1;
        if (options.block() == ResNetBlock::Basic)
          layer->push_back(std::to_string(i), BasicBlock(inplanes, planes, s));
        else
          layer->push_back(std::to_string(i), Bottleneck(inplanes, planes, s));
        inplanes = planes * expansion;
      }
      return layer;
    };
    const auto& n = options.layers();
    layer1 = register_module("layer1", make_layer(64, n[0], 1));
    layer2 = register_module("layer2", make_layer(128, n[1], 2));
    layer3 = register_module("layer3", make_layer(256, n[2], 2));
    layer4 = register_module("layer4", make_layer(512, n[3], 2));
    avgpool = register_module("avgpool", AdaptiveAvgPool2d(AdaptiveAvgPool2dOptions({1, 1})));
    fc = register_module("fc", Linear(512 * expansion, options.num_classes()));
    reset_parameters();
  }

  // torchvision's initialization: Kaiming-normal (fan_out, ReLU) convolutions, unit
  // BatchNorm; the classifier keeps nn.Linear's default (torchvision does not touch `fc`).
  void reset_parameters() {
    detail::init_like_torchvision(*this);
    fc->reset_parameters();
    if (!options.zero_init_residual()) return;
    torch::NoGradGuard no_grad;
    for (auto& m : modules(/*include_self=*/false)) {
      if (auto* block = m->as<BottleneckImpl>()) block->bn3->weight.zero_();
      if (auto* block = m->as<BasicBlockImpl>()) block->bn2->weight.zero_();
    }
  }

  torch::Tensor forward(torch::Tensor x) {
    x = maxpool->forward(relu->forward(bn1->forward(conv1->forward(x))));
    x = layer1->forward(x);
    x = layer2->forward(x);
    x = layer3->forward(x);
    x = layer4->forward(x);
    x = torch::flatten(avgpool->forward(x), 1);
    return fc->forward(x);
  }

  ResNetOptions options;
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  torch::nn::ReLU relu{nullptr};
  torch::nn::MaxPool2d maxpool{nullptr};
  fasterai::NamedSequential layer1{nullptr}, layer2{nullptr}, layer3{nullptr}, layer4{nullptr};
  torch::nn::AdaptiveAvgPool2d avgpool{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(ResNet);

inline ResNet resnet18(std::int64_t num_classes = 1000) {
  return ResNet(ResNetOptions(ResNetBlock::Basic, {2, 2, 2, 2}).num_classes(num_classes));
}
inline ResNet resnet34(std::int64_t num_classes = 1000) {
  return ResNet(ResNetOptions(ResNetBlock::Basic, {3, 4, 6, 3}).num_classes(num_classes));
}
inline ResNet resnet50(std::int64_t num_classes = 1000) {
  return ResNet(ResNetOptions(ResNetBlock::Bottleneck, {3, 4, 6, 3}).num_classes(num_classes));
}

}  // namespace fasterai::models
