#pragma once
// MobileNetV2 written the way a LibTorch user writes a network: module classes with a
// hand-written forward, the residual additions as plain tensor additions, depthwise 3x3
// convolutions (groups = channels) between 1x1 expansions and projections. Parameter and buffer
// names, shapes and initialization equal torchvision 0.14's (`features.0.0.weight`,
// `features.1.conv.0.0.weight`, `classifier.1.weight`), so `torch.save(model.state_dict())`
// files from Python load as they are and give PyTorch's logits.
//
// `features`, each block's `conv` and torchvision's Conv2dNormActivation (conv, BN, ReLU6) are
// `NamedSequential`s where torchvision uses `nn.Sequential`. Modules are `Cloneable`, so
// `clone()` gives a deep copy, also after pruning has changed their children's shapes.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/models/vgg.hpp>

namespace fasterai::models {

struct MobileNetV2Options {
  MobileNetV2Options() = default;
  TORCH_ARG(std::int64_t, num_classes) = 1000;
  // Scales every width (then rounded to a multiple of 8, as torchvision does).
  TORCH_ARG(double, width_mult) = 1.0;
  TORCH_ARG(double, dropout) = 0.2;  // before the classifier's Linear
};

namespace detail {

// torchvision's `_make_divisible` (from TensorFlow's slim MobileNet): the nearest multiple of
// `divisor`, at least `divisor`, and never more than 10% below `v`.
inline std::int64_t make_divisible(double v, std::int64_t divisor = 8) {
  std::int64_t rounded = std::max<std::int64_t>(
      divisor, static_cast<std::int64_t>(v + static_cast<double>(divisor) / 2) / divisor * divisor);
  if (static_cast<double>(rounded) < 0.9 * v) rounded += divisor;
  return rounded;
}

// torchvision's Conv2dNormActivation with MobileNetV2's choices: "same" padding, no conv bias
// (the BatchNorm has one), ReLU6.
inline fasterai::NamedSequential conv_bn_relu6(std::int64_t in, std::int64_t out,
                                               std::int64_t kernel, std::int64_t stride = 1,
                                               std::int64_t groups = 1) {
  using namespace torch::nn;
  fasterai::NamedSequential block;
  block->push_back("0", Conv2d(Conv2dOptions(in, out, kernel)
                                   .stride(stride)
                                   .padding((kernel - 1) / 2)
                                   .groups(groups)
                                   .bias(false)));
  block->push_back("1", BatchNorm2d(out));
  block->push_back("2", ReLU6(ReLU6Options().inplace(true)));
  return block;
}

}  // namespace detail

// Expand (1x1, unless expand_ratio is 1) - depthwise 3x3 - project (1x1, linear), with the
// input added back when the block keeps the shape (stride 1, same width).
class InvertedResidualImpl : public torch::nn::Cloneable<InvertedResidualImpl> {
 public:
  InvertedResidualImpl(std::int64_t inp, std::int64_t oup, std::int64_t stride,
                       std::int64_t expand_ratio)
      : inp_(inp), oup_(oup), stride_(stride), expand_ratio_(expand_ratio) {
    constexpr auto where = "fasterai::models::InvertedResidual";
    fasterai::detail::check_argument(inp >= 1, where, "inp", inp, "a width >= 1");
    fasterai::detail::check_argument(oup >= 1, where, "oup", oup, "a width >= 1");
    fasterai::detail::check_argument(stride == 1 || stride == 2, where, "stride", stride,
                                     "1 or 2");
    fasterai::detail::check_argument(expand_ratio >= 1, where, "expand_ratio", expand_ratio,
                                     "a ratio >= 1");
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    const std::int64_t hidden = inp_ * expand_ratio_;
    fasterai::NamedSequential layers;
    int index = 0;
    auto add = [&](auto module) { layers->push_back(std::to_string(index++), module); };
    if (expand_ratio_ != 1) add(detail::conv_bn_relu6(inp_, hidden, 1));
    add(detail::conv_bn_relu6(hidden, hidden, 3, stride_, /*groups=*/hidden));
    add(Conv2d(Conv2dOptions(hidden, oup_, 1).bias(false)));
    add(BatchNorm2d(oup_));
    conv = register_module("conv", layers);
  }

  torch::Tensor forward(torch::Tensor x) {
    if (use_res_connect()) return x + conv->forward(x);
    return conv->forward(x);
  }

  bool use_res_connect() const { return stride_ == 1 && inp_ == oup_; }

  fasterai::NamedSequential conv{nullptr};

 private:
  std::int64_t inp_, oup_, stride_, expand_ratio_;
};
TORCH_MODULE(InvertedResidual);

// torchvision's MobileNetV2 for 3-channel images (224x224 in the paper; any size works, the
// features end in a global average pool).
class MobileNetV2Impl : public torch::nn::Cloneable<MobileNetV2Impl> {
 public:
  explicit MobileNetV2Impl(MobileNetV2Options options_ = {}) : options(std::move(options_)) {
    constexpr auto where = "fasterai::models::MobileNetV2";
    fasterai::detail::check_argument(options.num_classes() >= 1, where, "num_classes",
                                     options.num_classes(), "a count >= 1");
    fasterai::detail::check_argument(options.width_mult() > 0, where, "width_mult",
                                     options.width_mult(), "a factor > 0");
    fasterai::detail::check_argument(options.dropout() >= 0 && options.dropout() < 1, where,
                                     "dropout", options.dropout(), "a probability in [0, 1)");
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    // t (expansion), c (width), n (blocks), s (stride of the first block) per stage.
    struct Stage {
      std::int64_t t, c, n, s;
    };
    static constexpr Stage stages[] = {{1, 16, 1, 1}, {6, 24, 2, 2},  {6, 32, 3, 2},
                                       {6, 64, 4, 2}, {6, 96, 3, 1},  {6, 160, 3, 2},
                                       {6, 320, 1, 1}};
    const double w = options.width_mult();
    std::int64_t input_channel = detail::make_divisible(32 * w);
    const std::int64_t last_channel = detail::make_divisible(1280 * std::max(1.0, w));
    fasterai::NamedSequential layers;
    int index = 0;
    auto add = [&](auto module) { layers->push_back(std::to_string(index++), module); };
    add(detail::conv_bn_relu6(3, input_channel, 3, 2));
    for (const Stage& stage : stages) {
      const std::int64_t output_channel = detail::make_divisible(static_cast<double>(stage.c) * w);
      for (std::int64_t i = 0; i < stage.n; ++i) {
        add(InvertedResidual(input_channel, output_channel, i == 0 ? stage.s : 1, stage.t));
        input_channel = output_channel;
      }
    }
    add(detail::conv_bn_relu6(input_channel, last_channel, 1));
    features = register_module("features", layers);
    fasterai::NamedSequential head;
    head->push_back("0", Dropout(DropoutOptions(options.dropout())));
    head->push_back("1", Linear(last_channel, options.num_classes()));
    classifier = register_module("classifier", head);
    reset_parameters();
  }

  // torchvision's initialization: Kaiming-normal (fan_out) convolutions, unit BatchNorm,
  // N(0, 0.01) classifier, zero biases.
  void reset_parameters() { detail::init_like_torchvision(*this); }

  torch::Tensor forward(torch::Tensor x) {
    x = features->forward(x);
    x = torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1);
    return classifier->forward(x);
  }

  MobileNetV2Options options;
  fasterai::NamedSequential features{nullptr}, classifier{nullptr};
};
TORCH_MODULE(MobileNetV2);

inline MobileNetV2 mobilenet_v2(std::int64_t num_classes = 1000) {
  return MobileNetV2(MobileNetV2Options().num_classes(num_classes));
}

}  // namespace fasterai::models
