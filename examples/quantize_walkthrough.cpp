// The walkthrough's compressed model, then int8: train a compact VGG on Fashion-MNIST, sparsify
// its filters while fine-tuning, prune, fold and factorize as the walkthrough does (without the
// teacher), then quantize the result three ways and compare size, latency and test accuracy:
//
//   int8 dynamic                 quantize_dynamic: Linear weights int8, activations fp32
//   int8 static, min-max         Calibrator on training batches, MinMaxObserver
//   int8 static, percentile      Calibrator with PercentileObserver(99.99)
//
//   quantize_walkthrough [--quick] [--epochs 3] [--calibration-batches 16] ...  (--help)
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

#include <chrono>
#include <iomanip>
#include <iostream>

#include "common/accuracy.hpp"
#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Args {
  bool quick = false;
  int epochs = 3;
  int sparsify_epochs = 3;
  int finetune_epochs = 2;
  double lr = 5e-3, sparsify_lr = 1e-3, finetune_lr = 1e-3;
  double sparsity = 40;
  double percent_removed = 0.5;
  std::size_t calibration_batches = 16;
  std::int64_t batch_size = 128;
  std::int64_t train = 60000, test = 10000;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
  int threads = 1;
};

using example::accuracy;

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("quantize_walkthrough",
                   "The walkthrough's compressed compact VGG quantized to int8 (dynamic and static): "
                   "size, latency and accuracy against fp32.");
  cli.flag("--quick", a.quick, "a smoke run: 3000 training and 1000 test images, 1 epoch per stage")
      .option("--epochs", a.epochs, "one-cycle epochs of the baseline")
      .option("--sparsify-epochs", a.sparsify_epochs, "epochs of fine-tuning while sparsifying")
      .option("--finetune-epochs", a.finetune_epochs, "epochs of fine-tuning after factorization")
      .option("--sparsity", a.sparsity, "target filter sparsity, percent")
      .option("--percent-removed", a.percent_removed, "FCDecomposer: fraction of singular values removed")
      .option("--calibration-batches", a.calibration_batches, "training batches observed by the calibration")
      .option("--train", a.train, "training images (a seeded random subset below 60000)")
      .option("--test", a.test, "test images (a seeded random subset below 10000)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--threads", a.threads, "threads for the latency measurements")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    const auto start = std::chrono::steady_clock::now();
    if (a.quick) {
      a.train = 3000, a.test = 1000;
      a.epochs = a.sparsify_epochs = a.finetune_epochs = 1;
      a.calibration_batches = 4;
    }
    auto options = data::FashionMNISTOptions().root(a.data).subset_seed(a.seed);
    auto train_options = options, test_options = options;
    if (a.train < 60000) train_options.subset(a.train);
    if (a.test < 10000) test_options.subset(a.test);
    const auto train = data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                          data::LoaderOptions(static_cast<std::size_t>(a.batch_size)).shuffle(true));
    const auto test = data::make_batches(data::FashionMNIST(data::Split::Test, test_options),
                                         data::LoaderOptions(1000));
    torch::manual_seed(a.seed);

    std::cout << "### fp32: baseline, sparsify (filter, local, l1, cos), prune, fold, factorize\n\n";
    auto model = models::compact_vgg();
    Learner learn(model, train, test, LearnerOptions().seed(a.seed));
    learn.fit_one_cycle(a.epochs, a.lr);
    auto sparsifier = make_sparsifier(model, {"filter", "local", "l1", "cos"}, SparsifierOptions(a.sparsity));
    SparsifyCallback sparsify(*sparsifier, SparsifyCallbackOptions().end(0.7));
    learn.fit_one_cycle(a.sparsify_epochs, a.sparsify_lr, {sparsify});
    auto compressed = FCDecomposer().decompose(BNFolder().fold(Pruner().prune(model)), a.percent_removed);
    Learner final_learn(compressed, train, test, LearnerOptions().seed(a.seed));
    final_learn.fit_one_cycle(a.finetune_epochs, a.finetune_lr);
    compressed->eval();

    std::cout << "\n### int8 (calibration: " << a.calibration_batches << " training batches of "
              << a.batch_size << ")\n\n";
    auto dynamic = quantize_dynamic(compressed);
    Calibrator minmax(compressed);
    minmax.observe(train, a.calibration_batches);
    Calibrator<quant::PercentileObserver> percentile(compressed, {}, quant::PercentileObserver(99.99));
    percentile.observe(train, a.calibration_batches);
    auto static_minmax = minmax.convert();
    auto static_percentile = percentile.convert();

    struct Stage {
      const char* name;
      torch::nn::Sequential model;
    };
    std::vector<Stage> stages{{"compressed fp32", compressed},
                              {"int8 dynamic (Linear)", dynamic},
                              {"int8 static, min-max", static_minmax},
                              {"int8 static, percentile 99.99", static_percentile}};
    const double base_accuracy = accuracy(compressed, test);
    const auto base_bytes = model_size_bytes(compressed);
    std::cout << "| stage | size (MB) | size ratio | latency (ms) | accuracy | vs fp32 |\n"
              << "|---|---:|---:|---:|---:|---:|\n";
    for (auto& s : stages) {
      const double acc = accuracy(s.model, test);
      const auto latency = measure_latency(s.model, torch::randn({1, 1, 28, 28}),
                                           LatencyOptions().warmup(50).runs(500).threads(a.threads));
      const auto bytes = model_size_bytes(s.model);
      std::cout << "| " << s.name << " | " << std::fixed << std::setprecision(3) << double(bytes) / 1e6
                << " | " << std::setprecision(2) << double(base_bytes) / double(bytes) << "x | "
                << std::setprecision(3) << latency.median_ms << " | " << std::setprecision(2)
                << 100 * acc << "% | " << std::showpos << 100 * (acc - base_accuracy)
                << std::noshowpos << " |\n";
    }
    std::cout << "\nMACs (fp32 and int8 alike): " << with_thousands(count_macs(compressed, {1, 28, 28}).total())
              << "\nTotal time: " << std::setprecision(0)
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s\n";
    return 0;
  });
}
