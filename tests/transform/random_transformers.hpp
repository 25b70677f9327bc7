#pragma once
// Random transformers and modern CNNs for property tests, written as a LibTorch user writes
// them: vision transformers (a patch convolution, `flatten(2).transpose(1, 2)`, a class token
// concatenated along the tokens, a learned position embedding), text encoders (an Embedding of
// token ids), Conv1d stems, pre- and post-norm blocks whose attention is either
// `torch::nn::MultiheadAttention` or written with Linears (fused qkv or separate q, k, v),
// GELU/ReLU MLPs, and ConvNeXt-style blocks (depthwise conv, NCHW -> NHWC, LayerNorm, MLP, layer
// scale, NHWC -> NCHW) with GroupNorm stages. `description` says what was drawn.

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace fasterai::testing {

namespace tnn = torch::nn;

// The MLP of a transformer block: the hidden units are what exact pruning removes.
struct MlpImpl : tnn::Module {
  tnn::Linear fc1{nullptr}, fc2{nullptr};
  bool gelu;
  MlpImpl(std::int64_t d, std::int64_t hidden, bool use_gelu) : gelu(use_gelu) {
    fc1 = register_module("fc1", tnn::Linear(d, hidden));
    fc2 = register_module("fc2", tnn::Linear(hidden, d));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = fc1(x);
    return fc2(gelu ? torch::gelu(x) : torch::relu(x));
  }
};
TORCH_MODULE(Mlp);

// Self-attention written with Linears: [N, T, D] -> [N, T, D]. The head count is read from
// the width (`reshape({n, t, -1, head_dim})`), so that it follows when whole heads go; the
// scale 1/√head_dim stays.
struct LinearAttentionImpl : tnn::Module {
  tnn::Linear qkv{nullptr}, q{nullptr}, k{nullptr}, v{nullptr}, out{nullptr};
  std::int64_t head_dim;
  LinearAttentionImpl(std::int64_t d, std::int64_t num_heads, bool fused) : head_dim(d / num_heads) {
    if (fused) {
      qkv = register_module("qkv", tnn::Linear(d, 3 * d));
    } else {
      q = register_module("q", tnn::Linear(d, d));
      k = register_module("k", tnn::Linear(d, d));
      v = register_module("v", tnn::Linear(d, d));
    }
    out = register_module("out", tnn::Linear(d, d));
  }
  // The number of heads now.
  std::int64_t heads() const { return out->weight.size(1) / head_dim; }
  torch::Tensor forward(torch::Tensor x) {
    const auto n = x.size(0), t = x.size(1);
    torch::Tensor qx, kx, vx;
    if (qkv) {
      auto parts = qkv(x).chunk(3, -1);
      qx = parts[0], kx = parts[1], vx = parts[2];
    } else {
      qx = q(x), kx = k(x), vx = v(x);
    }
    auto split = [&](const torch::Tensor& y) { return y.reshape({n, t, -1, head_dim}).transpose(1, 2); };
    qx = split(qx), kx = split(kx), vx = split(vx);
    auto scores = torch::matmul(qx, kx.transpose(-2, -1)) / std::sqrt(static_cast<double>(head_dim));
    auto y = torch::matmul(torch::softmax(scores, -1), vx);
    return out(y.transpose(1, 2).reshape({n, t, -1}));
  }
};
TORCH_MODULE(LinearAttention);

struct EncoderBlockImpl : tnn::Module {
  tnn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  LinearAttention attention{nullptr};
  tnn::MultiheadAttention self_attention{nullptr};
  Mlp mlp{nullptr};
  bool pre_norm;
  EncoderBlockImpl(std::int64_t d, std::int64_t heads, std::int64_t hidden, bool pre, int attention_kind,
                   bool gelu)
      : pre_norm(pre) {
    ln_1 = register_module("ln_1", tnn::LayerNorm(tnn::LayerNormOptions({d})));
    ln_2 = register_module("ln_2", tnn::LayerNorm(tnn::LayerNormOptions({d})));
    if (attention_kind == 2)
      self_attention = register_module("self_attention", tnn::MultiheadAttention(d, heads));
    else
      attention = register_module("attention", LinearAttention(d, heads, attention_kind == 1));
    mlp = register_module("mlp", Mlp(d, hidden, gelu));
  }
  torch::Tensor attend(const torch::Tensor& x) {
    if (attention) return attention(x);
    auto t = x.transpose(0, 1);  // LibTorch's MultiheadAttention reads [T, N, D]
    return std::get<0>(self_attention(t, t, t)).transpose(0, 1);
  }
  torch::Tensor forward(torch::Tensor x) {
    if (pre_norm) {
      x = x + attend(ln_1(x));
      return x + mlp(ln_2(x));
    }
    x = ln_1(x + attend(x));
    return ln_2(x + mlp(x));
  }
};
TORCH_MODULE(EncoderBlock);

// ConvNeXt's block: depthwise 7x7 (here k), channels last, LayerNorm, MLP, layer scale, back.
struct ConvNeXtBlockImpl : tnn::Module {
  tnn::Conv2d dwconv{nullptr};
  tnn::LayerNorm norm{nullptr};
  tnn::Linear pwconv1{nullptr}, pwconv2{nullptr};
  torch::Tensor gamma;
  ConvNeXtBlockImpl(std::int64_t c, std::int64_t k) {
    dwconv = register_module("dwconv", tnn::Conv2d(tnn::Conv2dOptions(c, c, k).padding(k / 2).groups(c)));
    norm = register_module("norm", tnn::LayerNorm(tnn::LayerNormOptions({c}).eps(1e-6)));
    pwconv1 = register_module("pwconv1", tnn::Linear(c, 4 * c));
    pwconv2 = register_module("pwconv2", tnn::Linear(4 * c, c));
    gamma = register_parameter("gamma", 0.5 + torch::rand({c}));
  }
  torch::Tensor forward(torch::Tensor x) {
    auto y = dwconv(x).permute({0, 2, 3, 1});
    y = pwconv2(torch::gelu(pwconv1(norm(y))));
    return x + (gamma * y).permute({0, 3, 1, 2});
  }
};
TORCH_MODULE(ConvNeXtBlock);

// A convolution with GroupNorm and a residual, as in ResNets trained with small batches.
struct GroupNormStageImpl : tnn::Module {
  tnn::Conv2d conv1{nullptr}, conv2{nullptr};
  tnn::GroupNorm gn1{nullptr}, gn2{nullptr};
  GroupNormStageImpl(std::int64_t c, std::int64_t mid, std::int64_t groups) {
    conv1 = register_module("conv1", tnn::Conv2d(tnn::Conv2dOptions(c, mid, 3).padding(1).bias(false)));
    gn1 = register_module("gn1", tnn::GroupNorm(tnn::GroupNormOptions(groups, mid)));
    conv2 = register_module("conv2", tnn::Conv2d(tnn::Conv2dOptions(mid, c, 1).bias(false)));
    gn2 = register_module("gn2", tnn::GroupNorm(tnn::GroupNormOptions(1, c)));
  }
  torch::Tensor forward(torch::Tensor x) { return x + gn2(conv2(torch::relu(gn1(conv1(x))))); }
};
TORCH_MODULE(GroupNormStage);

struct RandomTransformerImpl : tnn::Module {
  enum Kind { Vision, Text, Signal, ConvNeXt };
  Kind kind;
  std::int64_t size = 0, vocabulary = 0, length = 0, in_channels = 1;
  bool class_token_used = false, mean_pool = false;
  tnn::Conv2d conv_proj{nullptr};
  tnn::Conv1d stem1d{nullptr};
  tnn::Embedding embedding{nullptr};
  torch::Tensor class_token, pos_embedding;
  std::vector<EncoderBlock> blocks;
  std::vector<std::shared_ptr<tnn::Module>> stages;  // ConvNeXt: blocks and GroupNorm stages
  tnn::LayerNorm ln{nullptr};
  tnn::Linear head{nullptr};
  std::string description;

  RandomTransformerImpl(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
    auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
    std::ostringstream os;
    kind = static_cast<Kind>(uniform(0, 3));
    const auto heads = uniform(1, 3);
    const auto d = heads * uniform(2, 4);
    const auto classes = uniform(2, 5);
    if (kind == ConvNeXt) {
      in_channels = uniform(1, 3);
      size = uniform(4, 7);
      const auto c = 2 * uniform(2, 4);
      conv_proj = register_module("conv_proj", tnn::Conv2d(tnn::Conv2dOptions(in_channels, c, 2).stride(1)));
      os << "convnext " << in_channels << "->" << c << ": ";
      const auto depth = uniform(1, 3);
      for (std::int64_t i = 0; i < depth; ++i) {
        std::shared_ptr<tnn::Module> stage;
        if (chance(0.7)) {
          stage = std::make_shared<ConvNeXtBlockImpl>(c, chance(0.5) ? 3 : 5);
          os << "block; ";
        } else {
          const auto groups = chance(0.5) ? 2 : 1;
          stage = std::make_shared<GroupNormStageImpl>(c, 2 * uniform(1, 4), groups);
          os << "groupnorm stage g" << groups << "; ";
        }
        stages.push_back(register_module("stage" + std::to_string(i), stage));
      }
      head = register_module("head", tnn::Linear(c, classes));
      description = os.str();
      return;
    }
    length = uniform(3, 6);
    std::int64_t tokens = length;
    switch (kind) {
      case Vision: {
        in_channels = uniform(1, 3);
        const auto patch = uniform(1, 2);
        size = patch * uniform(2, 3);
        conv_proj = register_module("conv_proj", tnn::Conv2d(tnn::Conv2dOptions(in_channels, d, patch).stride(patch)));
        tokens = (size / patch) * (size / patch);
        class_token_used = chance(0.7);
        os << "vit " << in_channels << "x" << size << "x" << size << " patch " << patch;
        break;
      }
      case Text:
        vocabulary = uniform(5, 20);
        embedding = register_module("embedding", tnn::Embedding(vocabulary, d));
        os << "text vocabulary " << vocabulary << " length " << length;
        break;
      case Signal:
        in_channels = uniform(1, 3);
        stem1d = register_module("stem", tnn::Conv1d(tnn::Conv1dOptions(in_channels, d, 3).padding(1)));
        os << "conv1d stem " << in_channels << " length " << length;
        break;
      case ConvNeXt:
        break;
    }
    if (class_token_used) {
      class_token = register_parameter("class_token", 0.1 * torch::randn({1, 1, d}));
      ++tokens;
      os << " + class token";
    }
    if (kind != Signal || chance(0.5)) {
      pos_embedding = register_parameter("pos_embedding", 0.1 * torch::randn({1, tokens, d}));
      os << " + position embedding";
    }
    mean_pool = !class_token_used;
    os << ", d " << d << " heads " << heads << ": ";
    const auto depth = uniform(1, 3);
    for (std::int64_t i = 0; i < depth; ++i) {
      const bool pre = chance(0.7);
      const int attention = static_cast<int>(uniform(0, 2));
      const auto hidden = uniform(2, 4) * d;
      const bool gelu = chance(0.6);
      blocks.push_back(register_module("block" + std::to_string(i), EncoderBlock(d, heads, hidden, pre, attention, gelu)));
      os << (pre ? "pre" : "post") << "-norm " << (attention == 2 ? "mha" : attention == 1 ? "fused qkv" : "q,k,v")
         << " mlp " << hidden << (gelu ? " gelu" : " relu") << "; ";
    }
    ln = register_module("ln", tnn::LayerNorm(tnn::LayerNormOptions({d})));
    head = register_module("head", tnn::Linear(d, classes));
    os << (mean_pool ? "mean pool" : "class token pool");
    description = os.str();
  }

  // A batch of `n` inputs this model reads.
  torch::Tensor example(std::int64_t n) const {
    switch (kind) {
      case Text: return torch::randint(vocabulary, {n, length}, torch::kLong);
      case Signal: return torch::randn({n, in_channels, length});
      default: return torch::randn({n, in_channels, size, size});
    }
  }

  torch::Tensor forward(torch::Tensor x) {
    if (kind == ConvNeXt) {
      x = conv_proj(x);
      for (auto& s : stages) {
        if (auto* b = s->as<ConvNeXtBlockImpl>()) x = b->forward(x);
        else x = s->as<GroupNormStageImpl>()->forward(x);
      }
      return head(x.mean({2, 3}));
    }
    if (kind == Vision) x = conv_proj(x).flatten(2).transpose(1, 2);
    else if (kind == Text) x = embedding(x);
    else x = stem1d(x).transpose(1, 2);
    if (class_token_used) x = torch::cat({class_token.expand({x.size(0), -1, -1}), x}, 1);
    if (pos_embedding.defined()) x = x + pos_embedding;
    for (auto& b : blocks) x = b(x);
    x = ln(x);
    return head(mean_pool ? x.mean(1) : x.select(1, 0));
  }
};
TORCH_MODULE(RandomTransformer);

}  // namespace fasterai::testing
