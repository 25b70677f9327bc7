#pragma once
// ConvNeXt (Liu et al., 2022) written the way a LibTorch user writes it: each block a depthwise
// 7x7 convolution, a permute to channels-last, a LayerNorm and an MLP of two Linears on the
// channels, a permute back and a learned layer scale, added to its input. Parameter names,
// shapes and initialization equal torchvision 0.14's (`features.1.0.block.0.weight`,
// `features.1.0.layer_scale`, `classifier.2.weight`), so `torch.save(model.state_dict())` files
// from Python load as they are and give PyTorch's logits. ConvNeXt-Tiny with 1000 classes has
// 28,589,128 parameters.
//
//   auto convnext = fasterai::models::convnext_tiny(/*num_classes=*/10);
//
// Through the traced graph, each block's MLP hidden units are removed exactly; the stage widths,
// which LayerNorms normalise over, only with approximate pruning.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>

namespace fasterai::models {

// torchvision's Permute: a parameter-free module, so that a block is one Sequential.
class PermuteImpl : public torch::nn::Cloneable<PermuteImpl> {
 public:
  explicit PermuteImpl(std::vector<std::int64_t> dims) : dims_(std::move(dims)) {}
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) { return x.permute(dims_); }

 private:
  std::vector<std::int64_t> dims_;
};
TORCH_MODULE(Permute);

// A LayerNorm over the channels of an NCHW tensor (torchvision's LayerNorm2d): channels-last,
// normalised, and back. It is a LayerNorm, so the LayerNorm rule applies to it.
class LayerNorm2dImpl : public torch::nn::LayerNormImpl {
 public:
  explicit LayerNorm2dImpl(std::int64_t channels)
      : torch::nn::LayerNormImpl(torch::nn::LayerNormOptions({channels}).eps(1e-6)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::layer_norm(x.permute({0, 2, 3, 1}), options.normalized_shape(), weight, bias, options.eps())
        .permute({0, 3, 1, 2});
  }
  // A LayerNorm2d again (LayerNorm's own clone would make a plain LayerNorm of it).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<torch::Device>& device = c10::nullopt) const override {
    auto copy = std::make_shared<LayerNorm2dImpl>(options.normalized_shape().front());
    copy->options = options;
    torch::NoGradGuard no_grad;
    copy->weight.set_data(device ? weight.to(*device) : weight.clone());
    copy->bias.set_data(device ? bias.to(*device) : bias.clone());
    return copy;
  }
};
TORCH_MODULE(LayerNorm2d);

class CNBlockImpl : public torch::nn::Cloneable<CNBlockImpl> {
 public:
  CNBlockImpl(std::int64_t dim, double layer_scale_init) : dim_(dim), layer_scale_init_(layer_scale_init) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto dim = dim_;
    block = register_module("block", fasterai::NamedSequential());
    block->push_back("0", Conv2d(Conv2dOptions(dim, dim, 7).padding(3).groups(dim)));
    block->push_back("1", Permute(std::vector<std::int64_t>{0, 2, 3, 1}));
    block->push_back("2", LayerNorm(LayerNormOptions({dim}).eps(1e-6)));
    block->push_back("3", Linear(dim, 4 * dim));
    block->push_back("4", GELU());
    block->push_back("5", Linear(4 * dim, dim));
    block->push_back("6", Permute(std::vector<std::int64_t>{0, 3, 1, 2}));
    layer_scale = register_parameter("layer_scale", torch::full({dim, 1, 1}, layer_scale_init_));
  }
  // Stochastic depth is the identity at inference, and fasterai fine-tunes without it.
  torch::Tensor forward(const torch::Tensor& input) { return layer_scale * block(input) + input; }

  fasterai::NamedSequential block{nullptr};
  torch::Tensor layer_scale;

 private:
  std::int64_t dim_;
  double layer_scale_init_;
};
TORCH_MODULE(CNBlock);

// One stage: `num_layers` blocks of `input_channels`, then a downsampling to `out_channels`
// (none for the last stage).
struct CNBlockConfig {
  std::int64_t input_channels;
  std::optional<std::int64_t> out_channels;
  std::int64_t num_layers;
};

struct ConvNeXtOptions {
  explicit ConvNeXtOptions(std::vector<CNBlockConfig> block_setting) : block_setting_(std::move(block_setting)) {}
  TORCH_ARG(std::vector<CNBlockConfig>, block_setting);
  TORCH_ARG(double, layer_scale) = 1e-6;
  TORCH_ARG(std::int64_t, in_channels) = 3;
  TORCH_ARG(std::int64_t, num_classes) = 1000;
};

// Cloneable: clone() is a deep copy, also after pruning changed the widths of its layers.
class ConvNeXtImpl : public torch::nn::Cloneable<ConvNeXtImpl> {
 public:
  explicit ConvNeXtImpl(const ConvNeXtOptions& o) : options(o) { reset(); }

  void reset() override {
    using namespace torch::nn;
    const auto& o = options;
    constexpr auto where = "fasterai::models::ConvNeXt";
    fasterai::detail::check_argument(!o.block_setting().empty(), where, "block_setting", "empty",
                                     "at least one stage");
    fasterai::detail::check_argument(o.num_classes() > 0, where, "num_classes", o.num_classes(), "a positive count");
    for (const auto& s : o.block_setting())
      fasterai::detail::check_argument(s.input_channels > 0 && s.num_layers > 0, where, "block_setting",
                                       s.input_channels, "stages of positive widths and depths");
    features = register_module("features", fasterai::NamedSequential());
    const auto first = o.block_setting().front().input_channels;
    fasterai::NamedSequential stem;
    stem->push_back("0", Conv2d(Conv2dOptions(o.in_channels(), first, 4).stride(4)));
    stem->push_back("1", LayerNorm2d(first));
    features->push_back("0", stem);
    std::int64_t index = 1;
    for (const auto& s : o.block_setting()) {
      fasterai::NamedSequential stage;
      for (std::int64_t i = 0; i < s.num_layers; ++i)
        stage->push_back(std::to_string(i), CNBlock(s.input_channels, o.layer_scale()));
      features->push_back(std::to_string(index++), stage);
      if (s.out_channels) {
        fasterai::NamedSequential down;
        down->push_back("0", LayerNorm2d(s.input_channels));
        down->push_back("1", Conv2d(Conv2dOptions(s.input_channels, *s.out_channels, 2).stride(2)));
        features->push_back(std::to_string(index++), down);
      }
    }
    const auto& last = o.block_setting().back();
    const auto width = last.out_channels.value_or(last.input_channels);
    classifier = register_module("classifier", fasterai::NamedSequential());
    classifier->push_back("0", LayerNorm2d(width));
    classifier->push_back("1", Flatten(FlattenOptions().start_dim(1)));
    classifier->push_back("2", Linear(width, o.num_classes()));
    torch::NoGradGuard no_grad;  // torchvision: truncated normal (std 0.02, ±2), zero biases
    for (auto& m : modules(/*include_self=*/false)) {
      torch::Tensor weight, bias;
      if (auto* conv = m->as<Conv2dImpl>()) weight = conv->weight, bias = conv->bias;
      if (auto* linear = m->as<LinearImpl>()) weight = linear->weight, bias = linear->bias;
      if (!weight.defined()) continue;
      weight.normal_(0.0, 0.02).clamp_(-2.0, 2.0);  // |w| > 2 is a 100-sigma event at std 0.02
      if (bias.defined()) bias.zero_();
    }
  }

  torch::Tensor forward(const torch::Tensor& x) {
    return classifier(torch::adaptive_avg_pool2d(features(x), {1, 1}));
  }

  ConvNeXtOptions options;
  fasterai::NamedSequential features{nullptr}, classifier{nullptr};
};
TORCH_MODULE(ConvNeXt);

// ConvNeXt-Tiny: stages of 96, 192, 384, 768 channels and 3, 3, 9, 3 blocks.
inline ConvNeXt convnext_tiny(std::int64_t num_classes = 1000) {
  return ConvNeXt(ConvNeXtOptions({{96, 192, 3}, {192, 384, 3}, {384, 768, 9}, {768, std::nullopt, 3}})
                      .num_classes(num_classes));
}

}  // namespace fasterai::models
