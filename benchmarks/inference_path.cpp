// Is optimize_for_inference ever slower than eager? Batch 1, one thread, on the walkthrough's
// stages and on the zoo pruned at 50% (issue 20, item 2).
//
//   InferencePath/<model>/<path>
//     model  compact_vgg_{baseline, pruned, folded, folded_r8}: the walkthrough's network
//              (1×28×28), BatchNorm statistics as after training; pruned = Filter/Local/L1 at
//              50% + Pruner (odd widths), folded = + BNFolder, folded_r8 = the same with
//              round_to 8 (widths multiples of 8)
//            resnet50_{original, pruned}, mobilenet_v2_{original, pruned}: 3×64×64, pruned =
//              Filter/Local/L1 at 50% through the traced graph + Pruner + BNFolder (in place)
//     path   eager      the C++ module's forward
//            frozen     to_torchscript + torch::jit::freeze
//            fused      frozen + the conv–add–ReLU fusion and Linear transpose of
//                       torch::jit::optimize_for_inference, without its oneDNN conversion
//                       (ConvertFrozenOpsToMKLDNN): what that conversion costs or buys
//            optimized  optimize_for_inference, forced to its optimized module
//            chosen     optimize_for_inference as shipped: it timed both at build time and kept
//                       the faster. Counters: path (0 optimized, 1 eager, 2 frozen) and the two
//                       medians it measured (build_optimized_ms, build_alternative_ms)
//   Every path runs under libtorch::InferenceGuard, as InferenceModel::forward does.
//
// Compare ratios within one run, repetitions interleaved (the machine may be shared):
//   fasterai_benchmarks --benchmark_filter=InferencePath --benchmark_enable_random_interleaving=true
#include <benchmark/benchmark.h>

#include <functional>
#include <map>
#include <string>
#include <utility>

#include <torch/csrc/jit/passes/frozen_conv_add_relu_fusion.h>
#include <torch/csrc/jit/passes/frozen_linear_transpose.h>

#include "benchmark_models.hpp"
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

enum class Path { eager, frozen, fused, optimized, chosen };

struct Variant {
  Forward forward;
  fasterai::OptimizeReport report;  // of `chosen`
};

// One model: its eager forward and what every path is built from.
struct Subject {
  std::string name;
  torch::Tensor example;
  Forward eager;
  std::function<torch::jit::Module()> frozen;  // a fresh frozen export
  std::function<fasterai::InferenceModel(const fasterai::OptimizeOptions&)> optimize;
};

template <class Model>
Subject subject(std::string name, Model model, torch::Tensor example) {
  model->eval();
  Subject s{std::move(name), example, {}, {}, {}};
  s.eager = [model](const torch::Tensor& x) mutable {
    const fasterai::libtorch::InferenceGuard guard;
    return model->forward(x);
  };
  s.frozen = [model, example]() mutable {
    auto m = fasterai::to_torchscript(model, example).deepcopy();
    m.eval();
    return torch::jit::freeze(m);
  };
  s.optimize = [model, example](const fasterai::OptimizeOptions& options) mutable {
    return fasterai::optimize_for_inference(model, example, options);
  };
  return s;
}

torch::nn::Sequential compact_vgg_stage(const std::string& stage) {
  torch::manual_seed(0);
  auto model = fasterai::models::compact_vgg();
  fasterai::bench::trained_looking_batch_norms(*model);
  model->eval();
  if (stage == "baseline") return model;
  const std::int64_t round_to = stage == "folded_r8" ? 8 : 1;
  fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1>(
      model, fasterai::SparsifierOptions(50).round_to(round_to))
      .prune(50);
  auto pruned = fasterai::Pruner().prune(model);
  if (stage == "pruned") return pruned;
  return fasterai::BNFolder().fold(pruned);
}

template <class Model>
Model zoo_stage(Model model, const torch::Tensor& x, bool pruned) {
  fasterai::bench::trained_looking_batch_norms(*model);
  model->eval();
  if (!pruned) return model;
  fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1>(
      model, x, fasterai::SparsifierOptions(50))
      .prune(50);
  fasterai::Pruner().prune_(model, x);
  fasterai::BNFolder().fold_(model, x);
  return model;
}

const Subject& subject_named(const std::string& name) {
  static std::map<std::string, Subject> subjects;
  if (auto it = subjects.find(name); it != subjects.end()) return it->second;
  torch::manual_seed(0);
  const auto small = torch::randn({1, 3, 64, 64});
  Subject s;
  if (name.starts_with("compact_vgg_"))
    s = subject(name, compact_vgg_stage(name.substr(12)), torch::randn({1, 1, 28, 28}));
  else if (name.starts_with("resnet50_"))
    s = subject(name, zoo_stage(fasterai::models::resnet50(1000), small, name.ends_with("pruned")), small);
  else
    s = subject(name, zoo_stage(fasterai::models::mobilenet_v2(1000), small, name.ends_with("pruned")), small);
  return subjects.emplace(name, std::move(s)).first->second;
}

Variant make_variant(const Subject& s, Path path) {
  using fasterai::InferencePath;
  using fasterai::OptimizeOptions;
  switch (path) {
    case Path::eager:
      return {s.eager, {}};
    case Path::frozen:
    case Path::fused: {
      auto m = s.frozen();
      if (path == Path::fused) {
        // The passes run on the graph before the first call builds the executor's plan.
        auto graph = m.get_method("forward").graph();
        torch::jit::FuseFrozenConvAddRelu(graph);
        torch::jit::FrozenLinearTranspose(graph);
      }
      return {[m](const torch::Tensor& x) mutable {
                const fasterai::libtorch::InferenceGuard guard;
                return m.forward({x}).toTensor();
              },
              {}};
    }
    case Path::optimized: {
      auto fast = s.optimize(OptimizeOptions().choose_by_measurement(false));
      return {[fast](const torch::Tensor& x) mutable { return fast->forward(x); }, fast->report()};
    }
    case Path::chosen:
      break;
  }
  auto fast = s.optimize(OptimizeOptions());
  return {[fast](const torch::Tensor& x) mutable { return fast->forward(x); }, fast->report()};
}

void InferencePath(benchmark::State& state, std::string model, Path path) {
  fasterai::bench::one_thread();
  static std::map<std::pair<std::string, Path>, Variant> variants;
  const auto key = std::make_pair(model, path);
  const Subject& s = subject_named(model);
  if (!variants.contains(key)) variants.emplace(key, make_variant(s, path));
  auto& v = variants.at(key);
  for (int i = 0; i < 3; ++i) v.forward(s.example);  // warm-up: oneDNN primitives, JIT plans
  for (auto _ : state) {
    auto out = v.forward(s.example);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  if (path == Path::chosen) {
    state.counters["path"] = double(static_cast<int>(v.report.path));
    state.counters["build_optimized_ms"] = v.report.optimized_ms;
    state.counters["build_alternative_ms"] = v.report.alternative_ms;
  }
}

struct Registration {
  Registration() {
    const char* models[] = {"compact_vgg_baseline", "compact_vgg_pruned",   "compact_vgg_folded",
                            "compact_vgg_folded_r8", "resnet50_original",   "resnet50_pruned",
                            "mobilenet_v2_original", "mobilenet_v2_pruned"};
    const std::pair<Path, const char*> paths[] = {{Path::eager, "eager"},
                                                  {Path::frozen, "frozen"},
                                                  {Path::fused, "fused"},
                                                  {Path::optimized, "optimized"},
                                                  {Path::chosen, "chosen"}};
    for (const char* model : models)
      for (const auto& [path, path_name] : paths) {
        const std::string name = std::string("InferencePath/") + model + "/" + path_name;
        benchmark::RegisterBenchmark(name.c_str(), InferencePath, std::string(model), path)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond)
            ->Repetitions(5)
            ->ReportAggregatesOnly(true);
      }
  }
} registration;

}  // namespace
