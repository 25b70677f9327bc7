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
//   auto folded = fasterai::BNFolder().fold(model);   // `model` is left as it was
//
// A BatchNorm2d directly after a Conv2d and a BatchNorm1d directly after a Linear are folded;
// a convolution without bias gains one. The BatchNorm layers disappear; every other layer keeps
// its name. The result is in eval mode whatever the input's mode: it only computes the eval-mode
// function (training it would need the BatchNorms back). A BatchNorm with nothing to fold into,
// or without running statistics, is left in place and listed in the report.

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/layer_walk.hpp>
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

inline FoldPlan plan_folding(const std::vector<Layer>& all) {
  FoldPlan plan;
  for (std::size_t i = 0; i < all.size(); ++i) {
    const Layer& layer = all[i];
    if (layer.kind != LayerKind::BatchNorm2d && layer.kind != LayerKind::BatchNorm1d) continue;
    const bool is_2d = layer.kind == LayerKind::BatchNorm2d;
    const BatchNormView bn = is_2d ? view_of(*layer.as<torch::nn::BatchNorm2dImpl>())
                                   : view_of(*layer.as<torch::nn::BatchNorm1dImpl>());
    const LayerKind wanted = is_2d ? LayerKind::Conv2d : LayerKind::Linear;
    const Layer* before = i > 0 ? &all[i - 1] : nullptr;
    if (before == nullptr || before->kind != wanted) {
      plan.report.left.push_back(
          {layer.name, "not directly after a " + std::string(to_string(wanted))});
      continue;
    }
    if (!bn.running_mean->defined()) {
      // Without running statistics a BatchNorm normalizes with each batch's own statistics:
      // no fixed map to fold.
      plan.report.left.push_back({layer.name, "no running statistics"});
      continue;
    }
    const std::int64_t channels =
        is_2d ? before->as<torch::nn::Conv2dImpl>()->options.out_channels()
              : before->as<torch::nn::LinearImpl>()->options.out_features();
    if (channels != bn.num_features) {
      plan.report.left.push_back({layer.name, "num_features differs from the outputs of '" +
                                                  before->name + "'"});
      continue;
    }
    check_foldable(layer.name, bn);
    plan.into.emplace(before->name, bn);
    plan.report.folded.push_back({layer.name, before->name});
  }
  return plan;
}

}  // namespace detail

template <sequential_like Model>
torch::nn::Sequential BNFolder::fold(const Model& model) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  torch::NoGradGuard no_grad;
  detail::FoldPlan plan = detail::plan_folding(all);
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

}  // namespace fasterai
