#pragma once
// Static int8 quantization of any model — residual additions, concatenations, a user's own
// forward — on its TorchScript graph.
//
//   fasterai::TracedCalibrator calibrator(model, example);   // `model` is left as it was
//   calibrator.observe(learner.valid_data(), /*max_batches=*/16);   // or any range of tensors
//   torch::jit::Module q = calibrator.convert();             // runs, saves, loads like any export
//
//   auto q = fasterai::quantize_traced(model, example, batches);   // the same in one call
//
// The Calibrator (calibrator.hpp) rebuilds a Sequential layer by layer; a module's hand-written
// forward cannot be rebuilt that way (a `torch::nn::Conv2d` member can only hold a Conv2dImpl).
// Its recorded graph can: the model is exported with to_torchscript (one forward on the
// example, deploy/torchscript.hpp) and the graph is quantized by LibTorch's own graph-mode
// passes, the ones Python's `torch.ao.quantization.quantize_jit` drives:
//  1. On a copy of the exported tensors, every `aten::batch_norm` whose input is a
//     convolution's output used nowhere else is folded into that convolution (a conv without
//     bias gains one) and leaves the graph, so that a ReLU after it fuses into the int8 kernel.
//  2. InsertObservers puts an observer on every value an int8 kernel reads or writes: min and
//     max per tensor for activations, per output channel for weights.
//  3. observe() runs batches through that graph.
//  4. convert(): the observed ranges become affine maps here, by the same functions as the
//     Calibrator's (quint8 activations, 7 bits by default; qint8 weights, symmetric per output
//     channel); InsertQuantDeQuant and Finalize then rewrite the graph into `quantized::`
//     kernels and pack the weights under the chosen engine. Residual additions become
//     `quantized::add` / `add_relu` and concatenations `quantized::cat`, so activations stay
//     int8 across them (an int8 add is far cheaper than dequantizing both operands, adding
//     and quantizing again: measured in docs/quantization.md); ops without an int8 kernel
//     run in fp32 between a
//     dequantize and a quantize.
//
// What tracing implies (see to_torchscript): the graph is the path the example took, with its
// shapes; the result is a `torch::jit::Module` (forward, save, `torch::jit::load`, Python's
// `torch.jit.load`), not a `torch::nn::Module`. One engine packs every layer here (the graph
// passes pack them together); the default is oneDNN, the faster int8 convolution measured on
// both machines (see engine.hpp). LibTorch's graph-mode passes are internal API and may change
// between versions: this file is the only one that calls them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <ranges>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/graph_rewrite_helper.h>
#include <torch/csrc/jit/passes/quantization/finalize.h>
#include <torch/csrc/jit/passes/quantization/insert_observers.h>
#include <torch/csrc/jit/passes/quantization/insert_quant_dequant.h>
#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/core/libtorch_version.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/transform/bn_folder.hpp>

namespace fasterai {

struct TracedQuantOptions {
  TracedQuantOptions() = default;
  // The engine every int8 layer is packed for (see quant/engine.hpp).
  TORCH_ARG(std::string, engine) = quant::QuantEngines().conv();
  // Seven-bit activations (see quant/observer.hpp: oneDNN without VNNI saturates with eight).
  TORCH_ARG(bool, reduce_range) = true;
  // Fold BatchNorms into the convolutions before them (step 1 above).
  TORCH_ARG(bool, fold_batch_norm) = true;
};

namespace detail {

inline constexpr const char* traced_calibrator_where = "fasterai::TracedCalibrator";

// The path of module attributes a value reads (["layer1", "0", "conv1", "weight"]), when it is
// a chain of prim::GetAttr from the method's `self`.
inline std::optional<std::vector<std::string>> attribute_path(const torch::jit::Value* v,
                                                              const torch::jit::Value* self) {
  std::vector<std::string> path;
  while (v != self) {
    const torch::jit::Node* n = v->node();
    if (n->kind() != c10::prim::GetAttr) return std::nullopt;
    path.push_back(n->s(c10::attr::name));
    v = n->input(0);
  }
  std::reverse(path.begin(), path.end());
  return path;
}

// The submodule owning the attribute at `path` (every element but the last).
inline torch::jit::Module owner_of(torch::jit::Module m, const std::vector<std::string>& path) {
  for (std::size_t i = 0; i + 1 < path.size(); ++i) m = m.attr(path[i]).toModule();
  return m;
}

// A tensor attribute read by `v`, or undefined when `v` is the constant None.
inline std::optional<torch::Tensor> tensor_input(const torch::jit::Module& m, const torch::jit::Value* v,
                                                 const torch::jit::Value* self) {
  if (v->mustBeNone()) return torch::Tensor();
  const auto path = attribute_path(v, self);
  if (!path) return std::nullopt;
  const c10::IValue value = owner_of(m, *path).attr(path->back());
  if (!value.isTensor()) return std::nullopt;
  return value.toTensor();
}

// Folds eval-mode `aten::batch_norm(conv(x, W, b), γ, β, μ, σ², training=False, _, ε)`, where
// conv is `aten::conv2d` or a non-transposed `aten::_convolution`, into the convolution: W ← W·γ/√(σ²+ε) per output channel, b ← (b − μ)·γ/√(σ²+ε) + β. Only
// where the convolution's output feeds nothing else and its weight is read by no other node
// (a shared convolution keeps its BatchNorms). Writes the module's attributes and graph: call
// it on a clone whose forward has not run (a method's executor keeps the graph it first ran).
// Returns how many were folded.
inline int fold_conv_batch_norms(torch::jit::Module& m) {
  const std::shared_ptr<torch::jit::Graph> graph = m.get_method("forward").graph();
  const torch::jit::Value* self = graph->inputs().at(0);
  std::vector<torch::jit::Node*> norms;
  for (torch::jit::Node* n : graph->nodes())
    if (n->kind() == c10::aten::batch_norm) norms.push_back(n);
  int folded = 0;
  torch::NoGradGuard no_grad;
  for (torch::jit::Node* bn : norms) {
    torch::jit::Node* conv = bn->input(0)->node();
    // LibTorch's C++ conv2d records as aten::_convolution (input 6: transposed).
    const bool convolution =
        conv->kind() == c10::aten::conv2d ||
        (conv->kind() == c10::aten::_convolution && torch::jit::toIValue(conv->input(6)) &&
         torch::jit::toIValue(conv->input(6))->isBool() && !torch::jit::toIValue(conv->input(6))->toBool());
    if (!convolution || bn->input(0)->uses().size() != 1) continue;
    const auto training = torch::jit::toIValue(bn->input(5));
    const auto eps = torch::jit::toIValue(bn->input(7));
    if (!training || !training->isBool() || training->toBool() || !eps || !eps->isDouble()) continue;
    const auto weight_path = attribute_path(conv->input(1), self);
    if (!weight_path || conv->input(1)->uses().size() != 1) continue;
    const auto weight = tensor_input(m, conv->input(1), self);
    const auto bias = tensor_input(m, conv->input(2), self);
    const auto gamma = tensor_input(m, bn->input(1), self), beta = tensor_input(m, bn->input(2), self);
    const auto mean = tensor_input(m, bn->input(3), self), var = tensor_input(m, bn->input(4), self);
    if (!weight || !bias || !gamma || !beta || !mean || !var || !mean->defined() || !var->defined()) continue;
    if (bias->defined() && conv->input(2)->uses().size() != 1) continue;
    // BNFolder's formula (in double, one rounding at the end), on the graph's tensors.
    const detail::BatchNormView view{&*gamma, &*beta, &*mean, &*var, eps->toDouble(), mean->size(0)};
    const detail::Folding folding = detail::folding(view, *bias);
    std::vector<std::int64_t> per_output(static_cast<std::size_t>(weight->dim()), 1);
    per_output[0] = -1;
    const torch::Tensor new_weight =
        (weight->to(torch::kFloat64) * folding.scale.to(weight->device()).reshape(per_output)).to(weight->dtype());
    const torch::Tensor new_bias = folding.bias.to(weight->device());
    torch::jit::Module conv_module = owner_of(m, *weight_path);
    conv_module.setattr(weight_path->back(), new_weight);
    if (bias->defined()) {
      const auto bias_path = attribute_path(conv->input(2), self);
      owner_of(m, *bias_path).setattr(bias_path->back(), new_bias.to(bias->dtype()));
    } else {
      // The convolution gains a bias: a new attribute of its module, read next to its weight.
      std::string name = "bias";
      while (conv_module.hasattr(name)) name = "folded_" + name;
      conv_module.register_parameter(name, new_bias.to(weight->dtype()), /*is_buffer=*/false);
      torch::jit::Node* read = graph->createGetAttr(conv->input(1)->node()->input(0), name);
      read->insertBefore(conv);
      conv->replaceInput(2, read->output());
    }
    bn->output()->replaceAllUsesWith(conv->output());
    bn->destroy();
    ++folded;
  }
  torch::jit::EliminateDeadCode(graph);
  return folded;
}

// `aten::max_pool2d` with its sizes as two numbers each. `torch::max_pool2d(x, 2)` records
// kernel [2], stride [] (the kernel), padding [0], dilation [1]: fp32 pooling expands them, but
// the int8 kernel the passes put in its place refuses anything but two numbers ("Expected no
// strides or 2d strides"), so the int8 graph failed at its first forward. Returns the count.
inline int two_dimensional_pooling(torch::jit::Graph& graph) {
  int changed = 0;
  for (torch::jit::Node* n : graph.nodes()) {
    if (n->kind() != c10::aten::max_pool2d || n->inputs().size() < 5) continue;
    const auto kernel = torch::jit::toIValue(n->input(1));
    if (!kernel || !kernel->isIntList()) continue;
    for (std::size_t i = 1; i <= 4; ++i) {
      const auto value = torch::jit::toIValue(n->input(i));
      if (!value || !value->isIntList()) continue;
      std::vector<std::int64_t> sizes = value->toIntVector();
      if (sizes.empty() && i == 2) sizes = kernel->toIntVector();  // the stride defaults to the kernel
      if (sizes.size() == 1) sizes = {sizes[0], sizes[0]};
      if (sizes == value->toIntVector()) continue;
      torch::jit::WithInsertPoint here(n);
      n->replaceInput(i, graph.insertConstant(c10::IValue(sizes)));
      ++changed;
    }
  }
  return changed;
}

// `aten::relu_(x)` → `aten::relu(x)` where nothing else reads x: the same values, and the
// out-of-place form is the one the graph passes fuse into the int8 kernel before it
// (quantized::conv2d_relu, quantized::linear_relu) instead of running a ReLU of its own.
// `aten::relu6_(x)` → `aten::hardtanh(x, 0, 6)`, which they run on int8 (in place, MobileNetV2's
// ReLU6 stayed fp32 between a dequantize and a quantize).
inline int functional_relus(torch::jit::Module& m) {
  const std::shared_ptr<torch::jit::Graph> graph = m.get_method("forward").graph();
  std::vector<torch::jit::Node*> in_place;
  for (torch::jit::Node* n : graph->nodes())
    if ((n->kind() == c10::aten::relu_ || n->kind() == c10::aten::relu6_) && n->input(0)->uses().size() == 1)
      in_place.push_back(n);
  for (torch::jit::Node* n : in_place) {
    torch::jit::WithInsertPoint here(n);
    // ReLU6 as hardtanh(x, 0, 6), the same values, which the passes keep in int8.
    torch::jit::Value* out = n->kind() == c10::aten::relu_
                                 ? graph->insert(c10::aten::relu, {n->input(0)})
                                 : graph->insert(c10::aten::hardtanh, {n->input(0), 0.0, 6.0});
    out->setType(n->output()->type());
    n->output()->replaceAllUsesWith(out);
    n->destroy();
  }
  return static_cast<int>(in_place.size());
}

// An observer as TorchScript: records the running min and max of what passes (per tensor, or
// per output channel for a weight); the affine map is computed in C++ (quant/observer.hpp) and
// stored in `scale` and `zero_point`, which `calculate_qparams` hands to the graph passes.
// `dtype`, `qscheme` and `ch_axis` are what those passes read from an observer.
//
// With `fake_quantize` (quantization-aware training, traced_qat.hpp) it also returns what int8
// makes of its input, with the straight-through gradient of torch.fake_quantize_*: an
// activation on the map in `scale`/`zero_point` once `ready` (set from C++ after a range was
// observed; until then it passes unchanged) and observed only while `observing`; a weight on
// the grid quantize_weight puts it: symmetric per output channel, scale max|w_c|/127 (1 for a
// channel of zeros), recomputed from the weight at every forward. A weight's range is the
// current weight's, not a running one: the calibrator sees the same weight at every batch, and
// in training only the latest weight is the one converted.
inline torch::jit::Module range_observer(bool weight, bool fake_quantize,
                                         const std::shared_ptr<torch::jit::CompilationUnit>& cu) {
  torch::jit::Module o(c10::QualifiedName(weight ? "__torch__.fasterai.quant.WeightRangeObserver"
                                                 : "__torch__.fasterai.quant.ActivationRangeObserver"),
                       cu, /*shouldMangle=*/true);
  o.register_attribute("training", c10::BoolType::get(), false);
  o.register_attribute("dtype", c10::IntType::get(),
                       static_cast<std::int64_t>(weight ? c10::kQInt8 : c10::kQUInt8));
  o.register_attribute("qscheme", c10::IntType::get(),
                       static_cast<std::int64_t>(weight ? c10::kPerChannelSymmetric : c10::kPerTensorAffine));
  o.register_attribute("ch_axis", c10::IntType::get(), static_cast<std::int64_t>(weight ? 0 : -1));
  o.register_attribute("fake_quantize", c10::BoolType::get(), fake_quantize);
  o.register_attribute("observing", c10::BoolType::get(), true);
  o.register_attribute("ready", c10::BoolType::get(), false);
  o.register_buffer("min_val", torch::empty({0}));
  o.register_buffer("max_val", torch::empty({0}));
  o.register_buffer("scale", torch::ones({1}, torch::kFloat64));
  o.register_buffer("zero_point", torch::zeros({1}, torch::kLong));
  o.define(R"JIT(
def forward(self, x: Tensor) -> Tensor:
    y = x.detach().float()
    if self.ch_axis == 0:
        self.min_val = torch.amin(torch.flatten(y, 1), 1)
        self.max_val = torch.amax(torch.flatten(y, 1), 1)
        if not self.fake_quantize:
            return x
        a = torch.maximum(torch.abs(self.min_val), torch.abs(self.max_val)).double()
        scales = torch.where(a > 0, a / 127.0, torch.ones_like(a))
        fq = torch.fake_quantize_per_channel_affine(x, scales.float(), torch.zeros_like(scales).int(), 0, -128, 127)
        # The int8 weight dequantizes as float(q * scale) with a float64 scale; the kernel's float32
        # product can differ in the last bit. Same grid point, the converted model's value.
        shape = [-1] + [1] * (x.dim() - 1)
        q = torch.round(fq.detach() / torch.reshape(scales.float(), shape))
        exact = (q.double() * torch.reshape(scales, shape)).to(x.dtype)
        return fq + (exact - fq.detach())
    if self.observing:
        lo = torch.reshape(torch.amin(y), [1])
        hi = torch.reshape(torch.amax(y), [1])
        if self.min_val.numel() == 0:
            self.min_val = lo
            self.max_val = hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
    if self.fake_quantize and self.ready:
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale.item()), int(self.zero_point.item()), 0, 255)
    return x

def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
    return self.scale, self.zero_point
)JIT");
  return o;
}

// The exported module made ready for the graph passes, as a clone (its own tensors and
// methods, so neither the export nor the model changes): BatchNorms folded (`folded` says how
// many), aten::_convolution (what C++'s conv2d records) as aten::conv2d, the form whose ReLU
// the passes fuse, ReLUs out of place, and max pooling sizes as two numbers each.
inline torch::jit::Module prepared_for_quantization(const torch::jit::Module& exported, bool fold_batch_norm,
                                                    int& folded) {
  torch::jit::Module m = exported.clone();
  m.eval();
  folded = fold_batch_norm ? fold_conv_batch_norms(m) : 0;
  std::shared_ptr<torch::jit::Graph> graph = m.get_method("forward").graph();
  torch::jit::graph_rewrite_helper::replaceConvolutionWithAtenConv(graph);
  functional_relus(m);
  two_dimensional_pooling(*graph);
  return m;
}

inline bool is_range_observer(const torch::jit::Module& m) {
  const auto name = m.type()->name();
  return name && name->qualifiedName().find("RangeObserver") != std::string::npos;
}

// Convolution/Linear → ReLU with an observer between them (InsertObservers delays observing a
// conv's output only for module calls, not for an inlined graph like ours): the observer moves
// after the ReLU, so the passes see conv → relu → observer and fuse them into one int8 kernel
// whose output map covers the ReLU's range only, as the Calibrator does for Sequentials. (Not
// for ReLU6/hardtanh: no int8 kernel fuses it, and without the observer before it the
// convolution would stay fp32.)
inline int fuse_relus_after_observers(torch::jit::Graph& graph) {
  std::vector<torch::jit::Node*> moved;
  for (torch::jit::Node* relu : graph.nodes()) {
    if (relu->kind() != c10::aten::relu && relu->kind() != c10::aten::relu_) continue;
    torch::jit::Value* observed = relu->input(0);
    torch::jit::Node* call = observed->node();
    if (call->kind() != c10::prim::CallMethod || call->s(c10::attr::name) != "forward" ||
        observed->uses().size() != 1)
      continue;
    const auto observer_type = call->input(0)->type()->cast<c10::ClassType>();
    if (!observer_type || !observer_type->name() ||
        observer_type->name()->qualifiedName().find("ActivationRangeObserver") == std::string::npos)
      continue;
    torch::jit::Value* produced = call->input(1);
    const auto kind = produced->node()->kind();
    if ((kind != c10::aten::conv2d && kind != c10::aten::linear) || produced->uses().size() != 1) continue;
    // conv → observer → relu → users  becomes  conv → relu → observer → users.
    relu->replaceInput(0, produced);
    relu->output()->replaceAllUsesWith(observed);
    call->replaceInput(1, relu->output());
    call->moveAfter(relu);
    moved.push_back(call);
  }
  return static_cast<int>(moved.size());
}

// The model exported (in eval mode; the model is left as it was), made ready for the graph
// passes and observed: a range observer on every value an int8 kernel reads or writes,
// fake-quantizing ones for quantization-aware training. Checks what both users check.
template <traceable Model>
torch::jit::Module observed_export(Model& model, const torch::Tensor& example, const TracedQuantOptions& options,
                                   bool fake_quantize, const char* where, int& folded) {
  quant::engine_from_name(where, "engine", options.engine());
  for (const auto& p : impl(model).parameters())
    check_argument(p.device().is_cpu(), where, "model", "parameters on " + p.device().str(),
                   "a model on the CPU, where int8 kernels run (model->to(torch::kCPU) first)");
  torch::jit::Module exported = [&] {
    const EvalModeGuard eval(impl(model));
    return to_torchscript(model, example, ExportOptions().check(false));
  }();
  torch::jit::Module observed = prepared_for_quantization(exported, options.fold_batch_norm(), folded);
  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  const torch::jit::QConfigDict qconfig{
      {"", torch::jit::QConfig{range_observer(false, fake_quantize, cu), range_observer(true, fake_quantize, cu)}}};
  observed = torch::jit::InsertObservers(observed, "forward", qconfig, /*inplace=*/true);
  fuse_relus_after_observers(*observed.get_method("forward").graph());
  return observed;
}

// The observers InsertObservers added (children of the observed module).
inline std::vector<torch::jit::Module> range_observers(const torch::jit::Module& observed) {
  std::vector<torch::jit::Module> found;
  for (const auto& child : observed.children())
    if (is_range_observer(child)) found.push_back(child);
  return found;
}

// The affine map of an activation observer's range (quant/observer.hpp's, as the Calibrator's).
inline std::pair<torch::Tensor, torch::Tensor> activation_map(const torch::jit::Module& o, bool reduce_range) {
  const torch::Tensor lo = o.attr("min_val").toTensor(), hi = o.attr("max_val").toTensor();
  const quant::QuantParams p = quant::affine_params(lo.item<double>(), hi.item<double>(), reduce_range);
  return {torch::full({1}, p.scale, torch::kFloat64), torch::full({1}, p.zero_point, torch::kLong)};
}

// The int8 module of an observed one whose observers have all seen their values: the ranges
// become affine maps (quint8 activations; qint8 weights, symmetric per output channel), then
// InsertQuantDeQuant and Finalize rewrite the graph into int8 kernels packed for the engine.
// The maps are written into the observers (`scale`, `zero_point`); the graph passes work on a
// copy, so the observed module can go on observing or training.
inline torch::jit::Module convert_observed(torch::jit::Module observed, const TracedQuantOptions& options,
                                           const char* where) {
  for (auto o : range_observers(observed)) {
    const torch::Tensor lo = o.attr("min_val").toTensor(), hi = o.attr("max_val").toTensor();
    if (lo.numel() == 0) continue;  // an observer the graph passes left unused
    if (o.attr("ch_axis").toInt() == 0) {
      const torch::Tensor scales = quant::symmetric_scales(torch::maximum(lo.abs(), hi.abs()));
      o.setattr("scale", scales), o.setattr("zero_point", torch::zeros(scales.sizes(), torch::kLong));
    } else {
      const auto [scale, zero_point] = activation_map(o, options.reduce_range());
      o.setattr("scale", scale), o.setattr("zero_point", zero_point);
    }
  }
  const quant::EngineGuard engine(quant::engine_from_name(where, "engine", options.engine()));
  torch::jit::Module q = torch::jit::InsertQuantDeQuant(observed, "forward", /*inplace=*/false, /*debug=*/false);
  q = torch::jit::Finalize(q);
  q.eval();
  return q;
}

}  // namespace detail

class TracedCalibrator {
 public:
  // Exports `model` on `example` (see to_torchscript), folds its BatchNorms and inserts the
  // observers, on copies: the model is left as it was. Throws fasterai::argument_error for an
  // engine not built in or a model that cannot be traced on the example.
  template <traceable Model>
  TracedCalibrator(Model& model, const torch::Tensor& example, TracedQuantOptions options = {})
      : options_(std::move(options)) {
    observed_ = detail::observed_export(model, example, options_, /*fake_quantize=*/false,
                                        detail::traced_calibrator_where, folded_);
  }

  // Runs one batch through the observed graph. A batch that fails (a wrong shape) or brings
  // NaN or infinity into an observed value throws and leaves the observed ranges as they were.
  void observe(const torch::Tensor& batch) {
    constexpr auto where = "fasterai::TracedCalibrator::observe";
    detail::check_argument(batch.defined(), where, "batch", "an undefined tensor", "a batch of inputs");
    detail::check_argument(batch.is_floating_point() && batch.numel() > 0, where, "batch", batch.sizes(),
                           "a non-empty floating-point batch");
    std::vector<std::pair<torch::jit::Module, std::pair<c10::IValue, c10::IValue>>> saved;
    for (const auto& o : observers())
      saved.push_back({o, {o.attr("min_val"), o.attr("max_val")}});
    const auto restore = [&] {
      for (auto& [o, ranges] : saved) o.setattr("min_val", ranges.first), o.setattr("max_val", ranges.second);
    };
    try {
      torch::NoGradGuard no_grad;
      // The observed graph's plan is built at the second batch and kept: without TensorExpr
      // fusion, whose depthwise convolutions crash or hang where LibTorch has LLVM
      // (core/libtorch_version.hpp).
      const libtorch::NoTensorExprFuser no_fuser;
      observed_.forward({batch.to(torch::kFloat32)});
    } catch (const std::exception& e) {  // c10::Error, or the interpreter's runtime_error
      restore();
      const auto* error = dynamic_cast<const c10::Error*>(&e);
      std::ostringstream shape;
      shape << "of shape " << batch.sizes();
      detail::throw_argument_error(where, "batch", shape.str(),
                                   std::string("a batch the model's forward takes (it failed: ") +
                                       (error ? error->what_without_backtrace() : e.what()) + ")");
    } catch (...) {
      restore();
      throw;
    }
    // Weights first: a non-finite weight makes the activations after it non-finite too.
    std::vector<torch::jit::Module> checked = observers();
    std::stable_partition(checked.begin(), checked.end(),
                          [](const torch::jit::Module& o) { return o.attr("ch_axis").toInt() == 0; });
    for (const auto& o : checked) {
      const torch::Tensor lo = o.attr("min_val").toTensor(), hi = o.attr("max_val").toTensor();
      if (torch::isfinite(lo).all().item<bool>() && torch::isfinite(hi).all().item<bool>()) continue;
      restore();
      if (o.attr("ch_axis").toInt() == 0)
        detail::throw_argument_error(where, "model", "a weight holding NaN or infinity",
                                     "finite weights (a diverged or corrupt model cannot be quantized)");
      detail::throw_argument_error(where, "batch", "one that makes an activation NaN or infinite",
                                   "finite inputs and activations");
    }
    ++batches_;
  }
  // The first `max_batches` batches of `data` (all when 0), e.g. a Learner's `valid_data()`.
  void observe(const data::Batches& data, std::size_t max_batches = 0) {
    std::size_t seen = 0;
    data.for_each([&](const torch::data::Example<>& batch) {
      if (max_batches == 0 || seen < max_batches) observe(batch.data);
      ++seen;
    });
  }
  // Every batch of a range of tensors or of torch::data::Example<>s.
  template <std::ranges::input_range Range>
    requires(!std::is_convertible_v<const Range&, const data::Batches&>)
  void observe(const Range& batches) {
    for (const auto& batch : batches) {
      if constexpr (std::is_convertible_v<decltype(batch), torch::Tensor>) observe(torch::Tensor(batch));
      else observe(batch.data);
    }
  }

  std::int64_t batches_observed() const { return batches_; }
  // How many BatchNorms were folded into convolutions.
  int batch_norms_folded() const { return folded_; }

  // The int8 module, in eval mode; the calibrator can observe more and convert again. Throws
  // fasterai::argument_error, changing nothing, when no batch was observed.
  torch::jit::Module convert() {
    constexpr auto where = "fasterai::TracedCalibrator::convert";
    detail::check_argument(batches_ > 0, where, "batches observed", batches_,
                           "at least one calibration batch (call observe(...) first)");
    return detail::convert_observed(observed_, options_, where);
  }

 private:
  std::vector<torch::jit::Module> observers() const { return detail::range_observers(observed_); }

  TracedQuantOptions options_;
  torch::jit::Module observed_;
  int folded_ = 0;
  std::int64_t batches_ = 0;
};

// Static quantization of any traceable model in one call: calibrate on every batch of
// `batches` (a range of tensors or Examples, or data::Batches), then convert.
template <traceable Model, class Batches>
torch::jit::Module quantize_traced(Model& model, const torch::Tensor& example, const Batches& batches,
                                   TracedQuantOptions options = {}) {
  TracedCalibrator calibrator(model, example, std::move(options));
  calibrator.observe(batches);
  return calibrator.convert();
}

}  // namespace fasterai
