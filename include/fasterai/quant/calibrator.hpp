#pragma once
// Static post-training quantization of Conv2d/Linear chains, calibrated on the user's data.
//
//   fasterai::Calibrator calibrator(model);                 // folds BN, fuses ReLU, plans chains
//   calibrator.observe(learner.valid_data(), /*max_batches=*/16);   // or any range of tensors
//   auto q = calibrator.convert();                          // a new int8 model; `model` unchanged
//
//   auto q = fasterai::quantize_static(model, batches);     // the same in one call
//   fasterai::Calibrator<fasterai::quant::PercentileObserver> c(model, {}, quant::PercentileObserver(99.99));
//
// What happens, in order:
//  1. BatchNorms are folded into the layer before them (BNFolder), on a copy.
//  2. A ReLU directly after a Conv2d or Linear is fused into it (the int8 kernel applies it
//     before requantizing, so the output map covers only [0, max]); the ReLU becomes Identity.
//  3. Chains: consecutive layers that can run on int8 tensors — quantized Conv2d and Linear,
//     and ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, Identity between
//     them — are quantized once at the chain's entry (its first Conv2d/Linear quantizes its
//     fp32 input) and dequantized once at the exit (its last Conv2d/Linear returns fp32). Any
//     other layer (a BatchNorm that could not be folded, a layer kind fasterai does not know, a
//     Conv2d/Linear left out by `layers`) runs in fp32 between two chains.
//  4. Calibration runs the folded fp32 model on the user's batches and observes each chain's
//     input and every quantized layer's output (after its fused ReLU).
//  5. `convert` quantizes each weight (symmetric int8, per output channel by default), packs it
//     for its layer kind's engine, and builds the new model.
//
// Residual connections cannot occur: models here are Sequential-like chains.

#include <cmath>
#include <cstdint>
#include <optional>
#include <ranges>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>
#include <fasterai/quant/quantized_layers.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

struct StaticQuantOptions {
  StaticQuantOptions() = default;
  // Conv2d and Linear layers to quantize, by name ("features.0"); empty: every one.
  TORCH_ARG(std::vector<std::string>, layers) = {};
  // Weights: one scale per output channel (finer) or one per tensor.
  TORCH_ARG(bool, per_channel) = true;
  // The engine each layer kind is packed for.
  TORCH_ARG(quant::QuantEngines, engines) = quant::QuantEngines();
};

namespace detail {

inline constexpr const char* calibrator_where = "fasterai::Calibrator";

// Layers that run unchanged on a quint8 tensor (eval-mode dropout returns its input).
constexpr bool runs_on_int8(LayerKind kind) {
  switch (kind) {
    case LayerKind::ReLU:
    case LayerKind::MaxPool2d:
    case LayerKind::AvgPool2d:
    case LayerKind::AdaptiveAvgPool2d:
    case LayerKind::Flatten:
    case LayerKind::Dropout:
    case LayerKind::Identity: return true;
    default: return false;
  }
}

// What calibration and conversion do at one leaf layer.
struct QuantStep {
  enum class Role { fp32, int8_passthrough, quantized, fused_relu } role = Role::fp32;
  int input_observer = -1;   // a chain's entry: observe (and later quantize) the input here
  int output_observer = -1;  // observe the output after this leaf (a quantized layer's, or its fused ReLU's)
  bool relu = false;         // quantized layer with the next leaf's ReLU fused
  bool dequantize = false;   // a chain's exit
};

inline torch::Tensor input_of(const torch::Tensor& batch) { return batch; }
inline torch::Tensor input_of(const torch::data::Example<>& batch) { return batch.data; }

// A convolution the quantized kernels can run, or the reason it cannot. (Options hold
// c10::variant in LibTorch 1.x and std::variant in 2.x: unqualified calls find either.)
inline std::optional<std::string> unsupported_conv(const torch::nn::Conv2dImpl& conv) {
  const auto& o = conv.options;
  if (!holds_alternative<torch::enumtype::kZeros>(o.padding_mode()))
    return "padding_mode other than zeros";
  if (holds_alternative<torch::enumtype::kSame>(o.padding())) return "padding 'same'";
  return std::nullopt;
}

inline quant::ConvGeometry geometry_of(const torch::nn::Conv2dImpl& conv) {
  const auto& o = conv.options;
  quant::ConvGeometry g;
  g.stride = {o.stride()->at(0), o.stride()->at(1)};
  if (const auto* p = get_if<torch::ExpandingArray<2>>(&o.padding()))
    g.padding = {(*p)->at(0), (*p)->at(1)};
  else
    g.padding = {0, 0};  // 'valid'
  g.dilation = {o.dilation()->at(0), o.dilation()->at(1)};
  g.groups = o.groups();
  return g;
}

}  // namespace detail

template <quant::observer Observer>
class QuantizationAwareTraining;

template <quant::observer Observer = quant::MinMaxObserver>
class Calibrator {
 public:
  // Plans the quantization of `model` (left as it was): folds, fuses, finds chains, makes one
  // observer per activation map (copies of `prototype`). Throws fasterai::argument_error for an
  // engine not built in, a layer name that is not a Conv2d/Linear of the model, a convolution
  // the int8 kernels cannot run, or non-finite weights.
  template <sequential_like Model>
  explicit Calibrator(const Model& model, StaticQuantOptions options = {},
                      Observer prototype = Observer());

  // Runs one batch (N×C×H×W or N×features, fp32) through the folded fp32 model and observes it.
  void observe(const torch::Tensor& batch);
  // The first `max_batches` batches of `data` (all when 0), e.g. a Learner's `valid_data()`.
  void observe(const data::Batches& data, std::size_t max_batches = 0);
  // Every batch of a range of tensors or of torch::data::Example<>s.
  template <std::ranges::input_range Range>
    requires(!std::is_convertible_v<const Range&, const data::Batches&>)
  void observe(const Range& batches) {
    for (const auto& batch : batches) observe(detail::input_of(batch));
  }

  std::int64_t batches_observed() const { return batches_; }
  // The model that is calibrated and converted: BatchNorms folded, in eval mode.
  const torch::nn::Sequential& folded() const { return folded_; }
  const FoldReport& fold_report() const { return fold_report_; }

  // The int8 model, in eval mode. Throws fasterai::argument_error, changing nothing, when no
  // batch was observed or an observed activation was not finite.
  torch::nn::Sequential convert() const;
  // The int8 model with `activations` (one map per observer, in the order observe() fills
  // them) in place of the calibrated maps: quantization-aware training (qat.hpp) learns them
  // while fine-tuning and converts here. Needs no observed batch.
  torch::nn::Sequential convert(const std::vector<quant::QuantParams>& activations) const;

 private:
  // Builds its fake-quantized model from this plan (steps_, leaves_, observers_).
  friend class QuantizationAwareTraining<Observer>;

  StaticQuantOptions options_;
  torch::nn::Sequential folded_;
  FoldReport fold_report_;
  std::vector<Layer> leaves_;
  std::vector<detail::QuantStep> steps_;
  std::vector<Observer> observers_;
  std::vector<std::string> observed_at_;  // the leaf each observer watches, for messages
  std::int64_t batches_ = 0;
};

template <quant::observer Observer>
template <sequential_like Model>
Calibrator<Observer>::Calibrator(const Model& model, StaticQuantOptions options, Observer prototype)
    : options_(std::move(options)) {
  using detail::QuantStep;
  constexpr auto where = detail::calibrator_where;
  quant::engine_from_name(where, "engines.linear", options_.engines().linear());
  quant::engine_from_name(where, "engines.conv", options_.engines().conv());
  {
    // Names are checked against the model as given, where the user sees them.
    const LayerView view = layers(model);
    const std::vector<Layer> given(view.begin(), view.end());
    detail::chosen_layers(given, options_.layers(), {LayerKind::Conv2d, LayerKind::Linear}, where,
                          "Conv2d or Linear layers (the kinds static quantization supports)");
  }
  BNFolder folder;
  folded_ = folder.fold(model);
  fold_report_ = folder.report();
  const LayerView view = layers(folded_);
  leaves_.assign(view.begin(), view.end());
  const std::set<std::string> chosen = detail::chosen_layers(
      leaves_, options_.layers(), {LayerKind::Conv2d, LayerKind::Linear}, where, "");
  steps_.resize(leaves_.size());
  int last_quantized = -1;  // the open chain's last quantized layer, -1 when activations are fp32
  const auto close_chain = [&] {
    if (last_quantized >= 0) steps_[static_cast<std::size_t>(last_quantized)].dequantize = true;
    last_quantized = -1;
  };
  const auto new_observer = [&](const std::string& at) {
    observers_.push_back(prototype);
    observed_at_.push_back(at);
    return static_cast<int>(observers_.size()) - 1;
  };
  for (std::size_t i = 0; i < leaves_.size(); ++i) {
    const Layer& layer = leaves_[i];
    QuantStep& step = steps_[i];
    if (step.role == QuantStep::Role::fused_relu) continue;
    if (chosen.count(layer.name) != 0) {
      if (const auto* conv = layer.as<torch::nn::Conv2dImpl>()) {
        const auto why = detail::unsupported_conv(*conv);
        detail::check_argument(!why, where, "layers", "'" + layer.name + "' (a Conv2d with " + why.value_or("") + ")",
                               "convolutions with zero padding given as numbers or 'valid' "
                               "(leave this one out with `layers`)");
      }
      detail::check_finite_weights(layer, where);
      step.role = QuantStep::Role::quantized;
      if (last_quantized < 0) step.input_observer = new_observer(layer.name);
      const bool fuse = i + 1 < leaves_.size() && leaves_[i + 1].kind == LayerKind::ReLU;
      if (fuse) {
        step.relu = true;
        steps_[i + 1].role = QuantStep::Role::fused_relu;
        steps_[i + 1].output_observer = new_observer(leaves_[i + 1].name);
      } else {
        step.output_observer = new_observer(layer.name);
      }
      last_quantized = static_cast<int>(i);
    } else if (detail::runs_on_int8(layer.kind)) {
      step.role = QuantStep::Role::int8_passthrough;
    } else {
      close_chain();
    }
  }
  close_chain();
}

template <quant::observer Observer>
void Calibrator<Observer>::observe(const torch::Tensor& batch) {
  constexpr auto where = "fasterai::Calibrator::observe";
  detail::check_argument(batch.defined(), where, "batch", "an undefined tensor", "a batch of inputs");
  detail::check_argument(batch.is_floating_point() && batch.dim() >= 2 && batch.numel() > 0, where,
                         "batch", batch.sizes(), "a non-empty floating-point batch (N × ...)");
  c10::InferenceMode inference;
  torch::Tensor x = batch.to(torch::kFloat32);
  // Observers learn on copies until the whole batch went through, so a forward that throws
  // (a batch of the wrong shape) leaves the calibration as it was.
  std::vector<Observer> updated = observers_;
  for (std::size_t i = 0; i < leaves_.size(); ++i) {
    const detail::QuantStep& step = steps_[i];
    if (step.input_observer >= 0) updated[static_cast<std::size_t>(step.input_observer)].observe(x);
    x = leaves_[i].forward(x);
    if (step.output_observer >= 0) updated[static_cast<std::size_t>(step.output_observer)].observe(x);
  }
  observers_ = std::move(updated);
  ++batches_;
}

template <quant::observer Observer>
void Calibrator<Observer>::observe(const data::Batches& data, std::size_t max_batches) {
  std::size_t seen = 0;
  data.for_each([&](const torch::data::Example<>& batch) {
    if (max_batches == 0 || seen < max_batches) observe(batch.data);
    ++seen;
  });
}

template <quant::observer Observer>
torch::nn::Sequential Calibrator<Observer>::convert() const {
  constexpr auto where = "fasterai::Calibrator::convert";
  detail::check_argument(batches_ > 0, where, "batches observed", batches_,
                         "at least one calibration batch (call observe(...) first)");
  std::vector<quant::QuantParams> params;
  for (const auto& observer : observers_) params.push_back(observer.params());
  return convert(params);
}

template <quant::observer Observer>
torch::nn::Sequential Calibrator<Observer>::convert(const std::vector<quant::QuantParams>& params) const {
  using detail::QuantStep;
  constexpr auto where = "fasterai::Calibrator::convert";
  detail::check_argument(params.size() == observers_.size(), where, "activations",
                         std::to_string(params.size()) + " maps",
                         std::to_string(observers_.size()) + ", one per observed activation");
  for (std::size_t k = 0; k < params.size(); ++k) {
    const quant::QuantParams& p = params[k];
    detail::check_argument(std::isfinite(p.scale) && p.scale > 0, where, "activation at '" + observed_at_[k] + "'",
                           "scale " + std::to_string(p.scale),
                           "finite activations (the model or the batches hold NaN or infinity)");
  }
  const auto param = [&](int k) { return params[static_cast<std::size_t>(k)]; };
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < leaves_.size(); ++i) index[leaves_[i].name] = i;
  torch::NoGradGuard no_grad;
  auto result = detail::rebuild(folded_, [&](const std::string& name, const torch::nn::AnyModule& any) {
    const std::size_t i = index.at(name);
    const QuantStep& step = steps_[i];
    if (step.role == QuantStep::Role::fused_relu)
      return detail::LeafAction::replace(torch::nn::Identity());
    if (step.role != QuantStep::Role::quantized) return detail::LeafAction::keep();
    auto layer_options = quant::QuantizedLayerOptions()
                             .relu(step.relu)
                             .dequantize_output(step.dequantize)
                             .output(param(step.relu ? steps_[i + 1].output_observer : step.output_observer));
    if (step.input_observer >= 0) layer_options.input(param(step.input_observer));
    const Layer& layer = leaves_[i];
    const torch::Tensor qweight = quant::quantize_weight(layer.weight(), options_.per_channel());
    if (const auto* conv = any.ptr()->as<torch::nn::Conv2dImpl>())
      return detail::LeafAction::replace(quant::QuantizedConv2d(
          qweight, conv->bias, detail::geometry_of(*conv), layer_options.engine(options_.engines().conv())));
    return detail::LeafAction::replace(quant::QuantizedLinear(
        qweight, layer.bias(), layer_options.engine(options_.engines().linear())));
  });
  result->eval();
  return result;
}

// Static quantization in one call: calibrate on every batch of `batches` (a range of tensors or
// Examples, or data::Batches) with `Observer`, then convert.
template <quant::observer Observer = quant::MinMaxObserver, sequential_like Model, class Batches>
torch::nn::Sequential quantize_static(const Model& model, const Batches& batches,
                                      StaticQuantOptions options = {}, Observer prototype = Observer()) {
  Calibrator<Observer> calibrator(model, std::move(options), std::move(prototype));
  calibrator.observe(batches);
  return calibrator.convert();
}

}  // namespace fasterai
