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

// Layers a sparsifier scores and masks.
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
  // The weight of a prunable layer.
  torch::Tensor& weight() const {
    if (auto* c = as<torch::nn::Conv2dImpl>()) return c->weight;
    if (auto* l = as<torch::nn::LinearImpl>()) return l->weight;
    throw std::logic_error("fasterai: layer '" + name + "' (" + std::string(to_string(kind)) +
                           ") has no prunable weight");
  }
  // The bias of a prunable layer; undefined when the layer has none.
  torch::Tensor& bias() const {
    if (auto* c = as<torch::nn::Conv2dImpl>()) return c->bias;
    if (auto* l = as<torch::nn::LinearImpl>()) return l->bias;
    throw std::logic_error("fasterai: layer '" + name + "' (" + std::string(to_string(kind)) +
                           ") has no bias");
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
      out.push_back(Layer{std::move(name), kind_of(*any.ptr()), any, any.ptr()});
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
    for (const auto& item : detail::impl(model).named_modules("", /*include_self=*/false))
      if (item.value()->children().empty())
        out->push_back(Layer{item.key(), kind_of(*item.value()), {}, item.value()});
  }
  return LayerView(std::move(out));
}

// The leaf layers of `model` of one kind.
template <module Model>
auto layers(const Model& model, LayerKind kind) {
  return layers(model) | ranges::views::filter([kind](const Layer& l) { return l.kind == kind; });
}

// The layers a sparsifier can score and mask (Conv2d and Linear).
template <module Model>
auto prunable_layers(const Model& model) {
  return layers(model) | ranges::views::filter([](const Layer& l) { return is_prunable(l.kind); });
}

}  // namespace fasterai
