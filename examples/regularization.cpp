// Sparsity-inducing regularization on Fashion-MNIST: the walkthrough's compact VGG (--model vgg) or
// the small residual network (--model resnet, its units coupled across the residual adds) trained
// three times from the same initial weights — plainly, with group lasso on the channel graph's units
// (each conv filter with its bias and its BatchNorm's γ and β), and with network slimming's L1 on
// the BatchNorm γ — then each one-shot pruned at the same sparsity of its conv filters, by the
// filters' L1 norm and by |γ| (criteria::BNScale), without fine-tuning. The table shows the
// units' norms before and after training, the accuracy of each model, and what the prune costs.
//
//   regularization [--model vgg|resnet] [--epochs 3] [--sparsity 30] [--group-lasso 2e-2]
//                  [--slimming 5e-3] [--lr 0.1] [--subset N] [--data PATH] [--seed 42] [--quick]
//
// docs/toolbox.md has the tables of `--subset 5000` and their reading.
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>

#include <cstdio>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cli.hpp"
#include "common/small_resnet.hpp"

namespace {

using namespace fasterai;

struct Settings {
  std::string model = "vgg";
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

// The channel graph of a Sequential is known statically; the residual network's is traced.
const torch::Tensor example_input = torch::zeros({1, 1, 28, 28});
template <class Model>
SparsityPenalty penalty_of(Model& model, Penalty penalty) {
  if constexpr (std::is_same_v<Model, torch::nn::Sequential>)
    return SparsityPenalty(model, penalty);
  else
    return SparsityPenalty(model, example_input, penalty);
}

template <class Model>
double mean_unit_norm(Model& model) {
  return penalty_of(model, Penalty::GroupLasso).unit_norms().mean().template item<double>();
}
template <class Model>
double sum_abs_gamma(Model& model) {
  torch::NoGradGuard no_grad;
  return penalty_of(model, Penalty::BNScale)().template item<double>();
}

// Accuracy after pruning `sparsity`% of the conv filters with `Sparsifier<Filter, Global, C>`;
// the model's parameters are restored afterwards.
template <class Criteria, class Model>
double accuracy_after_prune(Model& model, Learner& learn, double sparsity, SparsifierOptions options) {
  std::vector<torch::Tensor> saved;
  for (const auto& p : model->parameters()) saved.push_back(p.detach().clone());
  auto sparsifier = [&] {
    using S = Sparsifier<granularity::Filter, method::Global, Criteria>;
    if constexpr (std::is_same_v<Model, torch::nn::Sequential>)
      return S(model, options);
    else
      return S(model, example_input, options);
  }();
  sparsifier.prune(sparsity);
  const double accuracy = learn.validate().metric("accuracy");
  torch::NoGradGuard no_grad;
  auto params = model->parameters();
  for (std::size_t i = 0; i < params.size(); ++i) params[i].copy_(saved[i]);
  return accuracy;
}

template <class Model>
Row train_and_prune(const Settings& s, const std::function<Model()>& make, std::string training,
                    std::optional<Penalty> penalty, double strength) {
  torch::manual_seed(static_cast<std::int64_t>(s.seed));
  Model model = make();
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
    auto options = RegularizerOptions(strength).penalty(*penalty);
    auto regularizer = [&] {
      if constexpr (std::is_same_v<Model, torch::nn::Sequential>)
        return Regularizer(model, options);
      else
        return Regularizer(model, example_input, options);
    }();
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
  cli.option("--model", s.model, "vgg (the walkthrough's compact VGG) or resnet (the small residual network)")
      .option("--epochs", s.epochs, "epochs of fit_one_cycle for each model")
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
  if ((s.model != "vgg" && s.model != "resnet") || s.epochs < 1 || s.subset < 0 || s.sparsity <= 0 || s.sparsity >= 100 || s.group_lasso < 0 || s.slimming < 0 ||
      s.lr <= 0)
    throw example::usage_error(
        "--model must be vgg or resnet, --epochs >= 1, --subset >= 0, --sparsity in (0, 100), --group-lasso and --slimming >= 0, --lr > 0");

  std::vector<Row> rows;
  auto run = [&](const auto& make) {
    rows.push_back(train_and_prune(s, make, "plain", std::nullopt, 0));
    rows.push_back(train_and_prune(s, make, "group lasso", Penalty::GroupLasso, s.group_lasso));
    rows.push_back(train_and_prune(s, make, "network slimming", Penalty::BNScale, s.slimming));
  };
  if (s.model == "vgg")
    run(std::function<torch::nn::Sequential()>([] { return models::compact_vgg(); }));
  else
    run(std::function<example::SmallResNet()>([] { return example::SmallResNet(); }));

  std::printf("\n%s, %d epochs, %.0f%% of the conv filters pruned one-shot (Filter/Global), no fine-tuning\n", s.model.c_str(), s.epochs,
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
