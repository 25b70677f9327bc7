#pragma once
// Model statistics: parameter counts (total and nonzero), per-layer and global sparsity of the
// prunable layers, multiply-accumulate count for an input shape, and size in bytes. These are
// the numbers the fasterai article (2020) reports at each stage of compression.

#include <cstdint>
#include <iomanip>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/graph/trace.hpp>

namespace fasterai {

// Number of parameters (trainable tensors; buffers such as running statistics are not counted,
// as in PyTorch's `sum(p.numel() for p in model.parameters())`).
template <module Model>
std::int64_t count_parameters(const Model& model) {
  std::int64_t n = 0;
  for (const auto& p : detail::impl(model).parameters()) n += p.numel();
  return n;
}

// Number of parameters that are not exactly zero.
template <module Model>
std::int64_t count_nonzero_parameters(const Model& model) {
  torch::NoGradGuard no_grad;
  std::int64_t n = 0;
  for (const auto& p : detail::impl(model).parameters()) n += p.count_nonzero().template item<std::int64_t>();
  return n;
}

// Bytes taken by the parameters and buffers (what a saved state_dict holds).
template <module Model>
std::int64_t model_size_bytes(const Model& model) {
  std::int64_t bytes = 0;
  for (const auto& p : detail::impl(model).parameters())
    bytes += p.numel() * static_cast<std::int64_t>(p.element_size());
  for (const auto& b : detail::impl(model).buffers())
    bytes += b.numel() * static_cast<std::int64_t>(b.element_size());
  return bytes;
}

// A count with thousands separators, as the fasterai article prints it ("134,309,962").
inline std::string with_thousands(std::int64_t n) {
  const std::string digits = std::to_string(n);
  const size_t sign = n < 0 ? 1 : 0;
  std::string out(digits, 0, sign);
  for (size_t i = sign; i < digits.size(); ++i) {
    if (i > sign && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

struct LayerSparsity {
  std::string name;          // state_dict prefix, e.g. "features.0"
  LayerKind kind;
  std::int64_t weights = 0;  // elements in the weight
  std::int64_t zeros = 0;    // elements exactly zero
  double percent() const { return weights == 0 ? 0.0 : 100.0 * double(zeros) / double(weights); }
};

struct SparsityReport {
  std::vector<LayerSparsity> layers;
  // Percent of zero weights over all reported layers.
  double global_percent() const {
    std::int64_t w = 0, z = 0;
    for (const auto& l : layers) w += l.weights, z += l.zeros;
    return w == 0 ? 0.0 : 100.0 * double(z) / double(w);
  }
};

// Sparsity of the weight of one prunable layer.
inline LayerSparsity layer_sparsity(const Layer& layer) {
  torch::NoGradGuard no_grad;
  const auto& w = layer.weight();
  const std::int64_t nonzero = w.count_nonzero().item<std::int64_t>();
  return LayerSparsity{layer.name, layer.kind, w.numel(), w.numel() - nonzero};
}

// Sparsity of the weight of every prunable layer (Conv2d, Linear) in forward order.
template <sequential_like Model>
SparsityReport sparsity_report(const Model& model) {
  SparsityReport report;
  for (const Layer& layer : prunable_layers(model)) report.layers.push_back(layer_sparsity(layer));
  return report;
}

// Print a report in the fasterai article's style ("Sparsity in Conv2d features.0: 39.06%").
inline std::ostream& operator<<(std::ostream& os, const SparsityReport& report) {
  const auto flags = os.flags();
  const auto precision = os.precision();
  os << std::fixed << std::setprecision(2);
  for (const auto& l : report.layers)
    os << "Sparsity in " << to_string(l.kind) << ' ' << l.name << ": " << l.percent() << "%\n";
  os.flags(flags);
  os.precision(precision);
  return os;
}

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
