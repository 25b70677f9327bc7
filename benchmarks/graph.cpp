// The traced channel-dependency graph on ResNet-50 (1000 classes, 224×224, batch 1, 1 thread,
// random weights: latency does not depend on the values).
//
//   Graph_TraceVsForward   one plain forward pass and one trace, alternated every iteration
//                          (so a busy phase of the machine hits both); counters: the medians
//                          and `trace_over_forward`, their ratio (target ≤ 2).
//   Graph_PrunedResNet50/sparsity:S/round_to:R
//                          the original and the model pruned at S% of every coupled group's
//                          channels (Filter/Local/L1, prune_, fold_; round_to R keeps channel
//                          counts multiples of R — at 50% ResNet-50's widths already are),
//                          both BN-folded, timed alternately;
//                          counters: `MAC_reduction` (original / pruned MACs),
//                          `speedup` (original / pruned median latency) and
//                          `speedup_over_MAC_reduction` (1 = latency follows the MACs).
//
//   fasterai_benchmarks --benchmark_filter=Graph
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include <fasterai/core/latency.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double milliseconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

void Graph_TraceVsForward(benchmark::State& state) {
  torch::set_num_threads(1);
  torch::manual_seed(0);
  auto model = fasterai::models::resnet50(1000);
  model->eval();
  const auto x = torch::randn({1, 3, 224, 224});
  std::vector<double> forward, trace;
  for (auto _ : state) {
    forward.push_back(milliseconds([&] {
      torch::NoGradGuard no_grad;
      benchmark::DoNotOptimize(model->forward(x));
    }));
    trace.push_back(milliseconds([&] { benchmark::DoNotOptimize(fasterai::trace(model, x)); }));
  }
  state.counters["forward_ms"] = median(forward);
  state.counters["trace_ms"] = median(trace);
  state.counters["trace_over_forward"] = median(trace) / median(forward);
}
BENCHMARK(Graph_TraceVsForward)->Iterations(7)->Unit(benchmark::kMillisecond);

void Graph_PrunedResNet50(benchmark::State& state) {
  torch::set_num_threads(1);
  torch::manual_seed(0);
  const auto sparsity = double(state.range(0));
  const auto round_to = state.range(1);
  auto original = fasterai::models::resnet50(1000);
  original->eval();
  const auto x = torch::randn({1, 3, 224, 224});
  fasterai::models::ResNet pruned(std::dynamic_pointer_cast<fasterai::models::ResNetImpl>(original->clone()));
  fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1> sparsifier(
      pruned, x, fasterai::SparsifierOptions(sparsity).round_to(round_to));
  sparsifier.prune(sparsity);
  fasterai::Pruner().prune_(pruned, x);
  fasterai::BNFolder().fold_(pruned, x);
  fasterai::models::ResNet folded_original(std::dynamic_pointer_cast<fasterai::models::ResNetImpl>(original->clone()));
  fasterai::BNFolder().fold_(folded_original, x);  // compare like with like: both folded
  const auto options = fasterai::LatencyOptions().warmup(1).runs(3).threads(1);
  std::vector<double> before, after;
  for (auto _ : state) {
    before.push_back(fasterai::measure_latency(folded_original, x, options).median_ms);
    after.push_back(fasterai::measure_latency(pruned, x, options).median_ms);
  }
  const double macs = double(fasterai::count_macs(folded_original, {3, 224, 224}).total());
  const double pruned_macs = double(fasterai::count_macs(pruned, {3, 224, 224}).total());
  state.counters["original_ms"] = median(before);
  state.counters["pruned_ms"] = median(after);
  state.counters["MAC_reduction"] = macs / pruned_macs;
  state.counters["speedup"] = median(before) / median(after);
  state.counters["speedup_over_MAC_reduction"] = (median(before) / median(after)) / (macs / pruned_macs);
  state.counters["params"] = double(fasterai::count_parameters(pruned));
}
BENCHMARK(Graph_PrunedResNet50)
    ->ArgNames({"sparsity", "round_to"})
    ->Args({50, 1})
    ->Args({30, 1})
    ->Args({30, 8})
    ->Args({30, 16})
    ->Iterations(5)
    ->Unit(benchmark::kMillisecond);

}  // namespace
