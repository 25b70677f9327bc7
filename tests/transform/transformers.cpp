// Transformers and modern CNNs through the traced graph: MLP hidden units, GroupNorm groups and
// ConvNeXt's MLPs removed exactly over random architectures; the hidden size that LayerNorms
// normalise over removed only when asked (approximate), and reported.

#include "catch.hpp"

#include <cstdint>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/graph/trace.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

#include "random_transformers.hpp"
#include "transform_testing.hpp"

using namespace fasterai;
using namespace fasterai::testing;

namespace {

// Zeroes `count` random hidden units of an MLP (fc1's rows and biases): exact zeros after
// GELU/ReLU, read by fc2.
std::int64_t zero_hidden_units(tnn::Linear& fc1, std::int64_t count, std::mt19937_64& rng) {
  torch::NoGradGuard no_grad;
  const auto n = fc1->weight.size(0);
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), rng);
  count = std::min(count, n - 1);
  for (std::int64_t i = 0; i < count; ++i) {
    fc1->weight[order[static_cast<std::size_t>(i)]].zero_();
    fc1->bias[order[static_cast<std::size_t>(i)]].zero_();
  }
  return count;
}

bool has_mha(const RandomTransformer& net) {
  for (const auto& b : net->blocks)
    if (b->self_attention) return true;
  return false;
}

// Prunes `net` exactly on `x` and checks what every exact prune leaves: the report exact, the
// test's own widths (`widths()`), the outputs as they were (relative 1e-5), forward and
// backward working on the new shapes, and a second prune finding nothing.
template <class Widths>
void check_pruned_exactly(RandomTransformer& net, const torch::Tensor& x, Widths&& widths) {
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = net->forward(x);
  }
  CHECK(Pruner().prune_(net, x).exact());
  widths();
  {
    torch::NoGradGuard no_grad;
    CHECK(relative_error(net->forward(x), before) <= 1e-5);
  }
  net->zero_grad();
  net->forward(x).sum().backward();
  for (const auto& p : net->parameters())
    if (p.grad().defined()) CHECK(p.grad().sizes() == p.sizes());
  CHECK_FALSE(Pruner().prune_(net, x).changed());
}

}  // namespace

TEST_CASE("transformers: zero MLP units and GroupNorm groups are removed exactly over random architectures",
          "[pruner][graph][transformers]") {
  constexpr int cases = 60;
  int vision = 0, text = 0, signal = 0, convnext = 0, mha = 0;
  for (int k = 0; k < cases; ++k) {
    const std::uint64_t seed = 9100 + std::uint64_t(k);
    torch::manual_seed(seed);
    RandomTransformer net(seed);
    net->eval();
    INFO("case " << k << ": " << net->description);
    std::mt19937_64 rng(seed);
    vision += net->kind == RandomTransformerImpl::Vision;
    text += net->kind == RandomTransformerImpl::Text;
    signal += net->kind == RandomTransformerImpl::Signal;
    convnext += net->kind == RandomTransformerImpl::ConvNeXt;
    mha += has_mha(net);

    // What is zeroed, and the widths pruning must leave.
    std::vector<std::pair<tnn::Linear, std::int64_t>> mlps;  // fc1 and its expected width
    std::vector<std::pair<tnn::GroupNorm, std::int64_t>> group_norms;
    for (auto& b : net->blocks) {
      const auto removed = zero_hidden_units(b->mlp->fc1, 1 + static_cast<std::int64_t>(rng() % 4), rng);
      mlps.emplace_back(b->mlp->fc1, b->mlp->fc1->weight.size(0) - removed);
    }
    for (auto& s : net->stages) {
      if (auto* block = s->as<ConvNeXtBlockImpl>()) {
        const auto removed = zero_hidden_units(block->pwconv1, 1 + static_cast<std::int64_t>(rng() % 4), rng);
        mlps.emplace_back(block->pwconv1, block->pwconv1->weight.size(0) - removed);
      } else if (auto* stage = s->as<GroupNormStageImpl>(); stage->gn1->options.num_groups() > 1) {
        // The first of two groups: conv1's filters and gn1's γ, β.
        torch::NoGradGuard no_grad;
        const auto half = stage->conv1->weight.size(0) / 2;
        stage->conv1->weight.narrow(0, 0, half).zero_();
        stage->gn1->weight.narrow(0, 0, half).zero_();
        stage->gn1->bias.narrow(0, 0, half).zero_();
        group_norms.emplace_back(stage->gn1, half);
      }
    }
    check_pruned_exactly(net, net->example(3), [&] {
      for (const auto& [fc1, width] : mlps) {
        CHECK(fc1->weight.size(0) == width);
        CHECK(fc1->options.out_features() == width);
      }
      for (const auto& [gn, channels] : group_norms) {
        CHECK(gn->options.num_channels() == channels);
        CHECK(gn->options.num_groups() == 1);
        CHECK(gn->weight.size(0) == channels);
      }
    });
  }
  // The draw covers every family.
  CHECK(vision >= 5);
  CHECK(text >= 5);
  CHECK(signal >= 5);
  CHECK(convnext >= 5);
  CHECK(mha >= 5);
}

TEST_CASE("transformers: the hidden size goes only when asked, and is reported approximate",
          "[pruner][graph][transformers]") {
  int tried = 0;
  for (int k = 0; k < 60 && tried < 12; ++k) {
    const std::uint64_t seed = 9300 + std::uint64_t(k);
    torch::manual_seed(seed);
    RandomTransformer net(seed);
    if (net->kind == RandomTransformerImpl::ConvNeXt || has_mha(net)) continue;
    ++tried;
    net->eval();
    INFO("case " << k << ": " << net->description);
    const auto x = net->example(2);
    const Graph g = trace(net, x);
    // The residual stream: the units the final LayerNorm normalises.
    const auto stream = g.units_of(g.nodes()[g.nodes_of("ln").front()].output);
    REQUIRE(g.units()[stream.front()].approximate);
    REQUIRE_FALSE(g.units()[stream.front()].fixed);
    zero_unit(*net, g, stream.front());
    const auto d = net->ln->weight.size(0);
    const auto exact = Pruner().prune_(net, x);
    CHECK(exact.exact());
    CHECK(net->ln->weight.size(0) == d);  // kept: removing it would change every LayerNorm

    const auto approximate = Pruner(PrunerOptions().approximate(true)).prune_(net, x);
    CHECK_FALSE(approximate.exact());
    CHECK(std::find(approximate.approximate.begin(), approximate.approximate.end(), "ln") !=
          approximate.approximate.end());
    CHECK(net->ln->weight.size(0) == d - 1);
    CHECK(net->ln->options.normalized_shape() == std::vector<std::int64_t>{d - 1});
    CHECK(net->head->weight.size(1) == d - 1);
    if (net->pos_embedding.defined()) CHECK(net->pos_embedding.size(2) == d - 1);
    if (net->class_token_used) CHECK(net->class_token.size(2) == d - 1);
    if (net->embedding) CHECK(net->embedding->options.embedding_dim() == d - 1);
    torch::NoGradGuard no_grad;
    CHECK(torch::isfinite(net->forward(x)).all().item<bool>());
  }
  CHECK(tried == 12);
}

namespace {

// Zeroes the value rows (and biases) of head `h` of an attention written with Linears: that
// head then adds exact zeros into the output projection, whatever its queries and keys.
void zero_value_head(LinearAttentionImpl& a, std::int64_t h) {
  torch::NoGradGuard no_grad;
  const auto d = a.out->weight.size(1);
  auto& v = a.qkv ? a.qkv : a.v;
  const auto offset = a.qkv ? 2 * d : 0;
  v->weight.narrow(0, offset + h * a.head_dim, a.head_dim).zero_();
  v->bias.narrow(0, offset + h * a.head_dim, a.head_dim).zero_();
}

}  // namespace

TEST_CASE("transformers: whole heads of attention written with Linears are removed exactly",
          "[pruner][graph][transformers]") {
  int tried = 0, fused = 0;
  for (int k = 0; k < 120 && tried < 25; ++k) {
    const std::uint64_t seed = 9700 + std::uint64_t(k);
    torch::manual_seed(seed);
    RandomTransformer net(seed);
    std::vector<std::pair<LinearAttentionImpl*, std::int64_t>> attentions;  // and heads expected
    std::mt19937_64 rng(seed);
    for (auto& b : net->blocks)
      if (b->attention && b->attention->heads() >= 2) {
        // One head of each such block, or all but one.
        const auto heads = b->attention->heads();
        const auto zeroed = rng() % 2 ? heads - 1 : std::int64_t{1};
        for (std::int64_t h = 0; h < zeroed; ++h) zero_value_head(*b->attention, (h + 1) % heads);
        attentions.emplace_back(b->attention.get(), heads - zeroed);
        fused += b->attention->qkv ? 1 : 0;
      }
    if (attentions.empty()) continue;
    ++tried;
    net->eval();
    INFO("case " << k << ": " << net->description);
    check_pruned_exactly(net, net->example(3), [&] {
      for (const auto& [a, heads] : attentions) {
        CHECK(a->heads() == heads);
        const auto inner = heads * a->head_dim;
        CHECK(a->out->options.in_features() == inner);
        if (a->qkv) {
          CHECK(a->qkv->weight.size(0) == 3 * inner);
        } else {
          CHECK(a->q->weight.size(0) == inner);
          CHECK(a->k->weight.size(0) == inner);
          CHECK(a->v->options.out_features() == inner);
        }
      }
    });
  }
  CHECK(tried == 25);
  CHECK(fused >= 5);
}

TEST_CASE("transformers: a head whose queries are zero but values are not is kept",
          "[pruner][graph][transformers]") {
  torch::manual_seed(11);
  LinearAttention attention(8, 2, /*fused=*/false);
  attention->eval();
  {
    torch::NoGradGuard no_grad;  // q·kᵀ = 0 gives uniform attention over values that are not zero
    attention->q->weight.narrow(0, 4, 4).zero_();
    attention->q->bias.narrow(0, 4, 4).zero_();
  }
  const auto x = torch::randn({2, 5, 8});
  CHECK_FALSE(Pruner().prune_(attention, x).changed());
  CHECK(attention->heads() == 2);
}

namespace {

// A projection into the stream, one encoder block with LibTorch's MultiheadAttention, a head:
// the stream is made by layers (not the input) and read by one (not the output).
struct AttentionNetImpl : tnn::Module {
  tnn::Linear proj{nullptr}, head{nullptr};
  EncoderBlock block{nullptr};
  AttentionNetImpl() {
    proj = register_module("proj", tnn::Linear(6, 8));
    block = register_module("block", EncoderBlock(8, 2, 16, /*pre=*/true, /*attention_kind=*/2, /*gelu=*/true));
    head = register_module("head", tnn::Linear(8, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(block(proj(x))); }
};
TORCH_MODULE(AttentionNet);

}  // namespace

TEST_CASE("transformers: MultiheadAttention's heads go with the hidden size, only when asked",
          "[pruner][graph][transformers]") {
  torch::manual_seed(5);
  AttentionNet net;
  net->eval();
  std::mt19937_64 rng(5);
  zero_hidden_units(net->block->mlp->fc1, 3, rng);
  const auto x = torch::randn({2, 4, 6});
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = net->forward(x);
  }
  // Exact: the MLP units go; the attention's projection is a layer, its heads tied to the
  // stream, which stays.
  const auto report = Pruner().prune_(net, x);
  CHECK(report.exact());
  const auto& mha = net->block->self_attention;
  CHECK(net->block->mlp->fc1->weight.size(0) == 13);
  CHECK(net->block->mlp->fc2->weight.size(1) == 13);
  CHECK(mha->in_proj_weight.sizes() == torch::IntArrayRef({24, 8}));
  {
    torch::NoGradGuard no_grad;
    CHECK(relative_error(net->forward(x), before) <= 1e-5);
  }
  const Graph g = trace(net, x);
  const auto in_proj = g.nodes_of("block.self_attention");
  REQUIRE(in_proj.size() == 1);
  CHECK(g.nodes()[in_proj.front()].kind == OpKind::Layer);
  // The stream's units are the heads' blocks of 4 channels: zero the second one everywhere it
  // is made (proj's rows, the in_proj rows of that head, out_proj's and fc2's rows, the
  // LayerNorms' γ and β).
  const auto stream = g.units_of(g.nodes()[g.nodes_of("block.ln_2").front()].output);
  REQUIRE(stream.size() == 8);
  CHECK(std::set<std::int64_t>(stream.begin(), stream.end()).size() == 2);
  CHECK(g.units()[stream[4]].approximate);
  CHECK_FALSE(g.units()[stream[4]].fixed);
  zero_unit(*net, g, stream[4]);
  CHECK_FALSE(Pruner().prune_(net, x).changed());
  const auto approximate = Pruner(PrunerOptions().approximate(true)).prune_(net, x);
  CHECK_FALSE(approximate.exact());
  CHECK(mha->in_proj_weight.sizes() == torch::IntArrayRef({12, 4}));
  CHECK(mha->out_proj->weight.sizes() == torch::IntArrayRef({4, 4}));
  CHECK(mha->options.embed_dim() == 4);
  CHECK(mha->options.num_heads() == 1);
  CHECK(mha->head_dim == 4);
  CHECK(net->block->ln_1->weight.size(0) == 4);
  CHECK(net->head->weight.size(1) == 4);
  net->zero_grad();
  const auto y = net->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 4, 3}));
  CHECK(torch::isfinite(y).all().item<bool>());
  y.sum().backward();
}

TEST_CASE("transformers: the Sparsifier selects the hidden size only when asked, the Pruner then removes it",
          "[pruner][sparsifier][transformers]") {
  int tried = 0;
  for (int k = 0; k < 80 && tried < 10; ++k) {
    const std::uint64_t seed = 9500 + std::uint64_t(k);
    torch::manual_seed(seed);
    RandomTransformer probe(seed);
    // The stream's producers must all be layers the Sparsifier scores (a Conv2d patch or stem
    // convolution, Linears): not an Embedding or a Conv1d; and no MultiheadAttention (a barrier).
    const bool eligible = (probe->kind == RandomTransformerImpl::Vision || probe->kind == RandomTransformerImpl::ConvNeXt) &&
                          !has_mha(probe);
    if (!eligible) continue;
    ++tried;
    INFO("case " << k << ": " << probe->description);
    const auto x = probe->example(2);
    auto width = [](RandomTransformer& net) { return net->head->weight.size(1); };
    const auto d = width(probe);
    {
      INFO("exact");
      torch::manual_seed(seed);
      RandomTransformer net(seed);
      net->eval();
      Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(net, x,
                                                                           SparsifierOptions(50).include_linear(true));
      sparsifier.prune(50);
      CHECK(Pruner(PrunerOptions().approximate(true)).prune_(net, x).exact());
      CHECK(width(net) == d);
    }
    torch::manual_seed(seed);
    RandomTransformer net(seed);
    net->eval();
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        net, x, SparsifierOptions(50).include_linear(true).approximate(true));
    sparsifier.prune(50);
    // Zeroed in every producer, norm and free parameter: the model still runs on the zeros.
    {
      torch::NoGradGuard no_grad;
      CHECK(torch::isfinite(net->forward(x)).all().item<bool>());
    }
    CHECK(Pruner().prune_(net, x).exact());  // without the option the stream stays
    CHECK(width(net) == d);
    const auto report = Pruner(PrunerOptions().approximate(true)).prune_(net, x);
    CHECK_FALSE(report.exact());
    CHECK(width(net) == d - d / 2);
    if (net->class_token_used) CHECK(net->class_token.size(2) == d - d / 2);
    if (net->pos_embedding.defined()) CHECK(net->pos_embedding.size(2) == d - d / 2);
    for (auto& s : net->stages)
      if (auto* b = s->as<ConvNeXtBlockImpl>()) CHECK(b->gamma.size(0) == d - d / 2);
    net->zero_grad();
    const auto y = net->forward(x);
    CHECK(torch::isfinite(y).all().item<bool>());
    y.sum().backward();
  }
  CHECK(tried == 10);
}
