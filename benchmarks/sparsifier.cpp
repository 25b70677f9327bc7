// Sparsifier benchmarks: mask computation on VGG16-BN (global over all 134M weights, local
// per filter) and the per-step cost of keeping masks in force during training.
#include <benchmark/benchmark.h>

#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>

namespace {

torch::nn::Sequential& vgg16_bn() {
  static auto model = [] {
    torch::manual_seed(0);
    return fasterai::models::vgg16_bn(10);
  }();
  return model;
}

// Global threshold over every weight of VGG16-BN (Weight granularity, Conv2d and Linear:
// 134M values): scores, selection, masks and their application.
void BM_GlobalWeightMasks_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  fasterai::MagnitudeSparsifier<> sparsifier(vgg16_bn(),
                                             fasterai::SparsifierOptions(50).include_linear(true));
  double sparsity = 10;
  for (auto _ : state) {
    sparsifier.prune(sparsity);
    sparsity = sparsity >= 80 ? 10 : sparsity + 10;  // a new target each time
  }
  state.counters["weights"] = 134'268'738;
}
BENCHMARK(BM_GlobalWeightMasks_VGG16BN)->Unit(benchmark::kMillisecond)->UseRealTime()
    ->Iterations(3)->Repetitions(5)->ReportAggregatesOnly(true);

// The article's Filter/Local/L1 pruning of the 13 convolutions.
void BM_LocalFilterMasks_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  auto model = fasterai::clone_model(vgg16_bn());
  fasterai::FilterSparsifier<> sparsifier(model);
  for (auto _ : state) sparsifier.prune(40);
}
BENCHMARK(BM_LocalFilterMasks_VGG16BN)->Unit(benchmark::kMillisecond)->UseRealTime()
    ->Repetitions(5)->ReportAggregatesOnly(true);

// One training step of the compact VGG (batch 64, Adam), with and without the masks kept in
// force (mask_gradients before the optimizer step, apply after it). Arg 0: plain, 1: masked.
void BM_TrainStep_CompactVGG(benchmark::State& state) {
  torch::manual_seed(0);
  auto model = fasterai::models::compact_vgg();
  fasterai::MagnitudeSparsifier<fasterai::schedule::OneShot> sparsifier(
      model, fasterai::SparsifierOptions(50).include_linear(true));
  sparsifier.prune(50);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  const auto x = torch::randn({64, 1, 28, 28});
  const auto y = torch::randint(0, 10, {64});
  const bool masked = state.range(0) == 1;
  for (auto _ : state) {
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    if (masked) sparsifier.mask_gradients();
    optimizer.step();
    if (masked) sparsifier.apply();
  }
}
BENCHMARK(BM_TrainStep_CompactVGG)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()
    ->Repetitions(7)->ReportAggregatesOnly(true);

// The masking alone, per step: what the training step above pays for it.
void BM_MaskInForce_CompactVGG(benchmark::State& state) {
  torch::manual_seed(0);
  auto model = fasterai::models::compact_vgg();
  fasterai::MagnitudeSparsifier<fasterai::schedule::OneShot> sparsifier(
      model, fasterai::SparsifierOptions(50).include_linear(true));
  sparsifier.prune(50);
  torch::nn::functional::cross_entropy(model->forward(torch::randn({8, 1, 28, 28})),
                                       torch::randint(0, 10, {8}))
      .backward();
  for (auto _ : state) {
    sparsifier.mask_gradients();
    sparsifier.apply();
  }
}
BENCHMARK(BM_MaskInForce_CompactVGG)->Unit(benchmark::kMicrosecond)->UseRealTime()
    ->Repetitions(7)->ReportAggregatesOnly(true);

}  // namespace
