#pragma once
// BNFolder: folds every BatchNorm into the layer before it, for inference. In eval mode a
// BatchNorm is a fixed per-channel affine map, y = γ·(x − μ)/√(σ² + ε) + β with its running
// statistics, so it can be merged into the convolution (or linear layer) that feeds it:
//
//   W' = W·γ/√(σ² + ε)        b' = (b − μ)·γ/√(σ² + ε) + β
//
// which removes a layer, its parameters and a pass over the activations, with outputs
// unchanged. Use it on a trained model, after pruning, before measuring or deploying:
//
//   auto folded = fasterai::BNFolder().fold(sequential);  // a copy; `sequential` is left as it was
//   fasterai::BNFolder().fold_(model, example_input);     // any module, in place
//
// A BatchNorm2d whose input comes straight from a Conv2d, and a BatchNorm1d whose input comes
// straight from a Linear, are folded when nothing else reads that layer's output (the model's
// channel-dependency graph tells: static for Sequentials, traced otherwise); a layer without
// bias gains one. From a Sequential the BatchNorm layers disappear and every other layer keeps
// its name. In place, a module the user holds cannot disappear, so each folded BatchNorm becomes
// an exact identity in eval mode (γ = 1, β = 0, μ = 0, σ² = 1, ε = 0). Either way the model is
// in eval mode afterwards: it computes the eval-mode function only (training it would need the
// BatchNorms back). A BatchNorm with nothing to fold into, or without running statistics, is
// left in place and listed in the report.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

struct FoldedLayer {
  std::string batch_norm;  // e.g. "features.1" (gone from the result)
  std::string into;        // e.g. "features.0"
};

struct UnfoldedLayer {
  std::string batch_norm;
  std::string reason;      // why it stayed, e.g. "not directly after a Conv2d"
};

struct FoldReport {
  std::vector<FoldedLayer> folded;
  std::vector<UnfoldedLayer> left;  // BatchNorms kept in the result
  // False when the model had no BatchNorm to fold: the result is then an eval-mode copy.
  bool changed() const { return !folded.empty(); }
};

class BNFolder {
 public:
  // A new model in eval mode with every foldable BatchNorm merged into the layer before it.
  // Throws fasterai::argument_error, leaving `model` as it was, when a BatchNorm to fold has a
  // negative or non-finite running variance, or non-finite statistics or parameters.
  template <sequential_like Model>
  torch::nn::Sequential fold(const Model& model);

  // Folds in place every foldable BatchNorm of any module, traced on `example` (a batch of
  // inputs), with the strong guarantee: on error nothing changed. Returns the report.
  template <traceable Model>
  FoldReport fold_(Model& model, const torch::Tensor& example);

  // What the last `fold` did.
  const FoldReport& report() const { return report_; }

 private:
  FoldReport report_;
};

namespace detail {

inline constexpr const char* folder_where = "fasterai::BNFolder::fold";

// The parts of a BatchNorm that folding reads, whatever its dimension.
struct BatchNormView {
  const torch::Tensor* weight;        // undefined without affine parameters
  const torch::Tensor* bias;
  const torch::Tensor* running_mean;  // undefined without running statistics
  const torch::Tensor* running_var;
  double eps;
  std::int64_t num_features;
};

template <class BatchNormImpl>
BatchNormView view_of(const BatchNormImpl& bn) {
  return {&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var, bn.options.eps(),
          bn.options.num_features()};
}

// Statistics that would poison every weight of the folded layer are refused, naming the
// offending tensor and its first bad value.
inline void check_foldable(const std::string& name, const BatchNormView& bn) {
  auto check = [&](const torch::Tensor& t, const char* what, bool variance) {
    if (!t.defined()) return;
    torch::Tensor bad = ~torch::isfinite(t);
    if (variance) bad |= t < 0;
    if (!bad.any().item<bool>()) return;
    const double value = t.masked_select(bad)[0].item<double>();
    throw_argument_error(folder_where, name + "." + what, value,
                         variance ? "finite running variances >= 0 (the BatchNorm's statistics "
                                    "are corrupt; re-estimate them before folding)"
                                  : "finite values (the BatchNorm's statistics or parameters are "
                                    "corrupt; re-estimate them before folding)");
  };
  check(*bn.running_var, "running_var", true);
  check(*bn.running_mean, "running_mean", false);
  check(*bn.weight, "weight", false);
  check(*bn.bias, "bias", false);
}

// Per-channel scale γ/√(σ² + ε) and shift (b − μ)·scale + β, computed in double so that folding
// adds no rounding beyond the final cast.
struct Folding {
  torch::Tensor scale;
  torch::Tensor bias;
};

inline Folding folding(const BatchNormView& bn, const torch::Tensor& layer_bias) {
  const auto f64 = [](const torch::Tensor& t) { return t.to(torch::kFloat64); };
  const torch::Tensor mean = f64(*bn.running_mean);
  torch::Tensor scale = torch::rsqrt(f64(*bn.running_var) + bn.eps);
  if (bn.weight->defined()) scale = scale * f64(*bn.weight);
  torch::Tensor bias = layer_bias.defined() ? f64(layer_bias) : torch::zeros_like(mean);
  bias = (bias - mean) * scale;
  if (bn.bias->defined()) bias = bias + f64(*bn.bias);
  return {scale, bias};
}

inline torch::nn::Conv2d folded_conv(const torch::nn::Conv2dImpl& conv, const BatchNormView& bn) {
  const auto& o = conv.options;
  const Folding f = folding(bn, conv.bias);
  torch::nn::Conv2d result = placed_like(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), o.out_channels(), o.kernel_size())
                            .stride(o.stride())
                            .padding(o.padding())
                            .dilation(o.dilation())
                            .groups(o.groups())
                            .bias(true)
                            .padding_mode(o.padding_mode())),
      conv.weight);
  const torch::Tensor scale = f.scale.to(conv.weight.device()).view({-1, 1, 1, 1});
  result->weight.copy_(conv.weight.to(torch::kFloat64) * scale);
  result->bias.copy_(f.bias);
  return result;
}

inline torch::nn::Linear folded_linear(const torch::nn::LinearImpl& linear,
                                       const BatchNormView& bn) {
  const auto& o = linear.options;
  const Folding f = folding(bn, linear.bias);
  torch::nn::Linear result = placed_like(
      torch::nn::Linear(torch::nn::LinearOptions(o.in_features(), o.out_features()).bias(true)),
      linear.weight);
  const torch::Tensor scale = f.scale.to(linear.weight.device()).view({-1, 1});
  result->weight.copy_(linear.weight.to(torch::kFloat64) * scale);
  result->bias.copy_(f.bias);
  return result;
}

struct FoldPlan {
  std::map<std::string, BatchNormView> into;  // Conv2d / Linear name -> the BatchNorm after it
  FoldReport report;
};

// The BatchNorms of `all` (the model's layers) that fold into the layer writing their input,
// found on the model's graph.
inline FoldPlan plan_folding(const std::vector<Layer>& all, const Graph& g) {
  FoldPlan plan;
  for (const Layer& layer : all) {
    if (layer.kind != LayerKind::BatchNorm2d && layer.kind != LayerKind::BatchNorm1d) continue;
    const bool is_2d = layer.kind == LayerKind::BatchNorm2d;
    const BatchNormView bn = is_2d ? view_of(*layer.as<torch::nn::BatchNorm2dImpl>())
                                   : view_of(*layer.as<torch::nn::BatchNorm1dImpl>());
    const std::string_view wanted = is_2d ? "Conv2d" : "Linear";
    const auto nodes = g.nodes_of(layer.name);
    if (nodes.empty()) {
      plan.report.left.push_back({layer.name, "not reached by the forward pass"});
      continue;
    }
    if (nodes.size() > 1) {
      plan.report.left.push_back({layer.name, "called more than once"});
      continue;
    }
    const GraphNode& node = g.nodes()[nodes.front()];
    const std::int64_t producer = node.kind == OpKind::Norm ? g.values()[node.inputs.front()].producer : -1;
    if (producer < 0 || g.nodes()[producer].kind != OpKind::Layer || g.nodes()[producer].rule->kind != wanted) {
      plan.report.left.push_back({layer.name, detail::concat("not directly after a ", wanted)});
      continue;
    }
    const std::string& before = g.nodes()[producer].module;
    if (g.consumers(node.inputs.front()).size() != 1 || g.nodes_of(before).size() != 1) {
      plan.report.left.push_back({layer.name, "the output of '" + before + "' is also read elsewhere"});
      continue;
    }
    if (!bn.running_mean->defined()) {
      // Without running statistics a BatchNorm normalizes with each batch's own statistics:
      // no fixed map to fold.
      plan.report.left.push_back({layer.name, "no running statistics"});
      continue;
    }
    check_foldable(layer.name, bn);
    plan.into.emplace(before, bn);
    plan.report.folded.push_back({layer.name, before});
  }
  return plan;
}

// Access to a module's parameter table, to give a layer without bias the bias folding needs:
// LibTorch registers a missing bias as an undefined tensor and offers no way to replace it.
struct ParameterTable : torch::nn::Module {
  static torch::OrderedDict<std::string, torch::Tensor>& of(torch::nn::Module& m) {
    return m.*(&ParameterTable::parameters_);
  }
};

}  // namespace detail

template <sequential_like Model>
torch::nn::Sequential BNFolder::fold(const Model& model) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  torch::NoGradGuard no_grad;
  detail::FoldPlan plan = detail::plan_folding(all, graph_of(model));
  std::map<std::string, bool> dropped;
  for (const auto& f : plan.report.folded) dropped[f.batch_norm] = true;
  auto result = detail::rebuild(model, [&](const std::string& name, const torch::nn::AnyModule& any) {
    if (dropped.count(name) != 0) return detail::LeafAction::drop();
    const auto it = plan.into.find(name);
    if (it == plan.into.end()) return detail::LeafAction::keep();
    if (const auto* conv = any.ptr()->as<torch::nn::Conv2dImpl>())
      return detail::LeafAction::replace(detail::folded_conv(*conv, it->second));
    return detail::LeafAction::replace(
        detail::folded_linear(*any.ptr()->as<torch::nn::LinearImpl>(), it->second));
  });
  result->eval();
  report_ = std::move(plan.report);
  return result;
}

namespace detail {

// Applies a fold plan to the model's own layers: every new tensor is computed first, then
// nothing can fail.
inline void fold_in_place(const std::vector<Layer>& all, const FoldPlan& plan) {
  torch::NoGradGuard no_grad;
  auto find = [&](const std::string& name) {
    return std::find_if(all.begin(), all.end(), [&](const Layer& l) { return l.name == name; })->handle;
  };
  struct Folded {
    std::shared_ptr<torch::nn::Module> layer;
    torch::Tensor weight, bias;
  };
  std::vector<Folded> folded;
  for (const auto& [name, bn] : plan.into) {
    auto layer = find(name);
    if (auto* conv = layer->as<torch::nn::Conv2dImpl>()) {
      auto f = folded_conv(*conv, bn);
      folded.push_back({layer, f->weight.detach(), f->bias.detach()});
    } else {
      auto f = folded_linear(*layer->as<torch::nn::LinearImpl>(), bn);
      folded.push_back({layer, f->weight.detach(), f->bias.detach()});
    }
  }
  for (auto& f : folded) {
    auto* conv = f.layer->as<torch::nn::Conv2dImpl>();
    auto* linear = f.layer->as<torch::nn::LinearImpl>();
    torch::Tensor& weight = conv ? conv->weight : linear->weight;
    torch::Tensor& bias = conv ? conv->bias : linear->bias;
    weight.set_data(f.weight);
    if (bias.defined()) {
      bias.set_data(f.bias);
    } else {
      auto& table = ParameterTable::of(*f.layer);
      torch::Tensor added = f.bias.clone().requires_grad_(weight.requires_grad());
      if (table.contains("bias"))
        table["bias"] = added;
      else
        table.insert("bias", added);
      bias = added;
      if (conv) conv->options.bias(true);
      if (linear) linear->options.bias(true);
    }
  }
  auto make_identity = [](auto& bn) {
    if (bn.options.affine()) bn.weight.fill_(1), bn.bias.zero_();
    bn.running_mean.zero_();
    bn.running_var.fill_(1);
    bn.options.eps(0.0);
  };
  for (const auto& f : plan.report.folded) {
    auto layer = find(f.batch_norm);
    if (auto* bn2 = layer->as<torch::nn::BatchNorm2dImpl>()) make_identity(*bn2);
    if (auto* bn1 = layer->as<torch::nn::BatchNorm1dImpl>()) make_identity(*bn1);
  }
}

}  // namespace detail

template <traceable Model>
FoldReport BNFolder::fold_(Model& model, const torch::Tensor& example) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  const Graph graph = trace(model, example);
  detail::FoldPlan plan = detail::plan_folding(all, graph);
  detail::fold_in_place(all, plan);
  detail::impl(model).eval();
  report_ = std::move(plan.report);
  return report_;
}

}  // namespace fasterai
