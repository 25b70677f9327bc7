#pragma once
// Test accuracy of a model, computed here for fp32 and int8 models alike (an int8 model has no
// parameters for a Learner to train): any module holder, or a TorchScript module (the traced
// int8 graphs).

#include <cstdint>

#include <torch/script.h>
#include <torch/torch.h>

#include <fasterai/data/batches.hpp>

namespace example {

template <class Forward>
double accuracy_of(Forward forward, const fasterai::data::Batches& test) {
  c10::InferenceMode inference;
  std::int64_t correct = 0, total = 0;
  test.for_each([&](const torch::data::Example<>& batch) {
    correct += forward(batch.data).argmax(-1).eq(batch.target).sum().template item<std::int64_t>();
    total += batch.target.size(0);
  });
  return double(correct) / double(total);
}

template <class Model>
double accuracy(Model model, const fasterai::data::Batches& test) {
  model->eval();
  return accuracy_of([&](const torch::Tensor& x) { return model->forward(x); }, test);
}

inline double accuracy(torch::jit::Module model, const fasterai::data::Batches& test) {
  model.eval();
  return accuracy_of([&](const torch::Tensor& x) { return model.forward({x}).toTensor(); }, test);
}

}  // namespace example
