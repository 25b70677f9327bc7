#include <fasterai/deploy/torchscript.hpp>

#include "catch.hpp"
#include <torch/script.h>

#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/core/libtorch_version.hpp>

#include "python_oracle.hpp"

using namespace fasterai;

namespace {

// A user's own module: a residual block, a functional pooling, a flatten into a Linear.
struct ResidualNetImpl : torch::nn::Module {
  torch::nn::Conv2d stem{torch::nn::Conv2dOptions(3, 8, 3).padding(1)};
  torch::nn::BatchNorm2d bn{8};
  torch::nn::Conv2d conv{torch::nn::Conv2dOptions(8, 8, 3).padding(1)};
  torch::nn::Linear fc{8, 4};
  ResidualNetImpl() {
    register_module("stem", stem);
    register_module("bn", bn);
    register_module("conv", conv);
    register_module("fc", fc);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn(stem(x)));
    x = x + torch::relu(conv(x));
    return fc(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1));
  }
};
TORCH_MODULE(ResidualNet);

// Control flow on a tensor's value: the trace keeps the branch of its example.
struct BranchyImpl : torch::nn::Module {
  torch::nn::Linear fc{4, 4};
  BranchyImpl() { register_module("fc", fc); }
  torch::Tensor forward(torch::Tensor x) {
    if (x.sum().item<float>() > 0) return torch::relu(fc(x));
    return -fc(x);
  }
};
TORCH_MODULE(Branchy);

// Depthwise convolutions, one of them applied twice: where LibTorch is built with LLVM (Debian
// 13's 2.6), TorchScript's CPU fuser crashes or never finishes compiling such graphs.
struct DepthwiseNetImpl : torch::nn::Module {
  torch::nn::Conv2d single{torch::nn::Conv2dOptions(1, 1, 3).padding(1)};
  torch::nn::Conv2d expand{torch::nn::Conv2dOptions(1, 8, 1)};
  torch::nn::Conv2d depthwise{torch::nn::Conv2dOptions(8, 8, 3).padding(1).groups(8)};
  torch::nn::Linear fc{8, 3};
  DepthwiseNetImpl() {
    register_module("single", single);
    register_module("expand", expand);
    register_module("depthwise", depthwise);
    register_module("fc", fc);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(single(torch::relu(single(x))));
    x = torch::clamp(depthwise(expand(x)), 0, 6) + x;
    return fc(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1));
  }
};
TORCH_MODULE(DepthwiseNet);

struct PairOutImpl : torch::nn::Module {
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor x) { return {x, x}; }
};
TORCH_MODULE(PairOut);

struct CollectWarnings : libtorch::WarningCollector {
  bool any_contains(const std::string& s) const {
    return std::any_of(messages.begin(), messages.end(),
                       [&](const std::string& m) { return m.find(s) != std::string::npos; });
  }
};

std::vector<std::string> names_of(const torch::jit::named_parameter_list& list) {
  std::vector<std::string> names;
  for (const auto& p : list) names.push_back(p.name);
  return names;
}

std::vector<std::string> names_of(const torch::OrderedDict<std::string, torch::Tensor>& dict) {
  return dict.keys();
}

}  // namespace

static_assert(traceable<torch::nn::Sequential>);
static_assert(traceable<ResidualNet>);
static_assert(traceable<ResidualNetImpl>);
static_assert(!traceable<PairOut>, "a forward returning a tuple is not exportable");

TEST_CASE("to_torchscript records a Sequential and a user's module, reading the model's own tensors",
          "[torchscript]") {
  torch::manual_seed(0);
  auto vgg = models::compact_vgg();
  auto residual = ResidualNet();
  vgg->eval();
  residual->eval();
  const auto x_vgg = torch::randn({2, 1, 28, 28});
  const auto x_res = torch::randn({2, 3, 12, 12});

  auto check = [](auto& model, const torch::Tensor& x) {
    torch::jit::Module exported = to_torchscript(model, x);
    torch::NoGradGuard no_grad;
    // The same ATen calls on the same tensors: the same numbers, on other inputs too.
    CHECK(torch::equal(exported.forward({x}).toTensor(), model->forward(x)));
    const auto other = torch::randn_like(x) * 3;
    CHECK(torch::equal(exported.forward({other}).toTensor(), model->forward(other)));
    // Parameters and buffers under the state_dict names, and the very tensors of the model.
    CHECK(names_of(exported.named_parameters()) == names_of(model->named_parameters()));
    const auto params = model->named_parameters();
    for (const auto& p : exported.named_parameters())
      CHECK(p.value.unsafeGetTensorImpl() == params[p.name].unsafeGetTensorImpl());
    CHECK(exported.named_buffers().size() == model->named_buffers().size());
    CHECK_FALSE(exported.is_training());
    // The graph reads them as attributes: no weight is baked in as a constant.
    const auto graph = exported.get_method("forward").graph();
    std::size_t tensor_constants = 0;
    for (const auto* node : graph->nodes())
      if (node->kind() == c10::prim::Constant && node->output()->type()->kind() == c10::TypeKind::TensorType)
        ++tensor_constants;
    CHECK(tensor_constants == 0);
  };
  SECTION("Sequential (compact VGG)") { check(vgg, x_vgg); }
  SECTION("user's module with a residual addition") { check(residual, x_res); }
}

TEST_CASE("to_torchscript: saved and loaded by LibTorch and by Python, same outputs",
          "[torchscript][oracle]") {
  torch::manual_seed(1);
  auto model = ResidualNet();
  model->eval();
  deploy_test::TempDir dir("fasterai_torchscript");
  const auto x = torch::linspace(-3, 3, 2 * 3 * 10 * 10).reshape({2, 3, 10, 10}).sin();
  to_torchscript(model, x).save((dir / "model.pt").string());
  torch::NoGradGuard no_grad;
  const torch::Tensor expected = model->forward(x);

  torch::jit::Module loaded = torch::jit::load((dir / "model.pt").string());
  CHECK(torch::equal(loaded.forward({x}).toTensor(), expected));

  if (deploy_test::python().empty()) {
    FASTERAI_SKIP("python3 with torch not found: Python's torch.jit.load not tried");
  }
  const auto python =
      deploy_test::python_forward(dir, "model.pt", x, "print(sorted(dict(m.named_parameters()).keys()))\n");
  INFO(deploy_test::log(dir));
  REQUIRE(python.status == 0);
  const auto y = python.output.view(expected.sizes());
  CHECK(torch::allclose(y, expected, 1e-6, 1e-7));
  CHECK(deploy_test::log(dir).find("'stem.weight'") != std::string::npos);
}

TEST_CASE("to_torchscript warns where the forward depends on data", "[torchscript][bad_input]") {
  torch::manual_seed(2);
  auto model = Branchy();
  model->eval();
  CollectWarnings warnings;
  libtorch::WarningHandlerGuard guard(&warnings);
  torch::jit::Module exported = to_torchscript(model, torch::ones({1, 4}));
  CHECK(warnings.any_contains("aten::sum"));  // what fed item(): the tracer skips item itself
  CHECK(warnings.any_contains("one path"));
  // The exported module took the positive branch for good.
  torch::NoGradGuard no_grad;
  const auto negative = -torch::ones({1, 4});
  CHECK(torch::equal(exported.forward({negative}).toTensor(), torch::relu(model->fc(negative))));

  SECTION("a straight-line forward gives no warning") {
    CollectWarnings quiet;
    libtorch::WarningHandlerGuard inner(&quiet);
    auto plain = models::compact_vgg();
    plain->eval();
    to_torchscript(plain, torch::randn({1, 1, 28, 28}));
    CHECK(quiet.messages.empty());
  }
}

TEST_CASE("to_torchscript: bad inputs raise clear errors and leave the model as it was",
          "[torchscript][bad_input]") {
  torch::manual_seed(3);
  auto model = models::compact_vgg();  // training mode: the trace updates BN statistics
  std::vector<torch::Tensor> before;
  for (const auto& b : model->buffers()) before.push_back(b.clone());

  SECTION("training-mode trace leaves the running statistics and the mode unchanged") {
    torch::jit::Module exported = to_torchscript(model, torch::randn({4, 1, 28, 28}));
    CHECK(exported.is_training());
    CHECK(model->is_training());
  }
  SECTION("an input of the wrong shape names the function and the shape") {
    CHECK_THROWS_AS(to_torchscript(model, torch::randn({1, 3, 28, 28})), argument_error);
    CHECK_THROWS_WITH(to_torchscript(model, torch::randn({1, 3, 28, 28})),
                      Catch::Contains("fasterai::to_torchscript") && Catch::Contains("[1, 3, 28, 28]"));
  }
  SECTION("an undefined example") {
    CHECK_THROWS_WITH(to_torchscript(model, torch::Tensor()),
                      Catch::Contains("example_input") && Catch::Contains("undefined"));
  }
  SECTION("a Sequential whose last layer returns a pair") {
    torch::nn::Sequential pair(torch::nn::Linear(4, 4), PairOut());
    CHECK_THROWS_WITH(to_torchscript(pair, torch::randn({1, 4})),
                      Catch::Contains("fasterai::to_torchscript") && Catch::Contains("one tensor"));
  }
  const auto after = model->buffers();
  REQUIRE(after.size() == before.size());
  for (std::size_t i = 0; i < before.size(); ++i) CHECK(torch::equal(after[i], before[i]));
}

TEST_CASE("to_torchscript: an export with depthwise convolutions runs again and again",
          "[torchscript]") {
  // The export's execution plan is built by the check's second run, without TorchScript's
  // TensorExpr fuser (see core/libtorch_version.hpp), and kept for every later call.
  torch::manual_seed(12);
  auto model = DepthwiseNet();
  model->eval();
  const auto x = torch::randn({2, 1, 12, 12});
  torch::jit::Module exported = to_torchscript(model, x);
  torch::NoGradGuard no_grad;
  for (int i = 0; i < 4; ++i) {
    const auto input = torch::randn({2, 1, 12, 12});
    CHECK(torch::allclose(exported.forward({input}).toTensor(), model->forward(input), 1e-5, 1e-6));
  }
}
