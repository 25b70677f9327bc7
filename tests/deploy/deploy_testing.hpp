#pragma once
// What the deploy tests share: models made to look trained, and how far two outputs are apart.

#include <torch/torch.h>

namespace fasterai::testing {

// Running statistics away from (0, 1), as after training, so that folding has work to do.
inline void trained_looking(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules()) {
    if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      const auto n = bn->options.num_features();
      bn->weight.copy_(1.0 + 0.3 * torch::randn({n}));
      bn->bias.copy_(0.3 * torch::randn({n}));
      bn->running_mean.copy_(0.5 * torch::randn({n}));
      bn->running_var.copy_(0.5 + torch::rand({n}));
    }
  }
}

// The largest difference relative to the largest value of the expected output `b`.
inline double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max()).item<double>();
}

}  // namespace fasterai::testing
