#pragma once
// Giving a layer new widths in place: its tensors get new data (`set_data`, so the parameter
// objects — and the holders and names a user kept — stay the same) and its options say the
// new widths, so that forward, clone() and printing agree with the tensors. The Pruner
// (removing channels) and the state_dict loader (resizing to a file's shapes) both end here.

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/registry.hpp>

namespace fasterai::detail {

// New data for each tensor (a handle on the module's own tensor: set_data changes the tensor
// every handle shares); a gradient of the old shape is dropped (the next backward would add it
// to the new shape).
inline void set_tensor_data(const std::vector<std::pair<torch::Tensor, torch::Tensor>>& tensors) {
  torch::NoGradGuard no_grad;
  for (auto [tensor, value] : tensors) {
    tensor.set_data(value);
    if (tensor.grad().defined()) tensor.mutable_grad() = torch::Tensor();
  }
}

// The options of a layer after its tensors changed, through its rule: `out` output channels (a
// norm's features), `in` inputs, `groups`.
inline void set_layer_widths(torch::nn::Module& layer, std::int64_t out, std::int64_t in, std::int64_t groups) {
  const LayerRule* rule = rule_of(layer);
  TORCH_CHECK(rule != nullptr, "fasterai: no layer rule for module ", layer.name(), " to set its widths");
  rule->set_widths(layer, out, in, groups);
}

}  // namespace fasterai::detail
