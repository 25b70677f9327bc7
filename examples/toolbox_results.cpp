// Two tools of the compression toolbox against the path they improve on, on Fashion-MNIST with
// the walkthrough's compact VGG (--model vgg) or the small residual network (--model resnet):
//
// 1. Lottery ticket vs one-shot, at the same weight sparsity (Weight/Global/L1, linear layers
//    included) and the same epochs in all: one-shot trains densely, prunes once and fine-tunes
//    with the masks in force for the remaining epochs; the ticket trains, prunes by magnitude,
//    rewinds the survivors to their initial values and retrains, `rounds` times.
// 2. Sensitivity-guided vs uniform filter pruning, at the same MAC cut: uniform prunes every
//    coupled group's filters by the same percentage (Filter/Local/L1); guided takes per-group
//    targets from a sensitivity analysis for a budget of the MACs uniform removed
//    (layer_targets_for_budget with Budget::Macs). Both from the same trained model, one-shot,
//    then the zero channels removed (Pruner) and the smaller model fine-tuned.
//
//   toolbox_results [--model vgg|resnet] [--epochs 2] [--rounds 2] [--sparsity 80]
//                   [--filters 50] [--finetune 1] [--lr 3e-3] [--subset 5000] [--test 10000]
//                   [--data PATH] [--seed 42] [--quick]
//
// docs/toolbox.md has the tables of both models and their reading.
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>

#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"
#include "common/small_resnet.hpp"

namespace {

using namespace fasterai;
namespace g = granularity;
namespace m = method;
namespace c = criteria;

struct Settings {
  std::string model = "vgg";
  int epochs = 2, rounds = 2, finetune = 1;
  double sparsity = 80, filters = 50, lr = 3e-3;
  std::int64_t subset = 5000, test = 10000;
  std::int64_t probe = 1000;                     // training images the sensitivity analysis measures
  std::vector<double> levels{10, 20, 30, 40, 50, 60, 70, 80, 90};  // its sparsities
  std::uint64_t seed = 42;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
};

struct Row {
  std::string method;
  int epochs = 0;
  double accuracy = 0;  // after the method's last training
  std::int64_t parameters = 0, nonzero = 0, macs = 0;
  double before_finetune = -1;  // part 2: accuracy right after the one-shot prune
};

// Runs both comparisons on a model made by `make` (the same initial weights each call after
// the same seed).
template <class Model>
class Comparison {
 public:
  Comparison(const Settings& s, std::function<Model()> make) : s_(s), make_(std::move(make)) {
    auto options = data::FashionMNISTOptions().root(s.data_dir);
    auto train_options = options, test_options = options, probe_options = options;
    train_options.subset(s.subset).subset_seed(s.seed);
    test_options.subset(s.test).subset_seed(s.seed);
    // The sensitivity analysis measures on training images (another draw than the training
    // subset), never on the test images the table reports.
    probe_options.subset(std::min(s.probe, s.subset)).subset_seed(s.seed + 1);
    train_ = data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                data::LoaderOptions(128).shuffle(true));
    test_ = data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000));
    probe_ = data::make_batches(data::FashionMNIST(data::Split::Train, probe_options), data::LoaderOptions(500));
  }

  Model fresh() const {
    torch::manual_seed(static_cast<std::int64_t>(s_.seed));
    return make_();
  }
  Learner learner(Model& model) const {
    return Learner(model, train_, test_, LearnerOptions().seed(s_.seed).progress(Progress::None));
  }
  Row row(std::string method, Model& model, int epochs) const {
    Learner learn = learner(model);
    return {std::move(method), epochs, learn.validate().metric("accuracy"), count_parameters(model),
            count_nonzero_parameters(model), count_macs(model, example_).total()};
  }

  // Part 1: one-shot vs lottery ticket at s.sparsity of the weights.
  std::vector<Row> lottery() const {
    const auto options = SparsifierOptions(s_.sparsity).include_linear(true);
    const int total = (s_.rounds + 1) * s_.epochs;
    std::vector<Row> rows;
    {
      Model model = fresh();
      Learner learn = learner(model);
      learn.fit_one_cycle(s_.epochs, s_.lr);
      rows.push_back(row("dense", model, s_.epochs));
      Sparsifier<g::Weight, m::Global, c::L1, schedule::Constant> once(model, example_, options);
      once.prune(s_.sparsity);
      SparsifyCallback keep(once, SparsifyCallbackOptions().verbose(false));
      learn.fit_one_cycle(total - s_.epochs, s_.lr, {keep});
      rows.push_back(row("one-shot, fine-tuned", model, total));
    }
    {
      Model model = fresh();
      LotteryTicket<g::Weight, m::Global, c::L1> ticket(model, example_, options, s_.rounds);
      for (int round = 0; round <= ticket.rounds(); ++round) {
        if (round > 0) ticket.next_round();
        Learner learn = learner(model);
        SparsifyCallback keep(ticket.sparsifier(), SparsifyCallbackOptions().verbose(false));
        learn.fit_one_cycle(s_.epochs, s_.lr, {keep});
      }
      rows.push_back(row("lottery ticket, rewound to init", model, total));
    }
    return rows;
  }

  // Part 2: uniform vs sensitivity-guided filter pruning at the same MAC cut.
  std::vector<Row> sensitivity_guided() const {
    Model trained = fresh();
    {
      Learner learn = learner(trained);
      learn.fit_one_cycle(s_.epochs, s_.lr);
    }
    std::vector<Row> rows{row("dense", trained, s_.epochs)};
    const auto macs = count_macs(trained, example_).total();

    auto prune_and_finetune = [&](const std::string& method, const SparsifierOptions& options, bool uniform) {
      Model model = fresh();
      copy_values(trained, model);
      Sparsifier<g::Filter, m::Local, c::L1> sparsifier(model, example_, options);
      if (uniform)
        sparsifier.prune(s_.filters);
      else
        sparsifier.step(1.0);  // every group at its own target
      Pruner().prune_(model, example_);
      Row r = row(method, model, s_.epochs + s_.finetune);
      r.before_finetune = r.accuracy;
      Learner learn = learner(model);
      learn.fit_one_cycle(s_.finetune, s_.lr / 3);
      r.accuracy = learn.validate().metric("accuracy");
      return r;
    };
    rows.push_back(prune_and_finetune("uniform " + std::to_string(int(s_.filters)) + "% of filters",
                                      SparsifierOptions(s_.filters), true));
    const std::int64_t cut = macs - rows.back().macs;

    Model probe = fresh();
    copy_values(trained, probe);
    const auto table = sensitivity<g::Filter, c::L1>(probe, probe_, SensitivityOptions().sparsities(s_.levels));
    std::cout << table;
    // The budget is per example of the analysis' trace (1x28x28), as count_macs here.
    const auto targets = layer_targets_for_budget(table, cut, Budget::Macs);
    std::cout << "targets for a cut of " << cut << " MACs:";
    for (const auto& [layer, target] : targets) std::cout << " " << layer << "=" << target << "%";
    std::cout << "\n";
    rows.push_back(prune_and_finetune("sensitivity-guided, same MAC budget", SparsifierOptions(0).layer_targets(targets),
                                      false));
    return rows;
  }

 private:
  // Parameters and buffers of `from` into `to` (the same architecture).
  static void copy_values(const Model& from, Model& to) {
    torch::NoGradGuard no_grad;
    auto source = fasterai::detail::impl(from).named_parameters();
    for (auto& p : fasterai::detail::impl(to).named_parameters()) p.value().copy_(source[p.key()]);
    auto buffers = fasterai::detail::impl(from).named_buffers();
    for (auto& b : fasterai::detail::impl(to).named_buffers()) b.value().copy_(buffers[b.key()]);
  }

  Settings s_;
  std::function<Model()> make_;
  data::Batches train_, test_, probe_;
  torch::Tensor example_ = torch::zeros({1, 1, 28, 28});
};

void print(const std::string& title, const std::vector<Row>& rows, bool with_before) {
  std::printf("\n%s\n", title.c_str());
  if (with_before) {
    std::printf("| method | epochs | pruned, before fine-tuning | accuracy | parameters | MACs |\n|---|---:|---:|---:|---:|---:|\n");
    for (const auto& r : rows) {
      std::printf("| %s | %d | ", r.method.c_str(), r.epochs);
      if (r.before_finetune >= 0)
        std::printf("%.2f%% |", 100 * r.before_finetune);
      else
        std::printf("– |");
      std::printf(" %.2f%% | %lld | %lld |\n", 100 * r.accuracy, static_cast<long long>(r.parameters),
                  static_cast<long long>(r.macs));
    }
    return;
  }
  std::printf("| method | epochs | accuracy | nonzero parameters | of |\n|---|---:|---:|---:|---:|\n");
  for (const auto& r : rows)
    std::printf("| %s | %d | %.2f%% | %lld | %lld |\n", r.method.c_str(), r.epochs, 100 * r.accuracy,
                static_cast<long long>(r.nonzero), static_cast<long long>(r.parameters));
}

template <class Model>
void run(const Settings& s, std::function<Model()> make) {
  Comparison<Model> comparison(s, std::move(make));
  char title[256];
  std::snprintf(title, sizeof title, "Lottery ticket vs one-shot: %s, %.0f%% of the weights (Weight/Global/L1), %d rounds of %d epochs",
                s.model.c_str(), s.sparsity, s.rounds, s.epochs);
  print(title, comparison.lottery(), false);
  const auto guided = comparison.sensitivity_guided();
  std::snprintf(title, sizeof title,
                "Sensitivity-guided vs uniform filter pruning: %s, %d epochs, one-shot, Pruner, %d epoch(s) of fine-tuning",
                s.model.c_str(), s.epochs, s.finetune);
  print(title, guided, true);
}

}  // namespace

int main(int argc, char** argv) try {
  Settings s;
  example::Cli cli("toolbox_results", "Lottery ticket vs one-shot, sensitivity-guided vs uniform filter pruning.");
  cli.option("--model", s.model, "vgg (the walkthrough's compact VGG) or resnet (the small residual network)")
      .option("--epochs", s.epochs, "epochs of fit_one_cycle of each training (a ticket's round, the dense model)")
      .option("--rounds", s.rounds, "pruning rounds of the lottery ticket")
      .option("--sparsity", s.sparsity, "percentage of the weights pruned (part 1)")
      .option("--filters", s.filters, "percentage of every group's filters uniform pruning removes (part 2)")
      .option("--finetune", s.finetune, "epochs of fine-tuning after the filter prune (part 2)")
      .option("--lr", s.lr, "peak learning rate of the cycles (Adam)")
      .option("--subset", s.subset, "training images")
      .option("--test", s.test, "test images the accuracies are measured on")
      .option("--data", s.data_dir, "folder of the Fashion-MNIST IDX files")
      .option("--seed", s.seed, "seed of initialization, shuffling and subsets")
      .flag("--quick", s.quick,
            "1 epoch, 1 round, 1000 training and 500 test images, sensitivity at 30/60/90% on 200 (a smoke test)");
  cli.parse(argc, argv);
  if (s.quick) {
    s.epochs = 1, s.rounds = 1, s.finetune = 1, s.subset = 1000, s.test = 500, s.probe = 200;
    s.levels = {30, 60, 90};
  }
  if (s.epochs < 1 || s.rounds < 1 || s.finetune < 1 || s.subset < 1 || s.test < 1 || s.sparsity <= 0 ||
      s.sparsity >= 100 || s.filters <= 0 || s.filters >= 100 || s.lr <= 0 || (s.model != "vgg" && s.model != "resnet"))
    throw example::usage_error(
        "--model must be vgg or resnet, --epochs, --rounds, --finetune, --subset and --test >= 1, --sparsity and "
        "--filters in (0, 100), --lr > 0");
  if (s.model == "vgg")
    run<torch::nn::Sequential>(s, [] { return models::compact_vgg(); });
  else
    run<example::SmallResNet>(s, [] { return example::SmallResNet(); });
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "toolbox_results: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "toolbox_results: " << e.what() << "\n";
  return 1;
}
