#pragma once
// Quantization-aware training of any model — residual additions, concatenations, a user's own
// forward — on its TorchScript graph: what QuantizationAwareTraining (qat.hpp) does for the
// Calibrator's Sequentials, done for the TracedCalibrator's graphs.
//
//   fasterai::TracedQuantizationAwareTraining qat(model, example);   // `model` is left as it was
//   fasterai::Learner learn(qat.model(), train, valid);               // train the fake-quantized graph
//   learn.fit(2, 1e-4, {qat});                                        // the callback checks the model
//   torch::jit::Module q = qat.convert();                             // as TracedCalibrator::convert
//
// A hand-written forward cannot take fake-quantizing layers (a `torch::nn::Conv2d` member holds
// a Conv2dImpl and its forward is not virtual), and LibTorch has no forward hooks. The traced
// graph can: the model is exported and prepared exactly as by TracedCalibrator (BatchNorms after
// convolutions folded, ReLUs fused, an observer on every value an int8 kernel reads or writes),
// with observers that also fake-quantize (traced_calibrator.hpp, range_observer):
//  - every weight an int8 kernel reads: symmetric int8 per output channel, scale max|w_c|/127,
//    recomputed from the weight at every forward (the grid quantize_weight converts to);
//  - every activation: quint8 on the map of the range observed so far (MinMax, 7 bits by
//    default as the calibrator), observed in train mode only and until freeze_observers(). The
//    map is computed in C++ after each training batch, so a batch is fake-quantized with the
//    range of the batches before it; an activation not yet observed passes unchanged.
//  - The gradient is torch.fake_quantize_*'s straight-through estimator.
// model() is a torch::nn::Module around that graph whose parameters are the graph's own tensors
// (the folded weights; the original model's are not touched): a Learner, an optimizer, a
// hand-written loop train it like any module. What tracing implies holds here too: the graph
// is the path the example took; BatchNorms that did not fold keep their statistics frozen
// (traced in eval mode), and dropout is off.
// convert() refreshes the weight ranges from the trained weights and runs the calibrator's
// conversion: the int8 graph of the same kernels, with the ranges training observed.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/libtorch_version.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/train/callback.hpp>

namespace fasterai {

namespace detail {

// The fake-quantized graph as a torch::nn::Module: its forward runs the graph, its parameters
// are the graph's tensors (registered under their paths with '.' as '_'), its train/eval mode
// decides whether the activation observers learn.
class TracedQatModuleImpl : public torch::nn::Module {
 public:
  TracedQatModuleImpl(torch::jit::Module graph, bool reduce_range)
      : graph_(std::move(graph)), reduce_range_(reduce_range) {
    for (const auto& p : graph_.named_parameters(/*recurse=*/true)) {
      // The clone that made the graph recorded its tensors as copies (not leaves) and folding
      // wrote others without grad: each becomes a leaf that requires grad, in the graph too.
      const torch::Tensor leaf = p.value.detach().requires_grad_(true);
      std::vector<std::string> path{""};
      for (char c : p.name) {
        if (c == '.') path.emplace_back();
        else path.back().push_back(c);
      }
      owner_of(graph_, path).setattr(path.back(), leaf);
      std::string name = p.name;
      std::replace(name.begin(), name.end(), '.', '_');
      while (named_parameters(/*recurse=*/false).contains(name)) name += "_";
      register_parameter(name, leaf);
    }
    for (const auto& o : range_observers(graph_))
      (o.attr("ch_axis").toInt() == 0 ? weights_ : activations_).push_back(o);
  }

  torch::Tensor forward(torch::Tensor x) {
    const bool learn = is_training() && !frozen_;
    for (auto& o : activations_) o.setattr("observing", learn);
    torch::Tensor y;
    {
      const libtorch::NoTensorExprFuser no_fuser;  // as TracedCalibrator::observe, see there
      y = graph_.forward({std::move(x)}).toTensor();
    }
    if (learn) {
      for (auto& o : activations_) {
        if (o.attr("min_val").toTensor().numel() == 0) continue;  // unused by the graph passes
        const auto [scale, zero_point] = activation_map(o, reduce_range_);
        o.setattr("scale", scale), o.setattr("zero_point", zero_point), o.setattr("ready", true);
      }
      ++batches_;
    }
    return y;
  }

  const torch::jit::Module& graph() const { return graph_; }
  const std::vector<torch::jit::Module>& activation_observers() const { return activations_; }
  void freeze(bool frozen) { frozen_ = frozen; }
  bool frozen() const { return frozen_; }
  std::int64_t batches_observed() const { return batches_; }

 private:
  torch::jit::Module graph_;
  std::vector<torch::jit::Module> weights_, activations_;
  bool reduce_range_;
  bool frozen_ = false;
  std::int64_t batches_ = 0;
};
TORCH_MODULE(TracedQatModule);

}  // namespace detail

class TracedQuantizationAwareTraining : public Callback {
 public:
  // Exports and prepares the model as TracedCalibrator(model, example, options) does (and throws
  // what it throws, changing nothing); model() starts in train mode.
  template <traceable Model>
  TracedQuantizationAwareTraining(Model& model, const torch::Tensor& example, TracedQuantOptions options = {})
      : options_(std::move(options)), example_(example.detach().clone()) {
    torch::jit::Module graph =
        detail::observed_export(model, example, options_, /*fake_quantize=*/true, where_, folded_);
    model_ = detail::TracedQatModule(std::move(graph), options_.reduce_range());
    model_->train();
  }

  // The fake-quantized graph to fine-tune.
  detail::TracedQatModule model() const { return model_; }
  int batch_norms_folded() const { return folded_; }
  // Training batches whose activations were observed so far.
  std::int64_t batches_observed() const { return model_->batches_observed(); }

  // Stop (or resume) updating the activation ranges; as a Learner's callback, the ranges also
  // stop once the fraction of a fit's training batches freeze_observers_at sets is done.
  void freeze_observers(bool frozen = true) { model_->freeze(frozen); }
  bool observers_frozen() const { return model_->frozen(); }
  TracedQuantizationAwareTraining& freeze_observers_at(double fraction) {
    detail::check_argument(fraction >= 0 && fraction <= 1, where_, "freeze_observers_at", fraction,
                           "a fraction of the training batches in [0, 1] (1: never freeze)");
    freeze_at_ = fraction;
    return *this;
  }

  // The int8 graph: the trained weights, the activation ranges observed in training, the
  // TracedCalibrator's conversion. Throws argument_error, changing nothing, before a training
  // batch was observed, or when a weight or range is not finite (training diverged).
  torch::jit::Module convert() const {
    constexpr auto where = "fasterai::TracedQuantizationAwareTraining::convert";
    detail::check_argument(model_->batches_observed() > 0, where, "training batches observed",
                           model_->batches_observed(),
                           "at least one (train model() in train mode on a batch first)");
    for (const auto& p : model_->parameters())
      detail::check_argument(torch::isfinite(p).all().item<bool>(), where, "model()",
                             "a weight holding NaN or infinity", "finite weights (training diverged)");
    for (const auto& o : model_->activation_observers()) {
      const torch::Tensor lo = o.attr("min_val").toTensor(), hi = o.attr("max_val").toTensor();
      detail::check_argument(torch::isfinite(lo).all().item<bool>() && torch::isfinite(hi).all().item<bool>(),
                             where, "activation ranges", "not finite", "finite activations in training");
    }
    // The weight observers hold the ranges of the weights of the last forward; the optimizer
    // has stepped since. One forward in eval mode (activation ranges unchanged) refreshes them.
    {
      torch::NoGradGuard no_grad;
      detail::TracedQatModuleImpl& model = *model_.ptr();
      const bool was_training = model.is_training();
      model.eval();
      model.forward(example_);
      model.train(was_training);
    }
    return detail::convert_observed(model_->graph(), options_, where);
  }

  std::string name() const override { return "TracedQuantizationAwareTraining"; }
  void before_fit(TrainingState& state) override {
    detail::check_argument(state.model == model_.ptr().get(), where_, "the trained model", "another module",
                           "qat.model(), the fake-quantized graph this callback made (train it, not the "
                           "original)");
  }
  void before_batch(TrainingState& state) override {
    if (freeze_at_ < 1.0 && state.training) model_->freeze(state.pct_train() >= freeze_at_);
  }

 private:
  static constexpr const char* where_ = "fasterai::TracedQuantizationAwareTraining";
  TracedQuantOptions options_;
  torch::Tensor example_;
  detail::TracedQatModule model_{nullptr};
  int folded_ = 0;
  double freeze_at_ = 1.0;
};

}  // namespace fasterai
