// Quantization-aware training against post-training quantization: train the walkthrough's
// compact VGG on Fashion-MNIST, then compare the test accuracy of
//
//   fp32                         the trained model
//   PTQ int8                     Calibrator (min-max) on training batches, no training
//   fp32 fine-tuned, then PTQ    the same extra epochs as QAT in fp32, then the Calibrator:
//                                what the extra training alone gives
//   QAT int8                     QuantizationAwareTraining for those epochs, then convert
//
//   qat_walkthrough [--quick] [--epochs 3] [--qat-epochs 1] [--train 60000] ...  (--help)
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/qat.hpp>

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
  int qat_epochs = 1;
  double lr = 5e-3, qat_lr = 1e-4;
  std::size_t calibration_batches = 16;
  std::int64_t batch_size = 128;
  std::int64_t train = 60000, test = 10000;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
};

using example::accuracy;

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("qat_walkthrough",
                   "Compact VGG on Fashion-MNIST: int8 by quantization-aware training against "
                   "post-training quantization and fp32.");
  cli.flag("--quick", a.quick, "a smoke run: 3000 training and 1000 test images, 1 epoch per stage")
      .option("--epochs", a.epochs, "one-cycle epochs of the fp32 model")
      .option("--qat-epochs", a.qat_epochs, "epochs of quantization-aware fine-tuning (and of the fp32 control)")
      .option("--qat-lr", a.qat_lr, "learning rate of that fine-tuning (constant)")
      .option("--calibration-batches", a.calibration_batches, "training batches observed by PTQ")
      .option("--train", a.train, "training images (a seeded random subset below 60000)")
      .option("--test", a.test, "test images (a seeded random subset below 10000)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    const auto start = std::chrono::steady_clock::now();
    if (a.quick) {
      a.train = 3000, a.test = 1000;
      a.epochs = a.qat_epochs = 1;
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

    std::cout << "### fp32 compact VGG\n\n";
    auto model = models::compact_vgg();
    Learner learn(model, train, test, LearnerOptions().seed(a.seed));
    learn.fit_one_cycle(a.epochs, a.lr);
    model->eval();

    std::cout << "\n### PTQ (" << a.calibration_batches << " training batches)\n";
    Calibrator ptq(model);
    ptq.observe(train, a.calibration_batches);
    auto ptq_int8 = ptq.convert();

    std::cout << "\n### fp32 fine-tuned " << a.qat_epochs << " epoch(s), then PTQ\n\n";
    auto tuned = clone_model(model);
    Learner tune(tuned, train, test, LearnerOptions().seed(a.seed));
    tune.fit(a.qat_epochs, a.qat_lr);
    Calibrator tuned_ptq(tuned);
    tuned_ptq.observe(train, a.calibration_batches);
    auto tuned_int8 = tuned_ptq.convert();

    std::cout << "\n### QAT " << a.qat_epochs << " epoch(s)\n\n";
    QuantizationAwareTraining qat(model);
    Learner qat_learn(qat.model(), train, test, LearnerOptions().seed(a.seed));
    qat_learn.fit(a.qat_epochs, a.qat_lr, {qat});
    auto qat_int8 = qat.convert();

    const double fp32 = accuracy(model, test);
    struct Row {
      const char* name;
      double accuracy;
    };
    const std::vector<Row> rows{{"fp32", fp32},
                                {"PTQ int8 (min-max)", accuracy(ptq_int8, test)},
                                {"fp32 fine-tuned, then PTQ int8", accuracy(tuned_int8, test)},
                                {"QAT int8", accuracy(qat_int8, test)}};
    std::cout << "\n| model | accuracy | vs fp32 |\n|---|---:|---:|\n";
    for (const auto& r : rows)
      std::cout << "| " << r.name << " | " << std::fixed << std::setprecision(2) << 100 * r.accuracy
                << "% | " << std::showpos << 100 * (r.accuracy - fp32) << std::noshowpos << " |\n";
    std::cout << "\nTotal time: " << std::setprecision(0)
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s\n";
    return 0;
  });
}
