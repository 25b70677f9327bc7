// Property tests over random VGG-like networks: whatever the depth, widths, kernel sizes (1, 3,
// 5 with matching padding), biases, BatchNorms, pools, nesting and zeroed channels,
//   - pruning, and pruning then folding, leave the outputs unchanged (eval mode);
//   - parameter counts drop exactly as predicted from the zeroed channels;
//   - folding then pruning reaches the same model size as pruning then folding;
//   - the input model is never modified.
// Each case is seeded; on failure INFO prints the seed and the architecture.

#include "catch.hpp"

#include <array>
#include <random>
#include <sstream>

#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

#include "random_nets.hpp"
#include "transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

namespace {

struct ConvSpec {
  std::int64_t out = 0, kernel = 3;
  bool bias = true, batch_norm = true;
  int pool = 0;                       // 0: none, 1: MaxPool2d(2), 2: AvgPool2d(2)
  std::vector<std::int64_t> zeroed;   // whole groups zeroed: removable
  std::vector<std::int64_t> constant; // zero filter but BatchNorm β ≠ 0 (or bias ≠ 0): kept
};

struct Arch {
  std::uint64_t seed = 0;
  std::int64_t in_channels = 3, size = 8, batch = 2;
  std::vector<ConvSpec> convs;
  std::vector<std::size_t> stage_of;  // stage index of each conv; -1 cast: top level
  std::int64_t pool_h = 1, pool_w = 1, hidden = 8, classes = 3;
  bool fc_bias = true, batch_norm_1d = false;
  double eps = 1e-5;

  std::string describe() const {
    std::ostringstream os;
    os << "seed " << seed << ": input " << batch << "x" << in_channels << "x" << size << "x" << size
       << ", eps " << eps << "\n";
    for (std::size_t i = 0; i < convs.size(); ++i) {
      const auto& c = convs[i];
      os << "  stage " << stage_of[i] << " conv " << c.out << " k" << c.kernel << (c.bias ? " bias" : "")
         << (c.batch_norm ? " bn" : "") << (c.pool == 1 ? " maxpool" : c.pool == 2 ? " avgpool" : "")
         << " zeroed " << c.zeroed.size() << " constant " << c.constant.size() << "\n";
    }
    os << "  adaptive pool " << pool_h << "x" << pool_w << ", fc " << hidden << (fc_bias ? " bias" : "")
       << (batch_norm_1d ? " bn1d" : "") << " -> " << classes;
    return os.str();
  }
};

Arch random_arch(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  Arch a;
  a.seed = seed;
  a.in_channels = uniform(1, 4);
  a.size = uniform(6, 16);
  a.batch = uniform(1, 3);
  a.eps = chance(0.5) ? 1e-5 : 1e-3;
  const auto depth = uniform(1, 5);
  std::int64_t spatial = a.size;
  std::size_t stage = 0;
  const bool all_bias = chance(0.3), no_bias = chance(0.3);
  for (std::int64_t i = 0; i < depth; ++i) {
    ConvSpec c;
    c.out = uniform(1, 24);
    c.kernel = std::array<std::int64_t, 3>{1, 3, 5}[uniform(0, 2)];
    c.bias = all_bias || (!no_bias && chance(0.5));
    c.batch_norm = chance(0.7);
    if (spatial >= 2 && chance(0.4)) {
      c.pool = chance(0.5) ? 1 : 2;
      spatial /= 2;
    }
    // Zero a random share of the channels, sometimes all of them.
    const double share = chance(0.1) ? 1.0 : std::uniform_real_distribution<double>(0.0, 0.7)(rng);
    for (std::int64_t ch = 0; ch < c.out; ++ch) {
      if (!chance(share)) continue;
      // A zero filter whose channel still emits a constant must stay.
      if ((c.batch_norm || c.bias) && chance(0.15))
        c.constant.push_back(ch);
      else
        c.zeroed.push_back(ch);
    }
    a.convs.push_back(c);
    a.stage_of.push_back(stage);
    if (chance(0.4)) ++stage;
  }
  a.pool_h = uniform(1, 3);
  a.pool_w = uniform(1, 3);
  a.hidden = uniform(2, 16);
  a.classes = uniform(2, 6);
  a.fc_bias = chance(0.8);
  a.batch_norm_1d = chance(0.4);
  return a;
}

// Stages become nested NamedSequentials ("stage0", ...), except a single-conv stage that is
// sometimes inlined at the top level, so both nested and flat layouts occur.
nn::Sequential build(const Arch& a) {
  nn::Sequential model;
  std::int64_t in = a.in_channels;
  std::size_t i = 0;
  int index = 0;
  while (i < a.convs.size()) {
    const std::size_t stage = a.stage_of[i];
    NamedSequential block;
    int local = 0;
    auto add = [&](auto module) { block->push_back(std::to_string(local++), module); };
    for (; i < a.convs.size() && a.stage_of[i] == stage; ++i) {
      const auto& c = a.convs[i];
      add(nn::Conv2d(nn::Conv2dOptions(in, c.out, c.kernel).padding(c.kernel / 2).bias(c.bias)));
      if (c.batch_norm) add(nn::BatchNorm2d(nn::BatchNorm2dOptions(c.out).eps(a.eps)));
      add(nn::ReLU());
      if (c.pool == 1) add(nn::MaxPool2d(2));
      if (c.pool == 2) add(nn::AvgPool2d(2));
      in = c.out;
    }
    model->push_back("stage" + std::to_string(index++), block);
  }
  model->push_back("avgpool", nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions({a.pool_h, a.pool_w})));
  model->push_back("flatten", nn::Flatten());
  NamedSequential classifier;
  classifier->push_back("0", nn::Linear(nn::LinearOptions(in * a.pool_h * a.pool_w, a.hidden).bias(a.fc_bias)));
  int next = 1;
  if (a.batch_norm_1d) classifier->push_back(std::to_string(next++), nn::BatchNorm1d(a.hidden));
  classifier->push_back(std::to_string(next++), nn::ReLU());
  classifier->push_back(std::to_string(next++), nn::Dropout(0.5));
  classifier->push_back(std::to_string(next++), nn::Linear(a.hidden, a.classes));
  model->push_back("classifier", classifier);
  return model;
}

// Random weights and BatchNorm statistics, then the zeroed and constant channels of `a`.
void fill(nn::Sequential& model, const Arch& a) {
  randomize_batch_norms(*model);
  const auto all = walk(model);
  torch::NoGradGuard no_grad;
  std::size_t conv = 0;
  for (std::size_t i = 0; i < all.size(); ++i) {
    auto* c = all[i].as<nn::Conv2dImpl>();
    if (c == nullptr) continue;
    const auto& spec = a.convs[conv++];
    if (c->bias.defined()) c->bias.normal_(0.0, 0.1);
    for (auto ch : spec.zeroed) zero_channel(all, i, ch);
    for (auto ch : spec.constant) {
      zero_channel(all, i, ch);
      // The channel emits a constant: through its BatchNorm's β, else through its bias.
      if (spec.batch_norm)
        all[i + 1].as<nn::BatchNorm2dImpl>()->bias[ch].fill_(0.25);
      else
        c->bias[ch].fill_(0.25);
    }
  }
}

struct Counts {
  std::int64_t pruned = 0, folded = 0;
};

// Parameter counts after pruning, and after pruning and folding, from the architecture alone.
Counts predict(const Arch& a) {
  Counts n;
  std::int64_t in = a.in_channels;
  for (const auto& c : a.convs) {
    const std::int64_t kept = std::max<std::int64_t>(1, c.out - std::int64_t(c.zeroed.size()));
    const std::int64_t weights = in * kept * c.kernel * c.kernel;
    n.pruned += weights + (c.bias ? kept : 0) + (c.batch_norm ? 2 * kept : 0);
    n.folded += weights + (c.bias || c.batch_norm ? kept : 0);
    in = kept;
  }
  const std::int64_t fc = in * a.pool_h * a.pool_w * a.hidden;
  const std::int64_t head = a.hidden * a.classes + a.classes;
  n.pruned += fc + (a.fc_bias ? a.hidden : 0) + (a.batch_norm_1d ? 2 * a.hidden : 0) + head;
  n.folded += fc + (a.fc_bias || a.batch_norm_1d ? a.hidden : 0) + head;
  return n;
}

}  // namespace

TEST_CASE("prune and fold preserve outputs and sizes on random VGG-like networks",
          "[pruner][bn_folder][property]") {
  constexpr int cases = 60;
  for (int k = 0; k < cases; ++k) {
    const std::uint64_t seed = 1000 + std::uint64_t(k);
    const Arch arch = random_arch(seed);
    INFO(arch.describe());
    torch::manual_seed(seed);
    auto model = build(arch);
    fill(model, arch);
    model->eval();
    const auto before = snapshot(*model);
    const auto x = torch::randn({arch.batch, arch.in_channels, arch.size, arch.size});
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = model->forward(x);
    }

    Pruner pruner;
    auto pruned = pruner.prune(model);
    auto folded = BNFolder().fold(pruned);
    auto folded_first = Pruner().prune(BNFolder().fold(model));
    REQUIRE(unchanged(before, *model));

    const Counts expected = predict(arch);
    CHECK(count_parameters(pruned) == expected.pruned);
    CHECK(count_parameters(folded) == expected.folded);
    CHECK(count_parameters(folded_first) == expected.folded);
    std::int64_t constant = 0;
    for (const auto& c : arch.convs) constant += std::int64_t(c.constant.size());
    std::int64_t reported = 0;
    for (const auto& l : pruner.report().layers) reported += l.constant_channels;
    CHECK(reported == constant);

    torch::NoGradGuard no_grad;
    const double pruning_error = relative_error(pruned->forward(x), y);
    const double folding_error = relative_error(folded->forward(x), y);
    const double folded_first_error = relative_error(folded_first->forward(x), y);
    INFO("errors: pruned " << pruning_error << ", pruned+folded " << folding_error
                           << ", folded+pruned " << folded_first_error);
    CHECK(pruning_error <= 1e-5);
    CHECK(folding_error <= 1e-5);
    CHECK(folded_first_error <= 1e-5);
  }
}

// Users' own modules: random networks (random_nets.hpp). Filter sparsification through the
// traced graph, then in-place pruning, must leave the outputs unchanged, remove exactly the
// channels the sparsifier zeroed, and leave the MACs PrunedMacs predicted.
TEST_CASE("sparsify and prune_ users' modules exactly on random architectures",
          "[pruner][sparsifier][property]") {
  constexpr int cases = 60;
  std::int64_t removed_total = 0;
  for (int k = 0; k < cases; ++k) {
    auto [seed, in, size, net] = random_case(5000, k);
    INFO("seed " << seed << ": " << net->description);
    const auto x = torch::randn({2, in, size, size});
    const double target = 20.0 + double(k % 5) * 10.0;
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(net, x, SparsifierOptions(target));
    sparsifier.prune(target);
    // Channels the sparsifier zeroed, per layer, before they go.
    std::map<std::string, std::int64_t> zeroed;
    for (const auto& name : sparsifier.layer_names()) {
      const auto& m = sparsifier.mask(name);
      zeroed[name] = m.reshape({m.size(0), -1}).all(1).sum().item<std::int64_t>();
    }
    torch::Tensor y;
    {
      torch::NoGradGuard no_grad;
      y = net->forward(x);
    }
    const auto parameters_before = count_parameters(net);
    // The MACs after pruning, predicted on the sparsified model before it (graph/macs.hpp).
    const PrunedMacs macs(net, x.narrow(0, 0, 1));
    const std::int64_t predicted = macs.after_pruning();
    Pruner pruner;
    const PruneReport report = pruner.prune_(net, x);
    CHECK(count_macs(net, x.narrow(0, 0, 1)).total() == predicted);
    CHECK((predicted < macs.total()) == report.changed());
    for (const auto& layer : report.layers) {
      INFO(layer.name);
      CHECK(layer.removed() == zeroed[layer.name]);
      removed_total += layer.removed();
    }
    CHECK((count_parameters(net) < parameters_before) == report.changed());
    {
      torch::NoGradGuard no_grad;
      const double error = relative_error(net->forward(x), y);
      INFO("relative error " << error);
      CHECK(error <= 1e-5);
    }
    // The pruned model trains: forward and backward agree with the new shapes.
    net->train();
    net->forward(x).square().sum().backward();
    for (const auto& p : net->parameters()) {
      REQUIRE(p.grad().defined());
      CHECK(p.grad().sizes() == p.sizes());
    }
    net->eval();
    // Nothing zero is left to remove.
    CHECK_FALSE(Pruner().prune_(net, x).changed());
  }
  CHECK(removed_total > 100);
}
