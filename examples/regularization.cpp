// Sparsity-inducing regularization on Fashion-MNIST: the walkthrough's compact VGG trained three
// times from the same initial weights — plainly, with group lasso on the channel graph's units
// (each conv filter with its bias and its BatchNorm's γ and β), and with network slimming's L1 on
// the BatchNorm γ — then each one-shot pruned at the same sparsity of its conv filters, by the
// filters' L1 norm and by |γ| (criteria::BNScale), without fine-tuning. The table shows the
// units' norms before and after training, the accuracy of each model, and what the prune costs.
//
//   regularization [--epochs 3] [--sparsity 30] [--group-lasso 2e-2] [--slimming 5e-3]
//                  [--lr 0.1] [--subset N] [--data PATH] [--seed 42] [--quick]
//
// docs/toolbox.md has the table of `--subset 5000` and its reading.
#include <fasterai/fasterai.hpp>

#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "common/cli.hpp"

namespace {

using namespace fasterai;

struct Settings {
  int epochs = 3;
  double sparsity = 30, group_lasso = 2e-2, slimming = 5e-3, lr = 0.1;
  std::int64_t subset = 0;
  std::uint64_t seed = 42;
  std::string data_dir = "/usr/share/datasets/fashion-mnist";
  bool quick = false;
};

struct Row {
  std::string training;
  double strength = 0;
  double norm_before = 0, norm_after = 0, gamma_before = 0, gamma_after = 0;
  double accuracy = 0, pruned_l1 = 0, pruned_bn_scale = 0;
};

double mean_unit_norm(const torch::nn::Sequential& model) {
  return SparsityPenalty(model, Penalty::GroupLasso).unit_norms().mean().item<double>();
}
double sum_abs_gamma(const torch::nn::Sequential& model) {
  torch::NoGradGuard no_grad;
  return SparsityPenalty(model, Penalty::BNScale)().item<double>();
}

// Accuracy after pruning `sparsity`% of the conv filters with `Sparsifier<Filter, Global, C>`;
// the model's parameters are restored afterwards.
template <class Criteria>
double accuracy_after_prune(torch::nn::Sequential& model, Learner& learn, double sparsity, SparsifierOptions options) {
  std::vector<torch::Tensor> saved;
  for (const auto& p : model->parameters()) saved.push_back(p.detach().clone());
  Sparsifier<granularity::Filter, method::Global, Criteria> sparsifier(model, options);
  sparsifier.prune(sparsity);
  const double accuracy = learn.validate().metric("accuracy");
  torch::NoGradGuard no_grad;
  auto params = model->parameters();
  for (std::size_t i = 0; i < params.size(); ++i) params[i].copy_(saved[i]);
  return accuracy;
}

Row train_and_prune(const Settings& s, std::string training, std::optional<Penalty> penalty, double strength) {
  torch::manual_seed(static_cast<std::int64_t>(s.seed));
  auto model = models::compact_vgg();
  auto options = data::FashionMNISTOptions().root(s.data_dir);
  auto train_options = options, test_options = options;
  if (s.subset > 0) {
    train_options.subset(s.subset).subset_seed(s.seed);
    test_options.subset(std::max<std::int64_t>(1, s.subset / 6)).subset_seed(s.seed);
  }
  // SGD, as network slimming: Adam rescales each weight's gradient, the penalty's with it.
  Learner learn(model,
                data::make_batches(data::FashionMNIST(data::Split::Train, train_options),
                                   data::LoaderOptions(128).shuffle(true)),
                data::make_batches(data::FashionMNIST(data::Split::Test, test_options), data::LoaderOptions(1000)),
                LearnerOptions().seed(s.seed).optimizer(OptimizerKind::SGD).progress(Progress::None));
  Row row{std::move(training), penalty ? strength : 0.0};
  row.norm_before = mean_unit_norm(model);
  row.gamma_before = sum_abs_gamma(model);
  std::cout << "\n" << row.training << "\n";
  if (penalty) {
    Regularizer regularizer(model, RegularizerOptions(strength).penalty(*penalty));
    learn.fit_one_cycle(s.epochs, s.lr, {regularizer});
  } else {
    learn.fit_one_cycle(s.epochs, s.lr);
  }
  row.norm_after = mean_unit_norm(model);
  row.gamma_after = sum_abs_gamma(model);
  row.accuracy = learn.validate().metric("accuracy");
  row.pruned_l1 = accuracy_after_prune<criteria::L1>(model, learn, s.sparsity, SparsifierOptions());
  // One threshold on |γ| over all layers, as network slimming (no per-layer normalization).
  row.pruned_bn_scale = accuracy_after_prune<criteria::BNScale>(model, learn, s.sparsity,
                                                                SparsifierOptions().normalize(false));
  return row;
}

}  // namespace

int main(int argc, char** argv) try {
  Settings s;
  example::Cli cli("regularization", "Group lasso and network slimming before a filter prune, against plain training.");
  cli.option("--epochs", s.epochs, "epochs of fit_one_cycle for each model")
      .option("--sparsity", s.sparsity, "percentage of the conv filters pruned (Filter/Global)")
      .option("--group-lasso", s.group_lasso, "strength of the group lasso penalty")
      .option("--slimming", s.slimming, "strength of the L1 penalty on the BatchNorm gamma")
      .option("--lr", s.lr, "peak learning rate of the cycle (SGD)")
      .option("--subset", s.subset, "train on N images, test on N/6 (0: all)")
      .option("--data", s.data_dir, "folder of the Fashion-MNIST IDX files")
      .option("--seed", s.seed, "seed of initialization, shuffling and subsets")
      .flag("--quick", s.quick, "1 epoch on 2000 images (a smoke test)");
  cli.parse(argc, argv);
  if (s.quick) s.epochs = 1, s.subset = 2000;
  if (s.epochs < 1 || s.subset < 0 || s.sparsity <= 0 || s.sparsity >= 100 || s.group_lasso < 0 || s.slimming < 0 ||
      s.lr <= 0)
    throw example::usage_error(
        "--epochs must be >= 1, --subset >= 0, --sparsity in (0, 100), --group-lasso and --slimming >= 0, --lr > 0");

  std::vector<Row> rows;
  rows.push_back(train_and_prune(s, "plain", std::nullopt, 0));
  rows.push_back(train_and_prune(s, "group lasso", Penalty::GroupLasso, s.group_lasso));
  rows.push_back(train_and_prune(s, "network slimming", Penalty::BNScale, s.slimming));

  std::printf("\n%d epochs, %.0f%% of the conv filters pruned one-shot (Filter/Global), no fine-tuning\n", s.epochs,
              s.sparsity);
  std::printf("| training | strength | mean unit norm | Σ|γ| | accuracy | after L1 prune | after BNScale prune |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const auto& r : rows)
    std::printf("| %s | %g | %.3f → %.3f | %.1f → %.1f | %.2f%% | %.2f%% (%+.2f) | %.2f%% (%+.2f) |\n",
                r.training.c_str(), r.strength, r.norm_before, r.norm_after, r.gamma_before, r.gamma_after,
                100 * r.accuracy, 100 * r.pruned_l1, 100 * (r.pruned_l1 - r.accuracy), 100 * r.pruned_bn_scale,
                100 * (r.pruned_bn_scale - r.accuracy));
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "regularization: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "regularization: " << e.what() << "\n";
  return 1;
}
