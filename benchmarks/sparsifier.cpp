// Sparsifier benchmarks: mask computation on VGG16-BN (global over all 134M weights, local
// per filter) and the per-step cost of keeping masks in force during training.
#include <chrono>

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

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// What global selection is measured against: one `abs` + compare pass over the same weights,
// as torch computes it (`w.abs() < threshold`, fresh tensors).
double abs_compare_pass(const std::vector<torch::Tensor>& weights) {
  const auto start = Clock::now();
  for (const auto& w : weights) benchmark::DoNotOptimize(w.abs() < 0.01);
  return seconds_since(start);
}

// The weights of every Conv2d and Linear of VGG16-BN (134,268,738 values) and a dense copy to
// restore them from between iterations (outside the timing).
struct VGGWeights {
  std::vector<torch::Tensor> weights, dense;
  VGGWeights() {
    for (const auto& layer : fasterai::prunable_layers(vgg16_bn())) {
      weights.push_back(layer.weight());
      dense.push_back(layer.weight().detach().clone());
    }
  }
  void restore() {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < weights.size(); ++i) weights[i].copy_(dense[i]);
  }
};

// Each iteration times the measured work and, interleaved with it on the same weights, one
// abs + compare pass: the machine's load shifts during a run, the ratio of neighbours much
// less. Reported: the work's time, the pass's (abs_pass_ms) and their ratio.
template <class Work>
void versus_abs_pass(benchmark::State& state, VGGWeights& w, Work&& work) {
  const int threads = torch::get_num_threads();
  torch::set_num_threads(static_cast<int>(state.range(0)));
  double work_s = 0, pass_s = 0;
  for (auto _ : state) {
    w.restore();
    pass_s += abs_compare_pass(w.weights);
    const auto start = Clock::now();
    work();
    const double s = seconds_since(start);
    work_s += s;
    state.SetIterationTime(s);
  }
  w.restore();
  torch::set_num_threads(threads);
  state.counters["abs_pass_ms"] = 1e3 * pass_s / double(state.iterations());
  state.counters["ratio"] = work_s / pass_s;
}

// Global threshold over every weight of VGG16-BN (Weight granularity, Conv2d and Linear:
// 134M values) through the sparsifier: finiteness check, selection, masks and multipliers,
// zeroed weights — prune() as a user calls it, on the dense weights. Arg: intra-op threads.
void BM_GlobalWeightMasks_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  VGGWeights w;
  fasterai::MagnitudeSparsifier<> sparsifier(vgg16_bn(), fasterai::SparsifierOptions(50).include_linear(true));
  versus_abs_pass(state, w, [&] { sparsifier.prune(50); });
  state.counters["weights"] = 134'268'738;
}
BENCHMARK(BM_GlobalWeightMasks_VGG16BN)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseManualTime()
    ->Iterations(3)->Repetitions(5)->ReportAggregatesOnly(true);

// The selection routine alone (detail::select_lowest_magnitude): k lowest |w| over all 134M
// weights, masks (into the previous iteration's buffers), multipliers and zeroed weights
// written. Arg: intra-op threads.
void BM_GlobalMagnitudeSelection_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  VGGWeights w;
  std::vector<torch::Tensor> keep, masks;  // reused between iterations, as the sparsifier does
  for (const auto& x : w.weights) keep.push_back(torch::empty_like(x));
  versus_abs_pass(state, w, [&] {
    auto selection = fasterai::detail::select_lowest_magnitude(
        w.weights, {134'268'738 / 2}, keep, /*zero_weights=*/true, /*keep_one=*/true, masks);
    benchmark::DoNotOptimize(selection.counts.data());
    masks = std::move(selection.masks);
  });
}
BENCHMARK(BM_GlobalMagnitudeSelection_VGG16BN)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)
    ->UseManualTime()->Iterations(3)->Repetitions(5)->ReportAggregatesOnly(true);

// A scheduled step() that changes no count, as most training steps are once the schedule's
// target is reached: Weight/Global/L1 over every weight of VGG16-BN, the masks applied and the
// weights checked for NaN and Inf, against the same abs + compare pass. Arg: intra-op threads.
void BM_StepWithoutChange_VGG16BN(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  VGGWeights w;
  fasterai::Sparsifier<fasterai::granularity::Weight, fasterai::method::Global, fasterai::criteria::L1,
                       fasterai::schedule::Linear>
      sparsifier(vgg16_bn(), fasterai::SparsifierOptions(50).include_linear(true));
  sparsifier.step(1.0);
  versus_abs_pass(state, w, [&] { sparsifier.step(1.0); });
  w.restore();
}
BENCHMARK(BM_StepWithoutChange_VGG16BN)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseManualTime()
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
