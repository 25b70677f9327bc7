// A residual network of one's own on Fashion-MNIST, compressed end to end: the network
// (common/small_resnet.hpp) is written as a LibTorch user writes one (module classes, residual
// additions in forward), trained with fit_one_cycle, then fine-tuned while SparsifyCallback
// prunes its filters gradually (Filter/Local/L1 over the traced channel graph: each residual stream is one coupled
// group), then the zero channels are removed in place and the BatchNorms folded. For each stage:
// test accuracy, parameters, MACs, latency (1 thread, batch 1, median of interleaved rounds).
//
//   train_residual [--epochs 3] [--finetune 2] [--sparsity 50] [--subset N] [--data PATH]
//                  [--seed 42] [--quick]
#include <fasterai/fasterai.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "common/compression_run.hpp"
#include "common/small_resnet.hpp"

int main(int argc, char** argv) try {
  using namespace fasterai;
  using example::SmallResNet;
  using example::SmallResNetImpl;
  example::CompressionRun run{.epochs = 3, .finetune = 2, .lr = 5e-3};
  example::Cli cli("train_residual", "Train, sparsify, prune and fold a residual network of one's own.");
  run.parse(cli, argc, argv, "each coupled group's channels");
  torch::manual_seed(static_cast<std::int64_t>(run.seed));
  SmallResNet model;
  Learner learn = run.learner(model);
  const auto example_input = torch::zeros({1, 1, 28, 28});
  std::vector<example::StageRow<SmallResNet>> rows;
  auto record = [&](std::string stage) {
    rows.push_back({std::move(stage), learn.validate().metric("accuracy"), count_parameters(model),
                    count_macs(model, {1, 28, 28}).total(),
                    SmallResNet(std::dynamic_pointer_cast<SmallResNetImpl>(model->clone())), {}});
  };

  std::cout << "Baseline: " << run.epochs << " epochs of fit_one_cycle\n";
  learn.fit_one_cycle(run.epochs, run.lr);
  record("baseline");

  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, example_input, SparsifierOptions(run.sparsity));
  // Prune over the first half of the fine-tuning, recover during the second.
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << run.finetune << " epochs while pruning to " << run.sparsity
            << "% of each coupled group's filters\n";
  learn.fit(run.finetune, run.lr / 5, {sparsify});
  record("sparsified (masked)");

  const PruneReport pruned = Pruner().prune_(model, example_input);
  record("pruned in place");
  BNFolder().fold_(model, example_input);
  record("BatchNorms folded");

  example::time_and_print(rows, example_input, run.rounds);
  std::cout << "\n" << pruned.channels_removed() << " channels removed; latency: median of " << run.rounds
            << " interleaved rounds of 20 runs, spread = max - min of the rounds\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "train_residual: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_residual: " << e.what() << "\n";
  return 1;
}
