#pragma once
// Pruner: physically removes the channels that filter sparsification zeroed, so the network
// really gets smaller and faster (zeros alone save nothing: dense kernels multiply them too).
//
// Use it after a `Sparsifier` with `granularity::Filter` (one-shot or at the end of training):
//
//   auto pruned = fasterai::Pruner().prune(model);   // `model` is left as it was
//
// For every Conv2d, a channel whose whole group is zero is removed: the convolution's output
// channel (filter and bias entry), the same channel of the BatchNorm2d after it (γ, β, running
// statistics), and what the next layer reads of it — the next Conv2d's input channel, or,
// across AdaptiveAvgPool2d and Flatten, the pool_h·pool_w consecutive input features the channel
// owns in the first Linear. ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, Flatten and
// Identity map a zero channel to a zero channel, so they are crossed unchanged.
//
// Removal is exact: outputs are unchanged in train and eval mode. That is why a channel counts
// as zero only when its filter and bias are zero AND every BatchNorm on its way has γ = β = 0:
// a BatchNorm turns a zero input into β − γ·μ/√(σ² + ε), a constant channel the next layer
// still sees, so removing it would change the outputs. Such channels are kept and counted in
// the report (`constant_channels`). With γ = β = 0 the BatchNorm emits exact zeros whatever
// its input, so the channel contributes nothing downstream.
//
// Channels that reach the model's output (a chain ending in a convolution) are never removed:
// that would change the output's shape. Every convolution keeps at least one channel.
// Grouped convolutions, and any layer not listed above between a convolution and the layer
// that reads its channels (a Sigmoid, a Dropout2d, a BatchNorm1d after the Flatten, ...), are
// refused with a fasterai::argument_error naming the layer; layers before the first convolution
// and after the first Linear are copied as they are.

#include <cstdint>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

// What the Pruner did to one convolution.
struct PrunedLayer {
  std::string name;                     // e.g. "features.0"
  std::int64_t channels_before = 0;     // output channels of the convolution
  std::int64_t channels_after = 0;
  // Channels with an all-zero filter kept because they emit a constant (a nonzero bias, or a
  // BatchNorm after them with γ or β ≠ 0): removing them would change the outputs.
  std::int64_t constant_channels = 0;
  std::int64_t removed() const { return channels_before - channels_after; }
};

struct PruneReport {
  std::vector<PrunedLayer> layers;      // every Conv2d of the model, in forward order
  std::int64_t channels_removed() const {
    std::int64_t n = 0;
    for (const auto& l : layers) n += l.removed();
    return n;
  }
  // False when the model had no zero channel to remove: the result is then a plain copy.
  bool changed() const { return channels_removed() > 0; }
};

class Pruner {
 public:
  // A new model, named like `model`, with every zero channel removed (see the banner).
  // `report()` tells afterwards what was removed.
  template <sequential_like Model>
  torch::nn::Sequential prune(const Model& model);

  // What the last `prune` did.
  const PruneReport& report() const { return report_; }

 private:
  PruneReport report_;
};

namespace detail {

// Channel bookkeeping of one `prune` call, keyed by the layer walk's names: the kept output
// channels of convolutions and BatchNorms, and the kept inputs of the layers that read them.
struct PrunePlan {
  std::map<std::string, torch::Tensor> keep_outputs;  // Conv2d / BatchNorm2d: kept channels
  std::map<std::string, torch::Tensor> keep_inputs;   // Conv2d / Linear: kept input indices
  PruneReport report;
};

inline constexpr const char* pruner_where = "fasterai::Pruner::prune";

[[noreturn]] inline void throw_unsupported(const Layer& layer, const Layer& conv,
                                           std::string_view why) {
  std::ostringstream os;
  os << pruner_where << ": layer '" << layer.name << "' (" << layer.module.ptr()->name()
     << ") is not supported between Conv2d '" << conv.name
     << "' and the layer that reads its channels: " << why
     << "; supported are ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Dropout, Identity, "
        "BatchNorm2d, Flatten(1, -1) and then a Linear, or a Conv2d with groups = 1";
  throw argument_error(os.str());
}

// The layers that one convolution's output channels pass through.
struct ChannelPath {
  std::vector<const Layer*> batch_norms;
  const Layer* reader = nullptr;  // the Conv2d or Linear that reads the channels; none at the end
  bool flattened = false;         // a Flatten lies before the reader
};

inline ChannelPath trace_channels(const std::vector<Layer>& all, std::size_t conv_index) {
  const Layer& conv = all[conv_index];
  const std::int64_t channels = conv.as<torch::nn::Conv2dImpl>()->options.out_channels();
  ChannelPath path;
  for (std::size_t j = conv_index + 1; j < all.size(); ++j) {
    const Layer& layer = all[j];
    switch (layer.kind) {
      case LayerKind::Conv2d:
        if (path.flattened) throw_unsupported(layer, conv, "a Conv2d after a Flatten");
        path.reader = &layer;
        return path;
      case LayerKind::Linear:
        // A Linear on a 4-D tensor mixes the width, not the channels.
        if (!path.flattened) throw_unsupported(layer, conv, "a Linear without a Flatten before it");
        path.reader = &layer;
        return path;
      case LayerKind::BatchNorm2d:
        if (path.flattened) throw_unsupported(layer, conv, "a BatchNorm2d after a Flatten");
        if (layer.as<torch::nn::BatchNorm2dImpl>()->options.num_features() != channels)
          throw_unsupported(layer, conv, "its num_features differs from the channels it receives");
        path.batch_norms.push_back(&layer);
        break;
      case LayerKind::Flatten: {
        const auto& o = layer.as<torch::nn::FlattenImpl>()->options;
        // Only Flatten(1, -1) lays each channel out as one block of consecutive features.
        if (o.start_dim() != 1 || o.end_dim() != -1)
          throw_unsupported(layer, conv, "only Flatten(start_dim = 1, end_dim = -1) keeps channels "
                                         "as consecutive blocks of features");
        path.flattened = true;
        break;
      }
      case LayerKind::ReLU:
      case LayerKind::MaxPool2d:
      case LayerKind::AvgPool2d:
      case LayerKind::AdaptiveAvgPool2d:
      case LayerKind::Dropout:
      case LayerKind::Identity:
        break;  // a zero channel stays a zero channel
      default:
        throw_unsupported(layer, conv, "it may not map a zero channel to a zero channel");
    }
  }
  return path;
}

// Output channels of `conv` that carry exact zeros to the reader (see the banner).
inline torch::Tensor zero_channels(const torch::nn::Conv2dImpl& conv, const ChannelPath& path,
                                   std::int64_t& constant_channels) {
  const std::int64_t channels = conv.weight.size(0);
  const torch::Tensor zero_filters = conv.weight.reshape({channels, -1}).eq(0).all(1);
  torch::Tensor zero = zero_filters.clone();
  if (conv.bias.defined()) zero &= conv.bias.eq(0);
  for (const Layer* layer : path.batch_norms) {
    const auto* bn = layer->as<torch::nn::BatchNorm2dImpl>();
    // Without affine parameters a BatchNorm emits −μ/√(σ² + ε) for a zero input: keep.
    if (bn->options.affine())
      zero &= bn->weight.eq(0) & bn->bias.eq(0);
    else
      zero.fill_(false);
  }
  constant_channels = (zero_filters & ~zero).sum().item<std::int64_t>();
  return zero;
}

// Indices of the `channels_in`-channel input features of a Linear that belong to the kept
// channels: after Flatten(1, -1) channel c owns features [c·s, (c + 1)·s) with s = in / channels.
inline torch::Tensor linear_inputs(const Layer& linear, const Layer& conv,
                                   const torch::Tensor& keep, std::int64_t channels) {
  const std::int64_t in = linear.as<torch::nn::LinearImpl>()->options.in_features();
  if (in % channels != 0)
    throw_unsupported(linear, conv, "its in_features (" + std::to_string(in) +
                                        ") is not a multiple of the channels it receives (" +
                                        std::to_string(channels) + ")");
  const std::int64_t s = in / channels;
  return (keep.unsqueeze(1) * s + torch::arange(s, keep.options()).unsqueeze(0)).reshape({-1});
}

inline PrunePlan plan_pruning(const std::vector<Layer>& all) {
  torch::NoGradGuard no_grad;
  PrunePlan plan;
  for (std::size_t i = 0; i < all.size(); ++i) {
    if (all[i].kind != LayerKind::Conv2d) continue;
    const Layer& layer = all[i];
    const auto& conv = *layer.as<torch::nn::Conv2dImpl>();
    // A grouped convolution ties input channels to output channels group by group.
    if (conv.options.groups() != 1)
      throw argument_error(std::string(pruner_where) + ": Conv2d '" + layer.name + "' has groups = " +
                           std::to_string(conv.options.groups()) +
                           "; grouped convolutions are not supported, only groups = 1");
    const ChannelPath path = trace_channels(all, i);
    const std::int64_t channels = conv.weight.size(0);
    PrunedLayer entry{layer.name, channels, channels, 0};
    torch::Tensor zero = zero_channels(conv, path, entry.constant_channels);
    // Channels that reach the model's output are part of its result.
    if (path.reader == nullptr) zero.fill_(false);
    torch::Tensor keep = (~zero).nonzero().reshape({-1});
    if (keep.numel() == 0) keep = torch::zeros({1}, keep.options());  // keep one channel
    entry.channels_after = keep.numel();
    plan.report.layers.push_back(entry);
    if (entry.removed() == 0) continue;
    plan.keep_outputs[layer.name] = keep;
    for (const Layer* bn : path.batch_norms) plan.keep_outputs[bn->name] = keep;
    plan.keep_inputs[path.reader->name] =
        path.reader->kind == LayerKind::Linear ? linear_inputs(*path.reader, layer, keep, channels)
                                               : keep;
  }
  return plan;
}

inline const torch::Tensor* find_keep(const std::map<std::string, torch::Tensor>& map,
                                      const std::string& name) {
  const auto it = map.find(name);
  return it == map.end() ? nullptr : &it->second;
}

inline torch::Tensor select(const torch::Tensor& t, std::int64_t dim, const torch::Tensor* keep) {
  return keep == nullptr ? t : t.index_select(dim, keep->to(t.device()));
}

inline torch::nn::Conv2d pruned_conv(const torch::nn::Conv2dImpl& conv, const torch::Tensor* in,
                                     const torch::Tensor* out) {
  const auto& o = conv.options;
  const torch::Tensor weight = select(select(conv.weight, 0, out), 1, in);
  torch::nn::Conv2d result = placed_like(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(weight.size(1), weight.size(0), o.kernel_size())
                            .stride(o.stride())
                            .padding(o.padding())
                            .dilation(o.dilation())
                            .groups(o.groups())
                            .bias(o.bias())
                            .padding_mode(o.padding_mode())),
      conv.weight);
  result->weight.copy_(weight);
  if (o.bias()) result->bias.copy_(select(conv.bias, 0, out));
  return result;
}

inline torch::nn::BatchNorm2d pruned_batch_norm(const torch::nn::BatchNorm2dImpl& bn,
                                                const torch::Tensor& keep) {
  auto options = bn.options;
  options.num_features(keep.numel());
  const torch::Tensor like = bn.options.affine() ? bn.weight : bn.running_mean;
  torch::nn::BatchNorm2d result(options);
  if (like.defined()) result = placed_like(result, like);
  if (options.affine()) {
    result->weight.copy_(select(bn.weight, 0, &keep));
    result->bias.copy_(select(bn.bias, 0, &keep));
  }
  if (options.track_running_stats()) {
    result->running_mean.copy_(select(bn.running_mean, 0, &keep));
    result->running_var.copy_(select(bn.running_var, 0, &keep));
    result->num_batches_tracked.copy_(bn.num_batches_tracked);
  }
  return result;
}

inline torch::nn::Linear pruned_linear(const torch::nn::LinearImpl& linear,
                                       const torch::Tensor& keep) {
  const auto& o = linear.options;
  torch::nn::Linear result = placed_like(
      torch::nn::Linear(torch::nn::LinearOptions(keep.numel(), o.out_features()).bias(o.bias())),
      linear.weight);
  result->weight.copy_(select(linear.weight, 1, &keep));
  if (o.bias()) result->bias.copy_(linear.bias);
  return result;
}

}  // namespace detail

template <sequential_like Model>
torch::nn::Sequential Pruner::prune(const Model& model) {
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  detail::PrunePlan plan = detail::plan_pruning(all);
  torch::NoGradGuard no_grad;
  auto result = detail::rebuild(model, [&](const std::string& name, const torch::nn::AnyModule& any) {
    const torch::Tensor* out = detail::find_keep(plan.keep_outputs, name);
    const torch::Tensor* in = detail::find_keep(plan.keep_inputs, name);
    if (out == nullptr && in == nullptr) return detail::LeafAction::keep();
    const torch::nn::Module& m = *any.ptr();
    if (const auto* conv = m.as<torch::nn::Conv2dImpl>())
      return detail::LeafAction::replace(detail::pruned_conv(*conv, in, out));
    if (const auto* bn = m.as<torch::nn::BatchNorm2dImpl>())
      return detail::LeafAction::replace(detail::pruned_batch_norm(*bn, *out));
    return detail::LeafAction::replace(
        detail::pruned_linear(*m.as<torch::nn::LinearImpl>(), *in));
  });
  report_ = std::move(plan.report);
  return result;
}

}  // namespace fasterai
