#pragma once
// The rules of normalization layers. BatchNorm and InstanceNorm normalise each channel alone:
// channel c out of channel c in, γ, β and the running statistics indexed by channel, so removing
// a channel leaves the others exact. GroupNorm takes its statistics over the channels of one
// group: a whole group is removed or kept (its channels are one unit), and num_groups follows.
// LayerNorm over the hidden size takes its mean and variance over every channel it normalises:
// removing one changes the rest, so it is `Normalizing` and its channels go only when
// approximate pruning is asked for.

#include <cstdint>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

namespace detail {
inline std::vector<TensorChannels> norm_tensors() {
  return {{"weight", 0, -1}, {"bias", 0, -1}, {"running_mean", 0, -1, false}, {"running_var", 0, -1, false}};
}
}  // namespace detail

// BatchNorm1d/2d/3d and InstanceNorm1d/2d/3d: options.num_features. `Rank`: the activations'
// rank (0 for the 1d kinds, which read [N, C] and [N, C, L]).
template <class Impl, std::int64_t Rank>
LayerRule channel_norm(const char* kind) {
  LayerRule r;
  r.kind = kind;
  r.role = LayerRole::Norm;
  r.channel_dim = 1;
  r.rank = Rank;
  r.tensors = detail::norm_tensors();
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t, std::int64_t) {
    dynamic_cast<Impl&>(m).options.num_features(out);
  };
  return r;
}

inline LayerRule group_norm() {
  using Impl = torch::nn::GroupNormImpl;
  LayerRule r;
  r.kind = "GroupNorm";
  r.role = LayerRole::Norm;
  r.channel_dim = 1;
  r.tensors = {{"weight", 0, -1}, {"bias", 0, -1}};
  r.groups = [](const torch::nn::Module& m) { return dynamic_cast<const Impl&>(m).options.num_groups(); };
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t, std::int64_t groups) {
    dynamic_cast<Impl&>(m).options.num_channels(out).num_groups(groups);
  };
  return r;
}

// LayerNorm over the last dimension (normalized_shape of one element): the hidden size of a
// transformer, the channels of ConvNeXt's channels-last blocks.
inline LayerRule layer_norm() {
  using Impl = torch::nn::LayerNormImpl;
  LayerRule r;
  r.kind = "LayerNorm";
  r.role = LayerRole::Normalizing;
  r.channel_dim = -1;
  r.tensors = {{"weight", 0, -1}, {"bias", 0, -1}};
  r.supported = [](const torch::nn::Module& m) {
    return dynamic_cast<const Impl&>(m).options.normalized_shape().size() == 1;
  };
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t, std::int64_t) {
    dynamic_cast<Impl&>(m).options.normalized_shape({out});
  };
  return r;
}

}  // namespace fasterai::rules
