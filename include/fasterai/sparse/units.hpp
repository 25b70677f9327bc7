#pragma once
// fasterai::CoupledUnits: what Filter granularity prunes — the units of the model's
// channel-dependency graph (graph/graph.hpp), grouped as the graph couples them.
//
// A unit is one channel of the graph: every output channel that is added into the same residual
// stream, or that a depthwise conv reads, is the same unit. A coupled group is the set of units
// that one residual stream or one plain conv makes; its producers are the selected layers whose
// output channels are some of its units. The sparsifier scores each unit (the sum of its
// producing channels' criteria, as DepGraph does, or the γ of the norms reading it), selects
// units per group or over all groups, and zeroes a pruned unit everywhere it lives: every
// producing layer's output channel, and every per-channel tensor with it (a layer's bias, a
// norm's γ and β, the free parameters added to or multiplied with the channels).
//
// Three index spaces meet here, and each stays on its side: a layer's output channel, a unit of
// the graph, and a unit's position inside its coupled group. Units the Pruner could not remove
// (held by the input, the output or a barrier, or followed by an operation that turns zeros into
// something else) belong to no group; they map to one extra unit that is never pruned, so a
// layer's channels index the unit state without a test.

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/layers/rule.hpp>
#include <fasterai/sparse/masks.hpp>

namespace fasterai {

struct CoupledUnitsOptions {
  // Also units a LayerNorm normalises over (removing them is approximate).
  bool approximate = false;
  // The layers were named by the user (SparsifierOptions::include): a named layer none of whose
  // channels can go without `approximate` is an error rather than a silent no-op.
  bool named_layers = false;
  // The units are scored by the γ of the norms reading them (criteria::BNScale): every
  // selected layer's channels must be read by one.
  bool score_norms = false;
  std::string criteria_name;
  std::string caller;  // for error messages
};

class CoupledUnits {
 public:
  // A selected layer making some of a group's units.
  struct Producer {
    std::size_t layer;        // index into the layers the units were bound to
    torch::Tensor channels;   // long [k]: the layer's output channels in the group
    torch::Tensor positions;  // long [k]: their units' positions in the group
  };
  struct Group {
    torch::Tensor units;      // long [n]: graph unit ids
    std::vector<Producer> producers;
  };

  CoupledUnits() = default;

  // The coupled groups of `g` whose units the sparsifier may zero: those the Pruner can remove
  // once zeroed, all of whose producing layers are among `layers` (the selected layers of
  // `model`, in their order).
  CoupledUnits(const Graph& g, const torch::nn::Module& model, const std::vector<Layer>& layers,
               const CoupledUnitsOptions& options) {
    const auto n_units = static_cast<std::int64_t>(g.units().size());
    none_ = n_units;
    auto all_zero = [&](const GraphNode& n) {
      return std::vector<char>(static_cast<std::size_t>(g.values()[n.output].channels()), 1);
    };
    std::vector<char> candidate = detail::removable_units(g, detail::zero_channels(g, all_zero), options.approximate);
    std::map<std::string, std::size_t> layer_of;
    for (std::size_t i = 0; i < layers.size(); ++i) layer_of[layers[i].name] = i;
    std::set<std::string> free_parameters;  // zeroed with their channels, never scored
    for (const auto& n : g.nodes())
      if (n.kind == OpKind::Parameter) free_parameters.insert(parameter_name(n));
    for (const auto& group : g.groups()) {
      const bool selected =
          std::any_of(group.producers.begin(), group.producers.end(),
                      [&](const std::string& p) { return layer_of.count(p) != 0; }) &&
          std::all_of(group.producers.begin(), group.producers.end(),
                      [&](const std::string& p) { return layer_of.count(p) != 0 || free_parameters.count(p) != 0; });
      if (!selected)
        for (auto u : group.units) candidate[u] = 0;
    }
    // A layer named in `include` whose every unit could go only with approximate pruning (the
    // channels a LayerNorm normalises over): say so rather than select nothing of it.
    if (!options.approximate && options.named_layers) {
      const std::vector<char> if_approximate = detail::removable_units(g, detail::zero_channels(g, all_zero), true);
      for (const auto& n : g.nodes()) {
        if (n.kind != OpKind::Layer || !layer_of.count(n.module)) continue;
        const auto units = g.units_of(n.output);
        const bool none = std::none_of(units.begin(), units.end(), [&](auto u) { return candidate[u] != 0; });
        const bool approximate = std::any_of(units.begin(), units.end(), [&](auto u) { return if_approximate[u] != 0; });
        detail::check_argument(!(none && approximate), options.caller, "include", n.module,
                               "a layer with channels removable exactly; its channels are normalised by a "
                               "LayerNorm (removing them is approximate): set SparsifierOptions::approximate(true)");
      }
    }
    // Candidate units by coupled group, with their positions.
    std::vector<std::int64_t> group_of(static_cast<std::size_t>(n_units), -1), position(static_cast<std::size_t>(n_units), -1);
    for (const auto& group : g.groups()) {
      std::vector<std::int64_t> units;
      for (auto u : group.units)
        if (candidate[u]) position[u] = static_cast<std::int64_t>(units.size()), units.push_back(u);
      if (units.empty()) continue;
      for (auto u : units) group_of[u] = static_cast<std::int64_t>(groups_.size());
      groups_.push_back({torch::tensor(units, torch::kLong), {}});
    }
    auto unit_index = [&](const std::vector<std::int64_t>& units) {
      std::vector<std::int64_t> idx;
      for (auto u : units) idx.push_back(candidate[u] ? u : none_);
      return torch::tensor(idx, torch::kLong);
    };
    for (const auto& l : layers) layer_units_.push_back(torch::full({l.weight().size(0)}, none_, torch::kLong));
    const detail::ModuleMap modules = detail::module_map(model);
    std::set<std::string> seen;
    for (const auto& n : g.nodes()) {
      if (n.kind == OpKind::Parameter) {
        if (!seen.insert(parameter_name(n)).second) continue;
        const auto idx = unit_index(g.units_of(n.output));
        if ((idx != none_).any().template item<bool>())
          channel_tensors_.push_back({detail::graph_parameter(modules, n), idx, n.parameter_dim, {}});
        continue;
      }
      if (n.module.empty() || !seen.insert(n.module).second) continue;  // first call of a module
      const auto units = g.units_of(n.output);
      if (n.kind == OpKind::Norm) {
        // Its γ and β are zeroed with the unit, so that the norm emits zeros there.
        const auto idx = unit_index(units);
        if ((idx != none_).any().template item<bool>())
          for (const auto& t : n.rule->tensors)
            if (t.decides_zero && t.out_dim == 0)
              if (auto x = detail::layer_tensor(*modules.at(n.module), t.name); x.defined() && x.dim() == 1)
                channel_tensors_.push_back({x, idx, 0, {}});
        if (options.score_norms)
          if (auto gamma = detail::layer_tensor(*modules.at(n.module), "weight"); gamma.defined() && gamma.dim() == 1)
            norm_scales_.push_back({gamma, idx});
        continue;
      }
      if (n.kind != OpKind::Layer) continue;
      const auto it = layer_of.find(n.module);
      if (it == layer_of.end()) continue;
      const std::size_t l = it->second;
      layer_units_[l] = unit_index(units);
      if (const auto& b = layers[l].bias(); b.defined()) channel_tensors_.push_back({b, layer_units_[l], 0, {}});
      std::map<std::int64_t, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> by_group;
      for (std::size_t o = 0; o < units.size(); ++o) {
        if (!candidate[units[o]]) continue;
        auto& [channels, positions] = by_group[group_of[units[o]]];
        channels.push_back(static_cast<std::int64_t>(o));
        positions.push_back(position[units[o]]);
      }
      for (auto& [c, cp] : by_group)
        groups_[static_cast<std::size_t>(c)].producers.push_back(
            {l, torch::tensor(cp.first, torch::kLong), torch::tensor(cp.second, torch::kLong)});
    }
    if (options.score_norms) {
      // A unit no norm reads would score 0 and go first: refuse the layer instead.
      auto scored = torch::zeros({n_units + 1}, torch::kBool);
      for (const auto& ns : norm_scales_) scored.index_fill_(0, ns.units, true);
      for (std::size_t l = 0; l < layers.size(); ++l) {
        const auto missing = (layer_units_[l] != none_) & ~scored.index_select(0, layer_units_[l]);
        detail::check_argument(!missing.any().template item<bool>(), options.caller, "criteria", options.criteria_name,
                               detail::concat("a criterion the layers' channels support: layer '", layers[l].name,
                                              "' has channels no BatchNorm (or other norm with a per-channel "
                                              "gamma) reads; exclude it or use another criterion"));
      }
    }
  }

  const std::vector<Group>& groups() const { return groups_; }

  // Each group's unit scores: the sum of its producing channels' scores, `channel_scores[l]`
  // being layer l's per-output-channel scores.
  std::vector<torch::Tensor> sum_of_producers(const std::vector<torch::Tensor>& channel_scores) const {
    std::vector<torch::Tensor> out;
    for (const auto& group : groups_) {
      auto u = torch::zeros({group.units.numel()}, torch::kFloat32);
      for (const auto& p : group.producers)
        u.index_add_(0, p.positions, channel_scores[p.layer].reshape({-1}).to(torch::kCPU).index_select(0, p.channels));
      out.push_back(std::move(u));
    }
    return out;
  }

  // Each group's unit scores as Σ |γ| over the norms reading each unit (criteria::BNScale).
  std::vector<torch::Tensor> norm_scale_scores() const {
    auto scores = torch::zeros({none_ + 1}, torch::kFloat32);
    for (const auto& ns : norm_scales_)
      scores.index_add_(0, ns.units, ns.gamma.detach().abs().to(torch::kCPU, torch::kFloat32));
    std::vector<torch::Tensor> out;
    for (const auto& group : groups_) out.push_back(scores.index_select(0, group.units));
    return out;
  }

  // Each group's units whose every producing channel is already zero (an earlier round removed
  // them), read from `weights[l]`, layer l's weight (rows are output channels).
  std::vector<torch::Tensor> zero_units(const std::vector<torch::Tensor>& weights) const {
    std::vector<torch::Tensor> out;
    for (const auto& group : groups_) {
      auto nonzero = torch::zeros({group.units.numel()}, torch::kLong);
      for (const auto& p : group.producers) {
        const auto alive = (~detail::zero_slices(weights[p.layer], 0)).to(torch::kCPU);
        nonzero.index_add_(0, p.positions, alive.index_select(0, p.channels).to(torch::kLong));
      }
      out.push_back(nonzero.eq(0));
    }
    return out;
  }

  // What pruning `selected[g]` (bool per position of group g) means for the model, computed
  // without changing anything: each layer's pruned output channels, and each channel tensor's.
  struct Pruning {
    torch::Tensor units;                          // bool [units + 1]
    std::vector<torch::Tensor> layer_channels;    // bool [out], per layer, on the CPU
    std::vector<torch::Tensor> tensor_channels;   // bool, per channel tensor, shaped to broadcast
  };
  Pruning pruning(const std::vector<torch::Tensor>& selected) const {
    Pruning out{torch::zeros({none_ + 1}, torch::kBool), {}, {}};
    for (std::size_t i = 0; i < groups_.size(); ++i) out.units.index_put_({groups_[i].units}, selected[i]);
    for (const auto& idx : layer_units_) out.layer_channels.push_back(out.units.index_select(0, idx));
    for (const auto& ct : channel_tensors_) {
      std::vector<std::int64_t> shape(static_cast<std::size_t>(ct.tensor.dim()), 1);
      shape[static_cast<std::size_t>(ct.dim)] = ct.units.numel();
      out.tensor_channels.push_back(out.units.index_select(0, ct.units).view(shape));
    }
    return out;
  }
  // Puts `pruning` in force for the channel tensors (the layers' masks are the caller's), with
  // the number of units it prunes in each group (-1: not counted, as when adopted).
  void commit(const Pruning& pruning, std::vector<std::int64_t> counts) {
    for (std::size_t i = 0; i < channel_tensors_.size(); ++i)
      channel_tensors_[i].mask.set_pruned(pruning.tensor_channels[i], channel_tensors_[i].tensor);
    counts_ = std::move(counts);
  }
  // The number of units pruned in group g, as last committed (-1 before).
  std::int64_t count(std::size_t g) const { return g < counts_.size() ? counts_[g] : -1; }

  // f(mask, tensor) for every per-channel tensor (biases, norms' γ and β, free parameters).
  template <class F>
  void for_each_channel_mask(F&& f) {
    for (auto& ct : channel_tensors_) f(ct.mask, ct.tensor);
  }

 private:
  // A per-channel tensor zeroed with its unit: a layer's bias, a norm's γ or β, a free parameter.
  struct ChannelTensor {
    torch::Tensor tensor;   // shares the module's tensor
    torch::Tensor units;    // long [C]: the graph unit of each channel
    std::int64_t dim = 0;   // the tensor's channel dimension (a position embedding's last)
    TensorMask mask;
  };
  // A norm's γ and the units it reads (criteria::BNScale).
  struct NormScale {
    torch::Tensor gamma;
    torch::Tensor units;
  };

  std::int64_t none_ = 0;                   // the unit that is never pruned
  std::vector<Group> groups_;
  std::vector<torch::Tensor> layer_units_;  // per layer: long [out], the unit of each output channel
  std::vector<ChannelTensor> channel_tensors_;
  std::vector<NormScale> norm_scales_;
  std::vector<std::int64_t> counts_;        // per group: units pruned in force
};

}  // namespace fasterai
