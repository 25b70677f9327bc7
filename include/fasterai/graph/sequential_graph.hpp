#pragma once
// The channel-dependency graph of a Sequential, known without running it: each leaf layer
// (nested stages flattened, as the layer walk names them) reads what the one before it wrote.
//
// Shapes are not known statically, so a Flatten takes its block size from the Linear that reads
// it (in_features / channels), and a Linear must follow a Flatten to read channels at all (on a
// 4-D tensor it mixes the width). Layers of other kinds are barriers; `trace` sees through the
// parameter-free operations inside them, given an example input.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/layers/registry.hpp>

namespace fasterai {

namespace detail {

// A layer's channels as its rule says: read (input) and made (output), and whether it works on
// flat [N, features] tensors.
struct StaticWidths {
  std::int64_t in = 0, out = 0;
  bool flat = false;
};
inline StaticWidths static_widths(const LayerRule& rule, const torch::nn::Module& m) {
  const auto& w = rule.tensors.front();
  const torch::Tensor weight = layer_tensor(m, w.name);
  const torch::Tensor any = weight.defined() ? weight : layer_tensor(m, "running_mean");
  if (!any.defined()) return {};
  const auto out = any.size(weight.defined() ? w.out_dim : 0);
  const auto in = rule.role == LayerRole::Producer && w.in_dim >= 0 ? weight.size(w.in_dim) * groups_of(rule, m) : out;
  return {in, out, rule.channel_dim < 0 || (rule.channel_dim == 1 && rule.rank == 0 && rule.role != LayerRole::Producer)};
}

}  // namespace detail

template <sequential_like Model>
Graph graph_of(const Model& model) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  GraphBuilder b;
  // The input's channels: those of the first layer that says.
  std::int64_t in_channels = 1;
  bool flat = false;  // the value is [N, features], not [N, C, H, W]
  for (const Layer& l : all) {
    if (const LayerRule* rule = rule_of(*l.handle)) {
      const auto w = detail::static_widths(*rule, *l.handle);
      if (w.in == 0) continue;
      in_channels = w.in, flat = w.flat;
      break;
    }
  }
  std::int64_t v = b.input(in_channels);
  auto barrier = [&](const Layer& l, std::int64_t out_channels) {
    v = b.barrier(std::string(to_string(l.kind)) + " (" + l.handle->name() + ")", l.name, {v}, out_channels);
  };
  for (std::size_t i = 0; i < all.size(); ++i) {
    const Layer& l = all[i];
    const std::int64_t channels = b.value(v).channels();
    if (const LayerRule* rule = rule_of(*l.handle)) {
      const auto w = detail::static_widths(*rule, *l.handle);
      const bool affine = detail::layer_tensor(*l.handle, rule->tensors.front().name).defined();
      const auto groups = detail::groups_of(*rule, *l.handle);
      if (w.flat != flat || w.in != channels || !affine || w.in == 0 || rule->role == LayerRole::Opaque) {
        barrier(l, w.out > 0 ? w.out : channels);
      } else if (rule->role == LayerRole::Producer) {
        v = b.layer(rule, rule->kind, l.name, v, w.out, groups);
      } else {
        v = b.norm(rule, rule->kind, l.name, v, groups, normalizes_across(*rule, groups));
      }
      flat = w.flat || flat;
      continue;
    }
    switch (l.kind) {
      case LayerKind::ReLU:
      case LayerKind::MaxPool2d:
      case LayerKind::AvgPool2d:
      case LayerKind::AdaptiveAvgPool2d:
      case LayerKind::Dropout:
      case LayerKind::Identity:
        v = b.per_channel(std::string(to_string(l.kind)), v, true);
        break;
      case LayerKind::Flatten: {
        const auto& o = l.as<torch::nn::FlattenImpl>()->options;
        // Only Flatten(1, -1) of [N, C, H, W] lays each channel out as one block; the Linear
        // that reads it (past zero-preserving layers) tells the block's size.
        std::int64_t reader = -1;
        for (std::size_t j = i + 1; j < all.size() && reader < 0; ++j) {
          if (all[j].kind == LayerKind::Linear)
            reader = all[j].as<torch::nn::LinearImpl>()->options.in_features();
          else if (all[j].kind != LayerKind::ReLU && all[j].kind != LayerKind::Dropout &&
                   all[j].kind != LayerKind::Identity)
            break;
        }
        if (flat || o.start_dim() != 1 || o.end_dim() != -1 || reader <= 0 || reader % channels != 0) {
          barrier(l, reader > 0 ? reader : channels);
        } else {
          v = b.flatten("Flatten", v, reader / channels);
        }
        flat = true;
        break;
      }
      default:
        barrier(l, channels);
        break;
    }
  }
  b.output(v);
  return std::move(b).finish();
}

}  // namespace fasterai
