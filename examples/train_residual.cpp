// A residual network of one's own on Fashion-MNIST, compressed end to end: the network is
// defined below as a LibTorch user writes one (a module class, residual additions in forward),
// trained with fit_one_cycle, then fine-tuned while SparsifyCallback prunes its filters
// gradually (Filter/Local/L1 over the traced channel graph: each residual stream is one coupled
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

namespace {

namespace nn = torch::nn;

// conv-BN-ReLU-conv-BN plus the input (projected when the shape changes), then ReLU.
// Cloneable, so that a copy of each compression stage can be kept (children are cloned with
// their pruned shapes).
struct BlockImpl : nn::Cloneable<BlockImpl> {
  std::int64_t in, out, stride;
  nn::Conv2d conv1{nullptr}, conv2{nullptr}, project{nullptr};
  nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn_project{nullptr};
  BlockImpl(std::int64_t in_channels, std::int64_t out_channels, std::int64_t stride_)
      : in(in_channels), out(out_channels), stride(stride_) {
    reset();
  }
  void reset() override {
    conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)));
    bn1 = register_module("bn1", nn::BatchNorm2d(out));
    conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(out, out, 3).padding(1).bias(false)));
    bn2 = register_module("bn2", nn::BatchNorm2d(out));
    if (stride != 1 || in != out) {
      project = register_module("project", nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)));
      bn_project = register_module("bn_project", nn::BatchNorm2d(out));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    auto y = bn2(conv2(torch::relu(bn1(conv1(x)))));
    return torch::relu(y + (project ? bn_project(project(x)) : x));
  }
};
TORCH_MODULE(Block);

struct SmallResNetImpl : nn::Cloneable<SmallResNetImpl> {
  nn::Conv2d stem{nullptr};
  nn::BatchNorm2d bn{nullptr};
  Block block1{nullptr}, block2{nullptr}, block3{nullptr};
  nn::Linear fc{nullptr};
  SmallResNetImpl() { reset(); }
  void reset() override {
    stem = register_module("stem", nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1).bias(false)));
    bn = register_module("bn", nn::BatchNorm2d(32));
    block1 = register_module("block1", Block(32, 32, 1));
    block2 = register_module("block2", Block(32, 64, 2));
    block3 = register_module("block3", Block(64, 64, 2));
    fc = register_module("fc", nn::Linear(64, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn(stem(x)));
    x = block3(block2(block1(x)));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(SmallResNet);

}  // namespace

int main(int argc, char** argv) try {
  using namespace fasterai;
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
