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

// Zeroes one unit of the graph everywhere it is made: the rows of the layers that produce it,
// the γ and β of the norms on its way, the slices of the free parameters added to it.
void zero_unit(torch::nn::Module& model, const Graph& g, std::int64_t unit) {
  torch::NoGradGuard no_grad;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : model.named_modules("", true)) modules[item.key()] = item.value();
  for (const auto& n : g.nodes()) {
    const auto units = g.units_of(n.output);
    for (std::size_t c = 0; c < units.size(); ++c) {
      if (units[c] != unit) continue;
      const auto channel = static_cast<std::int64_t>(c);
      if (n.kind == OpKind::Parameter) {
        fasterai::detail::layer_tensor(*modules.at(n.module), n.parameter).select(n.parameter_dim, channel).zero_();
      } else if (n.kind == OpKind::Layer || n.kind == OpKind::Norm) {
        for (const auto& t : n.rule->tensors)
          if (auto x = fasterai::detail::layer_tensor(*modules.at(n.module), t.name); x.defined() && t.out_dim >= 0 && t.decides_zero)
            x.select(t.out_dim, channel).zero_();
      }
    }
  }
}

bool has_mha(const RandomTransformer& net) {
  for (const auto& b : net->blocks)
    if (b->self_attention) return true;
  return false;
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
    const auto x = net->example(3);
    torch::Tensor before;
    {
      torch::NoGradGuard no_grad;
      before = net->forward(x);
    }
    const PruneReport report = Pruner().prune_(net, x);
    CHECK(report.exact());
    for (const auto& [fc1, width] : mlps) {
      CHECK(fc1->weight.size(0) == width);
      CHECK(fc1->options.out_features() == width);
    }
    for (const auto& [gn, channels] : group_norms) {
      CHECK(gn->options.num_channels() == channels);
      CHECK(gn->options.num_groups() == 1);
      CHECK(gn->weight.size(0) == channels);
    }
    {
      torch::NoGradGuard no_grad;
      CHECK(relative_error(net->forward(x), before) <= 1e-5);
    }
    // Forward and backward after pruning; pruning again finds nothing.
    net->zero_grad();
    net->forward(x).sum().backward();
    for (const auto& p : net->parameters())
      if (p.grad().defined()) CHECK(p.grad().sizes() == p.sizes());
    CHECK_FALSE(Pruner().prune_(net, x).changed());
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

TEST_CASE("transformers: MultiheadAttention is a barrier named in the report, its MLPs still pruned",
          "[pruner][graph][transformers]") {
  torch::manual_seed(5);
  EncoderBlock block(8, 2, 16, /*pre=*/true, /*attention_kind=*/2, /*gelu=*/true);
  block->eval();
  std::mt19937_64 rng(5);
  zero_hidden_units(block->mlp->fc1, 3, rng);
  const auto x = torch::randn({2, 4, 8});
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    before = block->forward(x);
  }
  const auto report = Pruner().prune_(block, x);
  CHECK(block->mlp->fc1->weight.size(0) == 13);
  CHECK(block->mlp->fc2->weight.size(1) == 13);
  // The attention's projection has no rule: a barrier, whose node belongs to the attention.
  const Graph g = trace(block, x);
  const auto in_proj = g.nodes_of("self_attention");
  REQUIRE_FALSE(in_proj.empty());
  CHECK(g.nodes()[in_proj.front()].kind == OpKind::Barrier);
  CHECK(block->self_attention->in_proj_weight.sizes() == torch::IntArrayRef({24, 8}));
  CHECK(report.exact());
  torch::NoGradGuard no_grad;
  CHECK(relative_error(block->forward(x), before) <= 1e-5);
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
