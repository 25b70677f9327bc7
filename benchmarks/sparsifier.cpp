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
// 134M values): scores, selection, masks and their application, on the dense weights (restored
// outside the timing before each iteration). Arg: intra-op threads.
void BM_GlobalWeightMasks_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int threads = torch::get_num_threads();
  torch::set_num_threads(static_cast<int>(state.range(0)));
  auto& model = vgg16_bn();
  std::vector<torch::Tensor> weights, dense;
  for (const auto& layer : fasterai::prunable_layers(model)) {
    weights.push_back(layer.weight());
    dense.push_back(layer.weight().clone());
  }
  fasterai::MagnitudeSparsifier<> sparsifier(model, fasterai::SparsifierOptions(50).include_linear(true));
  for (auto _ : state) {
    state.PauseTiming();
    for (size_t i = 0; i < weights.size(); ++i) weights[i].copy_(dense[i]);
    state.ResumeTiming();
    sparsifier.prune(50);
  }
  for (size_t i = 0; i < weights.size(); ++i) weights[i].copy_(dense[i]);
  torch::set_num_threads(threads);
  state.counters["weights"] = 134'268'738;
}
BENCHMARK(BM_GlobalWeightMasks_VGG16BN)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime()
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
