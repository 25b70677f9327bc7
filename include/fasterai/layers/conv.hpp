#pragma once
// The rule of convolutions (Conv1d, Conv2d, Conv3d): weight [out, in / groups, k...], bias
// [out]; channels on dimension 1 of the activations. A grouped convolution couples each
// group's input and output channels (a depthwise one, input c with output c), so whole groups
// are removed and `groups` follows.

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

template <class ConvImpl, std::int64_t Dims>
LayerRule convolution(const char* kind) {
  LayerRule r;
  r.kind = kind;
  r.role = LayerRole::Producer;
  r.channel_dim = 1;
  r.rank = Dims + 2;
  r.tensors = {{"weight", 0, 1}, {"bias", 0, -1}};
  r.groups = [](const torch::nn::Module& m) { return dynamic_cast<const ConvImpl&>(m).options.groups(); };
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t groups) {
    dynamic_cast<ConvImpl&>(m).options.out_channels(out).in_channels(in).groups(groups);
  };
  r.macs = [](const torch::nn::Module& m, const std::vector<std::int64_t>&, const std::vector<std::int64_t>& out) {
    const auto& w = dynamic_cast<const ConvImpl&>(m).weight;  // each output reads in/groups × kernel
    return detail::elements(out) * (w.numel() / w.size(0));
  };
  return r;
}

// ConvTranspose2d: weight [in, out / groups, kh, kw]; ungrouped ones only.
inline LayerRule conv_transpose2d() {
  using Impl = torch::nn::ConvTranspose2dImpl;
  LayerRule r;
  r.kind = "ConvTranspose2d";
  r.role = LayerRole::Producer;
  r.channel_dim = 1;
  r.rank = 4;
  r.tensors = {{"weight", 1, 0}, {"bias", 0, -1}};
  r.supported = [](const torch::nn::Module& m) { return dynamic_cast<const Impl&>(m).options.groups() == 1; };
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t) {
    dynamic_cast<Impl&>(m).options.out_channels(out).in_channels(in);
  };
  r.macs = [](const torch::nn::Module& m, const std::vector<std::int64_t>& in, const std::vector<std::int64_t>&) {
    const auto& w = dynamic_cast<const Impl&>(m).weight;  // each input scatters into out × kernel
    return detail::elements(in) * (w.numel() / w.size(0));
  };
  return r;
}

}  // namespace fasterai::rules
