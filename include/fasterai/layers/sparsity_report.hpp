#pragma once
// Per-layer and global sparsity of a model's prunable layers, printed as the fasterai article
// (2020) prints it at each stage of compression.

#include <cstdint>
#include <iomanip>
#include <ostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/layers/layer_walk.hpp>

namespace fasterai {

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

}  // namespace fasterai
