#pragma once
// The rule of Linear: weight [out, in], bias [out]; the channels are the last dimension of the
// activations, so a Linear on token tensors [N, T, C] (a transformer's projections and MLP) is
// understood as on [N, C].

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

inline LayerRule linear() {
  using Impl = torch::nn::LinearImpl;
  LayerRule r;
  r.kind = "Linear";
  r.role = LayerRole::Producer;
  r.channel_dim = -1;
  r.tensors = {{"weight", 0, 1}, {"bias", 0, -1}};
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t) {
    dynamic_cast<Impl&>(m).options.out_features(out).in_features(in);
  };
  r.macs = [](const torch::nn::Module& m, const std::vector<std::int64_t>&, const std::vector<std::int64_t>& out) {
    return detail::elements(out) * dynamic_cast<const Impl&>(m).weight.size(1);
  };
  return r;
}

}  // namespace fasterai::rules
