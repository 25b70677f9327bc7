// The Learner's cost per batch against a hand-written LibTorch loop: same model, same batches
// already in memory, same optimizer (Adam with the Learner's defaults), no validation and no
// output. The Learner adds its hooks, a loss.item() for the smoothed loss and a clock read
// per batch, plus a little per fit (seeding, the table header, the callback list).
//
// LearnerOverhead/* alternate one epoch of each loop, in alternating order, on models of the
// same shape and report `ratio` = median(learner epoch time / hand-written epoch time): on a
// shared machine the two loops drift together, so their ratio is steadier than two separate
// benchmarks.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/train/learner.hpp>

namespace {

using Batches = std::vector<torch::data::Example<>>;
namespace F = torch::nn::functional;

constexpr std::int64_t kBatchSize = 64;
constexpr int kBatches = 16;

Batches make_batches(std::int64_t features_per_example, bool image) {
  torch::manual_seed(0);
  Batches out;
  for (int i = 0; i < kBatches; ++i) {
    auto x = image ? torch::randn({kBatchSize, 1, 28, 28}) : torch::randn({kBatchSize, features_per_example});
    out.push_back({x, torch::randint(10, {kBatchSize}, torch::kLong)});
  }
  return out;
}

torch::nn::Sequential make_model(bool vgg) {
  torch::manual_seed(1);
  if (vgg) return fasterai::models::compact_vgg();
  return torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 128), torch::nn::ReLU(),
                               torch::nn::Linear(128, 10));
}

// The Learner's default optimizer, built by hand.
std::unique_ptr<torch::optim::Adam> make_adam(torch::nn::Module& m) {
  return std::make_unique<torch::optim::Adam>(
      m.parameters(), torch::optim::AdamOptions(1e-3).betas(std::make_tuple(0.9, 0.99)).eps(1e-5));
}

void hand_epoch(torch::nn::Sequential& model, torch::optim::Optimizer& opt, const Batches& batches) {
  model->train();
  for (const auto& b : batches) {
    opt.zero_grad();
    auto loss = F::cross_entropy(model->forward(b.data), b.target);
    loss.backward();
    opt.step();
  }
}

fasterai::Learner make_learner(torch::nn::Sequential model, const Batches& batches) {
  return fasterai::Learner(model, batches, {},
                           fasterai::LearnerOptions()
                               .out(nullptr)
                               .progress(fasterai::Progress::None)
                               .device(torch::kCPU));
}

void HandWrittenLoop(benchmark::State& state) {
  const bool vgg = state.range(0) != 0;
  auto model = make_model(vgg);
  auto opt = make_adam(*model);
  const auto batches = make_batches(784, vgg);
  for (auto _ : state) hand_epoch(model, *opt, batches);
  state.SetItemsProcessed(state.iterations() * kBatches);
  state.SetLabel(vgg ? "compact_vgg" : "mlp");
}

void LearnerFit(benchmark::State& state) {
  const bool vgg = state.range(0) != 0;
  const auto batches = make_batches(784, vgg);
  auto learn = make_learner(make_model(vgg), batches);
  for (auto _ : state) learn.fit(1, 1e-3);
  state.SetItemsProcessed(state.iterations() * kBatches);
  state.SetLabel(vgg ? "compact_vgg" : "mlp");
}

void LearnerOverhead(benchmark::State& state) {
  const bool vgg = state.range(0) != 0;
  const auto batches = make_batches(784, vgg);
  auto hand_model = make_model(vgg);
  auto opt = make_adam(*hand_model);
  auto learn = make_learner(make_model(vgg), batches);
  hand_epoch(hand_model, *opt, batches);  // warm both up
  learn.fit(1, 1e-3);

  using clock = std::chrono::steady_clock;
  std::vector<double> ratios, hand_ms, learner_ms;
  bool hand_first = true;
  for (auto _ : state) {
    double h = 0, l = 0;
    auto time_hand = [&] {
      const auto t0 = clock::now();
      hand_epoch(hand_model, *opt, batches);
      h = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    };
    auto time_learner = [&] {
      const auto t0 = clock::now();
      learn.fit(1, 1e-3);
      l = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    };
    if (hand_first) time_hand(), time_learner();
    else time_learner(), time_hand();
    hand_first = !hand_first;
    hand_ms.push_back(h);
    learner_ms.push_back(l);
    ratios.push_back(l / h);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const auto n = v.size();
    return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2);
  };
  state.counters["ratio"] = median(ratios);
  state.counters["hand_ms_per_batch"] = median(hand_ms) / kBatches;
  state.counters["learner_ms_per_batch"] = median(learner_ms) / kBatches;
  state.counters["overhead_us_per_batch"] =
      (median(learner_ms) - median(hand_ms)) * 1000.0 / kBatches;
  state.SetLabel(vgg ? "compact_vgg" : "mlp");
}

}  // namespace

// Argument: 1 = compact VGG on 1x28x28 images (the project's model), 0 = a small MLP whose
// steps are short enough to expose the absolute overhead.
BENCHMARK(HandWrittenLoop)->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);
BENCHMARK(LearnerFit)->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond);
BENCHMARK(LearnerOverhead)->Arg(1)->Iterations(31)->Unit(benchmark::kMillisecond);
BENCHMARK(LearnerOverhead)->Arg(0)->Iterations(301)->Unit(benchmark::kMillisecond);
