#pragma once
// The Vision Transformer (Dosovitskiy et al., 2021) written the way a LibTorch user writes a
// transformer: module classes with a hand-written forward, `torch::nn::MultiheadAttention`,
// a class token and a position embedding as plain parameters. Parameter names, shapes and
// initialization equal torchvision 0.14's VisionTransformer (`conv_proj`, `class_token`,
// `encoder.pos_embedding`, `encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp}`,
// `encoder.ln`, `heads.head`), so `torch.save(model.state_dict())` files from Python load as
// they are and give PyTorch's logits. ViT-B/16 with 1000 classes has 86,567,656 parameters.
//
//   auto vit = fasterai::models::vit_b_16(/*num_classes=*/10);
//   auto small = fasterai::models::VisionTransformer(
//       fasterai::models::VisionTransformerOptions(28, 7).in_channels(1).num_layers(4)
//           .num_heads(4).hidden_dim(64).mlp_dim(128).num_classes(10));
//
// Through the traced graph, each block's MLP hidden units (mlp.0's outputs, read by mlp.3
// through GELU) are removed exactly; the hidden size, which every LayerNorm normalises over, only
// with approximate pruning, and with it whole heads: LibTorch's MultiheadAttention ties its
// heads to the width it reads, so half the hidden size is half the heads (num_heads follows).

#include <cmath>
#include <cstdint>
#include <string>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>

namespace fasterai::models {

struct VisionTransformerOptions {
  VisionTransformerOptions(std::int64_t image_size, std::int64_t patch_size)
      : image_size_(image_size), patch_size_(patch_size) {}
  TORCH_ARG(std::int64_t, image_size);
  TORCH_ARG(std::int64_t, patch_size);
  TORCH_ARG(std::int64_t, in_channels) = 3;
  TORCH_ARG(std::int64_t, num_layers) = 12;
  TORCH_ARG(std::int64_t, num_heads) = 12;
  TORCH_ARG(std::int64_t, hidden_dim) = 768;
  TORCH_ARG(std::int64_t, mlp_dim) = 3072;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(double, attention_dropout) = 0.0;
  TORCH_ARG(std::int64_t, num_classes) = 1000;
};

// One pre-norm encoder block: x + attention(ln_1(x)), then + mlp(ln_2(·)).
class EncoderBlockImpl : public torch::nn::Cloneable<EncoderBlockImpl> {
 public:
  EncoderBlockImpl(std::int64_t num_heads, std::int64_t hidden_dim, std::int64_t mlp_dim, double dropout,
                   double attention_dropout)
      : num_heads_(num_heads), hidden_dim_(hidden_dim), mlp_dim_(mlp_dim), dropout_p_(dropout),
        attention_dropout_(attention_dropout) {
    reset();
  }

  void reset() override {
    using namespace torch::nn;
    const auto num_heads = num_heads_, hidden_dim = hidden_dim_, mlp_dim = mlp_dim_;
    const double dropout = dropout_p_, attention_dropout = attention_dropout_;
    ln_1 = register_module("ln_1", LayerNorm(LayerNormOptions({hidden_dim}).eps(1e-6)));
    self_attention = register_module(
        "self_attention", MultiheadAttention(MultiheadAttentionOptions(hidden_dim, num_heads).dropout(attention_dropout)));
    dropout_ = register_module("dropout", Dropout(dropout));
    ln_2 = register_module("ln_2", LayerNorm(LayerNormOptions({hidden_dim}).eps(1e-6)));
    mlp = register_module("mlp", fasterai::NamedSequential());
    mlp->push_back("0", Linear(hidden_dim, mlp_dim));
    mlp->push_back("1", GELU());
    mlp->push_back("2", Dropout(dropout));
    mlp->push_back("3", Linear(mlp_dim, hidden_dim));
    mlp->push_back("4", Dropout(dropout));
    torch::NoGradGuard no_grad;  // torchvision's MLPBlock initialization
    for (auto& m : mlp->modules(/*include_self=*/false))
      if (auto* linear = m->as<LinearImpl>()) {
        init::xavier_uniform_(linear->weight);
        init::normal_(linear->bias, 0.0, 1e-6);
      }
  }

  torch::Tensor forward(const torch::Tensor& input) {
    // LibTorch's MultiheadAttention reads [tokens, batch, hidden]; the model keeps batch first.
    auto x = ln_1(input).transpose(0, 1);
    x = std::get<0>(self_attention->forward(x, x, x, torch::Tensor(), /*need_weights=*/false)).transpose(0, 1);
    x = dropout_(x) + input;
    return x + mlp(ln_2(x));
  }

  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  torch::nn::MultiheadAttention self_attention{nullptr};
  fasterai::NamedSequential mlp{nullptr};

 private:
  std::int64_t num_heads_, hidden_dim_, mlp_dim_;
  double dropout_p_, attention_dropout_;
  torch::nn::Dropout dropout_{nullptr};
};
TORCH_MODULE(EncoderBlock);

// The position embedding, the blocks and the final LayerNorm.
class EncoderImpl : public torch::nn::Cloneable<EncoderImpl> {
 public:
  EncoderImpl(std::int64_t seq_length, const VisionTransformerOptions& o) : seq_length_(seq_length), options_(o) {
    reset();
  }

  void reset() override {
    const auto seq_length = seq_length_;
    const auto& o = options_;
    pos_embedding = register_parameter("pos_embedding", torch::empty({1, seq_length, o.hidden_dim()}));
    {
      torch::NoGradGuard no_grad;
      pos_embedding.normal_(0.0, 0.02);  // from BERT, as torchvision
    }
    dropout_ = register_module("dropout", torch::nn::Dropout(o.dropout()));
    layers = register_module("layers", fasterai::NamedSequential());
    for (std::int64_t i = 0; i < o.num_layers(); ++i)
      layers->push_back("encoder_layer_" + std::to_string(i),
                        EncoderBlock(o.num_heads(), o.hidden_dim(), o.mlp_dim(), o.dropout(), o.attention_dropout()));
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.hidden_dim()}).eps(1e-6)));
  }

  torch::Tensor forward(const torch::Tensor& input) { return ln(layers(dropout_(input + pos_embedding))); }

  torch::Tensor pos_embedding;
  fasterai::NamedSequential layers{nullptr};
  torch::nn::LayerNorm ln{nullptr};

 private:
  std::int64_t seq_length_;
  VisionTransformerOptions options_;
  torch::nn::Dropout dropout_{nullptr};
};
TORCH_MODULE(Encoder);

// Cloneable: clone() is a deep copy, also after pruning changed the widths of its layers.
class VisionTransformerImpl : public torch::nn::Cloneable<VisionTransformerImpl> {
 public:
  explicit VisionTransformerImpl(const VisionTransformerOptions& o) : options(o) { reset(); }

  void reset() override {
    const auto& o = options;
    constexpr auto where = "fasterai::models::VisionTransformer";
    fasterai::detail::check_argument(o.patch_size() > 0 && o.image_size() > 0 && o.image_size() % o.patch_size() == 0, where,
                           "image_size", o.image_size(), "a positive multiple of patch_size");
    fasterai::detail::check_argument(o.num_heads() > 0 && o.hidden_dim() % o.num_heads() == 0, where, "hidden_dim",
                           o.hidden_dim(), "a multiple of num_heads");
    for (auto [name, v] : {std::pair<const char*, std::int64_t>{"in_channels", o.in_channels()},
                           {"num_layers", o.num_layers()},
                           {"mlp_dim", o.mlp_dim()},
                           {"num_classes", o.num_classes()}})
      fasterai::detail::check_argument(v > 0, where, name, v, "a positive count");
    using namespace torch::nn;
    conv_proj = register_module("conv_proj", Conv2d(Conv2dOptions(o.in_channels(), o.hidden_dim(), o.patch_size())
                                                        .stride(o.patch_size())));
    class_token = register_parameter("class_token", torch::zeros({1, 1, o.hidden_dim()}));
    const auto patches = o.image_size() / o.patch_size();
    encoder = register_module("encoder", Encoder(patches * patches + 1, o));
    heads = register_module("heads", fasterai::NamedSequential());
    heads->push_back("head", Linear(o.hidden_dim(), o.num_classes()));
    torch::NoGradGuard no_grad;
    const double fan_in = static_cast<double>(conv_proj->weight[0].numel());
    truncated_normal_(conv_proj->weight, std::sqrt(1.0 / fan_in));
    conv_proj->bias.zero_();
    for (auto& p : heads->parameters()) p.zero_();  // torchvision zeroes the head
  }

  torch::Tensor forward(const torch::Tensor& x) {
    const auto n = x.size(0);
    // [N, hidden, h, w] -> [N, h·w, hidden]: one token per patch.
    auto tokens = conv_proj(x).flatten(2).transpose(1, 2);
    tokens = torch::cat({class_token.expand({n, -1, -1}), tokens}, 1);
    return heads(encoder(tokens).select(1, 0));
  }

  VisionTransformerOptions options;
  torch::nn::Conv2d conv_proj{nullptr};
  torch::Tensor class_token;
  Encoder encoder{nullptr};
  fasterai::NamedSequential heads{nullptr};

 private:
  // torch.nn.init.trunc_normal_(std) with its default bounds ±2 (absolute), by redrawing.
  static void truncated_normal_(torch::Tensor& t, double std) {
    t.normal_(0.0, std);
    for (auto outside = t.abs().gt(2.0); outside.any().item<bool>(); outside = t.abs().gt(2.0))
      t.masked_scatter_(outside, torch::randn({outside.sum().item<std::int64_t>()}, t.options()) * std);
  }
};
TORCH_MODULE(VisionTransformer);

// ViT-B/16: 224², patches of 16, 12 layers of 12 heads, hidden 768, MLP 3072.
inline VisionTransformer vit_b_16(std::int64_t num_classes = 1000) {
  return VisionTransformer(VisionTransformerOptions(224, 16).num_classes(num_classes));
}

inline VisionTransformer vit(const VisionTransformerOptions& options) { return VisionTransformer(options); }

}  // namespace fasterai::models
