#pragma once
// Quantization-aware training (Jacob et al., 2018): fine-tune a model while its forward sees the
// rounding and clipping of int8, then convert it to the int8 model static post-training
// quantization makes (calibrator.hpp), with the ranges observed while training in place of a
// calibration run.
//
//   fasterai::QuantizationAwareTraining qat(model);          // `model` is left as it was
//   fasterai::Learner learn(qat.model(), train, valid);       // train the fake-quantized model
//   learn.fit(2, 1e-4, {qat});                                // the callback drives the observers
//   torch::nn::Sequential q = qat.convert();                  // the int8 model, as Calibrator's
//
// In a hand-written loop, train `qat.model()` like any model (its train/eval mode decides whether
// observers learn) and call convert(); freeze_observers() stops the ranges from moving.
//
// Scope: what the Calibrator quantizes — Sequential-like models (nested stages included) whose
// Conv2d and Linear layers run as int8 chains, BatchNorms folded, a ReLU after a layer fused.
// The plan is the Calibrator's own: the constructor builds a Calibrator (folding and fusing on
// a copy) and the training model is made from its folded layers, so that the weights trained
// are the weights converted and the activations fake-quantized are the ones it would observe:
//  - BatchNorms are folded before fine-tuning: their statistics are frozen into the weights
//    (the weights that int8 will hold are the ones the forward rounds).
//  - Every quantized Conv2d/Linear computes with its weight fake-quantized as quantize_weight
//    quantizes it: symmetric int8, scale max|w_c|/127 per output channel (or per tensor), zero
//    point 0, recomputed from the current weight at every forward.
//  - Every activation the Calibrator observes (a chain's input, each quantized layer's output
//    after its fused ReLU) goes through an observer (a copy of `prototype`, MinMaxObserver by
//    default) and is fake-quantized to quint8 with the map the observer gives: q in [0, 255],
//    what the int8 model's quantize and requantize clamp to (reduce_range narrows only the
//    observed range onto [0, 127], see observer.hpp). Before its first observation an
//    activation passes through unchanged.
//  - The gradient is the straight-through estimator of torch::fake_quantize_*: the identity
//    where the value lies within the representable range, zero where it was clipped. For
//    weights nothing is clipped (the scale covers max|w|), so it is the identity.
//  - In eval mode the observers are still and the forward is the fake-quantized one: validation
//    shows int8 behaviour.
// Not simulated: an int8 average pooling rounds its mean to the input's step.

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/train/callback.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

namespace quant {

// x quantized to quint8 with `p` (q = clamp(round(x/scale) + zero_point, 0, 255)) and back, with
// the straight-through gradient: what a Calibrator's int8 model does to this activation.
inline torch::Tensor fake_quantize_activation(const torch::Tensor& x, const QuantParams& p) {
  return torch::fake_quantize_per_tensor_affine(x, p.scale, p.zero_point, 0, 255);
}

// `w` (output channels first) rounded to the int8 grid quantize_weight puts it on, and back:
// symmetric, scale max|w_c|/127 per output channel (or max|w|/127), zero point 0.
inline torch::Tensor fake_quantize_weight(const torch::Tensor& w, bool per_channel = true) {
  if (!per_channel) {
    const double scale = symmetric_scales(w.detach().abs().max()).item<double>();
    return torch::fake_quantize_per_tensor_affine(w, scale, 0, -128, 127);
  }
  const torch::Tensor scales = symmetric_scales(w.detach().abs().flatten(1).amax(1));
  std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
  shape[0] = -1;
  const torch::Tensor fq = torch::fake_quantize_per_channel_affine(
      w, scales.to(torch::kFloat32), torch::zeros({w.size(0)}, w.options().dtype(torch::kInt)), 0,
      -128, 127);
  // The kernel multiplies the int8 value by the float32 scale; a per-channel quantized tensor
  // keeps float64 scales and dequantizes as float(q·scale), which can differ in the last bit.
  // Same grid point (q is recovered exactly), the converted model's value, the kernel's gradient.
  const torch::Tensor q = torch::round(fq.detach() / scales.to(torch::kFloat32).view(shape));
  const torch::Tensor exact = (q.to(torch::kFloat64) * scales.view(shape)).to(w.scalar_type());
  return fq + (exact - fq.detach());
}

}  // namespace quant

namespace detail {

// What the fake-quantizing layers of one model share: the activation observers and whether
// they learn.
template <class Observer>
struct QatObservers {
  std::vector<Observer> observers;
  bool frozen = false;

  torch::Tensor fake_quantize(int k, const torch::Tensor& x, bool training) {
    auto& o = observers[static_cast<std::size_t>(k)];
    if (training && !frozen) o.observe(x);
    if (!o.observed()) return x;
    return quant::fake_quantize_activation(x, o.params());
  }
};

// One leaf of the training model: the folded model's layer (shared, so training updates what
// the Calibrator converts), with its weight and the activations around it fake-quantized.
template <class Observer>
class QatLayerImpl : public torch::nn::Module {
 public:
  QatLayerImpl(torch::nn::AnyModule layer, std::shared_ptr<QatObservers<Observer>> shared,
               const QuantStep& step, bool quantize_weight, bool per_channel)
      : layer_(std::move(layer)),
        shared_(std::move(shared)),
        input_(step.input_observer),
        output_(step.output_observer),
        quantize_weight_(quantize_weight),
        per_channel_(per_channel) {
    register_module("layer", layer_.ptr());
  }

  torch::Tensor forward(torch::Tensor x) {
    if (input_ >= 0) x = shared_->fake_quantize(input_, x, is_training());
    if (!quantize_weight_) {
      x = layer_.forward(std::move(x));
    } else if (auto* conv = layer_.ptr()->as<torch::nn::Conv2dImpl>()) {
      const quant::ConvGeometry g = geometry_of(*conv);
      x = torch::conv2d(x, quant::fake_quantize_weight(conv->weight, per_channel_), conv->bias,
                        g.stride, g.padding, g.dilation, g.groups);
    } else {
      auto* linear = layer_.ptr()->as<torch::nn::LinearImpl>();
      x = torch::linear(x, quant::fake_quantize_weight(linear->weight, per_channel_), linear->bias);
    }
    if (output_ >= 0) x = shared_->fake_quantize(output_, x, is_training());
    return x;
  }

 private:
  torch::nn::AnyModule layer_;
  std::shared_ptr<QatObservers<Observer>> shared_;
  int input_, output_;
  bool quantize_weight_, per_channel_;
};

}  // namespace detail

template <quant::observer Observer = quant::MinMaxObserver>
class QuantizationAwareTraining : public Callback {
 public:
  // Plans as Calibrator(model, options, prototype) does (and throws what it throws, changing
  // nothing) and builds the training model, in train mode.
  template <sequential_like Model>
  explicit QuantizationAwareTraining(const Model& model, StaticQuantOptions options = {},
                                     Observer prototype = Observer());

  // The model to fine-tune: the folded layers with fake quantization. Its parameters are the
  // folded copy's (named "<layer>.layer.weight" where a layer is wrapped).
  torch::nn::Sequential model() const { return model_; }
  // The folded fp32 model whose layers model() trains (BatchNorms folded, ReLUs not yet fused).
  const torch::nn::Sequential& folded() const { return calibrator_.folded(); }

  // The activation maps observed so far, in the Calibrator's order (convert's argument).
  std::vector<quant::QuantParams> activation_params() const;
  // Whether every activation was observed (convert needs it).
  bool observed() const;

  // Stop (or resume) updating the ranges; a Learner's callback also stops them at the fraction
  // of training freeze_observers_at sets.
  void freeze_observers(bool frozen = true) { shared_->frozen = frozen; }
  bool observers_frozen() const { return shared_->frozen; }
  // Freeze the ranges once this fraction of a fit's training batches is done (1: never), so the
  // last batches adapt the weights to ranges that no longer move.
  QuantizationAwareTraining& freeze_observers_at(double fraction);

  // The int8 model: Calibrator::convert with the observed ranges, from the fine-tuned weights.
  // Throws argument_error, changing nothing, when an activation was never observed (train
  // model() on at least one batch first) or an observed range is not finite.
  torch::nn::Sequential convert() const;

  std::string name() const override { return "QuantizationAwareTraining"; }
  inline void before_fit(TrainingState& state) override;
  inline void before_batch(TrainingState& state) override;

 private:
  Calibrator<Observer> calibrator_;
  std::shared_ptr<detail::QatObservers<Observer>> shared_;
  torch::nn::Sequential model_;
  double freeze_at_ = 1.0;
};

// ---------------------------------------------------------------------------------------------

template <quant::observer Observer>
template <sequential_like Model>
QuantizationAwareTraining<Observer>::QuantizationAwareTraining(const Model& model,
                                                               StaticQuantOptions options,
                                                               Observer prototype)
    : calibrator_(model, options, prototype),
      shared_(std::make_shared<detail::QatObservers<Observer>>()) {
  using detail::QuantStep;
  shared_->observers = calibrator_.observers_;
  std::map<std::string, std::size_t> index;
  for (std::size_t i = 0; i < calibrator_.leaves_.size(); ++i) index[calibrator_.leaves_[i].name] = i;
  const bool per_channel = calibrator_.options_.per_channel();
  model_ = detail::rebuild(calibrator_.folded_, [&](const std::string& name, const torch::nn::AnyModule& any) {
    const QuantStep& step = calibrator_.steps_[index.at(name)];
    const bool quantized = step.role == QuantStep::Role::quantized;
    if (!quantized && step.input_observer < 0 && step.output_observer < 0)
      return detail::LeafAction::replace(any);  // the folded layer itself, shared
    return detail::LeafAction::replace(torch::nn::AnyModule(std::make_shared<detail::QatLayerImpl<Observer>>(
        any, shared_, step, quantized, per_channel)));
  });
  model_->train();
}

template <quant::observer Observer>
std::vector<quant::QuantParams> QuantizationAwareTraining<Observer>::activation_params() const {
  std::vector<quant::QuantParams> out;
  for (const auto& o : shared_->observers) out.push_back(o.params());
  return out;
}

template <quant::observer Observer>
bool QuantizationAwareTraining<Observer>::observed() const {
  for (const auto& o : shared_->observers)
    if (!o.observed()) return false;
  return true;
}

template <quant::observer Observer>
QuantizationAwareTraining<Observer>& QuantizationAwareTraining<Observer>::freeze_observers_at(
    double fraction) {
  detail::check_argument(fraction >= 0 && fraction <= 1, "fasterai::QuantizationAwareTraining",
                         "freeze_observers_at", fraction,
                         "a fraction of the training batches in [0, 1] (1: never freeze)");
  freeze_at_ = fraction;
  return *this;
}

template <quant::observer Observer>
torch::nn::Sequential QuantizationAwareTraining<Observer>::convert() const {
  constexpr auto where = "fasterai::QuantizationAwareTraining::convert";
  for (std::size_t k = 0; k < shared_->observers.size(); ++k)
    detail::check_argument(shared_->observers[k].observed(), where,
                           "activation at '" + calibrator_.observed_at_[k] + "'", "never observed",
                           "ranges observed in training (train model() on at least one batch "
                           "in train mode first)");
  return calibrator_.convert(activation_params());
}

template <quant::observer Observer>
void QuantizationAwareTraining<Observer>::before_fit(TrainingState& state) {
  detail::check_argument(state.model == model_.ptr().get(), "fasterai::QuantizationAwareTraining",
                         "the trained model", "another module",
                         "qat.model(), the fake-quantized model this callback made (train it, "
                         "not the original)");
}

template <quant::observer Observer>
void QuantizationAwareTraining<Observer>::before_batch(TrainingState& state) {
  if (freeze_at_ < 1.0 && state.training) shared_->frozen = state.pct_train() >= freeze_at_;
}

}  // namespace fasterai
