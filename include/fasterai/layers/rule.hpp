#pragma once
// One rule per layer kind: everything fasterai knows about a module kind, asked by the graph
// (tracing), the Pruner, the Sparsifier and resize-on-load instead of casting modules themselves.
//
//   fasterai::register_layer<MyGatedLinearImpl>(fasterai::LayerRule{
//       .kind = "MyGatedLinear",
//       .role = fasterai::LayerRole::Producer,
//       .channel_dim = -1,
//       .tensors = {{"weight", 0, 1}, {"bias", 0, -1}, {"gate", 0, -1}},
//       .set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t) {
//         auto& g = dynamic_cast<MyGatedLinearImpl&>(m);
//         g.out_features = out, g.in_features = in;
//       }});
//
// A rule says, for its module: what it does to channels (its role), which dimension of the
// activations holds the channels (1 for NCHW layers, -1 for the last dimension of token
// tensors), which dimension of each parameter and buffer indexes its output and input channels,
// how its channels couple (the groups of a grouped convolution or a GroupNorm), and how its
// options follow new widths. From the tensor dimensions follow the rest: which output channels
// are exact zeros (every zero-deciding tensor zero along that channel), how the layer shrinks
// (index_select along those dimensions, then set_data), and its unit scores (the weight's
// output rows). This is Torch-Pruning's table of per-layer-kind pruning functions, in data.
//
// The built-in rules live one kind per header beside this one; layers/registry.hpp holds the
// table that finds a module's rule and takes users' own (`register_layer`).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace fasterai {

// What a layer does to the channels of the tensor it reads.
enum class LayerRole {
  // Makes new output channels out of all its input channels (within a group when grouped):
  // Conv, Linear, Embedding (whose input is indices: no input channels).
  Producer,
  // Output channel c from input channel c alone: BatchNorm, InstanceNorm, GroupNorm (whose
  // statistics couple the channels of one group: a whole group is removed or kept).
  Norm,
  // Statistics over all the channels it normalises (LayerNorm over the hidden size): removing
  // a channel changes every other one, so such channels are removed only when asked
  // (approximate pruning).
  Normalizing,
  // Known for its cost, not for its channels (a user's layer registered only so that count_macs
  // counts it): a barrier that count_macs still counts.
  Opaque,
};

// Which dimensions of one of the layer's tensors index its channels.
struct TensorChannels {
  std::string name;           // the parameter or buffer ("weight", "running_mean")
  std::int64_t out_dim = -1;  // indexed by output channels; -1: none
  std::int64_t in_dim = -1;   // indexed by input channels (per group when grouped); -1: none
  // Whether the layer's output channel is an exact zero only when this tensor is zero along it
  // (weights and biases, a norm's γ and β; not running statistics).
  bool decides_zero = true;
};

struct LayerRule {
  std::string kind;  // "Conv2d", in barriers and reports
  LayerRole role = LayerRole::Producer;
  // The activations' channel dimension, for the input and the output: 1 (N, C, ...) or -1
  // (..., C).
  std::int64_t channel_dim = 1;
  // The ranks of activation the layer is understood on (0: any): a Conv2d reads 4-D tensors.
  std::int64_t rank = 0;
  // The layer's tensors; the first is the weight (scores, zero test).
  std::vector<TensorChannels> tensors;
  // The number of channel groups that couple input and output (grouped convolutions, the
  // groups of a GroupNorm); nullptr: 1.
  std::function<std::int64_t(const torch::nn::Module&)> groups;
  // Whether output channel o is also input channel o mod (input width): a layer whose inner
  // width must equal the width it reads (LibTorch's MultiheadAttention: in_proj's 3·E rows are
  // the query, key and value of the E channels it reads), so both go together.
  bool tied_widths = false;
  // Whether this instance is understood at all (a LayerNorm over more than the last
  // dimension is not); nullptr: always.
  std::function<bool(const torch::nn::Module&)> supported;
  // Options after the tensors shrank: `out` output channels, `in` input channels, `groups`.
  std::function<void(torch::nn::Module&, std::int64_t out, std::int64_t in, std::int64_t groups)> set_widths;
  // Multiply-accumulates of one call, from the shapes of the tensors that call read and wrote
  // (count_macs traces a batch of one; a Linear on tokens may see them flattened to
  // [tokens, features]); nullptr: none counted.
  std::function<std::int64_t(const torch::nn::Module&, const std::vector<std::int64_t>& input_shape,
                             const std::vector<std::int64_t>& output_shape)>
      macs;
};

namespace detail {

// A rule's tensor of a module: its parameter or buffer of that name (undefined when the module
// has none, a Linear without bias).
inline torch::Tensor layer_tensor(const torch::nn::Module& m, const std::string& name) {
  if (const auto* p = m.named_parameters(/*recurse=*/false).find(name)) return *p;
  if (const auto* b = m.named_buffers(/*recurse=*/false).find(name)) return *b;
  return {};
}

// Elements of a tensor of this shape.
inline std::int64_t elements(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

inline std::int64_t groups_of(const LayerRule& rule, const torch::nn::Module& m) {
  return rule.groups ? rule.groups(m) : 1;
}

}  // namespace detail

// Whether a norm's statistics span all the channels it reads: a LayerNorm, or a grouped norm
// with one group (GroupNorm(1, C)); removing one of its channels is then approximate.
inline bool normalizes_across(const LayerRule& rule, std::int64_t groups) {
  return rule.role == LayerRole::Normalizing || (rule.role == LayerRole::Norm && rule.groups && groups == 1);
}

namespace detail {

// Which slices of `x` along `dim` hold only zeros: bool [x.size(dim)].
inline torch::Tensor zero_slices(const torch::Tensor& x, std::int64_t dim) {
  return x.detach().movedim(dim, 0).reshape({x.size(dim), -1}).eq(0).all(1);
}

// Which output channels of a module are exact zeros whatever it reads: every defined
// zero-deciding tensor is zero along the channel (and at least one is defined: a norm without
// affine parameters emits −μ/σ for a zero input).
inline std::vector<char> zero_outputs(const LayerRule& rule, const torch::nn::Module& m, std::int64_t channels) {
  torch::NoGradGuard no_grad;
  torch::Tensor zero;
  for (const auto& t : rule.tensors) {
    if (!t.decides_zero || t.out_dim < 0) continue;
    const torch::Tensor x = layer_tensor(m, t.name);
    if (!x.defined()) continue;
    torch::Tensor z = zero_slices(x, t.out_dim);
    zero = zero.defined() ? zero & z : z;
  }
  if (!zero.defined()) return std::vector<char>(static_cast<std::size_t>(channels), 0);
  zero = zero.to(torch::kCPU).contiguous();
  return {zero.data_ptr<bool>(), zero.data_ptr<bool>() + zero.numel()};
}

}  // namespace detail
}  // namespace fasterai
