#pragma once
// Giving a layer new widths in place: its tensors get new data (`set_data`, so the parameter
// objects — and the holders and names a user kept — stay the same) and its options say the
// new widths, so that forward, clone() and printing agree with the tensors. The Pruner
// (removing channels) and the state_dict loader (resizing to a file's shapes) both end here.

#include <cstdint>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace fasterai::detail {

// New data for each tensor; a gradient of the old shape is dropped (the next backward would
// add it to the new shape).
inline void set_tensor_data(const std::vector<std::pair<torch::Tensor*, torch::Tensor>>& tensors) {
  torch::NoGradGuard no_grad;
  for (const auto& [tensor, value] : tensors) {
    tensor->set_data(value);
    if (tensor->grad().defined()) tensor->mutable_grad() = torch::Tensor();
  }
}

// The options of a Conv2d, Linear or BatchNorm after its tensors changed: `out` output channels
// or features (a BatchNorm's features), `in` inputs, `groups` of a convolution.
inline void set_layer_widths(torch::nn::Module& layer, std::int64_t out, std::int64_t in, std::int64_t groups) {
  if (auto* conv = layer.as<torch::nn::Conv2dImpl>())
    conv->options.out_channels(out).in_channels(in).groups(groups);
  else if (auto* linear = layer.as<torch::nn::LinearImpl>())
    linear->options.out_features(out).in_features(in);
  else if (auto* bn2 = layer.as<torch::nn::BatchNorm2dImpl>())
    bn2->options.num_features(out);
  else if (auto* bn1 = layer.as<torch::nn::BatchNorm1dImpl>())
    bn1->options.num_features(out);
}

}  // namespace fasterai::detail
