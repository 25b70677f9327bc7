#pragma once
// Small models and data shared by the training tests: Gaussian blobs a two-layer MLP separates
// in a few epochs, and a callback that records the hooks it sees.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/data/batches.hpp>
#include <fasterai/train/callback.hpp>

namespace fixtures {

// `classes` well-separated Gaussian blobs in 2-D, cut into batches of `batch` examples.
inline std::vector<torch::data::Example<>> blobs(std::int64_t n, std::int64_t batch,
                                                 std::uint64_t seed, std::int64_t classes = 3) {
  torch::manual_seed(seed);
  const auto y = torch::randint(classes, {n}, torch::kLong);
  const auto angle = y.to(torch::kFloat) * (2.0 * 3.14159265358979 / double(classes));
  const auto centers = torch::stack({angle.cos(), angle.sin()}, 1) * 3.0;
  const auto x = centers + 0.5 * torch::randn({n, 2});
  std::vector<torch::data::Example<>> out;
  for (std::int64_t i = 0; i < n; i += batch) {
    const auto len = std::min(batch, n - i);
    out.push_back({x.narrow(0, i, len), y.narrow(0, i, len)});
  }
  return out;
}

inline torch::nn::Sequential mlp(std::int64_t hidden = 16, std::int64_t classes = 3) {
  return torch::nn::Sequential(torch::nn::Linear(2, hidden), torch::nn::ReLU(),
                               torch::nn::Linear(hidden, classes));
}

// Copy of a model's parameters, to compare before and after.
inline std::vector<torch::Tensor> snapshot(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

inline bool same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i])) return false;
  return true;
}

inline bool grads_zero(torch::nn::Module& m) {
  for (const auto& p : m.parameters())
    if (p.grad().defined() && p.grad().abs().sum().item<double>() != 0.0) return false;
  return true;
}

// Records "hook:training:epoch:iter" for every hook.
struct Recorder : fasterai::Callback {
  std::vector<std::string> events;
  void log(const char* hook, const fasterai::TrainingState& s) {
    events.push_back(std::string(hook) + (s.training ? ":t:" : ":v:") + std::to_string(s.epoch) +
                     ":" + std::to_string(s.iter));
  }
  void before_fit(fasterai::TrainingState& s) override { log("before_fit", s); }
  void before_epoch(fasterai::TrainingState& s) override { log("before_epoch", s); }
  void before_batch(fasterai::TrainingState& s) override { log("before_batch", s); }
  void after_pred(fasterai::TrainingState& s) override { log("after_pred", s); }
  void after_loss(fasterai::TrainingState& s) override { log("after_loss", s); }
  void before_step(fasterai::TrainingState& s) override { log("before_step", s); }
  void after_step(fasterai::TrainingState& s) override { log("after_step", s); }
  void after_batch(fasterai::TrainingState& s) override { log("after_batch", s); }
  void after_epoch(fasterai::TrainingState& s) override { log("after_epoch", s); }
  void after_fit(fasterai::TrainingState& s) override { log("after_fit", s); }
};

}  // namespace fixtures
