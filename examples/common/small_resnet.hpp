#pragma once
// The small residual network of examples/train_residual and examples/toolbox_results, written as
// a LibTorch user writes one: module classes with residual additions in forward (stem, three
// blocks of 32/32/64 channels, a linear head), for 1x28x28 images and 10 classes.

#include <torch/torch.h>

namespace example {

namespace nn = torch::nn;

// conv-BN-ReLU-conv-BN plus the input (projected when the shape changes), then ReLU.
// Cloneable, so that a copy of each compression stage can be kept (children are cloned with
// their pruned shapes).
struct BlockImpl : nn::Cloneable<BlockImpl> {
  std::int64_t in, out, stride;
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, project{nullptr};
  nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn_project{nullptr};
  BlockImpl(std::int64_t in_channels, std::int64_t out_channels, std::int64_t stride_)
      : in(in_channels), out(out_channels), stride(stride_) {
    reset();
  }
  void reset() override {
    conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)));
    bn1 = register_module("bn1", nn::BatchNorm2d(out));
    conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      project = register_module("project", nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)));
      bn_project = register_module("bn_project", nn::BatchNorm2d(out));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    auto y = bn2(conv2(torch::relu(bn1(conv1(x)))));
    return torch::relu(y + (project ? bn_project(project(x)) : x));
  }
};
TORCH_MODULE(Block);

struct SmallResNetImpl : nn::Cloneable<SmallResNetImpl> {
  nn::Conv2d stem{nullptr};
  nn::BatchNorm2d bn{nullptr};
  Block block1{nullptr}, block2{nullptr}, block3{nullptr};
  nn::Linear fc{nullptr};
  SmallResNetImpl() { reset(); }
  void reset() override {
    stem = register_module("stem", nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1).bias(false)));
    bn = register_module("bn", nn::BatchNorm2d(32));
    block1 = register_module("block1", Block(32, 32, 1));
    block2 = register_module("block2", Block(32, 64, 2));
    block3 = register_module("block3", Block(64, 64, 2));
    fc = register_module("fc", nn::Linear(64, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn(stem(x)));
    x = block3(block2(block1(x)));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(SmallResNet);

}  // namespace example
