#pragma once
// TorchScript export: a C++ model recorded by LibTorch's tracer as a `torch::jit::Module`, which
// `save(path)` writes to a file that Python's `torch.jit.load(path)` and LibTorch's
// `torch::jit::load(path)` run without the model's source code.
//
//   torch::jit::Module exported = fasterai::to_torchscript(model, torch::randn({1, 3, 224, 224}));
//   exported.save("model.pt");                       // Python: torch.jit.load("model.pt")(x)
//
// Why tracing: C++ modules cannot be scripted (there is no source to compile), but every ATen
// call they make passes the dispatcher's tracer, as in Python's `torch.jit.trace`. The tracer
// is told that the model's parameters and buffers are the attributes of a `jit::Module` that
// mirrors the C++ module tree (same names, same tensors), so the recorded graph reads them
// with `GetAttr` (`self.features.0.weight`) instead of baking them in as constants: the file
// holds a state_dict that Python sees as `named_parameters()`, and `freeze` can later decide
// what becomes a constant.
//
// The limit, the same as Python's `torch.jit.trace`: tracing records the ONE path that the
// example input took. A forward whose control flow depends on tensor values (`if
// (x.sum().item<float>() > 0)`) is exported with the branch the example took, whatever later
// inputs would take; loops are unrolled; shapes read in C++ (`x.size(0)`) become constants.
// `to_torchscript` warns (TORCH_WARN) when the forward computes a tensor that does not reach
// the output (the tracer does not record `item()` itself, only what fed it), and, in eval mode, when the exported module and the model disagree on two other
// inputs made from the example; it does not prove a trace right.
//
// LibTorch's tracer API (torch/csrc/jit/frontend/tracer.h) is internal and may change between
// versions: this file is the only one that uses it.

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/libtorch_version.hpp>

namespace fasterai {

struct ExportOptions {
  ExportOptions() = default;
  // In eval mode, compare the exported module with the model on two inputs derived from the
  // example (its values permuted, and negated) and warn when they differ: a sign of
  // data-dependent control flow. In training mode (dropout, batch statistics) it is skipped.
  TORCH_ARG(bool, check) = true;
  // Relative tolerance of that comparison: max|exported − model| ≤ tolerance·max(1, max|model|).
  TORCH_ARG(double, tolerance) = 1e-4;
};

// The model traced on `example_input` as a TorchScript module with a `forward` method. Its
// parameters and buffers are the model's own tensors (not copies), under the model's
// state_dict names; its train/eval flags are the model's. The model is left as it was (the
// running statistics that a training-mode BatchNorm updates during the trace are restored).
// Throws fasterai::argument_error when the example is undefined or the forward fails on it, and
// when the output is not a tensor.
template <traceable Model>
torch::jit::Module to_torchscript(Model& model, const torch::Tensor& example_input,
                                  const ExportOptions& options = {});

namespace detail {

inline constexpr std::string_view export_where = "fasterai::to_torchscript";

// "torch::nn::Conv2dImpl" -> "Conv2d": a readable TorchScript class name for a C++ module.
inline std::string script_class_name(const torch::nn::Module& m) {
  std::string name = m.name();
  if (const auto colon = name.rfind("::"); colon != std::string::npos) name.erase(0, colon + 2);
  if (name.size() > 4 && name.ends_with("Impl")) name.resize(name.size() - 4);
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  if (name.empty() || std::isdigit(static_cast<unsigned char>(name.front()))) name.insert(0, "M");
  return name;
}

// A jit::Module tree mirroring `m`: same child names, and the very parameter and buffer tensors
// as attributes, so the tracer records reads of them as GetAttr. Every level carries the
// `training` flag that TorchScript's `train()`/`eval()` and `freeze` look for.
inline torch::jit::Module mirror_module(const torch::nn::Module& m,
                                        const std::shared_ptr<torch::jit::CompilationUnit>& cu) {
  torch::jit::Module mirror(c10::QualifiedName("__torch__.fasterai." + script_class_name(m)), cu,
                            /*shouldMangle=*/true);
  mirror.register_attribute("training", c10::BoolType::get(), m.is_training());
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    if (p.value().defined()) mirror.register_parameter(p.key(), p.value(), /*is_buffer=*/false);
  for (const auto& b : m.named_buffers(/*recurse=*/false))
    if (b.value().defined()) mirror.register_buffer(b.key(), b.value());
  for (const auto& child : m.named_children())
    mirror.register_module(child.key(), mirror_module(*child.value(), cu));
  return mirror;
}

// Tensors the forward computed that do not reach its output. LibTorch's tracer does not record
// ops that return no tensor (`item`, `equal`, `is_nonzero`), so a value read into C++ shows up
// only as a computation whose result goes nowhere in the graph: "aten::sum (op 3, after
// aten::addmm)". Control flow that depended on it is invisible to the tracer.
inline std::vector<std::string> unused_computations(const torch::jit::Graph& graph,
                                                    const torch::jit::Value* output) {
  std::unordered_set<const torch::jit::Node*> used;
  std::vector<const torch::jit::Node*> stack{output->node()};
  while (!stack.empty()) {
    const torch::jit::Node* node = stack.back();
    stack.pop_back();
    if (!used.insert(node).second) continue;
    for (const torch::jit::Value* input : node->inputs()) stack.push_back(input->node());
  }
  std::vector<std::string> found;
  std::string previous = "the input";
  std::size_t index = 0;
  for (const torch::jit::Node* node : graph.nodes()) {
    if (!node->kind().is_aten()) continue;
    ++index;
    const std::string op = node->kind().toQualString();
    const bool returns_tensor =
        std::any_of(node->outputs().begin(), node->outputs().end(), [](const torch::jit::Value* v) {
          return v->type()->kind() == c10::TypeKind::TensorType;
        });
    // An in-place op is an effect (BatchNorm counting its batches), not a value left unused.
    const bool in_place = op.ends_with('_');
    if (returns_tensor && !in_place && !used.contains(node))
      found.push_back(op + " (op " + std::to_string(index) + ", after " + previous + ")");
    previous = op;
  }
  return found;
}

// Sets a module tree to eval mode and gives every module its own mode back on destruction.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(torch::nn::Module& m) : root_(m), root_mode_(m.is_training()) {
    for (const auto& child : m.modules(/*include_self=*/false))
      modes_.emplace_back(child, child->is_training());
    m.eval();
  }
  ~EvalModeGuard() {
    root_.train(root_mode_);
    for (auto& [child, mode] : modes_) child->train(mode);
  }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  torch::nn::Module& root_;
  bool root_mode_;
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> modes_;
};

inline argument_error trace_error(const torch::Tensor& example_input, std::string_view why) {
  std::ostringstream os;
  os << export_where << ": tracing the model's forward on the example input of shape "
     << example_input.sizes() << " failed (the forward must take and return one tensor): " << why;
  return argument_error(os.str());
}

inline bool any_training(const torch::nn::Module& m) {
  if (m.is_training()) return true;
  for (const auto& child : m.modules(/*include_self=*/false))
    if (child->is_training()) return true;
  return false;
}

// Inputs unlike the example in value but alike in shape, dtype and range.
inline std::vector<torch::Tensor> check_inputs(const torch::Tensor& example) {
  std::vector<torch::Tensor> inputs;
  auto generator = at::detail::createCPUGenerator(/*seed_in=*/20201120);
  const auto flat = example.reshape({-1});
  const auto order = torch::randperm(flat.numel(), generator, torch::TensorOptions().dtype(torch::kLong))
                         .to(example.device());
  inputs.push_back(flat.index_select(0, order).reshape(example.sizes()));
  if (example.is_floating_point() || example.is_complex()) inputs.push_back(-example);
  return inputs;
}

inline double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes()) return std::numeric_limits<double>::infinity();
  const double scale = std::max(1.0, b.abs().max().template item<double>());
  return (a - b).abs().max().template item<double>() / scale;
}

// max|a - b| in units of max|b|, however small b's values are (an untrained network's outputs
// can be far below 1, where relative_difference would be an absolute difference); absolute
// when b is all zeros.
inline double difference_to_scale(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.sizes() != b.sizes()) return std::numeric_limits<double>::infinity();
  const double scale = b.abs().max().template item<double>();
  const double largest = (a - b).abs().max().template item<double>();
  return scale > 0 ? largest / scale : largest;
}

}  // namespace detail

template <traceable Model>
torch::jit::Module to_torchscript(Model& model, const torch::Tensor& example_input,
                                  const ExportOptions& options) {
  using namespace std::string_literals;
  constexpr auto where = detail::export_where;
  detail::check_argument(example_input.defined(), where, "example_input", "an undefined tensor",
                         "a defined tensor of the shape the model's forward takes");
  detail::check_argument(options.tolerance() >= 0, where, "tolerance", options.tolerance(),
                         "a relative tolerance >= 0");
  auto& m = detail::impl(model);

  // A training-mode BatchNorm updates its running statistics during the trace: put them back.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> saved_buffers;
  {
    torch::NoGradGuard no_grad;
    for (auto& b : m.buffers())
      if (b.defined()) saved_buffers.emplace_back(b, b.clone());
  }
  struct RestoreBuffers {
    std::vector<std::pair<torch::Tensor, torch::Tensor>>& saved;
    ~RestoreBuffers() {
      torch::NoGradGuard no_grad;
      for (auto& [live, copy] : saved) live.copy_(copy);
    }
  } restore{saved_buffers};

  auto cu = std::make_shared<torch::jit::CompilationUnit>();
  torch::jit::Module exported = detail::mirror_module(m, cu);
  std::vector<std::string> unused;
  torch::jit::Stack inputs{example_input};
  std::shared_ptr<torch::jit::tracer::TracingState> state;
  try {
    // Gradients are not part of what is exported; recording them would only cost time.
    torch::NoGradGuard no_grad;
    auto traced = torch::jit::tracer::trace(
        std::move(inputs),
        [&](torch::jit::Stack in) -> torch::jit::Stack {
          torch::Tensor out = m.forward(in.at(0).toTensor());
          TORCH_CHECK(out.defined(), "the forward returned an undefined tensor");
          const auto& tracing = torch::jit::tracer::getTracingState();
          unused = detail::unused_computations(*tracing->graph, tracing->getValue(out));
          return {out};
        },
        [](const torch::autograd::Variable&) { return std::string(); }, /*strict=*/true,
        /*force_outplace=*/false, &exported);
    state = std::move(traced.first);
  } catch (const c10::Error& e) {
    throw detail::trace_error(example_input, e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw detail::trace_error(example_input, e.what());
  }
  torch::jit::Function* forward = cu->create_function(
      c10::QualifiedName(*exported.type()->name(), "forward"), state->graph);
  exported.type()->addMethod(forward);

  for (const auto& op : unused)
    TORCH_WARN(where, ": the forward computes ", op, " but its result does not reach the output; "
               "if C++ code read its value (item(), a comparison), control flow that depends on "
               "it is exported as the one path the example input took (tracing records one path)");
  if (options.check() && !detail::any_training(m)) {
    torch::NoGradGuard no_grad;
    // The second run builds the export's execution plan, which it keeps: without TensorExpr
    // fusion, which crashes on depthwise convolutions where LibTorch has LLVM (libtorch_version.hpp).
    const libtorch::NoTensorExprFuser no_fuser;
    for (const auto& input : detail::check_inputs(example_input)) {
      const torch::Tensor expected = m.forward(input);
      const torch::Tensor got = exported.forward({input}).toTensor();
      const double difference = detail::relative_difference(got, expected);
      if (!(difference <= options.tolerance())) {
        TORCH_WARN(where, ": the exported module and the model's forward differ on an input "
                   "derived from the example (relative difference ", difference,
                   "): the forward likely depends on the input's values, and tracing records "
                   "one path");
        break;
      }
    }
  }
  return exported;
}

// A TorchScript module (an export, a traced int8 graph) behind torch::nn::Module's interface:
// `forward(x)` runs it, so measure_latency, a Learner's validation and a Sequential take it like
// the model it came from. It has no parameters (its tensors live in the jit::Module).
class TorchScriptModuleImpl : public torch::nn::Module {
 public:
  explicit TorchScriptModuleImpl(torch::jit::Module module) : module_(std::move(module)) {}
  torch::Tensor forward(const torch::Tensor& x) { return module_.forward({x}).toTensor(); }
  torch::jit::Module& module() { return module_; }

 private:
  torch::jit::Module module_;
};
TORCH_MODULE(TorchScriptModule);

}  // namespace fasterai
