// The article's compression stages, batch 1, one thread, on VGG16-BN (10 classes) at 224×224
// and on the walkthrough's compact VGG at 1×28×28 (untrained weights: latency does not depend
// on the values):
//
//   Transforms_Latency/original     dense model
//   Transforms_Latency/sparsified   40% of filters zeroed in place (Filter/Local/L1): same cost
//   Transforms_Latency/pruned       zero channels removed by the Pruner
//   Transforms_Latency/folded       BatchNorms folded by the BNFolder
//   Transforms_Latency/factorized   Linears factorized by the FCDecomposer at 0.5
//
// Counters: `MACs` of one forward (fasterai::count_macs), `params`, and `MAC_reduction`
// (original MACs / this stage's MACs) to compare with the measured speedup (ratio of medians).
// Transforms_{Pruner,BNFolder,FCDecomposer} time the transforms themselves. The FCDecomposer's
// two large SVDs take about a minute on 2 cores with OpenBLAS (over ten with the reference
// LAPACK), so it runs once, and its result is reused as the factorized stage.
//
//   fasterai_benchmarks --benchmark_filter=Transforms
//   (names carry the model: Transforms_Latency/vgg16_bn_pruned, .../compact_vgg_pruned)
#include <benchmark/benchmark.h>

#include <memory>
#include <optional>

#include "benchmark_models.hpp"
#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

using FilterL1 = fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local,
                                      fasterai::criteria::L1, fasterai::schedule::OneShot>;

constexpr int kThreads = 1;
constexpr double kPercentRemoved = 0.5;

enum class Stage { original, sparsified, pruned, folded, factorized };
enum class Network { vgg16_bn, compact_vgg };

// Each stage is built once, on first use, from the one before it.
struct Stages {
  std::optional<torch::nn::Sequential> original, sparsified, pruned, folded, factorized;
};

Stages& stages(Network network) {
  static Stages vgg, compact;
  return network == Network::vgg16_bn ? vgg : compact;
}

std::vector<std::int64_t> input_shape(Network network) {
  return network == Network::vgg16_bn ? std::vector<std::int64_t>{3, 224, 224}
                                      : std::vector<std::int64_t>{1, 28, 28};
}

// Running statistics away from (0, 1), as after training, so that folding has work to do.
torch::nn::Sequential& stage(Network network, Stage which) {
  auto& s = stages(network);
  if (!s.original) {
    torch::manual_seed(0);
    s.original = network == Network::vgg16_bn ? fasterai::models::vgg16_bn(10)
                                              : fasterai::models::compact_vgg();
    fasterai::bench::trained_looking_batch_norms(**s.original);
    (*s.original)->eval();
  }
  if (which == Stage::original) return *s.original;
  if (!s.sparsified) {
    s.sparsified = fasterai::clone_model(*s.original);
    FilterL1(*s.sparsified).prune(40.0);
    (*s.sparsified)->eval();
  }
  if (which == Stage::sparsified) return *s.sparsified;
  if (!s.pruned) s.pruned = fasterai::Pruner().prune(*s.sparsified);
  if (which == Stage::pruned) return *s.pruned;
  if (!s.folded) s.folded = fasterai::BNFolder().fold(*s.pruned);
  if (which == Stage::folded) return *s.folded;
  if (!s.factorized) {
    s.factorized = fasterai::FCDecomposer().decompose(*s.folded, kPercentRemoved);
    (*s.factorized)->eval();
  }
  return *s.factorized;
}

void Transforms_Latency(benchmark::State& state, Network network, Stage which) {
  torch::set_num_threads(kThreads);
  torch::NoGradGuard no_grad;
  auto& model = stage(network, which);
  const auto shape = input_shape(network);
  const auto macs = fasterai::count_macs(model, shape).total();
  const auto original_macs = fasterai::count_macs(stage(network, Stage::original), shape).total();
  auto batch_shape = shape;
  batch_shape.insert(batch_shape.begin(), 1);
  const auto input = torch::randn(batch_shape);
  model->forward(input);  // warm-up: oneDNN builds its primitives on the first call
  for (auto _ : state) {
    auto out = model->forward(input);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  state.counters["MACs"] = double(macs);
  state.counters["params"] = double(fasterai::count_parameters(model));
  state.counters["MAC_reduction"] = double(original_macs) / double(macs);
}

void Transforms_Pruner(benchmark::State& state) {
  torch::set_num_threads(kThreads);
  const auto& sparsified = stage(Network::vgg16_bn, Stage::sparsified);
  for (auto _ : state) {
    auto pruned = fasterai::Pruner().prune(sparsified);
    benchmark::DoNotOptimize(pruned.ptr().get());
  }
}

void Transforms_BNFolder(benchmark::State& state) {
  torch::set_num_threads(kThreads);
  const auto& pruned = stage(Network::vgg16_bn, Stage::pruned);
  for (auto _ : state) {
    auto folded = fasterai::BNFolder().fold(pruned);
    benchmark::DoNotOptimize(folded.ptr().get());
  }
}

void Transforms_FCDecomposer(benchmark::State& state) {
  torch::set_num_threads(kThreads);
  const auto& folded = stage(Network::vgg16_bn, Stage::folded);
  for (auto _ : state) {
    auto factorized = fasterai::FCDecomposer().decompose(folded, kPercentRemoved);
    benchmark::DoNotOptimize(factorized.ptr().get());
    state.PauseTiming();
    if (!stages(Network::vgg16_bn).factorized) {
      factorized->eval();
      stages(Network::vgg16_bn).factorized = factorized;
    }
    state.ResumeTiming();
  }
}

// Wall time, five repetitions, medians and spread reported.
template <benchmark::TimeUnit unit>
void repeated(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(unit)->Repetitions(5)->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK_CAPTURE(Transforms_Latency, vgg16_bn_original, Network::vgg16_bn, Stage::original)
    ->Apply(repeated<benchmark::kMillisecond>);
BENCHMARK_CAPTURE(Transforms_Latency, vgg16_bn_sparsified, Network::vgg16_bn, Stage::sparsified)
    ->Apply(repeated<benchmark::kMillisecond>);
BENCHMARK_CAPTURE(Transforms_Latency, vgg16_bn_pruned, Network::vgg16_bn, Stage::pruned)
    ->Apply(repeated<benchmark::kMillisecond>);
BENCHMARK_CAPTURE(Transforms_Latency, vgg16_bn_folded, Network::vgg16_bn, Stage::folded)
    ->Apply(repeated<benchmark::kMillisecond>);
BENCHMARK(Transforms_Pruner)
    ->Apply(repeated<benchmark::kMillisecond>);
BENCHMARK(Transforms_BNFolder)
    ->Apply(repeated<benchmark::kMillisecond>);
// About a minute per run: once; its result becomes the factorized stage.
BENCHMARK(Transforms_FCDecomposer)
    ->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1)->Repetitions(1);
BENCHMARK_CAPTURE(Transforms_Latency, vgg16_bn_factorized, Network::vgg16_bn, Stage::factorized)
    ->Apply(repeated<benchmark::kMillisecond>);

// The walkthrough's network: about 1 ms per forward, so many more iterations per repetition.
BENCHMARK_CAPTURE(Transforms_Latency, compact_vgg_original, Network::compact_vgg, Stage::original)
    ->Apply(repeated<benchmark::kMicrosecond>);
BENCHMARK_CAPTURE(Transforms_Latency, compact_vgg_sparsified, Network::compact_vgg, Stage::sparsified)
    ->Apply(repeated<benchmark::kMicrosecond>);
BENCHMARK_CAPTURE(Transforms_Latency, compact_vgg_pruned, Network::compact_vgg, Stage::pruned)
    ->Apply(repeated<benchmark::kMicrosecond>);
BENCHMARK_CAPTURE(Transforms_Latency, compact_vgg_folded, Network::compact_vgg, Stage::folded)
    ->Apply(repeated<benchmark::kMicrosecond>);
BENCHMARK_CAPTURE(Transforms_Latency, compact_vgg_factorized, Network::compact_vgg, Stage::factorized)
    ->Apply(repeated<benchmark::kMicrosecond>);
