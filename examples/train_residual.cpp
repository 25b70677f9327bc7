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

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"

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

struct Row {
  std::string stage;
  double accuracy = 0;
  std::int64_t parameters = 0, macs = 0;
  SmallResNet model{nullptr};  // a copy of the model at this stage, for the timing rounds
  std::vector<double> medians;
};

}  // namespace

int main(int argc, char** argv) try {
  using namespace fasterai;
  int epochs = 3, finetune = 2, rounds = 5;
  double sparsity = 50, lr = 5e-3;
  std::int64_t subset = 0;
  std::uint64_t seed = 42;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
  example::Cli cli("train_residual", "Train, sparsify, prune and fold a residual network of one's own.");
  cli.option("--epochs", epochs, "epochs of fit_one_cycle for the baseline")
      .option("--finetune", finetune, "epochs of fine-tuning while the filters are pruned")
      .option("--sparsity", sparsity, "final percentage of each coupled group's channels removed")
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
  SmallResNet model;
  Learner learn(model,
                data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                   data::LoaderOptions(128).shuffle(true)),
                data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000)),
                LearnerOptions().seed(seed));
  const auto example_input = torch::zeros({1, 1, 28, 28});
  std::vector<Row> rows;
  auto record = [&](std::string stage) {
    Row r{std::move(stage), learn.validate().metric("accuracy"), count_parameters(model),
          count_macs(model, {1, 28, 28}).total(),
          SmallResNet(std::dynamic_pointer_cast<SmallResNetImpl>(model->clone())), {}};
    rows.push_back(std::move(r));
  };

  std::cout << "Baseline: " << epochs << " epochs of fit_one_cycle\n";
  learn.fit_one_cycle(epochs, lr);
  record("baseline");

  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, example_input, SparsifierOptions(sparsity));
  // Prune over the first half of the fine-tuning, recover during the second.
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << finetune << " epochs while pruning to " << sparsity
            << "% of each coupled group's filters\n";
  learn.fit(finetune, lr / 5, {sparsify});
  record("sparsified (masked)");

  const PruneReport pruned = Pruner().prune_(model, example_input);
  record("pruned in place");
  BNFolder().fold_(model, example_input);
  record("BatchNorms folded");

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
  std::cout << "\n" << pruned.channels_removed() << " channels removed; latency: median of " << rounds
            << " interleaved rounds of 20 runs, spread = max - min of the rounds\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "train_residual: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_residual: " << e.what() << "\n";
  return 1;
}
