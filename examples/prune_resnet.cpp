// Compress a ResNet-50 — a module class with a hand-written forward and residual additions, as
// users write them — through its traced channel-dependency graph: Filter/Local/L1 sparsity at
// 30% and 50% of every coupled group's channels, the zero channels removed in place, the
// BatchNorms folded. For each stage: parameters, MACs, latency (1 thread, batch 1, median of
// interleaved rounds) and the largest relative difference between the masked model's logits and
// the compressed one's (random weights: the transforms are exact, accuracy needs real weights).
//
//   prune_resnet [--model resnet50] [--size 224] [--rounds 5] [--runs 5] [--round-to 8] [--quick]
#include <fasterai/fasterai.hpp>

#include <algorithm>
#include <functional>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Stage {
  std::string name;
  std::int64_t parameters = 0, macs = 0;
  double difference = 0;  // max |compressed − masked| / max |masked| of the logits
  std::vector<double> medians;
  std::function<double()> time;  // one timing round: median of the runs, ms
  std::size_t baseline = 0;      // the stage that "time/" compares with
};

double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

template <class Model>
torch::Tensor logits(Model& model, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return model->forward(x);
}

// The stages of one zoo model (a holder such as models::ResNet).
template <class Model>
std::vector<Stage> compress(Model original, const torch::Tensor& x, std::int64_t round_to, int runs) {
  std::vector<Stage> stages;
  const auto shape = x.sizes().slice(1).vec();
  auto add = [&](std::string name, Model model, double difference) {
    stages.push_back({std::move(name), count_parameters(model), count_macs(model, shape).total(), difference, {},
                      [model, x, runs]() mutable {
                        return measure_latency(model, x, LatencyOptions().warmup(1).runs(runs).threads(1)).median_ms;
                      }});
  };
  // The same model exported, BatchNorms folded away and ReLUs fused (optimize_for_inference):
  // what a deployment runs, compared with the original exported the same way.
  std::size_t original_optimized = 0;
  auto add_optimized = [&](std::string name, Model model) {
    auto fast = optimize_for_inference(model, x);
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = fast->forward(x);
    }
    const bool first = original_optimized == 0;
    stages.push_back({std::move(name), count_parameters(model), count_macs(model, shape).total(),
                      relative_difference(y, logits(model, x)), {},
                      [fast, x, runs]() mutable {
                        return measure_latency(fast, x, LatencyOptions().warmup(1).runs(runs).threads(1)).median_ms;
                      },
                      first ? stages.size() : original_optimized});
    if (first) original_optimized = stages.size() - 1;
  };
  original->eval();
  add("original", original, 0.0);
  add_optimized("original, optimized", original);
  struct Variant {
    double sparsity;
    std::int64_t round_to;
  };
  std::vector<Variant> variants{{30, 1}, {50, 1}};
  if (round_to > 1) variants.push_back({50, round_to});
  for (const Variant v : variants) {
    Model model(std::dynamic_pointer_cast<typename Model::Impl>(original->clone()));
    model->eval();
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        model, x, SparsifierOptions(v.sparsity).round_to(v.round_to));
    sparsifier.prune(v.sparsity);
    const torch::Tensor masked = logits(model, x);
    std::string label = "Filter " + std::to_string(int(v.sparsity)) + "%";
    if (v.round_to > 1) label += ", round_to " + std::to_string(v.round_to);
    Pruner().prune_(model, x);
    add(label + ", pruned", model, relative_difference(logits(model, x), masked));
    Model folded(std::dynamic_pointer_cast<typename Model::Impl>(model->clone()));
    BNFolder().fold_(folded, x);
    add(label + ", pruned + BN folded", folded, relative_difference(logits(folded, x), masked));
    if (v.sparsity == 50 && v.round_to == 1) add_optimized(label + ", pruned, optimized", model);
  }
  return stages;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string model_name = "resnet50";
  std::int64_t size = 224, round_to = 8;
  int rounds = 5, runs = 5;
  bool quick = false;
  example::Cli cli("prune_resnet", "Filter pruning of a zoo model through its traced channel graph.");
  cli.option("--model", model_name, "resnet18, resnet34, resnet50 or mobilenet_v2")
      .option("--size", size, "input height and width")
      .option("--rounds", rounds, "interleaved timing rounds over the stages")
      .option("--runs", runs, "timed runs per stage and round")
      .option("--round-to", round_to, "the third variant keeps channel counts multiples of this")
      .flag("--quick", quick, "ResNet-18 at 64x64, 2 rounds of 2 runs (a smoke test)");
  cli.parse(argc, argv);
  if (quick) model_name = "resnet18", size = 64, rounds = 2, runs = 2;
  if (rounds < 1 || runs < 1 || size < 32 || round_to < 1)
    throw example::usage_error("--rounds, --runs and --round-to must be >= 1, --size >= 32");

  torch::manual_seed(0);
  const auto x = torch::randn({1, 3, size, size});
  std::vector<Stage> stages;
  if (model_name == "resnet18") stages = compress(models::resnet18(1000), x, round_to, runs);
  else if (model_name == "resnet34") stages = compress(models::resnet34(1000), x, round_to, runs);
  else if (model_name == "resnet50") stages = compress(models::resnet50(1000), x, round_to, runs);
  else if (model_name == "mobilenet_v2") stages = compress(models::mobilenet_v2(1000), x, round_to, runs);
  else throw example::usage_error("unknown --model '" + model_name + "' (resnet18, resnet34, resnet50, mobilenet_v2)");

  // Interleaved timing: every stage once per round, so a slow phase of the machine hits all.
  for (int r = 0; r < rounds; ++r)
    for (auto& s : stages) s.medians.push_back(s.time());

  std::cout << model_name << " (random weights) at " << size << "x" << size << ", batch 1, 1 thread; latency: median of "
            << rounds << " interleaved rounds of " << runs << " runs, spread = max - min of the rounds\n\n";
  std::cout << std::left << std::setw(40) << "stage" << std::right << std::setw(13) << "parameters"
            << std::setw(16) << "MACs" << std::setw(12) << "latency" << std::setw(11) << "spread"
            << std::setw(11) << "max diff" << std::setw(9) << "MACs/" << std::setw(9) << "time/" << "\n";
  for (auto& s : stages) std::sort(s.medians.begin(), s.medians.end());
  const auto median_of = [](const Stage& s) { return s.medians[s.medians.size() / 2]; };
  for (auto& s : stages) {
    const double median = median_of(s);
    const double base_latency = median_of(stages[s.baseline]);
    std::cout << std::left << std::setw(40) << s.name << std::right << std::setw(13) << with_thousands(s.parameters)
              << std::setw(16) << with_thousands(s.macs) << std::fixed << std::setprecision(1) << std::setw(9)
              << median << " ms" << std::setw(8) << s.medians.back() - s.medians.front() << " ms" << std::setw(11)
              << std::scientific << std::setprecision(1) << s.difference << std::fixed << std::setprecision(2)
              << std::setw(8) << double(stages.front().macs) / double(s.macs) << "x" << std::setw(8)
              << base_latency / median << "x\n";
  }
  std::cout << "\nMACs/ and time/: how many times fewer MACs and how many times faster than the original\n"
               "(optimized rows: than the original, optimized; max diff there: against the model exported).\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "prune_resnet: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "prune_resnet: " << e.what() << "\n";
  return 1;
}
