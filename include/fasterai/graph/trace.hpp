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

#include <bit>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
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
#include <fasterai/layers/registry.hpp>

namespace fasterai {

namespace detail {

inline constexpr const char* trace_where = "fasterai::trace";

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

inline std::int64_t channels_of(const std::vector<std::int64_t>& shape, std::int64_t channel_dim = 1) {
  return channel_dim >= 0 && channel_dim < static_cast<std::int64_t>(shape.size()) ? shape[channel_dim] : 0;
}

inline std::int64_t product(const std::vector<std::int64_t>& v, std::size_t from, std::size_t to = SIZE_MAX) {
  std::int64_t p = 1;
  for (std::size_t i = from; i < std::min(to, v.size()); ++i) p *= v[i];
  return p;
}

// A dimension counted from the end (-1) as a dimension of a tensor of `rank`.
inline std::int64_t wrap_dim(std::int64_t dim, std::size_t rank) {
  return dim < 0 ? dim + static_cast<std::int64_t>(rank) : dim;
}

// Where `channels` channels on dimension `cd` of `in` (sharing it with the batch factor
// `outer`: index n·channels + c) go in a reshape to `out`. Reading the tensor
// as [B, C, A] (B everything before the channels, A everything after), a dimension j of `out`
// holds them when its stride is A and it spans a multiple of C (the channels, perhaps merged
// with a batch factor: [N, H, T, d] -> [N·H, T, d]); or when it starts at B and also takes the
// dimensions after (each channel becoming `block` features: [N, C, H, W] -> [N, C·H·W]); or
// when it splits the channels into `heads` runs, the rest of each run going after it
// ([N, T, H·d] -> [N, T, H, d], or -> [T, N·H, d] as LibTorch's MultiheadAttention does).
struct ViewMap {
  std::int64_t dim = -1;    // the dimension of `out` holding the channels; -1: none
  std::int64_t block = 1;   // features per channel there
  std::int64_t heads = 0;   // > 0: the channels became this many runs (heads)
  std::int64_t outer = 1;   // the batch factor sharing that dimension
};
inline ViewMap map_view(const std::vector<std::int64_t>& in, std::int64_t cd, std::int64_t outer, std::int64_t channels,
                        const std::vector<std::int64_t>& out) {
  if (channels <= 0 || cd < 0 || cd >= static_cast<std::int64_t>(in.size())) return {};
  const auto b = product(in, 0, static_cast<std::size_t>(cd)) * outer;
  const auto a = product(in, static_cast<std::size_t>(cd) + 1);
  const auto c = channels;
  auto at = [&](std::size_t j) -> ViewMap {
    const auto pre = product(out, 0, j), post = product(out, j + 1), here = out[j];
    const auto dim = static_cast<std::int64_t>(j);
    if (pre * here == b * c && here % c == 0 && post == a) return {dim, 1, 0, here / c};
    if (pre == b && here * post == c * a && here % c == 0) return {dim, here / c, 0, 1};
    if ((pre * here) % b == 0) {
      const auto g = pre * here / b;
      if (g > 1 && g < c && c % g == 0 && here % g == 0 && post * g == c * a) return {dim, 1, g, here / g};
    }
    return {};
  };
  // Dimensions of size 1 can make several places fit ([1, 1, 1, 1] -> [1, 1]: one channel of a
  // batch of one): the channels stay where they were when that place fits.
  if (cd < static_cast<std::int64_t>(out.size()))
    if (const auto same = at(static_cast<std::size_t>(cd)); same.dim >= 0) return same;
  for (std::size_t j = 0; j < out.size(); ++j)
    if (const auto m = at(j); m.dim >= 0) return m;
  return {};
}

// The dimension a split cut along (chunk, split, split_with_sizes); -1: not a split.
inline std::int64_t split_dim(const torch::autograd::Node& n) {
  using namespace torch::autograd::generated;
  if (const auto* s = dynamic_cast<const SplitBackward0*>(&n)) return s->dim;
  if (const auto* s = dynamic_cast<const SplitWithSizesBackward0*>(&n)) return s->dim;
  if (const auto* s = dynamic_cast<const UnsafeSplitBackward0*>(&n)) return s->dim;
  return -1;
}

// The dimensions a mean or sum reduced, where the node saved them (all of them: nullopt).
template <class Reduction>
std::optional<std::vector<std::int64_t>> saved_dims(const Reduction& n) {
  if constexpr (requires { n.dim.list; }) {
    if (n.dim.list) return std::vector<std::int64_t>(n.dim.list->begin(), n.dim.list->end());
  }
  return std::nullopt;
}
inline std::optional<std::vector<std::int64_t>> reduced_dims(const torch::autograd::Node& n) {
  if (const auto* m = dynamic_cast<const torch::autograd::generated::MeanBackward1*>(&n)) return saved_dims(*m);
  if (const auto* s = dynamic_cast<const torch::autograd::generated::SumBackward1*>(&n)) return saved_dims(*s);
  return std::nullopt;
}

class Tracer {
 public:
  Tracer(torch::nn::Module& model, const torch::Tensor& input) {
    for (const auto& item : model.named_modules("", /*include_self=*/true)) {
      const LayerRule* rule = rule_of(*item.value());
      for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
        if (p.value().defined()) owners_[p.value().unsafeGetTensorImpl()] = {item.key(), p.key(), item.value(), rule};
      if (rule) layers_.push_back(item.key());
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

  // The module a parameter belongs to, found by the parameter's tensor.
  struct Owner {
    std::string module;                          // qualified name, "" for the root
    std::string parameter;                       // its name in the module
    std::shared_ptr<torch::nn::Module> handle;
    const LayerRule* rule = nullptr;             // the module's rule, nullptr: a free parameter
  };

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

  const Owner* owner_of(const torch::autograd::Node* fn) const {
    const auto* acc = dynamic_cast<const torch::autograd::AccumulateGrad*>(fn);
    if (acc == nullptr) return nullptr;
    auto it = owners_.find(acc->variable.unsafeGetTensorImpl());
    return it == owners_.end() ? nullptr : &it->second;
  }

  // The parameters an operand reaches without passing through data (a weight, or a weight
  // transposed by the linear kernel).
  void parameters_behind(const torch::autograd::Node* fn, std::set<const Owner*>& out) const {
    if (fn == nullptr) return;
    if (is_leaf(*fn)) {
      if (const auto* o = owner_of(fn)) out.insert(o);
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

  // A free parameter read directly or through an expand (a class token expanded over the
  // batch): its owner and the shape it has at the operation.
  std::pair<const Owner*, std::vector<std::int64_t>> free_parameter(const torch::autograd::Edge& e) const {
    const torch::autograd::Node* fn = e.function.get();
    if (fn == nullptr) return {};
    const Owner* o = owner_of(fn);
    if (o == nullptr && fn->name() == "ExpandBackward0" && fn->next_edges().size() == 1)
      o = owner_of(fn->next_edges()[0].function.get());
    if (o == nullptr || o->rule != nullptr) return {};
    return {o, output_shape(*fn, e.input_nr)};
  }

  void visit(const torch::autograd::Node& n) {
    see_further_outputs(n);
    if (!reads_data(n)) {
      embedding(n);
      return;  // otherwise a transform of parameters only (the transposed weight)
    }
    data_nodes_.insert(&n);
    Operands ops;
    std::set<const Owner*> params;
    for (const auto& e : n.next_edges()) {
      const auto v = value_of(e.function.get(), e.input_nr);
      if (v >= 0) {
        ops.values.push_back(v);
        ops.data.push_back(v);
        continue;
      }
      if (auto [owner, shape] = free_parameter(e); owner) {
        reached_.insert(owner->module);
        ops.values.push_back(-1);  // made once the channel dimension is known
        ops.free.push_back({ops.values.size() - 1, owner, shape});
        continue;
      }
      const auto before = params.size();
      parameters_behind(e.function.get(), params);
      if (params.size() == before) ops.constant = true;  // a tensor with no owner, or none
    }
    const auto shape = output_shape(n, 0);
    if (params.empty() && family_of(n.name()) == OpFamily::Split && split(n, ops)) return;
    data_[{&n, 0}] = params.empty() ? functional(n, ops, shape) : with_parameters(n, ops.data, params, shape);
  }

  // An Embedding's lookup: a layer that reads indices, not channels.
  void embedding(const torch::autograd::Node& n) {
    std::set<const Owner*> params;
    for (const auto& e : n.next_edges()) parameters_behind(e.function.get(), params);
    if (params.size() != 1) return;
    const Owner& o = **params.begin();
    if (!o.rule || o.rule->role != LayerRole::Producer) return;
    for (const auto& t : o.rule->tensors)
      if (t.in_dim >= 0) return;  // a layer that reads channels: here only its weight is transformed
    const auto shape = output_shape(n, 0);
    if (shape.empty()) return;
    const auto cd = wrap_dim(o.rule->channel_dim, shape.size());
    reached_.insert(o.module);
    data_nodes_.insert(&n);
    data_[{&n, 0}] = builder_.layer(o.rule, n.name(), o.module, -1, channels_of(shape, cd), 1, shape, cd);
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
                               const std::set<const Owner*>& params, const std::vector<std::int64_t>& shape) {
    std::set<std::string> modules;
    for (const auto* p : params) modules.insert(p->module);
    const Owner& owner = **params.begin();
    const LayerRule* rule = owner.rule;
    std::int64_t in = operands.size() == 1 ? operands.front() : -1;
    if (modules.size() == 1 && rule && in >= 0 && !shape.empty()) {
      // Data whose channels a barrier keeps, seen along another dimension than this layer reads
      // (tokens after an attention the graph does not follow): read along the layer's.
      const auto& sh = builder_.value(in).shape;
      const auto layer_cd = wrap_dim(rule->channel_dim, sh.size());
      if (sh.size() >= 2 && layer_cd >= 0 && layer_cd < static_cast<std::int64_t>(sh.size()) &&
          builder_.value(in).channel_dim != layer_cd && builder_.kept(in))
        in = builder_.reread(in, sh[layer_cd], sh, layer_cd);
      const auto& iv = builder_.value(in);
      const auto& in_shape = iv.shape;
      const auto rank = static_cast<std::int64_t>(shape.size());
      const auto in_cd = wrap_dim(rule->channel_dim, in_shape.size());
      const auto out_cd = wrap_dim(rule->channel_dim, shape.size());
      const bool ranks = rule->rank == 0 || (rank == rule->rank && static_cast<std::int64_t>(in_shape.size()) == rule->rank);
      const auto& m = *owner.handle;
      const auto groups = detail::groups_of(*rule, m);
      // A bias added after a matrix product (a Linear on a non-contiguous token tensor): part of
      // the layer whose product it follows.
      if (family_of(n.name()) == OpFamily::Add && made_by(in, owner.module) && shape == in_shape)
        return builder_.per_channel(n.name(), in, true, shape, iv.channel_dim);
      if (ranks && iv.channel_dim == in_cd && in_shape.size() >= 2) {
        reached_.insert(owner.module);
        if (rule->role == LayerRole::Producer && iv.channels() % groups == 0)
          return builder_.layer(rule, n.name(), owner.module, in, channels_of(shape, out_cd), groups, shape, out_cd);
        if ((rule->role == LayerRole::Norm || rule->role == LayerRole::Normalizing) && shape == in_shape &&
            iv.channels() % groups == 0)
          return builder_.norm(rule, n.name(), owner.module, in, groups, normalizes_across(*rule, groups), shape,
                               out_cd);
      }
    }
    for (const auto& name : modules) reached_.insert(name);
    const auto v = builder_.barrier(n.name(), owner.module, operands, channels_of(shape), shape);
    // An opaque layer: a barrier whose cost its rule still tells (once, at its first node).
    if (modules.size() == 1 && rule && rule->role == LayerRole::Opaque && opaque_.insert(owner.module).second)
      builder_.set_rule(builder_.value(v).producer, rule);
    return v;
  }

  // Whether a value is the output of the layer `module`, possibly reshaped since.
  bool made_by(std::int64_t v, const std::string& module) const {
    for (auto p = builder_.value(v).producer; p >= 0;) {
      const auto& node = builder_.node(p);
      if (node.kind == OpKind::Layer) return node.module == module;
      if (node.kind != OpKind::PerChannel || node.inputs.empty()) return false;
      p = builder_.value(node.inputs.front()).producer;
    }
    return false;
  }

  struct FreeOperand {
    std::size_t position;  // in Operands::values
    const Owner* owner;
    std::vector<std::int64_t> shape;  // as the operation sees it
  };
  struct Operands {
    std::vector<std::int64_t> values;  // in operand order; -1 for free parameters not made yet
    std::vector<std::int64_t> data;    // the traced values among them
    std::vector<FreeOperand> free;
    bool constant = false;             // an operand that is neither (a constant tensor)
  };

  // A split along the channels (a fused qkv projection chunked in three): each piece a run of
  // them. False when it cuts along another dimension or cannot be read: a barrier then.
  bool split(const torch::autograd::Node& n, const Operands& ops) {
    if (ops.data.size() != 1 || !ops.free.empty() || ops.constant) return false;
    const auto in = ops.data.front();
    const auto& iv = builder_.value(in);
    const auto dim = wrap_dim(split_dim(n), iv.shape.size());
    if (iv.outer != 1 || dim != iv.channel_dim) return false;
    std::vector<std::vector<std::int64_t>> shapes;
    std::int64_t total = 0;
    for (std::uint32_t k = 0; k < n.num_inputs(); ++k) {
      shapes.push_back(output_shape(n, k));
      if (shapes.back().size() != iv.shape.size()) return false;
      total += shapes.back()[dim];
    }
    if (total != iv.channels()) return false;
    std::int64_t offset = 0;
    for (std::uint32_t k = 0; k < n.num_inputs(); ++k) {
      const auto width = shapes[k][dim];
      data_[{&n, k}] = builder_.split(n.name(), in, offset, width, shapes[k], dim);
      offset += width;
    }
    return true;
  }

  std::int64_t functional(const torch::autograd::Node& n, Operands& ops, const std::vector<std::int64_t>& shape) {
    const std::string name = n.name();
    const auto& operands = ops.data;
    const auto rank = shape.size();
    const auto barrier = [&] {
      for (auto& f : ops.free) reached_.insert(f.owner->module);
      return builder_.barrier(name, ops.free.empty() ? "" : ops.free.front().owner->module, operands,
                              channels_of(shape), shape);
    };
    if (operands.empty() || rank < 2) return barrier();
    const auto in = operands.front();
    const auto& iv = builder_.value(in);
    const auto& in_shape = iv.shape;
    const auto cd = iv.channel_dim;
    const auto channels = iv.channels();
    const auto outer = iv.outer;
    // Channel by channel: same rank, the channels where they were.
    const bool same_channels =
        in_shape.size() == rank && in_shape[0] == shape[0] && channels_of(shape, cd) == channels * outer;
    const auto family = family_of(name);
    if (!ops.free.empty() && family != OpFamily::Add && family != OpFamily::Mul && family != OpFamily::Concat)
      return barrier();
    switch (family) {
      case OpFamily::ZeroPreserving:
      case OpFamily::PerChannel:
        if (operands.size() != 1 || !same_channels) return barrier();
        return builder_.per_channel(name, in, family == OpFamily::ZeroPreserving, shape, cd);
      case OpFamily::Hardtanh: {
        if (operands.size() != 1 || !same_channels) return barrier();
        const auto* h = dynamic_cast<const torch::autograd::generated::HardtanhBackward0*>(&n);
        const bool zero = h && h->min_val.toDouble() <= 0.0 && h->max_val.toDouble() >= 0.0;
        return builder_.per_channel(name, in, zero, shape, cd);
      }
      case OpFamily::Softmax: {
        // Over another dimension: channel by channel, but softmax(0) is not 0.
        std::int64_t dim = -1;
        if (const auto* s = dynamic_cast<const torch::autograd::generated::SoftmaxBackward0*>(&n)) dim = s->dim;
        if (const auto* s = dynamic_cast<const torch::autograd::generated::LogSoftmaxBackward0*>(&n)) dim = s->dim;
        if (operands.size() != 1 || !same_channels || wrap_dim(dim, rank) == cd) return barrier();
        return builder_.per_channel(name, in, false, shape, cd);
      }
      case OpFamily::Permute: {
        if (operands.size() != 1 || in_shape.size() != rank) return barrier();
        std::int64_t to = -1;
        if (const auto* t = dynamic_cast<const torch::autograd::generated::TransposeBackward0*>(&n)) {
          const auto d0 = wrap_dim(t->dim0, rank), d1 = wrap_dim(t->dim1, rank);
          to = cd == d0 ? d1 : cd == d1 ? d0 : cd;
        } else if (const auto* p = dynamic_cast<const torch::autograd::generated::PermuteBackward0*>(&n)) {
          for (std::size_t j = 0; j < p->dims.size(); ++j)
            if (wrap_dim(p->dims[j], rank) == cd) to = static_cast<std::int64_t>(j);
        }
        if (to < 0 || channels_of(shape, to) != channels * outer) return barrier();
        return builder_.per_channel(name, in, true, shape, to);
      }
      case OpFamily::Select: {
        std::int64_t dim = -1;
        if (const auto* s = dynamic_cast<const torch::autograd::generated::SelectBackward0*>(&n)) dim = s->dim;
        if (const auto* s = dynamic_cast<const torch::autograd::generated::SliceBackward0*>(&n)) dim = s->dim;
        dim = wrap_dim(dim, in_shape.size());
        if (operands.size() != 1 || dim < 0 || dim == cd) return barrier();
        const auto to = rank < in_shape.size() && dim < cd ? cd - 1 : cd;  // select drops `dim`
        if (channels_of(shape, to) != channels * outer) return barrier();
        return builder_.per_channel(name, in, true, shape, to);
      }
      case OpFamily::View: {
        if (operands.size() != 1 || in_shape.size() < 2 || cd < 0) return barrier();
        const auto map = map_view(in_shape, cd, outer, channels, shape);
        if (map.dim < 0) return barrier();
        if (map.heads > 0) return builder_.heads(name, in, map.heads, shape, map.dim, map.outer);
        if (map.block > 1) return builder_.flatten(name, in, map.block, shape, map.dim);
        const auto v = builder_.per_channel(name, in, true, shape, map.dim);
        builder_.set_outer(v, map.outer);
        return v;
      }
      case OpFamily::Reduce: {
        // A mean/sum over dimensions other than the channels: the reduced dimensions as the
        // node saved them, or else as the shapes tell them without doubt.
        if (operands.size() != 1 || outer != 1) return barrier();
        std::set<std::int64_t> places;
        const auto r = in_shape.size();
        if (auto dims = reduced_dims(n)) {
          std::int64_t before = 0;
          bool channels_reduced = false;
          for (auto d : *dims) {
            d = wrap_dim(d, r);
            channels_reduced |= d == cd;
            before += d < cd;
          }
          if (!channels_reduced) places.insert(rank == r ? cd : cd - before);
        } else if (rank == r) {
          if (shape[cd] == channels && (channels > 1 || in_shape == shape)) places.insert(cd);
        } else if (rank < r && r <= 8) {
          for (unsigned mask = 0; mask < (1u << r); ++mask) {  // the dimensions kept
            std::vector<std::int64_t> kept;
            for (std::size_t d = 0; d < r; ++d)
              if (mask & (1u << d)) kept.push_back(in_shape[d]);
            if (kept != shape) continue;
            if (!(mask & (1u << cd))) places.insert(-1);
            else places.insert(std::popcount(mask & ((1u << cd) - 1)));
          }
        }
        if (places.size() != 1 || *places.begin() < 0 || channels_of(shape, *places.begin()) != channels)
          return barrier();
        return builder_.per_channel(name, in, true, shape, *places.begin());
      }
      case OpFamily::Add:
      case OpFamily::Mul: {
        // Operands broadcast from the right: the channels are where the first operand's are.
        const auto out_cd = cd + static_cast<std::int64_t>(rank) - static_cast<std::int64_t>(in_shape.size());
        const auto aligned = [&](const std::vector<std::int64_t>& s) {
          return out_cd - (static_cast<std::int64_t>(rank) - static_cast<std::int64_t>(s.size()));
        };
        for (auto o : operands) {
          const auto& v = builder_.value(o);
          const auto d = aligned(v.shape);
          if (v.shape.size() > rank) return barrier();
          const bool broadcast = d < 0 || v.shape[d] == 1;
          if (!broadcast && (v.channel_dim != d || v.outer != outer || v.channels() * outer != channels_of(shape, out_cd)))
            return barrier();
        }
        if (channels_of(shape, out_cd) != channels * outer || (outer != 1 && !ops.free.empty())) return barrier();
        bool constant = ops.constant;
        for (auto& f : ops.free) {
          const auto d = aligned(f.shape);
          const auto pd = d - (static_cast<std::int64_t>(f.shape.size()) - f.owner->handle->named_parameters(false)[f.owner->parameter].dim());
          if (d < 0 || f.shape[d] == 1 || pd < 0) {
            constant = true;  // broadcast over the channels: a constant to them
            continue;
          }
          if (f.shape[d] != channels) return barrier();
          ops.values[f.position] = builder_.parameter(f.owner->module, f.owner->parameter, pd, channels, f.shape, d);
          reached_.insert(f.owner->module);
        }
        std::vector<std::int64_t> all;
        for (auto v : ops.values)
          if (v >= 0) all.push_back(v);
        return builder_.elementwise(family == OpFamily::Add ? OpKind::Add : OpKind::Mul, name, all, constant,
                                    shape, out_cd);
      }
      case OpFamily::Div:
        // x / constant keeps zeros; a traced divisor could divide by a removed channel.
        if (operands.size() != 1 || n.next_edges().empty() ||
            value_of(n.next_edges()[0].function.get(), n.next_edges()[0].input_nr) != in || !same_channels)
          return barrier();
        return builder_.per_channel(name, in, true, shape, cd);
      case OpFamily::BatchMatmul: {
        // [B·H, T, d] × [B·H, d, T']: head h of one operand meets head h of the other only, and
        // a head of the product is zero where either operand's is (q·kᵀ with q or k zero, the
        // attention times a zero v). Both operands must hold the same heads on the batch.
        if (operands.size() != 2 || ops.constant || rank != 3) return barrier();
        const auto& other = builder_.value(operands[1]);
        if (cd != 0 || other.channel_dim != 0 || other.channels() != channels || other.outer != outer ||
            channels_of(shape, 0) != channels * outer)
          return barrier();
        const auto v = builder_.elementwise(OpKind::Mul, name, operands, false, shape, 0);
        return v;
      }
      case OpFamily::Split:  // along another dimension than the channels (see split())
        return barrier();
      case OpFamily::Concat: {
        if (ops.constant || outer != 1) return barrier();  // an operand we cannot see
        const auto* c = dynamic_cast<const torch::autograd::generated::CatBackward0*>(&n);
        if (c == nullptr) return barrier();
        const auto dim = wrap_dim(c->dim, rank);
        for (auto& f : ops.free) {  // a class token: a parameter with the channels of the rest
          const auto pd = cd - (static_cast<std::int64_t>(f.shape.size()) - f.owner->handle->named_parameters(false)[f.owner->parameter].dim());
          if (f.shape.size() != rank || dim == cd || pd < 0 || f.shape[cd] != channels) return barrier();
          ops.values[f.position] = builder_.parameter(f.owner->module, f.owner->parameter, pd, channels, f.shape, cd);
          reached_.insert(f.owner->module);
        }
        std::int64_t sum = 0;
        for (auto o : ops.values) {
          const auto& v = builder_.value(o);
          if (v.shape.size() != rank || v.channel_dim != cd) return barrier();
          sum += v.channels();
        }
        if (dim == cd && sum == shape[cd]) return builder_.concat(name, ops.values, shape, cd);
        // Along another dimension: channel c of every operand is channel c of the result.
        for (auto o : ops.values)
          if (builder_.value(o).channels() != shape[cd]) return barrier();
        return builder_.elementwise(OpKind::Add, name, ops.values, false, shape, cd);
      }
      case OpFamily::BatchNorm:  // without affine parameters: no way to tell which module
      case OpFamily::Unknown:
        return barrier();
    }
    return barrier();
  }

  GraphBuilder builder_;
  std::unordered_map<const c10::TensorImpl*, Owner> owners_;
  std::vector<std::string> layers_;
  std::set<std::string> reached_;
  std::set<std::string> opaque_;
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
  // Indices (a text encoder's token ids) are read by an Embedding, which then makes the
  // channels; they carry no gradient and no channels themselves.
  check_argument(example.is_floating_point() || c10::isIntegralType(example.scalar_type(), /*includeBool=*/false), trace_where, "example",
                 example.scalar_type(), "a floating-point input batch, or integer indices");
  check_argument(!c10::InferenceMode::is_enabled(), trace_where, "InferenceMode", "enabled",
                 "gradients recorded: tracing reads the autograd graph, so call it outside "
                 "c10::InferenceMode");
  check_argument(torch::GradMode::is_enabled(), trace_where, "GradMode", "disabled",
                 "gradients recorded: tracing reads the autograd graph, so call it outside "
                 "torch::NoGradGuard");
  auto& m = impl(model);
  Tracer tracer(m, example);
  torch::Tensor leaf = example.detach().clone().requires_grad_(example.is_floating_point());
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
