#pragma once
// A small image task for the quantization tests: 1×8×8 images whose class (one of three)
// decides where a bright square sits on the diagonal (noise and brightness set how hard it is),
// and the training loop the tests run on it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace fixtures {

// Images whose class decides where a bright square sits.
inline std::vector<torch::data::Example<>> squares(std::int64_t n, std::int64_t batch, std::uint64_t seed,
                                                   double noise = 0.3, double brightness = 2.0) {
  torch::manual_seed(seed);
  const auto y = torch::randint(3, {n}, torch::kLong);
  auto x = noise * torch::randn({n, 1, 8, 8});
  for (std::int64_t i = 0; i < n; ++i) {
    const auto c = y[i].item<std::int64_t>() * 2;
    x[i].narrow(1, c, 3).narrow(2, c, 3).add_(brightness);
  }
  std::vector<torch::data::Example<>> out;
  for (std::int64_t i = 0; i < n; i += batch) {
    const auto len = std::min(batch, n - i);
    out.push_back({x.narrow(0, i, len), y.narrow(0, i, len)});
  }
  return out;
}

// Adam on the cross-entropy of these batches, in train mode: any module holder (a Sequential,
// a user's module, a QAT model).
template <class Model>
void train(Model model, const std::vector<torch::data::Example<>>& data, int epochs, double lr) {
  torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(lr));
  model->train();
  for (int e = 0; e < epochs; ++e)
    for (const auto& b : data) {
      const auto loss = torch::nn::functional::cross_entropy(model->forward(b.data), b.target);
      opt.zero_grad();
      loss.backward();
      opt.step();
    }
}

}  // namespace fixtures
