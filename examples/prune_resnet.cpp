// Compress a ResNet-50 — a module class with a hand-written forward and residual additions, as
// users write them — through its traced channel-dependency graph: Filter/Local/L1 sparsity at
// 30% and 50% of every coupled group's channels, the zero channels removed in place, the
// BatchNorms folded — each stage one call of fasterai::compress_for_deployment. For each stage:
// parameters, MACs, latency (1 thread, batch 1 and a large batch, medians of interleaved rounds)
// and the largest relative difference between the masked model's logits and the compressed
// one's (random weights: the transforms are exact, accuracy needs real weights).
//
//   prune_resnet [--model resnet50] [--size 224] [--rounds 5] [--runs 5] [--round-to 8]
//                [--large-batch 32] [--quick]
#include <fasterai/compress.hpp>
#include <fasterai/fasterai.hpp>

#include <algorithm>
#include <functional>
#include <iomanip>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Stage {
  std::string name;
  std::int64_t parameters = 0, macs = 0;
  double difference = 0;  // max |compressed − masked| / max |masked| of the logits
  std::vector<double> medians, large_medians;  // per round: batch 1, the large batch
  std::function<std::pair<double, double>()> time;  // one timing round, ms
  std::size_t baseline = 0;  // the stage that "time/" compares with
};

double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

template <class Model>
torch::Tensor logits(Model& model, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return model->forward(x);
}

// The stages of one zoo model (a holder such as models::ResNet). Each compressed stage is one
// call of fasterai::compress_for_deployment (compress.hpp): Filter/Local/L1 sparsity at
// the target, the Pruner, the BNFolder when asked, optimize_for_inference; its report gives the
// parameters, MACs, the difference to the masked model and the inference path. The latencies
// are timed here, every stage in every round, so that the table compares them interleaved.
template <class Model>
std::vector<Stage> compress(Model original, const torch::Tensor& x, std::int64_t round_to, int runs,
                            std::int64_t large_batch) {
  std::vector<Stage> stages;
  const auto shape = x.sizes().slice(1).vec();
  // An InferenceModel is built for the example's shape (batch 1): it is timed at batch 1 only.
  const auto timer = [x, runs](auto model, std::int64_t large_batch) {
    return [model, x, runs, large_batch]() mutable {
      const auto options = LatencyOptions().warmup(1).runs(runs).threads(1);
      std::pair<double, double> medians{measure_latency(model, x, options).median_ms, 0.0};
      // One timed run of the large batch per round: at batch 32 one forward of ResNet-50
      // takes seconds on one thread, and the rounds give its median.
      if (large_batch > 0)
        medians.second = measure_latency(model, x.repeat({large_batch, 1, 1, 1}),
                                         LatencyOptions().warmup(1).runs(1).threads(1)).median_ms;
      return medians;
    };
  };
  original->eval();
  stages.push_back({"original", count_parameters(original), count_macs(original, shape).total(), 0.0, {}, {},
                    timer(original, large_batch)});
  // The original through optimize_for_inference too: a deployment compares inference models.
  auto original_fast = optimize_for_inference(original, x);
  {
    torch::NoGradGuard no_grad;
    stages.push_back({"original, inference (" + std::string(to_string(original_fast->path())) + ")",
                      stages[0].parameters, stages[0].macs,
                      relative_difference(original_fast->forward(x), logits(original, x)), {}, {},
                      timer(original_fast, 0), 1});
  }
  struct Variant {
    double sparsity;
    std::int64_t round_to;
  };
  std::vector<Variant> variants{{30, 1}, {50, 1}};
  if (round_to > 1) variants.push_back({50, round_to});
  const auto no_timing = CompressOptions().latency_batches({});
  for (const Variant v : variants) {
    std::string label = "Filter " + std::to_string(int(v.sparsity)) + "%";
    if (v.round_to > 1) label += ", round_to " + std::to_string(v.round_to);
    for (const bool fold : {false, true}) {
      auto result = compress_for_deployment(
          original, x, CompressOptions(no_timing).target(v.sparsity).round_to(v.round_to).fold_bn(fold));
      const CompressReport& r = result.report;
      stages.push_back({label + (fold ? ", pruned + BN folded" : ", pruned"), r.parameters_after, r.macs_after,
                        r.max_difference, {}, {}, timer(result.model, large_batch)});
      if (fold && v.sparsity == 50 && v.round_to == 1)
        stages.push_back({label + ", inference (" + std::string(to_string(result.inference->path())) + ")",
                          r.parameters_after, r.macs_after, r.max_difference, {}, {}, timer(result.inference, 0),
                          1});
    }
  }
  return stages;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string model_name = "resnet50";
  std::int64_t size = 224, round_to = 8;
  std::int64_t large_batch = 32;
  int rounds = 5, runs = 5;
  bool quick = false;
  example::Cli cli("prune_resnet", "Filter pruning of a zoo model through its traced channel graph.");
  cli.option("--model", model_name, "resnet18, resnet34, resnet50 or mobilenet_v2")
      .option("--size", size, "input height and width")
      .option("--rounds", rounds, "interleaved timing rounds over the stages")
      .option("--runs", runs, "timed runs per stage and round")
      .option("--round-to", round_to, "the third variant keeps channel counts multiples of this")
      .option("--large-batch", large_batch, "the second latency column's batch size (0: none)")
      .flag("--quick", quick, "ResNet-18 at 64x64, 2 rounds of 2 runs, large batch 4 (a smoke test)");
  cli.parse(argc, argv);
  if (quick) model_name = "resnet18", size = 64, rounds = 2, runs = 2, large_batch = 4;
  if (rounds < 1 || runs < 1 || size < 32 || round_to < 1 || large_batch < 0)
    throw example::usage_error("--rounds, --runs and --round-to must be >= 1, --size >= 32, --large-batch >= 0");

  torch::manual_seed(0);
  const auto x = torch::randn({1, 3, size, size});
  std::vector<Stage> stages;
  if (model_name == "resnet18") stages = compress(models::resnet18(1000), x, round_to, runs, large_batch);
  else if (model_name == "resnet34") stages = compress(models::resnet34(1000), x, round_to, runs, large_batch);
  else if (model_name == "resnet50") stages = compress(models::resnet50(1000), x, round_to, runs, large_batch);
  else if (model_name == "mobilenet_v2") stages = compress(models::mobilenet_v2(1000), x, round_to, runs, large_batch);
  else throw example::usage_error("unknown --model '" + model_name + "' (resnet18, resnet34, resnet50, mobilenet_v2)");

  // Interleaved timing: every stage once per round, so a slow phase of the machine hits all.
  for (int r = 0; r < rounds; ++r)
    for (auto& s : stages) {
      const auto [one, large] = s.time();
      s.medians.push_back(one);
      s.large_medians.push_back(large);
    }

  std::cout << model_name << " (random weights) at " << size << "x" << size << ", 1 thread; latency at batch 1: median of "
            << rounds << " interleaved rounds of " << runs << " runs, spread = max - min of the rounds";
  if (large_batch > 0) std::cout << "; at batch " << large_batch << ": median of the rounds' single runs";
  std::cout << "\n\n";
  const std::string large_name = "batch " + std::to_string(large_batch);
  std::cout << std::left << std::setw(44) << "stage" << std::right << std::setw(13) << "parameters"
            << std::setw(16) << "MACs" << std::setw(12) << "batch 1" << std::setw(11) << "spread";
  if (large_batch > 0) std::cout << std::setw(12) << large_name;
  std::cout << std::setw(11) << "max diff" << std::setw(9) << "MACs/" << std::setw(9) << "time/";
  if (large_batch > 0) std::cout << std::setw(9) << "time/";
  std::cout << "\n";
  const auto median_of = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  for (auto& s : stages) {
    const double median = median_of(s.medians);
    const double base_latency = median_of(stages[s.baseline].medians);
    const auto [fastest, slowest] = std::minmax_element(s.medians.begin(), s.medians.end());
    const bool timed_large = large_batch > 0 && s.large_medians.front() > 0;
    std::cout << std::left << std::setw(44) << s.name << std::right << std::setw(13) << with_thousands(s.parameters)
              << std::setw(16) << with_thousands(s.macs) << std::fixed << std::setprecision(1) << std::setw(9)
              << median << " ms" << std::setw(8) << *slowest - *fastest << " ms";
    if (large_batch > 0) {
      if (timed_large) std::cout << std::setw(9) << median_of(s.large_medians) << " ms";
      else std::cout << std::setw(12) << "-";
    }
    std::cout << std::setw(11) << std::scientific << std::setprecision(1) << s.difference << std::fixed
              << std::setprecision(2) << std::setw(8) << double(stages.front().macs) / double(s.macs) << "x"
              << std::setw(8) << base_latency / median << "x";
    if (large_batch > 0) {
      if (timed_large) std::cout << std::setw(8) << median_of(stages.front().large_medians) / median_of(s.large_medians) << "x";
      else std::cout << std::setw(9) << "-";
    }
    std::cout << "\n";
  }
  std::cout << "\nMACs/ and time/: how many times fewer MACs and how many times faster than the original\n"
               "(inference rows: optimize_for_inference, which keeps the faster of its optimized module and\n"
               "the eager model, measured; compared with the original's; timed at batch 1 only, the shape\n"
               "they were built for). max diff: against the masked model (inference rows: the model they\n"
               "were built from).\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "prune_resnet: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "prune_resnet: " << e.what() << "\n";
  return 1;
}
