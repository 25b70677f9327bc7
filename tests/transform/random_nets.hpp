#pragma once
// Random users' modules for property tests: networks of residual blocks (identity and
// projection shortcuts), concatenations of different widths, depthwise-separable and grouped
// convolutions, a module called twice, a sigmoid gate multiplied in, in-place activations, a
// flatten into a Linear. Each is a torch::nn::Module with a hand-written forward, as a user
// writes them; `description` says what was drawn.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "transform_testing.hpp"

namespace fasterai::testing {

namespace nn = torch::nn;

struct BlockImpl : nn::Module {
  virtual torch::Tensor forward(torch::Tensor x) = 0;
};

struct PlainImpl : BlockImpl {
  nn::Conv2d conv{nullptr};
  nn::BatchNorm2d bn{nullptr};
  bool in_place;
  PlainImpl(std::int64_t in, std::int64_t out, std::int64_t k, bool bias, bool batch_norm, bool in_place_relu,
            std::int64_t groups = 1)
      : in_place(in_place_relu) {
    conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(in, out, k).padding(k / 2).bias(bias).groups(groups)));
    if (batch_norm) bn = register_module("bn", nn::BatchNorm2d(out));
  }
  torch::Tensor forward(torch::Tensor x) override {
    x = conv(x);
    if (bn) x = bn(x);
    return in_place ? x.relu_() : torch::relu(x);
  }
};

struct ResidualImpl : BlockImpl {
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, project{nullptr};
  nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn_project{nullptr};
  ResidualImpl(std::int64_t in, std::int64_t mid, std::int64_t out, bool projection) {
    conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(in, mid, 3).padding(1).bias(false)));
    bn1 = register_module("bn1", nn::BatchNorm2d(mid));
    conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(mid, out, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", nn::BatchNorm2d(out));
    if (projection) {
      project = register_module("project", nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false)));
      bn_project = register_module("bn_project", nn::BatchNorm2d(out));
    }
  }
  torch::Tensor forward(torch::Tensor x) override {
    auto y = torch::relu(bn1(conv1(x)));
    y = bn2(conv2(y));
    auto shortcut = project ? bn_project(project(x)) : x;
    return torch::relu(y + shortcut);
  }
};

struct ConcatImpl : BlockImpl {
  nn::Conv2d a{nullptr}, b{nullptr};
  nn::BatchNorm2d bn{nullptr};
  ConcatImpl(std::int64_t in, std::int64_t wa, std::int64_t wb) {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(in, wa, 1)));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(in, wb, 3).padding(1).bias(false)));
    bn = register_module("bn", nn::BatchNorm2d(wb));
  }
  torch::Tensor forward(torch::Tensor x) override {
    return torch::cat({torch::relu(a(x)), torch::relu(bn(b(x)))}, 1);
  }
};

struct SeparableImpl : BlockImpl {
  nn::Conv2d dw{nullptr}, pw{nullptr};
  nn::BatchNorm2d bn_dw{nullptr}, bn_pw{nullptr};
  SeparableImpl(std::int64_t in, std::int64_t out) {
    dw = register_module("dw", nn::Conv2d(nn::Conv2dOptions(in, in, 3).padding(1).groups(in).bias(false)));
    bn_dw = register_module("bn_dw", nn::BatchNorm2d(in));
    pw = register_module("pw", nn::Conv2d(nn::Conv2dOptions(in, out, 1).bias(false)));
    bn_pw = register_module("bn_pw", nn::BatchNorm2d(out));
  }
  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu6(bn_dw(dw(x)));
    return torch::relu(bn_pw(pw(x)));
  }
};

struct SharedImpl : BlockImpl {
  nn::Conv2d conv{nullptr};
  explicit SharedImpl(std::int64_t channels) {
    conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(channels, channels, 3).padding(1)));
  }
  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu(conv(x));
    return torch::relu(conv(x));
  }
};

struct GateImpl : BlockImpl {  // x · sigmoid(conv(x)), squeeze-and-excitation's shape
  nn::Conv2d gate{nullptr};
  explicit GateImpl(std::int64_t channels) {
    gate = register_module("gate", nn::Conv2d(nn::Conv2dOptions(channels, channels, 1)));
  }
  torch::Tensor forward(torch::Tensor x) override { return x * torch::sigmoid(gate(x)); }
};

struct PoolImpl : BlockImpl {
  torch::Tensor forward(torch::Tensor x) override { return torch::max_pool2d(x, 2); }
};

struct RandomNetImpl : nn::Module {
  std::vector<std::shared_ptr<BlockImpl>> blocks;
  nn::Linear fc{nullptr}, head{nullptr};
  std::int64_t pool = 1;
  std::string description;

  RandomNetImpl(std::uint64_t seed, std::int64_t in, std::int64_t size) {
    std::mt19937_64 rng(seed);
    auto uniform = [&](std::int64_t lo, std::int64_t hi) { return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng); };
    auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
    std::ostringstream os;
    std::int64_t c = in, spatial = size;
    const auto depth = uniform(2, 6);
    for (std::int64_t i = 0; i < depth; ++i) {
      std::shared_ptr<BlockImpl> block;
      const auto kind = uniform(0, 6);
      const auto width = uniform(2, 12);
      switch (kind) {
        case 0: {
          const auto k = chance(0.5) ? 1 : 3;
          block = std::make_shared<PlainImpl>(c, width, k, chance(0.5), chance(0.7), chance(0.5));
          os << "plain " << c << "->" << width << " k" << k << "; ";
          c = width;
          break;
        }
        case 1: {
          const bool projection = chance(0.5) || c < 2;
          const auto out = projection ? width : c;
          block = std::make_shared<ResidualImpl>(c, uniform(2, 10), out, projection);
          os << "residual " << c << "->" << out << (projection ? " projection" : " identity") << "; ";
          c = out;
          break;
        }
        case 2: {
          const auto wa = uniform(1, 6), wb = uniform(1, 6);
          block = std::make_shared<ConcatImpl>(c, wa, wb);
          os << "concat " << c << "->" << wa << "+" << wb << "; ";
          c = wa + wb;
          break;
        }
        case 3:
          block = std::make_shared<SeparableImpl>(c, width);
          os << "separable " << c << "->" << width << "; ";
          c = width;
          break;
        case 4: {
          // Groups dividing both widths.
          std::int64_t groups = 1;
          for (std::int64_t g : {4, 3, 2})
            if (c % g == 0 && chance(0.7)) {
              groups = g;
              break;
            }
          const auto out = groups * uniform(1, 4);
          block = std::make_shared<PlainImpl>(c, out, 3, chance(0.5), true, false, groups);
          os << "grouped " << c << "->" << out << " g" << groups << "; ";
          c = out;
          break;
        }
        case 5:
          block = std::make_shared<SharedImpl>(c);
          os << "shared " << c << " twice; ";
          break;
        case 6:
          if (chance(0.5) && spatial >= 2) {
            block = std::make_shared<PoolImpl>();
            spatial /= 2;
            os << "maxpool; ";
          } else {
            block = std::make_shared<GateImpl>(c);
            os << "gate " << c << "; ";
          }
          break;
      }
      blocks.push_back(register_module("block" + std::to_string(i), block));
    }
    pool = std::min<std::int64_t>(spatial, uniform(1, 2));
    const auto hidden = uniform(2, 12);
    fc = register_module("fc", nn::Linear(c * pool * pool, hidden));
    head = register_module("head", nn::Linear(hidden, uniform(2, 5)));
    os << "pool " << pool << ", fc " << c * pool * pool << "->" << hidden;
    description = os.str();
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& b : blocks) x = b->forward(x);
    x = torch::flatten(torch::adaptive_avg_pool2d(x, {pool, pool}), 1);
    return head(torch::relu(fc(x)));
  }
};
TORCH_MODULE(RandomNet);


// Case k of a property test: a random net drawn from seed `base + k` (torch's generator seeded
// with it too), with trained-looking BatchNorms, in eval mode; its input has `in` channels of
// `size`×`size`.
struct RandomCase {
  std::uint64_t seed;
  std::int64_t in, size;
  RandomNet net;
};
inline RandomCase random_case(std::uint64_t base, int k) {
  const std::uint64_t seed = base + std::uint64_t(k);
  torch::manual_seed(seed);
  const std::int64_t in = 1 + k % 3, size = 6 + k % 5;
  RandomNet net(seed, in, size);
  randomize_batch_norms(*net);
  net->eval();
  return {seed, in, size, net};
}

}  // namespace fasterai::testing
