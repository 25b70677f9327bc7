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
#include <set>
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
#include <fasterai/layers/registry.hpp>
#include <fasterai/transform/layer_resize.hpp>

namespace fasterai {

// What the Pruner did to one layer that makes channels (Conv, Linear, Embedding).
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
  std::vector<PrunedLayer> layers;     // every layer making channels, in forward order
  std::vector<GraphBarrier> barriers;  // where channels were kept because the graph stops
  // Norms over all channels (LayerNorm) that lost channels: their statistics changed, so the
  // model is approximately the one before (PrunerOptions::approximate). Empty when exact.
  std::vector<std::string> approximate;
  std::int64_t channels_removed() const {
    std::int64_t n = 0;
    for (const auto& l : layers) n += l.removed();
    return n;
  }
  // False when the model had no zero channel to remove: it is then as it was.
  bool changed() const { return channels_removed() > 0; }
  bool exact() const { return approximate.empty(); }
};

struct PrunerOptions {
  // Also remove zero channels that a LayerNorm normalises over (a transformer's hidden size,
  // ConvNeXt's channels): its mean and variance are then taken over fewer channels, so the
  // outputs change a little; fine-tune afterwards. Off: such channels are kept (exact).
  TORCH_ARG(bool, approximate) = false;
};

class Pruner {
 public:
  explicit Pruner(PrunerOptions options = {}) : options_(std::move(options)) {}

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
  const PrunerOptions& options() const { return options_; }

 private:
  PrunerOptions options_;
  PruneReport report_;
};

namespace detail {

inline constexpr const char* pruner_where = "fasterai::Pruner::prune_";

// One module's new shape, computed before anything changes.
struct ModuleCut {
  std::shared_ptr<torch::nn::Module> module;  // null for a free parameter
  const LayerRule* rule = nullptr;
  std::int64_t out = 0, in = 0, groups = 1;   // the new widths
  std::vector<std::pair<torch::Tensor, torch::Tensor>> tensors;  // each tensor and its new value
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

inline PrunePlan plan_pruning(torch::nn::Module& root, const Graph& g, bool approximate) {
  torch::NoGradGuard no_grad;
  const ModuleMap modules = module_map(root);
  for (const auto& n : g.nodes())
    if ((n.kind == OpKind::Layer || n.kind == OpKind::Norm || n.kind == OpKind::Parameter))
      check_argument(modules.count(n.module) != 0 && (n.kind == OpKind::Parameter || rule_of(*modules.at(n.module)) == n.rule),
                     pruner_where, "graph", n.module,
                     "a graph traced from this model (it names a module the model does not have)");

  const auto zero = zero_channels(g, zero_outputs_of(modules));
  const std::vector<char> removable = removable_units(g, zero, approximate);
  const std::vector<char> removed = units_to_remove(g, removable);

  PrunePlan plan;
  plan.report.barriers = g.barriers();
  std::set<std::string> planned;
  for (const auto& n : g.nodes()) {
    if (n.kind == OpKind::Parameter) {
      if (!planned.insert(parameter_name(n)).second) continue;
      const auto keep = kept_indices(g.units_of(n.output), removed);
      if (keep.numel() == g.values()[n.output].channels()) continue;
      const torch::Tensor p = graph_parameter(modules, n);
      ModuleCut cut;
      cut.tensors.emplace_back(p, select(p, n.parameter_dim, keep));
      plan.cuts.push_back(std::move(cut));
      continue;
    }
    if ((n.kind != OpKind::Layer && n.kind != OpKind::Norm) || !planned.insert(n.module).second) continue;
    const LayerRule& rule = *n.rule;
    const auto out_units = g.units_of(n.output);
    const auto in_units = n.inputs.empty() ? std::vector<std::int64_t>{} : g.units_of(n.inputs.front());
    ModuleCut cut;
    cut.module = modules.at(n.module);
    cut.rule = n.rule;
    const torch::Tensor keep_out = kept_indices(out_units, removed);
    const torch::Tensor keep_in = kept_indices(in_units, removed);
    const auto out_before = static_cast<std::int64_t>(out_units.size());
    const auto in_before = static_cast<std::int64_t>(in_units.size());
    const torch::Tensor weight = layer_tensor(*cut.module, rule.tensors.front().name);
    if (n.kind == OpKind::Layer) {
      PrunedLayer entry{n.module, out_before, keep_out.numel(), 0};
      // Zero filters that stay for a reason other than keeping one unit per group.
      const torch::Tensor zero_rows = zero_slices(weight, rule.tensors.front().out_dim).to(torch::kCPU).contiguous();
      const bool* z = zero_rows.data_ptr<bool>();
      for (std::size_t o = 0; o < out_units.size(); ++o)
        if (z[o] && !removable[out_units[o]]) ++entry.constant_channels;
      plan.report.layers.push_back(entry);
    }
    const bool out_changes = keep_out.numel() != out_before;
    const bool in_changes = keep_in.numel() != in_before;
    if (!out_changes && !in_changes) continue;
    if (n.across_channels) plan.report.approximate.push_back(n.module);
    cut.out = keep_out.numel();
    cut.in = n.kind == OpKind::Norm ? cut.out : keep_in.numel();
    cut.groups = groups_of(rule, *cut.module);
    if (cut.groups > 1) {
      // Whole groups go (the graph made each group one unit).
      const auto out_per = out_before / cut.groups;
      const auto removed_groups = (out_before - cut.out) / out_per;
      const bool whole = (out_before - cut.out) % out_per == 0 &&
                         (n.kind == OpKind::Norm || (in_before - cut.in) == removed_groups * (in_before / cut.groups));
      check_argument(whole, pruner_where, concat("groups of ", rule.kind, " '", n.module, "'"), cut.groups,
                     "whole groups removed (the graph is inconsistent with the model)");
      cut.groups -= removed_groups;
    }
    for (const auto& t : rule.tensors) {
      const torch::Tensor x = layer_tensor(*cut.module, t.name);
      if (!x.defined()) continue;
      torch::Tensor y = x;
      if (t.out_dim >= 0 && out_changes) y = select(y, t.out_dim, keep_out);
      // A grouped layer's input dimension counts the channels of one group: it stays.
      if (t.in_dim >= 0 && in_changes && groups_of(rule, *cut.module) == 1) y = select(y, t.in_dim, keep_in);
      if (!y.is_same(x)) cut.tensors.emplace_back(x, y);
    }
    plan.cuts.push_back(std::move(cut));
  }
  return plan;
}

// Nothing here can fail: every tensor was computed by the plan.
inline void apply_cut(ModuleCut& cut) {
  set_tensor_data(cut.tensors);
  if (cut.module) cut.rule->set_widths(*cut.module, cut.out, cut.in, cut.groups);
}

}  // namespace detail

template <module Model>
PruneReport Pruner::prune_(Model& model, const Graph& graph) {
  detail::PrunePlan plan = detail::plan_pruning(detail::impl(model), graph, options_.approximate());
  for (auto& cut : plan.cuts) detail::apply_cut(cut);
  report_ = std::move(plan.report);
  return report_;
}

}  // namespace fasterai
