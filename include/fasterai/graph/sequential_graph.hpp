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
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/graph/graph.hpp>

namespace fasterai {

template <sequential_like Model>
Graph graph_of(const Model& model) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  GraphBuilder b;
  // The input's channels: those of the first layer that says.
  std::int64_t in_channels = 1;
  bool flat = false;  // the value is [N, features], not [N, C, H, W]
  for (const Layer& l : all) {
    if (const auto* c = l.as<torch::nn::Conv2dImpl>()) {
      in_channels = c->options.in_channels();
      break;
    }
    if (const auto* li = l.as<torch::nn::LinearImpl>()) {
      in_channels = li->options.in_features(), flat = true;
      break;
    }
    if (const auto* bn = l.as<torch::nn::BatchNorm2dImpl>()) {
      in_channels = bn->options.num_features();
      break;
    }
    if (const auto* bn1 = l.as<torch::nn::BatchNorm1dImpl>()) {
      in_channels = bn1->options.num_features(), flat = true;
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
    switch (l.kind) {
      case LayerKind::Conv2d: {
        const auto& o = l.as<torch::nn::Conv2dImpl>()->options;
        if (flat || o.in_channels() != channels) {
          barrier(l, o.out_channels());
        } else {
          v = b.layer(OpKind::Conv2d, "Conv2d", l.name, v, o.out_channels(), o.groups());
        }
        break;
      }
      case LayerKind::Linear: {
        const auto& o = l.as<torch::nn::LinearImpl>()->options;
        if (!flat || o.in_features() != channels) {
          barrier(l, o.out_features());
          flat = true;
        } else {
          v = b.layer(OpKind::Linear, "Linear", l.name, v, o.out_features());
        }
        break;
      }
      case LayerKind::BatchNorm2d:
      case LayerKind::BatchNorm1d: {
        const bool two_d = l.kind == LayerKind::BatchNorm2d;
        const auto features = two_d ? l.as<torch::nn::BatchNorm2dImpl>()->options.num_features()
                                    : l.as<torch::nn::BatchNorm1dImpl>()->options.num_features();
        const bool affine = two_d ? l.as<torch::nn::BatchNorm2dImpl>()->options.affine()
                                  : l.as<torch::nn::BatchNorm1dImpl>()->options.affine();
        if (features != channels || flat == two_d || !affine)
          barrier(l, channels);
        else
          v = b.batch_norm(std::string(to_string(l.kind)), l.name, v);
        break;
      }
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
      case LayerKind::Other:
        barrier(l, channels);
        break;
    }
  }
  b.output(v);
  return std::move(b).finish();
}

}  // namespace fasterai
