#pragma once
// The table of layer rules: the built-in kinds and the ones users register, and the one place
// where a type-erased module is matched to its rule.
//
//   if (const fasterai::LayerRule* rule = fasterai::rule_of(*module)) ...   // nullptr: unknown
//
// Rules are found by the module's dynamic type, the most recently registered first, so a user's
// rule for a subclass of a built-in layer wins over the built-in one. Register rules at
// start-up, before tracing or pruning: the table is not guarded against concurrent change.

#include <concepts>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/attention.hpp>
#include <fasterai/layers/conv.hpp>
#include <fasterai/layers/embedding.hpp>
#include <fasterai/layers/linear.hpp>
#include <fasterai/layers/norm.hpp>
#include <fasterai/layers/rule.hpp>

namespace fasterai {
namespace detail {

struct RegisteredRule {
  std::function<bool(const torch::nn::Module&)> matches;
  std::shared_ptr<const LayerRule> rule;
};

template <class Impl>
RegisteredRule rule_for(LayerRule rule) {
  return {[](const torch::nn::Module& m) { return dynamic_cast<const Impl*>(&m) != nullptr; },
          std::make_shared<const LayerRule>(std::move(rule))};
}

inline std::vector<RegisteredRule>& layer_rules() {
  using namespace torch::nn;
  static std::vector<RegisteredRule> rules{
      rule_for<Conv2dImpl>(rules::convolution<Conv2dImpl, 2>("Conv2d")),
      rule_for<LinearImpl>(rules::linear()),
      rule_for<BatchNorm2dImpl>(rules::channel_norm<BatchNorm2dImpl, 4>("BatchNorm2d")),
      rule_for<BatchNorm1dImpl>(rules::channel_norm<BatchNorm1dImpl, 0>("BatchNorm1d")),
      rule_for<LayerNormImpl>(rules::layer_norm()),
      rule_for<Conv1dImpl>(rules::convolution<Conv1dImpl, 1>("Conv1d")),
      rule_for<Conv3dImpl>(rules::convolution<Conv3dImpl, 3>("Conv3d")),
      rule_for<ConvTranspose2dImpl>(rules::conv_transpose2d()),
      rule_for<BatchNorm3dImpl>(rules::channel_norm<BatchNorm3dImpl, 5>("BatchNorm3d")),
      rule_for<InstanceNorm1dImpl>(rules::channel_norm<InstanceNorm1dImpl, 0>("InstanceNorm1d")),
      rule_for<InstanceNorm2dImpl>(rules::channel_norm<InstanceNorm2dImpl, 4>("InstanceNorm2d")),
      rule_for<InstanceNorm3dImpl>(rules::channel_norm<InstanceNorm3dImpl, 5>("InstanceNorm3d")),
      rule_for<GroupNormImpl>(rules::group_norm()),
      rule_for<EmbeddingImpl>(rules::embedding()),
      rule_for<MultiheadAttentionImpl>(rules::multihead_attention()),
  };
  return rules;
}

}  // namespace detail

// Registers (or overrides) the rule of modules of type `Impl` and its subclasses: a user's own
// layer kind is then traced, scored, pruned and resized like a built-in one.
template <class Impl>
  requires std::derived_from<Impl, torch::nn::Module>
void register_layer(LayerRule rule) {
  TORCH_CHECK(!rule.tensors.empty() && rule.tensors.front().out_dim >= 0, "fasterai::register_layer: rule '",
              rule.kind, "' must name its weight first, with the dimension of its output channels");
  TORCH_CHECK(static_cast<bool>(rule.set_widths), "fasterai::register_layer: rule '", rule.kind,
              "' has no set_widths; the Pruner must be able to update the layer's options");
  auto& rules = detail::layer_rules();
  rules.insert(rules.begin(), detail::rule_for<Impl>(std::move(rule)));
}

// The rule of a module, or nullptr when its kind is unknown or this instance is not understood
// (then it is a barrier: its channels are kept).
inline const LayerRule* rule_of(const torch::nn::Module& m) {
  for (const auto& r : detail::layer_rules())
    if (r.matches(m)) return r.rule->supported && !r.rule->supported(m) ? nullptr : r.rule.get();
  return nullptr;
}

}  // namespace fasterai
