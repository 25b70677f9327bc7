#pragma once
// Multiply-accumulates of a forward pass, layer by layer: what each layer's rule counts on the
// shapes the traced graph records.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
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

// Multiply-accumulates of one forward pass on `example` (a batch; give a batch of one for the
// count per sample) through the layers whose rules count them (Conv, Linear on any rank,
// MultiheadAttention, users' registered kinds), in execution order (a layer called twice counts
// twice). The shapes come from the model's traced graph (graph/trace.hpp), with gradients
// recorded even under a caller's NoGradGuard, the model left as it was. Integer examples are
// token ids, for models that start with an Embedding.
template <traceable Model>
MacReport count_macs(const Model& model, const torch::Tensor& example) {
  auto& m = const_cast<impl_of_t<Model>&>(detail::impl(model));
  torch::AutoGradMode grad(true);
  const Graph graph = trace(m, example);
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& item : m.named_modules("", /*include_self=*/true)) modules[item.key()] = item.value();
  MacReport report;
  for (const auto& n : graph.nodes()) {
    const auto& shape = graph.values()[n.output].shape;
    if ((n.kind == OpKind::Layer || n.kind == OpKind::Barrier) && n.rule && n.rule->macs) {
      const auto& layer = *modules.at(n.module);
      const auto& in = n.inputs.empty() ? shape : graph.values()[n.inputs.front()].shape;
      report.layers.push_back({n.module, kind_of(layer), n.rule->macs(layer, in, shape)});
    }
  }
  return report;
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
