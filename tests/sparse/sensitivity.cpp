#include "catch.hpp"

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <fasterai/graph/macs.hpp>
#include <fasterai/sparse/sensitivity.hpp>
#include <fasterai/transform/pruner.hpp>

namespace nn = torch::nn;
using namespace fasterai;
namespace g = fasterai::granularity;
namespace m = fasterai::method;
namespace c = fasterai::criteria;

namespace {

// head(relu(a(x)) + 0 * noise(x)): the layer "noise" cannot matter.
struct TwoBranchImpl : nn::Module {
  TwoBranchImpl()
      : a(register_module("a", nn::Linear(4, 16))),
        noise(register_module("noise", nn::Linear(4, 16))),
        head(register_module("head", nn::Linear(16, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(a(x)) + 0.0 * noise(x)); }
  nn::Linear a, noise, head;
};
TORCH_MODULE(TwoBranch);

// 3 classes of 4-feature points, separable by a fixed linear rule.
data::Batches synthetic(std::int64_t n, std::uint64_t seed) {
  torch::manual_seed(seed);
  const auto x = torch::randn({n, 4});
  const auto rule = torch::tensor({1.0f, -1.0f, 0.5f, 0.0f, 0.5f, 1.0f, -1.0f, 1.0f, -1.0f, 0.3f, 1.0f, 1.0f})
                        .reshape({4, 3});
  const auto y = x.matmul(rule).argmax(1);
  std::vector<torch::data::Example<>> batches;
  for (std::int64_t i = 0; i < n; i += 64) batches.push_back({x.narrow(0, i, 64), y.narrow(0, i, 64)});
  return data::Batches(std::move(batches));
}

TwoBranch trained_two_branch() {
  torch::manual_seed(1);
  TwoBranch model;
  const auto train = synthetic(256, 2);
  torch::optim::Adam opt(model->parameters(), 0.02);
  for (int epoch = 0; epoch < 40; ++epoch)
    train.for_each([&](const torch::data::Example<>& b) {
      opt.zero_grad();
      torch::nn::functional::cross_entropy(model->forward(b.data), b.target).backward();
      opt.step();
    });
  return model;
}

std::map<std::string, torch::Tensor> snapshot(torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model.named_parameters()) out[p.key()] = p.value().detach().clone();
  for (const auto& b : model.named_buffers()) out[b.key()] = b.value().detach().clone();
  return out;
}

// A tensor's bits as integers of its element size (equal() on floats would call -0 == 0).
torch::Tensor as_bits(const torch::Tensor& t) {
  switch (t.element_size()) {
    case 8: return t.contiguous().view(torch::kLong);
    case 4: return t.contiguous().view(torch::kInt);
    case 2: return t.contiguous().view(torch::kShort);
    default: return t.contiguous().view(torch::kByte);
  }
}

// Bit for bit: same dtype, shape and bytes.
bool identical(torch::nn::Module& model, const std::map<std::string, torch::Tensor>& before) {
  auto now = snapshot(model);
  if (now.size() != before.size()) return false;
  for (const auto& [name, t] : now) {
    const auto& b = before.at(name);
    if (t.scalar_type() != b.scalar_type() || t.sizes() != b.sizes()) return false;
    if (!as_bits(t).equal(as_bits(b))) return false;
  }
  return true;
}

std::map<std::string, std::vector<double>> drops_by_unit(const SensitivityTable& table) {
  std::map<std::string, std::vector<double>> out;
  for (const auto& r : table.rows) out[fasterai::detail::join_layers(r.layers)].push_back(r.drop);
  return out;
}

// Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> pool -> flatten -> Linear.
nn::Sequential conv_net() {
  torch::manual_seed(5);
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 6, 3).padding(1)), nn::BatchNorm2d(6), nn::ReLU(),
                        nn::Conv2d(nn::Conv2dOptions(6, 8, 3).padding(1)), nn::BatchNorm2d(8), nn::ReLU(),
                        nn::AdaptiveAvgPool2d(1), nn::Flatten(), nn::Linear(8, 3));
}

data::Batches images() {
  torch::manual_seed(6);
  return data::Batches(std::vector<torch::data::Example<>>{{torch::randn({8, 2, 5, 5}), torch::randint(0, 3, {8})},
                                                           {torch::randn({8, 2, 5, 5}), torch::randint(0, 3, {8})}});
}

// y = relu(conv1(x)); z = y + conv2(y): conv1 and conv2 make one residual stream.
struct ResidualImpl : nn::Module {
  ResidualImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(2, 6, 3).padding(1)))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(6, 6, 3).padding(1)))),
        head(register_module("head", nn::Linear(6, 3))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    const auto y = torch::relu(conv1(x));
    const auto z = y + conv2(y);
    return head(z.mean({2, 3}));
  }
  nn::Conv2d conv1, conv2;
  nn::Linear head;
};
TORCH_MODULE(Residual);

// The MACs of `fresh` (an unpruned copy of the analysed model) after the trial of `row` and the
// Pruner: Criteria at Filter granularity zeroes the row's unit, the Pruner removes it.
template <class Criteria, class Model>
std::int64_t macs_after_trial(Model fresh, const torch::Tensor& example, const SensitivityRow& row) {
  Sparsifier<g::Filter, m::Local, Criteria> s(fresh, example, SparsifierOptions(0).include(row.layers));
  s.prune(row.sparsity);
  Pruner().prune_(fresh, example);
  return count_macs(fresh, example.narrow(0, 0, 1)).total();
}

}  // namespace

TEST_CASE("sensitivity ranks a layer whose output is multiplied by 0 least sensitive, and restores the model",
          "[sensitivity]") {
  auto model = trained_two_branch();
  const auto valid = synthetic(128, 7);
  model->train();
  const auto before = snapshot(*model);

  const auto table = sensitivity<g::Weight>(model, valid, SensitivityOptions().include_linear(true));
  REQUIRE(table.rows.size() == 3 * 9);
  CHECK(table.baseline > 0.8);  // the model learnt the rule
  CHECK(table.configuration == "Weight/L1");
  const auto drops = drops_by_unit(table);
  for (double d : drops.at("noise")) CHECK(d == 0.0);
  CHECK(drops.at("a").back() > 0.05);
  CHECK(drops.at("head").back() > 0.05);
  // Rows: the parameters each trial zeroes are floor(n * s / 100) of the layer's weights.
  for (const auto& r : table.rows)
    if (r.layers.front() == "head") CHECK(r.removed == static_cast<std::int64_t>(48 * r.sparsity / 100));
  CHECK(table.parameters == 2 * (4 * 16 + 16) + 16 * 3 + 3);

  CHECK(identical(*model, before));
  CHECK(model->is_training());
  CHECK(model->a->is_training());
}

TEST_CASE("sensitivity with Filter granularity: one row per coupled group, model restored bit for bit",
          "[sensitivity][graph]") {
  SECTION("a Sequential: each conv with its bias and BatchNorm") {
    auto model = conv_net();
    model->eval();
    const auto before = snapshot(*model);
    const auto table = sensitivity<g::Filter, c::L2<g::Filter>>(model, images(), SensitivityOptions().sparsities({50}));
    REQUIRE(table.units().size() == 2);
    CHECK(table.units()[0].front()->layers == std::vector<std::string>{"0"});
    CHECK(table.units()[1].front()->layers == std::vector<std::string>{"3"});
    // Conv "0" at 50%: 3 filters of 2*3*3 weights, their biases and BN gammas (the fresh BN's
    // betas are 0 already: "removed" counts what the trial turns to zero).
    CHECK(table.rows[0].removed == 3 * (2 * 9 + 1 + 1));
    // MACs of one 2x5x5 example: conv 0 25*6*18 = 2700, conv 3 25*8*54 = 10800, linear 24.
    CHECK(table.macs == 13524);
    // Conv 0 at 50%: its 3 filters go (-1350) and conv 3's 3 input channels (-5400).
    CHECK(table.rows[0].macs_removed == 1350 + 5400);
    // Conv 3 at 50%: 4 filters (-5400) and 4 of the linear's inputs (-12).
    CHECK(table.rows[1].macs_removed == 5400 + 12);
    const auto example = torch::randn({8, 2, 5, 5});
    for (const auto& r : table.rows)
      CHECK(macs_after_trial<c::L2<g::Filter>>(conv_net(), example, r) == table.macs - r.macs_removed);
    CHECK(identical(*model, before));
    CHECK(!model->is_training());
  }
  SECTION("a traced module: the residual stream's two convs form one unit") {
    torch::manual_seed(8);
    Residual model;
    const auto before = snapshot(*model);
    const auto table = sensitivity<g::Filter, c::FPGM>(model, images(), SensitivityOptions().sparsities({30, 60}));
    REQUIRE(table.units().size() == 1);
    CHECK(table.units()[0].front()->layers == std::vector<std::string>{"conv1", "conv2"});
    // 30% of 6 channels: 1 channel of each conv (weights and bias).
    CHECK(table.rows[0].removed == (2 * 9 + 1) + (6 * 9 + 1));
    // conv1 2700 + conv2 8100 + head 18 MACs; at 30% one channel of the stream goes: conv1 by
    // 1/6 (-450), conv2 by 1/6 of outputs and of inputs (8100 - 8100*25/36 = 2475), head -3.
    CHECK(table.macs == 10818);
    CHECK(table.rows[0].macs_removed == 450 + 2475 + 3);
    for (const auto& r : table.rows) {
      torch::manual_seed(8);
      CHECK(macs_after_trial<c::FPGM>(Residual(), torch::randn({8, 2, 5, 5}), r) == table.macs - r.macs_removed);
    }
    CHECK(identical(*model, before));
  }
}

TEST_CASE("the table prints, writes CSV, and a loss-like metric counts its rise as the drop", "[sensitivity]") {
  auto model = trained_two_branch();
  const auto valid = synthetic(64, 9);
  const auto table = sensitivity<g::Weight, c::LAMP<g::Weight>>(
      model, valid,
      SensitivityOptions()
          .sparsities({25, 75})
          .include({"a", "noise"})
          .metric([](const torch::Tensor& p, const torch::Tensor& t) { return torch::nn::functional::cross_entropy(p, t); })
          .metric_name("loss")
          .higher_is_better(false));
  REQUIRE(table.rows.size() == 4);
  for (const auto& r : table.rows) CHECK(r.drop == r.metric - table.baseline);
  CHECK(table.rows[1].drop > 0);  // "a" at 75%: the loss rises

  std::ostringstream os;
  os << table;
  CHECK(os.str().find("noise") != std::string::npos);
  CHECK(os.str().find("loss") != std::string::npos);
  CHECK(os.str().find("75%") != std::string::npos);

  const std::string path = "fasterai_sensitivity_test.csv";
  table.write_csv(path);
  std::ifstream in(path);
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) lines.push_back(line);
  std::remove(path.c_str());
  REQUIRE(lines.size() == 5);
  CHECK(lines[0] == "layers,sparsity,removed,loss,drop,macs_removed");
  CHECK(lines[1].rfind("a,25,16,", 0) == 0);  // floor(64 * 25 / 100) weights
  CHECK(lines[4].rfind("noise,75,48,", 0) == 0);
  CHECK(lines[4].substr(lines[4].rfind(',')) == ",0");  // scattered zeros remove no MAC
}

TEST_CASE("budget targets: the least sensitive units first, and the budget is met", "[sensitivity][budget]") {
  SECTION("a hand-made table") {
    SensitivityTable t;
    auto row = [](std::string layer, double s, std::int64_t removed, double drop) {
      return SensitivityRow{{std::move(layer)}, s, removed, 0.0, drop, 0, {}};
    };
    t.rows = {row("x", 50, 100, 0.00), row("x", 90, 180, 0.30),   //
              row("y", 50, 50, 0.01), row("y", 90, 90, 0.02),    //
              row("z", 50, 10, 0.50), row("z", 90, 18, 0.90)};
    CHECK(layer_targets_for_budget(t, 0).empty());
    CHECK(layer_targets_for_budget(t, 100) == LayerTargets{{"x", 50}});
    // x at 50 (0.00), then y at 50 (0.01), y at 90 (0.02): 190 removed; then x at 90 (0.30).
    CHECK(layer_targets_for_budget(t, 150) == LayerTargets{{"x", 50}, {"y", 50}});
    CHECK(layer_targets_for_budget(t, 151) == LayerTargets{{"x", 50}, {"y", 90}});
    CHECK(layer_targets_for_budget(t, 190) == LayerTargets{{"x", 50}, {"y", 90}});
    CHECK(layer_targets_for_budget(t, 191) == LayerTargets{{"x", 90}, {"y", 90}});
    CHECK(layer_targets_for_budget(t, 288) == LayerTargets{{"x", 90}, {"y", 90}, {"z", 90}});
    CHECK_THROWS_AS(layer_targets_for_budget(t, 289), argument_error);
    CHECK_THROWS_WITH(layer_targets_for_budget(t, -1), Catch::Contains("'parameters' = -1") &&
                                                            Catch::Contains("[0, 288]"));
  }
  SECTION("a hand-made table with a budget of MACs: rows' MACs add up") {
    SensitivityTable t;
    auto row = [](std::string layer, double s, std::int64_t macs, double drop) {
      return SensitivityRow{{std::move(layer)}, s, 1, 0.0, drop, macs, {}};
    };
    t.rows = {row("x", 50, 500, 0.00), row("x", 90, 900, 0.30), row("y", 50, 300, 0.01), row("y", 90, 600, 0.02)};
    CHECK(layer_targets_for_budget(t, 500, Budget::Macs) == LayerTargets{{"x", 50}});
    CHECK(layer_targets_for_budget(t, 801, Budget::Macs) == LayerTargets{{"x", 50}, {"y", 90}});
    CHECK(layer_targets_for_budget(t, 1101, Budget::Macs) == LayerTargets{{"x", 90}, {"y", 90}});
    CHECK_THROWS_WITH(layer_targets_for_budget(t, 1501, Budget::Macs),
                      Catch::Contains("'macs' = 1501") && Catch::Contains("[0, 1500]"));
    // Parameters: one per row here.
    CHECK(layer_targets_for_budget(t, 2) == LayerTargets{{"x", 50}, {"y", 50}});
  }
  SECTION("a budget of MACs on the analysed model is met after the Pruner, units combined exactly") {
    auto model = conv_net();
    const auto table = sensitivity<g::Filter>(model, images(), SensitivityOptions().sparsities({50}));
    // Both convs at 50%: conv 0 -1350, conv 3 keeps 4 of 8 outputs and 3 of 6 inputs (-8100),
    // the linear -12: 9462, less than the rows' sum (6750 + 5412), conv 3's inputs counted once.
    CHECK_THROWS_WITH(layer_targets_for_budget(table, 9463, Budget::Macs), Catch::Contains("[0, 9462]"));
    for (std::int64_t budget : {1000, 6000, 9000, 9462}) {
      const auto targets = layer_targets_for_budget(table, budget, Budget::Macs);
      auto copy = conv_net();
      Sparsifier<g::Filter, m::Local, c::L1> s(copy, SparsifierOptions(0).layer_targets(targets));
      s.step(1.0);
      Pruner().prune_(copy);
      CHECK(count_macs(copy, {2, 5, 5}).total() <= table.macs - budget);
    }
    // Neither conv alone removes 9000 MACs: both go to 50%.
    CHECK(layer_targets_for_budget(table, 9000, Budget::Macs) == LayerTargets{{"0", 50}, {"3", 50}});
  }
  SECTION("on the analysed model, the targets' sparsifier zeroes at least the budget") {
    auto model = trained_two_branch();
    const auto table = sensitivity<g::Weight>(model, synthetic(128, 7), SensitivityOptions().include_linear(true));
    for (std::int64_t budget : {1, 40, 80, 120, 157}) {
      const auto targets = layer_targets_for_budget(table, budget);
      auto copy = trained_two_branch();
      Sparsifier<g::Weight, m::Local, c::L1> s(copy, SparsifierOptions(0).include_linear(true).layer_targets(targets));
      s.step(1.0);
      std::int64_t zeros = 0;
      for (const auto& l : s.report().layers) zeros += l.zeros;
      CHECK(zeros >= budget);
      for (const auto& [layer, target] : targets) CHECK((target >= 10 && target <= 90));
    }
  }
}

TEST_CASE("sensitivity: bad arguments name the argument and leave the model unchanged",
          "[sensitivity][errors]") {
  auto model = trained_two_branch();
  const auto valid = synthetic(64, 3);
  model->train();
  const auto before = snapshot(*model);
  using Catch::Contains;
  auto run = [&](SensitivityOptions o) { return sensitivity<g::Weight>(model, valid, o.include_linear(true)); };
  CHECK_THROWS_WITH(run(SensitivityOptions().sparsities({})),
                    Contains("'sparsities'") && Contains("empty") && Contains("(0, 100)"));
  CHECK_THROWS_WITH(run(SensitivityOptions().sparsities({10, 0})), Contains("'sparsities' = 0") && Contains("(0, 100)"));
  CHECK_THROWS_WITH(run(SensitivityOptions().sparsities({100})), Contains("'sparsities' = 100"));
  CHECK_THROWS_WITH(run(SensitivityOptions().sparsities({-5})), Contains("'sparsities' = -5"));
  CHECK_THROWS_WITH(run(SensitivityOptions().metric(nullptr)), Contains("'metric'"));
  CHECK_THROWS_WITH(run(SensitivityOptions().include({"missing"})), Contains("'include' = missing"));
  CHECK_THROWS_WITH(sensitivity<g::Weight>(model, data::Batches{}, SensitivityOptions()),
                    Contains("'data'") && Contains("no batches"));
  // N:M reaches at most 50%.
  CHECK_THROWS_WITH((sensitivity<g::NM<2, 4>>(model, valid, SensitivityOptions().include_linear(true).sparsities({60}))),
                    Contains("'sparsities' = 60") && Contains("at most 50"));
  // A metric that fails mid-analysis: the model is restored before the error propagates.
  int calls = 0;
  CHECK_THROWS_AS(run(SensitivityOptions().metric([&](const torch::Tensor& p, const torch::Tensor& t) {
                    if (++calls > 3) throw std::runtime_error("metric failed");
                    return p.argmax(1).eq(t).to(torch::kFloat64).mean();
                  })),
                  std::runtime_error);
  CHECK(calls > 3);
  CHECK(identical(*model, before));
  CHECK(model->is_training());
}
