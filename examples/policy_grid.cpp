// A compile-time configured experiment: a type list of Sparsifier<...> configurations swept
// over the compact VGG on Fashion-MNIST. Each configuration starts from the same trained
// baseline, is sparsified by SparsifyCallback during a short fine-tune, and gets one row:
// sparsity reached, test accuracy, nonzero parameters, and latency after physical pruning
// (Pruner + BNFolder) where the granularity removes whole filters.
//
// --iterative runs the article's iterative pruning instead: prune one-shot, fine-tune with the
// Constant schedule (masks kept in force), raise the target, repeat.
//
//   policy_grid [--quick] [--iterative] [--sparsity 50] [--epochs 1] [--train 12000] ...
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

#include <cstdio>
#include <iomanip>
#include <iostream>
#include <string>

#include "common/cli.hpp"

namespace {

using namespace fasterai;
namespace g = fasterai::granularity;
namespace m = fasterai::method;
namespace c = fasterai::criteria;
namespace s = fasterai::schedule;

template <class... Sparsifiers>
struct type_list {};

// Granularities x methods x criteria x schedules that make sense together: weight-level
// sparsity pruned gradually (Zhu & Gupta), structured sparsity with the article's cosine
// schedule, and a Random baseline for each family.
using Grid = type_list<
    Sparsifier<g::Weight, m::Local, c::L1, s::Gradual>,
    Sparsifier<g::Weight, m::Global, c::L1, s::Gradual>,
    Sparsifier<g::Weight, m::Global, c::Movement, s::Gradual>,
    Sparsifier<g::Weight, m::Local, c::Random, s::Gradual>,
    Sparsifier<g::NM<2, 4>, m::Local, c::L1, s::Linear>,
    Sparsifier<g::Vector, m::Local, c::L1, s::Cos>,
    Sparsifier<g::Kernel, m::Global, c::L1, s::Cos>,
    Sparsifier<g::Filter, m::Local, c::L1, s::Cos>,
    Sparsifier<g::Filter, m::Global, c::L1, s::Cos>,
    Sparsifier<g::Filter, m::Local, c::Taylor, s::Cos>,
    Sparsifier<g::Filter, m::Local, c::Random, s::Cos>>;

template <class G>
constexpr bool is_n_m = false;
template <int N, int M>
constexpr bool is_n_m<g::NM<N, M>> = true;

struct Args {
  bool quick = false, iterative = false;
  double sparsity = 50;
  int epochs = 1;
  double lr = 1e-3;
  std::int64_t train = 12000, test = 2000;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::uint64_t seed = 42;
};

struct Context {
  const Args& args;
  data::Batches train, test;
  torch::nn::Sequential baseline;
};

LearnerOptions quiet(const Args& a) {
  return LearnerOptions().seed(a.seed).out(nullptr).progress(Progress::None);
}

double latency_ms(torch::nn::Sequential& model) {
  return measure_latency(model, torch::randn({1, 1, 28, 28}), LatencyOptions().warmup(20).runs(200))
      .median_ms;
}

void header() {
  std::cout << std::left << std::setw(32) << "configuration" << std::right << std::setw(10)
            << "sparsity" << std::setw(10) << "accuracy" << std::setw(11) << "nonzero"
            << std::setw(14) << "latency (ms)" << "\n";
}

void row(const std::string& name, double sparsity, double accuracy, std::int64_t nonzero,
         double latency) {
  std::cout << std::left << std::setw(32) << name << std::right << std::fixed
            << std::setprecision(2) << std::setw(9) << sparsity << "%" << std::setw(9)
            << 100 * accuracy << "%" << std::setw(11) << with_thousands(nonzero) << std::setw(14);
  if (latency > 0)
    std::cout << std::setprecision(3) << latency;
  else
    std::cout << "-";
  std::cout << "\n" << std::flush;
}

// Fine-tune a copy of the baseline under one configuration and report it.
template <class S>
void run_configuration(Context& ctx) {
  auto model = clone_model(ctx.baseline);
  const double target = std::min(ctx.args.sparsity, S::granularity_type::max_sparsity());
  auto options = SparsifierOptions(target);
  // N:M blocks run along the input channels; the first convolution has only one.
  if constexpr (is_n_m<typename S::granularity_type>) options.exclude({"features.0"});
  S sparsifier(model, options);
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().verbose(false));
  Learner learn(model, ctx.train, ctx.test, quiet(ctx.args));
  learn.fit(ctx.args.epochs, ctx.args.lr, {sparsify});
  const double accuracy = learn.validate().metric("accuracy");
  double latency = -1;
  if constexpr (S::granularity_type::whole_channel) {
    auto compact = BNFolder().fold(Pruner().prune(model));
    latency = latency_ms(compact);
  }
  row(sparsifier.name(), sparsifier.report().global_percent(), accuracy,
      count_nonzero_parameters(model), latency);
}

template <class... S>
void run_grid(Context& ctx, type_list<S...>) {
  (run_configuration<S>(ctx), ...);
}

// The article's iterative pruning: one-shot to the next target, then fine-tune with the
// Constant schedule so that the zeros stay zeros, then raise the target.
void run_iterative(Context& ctx) {
  auto model = clone_model(ctx.baseline);
  Learner learn(model, ctx.train, ctx.test, quiet(ctx.args));
  const int rounds = 4;
  for (int r = 1; r <= rounds; ++r) {
    const double target = ctx.args.sparsity * r / rounds;
    FilterSparsifier<> one_shot(model);
    one_shot.prune(target);
    const double pruned_accuracy = learn.validate().metric("accuracy");
    FilterSparsifier<s::Constant> keep(model);
    SparsifyCallback sparsify(keep, SparsifyCallbackOptions().verbose(false));
    learn.fit(ctx.args.epochs, ctx.args.lr, {sparsify});
    auto compact = BNFolder().fold(Pruner().prune(model));
    std::cout << "round " << r << " (one-shot, accuracy " << std::fixed << std::setprecision(2)
              << 100 * pruned_accuracy << "% before fine-tuning)\n";
    row("  Filter/Local/L1 -> Constant", keep.report().global_percent(),
        learn.validate().metric("accuracy"), count_nonzero_parameters(model), latency_ms(compact));
  }
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("policy_grid", "Sweep Sparsifier<Granularity, Method, Criteria, Schedule> "
                                  "configurations over the compact VGG on Fashion-MNIST.");
  cli.flag("--quick", a.quick, "a small subset (2000 training, 500 test images)")
      .flag("--iterative", a.iterative, "the article's iterative pruning instead of the grid")
      .option("--sparsity", a.sparsity, "target sparsity, percent")
      .option("--epochs", a.epochs, "fine-tuning epochs per configuration")
      .option("--lr", a.lr, "fine-tuning learning rate")
      .option("--train", a.train, "training images (a seeded random subset)")
      .option("--test", a.test, "test images (a seeded random subset)")
      .option("--data", a.data, "folder of the Fashion-MNIST files")
      .option("--seed", a.seed, "seed of initialization, shuffling and subsets");
  return cli.run(argc, argv, [&] {
    if (a.quick) a.train = 2000, a.test = 500;
    torch::manual_seed(a.seed);
    auto options = data::FashionMNISTOptions().root(a.data).subset_seed(a.seed);
    auto train = data::make_batches(data::FashionMNIST(data::Split::Train, data::FashionMNISTOptions(options).subset(a.train)),
                                    data::LoaderOptions(128).shuffle(true));
    auto test = data::make_batches(data::FashionMNIST(data::Split::Test, data::FashionMNISTOptions(options).subset(a.test)),
                                   data::LoaderOptions(1000));
    Context ctx{a, train, test, models::compact_vgg()};
    std::cout << "Baseline: compact VGG, fit_one_cycle(2, 5e-3) on " << a.train
              << " training images; each configuration then fine-tunes " << a.epochs
              << " epoch(s) at lr " << a.lr << " toward " << a.sparsity << "% sparsity\n"
              << "(convolutions only; accuracy on " << a.test << " test images; latency: batch 1, "
                 "1 thread, median, after Pruner + BNFolder)\n\n";
    Learner base(ctx.baseline, train, test, quiet(a));
    base.fit_one_cycle(2, 5e-3);
    header();
    auto dense = clone_model(ctx.baseline);
    row("baseline (dense)", sparsity_report(dense).global_percent(), base.validate().metric("accuracy"),
        count_nonzero_parameters(dense), latency_ms(dense));
    if (a.iterative)
      run_iterative(ctx);
    else
      run_grid(ctx, Grid{});
    return 0;
  });
}
