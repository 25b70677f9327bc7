// Compress a Vision Transformer through its traced graph: each encoder block's MLP hidden units
// (mlp.0's outputs, read by mlp.3 through GELU) scored by L1 and removed, 30% and 50% of them,
// exactly. For each stage: parameters, MACs, latency (1 thread, batch 1, median of interleaved
// rounds) and the largest relative difference between the masked model's logits and the pruned
// one's (random weights: the transform is exact, accuracy needs real weights).
//
// What the graph keeps, and says so: LibTorch's MultiheadAttention ties its heads to the
// hidden size, so attention is a barrier; the hidden size is normalised by every LayerNorm, so
// removing it is approximate (PrunerOptions::approximate) and not done here.
//
//   prune_vit [--size 224] [--rounds 3] [--runs 3] [--quick]
#include <fasterai/fasterai.hpp>
#include <fasterai/models/vit.hpp>

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Stage {
  std::string name;
  models::VisionTransformer model;
  std::int64_t parameters = 0, macs = 0;
  double difference = 0;  // max |pruned − masked| / max |masked| of the logits
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
  auto original = make(options);
  stages.push_back({"original", original, count_parameters(original), count_macs(original, shape).total(), 0.0, {}});
  for (double sparsity : {30.0, 50.0}) {
    auto vit = make(options);
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        vit, x, SparsifierOptions(sparsity).include(mlp_inputs(vit)));
    sparsifier.prune(sparsity);
    const auto masked = logits(vit, x);
    const PruneReport report = Pruner().prune_(vit, x);
    const double difference = (logits(vit, x) - masked).abs().max().item<double>() / masked.abs().max().item<double>();
    stages.push_back({"MLP units " + std::to_string(int(sparsity)) + "%, pruned" + (report.exact() ? "" : " (approximate)"),
                      vit, count_parameters(vit), count_macs(vit, shape).total(), difference, {}});
  }
  // Interleaved timing: every stage once per round, so a slow phase of the machine hits all.
  for (int r = 0; r < rounds; ++r)
    for (auto& s : stages)
      s.medians.push_back(measure_latency(s.model, x, LatencyOptions().warmup(1).runs(runs).threads(1)).median_ms);

  std::cout << "ViT (random weights, " << options.num_layers() << " layers, hidden " << options.hidden_dim()
            << ", MLP " << options.mlp_dim() << ") at " << size << "x" << size
            << ", batch 1, 1 thread; latency: median of " << rounds << " interleaved rounds of " << runs
            << " runs, spread = max - min of the rounds\n\n";
  std::cout << std::left << std::setw(28) << "stage" << std::right << std::setw(13) << "parameters" << std::setw(17)
            << "MACs" << std::setw(12) << "latency" << std::setw(11) << "spread" << std::setw(11) << "max diff"
            << std::setw(9) << "MACs/" << std::setw(9) << "time/" << "\n";
  for (auto& s : stages) std::sort(s.medians.begin(), s.medians.end());
  const auto median_of = [](const Stage& s) { return s.medians[s.medians.size() / 2]; };
  for (const auto& s : stages) {
    const double median = median_of(s);
    std::cout << std::left << std::setw(28) << s.name << std::right << std::setw(13) << with_thousands(s.parameters)
              << std::setw(17) << with_thousands(s.macs) << std::fixed << std::setprecision(1) << std::setw(9)
              << median << " ms" << std::setw(8) << s.medians.back() - s.medians.front() << " ms" << std::setw(11)
              << std::scientific << std::setprecision(1) << s.difference << std::fixed << std::setprecision(2)
              << std::setw(8) << double(stages.front().macs) / double(s.macs) << "x" << std::setw(8)
              << median_of(stages.front()) / median << "x\n";
  }
  std::cout << "\nMACs/ and time/: how many times fewer MACs and how many times faster than the original.\n"
               "Kept, and why: attention (LibTorch's MultiheadAttention ties its heads to the hidden size) and\n"
               "the hidden size (every LayerNorm normalises over it: PrunerOptions::approximate).\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "prune_vit: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "prune_vit: " << e.what() << "\n";
  return 1;
}
