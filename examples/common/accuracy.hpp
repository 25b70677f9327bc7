#pragma once
// Test accuracy of a Sequential, computed here for fp32 and int8 models alike (an int8 model
// has no parameters for a Learner to train).

#include <cstdint>

#include <torch/torch.h>

#include <fasterai/data/batches.hpp>

namespace example {

inline double accuracy(torch::nn::Sequential model, const fasterai::data::Batches& test) {
  c10::InferenceMode inference;
  model->eval();
  std::int64_t correct = 0, total = 0;
  test.for_each([&](const torch::data::Example<>& batch) {
    correct += model->forward(batch.data).argmax(-1).eq(batch.target).sum().item<std::int64_t>();
    total += batch.target.size(0);
  });
  return double(correct) / double(total);
}

}  // namespace example
