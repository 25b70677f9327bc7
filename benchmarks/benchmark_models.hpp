#pragma once
// What several benchmark files need of an untrained network: BatchNorms that look trained, so
// that folding them changes the weights as it would on a real model, and one thread for both
// LibTorch and the BLAS behind it.

#include <torch/torch.h>

#include <fasterai/core/latency.hpp>

namespace fasterai::bench {

// γ, β and running statistics away from (1, 0, 0, 1), as after training. Latency does not
// depend on the values, but BatchNorm folding and quantization ranges do.
inline void trained_looking_batch_norms(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules(/*include_self=*/false))
    if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      const auto n = bn->options.num_features();
      bn->weight.copy_(1.0 + 0.3 * torch::randn({n}));
      bn->bias.copy_(0.3 * torch::randn({n}));
      bn->running_mean.copy_(0.5 * torch::randn({n}));
      bn->running_var.copy_(0.5 + torch::rand({n}));
    }
}

// torch::set_num_threads(1) and OpenBLAS's pool to one thread when OpenBLAS is loaded (its
// pool ignores torch::set_num_threads; see core/latency.hpp).
inline void one_thread() {
  torch::set_num_threads(1);
  detail::BlasThreads::set(1);
}

}  // namespace fasterai::bench
