// The article end to end, on Fashion-MNIST from Debian's dataset package:
//
//   1. train a baseline compact VGG                      fit_one_cycle
//   2. train a larger teacher                            fit_one_cycle
//   3. train a student (the baseline's architecture)     + KnowledgeDistillation
//   4. sparsify it while fine-tuning                     + SparsifyCallback (Filter, Local, L1, Cos, 40%)
//   5. Pruner        remove the zeroed filters           (outputs unchanged)
//   6. BNFolder      fold the BatchNorms                 (outputs unchanged)
//   7. FCDecomposer  factorize the classifier (0.5), then a short fine-tune
//   8. deploy        compress_for_deployment, the library's one call for the path to a file:
//                    what is left zeroed removed (nothing: step 5 did it), BatchNorms folded
//                    (none left), the faster inference path chosen, int8 (static, traced,
//                    16 training batches), the int8 model exported; its report compares fp32
//                    and int8 at batch 1 and 32. With --qat-epochs N also quantization-aware
//                    training for N epochs (QuantizationAwareTraining), then its conversion
//
// and a summary table, one row per stage: parameters, size, MACs, latency (batch 1) of the eager
// model and of its optimized TorchScript export, eager latency at batch 32 (--large-batch), test
// accuracy. The int8 model is exported to a TorchScript file that Python's torch.jit.load runs.
//
// Steps 5 and 6 are the first steps of compress_for_deployment too; the walkthrough runs them
// one by one so that its table shows what each does (the article's structure), then hands the
// factorized, fine-tuned model to the call.
//
// The default run fits a time budget (--budget-minutes, 10): one training step is timed first,
// and the training subset is sized so that every stage's epochs fit on this machine.
//
//   walkthrough [--quick] [--epochs 3] [--sparsity 40] [--schedule cos] [--granularity filter]
//               [--data /usr/share/datasets/fashion-mnist] ...   (--help lists them all)
#include <fasterai/fasterai.hpp>
#include <fasterai/compress.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/dist/launched_job.hpp>
#include <fasterai/quant/qat.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <optional>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Args {
  bool quick = false;
  int epochs = 3;           // baseline and student
  int teacher_epochs = 2;
  int sparsify_epochs = 3;
  double sparsify_until = 0.7;  // the target is reached at this fraction of the fine-tune
  int finetune_epochs = 4;  // 2 left the final model 0.2-0.6 points lower (docs/results.md)
  double lr = 5e-3;         // peak of the one-cycle schedule
  double sparsify_lr = 1e-3;
  double finetune_lr = 1e-3;
  double sparsity = 40;
  std::string schedule = "cos";
  std::string granularity = "filter";
  double percent_removed = 0.5;
  double temperature = 3, alpha = 0.5;
  std::int64_t batch_size = 128;
  std::int64_t train = 0;   // 0: sized from the time budget
  std::int64_t test = 0;    // 0: sized from the time budget
  double budget_minutes = 10;
  std::string export_path = "walkthrough_final.pt";
  int latency_rounds = 5;   // interleaved rounds over the stages; medians and spread over them
  std::size_t calibration_batches = 16;  // int8: training batches the calibration observes
  int qat_epochs = 0;                    // int8: epochs of quantization-aware training (0: none)
  double qat_lr = 1e-4;                  // its learning rate (constant)
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
  int threads = 1;          // for the latency measurements
  std::int64_t large_batch = 32;  // the second latency column (0: none)
  std::int64_t round_to = 1;      // channels kept per layer: a multiple of this (1: any count)
};

// One stage of the summary. Latencies are measured at the end, interleaved over the stages.
struct Row {
  std::string stage;
  std::int64_t parameters, bytes, macs;
  double accuracy;
  torch::nn::Sequential model;               // an eval-mode copy, for the latency rounds
  std::optional<InferenceModel> optimized;   // none when the stage cannot be exported
  std::vector<double> eager_ms, optimized_ms;  // one median per round
  std::vector<double> large_batch_ms;          // eager at --large-batch, one median per round
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const auto n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Seconds per training image of `model` (Adam, batch `batch`), from a few timed steps on random
// data: what the time budget is sized with.
double seconds_per_image(torch::nn::Sequential model, std::int64_t batch) {
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  model->train();
  const auto x = torch::randn({batch, 1, 28, 28});
  const auto y = torch::randint(0, 10, {batch});
  auto step = [&] {
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    optimizer.step();
  };
  step();  // warm-up: allocations, oneDNN primitives
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    step();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return median(times) / double(batch);
}

class Walkthrough {
 public:
  explicit Walkthrough(const Args& a) : a_(a) {
    auto options = data::FashionMNISTOptions().root(a.data).subset_seed(a.seed);
    auto train_options = options, test_options = options;
    if (a.train > 0 && a.train < 60000) train_options.subset(a.train);
    if (a.test > 0 && a.test < 10000) test_options.subset(a.test);
    train_ = data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                data::LoaderOptions(static_cast<std::size_t>(a.batch_size)).shuffle(true));
    test_ = data::make_batches(data::FashionMNIST(data::Split::Test, test_options),
                               data::LoaderOptions(1000));
  }

  Learner learner(torch::nn::Sequential model) const {
    return Learner(model, train_, test_, LearnerOptions().seed(a_.seed));
  }

  // Add a stage's row to the summary: counts and accuracy now, latency in the final rounds.
  void record(const std::string& stage, torch::nn::Sequential model, Learner& learn) {
    Row row{stage, count_parameters(model), model_size_bytes(model),
            count_macs(model, {1, 28, 28}).total(), learn.validate().metric("accuracy"),
            clone_model(model), std::nullopt, {}, {}, {}};
    row.model->eval();
    try {
      row.optimized = optimize_for_inference(row.model, example());
    } catch (const std::exception& e) {
      std::cout << "(" << stage << ": no optimized export: " << e.what() << ")\n";
    }
    add(std::move(row));
  }

  // An int8 stage: the weights and MACs of the fp32 model it quantizes (its weights are int8
  // buffers, not parameters), its own size and accuracy; no optimized column (the int8 kernels
  // are what runs). `bytes`: its size where model_size_bytes cannot count it (a TorchScript
  // module's tensors: the size of its file).
  void record_int8(const std::string& stage, torch::nn::Sequential int8, const Row& fp32,
                   std::optional<std::int64_t> bytes = std::nullopt) {
    const double accuracy = Learner(int8, train_, test_, LearnerOptions().seed(a_.seed)).validate().metric("accuracy");
    int8->eval();
    add(Row{stage, fp32.parameters, bytes.value_or(model_size_bytes(int8)), fp32.macs, accuracy, int8, std::nullopt,
            {}, {}, {}});
  }

  const Row& last() const { return rows_.back(); }
  // The last fp32 stage: the int8 stages come after it.
  const Row& last_fp32() const {
    auto r = rows_.rbegin();
    while (r->stage.rfind("int8", 0) == 0 && std::next(r) != rows_.rend()) ++r;
    return *r;
  }
  // The inputs of the first `count` training batches: what the int8 calibration observes.
  std::vector<torch::Tensor> calibration_batches(std::size_t count) const {
    std::vector<torch::Tensor> inputs;
    train_.for_each([&](const torch::data::Example<>& batch) {
      if (inputs.size() < count) inputs.push_back(batch.data);
    });
    return inputs;
  }
  LatencyOptions batch1_latency() const {
    return LatencyOptions().warmup(a_.quick ? 5 : 20).runs(a_.quick ? 20 : 100).threads(a_.threads);
  }

  void add(Row row) {
    rows_.push_back(std::move(row));
    const Row& r = rows_.back();
    std::cout << "-> " << r.stage << ": " << with_thousands(r.parameters) << " parameters, "
              << std::fixed << std::setprecision(3) << double(r.bytes) / 1e6 << " MB, test accuracy "
              << std::setprecision(2) << 100 * r.accuracy << "%\n";
  }

  static torch::Tensor example() { return torch::randn({1, 1, 28, 28}); }

  // Latency of every stage, eager and optimized, in rounds: each round times every stage once,
  // so a machine that gets busier slows all stages alike; the table gives the median over the
  // rounds and their spread (max - min). At batch 1 this small network's latency is mostly the
  // fixed cost of its ~20 operator calls; at --large-batch it is mostly arithmetic, where the
  // MACs that pruning removes show.
  void measure_latencies() {
    const auto x = example();
    const auto options = batch1_latency();
    const auto large = a_.large_batch > 0 ? torch::randn({a_.large_batch, 1, 28, 28}) : torch::Tensor();
    const auto large_options = LatencyOptions().warmup(a_.quick ? 2 : 5).runs(a_.quick ? 5 : 30).threads(a_.threads);
    for (int round = 0; round < a_.latency_rounds; ++round)
      for (auto& row : rows_) {
        row.eager_ms.push_back(measure_latency(row.model, x, options).median_ms);
        if (row.optimized) row.optimized_ms.push_back(measure_latency(*row.optimized, x, options).median_ms);
        if (large.defined()) row.large_batch_ms.push_back(measure_latency(row.model, large, large_options).median_ms);
      }
  }

  void title(const std::string& text) const { std::cout << "\n### " << text << "\n\n"; }

  void summary() const {
    auto spread = [](const std::vector<double>& v) {
      return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end()) - *std::min_element(v.begin(), v.end());
    };
    const bool large = a_.large_batch > 0;
    std::cout << "\n### Summary (latency: batch 1, " << a_.threads << " thread(s); median over "
              << a_.latency_rounds << " interleaved rounds of " << (a_.quick ? 20 : 100)
              << " runs, ± the rounds' spread; optimized = fasterai::optimize_for_inference";
    if (large) std::cout << "; batch " << a_.large_batch << ": eager, rounds of " << (a_.quick ? 5 : 30) << " runs";
    std::cout << ")\n\n| stage | parameters | size (MB) | MACs | latency (ms) | optimized (ms) | ";
    if (large) std::cout << "batch " << a_.large_batch << " (ms) | ";
    std::cout << "accuracy |\n|---|---:|---:|---:|---:|---:|" << (large ? "---:|" : "") << "---:|\n";
    for (const auto& r : rows_) {
      std::cout << "| " << r.stage << " | " << with_thousands(r.parameters) << " | " << std::fixed
                << std::setprecision(3) << r.bytes / 1e6 << " | " << with_thousands(r.macs) << " | "
                << median(r.eager_ms) << " ± " << spread(r.eager_ms) << " | ";
      if (r.optimized)
        std::cout << median(r.optimized_ms) << " ± " << spread(r.optimized_ms);
      else
        std::cout << "–";
      if (large) std::cout << " | " << median(r.large_batch_ms) << " ± " << spread(r.large_batch_ms);
      std::cout << " | " << std::setprecision(2) << 100 * r.accuracy << "% |\n";
    }
    const Row& base = rows_.front();
    const Row& last = last_fp32();
    std::cout << std::setprecision(2) << "\nFinal fp32 vs baseline: " << double(base.parameters) / double(last.parameters)
              << "x fewer parameters, " << double(base.macs) / double(last.macs) << "x fewer MACs, "
              << median(base.eager_ms) / median(last.eager_ms) << "x lower latency (eager), ";
    if (last.optimized)
      std::cout << median(base.eager_ms) / median(last.optimized_ms) << "x (final optimized vs baseline eager), ";
    if (large)
      std::cout << median(base.large_batch_ms) / median(last.large_batch_ms) << "x at batch " << a_.large_batch
                << " (eager), ";
    std::cout << "accuracy " << std::showpos << 100 * (last.accuracy - base.accuracy) << std::noshowpos
              << " points.\n";
    for (const Row* int8 = &last + 1; int8 != rows_.data() + rows_.size(); ++int8) {
      std::cout << int8->stage << " vs final fp32: " << double(last.bytes) / double(int8->bytes) << "x smaller, "
                << median(last.eager_ms) / median(int8->eager_ms) << "x lower latency (eager), accuracy "
                << std::showpos << 100 * (int8->accuracy - last.accuracy) << std::noshowpos << " points.\n";
      // The model that ships against the one we started from.
      std::cout << int8->stage << " vs baseline: " << double(base.bytes) / double(int8->bytes) << "x smaller, "
                << median(base.eager_ms) / median(int8->eager_ms) << "x lower latency at batch 1";
      if (large)
        std::cout << ", " << median(base.large_batch_ms) / median(int8->large_batch_ms) << "x at batch "
                  << a_.large_batch;
      std::cout << " (eager baseline), accuracy " << std::showpos << 100 * (int8->accuracy - base.accuracy)
                << std::noshowpos << " points.\n";
    }
    promise(base, last);
  }

  // The article's promise, judged on this run: a compressed model (the final fp32 one or an
  // int8 one) at least 2x faster than the eager baseline and at most 1 point less accurate.
  void promise(const Row& base, const Row& last) const {
    std::vector<std::string> kept;
    for (const Row* r = &last; r != rows_.data() + rows_.size(); ++r) {
      if (100 * (base.accuracy - r->accuracy) > 1.0) continue;
      if (median(base.eager_ms) / median(r->eager_ms) >= 2.0) kept.push_back(r->stage + " at batch 1 (eager)");
      if (r->optimized && median(base.eager_ms) / median(r->optimized_ms) >= 2.0)
        kept.push_back(r->stage + " at batch 1 (optimized)");
      if (a_.large_batch > 0 && median(base.large_batch_ms) / median(r->large_batch_ms) >= 2.0)
        kept.push_back(r->stage + " at batch " + std::to_string(a_.large_batch) + " (eager)");
    }
    std::cout << "The article's promise (>= 2x lower latency than the eager baseline, <= 1 point less accurate): ";
    if (kept.empty()) std::cout << "not kept in this run.\n";
    for (std::size_t i = 0; i < kept.size(); ++i)
      std::cout << (i == 0 ? "kept by " : "; ") << kept[i] << (i + 1 == kept.size() ? ".\n" : "");
  }

 private:
  const Args& a_;
  data::Batches train_, test_;
  std::vector<Row> rows_;
};

// Training and test subsets that let the whole run fit the time budget on this machine. One
// step of the baseline and of the teacher is timed; per training image the stages then cost
// the baseline's and the student's epochs (the student also runs the teacher's forward, about
// a third of a teacher step), the teacher's epochs, the sparsifying fine-tune and the last
// fine-tune (at the baseline's cost, an upper bound for the smaller model). Per test image,
// every evaluation costs a forward, about a third of a step: after each epoch and at each of
// the 8 stages. The test set takes at most a quarter of the time, the training subset the rest;
// a quarter of the budget is kept for what is not modelled (data loading, exports, the latency
// rounds, a machine that gets busier).
void plan_budget(Args& a) {
  if (!(a.budget_minutes > 0)) throw example::usage_error("--budget-minutes must be > 0");
  torch::manual_seed(a.seed);
  const double base = seconds_per_image(models::compact_vgg(), a.batch_size);
  const double teacher = seconds_per_image(
      models::compact_vgg(models::CompactVGGOptions().widths({32, 64, 128}).hidden(512)), a.batch_size);
  const double per_train_image = a.epochs * base + a.teacher_epochs * teacher +
                                 a.epochs * (base + teacher / 3) + a.sparsify_epochs * base +
                                 a.finetune_epochs * base + a.qat_epochs * base;
  const int student_evaluations = 2 * a.epochs + a.sparsify_epochs + a.finetune_epochs + 7;
  const double per_test_image = student_evaluations * base / 3 + (a.teacher_epochs + 1) * teacher / 3;
  const double available = 0.75 * a.budget_minutes * 60;
  if (a.test <= 0)
    a.test = std::clamp<std::int64_t>(static_cast<std::int64_t>(0.25 * available / per_test_image),
                                      1000, 10000);
  if (a.train <= 0)
    a.train = std::clamp<std::int64_t>(
        static_cast<std::int64_t>((available - double(a.test) * per_test_image) / per_train_image),
        a.batch_size, 60000);
  std::cout << std::fixed << std::setprecision(2) << "Time budget: " << a.budget_minutes
            << " min. One training step (batch " << a.batch_size << ") takes " << 1e3 * base * a.batch_size
            << " ms for the compact VGG and " << 1e3 * teacher * a.batch_size
            << " ms for the teacher on this machine, so the stages train on " << with_thousands(a.train)
            << " of 60,000 images and test on " << with_thousands(a.test)
            << " of 10,000 (--train, --test or --budget-minutes change it).\n";
}

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
      .option("--train", a.train, "training images (a seeded random subset below 60000; 0: as many as the time budget allows)")
      .option("--budget-minutes", a.budget_minutes, "time budget of the default run; sizes the training subset when --train is 0")
      .option("--export", a.export_path, "TorchScript file of the int8 model (empty: none)")
      .option("--calibration-batches", a.calibration_batches, "int8: training batches the calibration observes")
      .option("--qat-epochs", a.qat_epochs, "int8: epochs of quantization-aware training after the static stage (0: none)")
      .option("--qat-lr", a.qat_lr, "int8: learning rate of quantization-aware training (constant)")
      .option("--latency-rounds", a.latency_rounds, "interleaved latency rounds over the stages")
      .option("--test", a.test, "test images (a seeded random subset below 10000; 0: as many as the time budget allows)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--threads", a.threads, "threads for the latency measurements")
      .option("--large-batch", a.large_batch, "batch size of the second latency column (eager; 0: none)")
      .option("--round-to", a.round_to, "channels kept per layer: a multiple of this (filter granularity; 1: any)")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    // Under scripts/launch.sh: data-parallel Learners, and output from rank 0 only.
    if (a.qat_epochs < 0 || !(a.qat_lr > 0))
      throw example::usage_error("--qat-epochs must be >= 0 and --qat-lr > 0");
    if (a.large_batch < 0) throw example::usage_error("--large-batch must be >= 0 (0: no batch column)");
    const auto job = dist::join_launched_job();
    const auto start = std::chrono::steady_clock::now();
    if (a.quick) {
      a.train = 3000, a.test = 1000, a.latency_rounds = std::min(a.latency_rounds, 2);
      a.epochs = a.teacher_epochs = a.sparsify_epochs = a.finetune_epochs = 1;
    }
    if (a.train <= 0 || a.test <= 0) plan_budget(a);
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
                                      SparsifierOptions(a.sparsity).round_to(a.round_to));
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

    w.title("8. Deploy: compress_for_deployment(target 0) with int8 calibrated on " +
            std::to_string(a.calibration_batches) + " training batches");
    // target 0: training's zeros are already removed (step 5); the call finds none left, no
    // BatchNorm to fold, chooses the inference path, quantizes, exports and reports. One process
    // writes the file when several run the walkthrough (scripts/launch.sh).
    const std::string export_path = job.is_main() ? a.export_path : "";
    std::vector<std::int64_t> report_batches{1};
    if (a.large_batch > 1) report_batches.push_back(a.large_batch);
    const auto deployed = compress_for_deployment(
        factorized, Walkthrough::example(),
        CompressOptions()
            .target(0)
            .int8(true)
            .calibration(w.calibration_batches(a.calibration_batches))
            .export_path(export_path)
            .latency_batches(report_batches)
            .latency(w.batch1_latency()));
    std::cout << deployed.report;
    w.record_int8("int8 (static)", torch::nn::Sequential(TorchScriptModule(*deployed.int8)), w.last_fp32(),
                  deployed.report.int8_bytes);
    if (!export_path.empty())
      std::cout << "\nExported the int8 model to " << export_path << " (Python: torch.jit.load(\"" << export_path
                << "\")(x) for x of shape [N, 1, 28, 28])\n";
    if (a.qat_epochs > 0) {
      w.title("8b. int8: quantization-aware training, " + std::to_string(a.qat_epochs) +
              " epoch(s) at a constant " + std::to_string(a.qat_lr) + ", then the same conversion");
      QuantizationAwareTraining qat(factorized);
      auto qat_learn = w.learner(qat.model());
      qat_learn.fit(a.qat_epochs, a.qat_lr, {qat});
      w.record_int8("int8 (QAT)", qat.convert(), w.last_fp32());
    }

    std::cout << "\n### Latency: " << a.latency_rounds << " interleaved rounds over the stages\n";
    w.measure_latencies();
    w.summary();
    std::cout << "\nTotal time: " << std::fixed << std::setprecision(0)
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
              << " s\n";
    return 0;
  });
}
