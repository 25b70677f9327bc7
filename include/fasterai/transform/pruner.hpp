#pragma once
// Pruner: physically removes the channels that filter sparsification zeroed, so the network
// really gets smaller and faster (zeros alone save nothing: dense kernels multiply them too).
//
//   fasterai::Pruner().prune_(model, example_input);  // any module, in place
//   auto pruned = fasterai::Pruner().prune(sequential); // a Sequential: a pruned copy
//
// Channels are removed unit by unit over the model's channel-dependency graph (graph/graph.hpp):
// a unit is one channel of every layer it couples — the output channel of a Conv2d or Linear
// (filter and bias), the same channel of every BatchNorm on its way (γ, β, running statistics),
// of every tensor added to it in a residual stream, its place in a concatenation, the input
// channel (or the block of features after a Flatten) of every layer that reads it, and a whole
// group of a grouped or depthwise convolution (whose `groups` shrinks with it).
//
// Removal is exact: outputs are unchanged in train and eval mode. A unit is removed only when
// every layer that mixes it into other channels (a Conv2d with groups = 1, a Linear) reads exact
// zeros from it, whatever the input: its filters and biases are zero AND every BatchNorm on its
// way has γ = β = 0 (a BatchNorm turns a zero input into β − γ·μ/√(σ² + ε), a constant the next
// layer still sees), and nothing between turns a zero into something else (a sigmoid, adding
// a constant). Zero filters kept for that reason are counted in the report
// (`constant_channels`). Units held by the model's input or output or by a barrier (an
// operation the graph does not understand) are never removed, and every coupled group keeps at
// least one unit, so every layer keeps at least one channel.
//
// `prune_` changes the model in place with the strong guarantee: it plans and checks
// everything first, then shrinks each parameter and buffer with `set_data` (the same tensor
// objects, so the user's module holders stay valid) and updates each module's options
// (in_channels, out_channels, groups, num_features, in_features, out_features) so that forward,
// clone() and printing agree. Gradients of shrunk parameters are reset. An optimizer keeps
// state of the old shapes: build it again after pruning (the Learner does).

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/transform/layer_resize.hpp>

namespace fasterai {

// What the Pruner did to one Conv2d or Linear layer.
struct PrunedLayer {
  std::string name;                     // e.g. "features.0"
  std::int64_t channels_before = 0;     // output channels (features)
  std::int64_t channels_after = 0;
  // Channels with an all-zero filter kept because they do not reach their readers as zeros (a
  // nonzero bias, a BatchNorm after them with γ or β ≠ 0, a coupled layer that is not zero):
  // removing them would change the outputs.
  std::int64_t constant_channels = 0;
  std::int64_t removed() const { return channels_before - channels_after; }
};

struct PruneReport {
  std::vector<PrunedLayer> layers;     // every Conv2d and Linear of the graph, in forward order
  std::vector<GraphBarrier> barriers;  // where channels were kept because the graph stops
  std::int64_t channels_removed() const {
    std::int64_t n = 0;
    for (const auto& l : layers) n += l.removed();
    return n;
  }
  // False when the model had no zero channel to remove: it is then as it was.
  bool changed() const { return channels_removed() > 0; }
};

class Pruner {
 public:
  // Removes every removable zero unit of `model` in place (see the banner), tracing the model
  // on `example` (a batch of inputs of the right shape; its values do not matter).
  template <traceable Model>
  PruneReport prune_(Model& model, const torch::Tensor& example) {
    return prune_(model, trace(model, example));
  }
  // A Sequential in place, over its static graph.
  template <sequential_like Model>
  PruneReport prune_(Model& model) {
    return prune_(model, graph_of(model));
  }
  // In place, over a graph already built for this model.
  template <module Model>
  PruneReport prune_(Model& model, const Graph& graph);

  // A pruned copy of a Sequential, named like it; `model` is left as it was.
  template <sequential_like Model>
  torch::nn::Sequential prune(const Model& model) {
    auto copy = clone_model(model);
    prune_(copy);
    return copy;
  }

  // What the last call did.
  const PruneReport& report() const { return report_; }

 private:
  PruneReport report_;
};

namespace detail {

inline constexpr const char* pruner_where = "fasterai::Pruner::prune_";

// Which output channels of a Conv2d, Linear or BatchNorm node are exact zeros with the model's
// current parameters.
inline ZeroOutputs zero_outputs_of(const std::map<std::string, std::shared_ptr<torch::nn::Module>>& modules) {
  return [&modules](const GraphNode& n) {
    torch::NoGradGuard no_grad;
    auto to_vector = [](torch::Tensor z) {
      z = z.to(torch::kCPU).contiguous();
      return std::vector<char>(z.data_ptr<bool>(), z.data_ptr<bool>() + z.numel());
    };
    auto rows_zero = [&](const torch::Tensor& w, const torch::Tensor& b) {
      torch::Tensor z = w.reshape({w.size(0), -1}).eq(0).all(1);
      if (b.defined()) z &= b.eq(0);
      return to_vector(z);
    };
    auto bn_zero = [&](const auto& bn) {
      // Without affine parameters a BatchNorm emits −μ/√(σ² + ε) for a zero input.
      if (!bn.options.affine()) return std::vector<char>(static_cast<std::size_t>(bn.options.num_features()), 0);
      return to_vector(bn.weight.eq(0) & bn.bias.eq(0));
    };
    const auto& m = *modules.at(n.module);
    if (const auto* conv = m.as<torch::nn::Conv2dImpl>()) return rows_zero(conv->weight, conv->bias);
    if (const auto* linear = m.as<torch::nn::LinearImpl>()) return rows_zero(linear->weight, linear->bias);
    if (const auto* bn2 = m.as<torch::nn::BatchNorm2dImpl>()) return bn_zero(*bn2);
    return bn_zero(*m.as<torch::nn::BatchNorm1dImpl>());
  };
}

// One module's new shape: the output and input indices it keeps (undefined: all).
struct ModuleCut {
  std::shared_ptr<torch::nn::Module> module;
  torch::Tensor keep_out, keep_in;
  std::int64_t groups = 1;
  // The new tensors, computed before anything changes.
  std::vector<std::pair<torch::Tensor*, torch::Tensor>> tensors;
};

inline torch::Tensor kept_indices(const std::vector<std::int64_t>& units, const std::vector<char>& removed) {
  std::vector<std::int64_t> keep;
  for (std::size_t i = 0; i < units.size(); ++i)
    if (!removed[units[i]]) keep.push_back(static_cast<std::int64_t>(i));
  return torch::tensor(keep, torch::kLong);
}

inline torch::Tensor select(const torch::Tensor& t, std::int64_t dim, const torch::Tensor& keep) {
  return t.index_select(dim, keep.to(t.device()));
}

struct PrunePlan {
  std::vector<ModuleCut> cuts;
  PruneReport report;
};

inline PrunePlan plan_pruning(torch::nn::Module& root, const Graph& g) {
  torch::NoGradGuard no_grad;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) modules[item.key()] = item.value();
  for (const auto& n : g.nodes())
    if (!n.module.empty() && n.kind != OpKind::Barrier)
      check_argument(modules.count(n.module) != 0, pruner_where, "graph", n.module,
                     "a graph traced from this model (it names a module the model does not have)");

  const auto zero = zero_channels(g, zero_outputs_of(modules));
  const std::vector<char> removable = removable_units(g, zero);
  std::vector<char> removed = removable;
  for (const auto& group : g.groups()) {
    const bool all = std::all_of(group.units.begin(), group.units.end(), [&](auto u) { return removed[u]; });
    if (all && !group.units.empty()) removed[group.units.front()] = 0;  // keep one
  }

  PrunePlan plan;
  plan.report.barriers = g.barriers();
  std::map<std::string, bool> planned;
  for (const auto& n : g.nodes()) {
    if (n.module.empty() || n.kind == OpKind::Barrier || planned[n.module]) continue;
    planned[n.module] = true;
    const auto out_units = g.units_of(n.output);
    const auto in_units = g.units_of(n.inputs.front());
    ModuleCut cut;
    cut.module = modules.at(n.module);
    cut.keep_out = kept_indices(out_units, removed);
    cut.keep_in = kept_indices(in_units, removed);
    const auto out_before = static_cast<std::int64_t>(out_units.size());
    const auto in_before = static_cast<std::int64_t>(in_units.size());
    if (n.kind == OpKind::Conv2d || n.kind == OpKind::Linear) {
      PrunedLayer entry{n.module, out_before, cut.keep_out.numel(), 0};
      // Zero filters that stay for a reason other than keeping one unit per group.
      const auto& w = n.kind == OpKind::Conv2d ? cut.module->as<torch::nn::Conv2dImpl>()->weight
                                               : cut.module->as<torch::nn::LinearImpl>()->weight;
      const torch::Tensor zero_rows = w.reshape({w.size(0), -1}).eq(0).all(1).to(torch::kCPU);
      const bool* z = zero_rows.data_ptr<bool>();
      for (std::size_t o = 0; o < out_units.size(); ++o)
        if (z[o] && !removable[out_units[o]]) ++entry.constant_channels;
      plan.report.layers.push_back(entry);
    }
    const bool out_changes = cut.keep_out.numel() != out_before;
    const bool in_changes = cut.keep_in.numel() != in_before;
    if (!out_changes && !in_changes) continue;
    if (auto* conv = cut.module->as<torch::nn::Conv2dImpl>()) {
      torch::Tensor w = select(conv->weight, 0, cut.keep_out);
      cut.groups = conv->options.groups();
      if (cut.groups == 1) {
        w = select(w, 1, cut.keep_in);
      } else {
        // Whole groups go (the graph made each group one unit).
        const auto out_per = out_before / cut.groups;
        const auto removed_groups = (out_before - cut.keep_out.numel()) / out_per;
        check_argument((out_before - cut.keep_out.numel()) % out_per == 0 &&
                           (in_before - cut.keep_in.numel()) == removed_groups * (in_before / cut.groups),
                       pruner_where, "groups of Conv2d '" + n.module + "'", cut.groups,
                       "whole groups removed (the graph is inconsistent with the model)");
        cut.groups -= removed_groups;
      }
      cut.tensors.emplace_back(&conv->weight, w);
      if (conv->bias.defined()) cut.tensors.emplace_back(&conv->bias, select(conv->bias, 0, cut.keep_out));
    } else if (auto* linear = cut.module->as<torch::nn::LinearImpl>()) {
      cut.tensors.emplace_back(&linear->weight, select(select(linear->weight, 0, cut.keep_out), 1, cut.keep_in));
      if (linear->bias.defined()) cut.tensors.emplace_back(&linear->bias, select(linear->bias, 0, cut.keep_out));
    } else {
      auto batch_norm = [&](auto& bn) {
        for (torch::Tensor* t : {&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var})
          if (t->defined()) cut.tensors.emplace_back(t, select(*t, 0, cut.keep_out));
      };
      if (auto* bn2 = cut.module->as<torch::nn::BatchNorm2dImpl>())
        batch_norm(*bn2);
      else
        batch_norm(*cut.module->as<torch::nn::BatchNorm1dImpl>());
    }
    plan.cuts.push_back(std::move(cut));
  }
  return plan;
}

// Nothing here can fail: every tensor was computed by the plan.
inline void apply_cut(ModuleCut& cut) {
  set_tensor_data(cut.tensors);
  set_layer_widths(*cut.module, cut.keep_out.numel(), cut.keep_in.numel(), cut.groups);
}

}  // namespace detail

template <module Model>
PruneReport Pruner::prune_(Model& model, const Graph& graph) {
  detail::PrunePlan plan = detail::plan_pruning(detail::impl(model), graph);
  for (auto& cut : plan.cuts) detail::apply_cut(cut);
  report_ = std::move(plan.report);
  return report_;
}

}  // namespace fasterai
