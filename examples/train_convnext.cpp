// A small ConvNeXt on Fashion-MNIST with half of its widths removed — the approximate path: the
// stage widths are normalised by LayerNorms, so removing them changes those norms' statistics
// and the model is only close to the masked one; fine-tuning recovers the rest. models::ConvNeXt
// (two stages of 32 and 64 channels, two blocks each) is trained with fit_one_cycle, then
// fine-tuned while SparsifyCallback zeroes half of every coupled group's channels
// (Filter/Local/L1, `approximate(true)`: the stage widths with their LayerNorms and layer scales,
// and the blocks' MLP units), then pruned in place with PrunerOptions::approximate, then
// fine-tuned once more. For each stage: test accuracy, parameters, MACs, latency (1 thread,
// batch 1, median of interleaved rounds).
//
//   train_convnext [--epochs 3] [--finetune 2] [--sparsity 50] [--subset N] [--data PATH]
//                  [--seed 42] [--quick]
#include <fasterai/fasterai.hpp>
#include <fasterai/models/convnext.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "common/compression_run.hpp"

using fasterai::models::ConvNeXt;

int main(int argc, char** argv) try {
  using namespace fasterai;
  example::CompressionRun run{.epochs = 3, .finetune = 2, .lr = 4e-3};
  example::Cli cli("train_convnext", "Train a small ConvNeXt, remove half of its widths (approximate), fine-tune.");
  run.parse(cli, argc, argv, "every coupled group's channels");
  torch::manual_seed(static_cast<std::int64_t>(run.seed));
  ConvNeXt model(models::ConvNeXtOptions({{32, 64, 2}, {64, std::nullopt, 2}}).in_channels(1).num_classes(10).layer_scale(0.1));
  Learner learn = run.learner(model);
  const auto example_input = torch::zeros({1, 1, 28, 28});
  std::vector<example::StageRow<ConvNeXt>> rows;
  auto record = [&](std::string stage) {
    rows.push_back({std::move(stage), learn.validate().metric("accuracy"), count_parameters(model),
                    count_macs(model, {1, 28, 28}).total(),
                    ConvNeXt(std::dynamic_pointer_cast<models::ConvNeXtImpl>(model->clone())), {}});
  };

  std::cout << "Baseline: " << run.epochs << " epochs of fit_one_cycle\n";
  learn.fit_one_cycle(run.epochs, run.lr);
  record("baseline");

  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, example_input, SparsifierOptions(run.sparsity).include_linear(true).approximate(true));
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << run.finetune << " epochs while zeroing " << run.sparsity
            << "% of every coupled group's channels (stage widths included: approximate)\n";
  learn.fit(run.finetune, run.lr / 5, {sparsify});
  record("sparsified (masked)");

  const PruneReport pruned = Pruner(PrunerOptions().approximate(true)).prune_(model, example_input);
  record("pruned (approximate)");
  std::cout << "\nFine-tuning 1 epoch after pruning\n";
  learn.fit(1, run.lr / 10);
  record("pruned + fine-tuned");

  example::time_and_print(rows, example_input, run.rounds);
  std::cout << "\n" << pruned.channels_removed() << " channels removed; " << pruned.approximate.size()
            << " LayerNorms normalise over fewer channels (approximate); latency: median of " << run.rounds
            << " interleaved rounds of 20 runs, spread = max - min of the rounds\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "train_convnext: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_convnext: " << e.what() << "\n";
  return 1;
}
