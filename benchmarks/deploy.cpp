// Deployment latency, batch 1, one thread: original and compressed models, eager and optimized,
// beside the cost model's roofline estimate.
//
//   Deploy_Latency/<network>_<model>_<path>
//     network  vgg16_bn (10 classes, 3×224×224), compact_vgg (1×28×28), resnet50 (1000 classes,
//              3×224×224; original only until the Pruner handles any module)
//     model    original: untrained weights, BatchNorm statistics as after training
//              compressed: Filter/Local/L1 at 40%, Pruner, BNFolder (the article's stages
//              without the FCDecomposer)
//              floor (compact_vgg only): the compressed model's operators with one channel in
//              every layer (widths 1/1/1, hidden 1, folded): almost no MACs, so its latency is
//              what the operator calls cost by themselves, the least any pruning of this
//              network can reach at batch 1
//     path     eager      the C++ module's forward
//              folded     BatchNorms folded (BNFolder), eager
//              traced     exported by fasterai::to_torchscript, run by the JIT
//              frozen     + torch::jit::freeze
//              optimized  + torch::jit::optimize_for_inference (fasterai::optimize_for_inference)
//   Counters: MACs, MB moved (weights + activations), estimate_ms (roofline of the cost model
//   at the peak rates Deploy_PeakRates measures) and est_speedup (the original's estimate over
//   this model's), to compare with measured ratios of medians.
//   Deploy_PeakRates: the calibration (GMAC/s of a GEMM, GB/s of a copy, µs per op call).
//
// Compare ratios within one run, with repetitions interleaved (the machine may be shared):
//   fasterai_benchmarks --benchmark_filter=Deploy --benchmark_enable_random_interleaving=true
#include <benchmark/benchmark.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "benchmark_models.hpp"
#include <fasterai/deploy/cost_model.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

constexpr int kThreads = 1;

enum class Network { vgg16_bn, compact_vgg, resnet50 };
enum class Model { original, compressed, floor };
enum class Path { eager, folded, traced, frozen, optimized };

torch::Tensor example(Network network) {
  torch::manual_seed(1);
  return network == Network::compact_vgg ? torch::randn({1, 1, 28, 28})
                                         : torch::randn({1, 3, 224, 224});
}

// Running statistics away from (0, 1), as after training, so that folding has work to do.
// One runnable variant, with its cost.
struct Variant {
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  fasterai::CostReport cost;
};

const fasterai::PeakRates& peak_rates() {
  static const fasterai::PeakRates peak =
      fasterai::measure_peak_rates(fasterai::CalibrationOptions().threads(kThreads));
  return peak;
}

template <class M>
Variant jit_variant(M& model, const torch::Tensor& x, fasterai::OptimizeOptions options,
                    fasterai::CostReport cost) {
  // Each path as labelled: optimize_for_inference's own measurement could keep the eager copy.
  auto fast = fasterai::optimize_for_inference(model, x, options.choose_by_measurement(false));
  return {[fast](const torch::Tensor& in) mutable { return fast->forward(in); }, std::move(cost)};
}

// The eager module of a network and model (built once).
std::shared_ptr<torch::nn::Module> eager_model(Network network, Model model) {
  static std::map<std::pair<Network, Model>, std::shared_ptr<torch::nn::Module>> cache;
  const auto key = std::make_pair(network, model);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  torch::manual_seed(0);
  std::shared_ptr<torch::nn::Module> built;
  if (network == Network::resnet50) {
    auto resnet = fasterai::models::resnet50(1000);
    fasterai::bench::trained_looking_batch_norms(*resnet);
    resnet->eval();
    built = resnet.ptr();
  } else {
    auto compact = fasterai::models::CompactVGGOptions();
    if (model == Model::floor) compact.widths({1, 1, 1}).hidden(1);
    auto original = network == Network::vgg16_bn ? fasterai::models::vgg16_bn(10)
                                                 : fasterai::models::compact_vgg(compact);
    fasterai::bench::trained_looking_batch_norms(*original);
    original->eval();
    if (model == Model::original) {
      built = original.ptr();
    } else if (model == Model::floor) {
      auto folded = fasterai::BNFolder().fold(original);
      folded->eval();
      built = folded.ptr();
    } else {
      fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local,
                           fasterai::criteria::L1, fasterai::schedule::OneShot>(original)
          .prune(40.0);
      auto pruned = fasterai::Pruner().prune(original);
      auto folded = fasterai::BNFolder().fold(pruned);
      folded->eval();
      built = folded.ptr();
    }
  }
  return cache.emplace(key, std::move(built)).first->second;
}

Variant make_variant(Network network, Model model, Path path) {
  const auto x = example(network);
  const auto module = eager_model(network, model);
  auto cost_of = [&](auto& m) { return fasterai::cost_model(m, x); };
  using fasterai::OptimizeOptions;
  if (auto seq = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(module)) {
    torch::nn::Sequential m(seq);
    switch (path) {
      case Path::eager:
        return {[m](const torch::Tensor& in) mutable { return m->forward(in); }, cost_of(m)};
      case Path::folded: {
        auto folded = fasterai::BNFolder().fold(m);
        return {[folded](const torch::Tensor& in) mutable { return folded->forward(in); },
                cost_of(folded)};
      }
      case Path::traced:
        return jit_variant(m, x, OptimizeOptions().freeze(false).optimize(false), cost_of(m));
      case Path::frozen:
        return jit_variant(m, x, OptimizeOptions().optimize(false), cost_of(m));
      case Path::optimized:
        return jit_variant(m, x, OptimizeOptions(), cost_of(m));
    }
  }
  auto resnet = fasterai::models::ResNet(std::dynamic_pointer_cast<fasterai::models::ResNetImpl>(module));
  switch (path) {
    case Path::eager:
    case Path::folded:  // the BNFolder takes Sequentials here; freeze folds the ResNet's BNs
      return {[resnet](const torch::Tensor& in) mutable { return resnet->forward(in); },
              cost_of(resnet)};
    case Path::traced:
      return jit_variant(resnet, x, OptimizeOptions().freeze(false).optimize(false), cost_of(resnet));
    case Path::frozen:
      return jit_variant(resnet, x, OptimizeOptions().optimize(false), cost_of(resnet));
    case Path::optimized:
      break;
  }
  return jit_variant(resnet, x, OptimizeOptions(), cost_of(resnet));
}

void Deploy_Latency(benchmark::State& state, Network network, Model model, Path path) {
  torch::set_num_threads(kThreads);
  static std::map<std::tuple<Network, Model, Path>, Variant> variants;
  const auto key = std::make_tuple(network, model, path);
  if (!variants.contains(key)) variants.emplace(key, make_variant(network, model, path));
  if (!variants.contains({network, Model::original, Path::eager}))
    variants.emplace(std::make_tuple(network, Model::original, Path::eager),
                     make_variant(network, Model::original, Path::eager));
  auto& v = variants.at(key);
  const auto& original = variants.at({network, Model::original, Path::eager});
  const auto x = example(network);
  c10::InferenceMode inference;
  for (int i = 0; i < 3; ++i) v.forward(x);  // warm-up: oneDNN primitives, JIT profiling runs
  for (auto _ : state) {
    auto out = v.forward(x);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  const auto& peak = peak_rates();
  state.counters["MACs"] = double(v.cost.macs());
  state.counters["MB_moved"] = double(v.cost.bytes()) / 1e6;
  state.counters["estimate_ms"] = v.cost.estimate_ms(peak);
  state.counters["est_speedup"] = original.cost.estimate_ms(peak) / v.cost.estimate_ms(peak);
}

void Deploy_PeakRates(benchmark::State& state) {
  fasterai::PeakRates peak;
  for (auto _ : state) peak = fasterai::measure_peak_rates(fasterai::CalibrationOptions().threads(kThreads));
  state.counters["GMAC_per_s"] = peak.macs_per_second / 1e9;
  state.counters["GB_per_s"] = peak.bytes_per_second / 1e9;
  state.counters["us_per_op"] = peak.seconds_per_op * 1e6;
}

void deploy_repeated(benchmark::internal::Benchmark* b, benchmark::TimeUnit unit) {
  b->UseRealTime()->Unit(unit)->Repetitions(5)->ReportAggregatesOnly(true);
}

struct Registration {
  Registration() {
    const std::pair<Network, const char*> networks[] = {
        {Network::vgg16_bn, "vgg16_bn"}, {Network::compact_vgg, "compact_vgg"}, {Network::resnet50, "resnet50"}};
    const std::pair<Path, const char*> paths[] = {{Path::eager, "eager"},   {Path::folded, "folded"},
                                                  {Path::traced, "traced"}, {Path::frozen, "frozen"},
                                                  {Path::optimized, "optimized"}};
    for (const auto& [network, net_name] : networks)
      for (const auto model : {Model::original, Model::compressed}) {
        if (network == Network::resnet50 && model == Model::compressed) continue;
        for (const auto& [path, path_name] : paths) {
          if (network == Network::resnet50 && path == Path::folded) continue;
          if (model == Model::compressed && path == Path::folded) continue;  // already folded
          const std::string name = std::string("Deploy_Latency/") + net_name + "_" +
                                   (model == Model::original ? "original_" : "compressed_") + path_name;
          auto* b = benchmark::RegisterBenchmark(name.c_str(), Deploy_Latency, network, model, path);
          deploy_repeated(b, network == Network::compact_vgg ? benchmark::kMicrosecond
                                                             : benchmark::kMillisecond);
        }
      }
    for (const auto& [path, path_name] : {std::pair{Path::eager, "eager"}, std::pair{Path::optimized, "optimized"}}) {
      const std::string name = std::string("Deploy_Latency/compact_vgg_floor_") + path_name;
      deploy_repeated(benchmark::RegisterBenchmark(name.c_str(), Deploy_Latency, Network::compact_vgg,
                                                   Model::floor, path),
                      benchmark::kMicrosecond);
    }
    benchmark::RegisterBenchmark("Deploy_PeakRates", Deploy_PeakRates)
        ->Unit(benchmark::kMillisecond)->Iterations(1)->Repetitions(3);
  }
} registration;

}  // namespace
