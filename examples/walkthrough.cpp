// The article end to end, on Fashion-MNIST from Debian's dataset package:
//
//   1. train a baseline compact VGG                      fit_one_cycle
//   2. train a larger teacher                            fit_one_cycle
//   3. train a student (the baseline's architecture)     + KnowledgeDistillation
//   4. sparsify it while fine-tuning                     + SparsifyCallback (Filter, Local, L1, Cos, 40%)
//   5. Pruner        remove the zeroed filters           (outputs unchanged)
//   6. BNFolder      fold the BatchNorms                 (outputs unchanged)
//   7. FCDecomposer  factorize the classifier (0.5), then a short fine-tune
//
// and a summary table, one row per stage: parameters, size, MACs, latency (batch 1, median),
// test accuracy.
//
//   walkthrough [--quick] [--epochs 3] [--sparsity 40] [--schedule cos] [--granularity filter]
//               [--data /usr/share/datasets/fashion-mnist] ...   (--help lists them all)
#include <fasterai/fasterai.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

#include <chrono>
#include <iomanip>
#include <iostream>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Args {
  bool quick = false;
  int epochs = 3;           // baseline and student
  int teacher_epochs = 2;
  int sparsify_epochs = 3;
  double sparsify_until = 0.7;  // the target is reached at this fraction of the fine-tune
  int finetune_epochs = 2;
  double lr = 5e-3;         // peak of the one-cycle schedule
  double sparsify_lr = 1e-3;
  double finetune_lr = 1e-3;
  double sparsity = 40;
  std::string schedule = "cos";
  std::string granularity = "filter";
  double percent_removed = 0.5;
  double temperature = 3, alpha = 0.5;
  std::int64_t batch_size = 128;
  std::int64_t train = 60000, test = 10000;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
  int threads = 1;          // for the latency measurements
};

struct Row {
  std::string stage;
  std::int64_t parameters, bytes, macs;
  double latency_ms, accuracy;
};

class Walkthrough {
 public:
  explicit Walkthrough(const Args& a) : a_(a) {
    auto options = data::FashionMNISTOptions().root(a.data).subset_seed(a.seed);
    auto train_options = options, test_options = options;
    if (a.train < 60000) train_options.subset(a.train);
    if (a.test < 10000) test_options.subset(a.test);
    train_ = data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                data::LoaderOptions(static_cast<std::size_t>(a.batch_size)).shuffle(true));
    test_ = data::make_batches(data::FashionMNIST(data::Split::Test, test_options),
                               data::LoaderOptions(1000));
  }

  Learner learner(torch::nn::Sequential model) const {
    return Learner(model, train_, test_, LearnerOptions().seed(a_.seed));
  }

  // Measure a stage and add its row to the summary.
  void record(const std::string& stage, torch::nn::Sequential model, Learner& learn) {
    const double accuracy = learn.validate().metric("accuracy");
    const auto latency = measure_latency(model, torch::randn({1, 1, 28, 28}),
                                         LatencyOptions().warmup(50).runs(500).threads(a_.threads));
    rows_.push_back({stage, count_parameters(model), model_size_bytes(model),
                     count_macs(model, {1, 28, 28}).total(), latency.median_ms, accuracy});
    std::cout << "-> " << stage << ": " << with_thousands(rows_.back().parameters)
              << " parameters, test accuracy " << std::fixed << std::setprecision(2)
              << 100 * accuracy << "%\n";
  }

  void title(const std::string& text) const { std::cout << "\n### " << text << "\n\n"; }

  void summary() const {
    std::cout << "\n### Summary (latency: batch 1, " << a_.threads << " thread(s), median of 500 runs)\n\n"
              << "| stage | parameters | size (MB) | MACs | latency (ms) | accuracy |\n"
              << "|---|---:|---:|---:|---:|---:|\n";
    for (const auto& r : rows_)
      std::cout << "| " << r.stage << " | " << with_thousands(r.parameters) << " | " << std::fixed
                << std::setprecision(3) << r.bytes / 1e6 << " | " << with_thousands(r.macs)
                << " | " << std::setprecision(3) << r.latency_ms << " | " << std::setprecision(2)
                << 100 * r.accuracy << "% |\n";
    const Row& base = rows_.front();
    const Row& last = rows_.back();
    std::cout << std::setprecision(2) << "\nFinal vs baseline: " << double(base.parameters) / double(last.parameters)
              << "x fewer parameters, " << double(base.macs) / double(last.macs) << "x fewer MACs, "
              << base.latency_ms / last.latency_ms << "x lower latency, accuracy "
              << std::showpos << 100 * (last.accuracy - base.accuracy) << std::noshowpos
              << " points.\n";
  }

 private:
  const Args& a_;
  data::Batches train_, test_;
  std::vector<Row> rows_;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("walkthrough", "The fasterai article end to end on Fashion-MNIST: baseline, "
                                  "teacher, distilled student, sparsify, prune, fold, factorize.");
  cli.flag("--quick", a.quick, "a smoke run: 3000 training and 1000 test images, 1 epoch per stage")
      .option("--epochs", a.epochs, "one-cycle epochs of the baseline and the student")
      .option("--teacher-epochs", a.teacher_epochs, "one-cycle epochs of the teacher")
      .option("--sparsify-epochs", a.sparsify_epochs, "epochs of fine-tuning while sparsifying")
      .option("--sparsify-until", a.sparsify_until, "fraction of the sparsifying fine-tune at which the target is reached")
      .option("--finetune-epochs", a.finetune_epochs, "epochs of fine-tuning after factorization")
      .option("--lr", a.lr, "peak learning rate of training from scratch")
      .option("--sparsify-lr", a.sparsify_lr, "peak learning rate while sparsifying")
      .option("--finetune-lr", a.finetune_lr, "peak learning rate of the last fine-tune")
      .option("--sparsity", a.sparsity, "target sparsity, percent")
      .option("--schedule", a.schedule, "one_shot | linear | cos | gradual | iterative:<n>")
      .option("--granularity", a.granularity, "weight | vector | kernel | filter | 2:4 (only filter shrinks the model)")
      .option("--percent-removed", a.percent_removed, "FCDecomposer: fraction of singular values removed")
      .option("--temperature", a.temperature, "knowledge distillation temperature T")
      .option("--alpha", a.alpha, "knowledge distillation weight of the teacher's term")
      .option("--batch-size", a.batch_size, "training batch size")
      .option("--train", a.train, "training images (a seeded random subset below 60000)")
      .option("--test", a.test, "test images (a seeded random subset below 10000)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--threads", a.threads, "threads for the latency measurements")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    const auto start = std::chrono::steady_clock::now();
    if (a.quick) {
      a.train = 3000, a.test = 1000;
      a.epochs = a.teacher_epochs = a.sparsify_epochs = a.finetune_epochs = 1;
    }
    Walkthrough w(a);
    torch::manual_seed(a.seed);

    w.title("1. Baseline: compact VGG, fit_one_cycle(" + std::to_string(a.epochs) + ")");
    auto baseline = models::compact_vgg();
    auto base_learn = w.learner(baseline);
    base_learn.fit_one_cycle(a.epochs, a.lr);
    w.record("baseline", baseline, base_learn);

    w.title("2. Teacher: a wider compact VGG, fit_one_cycle(" + std::to_string(a.teacher_epochs) + ")");
    auto teacher = models::compact_vgg(models::CompactVGGOptions().widths({32, 64, 128}).hidden(512));
    auto teacher_learn = w.learner(teacher);
    teacher_learn.fit_one_cycle(a.teacher_epochs, a.lr);
    w.record("teacher", teacher, teacher_learn);

    w.title("3. Student: the baseline's architecture, with KnowledgeDistillation");
    auto student = models::compact_vgg();
    auto learn = w.learner(student);
    KnowledgeDistillation kd(teacher, a.temperature, a.alpha);
    learn.fit_one_cycle(a.epochs, a.lr, {kd});
    w.record("student (distilled)", student, learn);

    w.title("4. Sparsify while fine-tuning: " + a.granularity + ", local, l1, " + a.schedule);
    auto sparsifier = make_sparsifier(student, {a.granularity, "local", "l1", a.schedule},
                                      SparsifierOptions(a.sparsity));
    // The schedule reaches the target before the end, so the last part of the fine-tune
    // recovers at the final sparsity (as Zhu & Gupta stop pruning before training ends).
    SparsifyCallback sparsify(*sparsifier, SparsifyCallbackOptions().end(a.sparsify_until));
    learn.fit_one_cycle(a.sparsify_epochs, a.sparsify_lr, {sparsify});
    std::cout << "\n" << sparsifier->report();
    w.record("sparsified", student, learn);

    w.title("5. Pruner: remove the zeroed filters");
    auto pruned = Pruner().prune(student);
    auto pruned_learn = w.learner(pruned);
    w.record("pruned", pruned, pruned_learn);

    w.title("6. BNFolder: fold the BatchNorms into the convolutions");
    auto folded = BNFolder().fold(pruned);
    auto folded_learn = w.learner(folded);
    w.record("folded", folded, folded_learn);

    w.title("7. FCDecomposer(" + std::to_string(a.percent_removed) + "), then fine-tune");
    auto factorized = FCDecomposer().decompose(folded, a.percent_removed);
    auto final_learn = w.learner(factorized);
    w.record("factorized", factorized, final_learn);
    final_learn.fit_one_cycle(a.finetune_epochs, a.finetune_lr);
    w.record("factorized + fine-tuned", factorized, final_learn);

    w.summary();
    std::cout << "\nTotal time: " << std::fixed << std::setprecision(0)
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
              << " s\n";
    return 0;
  });
}
