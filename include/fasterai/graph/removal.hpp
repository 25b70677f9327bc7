#pragma once
// When removing a unit of channels is exact: the rule the Pruner applies to the weights it finds
// and the Sparsifier to the weights it is about to zero, so that what one zeroes the other
// removes.
//
// Removing a unit changes nothing that remains when every layer that mixes it into other
// channels (a Conv2d with groups = 1, a Linear) reads exact zeros from it, whatever the input.
// Which channels are exact zeros follows from the layers that make them, value by value in
// execution order: a Conv2d/Linear output channel is zero when its filter and bias are, a
// norm's when γ = β = 0, a free parameter's where it is zero; zero-preserving operations pass zeros on; a sum is zero where all
// operands are, a product where one is.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/graph/graph.hpp>

namespace fasterai::detail {

// Which output channels of a Layer, Norm or Parameter node are exact zeros.
using ZeroOutputs = std::function<std::vector<char>(const GraphNode&)>;

// For each value of the graph, which channels are exact zeros.
inline std::vector<std::vector<char>> zero_channels(const Graph& g, const ZeroOutputs& zero_outputs) {
  std::vector<std::vector<char>> zero(g.values().size());
  for (const auto& n : g.nodes()) {
    auto& out = zero[n.output];
    const auto channels = static_cast<std::size_t>(g.values()[n.output].channels());
    out.assign(channels, 0);
    switch (n.kind) {
      case OpKind::Layer:
      case OpKind::Norm:
      case OpKind::Parameter:
        out = zero_outputs(n);
        break;
      case OpKind::PerChannel:
        if (n.zero_preserving) out = zero[n.inputs.front()];
        break;
      case OpKind::Add:
      case OpKind::Mul: {
        const bool add = n.kind == OpKind::Add;
        if (add && n.constant_operand) break;  // x + c is not zero where x is
        std::fill(out.begin(), out.end(), add ? 1 : 0);
        for (auto o : n.inputs) {
          if (zero[o].size() != channels) continue;  // broadcast over channels
          for (std::size_t c = 0; c < channels; ++c)
            out[c] = add ? (out[c] && zero[o][c]) : (out[c] || zero[o][c]);
        }
        break;
      }
      case OpKind::Concat: {
        std::size_t k = 0;
        for (auto o : n.inputs)
          for (char z : zero[o]) out[k++] = z;
        break;
      }
      case OpKind::Split: {
        const auto& in = zero[n.inputs.front()];
        for (std::size_t c = 0; c < channels; ++c) out[c] = in[static_cast<std::size_t>(n.offset) + c];
        break;
      }
      case OpKind::Heads: {  // a head is zero when all its channels are
        const auto& in = zero[n.inputs.front()];
        const std::size_t per = channels ? in.size() / channels : 1;
        for (std::size_t h = 0; h < channels; ++h)
          out[h] = std::all_of(in.begin() + h * per, in.begin() + (h + 1) * per, [](char z) { return z != 0; });
        break;
      }
      case OpKind::Flatten: {
        const auto& in = zero[n.inputs.front()];
        const std::size_t block = in.empty() ? 1 : channels / in.size();
        for (std::size_t c = 0; c < channels; ++c) out[c] = in[c / block];
        break;
      }
      case OpKind::Input:
      case OpKind::Barrier:
        break;
    }
  }
  return zero;
}

// Units whose removal is exact given which channels are zeros: nothing holds them, and every
// layer that mixes them reads zeros. With `approximate`, units a LayerNorm normalises over count
// too (its statistics then change: fine-tune afterwards).
inline std::vector<char> removable_units(const Graph& g, const std::vector<std::vector<char>>& zero,
                                         bool approximate = false) {
  std::vector<char> removable(g.units().size());
  for (std::size_t u = 0; u < g.units().size(); ++u)
    removable[u] = !g.units()[u].fixed && (approximate || !g.units()[u].approximate);
  for (const auto& n : g.nodes()) {
    // A grouped layer's input channels are one unit with its outputs: they go together.
    const bool mixes = n.kind == OpKind::Layer && n.groups == 1 && !n.inputs.empty();
    if (!mixes) continue;
    const auto in = n.inputs.front();
    const auto units = g.units_of(in);
    for (std::size_t i = 0; i < units.size(); ++i)
      if (!zero[in][i]) removable[units[i]] = 0;
  }
  return removable;
}

// The units the Pruner removes: the removable ones, except that every coupled group keeps one
// (so that every layer keeps a channel).
inline std::vector<char> units_to_remove(const Graph& g, const std::vector<char>& removable) {
  std::vector<char> removed = removable;
  for (const auto& group : g.groups()) {
    const bool all = std::all_of(group.units.begin(), group.units.end(), [&](auto u) { return removed[u]; });
    if (all && !group.units.empty()) removed[group.units.front()] = 0;  // keep one
  }
  return removed;
}

// A model's modules by qualified name, as the graph names them.
using ModuleMap = std::map<std::string, std::shared_ptr<torch::nn::Module>>;

inline ModuleMap module_map(const torch::nn::Module& root) {
  ModuleMap modules;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) modules[item.key()] = item.value();
  return modules;
}

// A free parameter of the graph ("encoder.pos_embedding"): its module's tensor.
inline torch::Tensor graph_parameter(const ModuleMap& modules, const GraphNode& n) {
  return layer_tensor(*modules.at(n.module), n.parameter);
}

// Which output channels of a Layer, Norm or Parameter node are exact zeros with the model's
// current parameters: asked of the node's layer rule.
inline ZeroOutputs zero_outputs_of(const ModuleMap& modules) {
  return [&modules](const GraphNode& n) -> std::vector<char> {
    if (n.kind == OpKind::Parameter) {
      torch::NoGradGuard no_grad;
      const torch::Tensor p = graph_parameter(modules, n);
      const torch::Tensor z = zero_slices(p, n.parameter_dim).to(torch::kCPU).contiguous();
      return {z.data_ptr<bool>(), z.data_ptr<bool>() + z.numel()};
    }
    const auto& m = *modules.at(n.module);
    const auto& weight = n.rule->tensors.front();
    const auto channels = static_cast<std::int64_t>(layer_tensor(m, weight.name).size(weight.out_dim));
    return zero_outputs(*n.rule, m, channels);
  };
}

// The units the Pruner would remove from the model `modules` belong to, as its parameters are
// now.
inline std::vector<char> units_to_remove(const Graph& g, const ModuleMap& modules, bool approximate) {
  return units_to_remove(g, removable_units(g, zero_channels(g, zero_outputs_of(modules)), approximate));
}

}  // namespace fasterai::detail
