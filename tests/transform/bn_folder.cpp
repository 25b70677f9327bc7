#include "catch.hpp"

#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/transform/bn_folder.hpp>

#include "transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

template <class M>
concept foldable_by_folder = requires(BNFolder f, M m) { f.fold(m); };
static_assert(foldable_by_folder<nn::Sequential>);
static_assert(!foldable_by_folder<nn::Conv2d>);
static_assert(!foldable_by_folder<nn::BatchNorm2d>);

namespace {

nn::Sequential conv_bn(bool bias) {
  nn::Sequential m;
  m->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 5, 3).padding(1).bias(bias)));
  m->push_back("bn", nn::BatchNorm2d(5));
  m->push_back("relu", nn::ReLU());
  m->push_back("flatten", nn::Flatten());
  m->push_back("fc", nn::Linear(5 * 6 * 6, 4));
  m->push_back("bn_fc", nn::BatchNorm1d(4));
  randomize_batch_norms(*m);
  return m;
}

torch::Tensor run(nn::Sequential& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return m->forward(x);
}

std::vector<std::string> child_names(const nn::Sequential& m) {
  std::vector<std::string> names;
  for (const auto& c : m->named_children()) names.push_back(c.key());
  return names;
}

}  // namespace

TEST_CASE("BNFolder folds BatchNorm2d into Conv2d and BatchNorm1d into Linear", "[bn_folder]") {
  for (bool bias : {true, false}) {
    INFO("conv bias: " << bias);
    torch::manual_seed(bias ? 11 : 12);
    auto model = conv_bn(bias);
    model->eval();
    const auto before = snapshot(*model);
    const auto x = torch::randn({3, 3, 6, 6});
    const auto y = run(model, x);

    BNFolder folder;
    auto folded = folder.fold(model);
    CHECK(unchanged(before, *model));
    CHECK(child_names(folded) == std::vector<std::string>{"conv", "relu", "flatten", "fc"});
    const auto p = folded->named_parameters();
    CHECK(p.contains("conv.bias"));  // a conv without bias gains one
    CHECK(count_parameters(folded) == count_parameters(model) - 2 * 5 - 2 * 4 + (bias ? 0 : 5));
    CHECK(relative_error(run(folded, x), y) <= 1e-5);

    // The closed form, checked on the convolution: W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β.
    const auto bn = model->named_children()[1].value()->as<nn::BatchNorm2dImpl>();
    const auto scale = bn->weight / torch::sqrt(bn->running_var + bn->options.eps());
    const auto w = model->named_parameters()["conv.weight"];
    const auto b = bias ? model->named_parameters()["conv.bias"] : torch::zeros({5});
    CHECK(torch::allclose(p["conv.weight"], w * scale.view({-1, 1, 1, 1}), 1e-6, 1e-7));
    CHECK(torch::allclose(p["conv.bias"], (b - bn->running_mean) * scale + bn->bias, 1e-6, 1e-7));

    REQUIRE(folder.report().folded.size() == 2);
    CHECK(folder.report().folded[0].batch_norm == "bn");
    CHECK(folder.report().folded[0].into == "conv");
    CHECK(folder.report().folded[1].batch_norm == "bn_fc");
    CHECK(folder.report().folded[1].into == "fc");
    CHECK(folder.report().left.empty());
    CHECK(folder.report().changed());
  }
}

TEST_CASE("BNFolder uses running statistics whatever the mode and returns eval mode",
          "[bn_folder]") {
  torch::manual_seed(13);
  auto model = conv_bn(true);
  model->train();  // the input in train mode: folding still uses the running statistics
  const auto before = snapshot(*model);
  auto folded = BNFolder().fold(model);
  CHECK(unchanged(before, *model));  // no forward ran: running statistics untouched
  CHECK(model->is_training());
  CHECK_FALSE(folded->is_training());
  for (const auto& m : folded->modules()) CHECK_FALSE(m->is_training());
  model->eval();
  const auto x = torch::randn({3, 3, 6, 6});
  CHECK(relative_error(run(folded, x), run(model, x)) <= 1e-5);
}

TEST_CASE("BNFolder folds the nested VGG zoo exactly", "[bn_folder][vgg]") {
  torch::manual_seed(14);
  auto model = models::vgg11_bn(10);
  randomize_batch_norms(*model);
  model->eval();
  const auto before = snapshot(*model);
  const auto x = torch::randn({1, 3, 32, 32});
  const auto y = run(model, x);
  BNFolder folder;
  auto folded = folder.fold(model);
  CHECK(unchanged(before, *model));
  CHECK(relative_error(run(folded, x), y) <= 1e-5);
  const std::int64_t bn_parameters = 2 * (64 + 128 + 256 + 256 + 512 * 4);
  CHECK(count_parameters(folded) == count_parameters(model) - bn_parameters);
  CHECK(folder.report().folded.size() == 8);
  // Convolutions keep their torchvision names; the BatchNorms' indices are gone.
  const auto p = folded->named_parameters();
  CHECK(p.contains("features.0.weight"));
  CHECK(p.contains("features.4.bias"));
  CHECK_FALSE(p.contains("features.1.weight"));
  CHECK(p.contains("classifier.6.weight"));
}

TEST_CASE("BNFolder leaves BatchNorms it cannot fold, and reports them", "[bn_folder]") {
  torch::manual_seed(15);
  nn::Sequential model;
  model->push_back("bn0", nn::BatchNorm2d(3));  // nothing before it
  model->push_back("conv", nn::Conv2d(nn::Conv2dOptions(3, 4, 3)));
  model->push_back("relu", nn::ReLU());
  model->push_back("bn1", nn::BatchNorm2d(4));  // after a ReLU: not an affine map of the conv
  model->push_back("conv2", nn::Conv2d(nn::Conv2dOptions(4, 4, 1)));
  model->push_back("bn2", nn::BatchNorm2d(nn::BatchNorm2dOptions(4).track_running_stats(false)));
  randomize_batch_norms(*model);
  model->eval();
  const auto x = torch::randn({2, 3, 5, 5});
  const auto y = run(model, x);
  BNFolder folder;
  auto folded = folder.fold(model);
  CHECK_FALSE(folder.report().changed());
  REQUIRE(folder.report().left.size() == 3);
  CHECK(folder.report().left[0].batch_norm == "bn0");
  CHECK(folder.report().left[1].batch_norm == "bn1");
  CHECK(folder.report().left[2].reason == "no running statistics");
  CHECK(child_names(folded) == child_names(model));
  CHECK(relative_error(run(folded, x), y) <= 1e-5);
}

TEST_CASE("BNFolder on a model without BatchNorm is a reported no-op", "[bn_folder]") {
  torch::manual_seed(16);
  auto model = models::vgg11(10);
  BNFolder folder;
  auto folded = folder.fold(model);
  CHECK_FALSE(folder.report().changed());
  CHECK(folder.report().left.empty());
  CHECK(count_parameters(folded) == count_parameters(model));
  CHECK_FALSE(folded->is_training());
}

TEST_CASE("BNFolder folds across stage boundaries and an emptied stage becomes Identity",
          "[bn_folder]") {
  torch::manual_seed(17);
  nn::Sequential model;
  NamedSequential a, b;
  a->push_back("0", nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(1)));
  b->push_back("0", nn::BatchNorm2d(3));
  model->push_back("a", a);
  model->push_back("b", b);
  model->push_back("relu", nn::ReLU());
  randomize_batch_norms(*model);
  model->eval();
  const auto x = torch::randn({2, 2, 4, 4});
  const auto y = run(model, x);
  auto folded = BNFolder().fold(model);
  CHECK(child_names(folded) == std::vector<std::string>{"a", "b", "relu"});
  CHECK(folded->named_children()[1].value()->as<nn::IdentityImpl>() != nullptr);
  CHECK(relative_error(run(folded, x), y) <= 1e-5);
}

TEST_CASE("BNFolder refuses corrupt BatchNorm statistics, naming them", "[bn_folder][errors]") {
  torch::manual_seed(18);
  auto model = conv_bn(true);
  torch::NoGradGuard no_grad;
  auto var = model->named_buffers()["bn.running_var"];
  var[2].fill_(-0.5);
  const auto before = snapshot(*model);
  CHECK_THROWS_AS(BNFolder().fold(model), argument_error);
  CHECK_THROWS_WITH(BNFolder().fold(model),
                    Catch::Contains("bn.running_var") && Catch::Contains("-0.5") &&
                        Catch::Contains(">= 0"));
  CHECK(unchanged(before, *model));

  var[2].fill_(1.0);
  model->named_buffers()["bn_fc.running_mean"][1].fill_(std::numeric_limits<double>::quiet_NaN());
  CHECK_THROWS_WITH(BNFolder().fold(model),
                    Catch::Contains("bn_fc.running_mean") && Catch::Contains("nan"));
}

TEST_CASE("BNFolder agrees with PyTorch's fuse_conv_bn_eval", "[bn_folder][oracle]") {
  const std::string python = FASTERAI_PYTHON;
  if (python.empty()) {
    FASTERAI_SKIP("python3 with torch not found");
  }
  torch::manual_seed(19);
  auto model = conv_bn(false);
  model->eval();
  const auto p = model->named_parameters();
  const auto bufs = model->named_buffers();
  // Tensors go to Python as text with every digit of a float.
  const std::string in = "bn_folder_oracle_in.txt", out = "bn_folder_oracle_out.txt";
  {
    std::ofstream f(in);
    f.precision(9);
    for (const auto* name : {"conv.weight", "bn.weight", "bn.bias"}) {
      const auto t = p[name].flatten();
      for (std::int64_t i = 0; i < t.numel(); ++i) f << t[i].item<float>() << ' ';
      f << '\n';
    }
    for (const auto* name : {"bn.running_mean", "bn.running_var"}) {
      const auto t = bufs[name];
      for (std::int64_t i = 0; i < t.numel(); ++i) f << t[i].item<float>() << ' ';
      f << '\n';
    }
  }
  const std::string cmd = python + " -c \"import torch\n"
                                   "from torch.nn.utils.fusion import fuse_conv_bn_eval\n"
                                   "rows = [list(map(float, l.split())) for l in open('" + in + "')]\n"
                                   "conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)\n"
                                   "bn = torch.nn.BatchNorm2d(5)\n"
                                   "with torch.no_grad():\n"
                                   "  conv.weight.copy_(torch.tensor(rows[0]).view(5, 3, 3, 3))\n"
                                   "  bn.weight.copy_(torch.tensor(rows[1])); bn.bias.copy_(torch.tensor(rows[2]))\n"
                                   "  bn.running_mean.copy_(torch.tensor(rows[3])); bn.running_var.copy_(torch.tensor(rows[4]))\n"
                                   "f = fuse_conv_bn_eval(conv.eval(), bn.eval())\n"
                                   "print(*['%.9g' % v for v in f.weight.flatten().tolist()])\n"
                                   "print(*['%.9g' % v for v in f.bias.tolist()])\" > " + out;
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::ifstream f(out);
  std::vector<std::vector<float>> rows;
  for (std::string line; std::getline(f, line);) {
    std::istringstream ls(line);
    rows.emplace_back();
    for (float v; ls >> v;) rows.back().push_back(v);
  }
  std::remove(in.c_str());
  std::remove(out.c_str());
  REQUIRE(rows.size() == 2);
  auto folded = BNFolder().fold(model);
  const auto fp = folded->named_parameters();
  const auto w = torch::tensor(rows[0]).view({5, 3, 3, 3});
  const auto b = torch::tensor(rows[1]);
  CHECK(torch::allclose(fp["conv.weight"], w, 1e-5, 1e-6));
  CHECK(torch::allclose(fp["conv.bias"], b, 1e-5, 1e-6));
}

namespace {

// A user's module: conv → BN → ReLU twice with a residual add, a conv without bias, a BN whose
// conv output is also read by the shortcut (not foldable), and a Linear → BatchNorm1d head.
struct FoldNetImpl : nn::Module {
  nn::Conv2d a{nullptr}, b{nullptr};
  nn::BatchNorm2d bn_a{nullptr}, bn_b{nullptr}, bn_shared{nullptr};
  nn::Linear fc{nullptr};
  nn::BatchNorm1d bn_fc{nullptr};
  FoldNetImpl() {
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(3, 4, 3).padding(1).bias(false)));
    bn_a = register_module("bn_a", nn::BatchNorm2d(4));
    b = register_module("b", nn::Conv2d(nn::Conv2dOptions(4, 4, 3).padding(1)));
    bn_b = register_module("bn_b", nn::BatchNorm2d(4));
    bn_shared = register_module("bn_shared", nn::BatchNorm2d(4));
    fc = register_module("fc", nn::Linear(4, 3));
    bn_fc = register_module("bn_fc", nn::BatchNorm1d(3));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn_a(a(x)));
    auto y = b(x);
    x = torch::relu(bn_b(y) + bn_shared(y));  // b's output goes to two BatchNorms
    return bn_fc(fc(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1)));
  }
};
TORCH_MODULE(FoldNet);

}  // namespace

TEST_CASE("BNFolder::fold_ folds users' modules in place, BatchNorms become identities", "[bn_folder][graph]") {
  torch::manual_seed(31);
  FoldNet net;
  randomize_batch_norms(*net);
  net->train();
  const auto x = torch::randn({3, 3, 6, 6});
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    net->eval();
    y = net->forward(x);
    net->train();
  }
  const auto parameters = net->parameters().size();
  BNFolder folder;
  const FoldReport report = folder.fold_(net, x);
  REQUIRE(report.folded.size() == 2);
  CHECK(report.folded[0].batch_norm == "bn_a");
  CHECK(report.folded[0].into == "a");
  CHECK(report.folded[1].batch_norm == "bn_fc");
  REQUIRE(report.left.size() == 2);
  CHECK(report.left[0].batch_norm == "bn_b");
  CHECK(report.left[0].reason.find("read elsewhere") != std::string::npos);
  CHECK_FALSE(net->is_training());
  // `a` had no bias: it has one now, registered as a parameter and in its options.
  CHECK(net->a->options.bias());
  CHECK(net->a->bias.defined());
  CHECK(net->named_parameters().contains("a.bias"));
  CHECK(net->parameters().size() == parameters + 1);
  CHECK(torch::equal(net->bn_a->running_var, torch::ones({4})));
  {
    torch::NoGradGuard no_grad;
    CHECK(relative_error(net->forward(x), y) <= 1e-5);
    // The identity is exact: bn_a now returns its input bit for bit.
    const auto z = torch::randn({2, 4, 3, 3});
    CHECK(torch::equal(net->bn_a->forward(z), z));
  }
  // Folding again finds nothing new to change in the outputs.
  BNFolder().fold_(net, x);
  torch::NoGradGuard no_grad;
  CHECK(relative_error(net->forward(x), y) <= 1e-5);
}

TEST_CASE("BNFolder::fold_ refuses corrupt statistics, changing nothing", "[bn_folder][errors]") {
  torch::manual_seed(32);
  FoldNet net;
  randomize_batch_norms(*net);
  {
    torch::NoGradGuard no_grad;
    net->bn_fc->running_var[1].fill_(-1.0);
  }
  const auto before = snapshot(*net);
  CHECK_THROWS_WITH(BNFolder().fold_(net, torch::randn({2, 3, 6, 6})), Catch::Contains("bn_fc.running_var"));
  CHECK(unchanged(before, *net));
  CHECK(net->is_training());
}
