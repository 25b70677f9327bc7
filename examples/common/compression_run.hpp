#pragma once
// What the train-then-compress examples share: their command line (epochs, fine-tuning,
// sparsity, a Fashion-MNIST subset), the Learner on Fashion-MNIST, and the table of stages —
// accuracy, parameters, MACs and latency timed in interleaved rounds (1 thread, batch 1), so
// that a slow phase of the machine hits every stage alike.

#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "cli.hpp"

namespace example {

struct CompressionRun {
  int epochs, finetune, rounds = 5;
  double sparsity = 50, lr;
  std::int64_t subset = 0;
  std::uint64_t seed = 42;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;

  // Declares the options on `cli`, parses, applies --quick and checks the values.
  void parse(Cli& cli, int argc, char** argv, const std::string& what_is_pruned) {
    cli.option("--epochs", epochs, "epochs of fit_one_cycle for the baseline")
        .option("--finetune", finetune, "epochs of fine-tuning while " + what_is_pruned + " are pruned")
        .option("--sparsity", sparsity, "final percentage of " + what_is_pruned + " removed")
        .option("--lr", lr, "peak learning rate of the baseline's cycle")
        .option("--subset", subset, "train on N images, test on N/6 (0: all)")
        .option("--rounds", rounds, "interleaved timing rounds")
        .option("--data", data_dir, "folder of the Fashion-MNIST IDX files")
        .option("--seed", seed, "seed of initialization, shuffling and subsets")
        .flag("--quick", quick, "1 + 1 epochs on 2000 images (a smoke test)");
    cli.parse(argc, argv);
    if (quick) epochs = 1, finetune = 1, subset = 2000, rounds = 2;
    if (epochs < 1 || finetune < 1 || rounds < 1 || subset < 0 || sparsity < 0 || sparsity >= 100)
      throw usage_error("--epochs, --finetune and --rounds must be >= 1, --subset >= 0, --sparsity in [0, 100)");
  }

  // A Learner of `model` on Fashion-MNIST (the subset when asked), seeded.
  template <class Model>
  fasterai::Learner learner(Model& model) const {
    using namespace fasterai;
    auto options = data::FashionMNISTOptions().root(data_dir);
    auto train_options = options, test_options = options;
    if (subset > 0) {
      train_options.subset(subset).subset_seed(seed);
      test_options.subset(std::max<std::int64_t>(1, subset / 6)).subset_seed(seed);
    }
    return Learner(model,
                   data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                      data::LoaderOptions(128).shuffle(true)),
                   data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000)),
                   LearnerOptions().seed(seed));
  }
};

// One stage of the compressed model, with a copy of the model to time.
template <class Model>
struct StageRow {
  std::string stage;
  double accuracy = 0;
  std::int64_t parameters = 0, macs = 0;
  Model model{nullptr};
  std::vector<double> medians;
};

// Times every stage once per round on `input`, then prints the table.
template <class Model>
void time_and_print(std::vector<StageRow<Model>>& rows, const torch::Tensor& input, int rounds) {
  using namespace fasterai;
  for (int r = 0; r < rounds; ++r)
    for (auto& row : rows)
      row.medians.push_back(measure_latency(row.model, input, LatencyOptions().warmup(3).runs(20).threads(1)).median_ms);
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
}

}  // namespace example
