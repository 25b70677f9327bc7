#pragma once
// Quantized layers: int8 stand-ins for Linear and Conv2d that a quantized model is made of.
//
//   QuantizedLinear   int8 weight; either dynamic (fp32 in, fp32 out: the activation is
//                     quantized on the fly, batch by batch) or static (quint8 in and out, with
//                     scales from calibration)
//   QuantizedConv2d   static only: quint8 in and out
//
// A static layer may be a chain's entry (`quantize_input`: it quantizes the fp32 activation it
// receives with the calibrated input map) or its exit (`dequantize_output`), and may carry a
// fused ReLU. Layers between the two exchange quint8 tensors, which LibTorch's ReLU, max- and
// average-pooling, flatten and eval-mode dropout accept as they are.
//
// The kernels are LibTorch's `quantized::` operators, called through the dispatcher (so a
// tracer records them) on weights packed by `quantized::linear_prepack` / `conv2d_prepack`
// under the layer's engine (see engine.hpp). What a saved model holds is the unpacked form —
// the int8 weight, its per-channel scales, the fp32 bias, the activation maps and the engine —
// as buffers, so `torch::save`/`torch::load` and model_size_bytes see the int8 sizes; `load`
// packs the weight again under the recorded engine.
//
// TorchScript export (deploy/torchscript.hpp traces the forward): a packed weight made before
// the trace is an object the exported module does not hold, so while a tracer records, the
// forward packs the weight from those buffers itself. The exported graph then reads the int8
// weight and scales as attributes and packs them when it runs, under the engine set where it
// runs (`torch.jit.freeze` keeps the packing in the graph; it costs a repack per call).

#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/native/quantized/PackedParams.h>
#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>

namespace fasterai::quant {

namespace detail {

// A `quantized::` operator by name, looked up once.
inline c10::OperatorHandle quantized_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

inline c10::IValue call_op(const c10::OperatorHandle& op, std::vector<c10::IValue> stack) {
  op.callBoxed(&stack);
  return std::move(stack.at(0));
}

// The parts of an int8 weight that a state_dict keeps: int8 values and per-channel scales (a
// single scale for a per-tensor weight); zero points are 0 (symmetric).
struct StoredWeight {
  torch::Tensor values;  // int8, the weight's shape
  torch::Tensor scales;  // float64, [out_channels] or [1]
};

inline StoredWeight stored_weight(const torch::Tensor& q) {
  if (q.qscheme() == torch::kPerChannelAffine || q.qscheme() == torch::kPerChannelSymmetric)
    return {q.int_repr(), q.q_per_channel_scales().to(torch::kFloat64)};
  return {q.int_repr(), torch::full({1}, q.q_scale(), torch::kFloat64)};
}

inline torch::Tensor quantized_weight(const StoredWeight& w) {
  const torch::Tensor real = w.values.to(torch::kFloat32);
  if (w.scales.numel() == 1 && w.values.size(0) != 1)
    return torch::quantize_per_tensor(real * w.scales.item<double>(), w.scales.item<double>(), 0,
                                      torch::kQInt8);
  const torch::Tensor zeros = torch::zeros({w.values.size(0)}, torch::kLong);
  std::vector<std::int64_t> shape(static_cast<std::size_t>(real.dim()), 1);
  shape[0] = -1;
  return torch::quantize_per_channel(real * w.scales.to(torch::kFloat32).view(shape), w.scales,
                                     zeros, 0, torch::kQInt8);
}

// A QuantParams as a buffer [scale, zero_point] and back.
inline torch::Tensor qparams_buffer(const std::optional<QuantParams>& p) {
  if (!p) return torch::Tensor();
  return torch::tensor({p->scale, static_cast<double>(p->zero_point)}, torch::kFloat64);
}
inline QuantParams qparams_of(const torch::Tensor& buffer) {
  return {buffer[0].item<double>(), static_cast<std::int64_t>(buffer[1].item<double>())};
}

inline torch::Tensor engine_buffer(at::QEngine e) {
  return torch::full({1}, static_cast<std::int64_t>(e), torch::kLong);
}

}  // namespace detail

// How a quantized layer runs. `input` is set on a chain's entry (it quantizes its fp32 input);
// `output` on every static layer (the map of its quint8 output).
struct QuantizedLayerOptions {
  QuantizedLayerOptions() = default;
  TORCH_ARG(bool, dynamic) = false;
  TORCH_ARG(bool, relu) = false;               // fused ReLU (static layers)
  TORCH_ARG(std::optional<QuantParams>, input) = std::nullopt;
  TORCH_ARG(std::optional<QuantParams>, output) = std::nullopt;
  TORCH_ARG(bool, dequantize_output) = false;  // a chain's exit: fp32 out
  TORCH_ARG(std::string, engine) = "qnnpack";
};

// Shared by both layer kinds: the stored form as buffers, packing, input and output maps.
template <class Derived, class Packed>
class QuantizedLayer : public torch::nn::Module {
 public:
  const QuantizedLayerOptions& layer_options() const { return options_; }
  // The int8 weight (a quantized tensor), as packed.
  torch::Tensor weight() const {
    return detail::quantized_weight({weight_values_, weight_scales_});
  }
  // The fp32 bias; undefined when the layer has none.
  const torch::Tensor& bias() const { return bias_; }
  const c10::intrusive_ptr<Packed>& packed() const { return packed_; }

  void load(torch::serialize::InputArchive& archive) override {
    torch::nn::Module::load(archive);
    static_cast<Derived&>(*this).restore_geometry();
    const auto engine = static_cast<at::QEngine>(engine_.item<std::int64_t>());
    options_.engine(engine_name(engine));
    if (input_params_.defined()) options_.input(detail::qparams_of(input_params_));
    if (output_params_.defined()) options_.output(detail::qparams_of(output_params_));
    pack();
  }

 protected:
  QuantizedLayer(const std::string& where, const torch::Tensor& qweight, const torch::Tensor& bias,
                 QuantizedLayerOptions options)
      : options_(std::move(options)) {
    const at::QEngine engine = engine_from_name(where, "engine", options_.engine());
    fasterai::detail::check_argument(options_.dynamic() || options_.output().has_value(), where,
                                     "output", "none",
                                     "the calibrated map of a static layer's output");
    const detail::StoredWeight w = detail::stored_weight(qweight);
    weight_values_ = register_buffer("weight", w.values);
    weight_scales_ = register_buffer("weight_scale", w.scales);
    if (bias.defined()) bias_ = register_buffer("bias", bias.detach().to(torch::kCPU, torch::kFloat32).clone());
    engine_ = register_buffer("engine", detail::engine_buffer(engine));
    if (options_.input()) input_params_ = register_buffer("input_qparams", detail::qparams_buffer(options_.input()));
    if (options_.output()) output_params_ = register_buffer("output_qparams", detail::qparams_buffer(options_.output()));
  }

  void pack() {
    const EngineGuard guard(engine_from_name("fasterai::quant::QuantizedLayer::pack", "engine",
                                             options_.engine()));
    packed_ = static_cast<Derived&>(*this).pack_weight(weight(), bias_);
  }

  // The packed weight to run: the one made at construction or load, or, while a tracer records
  // (TorchScript export), one packed inside the forward from the stored buffers.
  c10::IValue packed_for_forward() const {
    if (!c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Tracer)) return c10::IValue(packed_);
    const EngineGuard guard(engine_from_name("fasterai::quant::QuantizedLayer::forward", "engine",
                                             options_.engine()));
    const std::int64_t out = weight_values_.size(0);
    const torch::Tensor scales = weight_scales_.expand({out}).contiguous();
    const torch::Tensor weight = at::_make_per_channel_quantized_tensor(
        weight_values_, scales, torch::zeros_like(scales, torch::kLong), 0);
    return static_cast<const Derived&>(*this).pack_op(weight, bias_);
  }

  torch::Tensor enter(torch::Tensor x) const {
    if (!options_.input()) return x;
    return torch::quantize_per_tensor(x.to(torch::kFloat32).contiguous(), options_.input()->scale,
                                      options_.input()->zero_point, torch::kQUInt8);
  }
  torch::Tensor leave(torch::Tensor y) const {
    return options_.dequantize_output() ? y.dequantize() : y;
  }

  QuantizedLayerOptions options_;
  torch::Tensor weight_values_, weight_scales_, bias_, engine_, input_params_, output_params_;
  c10::intrusive_ptr<Packed> packed_;
};

class QuantizedLinearImpl : public QuantizedLayer<QuantizedLinearImpl, LinearPackedParamsBase> {
 public:
  // `qweight`: qint8 [out, in] (see quantize_weight); `bias`: fp32 [out] or undefined.
  QuantizedLinearImpl(const torch::Tensor& qweight, const torch::Tensor& bias,
                      QuantizedLayerOptions options)
      : QuantizedLayer("fasterai::quant::QuantizedLinear", qweight, bias, std::move(options)) {
    pack();
  }

  torch::Tensor forward(torch::Tensor x) {
    if (options_.dynamic()) {
      // Seven-bit activations except on QNNPACK, which sums in 32 bits (and warns about the
      // flag): oneDNN without VNNI saturates 16-bit pair sums of full-range u8·s8 products
      // (see observer.hpp), which made a dynamic Linear on an AVX2 CPU err 13× beyond its
      // error bound.
      static const auto op = detail::quantized_op("quantized::linear_dynamic", "");
      const bool reduce_range = options_.engine() != "qnnpack";
      return detail::call_op(op, {std::move(x), packed_for_forward(), reduce_range}).toTensor();
    }
    static const auto plain = detail::quantized_op("quantized::linear", "");
    static const auto relu = detail::quantized_op("quantized::linear_relu", "");
    const QuantParams out = *options_.output();
    return leave(detail::call_op(options_.relu() ? relu : plain,
                                 {enter(std::move(x)), packed_for_forward(), out.scale,
                                  out.zero_point})
                     .toTensor());
  }

  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override {
    check_cpu(device);
    return std::make_shared<QuantizedLinearImpl>(weight(), bias_.defined() ? bias_.clone() : bias_,
                                                 options_);
  }

  void pretty_print(std::ostream& os) const override {
    os << "fasterai::quant::QuantizedLinear(in_features=" << weight_values_.size(1)
       << ", out_features=" << weight_values_.size(0)
       << (options_.dynamic() ? ", dynamic" : options_.relu() ? ", static, relu" : ", static")
       << ", engine=" << options_.engine() << ")";
  }

  void restore_geometry() {}

  c10::IValue pack_op(const torch::Tensor& w, const torch::Tensor& b) const {
    static const auto op = detail::quantized_op("quantized::linear_prepack", "");
    return detail::call_op(op, {w, b.defined() ? c10::IValue(b) : c10::IValue()});
  }
  c10::intrusive_ptr<LinearPackedParamsBase> pack_weight(const torch::Tensor& w,
                                                         const torch::Tensor& b) const {
    return pack_op(w, b).toCustomClass<LinearPackedParamsBase>();
  }

 private:
  static void check_cpu(const c10::optional<torch::Device>& device) {
    fasterai::detail::check_argument(!device || device->is_cpu(), "fasterai::quant::clone", "device",
                                     device ? device->str() : "", "the CPU (int8 kernels run there)");
  }
  friend class QuantizedConv2dImpl;
};
TORCH_MODULE(QuantizedLinear);

// The geometry of a convolution that packing needs.
struct ConvGeometry {
  std::vector<std::int64_t> stride{1, 1}, padding{0, 0}, dilation{1, 1};
  std::int64_t groups = 1;
};

class QuantizedConv2dImpl : public QuantizedLayer<QuantizedConv2dImpl, ConvPackedParamsBase<2>> {
 public:
  // `qweight`: qint8 [out, in/groups, kh, kw]; `bias`: fp32 [out] or undefined.
  QuantizedConv2dImpl(const torch::Tensor& qweight, const torch::Tensor& bias,
                      ConvGeometry geometry, QuantizedLayerOptions options)
      : QuantizedLayer("fasterai::quant::QuantizedConv2d", qweight, bias, std::move(options)),
        geometry_(std::move(geometry)) {
    fasterai::detail::check_argument(!options_.dynamic(), "fasterai::quant::QuantizedConv2d",
                                     "dynamic", "true", "false (convolutions are quantized statically)");
    geometry_buffer_ = register_buffer("geometry", torch::tensor(flat(geometry_), torch::kLong));
    pack();
  }

  torch::Tensor forward(torch::Tensor x) {
    static const auto plain = detail::quantized_op("quantized::conv2d", "new");
    static const auto relu = detail::quantized_op("quantized::conv2d_relu", "new");
    const QuantParams out = *options_.output();
    return leave(detail::call_op(options_.relu() ? relu : plain,
                                 {enter(std::move(x)), packed_for_forward(), out.scale,
                                  out.zero_point})
                     .toTensor());
  }

  void restore_geometry() {
    const auto at = [&](int i) { return geometry_buffer_[i].item<std::int64_t>(); };
    geometry_ = {{at(0), at(1)}, {at(2), at(3)}, {at(4), at(5)}, at(6)};
  }

  std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override {
    QuantizedLinearImpl::check_cpu(device);
    return std::make_shared<QuantizedConv2dImpl>(weight(), bias_.defined() ? bias_.clone() : bias_,
                                                 geometry_, options_);
  }

  void pretty_print(std::ostream& os) const override {
    os << "fasterai::quant::QuantizedConv2d(" << weight_values_.size(1) * geometry_.groups << ", "
       << weight_values_.size(0) << ", kernel_size=[" << weight_values_.size(2) << ", "
       << weight_values_.size(3) << "], stride=" << c10::IntArrayRef(geometry_.stride)
       << ", padding=" << c10::IntArrayRef(geometry_.padding)
       << (options_.relu() ? ", relu" : "") << ", engine=" << options_.engine() << ")";
  }

  const ConvGeometry& geometry() const { return geometry_; }

  c10::IValue pack_op(const torch::Tensor& w, const torch::Tensor& b) const {
    static const auto op = detail::quantized_op("quantized::conv2d_prepack", "");
    return detail::call_op(op, {w, b.defined() ? c10::IValue(b) : c10::IValue(),
                                c10::List<std::int64_t>(geometry_.stride),
                                c10::List<std::int64_t>(geometry_.padding),
                                c10::List<std::int64_t>(geometry_.dilation), geometry_.groups});
  }
  c10::intrusive_ptr<ConvPackedParamsBase<2>> pack_weight(const torch::Tensor& w,
                                                          const torch::Tensor& b) const {
    return pack_op(w, b).toCustomClass<ConvPackedParamsBase<2>>();
  }

 private:
  static std::vector<std::int64_t> flat(const ConvGeometry& g) {
    return {g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1],
            g.groups};
  }
  ConvGeometry geometry_;
  torch::Tensor geometry_buffer_;
};
TORCH_MODULE(QuantizedConv2d);

}  // namespace fasterai::quant
