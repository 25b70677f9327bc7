// ConvNeXt: counts, names and logits against torchvision, and its MLP units pruned exactly
// through the traced graph (permutes, LayerNorm, Linear on channels-last tensors, layer scale).
#include "catch.hpp"

#include <cstdint>
#include <string>
#include <vector>

#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/io/state_dict.hpp>
#include <fasterai/models/convnext.hpp>
#include <fasterai/transform/pruner.hpp>

#include "python_oracle.hpp"

using namespace fasterai;
using namespace fasterai::testing;

namespace {

models::ConvNeXtOptions small_convnext() {
  return models::ConvNeXtOptions({{8, 16, 1}, {16, std::nullopt, 2}}).num_classes(10);
}

// Layer scales of 1e-6 would hide the blocks from the logits: random ones.
void randomize_layer_scales(models::ConvNeXt& net) {
  torch::NoGradGuard no_grad;
  for (auto& p : net->named_parameters())
    if (p.key().ends_with("layer_scale")) p.value().normal_(0.0, 0.5);
}

models::CNBlockImpl& block(models::ConvNeXt& net, std::size_t stage, std::size_t index) {
  return *net->features[stage]->as<NamedSequentialImpl>()->ptr(index)->as<models::CNBlockImpl>();
}

}  // namespace

TEST_CASE("ConvNeXt-Tiny has torchvision's parameter count for 1000 and 10 classes", "[zoo][convnext]") {
  CHECK(count_parameters(*models::convnext_tiny(1000)) == 28'589'128);
  CHECK(count_parameters(*models::convnext_tiny(10)) == 27'827'818);
}

TEST_CASE("ConvNeXt: bad options are named", "[zoo][convnext][errors]") {
  CHECK_THROWS_WITH(models::ConvNeXt(models::ConvNeXtOptions({})), Catch::Contains("block_setting"));
  CHECK_THROWS_WITH(models::ConvNeXt(small_convnext().num_classes(0)), Catch::Contains("num_classes"));
}

TEST_CASE("ConvNeXt: MLP units removed exactly through permutes and LayerNorms, stage widths kept",
          "[zoo][convnext][pruner]") {
  torch::manual_seed(6);
  auto net = models::ConvNeXt(small_convnext());
  randomize_layer_scales(net);
  net->eval();
  const auto x = torch::randn({2, 3, 32, 32});
  const auto macs_before = count_macs(net, {3, 32, 32}).total();
  {
    torch::NoGradGuard no_grad;  // 10 of the 32 units of stage 1's block, 20 of 64 in stage 3's first
    for (auto [stage, count] : {std::pair<std::size_t, int>{1, 10}, {3, 20}}) {
      auto* fc1 = block(net, stage, 0).block[3]->as<torch::nn::LinearImpl>();
      fc1->weight.narrow(0, 0, count).zero_();
      fc1->bias.narrow(0, 0, count).zero_();
    }
  }
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = net->forward(x);
  }
  const auto report = Pruner().prune_(net, x);
  CHECK(report.exact());
  CHECK(report.channels_removed() == 30);
  CHECK(block(net, 1, 0).block[3]->as<torch::nn::LinearImpl>()->options.out_features() == 22);
  CHECK(block(net, 1, 0).block[5]->as<torch::nn::LinearImpl>()->options.in_features() == 22);
  CHECK(block(net, 3, 0).block[3]->as<torch::nn::LinearImpl>()->options.out_features() == 44);
  CHECK(block(net, 1, 0).layer_scale.size(0) == 8);  // the stage width is kept
  {
    torch::NoGradGuard no_grad;
    const auto after = net->forward(x);
    CHECK((after - before).abs().max().item<double>() <= 1e-5 * before.abs().max().item<double>());
    // clone() copies the pruned widths (and keeps LayerNorm2d a LayerNorm2d).
    auto copy = models::ConvNeXt(std::dynamic_pointer_cast<models::ConvNeXtImpl>(net->clone()));
    CHECK(torch::equal(copy->forward(x), after));
    CHECK(count_parameters(copy) == count_parameters(net));
  }
  // A unit of a block's MLP costs 2·width MACs per position (8·8 in stage 1, 4·4 in stage 3).
  CHECK(macs_before - count_macs(net, {3, 32, 32}).total() == 10 * 2 * 8 * 64 + 20 * 2 * 16 * 16);
}

TEST_CASE("ConvNeXt equals torchvision's: names, shapes, state_dicts and logits (Python oracle)",
          "[zoo][convnext][python]") {
  if (std::string(FASTERAI_PYTHON).empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  torch::manual_seed(7);
  auto ours = models::ConvNeXt(small_convnext());
  randomize_layer_scales(ours);
  ours->eval();
  save_state_dict(*ours, dir.path / "ours.pt");
  run_python(dir, R"(
import sys, torch
from torchvision.models import convnext_tiny
from torchvision.models.convnext import ConvNeXt, CNBlockConfig
d = sys.argv[1]
with open(d + '/shapes.txt', 'w') as out:
    for k, v in convnext_tiny(num_classes=1000).named_parameters(): print('p', k, *v.shape, file=out)
torch.manual_seed(0)
net = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 2)], num_classes=10).eval()
with torch.no_grad():
    for k, p in net.named_parameters():
        if k.endswith('layer_scale'): p.normal_(0.0, 0.5)
    x = torch.randn(2, 3, 32, 32)
    y = net(x)
    torch.save(net.state_dict(), d + '/python.pt')
    net.load_state_dict(torch.load(d + '/ours.pt'), strict=True)
    torch.save({'input': x, 'logits': y, 'ours_logits': net(x)}, d + '/io.pt')
)");
  CHECK(parameter_lines(*models::convnext_tiny(1000)) == read_lines(dir.path / "shapes.txt"));

  check_logits_both_ways(dir, [] { return models::ConvNeXt(small_convnext()); }, ours);
}
