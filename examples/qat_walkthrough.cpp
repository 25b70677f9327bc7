// Quantization-aware training against post-training quantization: train a model on
// Fashion-MNIST, then compare the test accuracy of
//
//   fp32                         the trained model
//   PTQ int8                     static quantization (min-max) on training batches, no training
//   fp32 fine-tuned, then PTQ    the same extra epochs as QAT in fp32, then the same PTQ:
//                                what the extra training alone gives
//   QAT int8                     quantization-aware training for those epochs, then convert
//
// --model vgg: the walkthrough's compact VGG, a Sequential (Calibrator, QuantizationAwareTraining).
// --model resnet: the residual network of examples/train_residual, a module with its own forward
// (TracedCalibrator, TracedQuantizationAwareTraining: on its traced graph, residual adds in int8).
//
//   qat_walkthrough [--quick] [--model vgg] [--epochs 3] [--qat-epochs 1] [--train 60000] ...  (--help)
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/qat.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/quant/traced_qat.hpp>

#include <chrono>
#include <iomanip>
#include <iostream>

#include "common/accuracy.hpp"
#include "common/cli.hpp"
#include "common/small_resnet.hpp"

namespace {

using namespace fasterai;

struct Args {
  bool quick = false;
  std::string model = "vgg";
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

// What differs between a Sequential and a module with its own forward: how it is built, copied,
// statically quantized and trained with fake quantization.
struct SequentialPath {
  using Model = torch::nn::Sequential;
  static constexpr const char* name = "compact VGG (Sequential)";
  static Model make() { return models::compact_vgg(); }
  static Model copy(const Model& m) { return clone_model(m); }
  static torch::nn::Sequential ptq(Model m, const data::Batches& train, std::size_t batches) {
    Calibrator calibrator(m);
    calibrator.observe(train, batches);
    return calibrator.convert();
  }
  static QuantizationAwareTraining<> qat(Model m) { return QuantizationAwareTraining<>(m); }
};

struct TracedPath {
  using Model = example::SmallResNet;
  static constexpr const char* name = "residual network (own forward, traced)";
  static torch::Tensor example() { return torch::zeros({1, 1, 28, 28}); }
  static Model make() { return Model(); }
  static Model copy(const Model& m) { return Model(std::dynamic_pointer_cast<example::SmallResNetImpl>(m->clone())); }
  static torch::jit::Module ptq(Model m, const data::Batches& train, std::size_t batches) {
    TracedCalibrator calibrator(m, example());
    calibrator.observe(train, batches);
    return calibrator.convert();
  }
  static TracedQuantizationAwareTraining qat(Model m) { return TracedQuantizationAwareTraining(m, example()); }
};

struct Row {
  const char* name;
  double accuracy;
};

template <class Path>
std::vector<Row> compare(const Args& a, const data::Batches& train, const data::Batches& test) {
  std::cout << "### fp32 " << Path::name << "\n\n";
  auto model = Path::make();
  Learner learn(model, train, test, LearnerOptions().seed(a.seed));
  learn.fit_one_cycle(a.epochs, a.lr);
  model->eval();

  std::cout << "\n### PTQ (" << a.calibration_batches << " training batches)\n";
  auto ptq_int8 = Path::ptq(model, train, a.calibration_batches);

  std::cout << "\n### fp32 fine-tuned " << a.qat_epochs << " epoch(s), then PTQ\n\n";
  auto tuned = Path::copy(model);
  Learner tune(tuned, train, test, LearnerOptions().seed(a.seed));
  tune.fit(a.qat_epochs, a.qat_lr);
  auto tuned_int8 = Path::ptq(tuned, train, a.calibration_batches);

  std::cout << "\n### QAT " << a.qat_epochs << " epoch(s)\n\n";
  auto qat = Path::qat(model);
  Learner qat_learn(qat.model(), train, test, LearnerOptions().seed(a.seed));
  qat_learn.fit(a.qat_epochs, a.qat_lr, {qat});
  auto qat_int8 = qat.convert();

  return {{"fp32", accuracy(model, test)},
          {"PTQ int8 (min-max)", accuracy(ptq_int8, test)},
          {"fp32 fine-tuned, then PTQ int8", accuracy(tuned_int8, test)},
          {"QAT int8", accuracy(qat_int8, test)}};
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("qat_walkthrough",
                   "A compact VGG or a residual network on Fashion-MNIST: int8 by quantization-aware training against "
                   "post-training quantization and fp32.");
  cli.flag("--quick", a.quick, "a smoke run: 3000 training and 1000 test images, 1 epoch per stage")
      .option("--model", a.model, "vgg (the walkthrough's compact VGG) | resnet (a residual network with its own forward)")
      .option("--epochs", a.epochs, "one-cycle epochs of the fp32 model")
      .option("--qat-epochs", a.qat_epochs, "epochs of quantization-aware fine-tuning (and of the fp32 control)")
      .option("--qat-lr", a.qat_lr, "learning rate of that fine-tuning (constant)")
      .option("--calibration-batches", a.calibration_batches, "training batches observed by PTQ")
      .option("--train", a.train, "training images (a seeded random subset below 60000)")
      .option("--test", a.test, "test images (a seeded random subset below 10000)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    if (a.model != "vgg" && a.model != "resnet")
      throw example::usage_error("--model '" + a.model + "' is not allowed; expected vgg or resnet");
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
    const std::vector<Row> rows = a.model == "vgg" ? compare<SequentialPath>(a, train, test)
                                                   : compare<TracedPath>(a, train, test);
    const double fp32 = rows.front().accuracy;
    std::cout << "\n| model | accuracy | vs fp32 |\n|---|---:|---:|\n";
    for (const auto& r : rows)
      std::cout << "| " << r.name << " | " << std::fixed << std::setprecision(2) << 100 * r.accuracy
                << "% | " << std::showpos << 100 * (r.accuracy - fp32) << std::noshowpos << " |\n";
    std::cout << "\nTotal time: " << std::setprecision(0)
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s\n";
    return 0;
  });
}
