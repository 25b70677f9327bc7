#pragma once
// Dynamic int8 quantization of Linear layers: weights stored and multiplied in int8,
// activations quantized on the fly, batch by batch, so no calibration data is needed and
// inputs and outputs stay fp32. It pays where reading the weights dominates — the large
// fully-connected layers of a classifier at small batch sizes.
//
//   auto q = fasterai::quantize_dynamic(model);            // `model` is left as it was
//   auto some = fasterai::quantize_dynamic(model, fasterai::DynamicQuantOptions()
//                                                     .layers({"classifier.0"}));
//
// The result is a new model of the same nested, named structure, in eval mode, in which each
// chosen Linear is a `quant::QuantizedLinear`; every other layer is a copy.
//
// Models are Sequential-like (the zoo included). A user's module that holds a
// `torch::nn::Linear` member cannot have it swapped: the holder can only point to a
// `LinearImpl`, and `LinearImpl::forward` is not virtual, so no int8 layer can stand in for it
// (such a module does not satisfy `sequential_like` and is refused at compile time). What
// such a module can do is hold its Linear layers in a `torch::nn::Sequential` member and point
// that holder to the quantized copy:
//
//   head = register_module("head", fasterai::quantize_dynamic(head));   // replace_module if registered

#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/quant/quantized_layers.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

struct DynamicQuantOptions {
  DynamicQuantOptions() = default;
  // Names of the Linear layers to quantize, as the layer walk names them ("classifier.0");
  // empty: every Linear.
  TORCH_ARG(std::vector<std::string>, layers) = {};
  // One scale per output row (finer) or one for the whole weight.
  TORCH_ARG(bool, per_channel) = true;
  // The engine the weights are packed for (see quant/engine.hpp).
  TORCH_ARG(std::string, engine) = quant::QuantEngines().linear();
};

namespace detail {

inline constexpr const char* dynamic_where = "fasterai::quantize_dynamic";

// The chosen layers by name: each must exist and be of a kind in `allowed`. Empty `chosen`
// means every layer of those kinds.
inline std::set<std::string> chosen_layers(const std::vector<Layer>& all,
                                           const std::vector<std::string>& chosen,
                                           const std::vector<LayerKind>& allowed,
                                           const char* where, const std::string& hint) {
  const auto allowed_kind = [&](LayerKind k) {
    return std::find(allowed.begin(), allowed.end(), k) != allowed.end();
  };
  std::set<std::string> names;
  if (chosen.empty()) {
    for (const Layer& l : all)
      if (allowed_kind(l.kind)) names.insert(l.name);
    return names;
  }
  for (const std::string& name : chosen) {
    const auto it = std::find_if(all.begin(), all.end(), [&](const Layer& l) { return l.name == name; });
    check_argument(it != all.end(), where, "layers", "'" + name + "'",
                   "names of the model's layers, e.g. 'classifier.0'");
    check_argument(allowed_kind(it->kind), where, "layers",
                   "'" + name + "' (a " + std::string(to_string(it->kind)) + ")", hint);
    names.insert(name);
  }
  return names;
}

inline void check_finite_weights(const Layer& layer, const char* where) {
  torch::NoGradGuard no_grad;
  const bool finite = torch::isfinite(layer.weight()).all().item<bool>() &&
                      (!layer.bias().defined() || torch::isfinite(layer.bias()).all().item<bool>());
  check_argument(finite, where, "model", "layer '" + layer.name + "' with non-finite weights",
                 "finite weights (a diverged or corrupt model cannot be quantized)");
}

}  // namespace detail

template <sequential_like Model>
torch::nn::Sequential quantize_dynamic(const Model& model, const DynamicQuantOptions& options = {}) {
  constexpr auto where = detail::dynamic_where;
  quant::engine_from_name(where, "engine", options.engine());
  const LayerView view = layers(model);
  const std::vector<Layer> all(view.begin(), view.end());
  const std::set<std::string> chosen = detail::chosen_layers(
      all, options.layers(), {LayerKind::Linear}, where,
      "Linear layers (dynamic quantization is for Linear; quantize convolutions statically "
      "with fasterai::Calibrator)");
  detail::check_argument(!chosen.empty(), where, "model", "a model without Linear layers",
                         "a model with at least one Linear layer");
  for (const Layer& l : all)
    if (chosen.count(l.name) != 0) detail::check_finite_weights(l, where);

  torch::NoGradGuard no_grad;
  auto result = detail::rebuild(model, [&](const std::string& name, const torch::nn::AnyModule& any) {
    if (chosen.count(name) == 0) return detail::LeafAction::keep();
    const auto& linear = *any.ptr()->as<torch::nn::LinearImpl>();
    return detail::LeafAction::replace(quant::QuantizedLinear(
        quant::quantize_weight(linear.weight, options.per_channel()), linear.bias,
        quant::QuantizedLayerOptions().dynamic(true).engine(options.engine())));
  });
  result->eval();
  return result;
}

}  // namespace fasterai
