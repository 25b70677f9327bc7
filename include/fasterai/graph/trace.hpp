#pragma once
// Tracing: the channel-dependency graph of any module, recorded from one forward pass.
//
//   auto graph = fasterai::trace(model, torch::randn({1, 3, 224, 224}));
//
// A forward pass with gradients enabled leaves the autograd graph behind its output: every
// operation is a node (`grad_fn`) with edges to the nodes that produced its operands, and the
// parameters are `AccumulateGrad` leaves holding the very tensors `named_parameters()` returns.
// Walking it from the output gives every operation in execution order (nodes carry a sequence
// number), each one's operands and the shapes of its result; a node that reaches a module's
// parameters belongs to that module. Python's Torch-Pruning (DepGraph) traces the same way.
//
// The forward runs once in eval mode (BatchNorm uses its running statistics and does not update
// them, dropout is off) with every parameter requiring gradients; modes and `requires_grad` are
// restored afterwards, so nothing of the model changes. Tracing records the path taken for this
// input: a forward that branches on the data may take another path for another input.

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/graph/autograd_ops.hpp>
#include <fasterai/graph/graph.hpp>

namespace fasterai {

// A module whose forward takes one tensor and returns one tensor.
template <class M>
concept traceable = module<M> && requires(impl_of_t<M>& m, torch::Tensor x) {
  { m.forward(x) } -> std::convertible_to<torch::Tensor>;
};

namespace detail {

inline constexpr const char* trace_where = "fasterai::trace";

// The module a parameter belongs to, found by the parameter's tensor.
struct ParameterOwner {
  std::string module;                          // qualified name, "" for the root
  std::shared_ptr<torch::nn::Module> handle;
};

// Restores what tracing changes on the model: train/eval mode of every submodule and
// requires_grad of every parameter.
class TraceGuard {
 public:
  explicit TraceGuard(torch::nn::Module& model) {
    for (const auto& m : model.modules(/*include_self=*/true)) modes_.emplace_back(m, m->is_training());
    for (auto& p : model.parameters()) grads_.emplace_back(p, p.requires_grad());
    model.eval();
    for (auto& [p, _] : grads_) p.requires_grad_(true);
  }
  ~TraceGuard() {
    for (auto& [p, g] : grads_) p.requires_grad_(g);
    for (auto& [m, t] : modes_) m->train(t);
  }
  TraceGuard(const TraceGuard&) = delete;
  TraceGuard& operator=(const TraceGuard&) = delete;

 private:
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> modes_;
  std::vector<std::pair<torch::Tensor, bool>> grads_;
};

// The shape of a node's output `nr` from its input metadata. LibTorch 1.13 keeps the shape
// private and offers only a zero tensor of it; later versions that expose it are read directly.
template <class Metadata>
std::vector<std::int64_t> shape_of(const Metadata& meta) {
  if constexpr (requires(const Metadata& m) { c10::asIntArrayRefSlow(m.shape_as_dim_vector()); }) {
    return c10::asIntArrayRefSlow(meta.shape_as_dim_vector()).vec();
  } else {
    try {
      return meta.zeros_like().sizes().vec();
    } catch (const c10::Error&) {  // a nested tensor: no single shape
      return {};
    }
  }
}

inline std::vector<std::int64_t> output_shape(const torch::autograd::Node& node, std::uint32_t nr) {
  if (nr >= node.num_inputs()) return {};
  return shape_of(node.input_metadata(nr));
}

inline std::int64_t channels_of(const std::vector<std::int64_t>& shape) {
  return shape.size() >= 2 ? shape[1] : 0;
}

inline std::int64_t product(const std::vector<std::int64_t>& v, std::size_t from) {
  std::int64_t p = 1;
  for (std::size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

class Tracer {
 public:
  Tracer(torch::nn::Module& model, const torch::Tensor& input) {
    for (const auto& item : model.named_modules("", /*include_self=*/true)) {
      for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
        owners_[p.value().unsafeGetTensorImpl()] = {item.key(), item.value()};
      if (is_channel_layer(*item.value())) layers_.push_back(item.key());
    }
    input_shape_ = input.sizes().vec();
  }

  Graph build(const torch::Tensor& leaf, const torch::Tensor& output) {
    check_argument(output.grad_fn() != nullptr, trace_where, "model",
                   "a forward whose output does not depend on the input or any parameter",
                   "a forward that computes its output from its input");
    collect(output.grad_fn());
    input_leaf_ = leaf.unsafeGetTensorImpl();
    // Execution order: autograd numbers nodes as it creates them.
    std::vector<torch::autograd::Node*> order;
    for (auto* n : nodes_)
      if (!is_leaf(*n)) order.push_back(n);
    std::sort(order.begin(), order.end(),
              [](auto* a, auto* b) { return a->sequence_nr() < b->sequence_nr(); });
    const std::int64_t in = builder_.input(channels_of(input_shape_), input_shape_);
    data_[{nullptr, 0}] = in;
    for (auto* n : order) visit(*n);
    const std::int64_t out = value_of(output.grad_fn().get(), output.output_nr());
    check_argument(out >= 0, trace_where, "model", "a forward whose output does not depend on its input",
                   "a forward that computes its output from its input");
    check_argument(!reached_.empty(), trace_where, "model", "a forward that reaches none of its parameters",
                   "a model whose forward uses its parameters (there is nothing to analyse otherwise)");
    builder_.output(out);
    for (const auto& l : layers_)
      if (!reached_.count(l)) builder_.untraced(l);
    return std::move(builder_).finish();
  }

 private:
  using Key = std::pair<const torch::autograd::Node*, std::uint32_t>;

  static bool is_channel_layer(const torch::nn::Module& m) {
    return m.as<torch::nn::Conv2dImpl>() || m.as<torch::nn::LinearImpl>() ||
           m.as<torch::nn::BatchNorm2dImpl>() || m.as<torch::nn::BatchNorm1dImpl>();
  }

  static bool is_leaf(const torch::autograd::Node& n) {
    return dynamic_cast<const torch::autograd::AccumulateGrad*>(&n) != nullptr;
  }

  void collect(const std::shared_ptr<torch::autograd::Node>& root) {
    std::vector<torch::autograd::Node*> stack{root.get()};
    while (!stack.empty()) {
      auto* n = stack.back();
      stack.pop_back();
      if (!n || !seen_.insert(n).second) continue;
      nodes_.push_back(n);
      for (const auto& e : n->next_edges()) stack.push_back(e.function.get());
    }
  }

  // The graph value an edge reads: -1 when it reads no data (a parameter or a constant).
  std::int64_t value_of(const torch::autograd::Node* fn, std::uint32_t nr) const {
    if (fn == nullptr) return -1;
    if (const auto* acc = dynamic_cast<const torch::autograd::AccumulateGrad*>(fn))
      return acc->variable.unsafeGetTensorImpl() == input_leaf_ ? data_.at({nullptr, 0}) : -1;
    auto it = data_.find({fn, nr});
    return it == data_.end() ? -1 : it->second;
  }

  // The parameters an operand reaches without passing through data (a weight, or a weight
  // transposed by the linear kernel).
  void parameters_behind(const torch::autograd::Node* fn, std::set<const ParameterOwner*>& out) const {
    if (fn == nullptr) return;
    if (const auto* acc = dynamic_cast<const torch::autograd::AccumulateGrad*>(fn)) {
      auto it = owners_.find(acc->variable.unsafeGetTensorImpl());
      if (it != owners_.end()) out.insert(&it->second);
      return;
    }
    if (data_nodes_.count(fn)) return;
    for (const auto& e : fn->next_edges()) parameters_behind(e.function.get(), out);
  }

  bool reads_data(const torch::autograd::Node& n) const {
    for (const auto& e : n.next_edges())
      if (value_of(e.function.get(), e.input_nr) >= 0) return true;
    return false;
  }

  void visit(const torch::autograd::Node& n) {
    see_further_outputs(n);
    if (!reads_data(n)) return;  // a transform of parameters only (the transposed weight)
    data_nodes_.insert(&n);
    std::vector<std::int64_t> operands;
    bool constant = false;
    std::set<const ParameterOwner*> params;
    for (const auto& e : n.next_edges()) {
      const auto v = value_of(e.function.get(), e.input_nr);
      if (v >= 0) {
        operands.push_back(v);
      } else {
        const auto before = params.size();
        parameters_behind(e.function.get(), params);
        if (params.size() == before && e.function) constant = true;  // a tensor with no owner
        if (!e.function) constant = true;                              // a constant operand
      }
    }
    const auto shape = output_shape(n, 0);
    data_[{&n, 0}] = params.empty() ? functional(n, operands, constant, shape)
                                    : with_parameters(n, operands, params, shape);
  }

  // The value of an edge into a traced node's further outputs (a split's pieces), which are
  // not understood: a barrier made on first use.
  void see_further_outputs(const torch::autograd::Node& n) {
    for (const auto& e : n.next_edges()) {
      const auto* fn = e.function.get();
      if (e.input_nr == 0 || !data_nodes_.count(fn) || data_.count({fn, e.input_nr})) continue;
      const auto s = output_shape(*fn, e.input_nr);
      data_[{fn, e.input_nr}] = builder_.barrier(fn->name(), "", {data_.at({fn, 0})}, channels_of(s), s);
    }
  }

  std::int64_t with_parameters(const torch::autograd::Node& n, const std::vector<std::int64_t>& operands,
                               const std::set<const ParameterOwner*>& params,
                               const std::vector<std::int64_t>& shape) {
    std::set<std::string> modules;
    for (const auto* p : params) modules.insert(p->module);
    const ParameterOwner& owner = **params.begin();
    const auto& m = *owner.handle;
    const std::int64_t in = operands.size() == 1 ? operands.front() : -1;
    if (modules.size() == 1 && in >= 0) {
      const auto& in_shape = builder_.value(in).shape;
      if (const auto* conv = m.as<torch::nn::Conv2dImpl>();
          conv && shape.size() == 4 && in_shape.size() == 4) {
        reached_.insert(owner.module);
        return builder_.layer(OpKind::Conv2d, n.name(), owner.module, in, shape[1],
                              conv->options.groups(), shape);
      }
      if (m.as<torch::nn::LinearImpl>() && shape.size() == 2 && in_shape.size() == 2) {
        reached_.insert(owner.module);
        return builder_.layer(OpKind::Linear, n.name(), owner.module, in, shape[1], 1, shape);
      }
      if ((m.as<torch::nn::BatchNorm2dImpl>() || m.as<torch::nn::BatchNorm1dImpl>()) &&
          shape == in_shape && shape.size() >= 2) {
        reached_.insert(owner.module);
        return builder_.batch_norm(n.name(), owner.module, in, shape);
      }
    }
    for (const auto& name : modules) reached_.insert(name);
    return builder_.barrier(n.name(), owner.module, operands, channels_of(shape), shape);
  }

  std::int64_t functional(const torch::autograd::Node& n, const std::vector<std::int64_t>& operands,
                          bool constant, const std::vector<std::int64_t>& shape) {
    const std::string name = n.name();
    const auto barrier = [&] { return builder_.barrier(name, "", operands, channels_of(shape), shape); };
    if (operands.empty() || shape.size() < 2) return barrier();
    const auto in = operands.front();
    const auto& in_shape = builder_.value(in).shape;
    const bool same_channels = in_shape.size() >= 2 && in_shape[0] == shape[0] && in_shape[1] == shape[1];
    switch (family_of(name)) {
      case OpFamily::ZeroPreserving:
      case OpFamily::PerChannel:
        if (operands.size() != 1 || !same_channels) return barrier();
        return builder_.per_channel(name, in, family_of(name) == OpFamily::ZeroPreserving, shape);
      case OpFamily::Hardtanh: {
        if (operands.size() != 1 || !same_channels) return barrier();
        const auto* h = dynamic_cast<const torch::autograd::generated::HardtanhBackward0*>(&n);
        const bool zero = h && h->min_val.toDouble() <= 0.0 && h->max_val.toDouble() >= 0.0;
        return builder_.per_channel(name, in, zero, shape);
      }
      case OpFamily::View:
        if (operands.size() != 1 || in_shape.size() < 2 || in_shape[0] != shape[0]) return barrier();
        if (shape.size() == 2 && shape[1] == product(in_shape, 1))
          return builder_.flatten(name, in, product(in_shape, 2), shape);
        if (same_channels && product(shape, 2) == product(in_shape, 2))
          return builder_.per_channel(name, in, true, shape);
        return barrier();
      case OpFamily::Reduce:
        // A mean/sum over the dimensions after the channels ([N, C, H, W] -> [N, C] or
        // [N, C, 1, 1]): shapes tell it apart from one over the channels.
        if (operands.size() != 1 || !same_channels || product(shape, 0) != shape[0] * shape[1] ||
            !(shape.size() == 2 || shape.size() == in_shape.size()))
          return barrier();
        return builder_.per_channel(name, in, true, shape);
      case OpFamily::Add:
      case OpFamily::Mul: {
        for (auto o : operands) {
          const auto& s = builder_.value(o).shape;
          if (s.size() != shape.size() || s[0] != shape[0] || (s[1] != shape[1] && s[1] != 1))
            return barrier();
        }
        if (builder_.value(in).shape[1] != shape[1] && operands.size() == 1) return barrier();
        return builder_.elementwise(family_of(name) == OpFamily::Add ? OpKind::Add : OpKind::Mul, name,
                                    operands, constant, shape);
      }
      case OpFamily::Div:
        // x / constant keeps zeros; a traced divisor could divide by a removed channel.
        if (operands.size() != 1 || n.next_edges().empty() ||
            value_of(n.next_edges()[0].function.get(), n.next_edges()[0].input_nr) != in || !same_channels)
          return barrier();
        return builder_.per_channel(name, in, true, shape);
      case OpFamily::Concat: {
        if (constant) return barrier();  // an operand we cannot see
        std::int64_t sum = 0;
        bool channels_equal = true;
        for (auto o : operands) {
          const auto& s = builder_.value(o).shape;
          if (s.size() != shape.size()) return barrier();
          sum += s[1];
          channels_equal = channels_equal && s[1] == shape[1];
          for (std::size_t d = 2; d < s.size(); ++d)
            if (s[d] != shape[d]) channels_equal = false;
        }
        if (sum == shape[1] && std::all_of(operands.begin(), operands.end(), [&](auto o) {
              const auto& s = builder_.value(o).shape;
              return s[0] == shape[0] && std::equal(s.begin() + 2, s.end(), shape.begin() + 2);
            }))
          return builder_.concat(name, operands, shape);
        if (channels_equal || operands.size() == 1) {
          // Along another dimension: channel c of every operand is channel c of the result.
          for (auto o : operands)
            if (builder_.value(o).shape[1] != shape[1]) return barrier();
          return builder_.elementwise(OpKind::Add, name, operands, false, shape);
        }
        return barrier();
      }
      case OpFamily::BatchNorm:  // without affine parameters: no way to tell which module
      case OpFamily::Unknown:
        return barrier();
    }
    return barrier();
  }

  GraphBuilder builder_;
  std::unordered_map<const c10::TensorImpl*, ParameterOwner> owners_;
  std::vector<std::string> layers_;
  std::set<std::string> reached_;
  std::set<const torch::autograd::Node*> seen_;
  std::vector<torch::autograd::Node*> nodes_;
  std::set<const torch::autograd::Node*> data_nodes_;
  std::map<Key, std::int64_t> data_;
  const c10::TensorImpl* input_leaf_ = nullptr;
  std::vector<std::int64_t> input_shape_;
};

}  // namespace detail

// The channel-dependency graph of `model` for inputs like `example` (a batch; its values do not
// matter, its shape does). Throws when tracing cannot work: gradients disabled by the caller
// (NoGradGuard, InferenceMode), an output that does not depend on the input, or a forward that
// fails on `example` (its error, with context).
template <traceable Model>
Graph trace(Model& model, const torch::Tensor& example) {
  using namespace detail;
  check_argument(example.defined(), trace_where, "example", "an undefined tensor",
                 "an example input batch");
  check_argument(example.is_floating_point(), trace_where, "example", example.scalar_type(),
                 "a floating-point input batch");
  check_argument(!c10::InferenceMode::is_enabled(), trace_where, "InferenceMode", "enabled",
                 "gradients recorded: tracing reads the autograd graph, so call it outside "
                 "c10::InferenceMode");
  check_argument(torch::GradMode::is_enabled(), trace_where, "GradMode", "disabled",
                 "gradients recorded: tracing reads the autograd graph, so call it outside "
                 "torch::NoGradGuard");
  auto& m = impl(model);
  Tracer tracer(m, example);
  torch::Tensor leaf = example.detach().clone().requires_grad_(true);
  torch::Tensor output;
  {
    TraceGuard guard(m);
    try {
      // A clone, so that the model may work in place on its input.
      output = m.forward(leaf.clone());
    } catch (const c10::Error& e) {
      throw argument_error(concat(trace_where, ": the model's forward failed on the example input of shape ",
                                  c10::str(example.sizes()), ": ", e.what_without_backtrace()));
    }
  }
  return tracer.build(leaf, output);
}

}  // namespace fasterai
