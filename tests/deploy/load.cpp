#include <fasterai/deploy/load.hpp>

#include "catch.hpp"

#include <fasterai/core/sequential.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

#include "python_oracle.hpp"

using namespace fasterai;

namespace {

// A user's own module, built at two widths: the narrow one plays a pruned copy.
struct TwoBranchImpl : torch::nn::Module {
  torch::nn::Conv2d stem, depthwise, pointwise;
  torch::nn::BatchNorm2d bn;
  torch::nn::Linear fc;
  TwoBranchImpl(std::int64_t width, std::int64_t hidden)
      : stem(torch::nn::Conv2dOptions(3, width, 3).padding(1)),
        depthwise(torch::nn::Conv2dOptions(width, width, 3).padding(1).groups(width).bias(false)),
        pointwise(torch::nn::Conv2dOptions(width, hidden, 1)),
        bn(hidden),
        fc(hidden, 5) {
    register_module("stem", stem);
    register_module("depthwise", depthwise);
    register_module("pointwise", pointwise);
    register_module("bn", bn);
    register_module("fc", fc);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(stem(x));
    x = x + depthwise(x);
    x = torch::relu(bn(pointwise(x)));
    return fc(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1));
  }
};
TORCH_MODULE(TwoBranch);

void randomize_batch_norms(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules())
    if (auto* bn = m->as<torch::nn::BatchNorm2dImpl>()) {
      bn->weight.uniform_(0.5, 1.5);
      bn->bias.uniform_(-0.3, 0.3);
      bn->running_mean.uniform_(-0.5, 0.5);
      bn->running_var.uniform_(0.5, 1.5);
    }
}

// Every layer's options agree with its tensors.
void check_options_agree(torch::nn::Module& model) {
  for (const auto& item : model.named_modules()) {
    INFO(item.key());
    if (auto* conv = item.value()->as<torch::nn::Conv2dImpl>()) {
      CHECK(conv->options.out_channels() == conv->weight.size(0));
      CHECK(conv->options.in_channels() == conv->weight.size(1) * conv->options.groups());
      if (conv->bias.defined()) CHECK(conv->bias.size(0) == conv->weight.size(0));
    } else if (auto* bn = item.value()->as<torch::nn::BatchNorm2dImpl>()) {
      for (const auto& t : {bn->weight, bn->bias, bn->running_mean, bn->running_var})
        CHECK(t.size(0) == bn->options.num_features());
    } else if (auto* linear = item.value()->as<torch::nn::LinearImpl>()) {
      CHECK(linear->options.out_features() == linear->weight.size(0));
      CHECK(linear->options.in_features() == linear->weight.size(1));
    }
  }
}

struct Snapshot {
  std::vector<std::pair<std::string, torch::Tensor>> state;
  std::string printed;
  explicit Snapshot(const torch::nn::Module& m) {
    for (auto& [name, t] : fasterai::detail::state_of(m)) state.emplace_back(name, t.clone());
    std::ostringstream os;
    m.pretty_print(os);
    for (const auto& child : m.modules(/*include_self=*/false)) child->pretty_print(os << '\n');
    printed = os.str();
  }
  bool operator==(const Snapshot& other) const {
    if (printed != other.printed || state.size() != other.state.size()) return false;
    for (std::size_t i = 0; i < state.size(); ++i)
      if (state[i].first != other.state[i].first || !state[i].second.equal(other.state[i].second))
        return false;
    return true;
  }
};

}  // namespace

TEST_CASE("load_state_dict with resize: Sparsifier + Pruner, save, original architecture, load",
          "[load][resize]") {
  torch::manual_seed(8);
  auto model = models::compact_vgg();
  randomize_batch_norms(*model);
  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::OneShot> sparsifier(model);
  sparsifier.prune(40);
  auto pruned = Pruner().prune(model);
  pruned->eval();
  deploy_test::TempDir dir("fasterai_load");
  save_state_dict(pruned, dir / "pruned.pt");

  auto original = models::compact_vgg();
  const torch::Tensor first_weight = original->named_parameters()["features.0.weight"];
  load_state_dict(original, dir / "pruned.pt", LoadOptions().resize(true));
  original->eval();
  check_options_agree(*original);
  // The same parameter objects, now of the pruned shape.
  CHECK(original->named_parameters()["features.0.weight"].unsafeGetTensorImpl() ==
        first_weight.unsafeGetTensorImpl());
  CHECK(first_weight.size(0) == 10);  // 16 filters, 40% removed

  torch::NoGradGuard no_grad;
  const auto x = torch::randn({3, 1, 28, 28});
  const torch::Tensor expected = pruned->forward(x);
  CHECK(torch::equal(original->forward(x), expected));
  // clone() rebuilds layers from their options: they must agree with the weights.
  auto copy = clone_model(original);
  CHECK(torch::equal(copy->forward(x), expected));

  SECTION("without resize the mismatch is an error listing the keys, and nothing changes") {
    auto fresh = models::compact_vgg();
    const Snapshot before(*fresh);
    CHECK_THROWS_AS(load_state_dict(fresh, dir / "pruned.pt", LoadOptions()), state_dict_error);
    CHECK_THROWS_WITH(load_state_dict(fresh, dir / "pruned.pt", LoadOptions()),
                      Catch::Contains("shape mismatch features.0.weight") &&
                          Catch::Contains("shape mismatch features.1.running_var") &&
                          Catch::Contains("shape mismatch classifier.0.weight"));
    CHECK(Snapshot(*fresh) == before);
  }
}

TEST_CASE("load_state_dict with resize: a user's module with a depthwise conv", "[load][resize]") {
  torch::manual_seed(9);
  auto narrow = TwoBranch(4, 6);
  randomize_batch_norms(*narrow);
  narrow->eval();
  deploy_test::TempDir dir("fasterai_load_user");
  save_state_dict(narrow, dir / "narrow.pt");

  auto wide = TwoBranch(8, 16);
  load_state_dict(wide, dir / "narrow.pt", LoadOptions().resize(true));
  wide->eval();
  check_options_agree(*wide);
  CHECK(wide->depthwise->options.groups() == 4);
  CHECK(wide->depthwise->options.in_channels() == 4);
  CHECK(wide->bn->options.num_features() == 6);
  CHECK(wide->fc->options.in_features() == 6);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 3, 9, 9});
  CHECK(torch::equal(wide->forward(x), narrow->forward(x)));
}

TEST_CASE("load_state_dict with resize: files that no resize fits are refused, model unchanged",
          "[load][resize][bad_input]") {
  torch::manual_seed(10);
  deploy_test::TempDir dir("fasterai_load_bad");
  auto model = TwoBranch(8, 16);
  const Snapshot before(*model);

  SECTION("a kernel size that differs: the module and both shapes are named") {
    auto state = StateDict();
    auto narrow = TwoBranch(4, 6);
    for (auto& [name, t] : fasterai::detail::state_of(*narrow)) state.insert(name, t);
    state["stem.weight"] = torch::zeros({4, 3, 5, 5});
    CHECK_THROWS_WITH(load_state_dict(model, state, LoadOptions().resize(true)),
                      Catch::Contains("Conv2d 'stem'") && Catch::Contains("[8, 3, 3, 3]") &&
                          Catch::Contains("[4, 3, 5, 5]") && Catch::Contains("kernel size"));
  }
  SECTION("a BatchNorm whose statistics disagree with its weight") {
    auto narrow = TwoBranch(4, 6);
    auto state = StateDict();
    for (auto& [name, t] : fasterai::detail::state_of(*narrow)) state.insert(name, t);
    state["bn.running_var"] = torch::ones({5});
    CHECK_THROWS_WITH(load_state_dict(model, state, LoadOptions().resize(true)),
                      Catch::Contains("bn.running_var") && Catch::Contains("[5]") &&
                          Catch::Contains("[6]"));
  }
  SECTION("a depthwise conv that would change its per-group inputs") {
    auto narrow = TwoBranch(4, 6);
    auto state = StateDict();
    for (auto& [name, t] : fasterai::detail::state_of(*narrow)) state.insert(name, t);
    state["depthwise.weight"] = torch::zeros({4, 2, 3, 3});
    CHECK_THROWS_WITH(load_state_dict(model, state, LoadOptions().resize(true)),
                      Catch::Contains("Conv2d 'depthwise'") && Catch::Contains("whole groups"));
  }
  SECTION("a key the model lacks, next to a resizable layer") {
    auto narrow = TwoBranch(4, 6);
    auto state = StateDict();
    for (auto& [name, t] : fasterai::detail::state_of(*narrow)) state.insert(name, t);
    state.insert("head.weight", torch::zeros({2, 2}));
    CHECK_THROWS_WITH(load_state_dict(model, state, LoadOptions().resize(true)),
                      Catch::Contains("unexpected key head.weight"));
  }
  SECTION("a file that does not exist") {
    CHECK_THROWS_WITH(load_state_dict(model, dir / "missing.pt", LoadOptions().resize(true)),
                      Catch::Contains("missing.pt"));
  }
  CHECK(Snapshot(*model) == before);
}

TEST_CASE("load_state_dict with resize: a pruned torchvision ResNet-18 saved by Python",
          "[load][resize][oracle]") {
  if (deploy_test::python().empty()) {
    FASTERAI_SKIP("python3 with torch not found: Python-written file not tried");
  }
  deploy_test::TempDir dir("fasterai_load_python");
  const auto x = torch::linspace(-2, 2, 2 * 3 * 32 * 32).reshape({2, 3, 32, 32}).sin();
  deploy_test::write_text(dir / "x.txt", x);
  // Python removes 40% of the inner channels of every BasicBlock (conv1, bn1 and conv2's
  // inputs: what a pruner can remove without touching the residual stream), physically.
  const int status = deploy_test::run_python(dir, R"(
import torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet18(num_classes=10).eval()
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.weight.uniform_(0.5, 1.5); mod.bias.uniform_(-0.3, 0.3)
            mod.running_mean.uniform_(-0.5, 0.5); mod.running_var.uniform_(0.5, 1.5)
    for layer in [m.layer1, m.layer2, m.layer3, m.layer4]:
        for block in layer:
            n = block.conv1.out_channels
            keep = torch.randperm(n)[: n - (4 * n) // 10].sort().values
            c1 = block.conv1
            conv1 = torch.nn.Conv2d(c1.in_channels, len(keep), 3, c1.stride, 1, bias=False)
            conv1.weight.copy_(c1.weight[keep])
            bn1 = torch.nn.BatchNorm2d(len(keep))
            for name in ['weight', 'bias', 'running_mean', 'running_var']:
                getattr(bn1, name).copy_(getattr(block.bn1, name)[keep])
            conv2 = torch.nn.Conv2d(len(keep), block.conv2.out_channels, 3, 1, 1, bias=False)
            conv2.weight.copy_(block.conv2.weight[:, keep])
            block.conv1, block.bn1, block.conv2 = conv1, bn1.eval(), conv2
    torch.save(m.state_dict(), 'pruned_resnet18.pt')
    x = torch.tensor([float(v) for v in open('x.txt').read().split()]).view(2, 3, 32, 32)
    y = m(x)
open('y.txt', 'w').write(' '.join('%.9g' % v for v in y.flatten().tolist()))
)");
  INFO(deploy_test::log(dir));
  REQUIRE(status == 0);
  auto model = models::resnet18(10);
  load_state_dict(model, dir / "pruned_resnet18.pt", LoadOptions().resize(true));
  model->eval();
  check_options_agree(*model);
  CHECK(model->named_parameters()["layer1.0.conv1.weight"].size(0) == 39);  // 64 - 25
  torch::NoGradGuard no_grad;
  const torch::Tensor y = model->forward(x);
  const auto expected = deploy_test::read_text(dir / "y.txt").view(y.sizes());
  CHECK(torch::allclose(y, expected, 1e-4, 1e-5));
}
