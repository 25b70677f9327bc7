#include "catch.hpp"

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>

using namespace fasterai;

namespace {
struct Expected {
  int depth;
  bool bn;
  std::int64_t classes_1000, classes_10;
};
// torchvision 0.14: sum(p.numel() for p in vggXX(num_classes=...).parameters()).
const Expected torchvision_counts[] = {
    {11, false, 132'863'336, 128'807'306}, {11, true, 132'868'840, 128'812'810},
    {13, false, 133'047'848, 128'991'818}, {13, true, 133'053'736, 128'997'706},
    {16, false, 138'357'544, 134'301'514}, {16, true, 138'365'992, 134'309'962},
    {19, false, 143'667'240, 139'611'210}, {19, true, 143'678'248, 139'622'218},
};
}  // namespace

TEST_CASE("VGG parameter counts equal torchvision's for 10 and 1000 classes", "[vgg]") {
  for (const auto& e : torchvision_counts) {
    INFO("vgg" << e.depth << (e.bn ? "_bn" : ""));
    CHECK(count_parameters(models::vgg(e.depth, e.bn, 1000)) == e.classes_1000);
    CHECK(count_parameters(models::vgg(e.depth, e.bn, 10)) == e.classes_10);
  }
  CHECK(count_parameters(models::vgg16_bn(10)) == 134'309'962);
}

TEST_CASE("VGG follows torchvision's initialization", "[vgg]") {
  torch::manual_seed(0);
  auto model = models::vgg11_bn(10);
  auto p = model->named_parameters();
  // Kaiming normal, fan_out, ReLU: std = sqrt(2 / (out * 3 * 3)).
  const auto w = p["features.0.weight"];
  CHECK(w.std().item<double>() == Approx(std::sqrt(2.0 / (64 * 9))).epsilon(0.1));
  CHECK(p["features.0.bias"].abs().max().item<double>() == 0.0);
  CHECK(p["features.1.weight"].eq(1).all().item<bool>());
  CHECK(p["classifier.0.weight"].std().item<double>() == Approx(0.01).epsilon(0.01));
  CHECK(p["classifier.6.bias"].abs().max().item<double>() == 0.0);
}

TEST_CASE("VGG rejects an unknown depth and a bad class count", "[vgg]") {
  CHECK_THROWS_WITH(models::vgg(12, false), Catch::Contains("depth") && Catch::Contains("12") &&
                                                 Catch::Contains("11, 13, 16, 19"));
  CHECK_THROWS_WITH(models::vgg16(0), Catch::Contains("num_classes") && Catch::Contains("0"));
}

TEST_CASE("VGG names and shapes equal torchvision's (Python oracle)", "[vgg][python]") {
  const std::string python = FASTERAI_PYTHON;
  if (python.empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  const std::string out = "vgg_shapes_oracle.txt";
  const std::string cmd = python +
                          " -c \"import torchvision.models as m\n"
                          "for n in ['vgg11','vgg13_bn','vgg16_bn','vgg19']:\n"
                          "  for k,v in m.__dict__[n](num_classes=7).state_dict().items():\n"
                          "    print(n, k, *v.shape)\" > " + out;
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::map<std::string, std::map<std::string, std::vector<std::int64_t>>> oracle;
  std::ifstream in(out);
  for (std::string line; std::getline(in, line);) {
    std::istringstream ls(line);
    std::string net, key;
    ls >> net >> key;
    std::vector<std::int64_t> shape;
    for (std::int64_t d; ls >> d;) shape.push_back(d);
    oracle[net][key] = shape;
  }
  std::remove(out.c_str());
  const std::map<std::string, torch::nn::Sequential> ours{
      {"vgg11", models::vgg11(7)}, {"vgg13_bn", models::vgg13_bn(7)},
      {"vgg16_bn", models::vgg16_bn(7)}, {"vgg19", models::vgg19(7)}};
  REQUIRE(oracle.size() == ours.size());
  for (const auto& [net, model] : ours) {
    INFO(net);
    std::map<std::string, std::vector<std::int64_t>> mine;
    for (const auto& item : model->named_parameters()) mine[item.key()] = item.value().sizes().vec();
    for (const auto& item : model->named_buffers()) mine[item.key()] = item.value().sizes().vec();
    CHECK(mine == oracle[net]);
  }
}

TEST_CASE("compact VGG runs on 1x28x28 and has the zoo's layout", "[compact_vgg]") {
  auto model = models::compact_vgg();
  auto y = model->forward(torch::randn({4, 1, 28, 28}));
  CHECK(y.sizes() == torch::IntArrayRef({4, 10}));
  const auto names = model->named_children().keys();
  CHECK(names == std::vector<std::string>{"features", "avgpool", "flatten", "classifier"});
  // 1->16, 16->32, 32->32, 32->64, 64->64 convolutions with BN, then 576->256->10.
  const std::int64_t convs = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 32 * 9 + 32) +
                             (64 * 32 * 9 + 64) + (64 * 64 * 9 + 64);
  const std::int64_t bns = 2 * (16 + 32 + 32 + 64 + 64);
  const std::int64_t fcs = (576 * 256 + 256) + (256 * 10 + 10);
  CHECK(count_parameters(model) == convs + bns + fcs);
  CHECK_THROWS_WITH(models::compact_vgg(models::CompactVGGOptions().widths({8, 16})),
                    Catch::Contains("widths.size()") && Catch::Contains("2"));
  CHECK_THROWS_WITH(models::compact_vgg(models::CompactVGGOptions().dropout(1.5)),
                    Catch::Contains("dropout") && Catch::Contains("1.5"));
}
