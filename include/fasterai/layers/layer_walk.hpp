#pragma once
// Layer walk: the leaf layers of a model, each with its qualified state_dict name
// (`features.0`, `layer1.0.conv1`) and its kind. For a (possibly nested) Sequential they come in
// forward order; for any other module in registration order (`named_modules`), since only a
// forward pass can tell the order (see graph/trace.hpp). The sparsifier, the statistics and the
// transforms all iterate on this view, so modules are told apart in exactly one place
// (`kind_of`).

#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <range/v3/view/filter.hpp>
#include <range/v3/view/interface.hpp>
#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/layers/registry.hpp>

namespace fasterai {

enum class LayerKind {
  Conv2d,
  Linear,
  BatchNorm2d,
  BatchNorm1d,
  ReLU,
  MaxPool2d,
  AvgPool2d,
  AdaptiveAvgPool2d,
  Dropout,
  Flatten,
  Identity,
  Other,
};

constexpr std::string_view to_string(LayerKind kind) {
  switch (kind) {
    case LayerKind::Conv2d: return "Conv2d";
    case LayerKind::Linear: return "Linear";
    case LayerKind::BatchNorm2d: return "BatchNorm2d";
    case LayerKind::BatchNorm1d: return "BatchNorm1d";
    case LayerKind::ReLU: return "ReLU";
    case LayerKind::MaxPool2d: return "MaxPool2d";
    case LayerKind::AvgPool2d: return "AvgPool2d";
    case LayerKind::AdaptiveAvgPool2d: return "AdaptiveAvgPool2d";
    case LayerKind::Dropout: return "Dropout";
    case LayerKind::Flatten: return "Flatten";
    case LayerKind::Identity: return "Identity";
    case LayerKind::Other: return "Other";
  }
  return "Other";
}

inline std::ostream& operator<<(std::ostream& os, LayerKind kind) { return os << to_string(kind); }

// The one place where a type-erased module is told apart.
inline LayerKind kind_of(const torch::nn::Module& m) {
  using namespace torch::nn;
  if (m.as<Conv2dImpl>()) return LayerKind::Conv2d;
  if (m.as<LinearImpl>()) return LayerKind::Linear;
  if (m.as<BatchNorm2dImpl>()) return LayerKind::BatchNorm2d;
  if (m.as<BatchNorm1dImpl>()) return LayerKind::BatchNorm1d;
  if (m.as<ReLUImpl>()) return LayerKind::ReLU;
  if (m.as<MaxPool2dImpl>()) return LayerKind::MaxPool2d;
  if (m.as<AvgPool2dImpl>()) return LayerKind::AvgPool2d;
  if (m.as<AdaptiveAvgPool2dImpl>()) return LayerKind::AdaptiveAvgPool2d;
  if (m.as<DropoutImpl>()) return LayerKind::Dropout;
  if (m.as<FlattenImpl>()) return LayerKind::Flatten;
  if (m.as<IdentityImpl>()) return LayerKind::Identity;
  return LayerKind::Other;
}

// Kinds a sparsifier scores and masks by their own name; other layers qualify by their rule
// (see is_prunable(const Layer&)).
constexpr bool is_prunable(LayerKind kind) {
  return kind == LayerKind::Conv2d || kind == LayerKind::Linear;
}

// One leaf layer of a model.
struct Layer {
  std::string name;                     // qualified state_dict prefix, e.g. "features.0"
  LayerKind kind = LayerKind::Other;
  torch::nn::AnyModule module;          // a Sequential's child (shares the model's layer); empty
                                        // for layers of other modules, which cannot run alone
  std::shared_ptr<torch::nn::Module> handle;  // the model's layer itself
  const LayerRule* rule = nullptr;            // its layer rule; nullptr: none

  // The typed layer, or nullptr when it is not an `Impl`.
  template <class Impl>
  Impl* as() const {
    return handle->as<Impl>();
  }
  // Runs a Sequential's child on its own.
  torch::Tensor forward(const torch::Tensor& x) const {
    torch::nn::AnyModule copy = module;  // a second handle on the same layer
    return copy.forward(x);
  }
  // The weight of a prunable layer (a handle on the layer's own tensor): a Conv2d's or Linear's,
  // or the first tensor of its rule when that tensor's rows are the output channels
  // (MultiheadAttention's in_proj_weight, a Conv1d's weight).
  torch::Tensor weight() const {
    if (auto* c = as<torch::nn::Conv2dImpl>()) return c->weight;
    if (auto* l = as<torch::nn::LinearImpl>()) return l->weight;
    if (rows_are_outputs()) return detail::layer_tensor(*handle, rule->tensors.front().name);
    throw std::logic_error("fasterai: layer '" + name + "' (" + std::string(to_string(kind)) +
                           ") has no prunable weight");
  }
  // The bias of a prunable layer; undefined when the layer has none.
  torch::Tensor bias() const {
    if (auto* c = as<torch::nn::Conv2dImpl>()) return c->bias;
    if (auto* l = as<torch::nn::LinearImpl>()) return l->bias;
    if (rows_are_outputs()) {
      for (std::size_t i = 1; i < rule->tensors.size(); ++i)
        if (const auto& t = rule->tensors[i]; t.out_dim == 0 && t.in_dim < 0 && t.decides_zero)
          return detail::layer_tensor(*handle, t.name);
      return {};
    }
    throw std::logic_error("fasterai: layer '" + name + "' (" + std::string(to_string(kind)) +
                           ") has no bias");
  }
  // A layer of another kind that makes channels from the channels it reads, one weight row per
  // output channel.
  bool rows_are_outputs() const {
    return rule != nullptr && rule->role == LayerRole::Producer && !rule->tensors.empty() &&
           rule->tensors.front().out_dim == 0 && rule->tensors.front().in_dim == 1;
  }
};

// A cheap-to-copy view over the leaf layers of a model, in forward order.
class LayerView : public ranges::view_interface<LayerView> {
 public:
  LayerView() : layers_(std::make_shared<const std::vector<Layer>>()) {}
  explicit LayerView(std::shared_ptr<const std::vector<Layer>> layers)
      : layers_(std::move(layers)) {}
  auto begin() const { return layers_->begin(); }
  auto end() const { return layers_->end(); }

 private:
  std::shared_ptr<const std::vector<Layer>> layers_;
};

namespace detail {

inline std::string join_name(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

inline void collect_layers(const torch::nn::SequentialImpl& seq, const std::string& prefix,
                           std::vector<Layer>& out) {
  for_each_child(seq, [&](const std::string& child, const torch::nn::AnyModule& any) {
    std::string name = join_name(prefix, child);
    if (const auto* nested = any.ptr()->as<torch::nn::SequentialImpl>()) {
      collect_layers(*nested, name, out);
    } else {
      out.push_back(Layer{std::move(name), kind_of(*any.ptr()), any, any.ptr(), rule_of(*any.ptr())});
    }
  });
}

}  // namespace detail

// The leaf layers of `model`: in forward order for a Sequential, in registration order otherwise.
template <module Model>
LayerView layers(const Model& model) {
  auto out = std::make_shared<std::vector<Layer>>();
  if constexpr (sequential_like<Model>) {
    detail::collect_layers(detail::impl(model), "", *out);
  } else {
    // Leaves, and modules with a layer rule that hold children (MultiheadAttention and its
    // out_proj).
    for (const auto& item : detail::impl(model).named_modules("", /*include_self=*/false))
      if (const LayerRule* rule = rule_of(*item.value()); item.value()->children().empty() || rule)
        out->push_back(Layer{item.key(), kind_of(*item.value()), {}, item.value(), rule});
  }
  return LayerView(std::move(out));
}

// The leaf layers of `model` of one kind.
template <module Model>
auto layers(const Model& model, LayerKind kind) {
  return layers(model) | ranges::views::filter([kind](const Layer& l) { return l.kind == kind; });
}

// Whether a sparsifier can score and mask the layer: a Conv2d, a Linear, or a layer whose rule
// says its weight's rows are its output channels.
inline bool is_prunable(const Layer& l) { return is_prunable(l.kind) || l.rows_are_outputs(); }

// The layers a sparsifier can score and mask.
template <module Model>
auto prunable_layers(const Model& model) {
  return layers(model) | ranges::views::filter([](const Layer& l) { return is_prunable(l); });
}

}  // namespace fasterai
