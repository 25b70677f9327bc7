// ResNet and MobileNetV2: counts, names, shapes, initialization, and logits against torchvision.
#include "catch.hpp"

#include <stdlib.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <fasterai/core/statistics.hpp>
#include <fasterai/io/state_dict.hpp>
#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>

#include "python_oracle.hpp"

using namespace fasterai;
using namespace fasterai::testing;

namespace {

struct ZooModel {
  std::string name;  // torchvision's constructor
  std::function<std::shared_ptr<torch::nn::Module>(std::int64_t)> make;
  std::int64_t classes_1000, classes_10;  // torchvision 0.14: sum(p.numel() for p in parameters())
};

const std::vector<ZooModel>& zoo() {
  static const std::vector<ZooModel> models{
      {"resnet18", [](std::int64_t n) { return models::resnet18(n).ptr(); }, 11'689'512,
       11'181'642},
      {"resnet34", [](std::int64_t n) { return models::resnet34(n).ptr(); }, 21'797'672,
       21'289'802},
      {"resnet50", [](std::int64_t n) { return models::resnet50(n).ptr(); }, 25'557'032,
       23'528'522},
      {"mobilenet_v2", [](std::int64_t n) { return models::mobilenet_v2(n).ptr(); }, 3'504'872,
       2'236'682},
  };
  return models;
}

// The forward of a zoo model behind a type-erased module pointer.
torch::Tensor forward(torch::nn::Module& model, const torch::Tensor& x) {
  if (auto* resnet = model.as<models::ResNetImpl>()) return resnet->forward(x);
  if (auto* mobilenet = model.as<models::MobileNetV2Impl>()) return mobilenet->forward(x);
  FAIL("not a zoo model");
  return {};
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

}  // namespace

TEST_CASE("Zoo parameter counts equal torchvision's for 10 and 1000 classes", "[zoo]") {
  for (const auto& m : zoo()) {
    INFO(m.name);
    CHECK(count_parameters(*m.make(1000)) == m.classes_1000);
    CHECK(count_parameters(*m.make(10)) == m.classes_10);
  }
}

TEST_CASE("Zoo models run forward and backward on small images", "[zoo]") {
  torch::manual_seed(0);
  for (const auto& m : zoo()) {
    INFO(m.name);
    auto model = m.make(10);
    auto x = torch::randn({2, 3, 64, 64});
    auto y = forward(*model, x);
    CHECK(y.sizes() == torch::IntArrayRef({2, 10}));
    y.sum().backward();
    // Every parameter takes part in the forward: each one gets a gradient.
    for (const auto& p : model->named_parameters()) {
      INFO(p.key());
      CHECK(p.value().grad().defined());
    }
  }
}

TEST_CASE("Zoo models follow torchvision's initialization", "[zoo]") {
  torch::manual_seed(0);
  // Every layer of every model: Kaiming-normal convolutions (fan_out, ReLU gain: std =
  // sqrt(2 / (out * kh * kw)), fan_out counting a depthwise conv's single input channel), unit
  // BatchNorm with zero running mean and unit variance. The sample std of n normal draws is
  // within 5 / sqrt(2n) of sigma (relative) with overwhelming probability.
  for (const auto& m : zoo()) {
    auto model = m.make(10);
    std::size_t convs = 0, batch_norms = 0;
    for (const auto& item : model->named_modules("", /*include_self=*/false)) {
      INFO(m.name << " " << item.key());
      if (auto* conv = item.value()->as<torch::nn::Conv2dImpl>()) {
        const auto& w = conv->weight;
        const double expected = std::sqrt(2.0 / static_cast<double>(w.size(0) * w.size(2) * w.size(3)));
        const double tolerance = 5.0 / std::sqrt(2.0 * static_cast<double>(w.numel()));
        CHECK(w.std().item<double>() == Approx(expected).epsilon(tolerance));
        CHECK(std::abs(w.mean().item<double>()) <= 5.0 * expected / std::sqrt(double(w.numel())));
        CHECK_FALSE(conv->bias.defined());  // torchvision's convolutions here have no bias
        ++convs;
      } else if (auto* bn = item.value()->as<torch::nn::BatchNorm2dImpl>()) {
        CHECK(bn->weight.eq(1).all().item<bool>());
        CHECK(max_abs(bn->bias) == 0.0);
        CHECK(max_abs(bn->running_mean) == 0.0);
        CHECK(bn->running_var.eq(1).all().item<bool>());
        ++batch_norms;
      }
    }
    INFO(m.name);
    CHECK(convs > 0);
    CHECK(convs == batch_norms);  // every convolution is followed by its BatchNorm
  }

  // torchvision leaves ResNet's `fc` at nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)), bias
  // too.
  auto resnet = models::resnet50(10);
  const double bound = 1.0 / std::sqrt(2048.0);
  CHECK(max_abs(resnet->fc->weight) <= bound);
  CHECK(resnet->fc->weight.std().item<double>() == Approx(bound / std::sqrt(3.0)).epsilon(0.05));
  CHECK(max_abs(resnet->fc->bias) <= bound);
  CHECK(max_abs(resnet->fc->bias) > 0.0);

  // zero_init_residual: each block's last BatchNorm starts at gamma = 0, the others at 1.
  using models::ResNetBlock;
  for (auto block : {ResNetBlock::Basic, ResNetBlock::Bottleneck}) {
    auto zero_init =
        models::ResNet(models::ResNetOptions(block, {1, 1, 1, 1}).zero_init_residual(true));
    const std::string last = block == ResNetBlock::Basic ? "bn2.weight" : "bn3.weight";
    std::size_t zeroed = 0;
    for (const auto& p : zero_init->named_parameters()) {
      INFO(p.key());
      if (p.key().ends_with(last)) {
        CHECK(max_abs(p.value()) == 0.0);
        ++zeroed;
      } else if (p.key().find("bn") != std::string::npos && p.key().ends_with(".weight")) {
        CHECK(p.value().eq(1).all().item<bool>());
      }
    }
    CHECK(zeroed == 4);
  }

  // MobileNetV2's classifier: Dropout(0.2), then Linear with N(0, 0.01) weights and zero bias.
  auto mobilenet = models::mobilenet_v2(10);
  auto p = mobilenet->named_parameters();
  CHECK(p["features.2.conv.1.0.weight"].sizes() == torch::IntArrayRef({96, 1, 3, 3}));
  CHECK(p["classifier.1.weight"].std().item<double>() == Approx(0.01).epsilon(0.05));
  CHECK(max_abs(p["classifier.1.bias"]) == 0.0);
  auto* dropout = mobilenet->classifier->ptr(0)->as<torch::nn::DropoutImpl>();
  REQUIRE(dropout != nullptr);
  CHECK(dropout->options.p() == 0.2);
  CHECK_FALSE(dropout->options.inplace());
}

TEST_CASE("Zoo residual connections are where torchvision puts them", "[zoo]") {
  torch::manual_seed(0);
  // A BasicBlock without projection adds its input; with one, the projection of its input.
  models::BasicBlock same(8, 8), down(8, 16, 2);
  CHECK(same->downsample.is_empty());
  REQUIRE_FALSE(down->downsample.is_empty());
  for (auto* block : {same.get(), down.get()}) {
    block->eval();
    torch::NoGradGuard no_grad;
    for (auto& b : block->named_buffers())
      if (b.key().ends_with("running_mean")) b.value().uniform_(-0.5, 0.5);
    auto x = torch::randn({2, 8, 8, 8});
    auto main = block->bn2->forward(
        block->conv2->forward(torch::relu(block->bn1->forward(block->conv1->forward(x)))));
    auto shortcut = block->downsample ? block->downsample->forward(x) : x;
    CHECK(torch::allclose(block->forward(x), torch::relu(main + shortcut)));
  }
  // An InvertedResidual adds its input only at stride 1 with equal widths.
  CHECK(models::InvertedResidual(16, 16, 1, 6)->use_res_connect());
  CHECK_FALSE(models::InvertedResidual(16, 16, 2, 6)->use_res_connect());
  CHECK_FALSE(models::InvertedResidual(16, 24, 1, 6)->use_res_connect());
  models::InvertedResidual block(16, 16, 1, 6);
  auto x = torch::randn({1, 16, 8, 8});
  CHECK(torch::allclose(block->forward(x), x + block->conv->forward(x)));
}

TEST_CASE("Zoo models clone deeply", "[zoo]") {
  torch::manual_seed(0);
  for (const auto& m : zoo()) {
    INFO(m.name);
    auto model = m.make(10);
    model->eval();
    auto copy = model->clone();
    CHECK_FALSE(copy->is_training());
    const auto ours = model->named_parameters();
    const auto theirs = copy->named_parameters();
    REQUIRE(ours.keys() == theirs.keys());
    for (const auto& p : ours) {
      INFO(p.key());
      CHECK(torch::equal(p.value(), theirs[p.key()]));
      CHECK(p.value().data_ptr() != theirs[p.key()].data_ptr());
    }
    CHECK(copy->named_buffers().keys() == model->named_buffers().keys());
    torch::NoGradGuard no_grad;
    auto x = torch::randn({1, 3, 32, 32});
    CHECK(torch::equal(forward(*model, x), forward(*copy, x)));
  }
}

TEST_CASE("Zoo models clone their children's current shapes, not the constructor's",
          "[zoo]") {
  // What an in-place pruning does to layer1.0 of a ResNet-18: conv1 and bn1 keep 5 of their 64
  // channels, conv2 reads 5. A clone rebuilt from the blocks' options would have 64 again.
  torch::manual_seed(0);
  auto model = models::resnet18(10);
  auto& block = *model->layer1->ptr(0)->as<models::BasicBlockImpl>();
  {
    torch::NoGradGuard no_grad;
    block.conv1->weight.set_data(block.conv1->weight.narrow(0, 0, 5).clone());
    block.conv1->options.out_channels(5);
    for (auto* t : {&block.bn1->weight, &block.bn1->bias, &block.bn1->running_mean,
                    &block.bn1->running_var})
      t->set_data(t->narrow(0, 0, 5).clone());
    block.bn1->options.num_features(5);
    block.conv2->weight.set_data(block.conv2->weight.narrow(1, 0, 5).clone());
    block.conv2->options.in_channels(5);
  }
  model->eval();
  auto copy = std::dynamic_pointer_cast<models::ResNetImpl>(model->clone());
  REQUIRE(copy != nullptr);
  auto& copied = *copy->layer1->ptr(0)->as<models::BasicBlockImpl>();
  CHECK(copied.conv1->weight.sizes() == torch::IntArrayRef({5, 64, 3, 3}));
  CHECK(copied.bn1->running_var.sizes() == torch::IntArrayRef({5}));
  CHECK(copied.conv2->weight.sizes() == torch::IntArrayRef({64, 5, 3, 3}));
  CHECK(copied.conv2->weight.data_ptr() != block.conv2->weight.data_ptr());
  // The members are the registered children, so forward uses the cloned layers.
  CHECK(copied.conv1.ptr() == copied.named_children()["conv1"]);
  CHECK(copy->layer1.ptr() == copy->named_children()["layer1"]);
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 3, 32, 32});
  CHECK(torch::equal(copy->forward(x), model->forward(x)));
}

TEST_CASE("Zoo models reject bad options", "[zoo]") {
  using models::ResNetBlock;
  using models::ResNetOptions;
  CHECK_THROWS_AS(models::resnet18(0), argument_error);
  CHECK_THROWS_WITH(models::resnet50(0), Catch::Contains("num_classes") && Catch::Contains("0"));
  CHECK_THROWS_WITH(models::ResNet(ResNetOptions(ResNetBlock::Basic, {2, 2, 2})),
                    Catch::Contains("layers.size()") && Catch::Contains("3"));
  CHECK_THROWS_WITH(models::ResNet(ResNetOptions(ResNetBlock::Bottleneck, {3, 0, 6, 3})),
                    Catch::Contains("layers") && Catch::Contains(">= 1"));
  CHECK_THROWS_WITH(models::Bottleneck(64, 64, 0), Catch::Contains("stride"));
  CHECK_THROWS_WITH(models::InvertedResidual(16, 16, 3, 6),
                    Catch::Contains("stride") && Catch::Contains("1 or 2"));
  CHECK_THROWS_WITH(models::mobilenet_v2(-1), Catch::Contains("num_classes"));
  CHECK_THROWS_WITH(models::MobileNetV2(models::MobileNetV2Options().width_mult(0)),
                    Catch::Contains("width_mult"));
  CHECK_THROWS_WITH(models::MobileNetV2(models::MobileNetV2Options().dropout(1)),
                    Catch::Contains("dropout") && Catch::Contains("[0, 1)"));
}

// One Python run (its start-up dominates): names, shapes and module trees of torchvision's
// models, then state_dicts both ways and the logits they give.
TEST_CASE("Zoo models equal torchvision's: names, shapes, state_dicts and logits (Python oracle)",
          "[zoo][python]") {
  if (std::string(FASTERAI_PYTHON).empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  // Eval-mode models with random BatchNorm statistics and affine parameters (the defaults,
  // mean 0 and variance 1, would hide a mistake in their names or order).
  auto randomize_batch_norms = [](torch::nn::Module& model) {
    torch::NoGradGuard no_grad;
    for (auto& module : model.modules()) {
      if (auto* bn = module->as<torch::nn::BatchNorm2dImpl>()) {
        bn->weight.uniform_(0.5, 1.5);
        bn->bias.uniform_(-0.2, 0.2);
        bn->running_mean.uniform_(-0.2, 0.2);
        bn->running_var.uniform_(0.5, 1.5);
      }
    }
  };
  // Our models, saved for Python: torchvision's models must load them strictly.
  torch::manual_seed(2);
  std::vector<std::shared_ptr<torch::nn::Module>> ours;
  for (const auto& m : zoo()) {
    ours.push_back(m.make(10));
    randomize_batch_norms(*ours.back());
    ours.back()->eval();
    save_state_dict(*ours.back(), dir.path / ("ours_" + m.name + ".pt"));
  }
  run_python(dir, R"(
import sys, torch, torchvision.models as m
d = sys.argv[1]
# One line per parameter (p), buffer (b) and submodule (m, with its class; torchvision's
# Conv2dNormActivation is an nn.Sequential), in torchvision's order.
with open(d + '/shapes.txt', 'w') as out:
    for name in ['resnet18', 'resnet34', 'resnet50', 'mobilenet_v2', 'mobilenet_v2@0.5']:
        ctor, _, width = name.partition('@')
        for classes in [10, 1000]:
            kw = {'width_mult': float(width)} if width else {}
            net = getattr(m, ctor)(num_classes=classes, **kw)
            tag = f'{name}/{classes}'
            for k, v in net.named_parameters(): print(tag, 'p', k, *v.shape, file=out)
            for k, v in net.named_buffers(): print(tag, 'b', k, *v.shape, file=out)
            for k, mod in net.named_modules():
                kind = 'Sequential' if isinstance(mod, torch.nn.Sequential) else type(mod).__name__
                if k: print(tag, 'm', k, kind, file=out)
torch.manual_seed(0)
for name in ['resnet18', 'resnet34', 'resnet50', 'mobilenet_v2']:
    net = getattr(m, name)(num_classes=10).eval()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.num_batches_tracked.fill_(7)
        x = torch.randn(2, 3, 64, 64)
        y = net(x)
        torch.save(net.state_dict(), f'{d}/{name}.pt')
        net.load_state_dict(torch.load(f'{d}/ours_{name}.pt'), strict=True)
        torch.save({'input': x, 'logits': y, 'ours_logits': net(x)}, f'{d}/{name}_io.pt')
)");
  std::map<std::string, std::vector<std::string>> oracle;
  std::ifstream in(dir.path / "shapes.txt");
  for (std::string line; std::getline(in, line);) {
    const auto space = line.find(' ');
    oracle[line.substr(0, space)].push_back(line.substr(space + 1));
  }
  auto describe = [](const torch::nn::Module& model) {
    std::vector<std::string> lines;
    auto add = [&](const char* kind, const std::string& key, const torch::Tensor& t) {
      std::ostringstream os;
      os << kind << ' ' << key;
      for (auto d : t.sizes()) os << ' ' << d;
      lines.push_back(os.str());
    };
    for (const auto& p : model.named_parameters()) add("p", p.key(), p.value());
    for (const auto& b : model.named_buffers()) add("b", b.key(), b.value());
    // A module's class as Python names it: torch::nn::ReLU6Impl is ReLU6, and
    // fasterai::NamedSequentialImpl stands for nn.Sequential.
    for (const auto& c : model.named_modules("", /*include_self=*/false)) {
      std::string kind = c.value()->name();
      kind = kind.substr(kind.rfind(':') + 1);
      if (kind.ends_with("Impl")) kind.resize(kind.size() - 4);
      if (kind == "NamedSequential") kind = "Sequential";
      lines.push_back("m " + c.key() + " " + kind);
    }
    return lines;
  };
  std::size_t compared = 0;
  for (std::int64_t classes : {10, 1000}) {
    for (const auto& m : zoo()) {
      const auto tag = m.name + "/" + std::to_string(classes);
      INFO(tag);
      REQUIRE(oracle.count(tag) == 1);
      CHECK(describe(*m.make(classes)) == oracle[tag]);
      ++compared;
    }
    const auto tag = "mobilenet_v2@0.5/" + std::to_string(classes);
    INFO(tag);
    REQUIRE(oracle.count(tag) == 1);
    models::MobileNetV2 half(models::MobileNetV2Options().num_classes(classes).width_mult(0.5));
    CHECK(describe(*half) == oracle[tag]);
    ++compared;
  }
  CHECK(compared == oracle.size());

  for (std::size_t i = 0; i < zoo().size(); ++i) {
    const auto& m = zoo()[i];
    INFO(m.name);
    const auto io = read_state_dict(dir.path / (m.name + "_io.pt"));
    torch::NoGradGuard no_grad;
    {
      INFO("Python's weights in our model");
      torch::manual_seed(1);  // our own random init, overwritten by the file
      auto model = m.make(10);
      load_state_dict(*model, dir.path / (m.name + ".pt"));
      for (const auto& b : model->named_buffers())
        if (b.key().ends_with("num_batches_tracked")) CHECK(b.value().item<std::int64_t>() == 7);
      model->eval();
      check_logits_close(forward(*model, io["input"]), io["logits"]);
    }
    {
      INFO("our weights in torchvision's model");
      check_logits_close(forward(*ours[i], io["input"]), io["ours_logits"]);
    }
  }
}
