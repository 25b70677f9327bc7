#pragma once
// Multiply-accumulates of a forward pass, layer by layer: what each layer's rule counts on the
// shapes the traced graph records; and what they become after the Pruner.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/layers/layer_walk.hpp>

namespace fasterai {

struct LayerMacs {
  std::string name;
  LayerKind kind;
  std::int64_t macs = 0;
};

struct MacReport {
  std::vector<LayerMacs> layers;
  std::int64_t total() const {
    std::int64_t t = 0;
    for (const auto& l : layers) t += l.macs;
    return t;
  }
};

// The MACs of a model, and what they become once the Pruner has removed channels, from one
// trace and without changing the model: sensitivity analysis asks it for every trial, and MAC
// budgets are met with it.
//
// A layer call's count is scaled by the share of its output channels that stay and, when it
// mixes its input channels (groups = 1), by the share of its input channels that stay. That is
// exact for the rules fasterai ships for Conv, ConvTranspose and Linear (per output position,
// in/groups × kernel multiply-accumulates): their count after the Pruner equals the prediction.
// MultiheadAttention's count (quadratic in the width: its scores) and users' rules are scaled
// the same way, an estimate. Barriers that count_macs counts keep their count.
class PrunedMacs {
 public:
  // Traces `model` on `example` (a batch; give a batch of one for the count per sample), with
  // gradients recorded even under a caller's NoGradGuard; the model is left as it was. Integer
  // examples are token ids, for models that start with an Embedding.
  template <traceable Model>
  PrunedMacs(const Model& model, const torch::Tensor& example) {
    auto& m = const_cast<impl_of_t<Model>&>(detail::impl(model));
    {
      torch::AutoGradMode grad(true);
      graph_ = trace(m, example);
    }
    modules_ = detail::module_map(m);
    for (const auto& n : graph_.nodes()) {
      if ((n.kind != OpKind::Layer && n.kind != OpKind::Barrier) || !n.rule || !n.rule->macs) continue;
      const auto& shape = graph_.values()[n.output].shape;
      const auto& layer = *modules_.at(n.module);
      const auto in = n.inputs.empty() ? -1 : n.inputs.front();
      const auto macs = n.rule->macs(layer, in < 0 ? shape : graph_.values()[in].shape, shape);
      report_.layers.push_back({n.module, kind_of(layer), macs});
      calls_.push_back({macs, n.kind == OpKind::Layer ? n.output : -1,
                        n.kind == OpKind::Layer && n.groups == 1 ? in : -1});
    }
  }

  // The count now, layer call by layer call in execution order (as count_macs reports it).
  const MacReport& report() const { return report_; }
  std::int64_t total() const { return report_.total(); }
  // The graph it was traced into: `removed` below is indexed like its units().
  const Graph& graph() const { return graph_; }

  // Which units the Pruner would remove from the model as its parameters are now (their exact
  // zeros); `approximate` as PrunerOptions::approximate. Ask before pruning: once the model's
  // widths change, this trace no longer describes it.
  std::vector<char> removed_now(bool approximate = false) const {
    return detail::units_to_remove(graph_, modules_, approximate);
  }

  // The MACs once the units marked in `removed` are gone.
  std::int64_t after(const std::vector<char>& removed) const {
    detail::check_argument(removed.size() == graph_.units().size(), "fasterai::PrunedMacs::after", "removed",
                           removed.size(), detail::concat("one flag per unit of the graph (",
                                                          std::to_string(graph_.units().size()), ")"));
    std::int64_t total = 0;
    for (const auto& c : calls_) {
      std::int64_t macs = c.macs;
      for (const auto value : {c.out, c.in}) {
        if (value < 0) continue;
        const auto units = graph_.units_of(value);
        const auto all = static_cast<std::int64_t>(units.size());
        const auto kept = std::count_if(units.begin(), units.end(), [&](auto u) { return !removed[u]; });
        // macs·kept/all without overflow, exactly when all divides macs·kept.
        macs = macs / all * kept + macs % all * kept / all;
      }
      total += macs;
    }
    return total;
  }
  // The MACs after Pruner (with `approximate`) runs on the model as it is now.
  std::int64_t after_pruning(bool approximate = false) const { return after(removed_now(approximate)); }

 private:
  struct Call {
    std::int64_t macs = 0;
    std::int64_t out = -1;  // the value whose kept channels scale the count; -1: not scaled
    std::int64_t in = -1;
  };
  Graph graph_;
  detail::ModuleMap modules_;
  MacReport report_;
  std::vector<Call> calls_;
};

// Multiply-accumulates of one forward pass on `example` (a batch; give a batch of one for the
// count per sample) through the layers whose rules count them (Conv, Linear on any rank,
// MultiheadAttention, users' registered kinds), in execution order (a layer called twice counts
// twice). The shapes come from the model's traced graph (graph/trace.hpp), with gradients
// recorded even under a caller's NoGradGuard, the model left as it was. Integer examples are
// token ids, for models that start with an Embedding.
template <traceable Model>
MacReport count_macs(const Model& model, const torch::Tensor& example) {
  return PrunedMacs(model, example).report();
}

// The same for a single sample of `input_shape` (without the batch dimension, e.g.
// {3, 224, 224}), run on zeros of the model's dtype and device.
template <traceable Model>
MacReport count_macs(const Model& model, std::vector<std::int64_t> input_shape) {
  constexpr auto where = "fasterai::count_macs";
  detail::check_argument(!input_shape.empty(), where, "input_shape", "{}",
                         "the shape of one sample without the batch dimension, e.g. {3, 224, 224}");
  for (auto d : input_shape)
    detail::check_argument(d > 0, where, "input_shape", c10::IntArrayRef(input_shape), "positive dimensions");
  auto& m = const_cast<impl_of_t<Model>&>(detail::impl(model));
  input_shape.insert(input_shape.begin(), 1);
  auto options = torch::TensorOptions().dtype(torch::kFloat32);
  if (const auto p = m.parameters(); !p.empty()) options = options.device(p.front().device()).dtype(p.front().dtype());
  return count_macs(model, torch::zeros(input_shape, options));
}

}  // namespace fasterai
