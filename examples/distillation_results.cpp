// Feature distillation against soft-target distillation on Fashion-MNIST. A teacher is trained
// first, then the student from the same initial weights in each row for the same epochs:
//
//   student alone             cross-entropy only
//   soft targets (KD)         KnowledgeDistillation (T, alpha as the walkthrough's defaults)
//   KD + FitNet hint          + the MSE between the last stage's features (7x7), the student's
//                             through a learned 1x1 adapter
//   KD + attention transfer   + attention maps of the second and third stages (14x14, 7x7), one
//                             row per weight of --attention-weights (beta/2; the paper's is 500)
//
// --model vgg (default): the walkthrough's compact VGG student (16/32/64) and a wider compact VGG
// teacher (32/64/128, hidden 512), both Sequentials. --model resnet: residual networks with
// their own forward that keep their blocks in a Sequential member, as torchvision's ResNet does
// (student 16/16/32, teacher 32/32/64, the widths of examples/train_residual): the hints name
// the blocks ("stages.1", "stages.2"), read through taps in that member's forward.
//
// Each row is repeated for --seeds seeds (initial weights, shuffling and the teacher's own
// seed); the table gives every seed's accuracy and their mean.
//
//   distillation_results [--model vgg|resnet] [--epochs 3] [--teacher-epochs 3] [--seeds 2]
//                        [--lr 3e-3] [--subset 10000] [--test 10000] [--temperature 3]
//                        [--alpha 0.5] [--attention-weights 500[,50,...]] [--data PATH] [--quick]
//
// docs/toolbox.md has the tables and their reading.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <iostream>
#include <string>
#include <system_error>
#include <vector>

#include "common/cli.hpp"
#include "common/small_resnet.hpp"

namespace {

using namespace fasterai;

struct Settings {
  int epochs = 3, teacher_epochs = 3, seeds = 2;
  double lr = 3e-3, temperature = 3.0, alpha = 0.5;
  std::int64_t subset = 10000, test = 10000;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  std::string model = "vgg";
  std::string attention_weights = "500";
  std::vector<double> attention;  // --attention-weights, parsed
  bool quick = false;
};

// "500,50" -> {500, 50}; every weight must be a finite number > 0 (an empty item, "inf" or a
// trailing comma is refused, not skipped).
std::vector<double> parse_weights(const std::string& list) {
  std::vector<double> out;
  for (std::size_t start = 0; start <= list.size();) {
    const std::size_t end = std::min(list.find(',', start), list.size());
    const char *first = list.data() + start, *last = list.data() + end;
    double w = 0;
    const auto [stop, error] = std::from_chars(first, last, w);
    if (first == last || error != std::errc() || stop != last || !std::isfinite(w) || !(w > 0))
      throw example::usage_error("--attention-weights '" + list + "': '" + std::string(first, last) +
                                 "' is not a weight > 0; expected finite numbers > 0 separated by commas, "
                                 "e.g. 500,50");
    out.push_back(w);
    start = end + 1;
  }
  return out;
}

// The compact VGGs: the layers whose outputs are matched are each stage's last ReLU (features
// of the compact VGG with BatchNorm: conv, bn, relu [, pool] per convolution).
struct VggPair {
  static torch::nn::Sequential student() { return models::compact_vgg(); }
  static torch::nn::Sequential teacher() {
    return models::compact_vgg(models::CompactVGGOptions().widths({32, 64, 128}).hidden(512));
  }
  static constexpr const char* stage2 = "features.9";
  static constexpr const char* stage3 = "features.16";
  static constexpr const char* teacher_name = "teacher (32/64/128, hidden 512)";
};

// A residual network as torchvision writes ResNet: its own forward (stem, then the blocks, a
// pooled linear head), the blocks in a Sequential member, so that each can be named for a hint.
struct StagedResNetImpl : torch::nn::Cloneable<StagedResNetImpl> {
  std::vector<std::int64_t> widths;
  torch::nn::Conv2d stem{nullptr};
  torch::nn::BatchNorm2d bn{nullptr};
  torch::nn::Sequential stages{nullptr};
  torch::nn::Linear fc{nullptr};
  explicit StagedResNetImpl(std::vector<std::int64_t> stage_widths) : widths(std::move(stage_widths)) {
    reset();
  }
  void reset() override {
    namespace nn = torch::nn;
    stem = register_module("stem", nn::Conv2d(nn::Conv2dOptions(1, widths[0], 3).padding(1).bias(false)));
    bn = register_module("bn", nn::BatchNorm2d(widths[0]));
    stages = register_module("stages", nn::Sequential(example::Block(widths[0], widths[0], 1),
                                                      example::Block(widths[0], widths[1], 2),
                                                      example::Block(widths[1], widths[2], 2)));
    fc = register_module("fc", nn::Linear(widths[2], 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = stages->forward(torch::relu(bn(stem(x))));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(StagedResNet);

struct ResNetPair {
  static StagedResNet student() { return StagedResNet(std::vector<std::int64_t>{16, 16, 32}); }
  static StagedResNet teacher() { return StagedResNet(std::vector<std::int64_t>{32, 32, 64}); }
  static constexpr const char* stage2 = "stages.1";
  static constexpr const char* stage3 = "stages.2";
  static constexpr const char* teacher_name = "teacher (residual, 32/32/64)";
};

struct Row {
  std::string method;
  std::vector<double> accuracies;
};

class Experiment {
 public:
  explicit Experiment(const Settings &s) : s_(s) {
    auto options = data::FashionMNISTOptions().root(s.data_dir);
    auto train_options = options, test_options = options;
    train_options.subset(s.subset).subset_seed(1);
    test_options.subset(s.test).subset_seed(1);
    train_ = data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                data::LoaderOptions(128).shuffle(true));
    test_ =
        data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000));
  }

  template <traceable Model>
  Learner learner(Model& model, std::uint64_t seed) const {
    return Learner(model, train_, test_, LearnerOptions().seed(seed).progress(Progress::None).out(nullptr));
  }

  // One seed: the teacher, then every row's student from the same initial
  // weights.
  template <class Pair>
  std::vector<double> run(std::uint64_t seed, double* teacher_accuracy) const {
    torch::manual_seed(static_cast<std::int64_t>(seed) + 1000);
    auto teacher = Pair::teacher();
    {
      Learner learn = learner(teacher, seed + 1000);
      learn.fit_one_cycle(s_.teacher_epochs, s_.lr);
      *teacher_accuracy = learn.validate().metric("accuracy");
    }
    teacher->eval();
    const auto example = torch::zeros({2, 1, 28, 28});
    std::vector<double> out;
    const int methods = 3 + static_cast<int>(s_.attention.size());
    for (int method = 0; method < methods; ++method) {
      torch::manual_seed(static_cast<std::int64_t>(seed));
      auto student = Pair::student();
      Learner learn = learner(student, seed);
      KnowledgeDistillation kd(teacher, s_.temperature, s_.alpha);
      if (method == 0) {
        learn.fit_one_cycle(s_.epochs, s_.lr);
      } else if (method == 1) {
        learn.fit_one_cycle(s_.epochs, s_.lr, {kd});
      } else {
        std::vector<FeatureHint> hints;
        if (method == 2)
          hints.push_back(fitnet_hint(Pair::stage3, Pair::stage3));
        else {
          const double weight = s_.attention[static_cast<std::size_t>(method - 3)];
          hints = {attention_hint(Pair::stage2, Pair::stage2, weight),
                   attention_hint(Pair::stage3, Pair::stage3, weight)};
        }
        FeatureDistillation fd(student, teacher, example, hints);
        learn.fit_one_cycle(s_.epochs, s_.lr, {kd, fd});  // after KD, which rescales the loss
      }
      out.push_back(learn.validate().metric("accuracy"));
      std::cout << "seed " << seed << ", method " << method << ": " << 100 * out.back() << "%" << std::endl;
    }
    return out;
  }

 private:
  Settings s_;
  data::Batches train_, test_;
};

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  example::Cli cli("distillation_results",
                   "Feature distillation (FitNet hints, attention transfer) against "
                   "soft-target distillation on Fashion-MNIST.");
  cli.option("--model", s.model, "vgg (compact VGGs) or resnet (residual networks, blocks in a Sequential member)")
      .option("--epochs", s.epochs, "one-cycle epochs of each student")
      .option("--teacher-epochs", s.teacher_epochs, "one-cycle epochs of the teacher")
      .option("--seeds", s.seeds, "seeds each row is trained with (the table shows each and the mean)")
      .option("--lr", s.lr, "peak learning rate of the cycles (Adam)")
      .option("--subset", s.subset, "training images")
      .option("--test", s.test, "test images the accuracies are measured on")
      .option("--temperature", s.temperature, "temperature of the soft targets")
      .option("--alpha", s.alpha, "weight of the teacher's term in the distillation loss")
      .option("--attention-weights", s.attention_weights,
              "weights beta/2 of attention transfer, one row each, separated by commas")
      .option("--data", s.data_dir, "folder of the Fashion-MNIST IDX files")
      .flag("--quick", s.quick, "a smoke run: 1 seed, 1 epoch each, 1,000 training and test images");
  return cli.run(argc, argv, [&] {
    if (s.quick) s.epochs = s.teacher_epochs = s.seeds = 1, s.subset = s.test = 1000;
    if (s.epochs < 1 || s.teacher_epochs < 1 || s.seeds < 1 || s.subset < 1 || s.test < 1 || !(s.lr > 0) ||
        !(s.temperature > 0) || !(s.alpha >= 0 && s.alpha <= 1))
      throw example::usage_error(
          "--epochs, --teacher-epochs, --seeds, --subset and --test must be >= 1, --lr and --temperature > 0, "
          "--alpha in [0, 1]");
    if (s.model != "vgg" && s.model != "resnet")
      throw example::usage_error("--model '" + s.model + "' is not allowed; expected vgg or resnet");
    s.attention = parse_weights(s.attention_weights);
    const bool resnet = s.model == "resnet";
    const Experiment experiment(s);
    std::vector<std::string> names{"student alone", "soft targets (KD)", "KD + FitNet hint (stage 3, 1x1 adapter)"};
    for (double w : s.attention) {
      char label[96];
      std::snprintf(label, sizeof label, "KD + attention transfer (stages 2, 3, β/2 = %g)", w);
      names.push_back(label);
    }
    std::vector<Row> rows;
    for (const auto& n : names) rows.push_back({n, {}});
    Row teacher{resnet ? ResNetPair::teacher_name : VggPair::teacher_name, {}};
    for (int i = 0; i < s.seeds; ++i) {
      double t = 0;
      const auto seed = static_cast<std::uint64_t>(42 + i);
      const auto accuracies = resnet ? experiment.run<ResNetPair>(seed, &t) : experiment.run<VggPair>(seed, &t);
      teacher.accuracies.push_back(t);
      for (std::size_t m = 0; m < rows.size(); ++m) rows[m].accuracies.push_back(accuracies[m]);
    }
    std::printf(
        "\n%d epochs per student, %d for the teacher, %lld training "
        "and %lld test images\n\n",
        s.epochs, s.teacher_epochs, static_cast<long long>(s.subset), static_cast<long long>(s.test));
    std::printf("| method |");
    for (int i = 0; i < s.seeds; ++i) std::printf(" seed %d |", 42 + i);
    std::printf(" mean | vs alone |\n|---|");
    for (int i = 0; i <= s.seeds + 1; ++i) std::printf("---:|");
    std::printf("\n");
    auto mean = [](const std::vector<double> &v) {
      double sum = 0;
      for (double x : v) sum += x;
      return sum / double(v.size());
    };
    const double alone = mean(rows[0].accuracies);
    rows.insert(rows.begin(), teacher);
    for (const auto& r : rows) {
      std::printf("| %s |", r.method.c_str());
      for (double a : r.accuracies) std::printf(" %.2f%% |", 100 * a);
      std::printf(" %.2f%% | %+.2f |\n", 100 * mean(r.accuracies), 100 * (mean(r.accuracies) - alone));
    }
    return 0;
  });
}
