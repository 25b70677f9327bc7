// A small Vision Transformer on Fashion-MNIST, compressed end to end: models::vit with patches
// of 7x7 (16 tokens and a class token), trained with fit_one_cycle, then fine-tuned while
// SparsifyCallback removes MLP units gradually (Filter/Local/L1 over the traced graph: each
// block's MLP hidden units are one coupled group), then the zero units are removed in place.
// For each stage: test accuracy, parameters, MACs, latency (1 thread, batch 1, median of
// interleaved rounds).
//
//   train_vit [--epochs 4] [--finetune 2] [--sparsity 50] [--subset N] [--data PATH] [--seed 42]
//             [--quick]
#include <fasterai/fasterai.hpp>
#include <fasterai/models/vit.hpp>

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"

namespace {

using fasterai::models::VisionTransformer;

struct Row {
  std::string stage;
  double accuracy = 0;
  std::int64_t parameters = 0, macs = 0;
  VisionTransformer model{nullptr};  // a copy of the model at this stage, for the timing rounds
  std::vector<double> medians;
};

}  // namespace

int main(int argc, char** argv) try {
  using namespace fasterai;
  int epochs = 4, finetune = 2, rounds = 5;
  double sparsity = 50, lr = 2e-3;
  std::int64_t subset = 0;
  std::uint64_t seed = 42;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
  example::Cli cli("train_vit", "Train a small ViT, remove half of its MLP units while fine-tuning.");
  cli.option("--epochs", epochs, "epochs of fit_one_cycle for the baseline")
      .option("--finetune", finetune, "epochs of fine-tuning while the MLP units are pruned")
      .option("--sparsity", sparsity, "final percentage of each block's MLP units removed")
      .option("--lr", lr, "peak learning rate of the baseline's cycle")
      .option("--subset", subset, "train on N images, test on N/6 (0: all)")
      .option("--rounds", rounds, "interleaved timing rounds")
      .option("--data", data_dir, "folder of the Fashion-MNIST IDX files")
      .option("--seed", seed, "seed of initialization, shuffling and subsets")
      .flag("--quick", quick, "1 + 1 epochs on 2000 images (a smoke test)");
  cli.parse(argc, argv);
  if (quick) epochs = 1, finetune = 1, subset = 2000, rounds = 2;
  if (epochs < 1 || finetune < 1 || rounds < 1 || subset < 0 || sparsity < 0 || sparsity >= 100)
    throw example::usage_error(
        "--epochs, --finetune and --rounds must be >= 1, --subset >= 0, --sparsity in [0, 100)");

  auto options = data::FashionMNISTOptions().root(data_dir);
  auto train_options = options, test_options = options;
  if (subset > 0) {
    train_options.subset(subset).subset_seed(seed);
    test_options.subset(std::max<std::int64_t>(1, subset / 6)).subset_seed(seed);
  }
  torch::manual_seed(static_cast<std::int64_t>(seed));
  const auto vit_options =
      models::VisionTransformerOptions(28, 7).in_channels(1).num_layers(4).num_heads(4).hidden_dim(64).mlp_dim(256).num_classes(10);
  VisionTransformer model(vit_options);
  Learner learn(model,
                data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                   data::LoaderOptions(128).shuffle(true)),
                data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000)),
                LearnerOptions().seed(seed));
  const auto example_input = torch::zeros({1, 1, 28, 28});
  std::vector<Row> rows;
  auto record = [&](std::string stage) {
    rows.push_back({std::move(stage), learn.validate().metric("accuracy"), count_parameters(model),
                    count_macs(model, {1, 28, 28}).total(),
                    VisionTransformer(std::dynamic_pointer_cast<models::VisionTransformerImpl>(model->clone())), {}});
  };

  std::cout << "Baseline: " << epochs << " epochs of fit_one_cycle\n";
  learn.fit_one_cycle(epochs, lr);
  record("baseline");

  std::vector<std::string> mlp_inputs;
  for (std::int64_t i = 0; i < vit_options.num_layers(); ++i)
    mlp_inputs.push_back("encoder.layers.encoder_layer_" + std::to_string(i) + ".mlp.0");
  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, example_input, SparsifierOptions(sparsity).include(mlp_inputs));
  // Prune over the first half of the fine-tuning, recover during the second.
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << finetune << " epochs while removing " << sparsity << "% of each block's MLP units\n";
  learn.fit(finetune, lr / 5, {sparsify});
  record("sparsified (masked)");

  const PruneReport pruned = Pruner().prune_(model, example_input);
  record("pruned in place");

  for (int r = 0; r < rounds; ++r)
    for (auto& row : rows)
      row.medians.push_back(
          measure_latency(row.model, example_input, LatencyOptions().warmup(3).runs(20).threads(1)).median_ms);

  std::cout << "\n" << std::left << std::setw(22) << "stage" << std::right << std::setw(10) << "accuracy"
            << std::setw(13) << "parameters" << std::setw(14) << "MACs" << std::setw(12) << "latency"
            << std::setw(12) << "spread\n";
  for (auto& row : rows) {
    std::sort(row.medians.begin(), row.medians.end());
    std::cout << std::left << std::setw(22) << row.stage << std::right << std::fixed << std::setprecision(2)
              << std::setw(9) << 100 * row.accuracy << "%" << std::setw(13) << with_thousands(row.parameters)
              << std::setw(14) << with_thousands(row.macs) << std::setw(9) << row.medians[row.medians.size() / 2] * 1000
              << " us" << std::setw(8) << (row.medians.back() - row.medians.front()) * 1000 << " us\n";
  }
  std::cout << "\n" << pruned.channels_removed() << " MLP units removed (" << (pruned.exact() ? "exact" : "approximate")
            << "); latency: median of " << rounds << " interleaved rounds of 20 runs, spread = max - min of the rounds\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "train_vit: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_vit: " << e.what() << "\n";
  return 1;
}
