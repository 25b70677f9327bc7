// The Vision Transformer: counts, names and logits against torchvision, and its MLP units
// pruned exactly through the traced graph.
#include "catch.hpp"

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/deploy/load.hpp>
#include <fasterai/io/state_dict.hpp>
#include <fasterai/models/vit.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

#include "python_oracle.hpp"
#include "transform/transform_testing.hpp"

using namespace fasterai;
using namespace fasterai::testing;

namespace {

models::VisionTransformerOptions small_vit() {
  return models::VisionTransformerOptions(32, 8).num_layers(2).num_heads(2).hidden_dim(32).mlp_dim(64).num_classes(10);
}

// torchvision zeroes the head and the class token: random ones, so that logits say something.
void randomize_zeros(models::VisionTransformer& vit) {
  torch::NoGradGuard no_grad;
  vit->class_token.normal_(0.0, 0.5);
  for (auto& p : vit->heads->parameters()) p.normal_(0.0, 0.5);
}

}  // namespace

TEST_CASE("ViT-B/16 has torchvision's parameter count for 1000 and 10 classes", "[zoo][vit]") {
  CHECK(count_parameters(*models::vit_b_16(1000)) == 86'567'656);
  CHECK(count_parameters(*models::vit_b_16(10)) == 85'806'346);
}

TEST_CASE("ViT: bad options are named", "[zoo][vit][errors]") {
  CHECK_THROWS_WITH(models::vit(models::VisionTransformerOptions(30, 8)), Catch::Contains("image_size") &&
                                                                               Catch::Contains("patch_size"));
  CHECK_THROWS_WITH(models::vit(small_vit().num_heads(3)), Catch::Contains("hidden_dim"));
  CHECK_THROWS_WITH(models::vit(small_vit().num_classes(0)), Catch::Contains("num_classes"));
}

TEST_CASE("ViT: MLP units removed exactly through the graph, attention and hidden size kept", "[zoo][vit][pruner]") {
  torch::manual_seed(3);
  auto vit = models::vit(small_vit());
  randomize_zeros(vit);
  vit->eval();
  const auto x = torch::randn({2, 3, 32, 32});
  const auto macs_before = count_macs(vit, {3, 32, 32}).total();
  {
    torch::NoGradGuard no_grad;  // half of the first block's MLP units, a quarter of the second's
    for (auto [block, count] : {std::pair<int, int>{0, 32}, {1, 16}}) {
      auto* fc1 = vit->encoder->layers[block]->as<models::EncoderBlockImpl>()->mlp[0]->as<torch::nn::LinearImpl>();
      fc1->weight.narrow(0, 0, count).zero_();
      fc1->bias.narrow(0, 0, count).zero_();
    }
  }
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = vit->forward(x);
  }
  const auto report = Pruner().prune_(vit, x);
  CHECK(report.exact());
  CHECK(report.channels_removed() == 48);
  auto* block0 = vit->encoder->layers[0]->as<models::EncoderBlockImpl>();
  CHECK(block0->mlp[0]->as<torch::nn::LinearImpl>()->options.out_features() == 32);
  CHECK(block0->mlp[3]->as<torch::nn::LinearImpl>()->options.in_features() == 32);
  CHECK(vit->encoder->ln->weight.size(0) == 32);  // the hidden size is kept
  {
    torch::NoGradGuard no_grad;
    const auto after = vit->forward(x);
    CHECK((after - before).abs().max().item<double>() <= 1e-5 * before.abs().max().item<double>());
    // clone() copies the pruned widths.
    auto copy = models::VisionTransformer(std::dynamic_pointer_cast<models::VisionTransformerImpl>(vit->clone()));
    CHECK(torch::equal(copy->forward(x), after));
    CHECK(count_parameters(copy) == count_parameters(vit));
  }
  // Each MLP unit costs 2·hidden MACs per token (17 tokens: 16 patches and the class token).
  CHECK(macs_before - count_macs(vit, {3, 32, 32}).total() == 48 * 2 * 32 * 17);
}

TEST_CASE("ViT-B/16 pruned as Torch-Pruning prunes it: hidden 768 -> 384 by whole heads, MLP 3072 -> 1536",
          "[zoo][vit][pruner]") {
  // Torch-Pruning (PyTorch) takes torchvision's ViT-B/16 to 22,050,664 parameters with these
  // widths: ViT-S/16's. LibTorch's MultiheadAttention ties its heads to the hidden size, so half
  // the hidden size is half the heads (6 of 64 channels each), removed with approximate pruning.
  torch::manual_seed(0);
  auto vit = models::vit_b_16();
  vit->eval();
  const auto x = torch::randn({1, 3, 224, 224});
  const Graph g = trace(vit, x);
  const auto stream = g.units_of(g.nodes()[g.nodes_of("encoder.ln").front()].output);
  const std::set<std::int64_t> heads(stream.begin(), stream.end());
  REQUIRE(stream.size() == 768);
  REQUIRE(heads.size() == 12);  // one unit per head: channels 64h .. 64h + 63
  for (std::int64_t h = 0; h < 12; ++h) CHECK(stream[64 * h] == stream[64 * h + 63]);
  for (std::int64_t h = 1; h < 12; h += 2) zero_unit(*vit, g, stream[64 * h]);
  {
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < vit->encoder->layers->size(); ++i) {
      auto* fc1 = vit->encoder->layers[i]->as<models::EncoderBlockImpl>()->mlp[0]->as<torch::nn::LinearImpl>();
      fc1->weight.narrow(0, 1536, 1536).zero_();
      fc1->bias.narrow(0, 1536, 1536).zero_();
    }
  }
  const auto report = Pruner(PrunerOptions().approximate(true)).prune_(vit, x);
  CHECK_FALSE(report.exact());
  CHECK(count_parameters(vit) == 22'050'664);
  auto* block = vit->encoder->layers[11]->as<models::EncoderBlockImpl>();
  CHECK(block->self_attention->options.embed_dim() == 384);
  CHECK(block->self_attention->options.num_heads() == 6);
  CHECK(block->self_attention->head_dim == 64);
  CHECK(block->mlp[0]->as<torch::nn::LinearImpl>()->options.out_features() == 1536);
  CHECK(vit->conv_proj->options.out_channels() == 384);
  CHECK(vit->encoder->pos_embedding.sizes() == torch::IntArrayRef({1, 197, 384}));
  torch::NoGradGuard no_grad;
  const auto y = vit->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({1, 1000}));
  CHECK(torch::isfinite(y).all().item<bool>());
}

TEST_CASE("ViT: the Sparsifier scores MultiheadAttention's projection; heads and hidden size go when asked",
          "[zoo][vit][sparsifier]") {
  torch::manual_seed(4);
  auto vit = models::vit(small_vit().num_heads(4));
  randomize_zeros(vit);
  vit->eval();
  const auto x = torch::randn({2, 3, 32, 32});
  auto* block = vit->encoder->layers[0]->as<models::EncoderBlockImpl>();
  {
    // Exact: the MLP units only (the heads are tied to the hidden size).
    auto copy = models::VisionTransformer(std::dynamic_pointer_cast<models::VisionTransformerImpl>(vit->clone()));
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(copy, x,
                                                                         SparsifierOptions(50).include_linear(true));
    sparsifier.prune(50);
    CHECK(Pruner(PrunerOptions().approximate(true)).prune_(copy, x).exact());
    auto* b = copy->encoder->layers[0]->as<models::EncoderBlockImpl>();
    CHECK(b->self_attention->options.num_heads() == 4);
    CHECK(b->mlp[0]->as<torch::nn::LinearImpl>()->options.out_features() == 32);
  }
  Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
      vit, x, SparsifierOptions(50).include_linear(true).approximate(true));
  sparsifier.prune(50);
  // The in_proj rows of the removed heads are zero: q, k and v of 8 channels each.
  const auto zero_rows = block->self_attention->in_proj_weight.eq(0).all(1).sum().item<std::int64_t>();
  CHECK(zero_rows == 3 * 16);
  const auto report = Pruner(PrunerOptions().approximate(true)).prune_(vit, x);
  CHECK_FALSE(report.exact());
  CHECK(block->self_attention->options.embed_dim() == 16);
  CHECK(block->self_attention->options.num_heads() == 2);
  CHECK(block->mlp[0]->as<torch::nn::LinearImpl>()->options.out_features() == 32);
  CHECK(vit->conv_proj->options.out_channels() == 16);
  vit->zero_grad();
  const auto y = vit->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 10}));
  CHECK(torch::isfinite(y).all().item<bool>());
  y.sum().backward();
}

TEST_CASE("ViT: a pruned ViT's state_dict loads into the original architecture with resize", "[zoo][vit][load]") {
  torch::manual_seed(8);
  auto vit = models::vit(small_vit().num_heads(4));
  randomize_zeros(vit);
  vit->eval();
  const auto x = torch::randn({2, 3, 32, 32});
  Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
      vit, x, SparsifierOptions(50).include_linear(true).approximate(true));
  sparsifier.prune(50);
  Pruner(PrunerOptions().approximate(true)).prune_(vit, x);
  TempDir dir;
  save_state_dict(vit, dir.path / "pruned.pt");

  auto fresh = models::vit(small_vit().num_heads(4));  // the original widths: hidden 32, 4 heads
  fresh->eval();
  CHECK_THROWS_WITH(load_state_dict(fresh, dir.path / "pruned.pt", LoadOptions()), Catch::Contains("shape mismatch"));
  load_state_dict(fresh, dir.path / "pruned.pt", LoadOptions().resize(true));
  CHECK(count_parameters(fresh) == count_parameters(vit));
  const auto* attention = fresh->encoder->layers[1]->as<models::EncoderBlockImpl>()->self_attention.get();
  CHECK(attention->options.embed_dim() == 16);
  CHECK(attention->options.num_heads() == 2);
  CHECK(fresh->encoder->pos_embedding.sizes() == torch::IntArrayRef({1, 17, 16}));
  CHECK(fresh->encoder->ln->options.normalized_shape() == std::vector<std::int64_t>{16});
  torch::NoGradGuard no_grad;
  CHECK(torch::equal(fresh->forward(x), vit->forward(x)));
}

TEST_CASE("ViT: naming a layer of the hidden size without approximate is a clear error, the model unchanged",
          "[zoo][vit][sparsifier][errors]") {
  torch::manual_seed(6);
  auto vit = models::vit(small_vit());
  vit->eval();
  const auto x = torch::randn({1, 3, 32, 32});
  const auto before = snapshot(*vit);
  using Filter = Sparsifier<granularity::Filter, method::Local, criteria::L1>;
  for (const auto* layer : {"conv_proj", "encoder.layers.encoder_layer_0.self_attention"}) {
    INFO(layer);
    CHECK_THROWS_WITH(Filter(vit, x, SparsifierOptions(50).include({layer})),
                      Catch::Contains("include") && Catch::Contains(layer) && Catch::Contains("approximate(true)"));
  }
  CHECK(unchanged(before, *vit));
  // An MLP's first Linear has exact units: accepted.
  CHECK_NOTHROW(Filter(vit, x, SparsifierOptions(50).include({"encoder.layers.encoder_layer_0.mlp.0"})));
}

TEST_CASE("ViT equals torchvision's: names, shapes, state_dicts and logits (Python oracle)", "[zoo][vit][python]") {
  if (std::string(FASTERAI_PYTHON).empty()) {
    FASTERAI_SKIP("python3 with torchvision not found");
  }
  TempDir dir;
  torch::manual_seed(4);
  auto ours = models::vit(small_vit());
  randomize_zeros(ours);
  ours->eval();
  save_state_dict(*ours, dir.path / "ours.pt");
  run_python(dir, R"(
import sys, torch
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer
d = sys.argv[1]
with open(d + '/shapes.txt', 'w') as out:
    net = vit_b_16(num_classes=1000)
    for k, v in net.named_parameters(): print('p', k, *v.shape, file=out)
    for k, v in net.named_buffers(): print('b', k, *v.shape, file=out)
torch.manual_seed(0)
net = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                        num_classes=10).eval()
with torch.no_grad():
    torch.nn.init.normal_(net.class_token, std=0.5)
    torch.nn.init.normal_(net.heads.head.weight, std=0.5)
    x = torch.randn(2, 3, 32, 32)
    y = net(x)
    torch.save(net.state_dict(), d + '/python.pt')
    net.load_state_dict(torch.load(d + '/ours.pt'), strict=True)
    torch.save({'input': x, 'logits': y, 'ours_logits': net(x)}, d + '/io.pt')
)");
  CHECK(parameter_lines(*models::vit_b_16(1000)) == read_lines(dir.path / "shapes.txt"));

  check_logits_both_ways(dir, [] { return models::vit(small_vit()); }, ours);
}
