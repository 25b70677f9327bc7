// Compress a Vision Transformer through its traced graph. Exact stages: each encoder block's
// MLP hidden units (mlp.0's outputs, read by mlp.3 through GELU) scored by L1 and removed, 30%
// and 50% of them. Approximate stage (opt-in, SparsifierOptions/PrunerOptions::approximate):
// half of the heads, which in LibTorch's MultiheadAttention are half of the hidden size (its
// heads are tied to the width it reads; every LayerNorm normalises over it), with half of the
// MLP units: ViT-B/16 becomes ViT-S/16's shape. For each stage: parameters, MACs, latency
// (1 thread, batch 1, median of interleaved rounds), eager and through optimize_for_inference,
// and the largest relative difference between the masked model's logits and the pruned one's
// (random weights: exact stages show the transform is exact; accuracy needs real weights and
// fine-tuning, see train_vit).
//
//   prune_vit [--size 224] [--rounds 3] [--runs 3] [--quick]
#include <fasterai/deploy.hpp>
#include <fasterai/fasterai.hpp>
#include <fasterai/models/vit.hpp>

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
  double difference = 0;  // max |pruned − masked| / max |masked| of the logits
  std::function<double()> time;
  std::vector<double> medians;
};

torch::Tensor logits(models::VisionTransformer& model, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return model->forward(x);
}

// The same random ViT each time (the seed), with a random head (torchvision zeroes it).
models::VisionTransformer make(const models::VisionTransformerOptions& options) {
  torch::manual_seed(0);
  auto vit = models::vit(options);
  torch::NoGradGuard no_grad;
  for (auto& p : vit->heads->parameters()) p.normal_(0.0, 0.02);
  vit->eval();
  return vit;
}

// The first Linear of every block's MLP: the layers whose outputs are the hidden units.
std::vector<std::string> mlp_inputs(const models::VisionTransformer& vit) {
  std::vector<std::string> names;
  for (std::size_t i = 0; i < vit->encoder->layers->size(); ++i)
    names.push_back("encoder.layers.encoder_layer_" + std::to_string(i) + ".mlp.0");
  return names;
}

}  // namespace

int main(int argc, char** argv) try {
  std::int64_t size = 224;
  int rounds = 3, runs = 3;
  bool quick = false;
  example::Cli cli("prune_vit", "MLP units of a Vision Transformer removed through its traced graph.");
  cli.option("--size", size, "input height and width (a multiple of 16)")
      .option("--rounds", rounds, "interleaved timing rounds over the stages")
      .option("--runs", runs, "timed runs per stage and round")
      .flag("--quick", quick, "a 2-layer ViT at 32x32, 1 round of 1 run (a smoke test)");
  cli.parse(argc, argv);
  if (rounds < 1 || runs < 1 || size < 16 || size % 16 != 0)
    throw example::usage_error("--rounds and --runs must be >= 1, --size a multiple of 16");
  auto options = models::VisionTransformerOptions(size, 16);
  if (quick) {
    options = models::VisionTransformerOptions(32, 8).num_layers(2).num_heads(2).hidden_dim(32).mlp_dim(64);
    size = 32, rounds = 1, runs = 1;
  }
  const auto x = torch::randn({1, 3, size, size});
  const std::vector<std::int64_t> shape{3, size, size};

  std::vector<Stage> stages;
  const auto latency = [x, runs](auto model) {
    return [model, x, runs]() mutable {
      return measure_latency(model, x, LatencyOptions().warmup(1).runs(runs).threads(1)).median_ms;
    };
  };
  // A stage run eager and through optimize_for_inference, each against the original run the
  // same way.
  const auto add = [&](const std::string& name, models::VisionTransformer vit, double difference) {
    const auto parameters = count_parameters(vit), macs = count_macs(vit, shape).total();
    stages.push_back({name, parameters, macs, difference, latency(vit), {}});
    auto fast = optimize_for_inference(vit, x);
    stages.push_back({name + ", optimized", parameters, macs, difference, latency(fast), {}});
  };
  add("original", make(options), 0.0);
  for (double sparsity : {30.0, 50.0}) {
    auto vit = make(options);
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        vit, x, SparsifierOptions(sparsity).include(mlp_inputs(vit)));
    sparsifier.prune(sparsity);
    const auto masked = logits(vit, x);
    const PruneReport report = Pruner().prune_(vit, x);
    const double difference = (logits(vit, x) - masked).abs().max().item<double>() / masked.abs().max().item<double>();
    add("MLP units " + std::to_string(int(sparsity)) + "%" + (report.exact() ? "" : " (approximate)"), vit,
        difference);
  }
  {
    // Heads (with the hidden size they are tied to) and MLP units, 50% each: approximate.
    auto vit = make(options);
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        vit, x, SparsifierOptions(50).include_linear(true).approximate(true));
    sparsifier.prune(50);
    const auto masked = logits(vit, x);
    const PruneReport report = Pruner(PrunerOptions().approximate(true)).prune_(vit, x);
    const double difference = (logits(vit, x) - masked).abs().max().item<double>() / masked.abs().max().item<double>();
    auto* block = vit->encoder->layers[0]->as<models::EncoderBlockImpl>();
    add("heads+MLP 50%" + std::string(report.exact() ? "" : " (approx.)") + " " +
            std::to_string(block->self_attention->options.num_heads()) + "x" +
            std::to_string(block->self_attention->head_dim),
        vit, difference);
  }
  // Interleaved timing: every stage once per round, so a slow phase of the machine hits all.
  for (int r = 0; r < rounds; ++r)
    for (auto& s : stages) s.medians.push_back(s.time());

  std::cout << "ViT (random weights, " << options.num_layers() << " layers, " << options.num_heads()
            << " heads, hidden " << options.hidden_dim() << ", MLP " << options.mlp_dim() << ") at " << size << "x"
            << size << ", batch 1, 1 thread; latency: median of " << rounds << " interleaved rounds of " << runs
            << " runs, spread = max - min of the rounds\n\n";
  std::cout << std::left << std::setw(40) << "stage" << std::right << std::setw(13) << "parameters" << std::setw(17)
            << "MACs" << std::setw(12) << "latency" << std::setw(11) << "spread" << std::setw(11) << "max diff"
            << std::setw(9) << "MACs/" << std::setw(9) << "time/" << "\n";
  for (auto& s : stages) std::sort(s.medians.begin(), s.medians.end());
  const auto median_of = [](const Stage& s) { return s.medians[s.medians.size() / 2]; };
  for (std::size_t i = 0; i < stages.size(); ++i) {
    const auto& s = stages[i];
    const auto& base = stages[i % 2];  // eager rows against the original eager, optimized against optimized
    const double median = median_of(s);
    std::cout << std::left << std::setw(40) << s.name << std::right << std::setw(13) << with_thousands(s.parameters)
              << std::setw(17) << with_thousands(s.macs) << std::fixed << std::setprecision(1) << std::setw(9)
              << median << " ms" << std::setw(8) << s.medians.back() - s.medians.front() << " ms" << std::setw(11)
              << std::scientific << std::setprecision(1) << s.difference << std::fixed << std::setprecision(2)
              << std::setw(8) << double(base.macs) / double(s.macs) << "x" << std::setw(8)
              << median_of(base) / median << "x\n";
  }
  std::cout << "\nMACs/ and time/: how many times fewer MACs and how many times faster than the original run the\n"
               "same way (eager or optimized). max diff: masked vs pruned logits; for the approximate stage it is\n"
               "what removing hidden channels under the LayerNorms changes before any fine-tuning.\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "prune_vit: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "prune_vit: " << e.what() << "\n";
  return 1;
}
