#pragma once
// The small network whose statistics the core, layers and graph tests compute by hand.

#include <torch/torch.h>

namespace fasterai::testing {

// Conv(3->4, 3x3, pad 1) on 8x8, BN, ReLU, MaxPool 2 -> 4x4, Flatten, Linear(64 -> 5).
inline torch::nn::Sequential hand_built() {
  namespace nn = torch::nn;
  nn::Sequential m;
  m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3).padding(1)));
  m->push_back("bn", nn::BatchNorm2d(4));
  m->push_back("relu", nn::ReLU());
  m->push_back("pool", nn::MaxPool2d(2));
  m->push_back("flatten", nn::Flatten());
  m->push_back("fc", nn::Linear(64, 5));
  return m;
}

}  // namespace fasterai::testing
