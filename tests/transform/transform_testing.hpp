#pragma once
// Helpers shared by the transform tests: output comparison with the tolerance,
// snapshots that prove the input model untouched, BatchNorms with realistic running statistics
// (folding with μ = 0, σ² = 1 would test little), and a local filter sparsifier.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/layers/rule.hpp>

namespace fasterai::testing {

// max |new − old| / max |old|: the transforms' exactness criterion is this ≤ 1e-5.
inline double relative_error(const torch::Tensor& now, const torch::Tensor& before) {
  const double scale = before.abs().max().item<double>();
  const double diff = (now - before).abs().max().item<double>();
  return scale == 0.0 ? diff : diff / scale;
}

// Every parameter and buffer, deep-copied, by name.
inline std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> s;
  for (const auto& p : model.named_parameters()) s[p.key()] = p.value().detach().clone();
  for (const auto& b : model.named_buffers()) s["buffer:" + b.key()] = b.value().detach().clone();
  return s;
}

// True when `model` holds exactly the tensors of `before` (names, shapes, values).
inline bool unchanged(const std::map<std::string, torch::Tensor>& before,
                      const torch::nn::Module& model) {
  const auto now = snapshot(model);
  if (now.size() != before.size()) return false;
  for (const auto& [name, t] : before) {
    const auto it = now.find(name);
    if (it == now.end() || !it->second.sizes().equals(t.sizes()) || !torch::equal(it->second, t))
      return false;
  }
  return true;
}

// Random affine parameters and running statistics (mean ≠ 0, variance > 0) for every
// BatchNorm, so that folding and pruning are tested on a BatchNorm that really does something.
inline void randomize_batch_norms(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  auto randomize = [](auto& bn) {
    const auto n = bn.options.num_features();
    if (bn.options.affine()) {
      bn.weight.copy_(1.0 + 0.3 * torch::randn({n}));
      bn.bias.copy_(0.3 * torch::randn({n}));
    }
    if (bn.options.track_running_stats()) {
      bn.running_mean.copy_(0.5 * torch::randn({n}));
      bn.running_var.copy_(0.5 + 1.5 * torch::rand({n}));
    }
  };
  for (auto& m : model.modules(/*include_self=*/false)) {
    if (auto* bn2 = m->as<torch::nn::BatchNorm2dImpl>()) randomize(*bn2);
    if (auto* bn1 = m->as<torch::nn::BatchNorm1dImpl>()) randomize(*bn1);
  }
}

// Zero output channel `c` of the Conv2d at `index` of the walk: its filter, its bias and the
// γ, β of a BatchNorm2d right after it — a whole group, as filter sparsification leaves it.
inline void zero_channel(const std::vector<Layer>& all, std::size_t index, std::int64_t c) {
  torch::NoGradGuard no_grad;
  auto* conv = all[index].as<torch::nn::Conv2dImpl>();
  conv->weight[c].zero_();
  if (conv->bias.defined()) conv->bias[c].zero_();
  if (index + 1 < all.size()) {
    if (auto* bn = all[index + 1].as<torch::nn::BatchNorm2dImpl>()) {
      bn->weight[c].zero_();
      bn->bias[c].zero_();
    }
  }
}

// Filter / local / L1 sparsification, the seed's rule: per Conv2d with n filters, zero the
// floor(n·percent/100) filters of smallest L1 norm (with bias and the following BatchNorm's
// γ, β). Stands in for `Sparsifier<Filter, Local, L1, OneShot>` in the transform tests.
inline std::vector<std::int64_t> zero_smallest_filters(torch::nn::Module& model, double percent) {
  torch::NoGradGuard no_grad;
  std::vector<Layer> all;
  fasterai::detail::collect_layers(*model.as<torch::nn::SequentialImpl>(), "", all);
  std::vector<std::int64_t> zeroed;
  for (std::size_t i = 0; i < all.size(); ++i) {
    auto* conv = all[i].as<torch::nn::Conv2dImpl>();
    if (conv == nullptr) continue;
    const std::int64_t n = conv->weight.size(0);
    const auto k = static_cast<std::int64_t>(std::floor(double(n) * percent / 100.0));
    const torch::Tensor norms = conv->weight.abs().reshape({n, -1}).sum(1);
    const torch::Tensor order = std::get<1>(norms.sort(/*stable=*/true, 0, false));
    for (std::int64_t j = 0; j < k; ++j) zero_channel(all, i, order[j].item<std::int64_t>());
    zeroed.push_back(k);
  }
  return zeroed;
}

inline std::vector<Layer> walk(const torch::nn::Sequential& model) {
  const LayerView v = layers(model);
  return {v.begin(), v.end()};
}

// Zeroes one unit of the graph everywhere it is made: the rows of the layers that produce it,
// the γ and β of the norms on its way, the slices of the free parameters added to it.
inline void zero_unit(torch::nn::Module& model, const Graph& g, std::int64_t unit) {
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

}  // namespace fasterai::testing
