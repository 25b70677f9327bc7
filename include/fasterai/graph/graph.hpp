#pragma once
// The channel-dependency graph: the layers and parameter-free operations of one forward pass in
// execution order, and which channels must be removed together.
//
// Every tensor flowing through the network (a value) has one channel element per channel
// (per feature after a Flatten). Operations relate the elements of their operands and result:
//
//   Conv2d, Linear          new elements for the output; the input is read, not coupled
//   grouped Conv2d          input and output channels of one group become one element set
//                           (a depthwise conv couples input c with output c)
//   BatchNorm, activations, the output has the input's elements
//   pooling, dropout, views
//   add / sub / mul         the operands' channel c are one element: a residual stream is one
//                           group
//   cat along channels      the operands' elements side by side
//   split along channels    each piece a run of the input's elements (a fused qkv projection)
//   Flatten into a Linear   each channel's element repeated over the features it owns
//   heads: [.., H·d] viewed  each head's d elements become one element: a head is removed
//     as [.., H, d]         whole (its head dimension, the attention's scale, stay)
//   batched matmul of heads head h of both operands is one element (q·kᵀ, attention · v)
//   barrier                 anything else: its channels on either side are never removed
//
// Elements joined by these rules form a *unit*: channels that exist or vanish together in every
// layer they touch. Units with the same producing layers form a *coupled group* (one residual
// stage, one plain conv's output channels): what Local sparsity counts within and what the
// Pruner keeps at least one unit of. The graph is built by `trace` (any module, from one
// forward's autograd graph) or by `graph_of` (Sequentials, statically); both go through
// `GraphBuilder`, so these rules live here only.

#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <ostream>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai {

// What an operation does to channels.
enum class OpKind {
  Input,       // the model's input: its channels are never removed
  Layer,       // a module whose rule makes new channels from the ones it reads (Conv, Linear,
               // Embedding; a grouped convolution mixes within groups)
  Norm,        // a normalization module: channel by channel (BatchNorm), by groups (GroupNorm) or
               // over all channels (LayerNorm: `across_channels`, removal approximate)
  Parameter,   // a parameter of no layer used as data: a class token, a position embedding, a
               // layer scale; its channels are those of the values it is added to or multiplies
  PerChannel,  // parameter-free and channel by channel: activations, pooling, dropout, views
  Add,         // elementwise sum or difference: zero only where every operand is zero
  Mul,         // elementwise product: zero where any operand is zero
  Concat,      // operands' channels side by side
  Split,       // one piece of a split along the channels: a run of the input's channels
  Heads,       // consecutive channels viewed as one (attention heads: [.., H·d] -> [.., H, d])
  Flatten,     // each channel becomes a block of consecutive features
  Barrier,     // not understood: the channels on either side are kept as they are
};

constexpr std::string_view to_string(OpKind kind) {
  switch (kind) {
    case OpKind::Input: return "Input";
    case OpKind::Layer: return "Layer";
    case OpKind::Norm: return "Norm";
    case OpKind::Parameter: return "Parameter";
    case OpKind::PerChannel: return "PerChannel";
    case OpKind::Add: return "Add";
    case OpKind::Mul: return "Mul";
    case OpKind::Concat: return "Concat";
    case OpKind::Split: return "Split";
    case OpKind::Heads: return "Heads";
    case OpKind::Flatten: return "Flatten";
    case OpKind::Barrier: return "Barrier";
  }
  return "Barrier";
}

struct GraphNode {
  OpKind kind = OpKind::Barrier;
  std::string op;      // what ran: the autograd node ("ConvolutionBackward0") or the layer kind
  std::string module;  // qualified name of the module it belongs to; empty for functional ops
  std::vector<std::int64_t> inputs;  // values read, in operand order
  std::int64_t output = -1;          // the value produced
  const LayerRule* rule = nullptr;   // Layer/Norm: the module's rule; Barrier: an opaque layer's
  std::int64_t groups = 1;           // Layer/Norm: channel groups coupling input and output
  bool zero_preserving = true;       // PerChannel: maps a zero channel to a zero channel
  bool constant_operand = false;     // Add/Mul: an operand that is not traced (a constant)
  bool across_channels = false;      // Norm: statistics over all channels (LayerNorm)
  std::string parameter;             // Parameter: its name in `module` ("class_token")
  std::int64_t parameter_dim = -1;   // Parameter: the dimension of it that holds the channels
  std::int64_t offset = 0;           // Split: the input channel its piece starts at
  // Layer/Norm: whether it reads every input channel into every output channel (within its
  // groups): a channel it reads is removable only when it reads zeros there.
  bool mixes() const { return kind == OpKind::Layer; }
};

struct GraphValue {
  std::vector<std::int64_t> elements;  // one element per channel (per feature after Flatten)
  std::vector<std::int64_t> shape;     // traced graphs only: the tensor's shape
  std::int64_t producer = -1;          // the node that made it
  std::int64_t channel_dim = 1;        // traced graphs only: the dimension of `shape` holding them
  // Traced graphs only: the batch factor that shares the channel dimension, outside the
  // channels (attention heads merged into the batch, [N·H, T, d]: index n·H + h).
  std::int64_t outer = 1;
  std::int64_t channels() const { return static_cast<std::int64_t>(elements.size()); }
};

// A place where channels are kept because the graph cannot prove removing them exact.
struct GraphBarrier {
  std::string op;                    // the operation ("TransposeBackward0", "model output", ...)
  std::vector<std::string> layers;   // the layers whose channels it protects
};

// A set of channels (one per layer it touches) removed or kept as one.
struct ChannelUnit {
  bool fixed = false;        // an input, output or barrier holds one of its channels
  bool approximate = false;  // a norm over all channels (LayerNorm) reads it: removing it
                             // changes that norm's statistics
  std::int64_t group = -1;   // its coupled group
};

struct CoupledGroup {
  std::vector<std::string> producers;  // layers (and free parameters) whose outputs it holds
  std::vector<std::int64_t> units;     // in element order of the first producer
};

class Graph {
 public:
  const std::vector<GraphNode>& nodes() const { return nodes_; }
  const std::vector<GraphValue>& values() const { return values_; }
  std::int64_t input() const { return input_; }
  std::int64_t output() const { return output_; }
  const std::vector<GraphBarrier>& barriers() const { return barriers_; }
  // Modules with a layer rule that the forward pass never reached: their channels are not
  // analysed, so nothing removes them.
  const std::vector<std::string>& untraced_layers() const { return untraced_; }

  std::int64_t unit_of(std::int64_t element) const { return unit_of_[element]; }
  const std::vector<ChannelUnit>& units() const { return units_; }
  const std::vector<CoupledGroup>& groups() const { return groups_; }

  // Units of a value's channels.
  std::vector<std::int64_t> units_of(std::int64_t value) const {
    std::vector<std::int64_t> u;
    for (auto e : values_[value].elements) u.push_back(unit_of_[e]);
    return u;
  }
  // The nodes of one module (more than one when it is called more than once).
  std::vector<std::int64_t> nodes_of(const std::string& module) const {
    std::vector<std::int64_t> n;
    for (std::size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].module == module) n.push_back(static_cast<std::int64_t>(i));
    return n;
  }
  // The nodes reading a value.
  std::vector<std::int64_t> consumers(std::int64_t value) const {
    std::vector<std::int64_t> c;
    for (std::size_t i = 0; i < nodes_.size(); ++i)
      if (std::find(nodes_[i].inputs.begin(), nodes_[i].inputs.end(), value) != nodes_[i].inputs.end())
        c.push_back(static_cast<std::int64_t>(i));
    return c;
  }

 private:
  friend class GraphBuilder;
  std::vector<GraphNode> nodes_;
  std::vector<GraphValue> values_;
  std::int64_t input_ = -1, output_ = -1;
  std::vector<GraphBarrier> barriers_;
  std::vector<std::string> untraced_;
  std::vector<std::int64_t> unit_of_;
  std::vector<ChannelUnit> units_;
  std::vector<CoupledGroup> groups_;
};

inline GraphNode make_node(OpKind kind, std::string op, std::string module, std::vector<std::int64_t> inputs,
                           std::int64_t output) {
  GraphNode n;
  n.kind = kind;
  n.op = std::move(op);
  n.module = std::move(module);
  n.inputs = std::move(inputs);
  n.output = output;
  return n;
}

// The qualified name of a Parameter node's tensor ("encoder.pos_embedding").
inline std::string parameter_name(const GraphNode& n) {
  return n.module.empty() ? n.parameter : n.module + "." + n.parameter;
}

inline std::ostream& operator<<(std::ostream& os, const Graph& g) {
  for (std::size_t i = 0; i < g.nodes().size(); ++i) {
    const auto& n = g.nodes()[i];
    os << i << ": " << to_string(n.kind) << " " << n.op;
    if (!n.module.empty()) os << " '" << n.module << "'";
    os << " (";
    for (std::size_t k = 0; k < n.inputs.size(); ++k) os << (k ? ", " : "") << "v" << n.inputs[k];
    os << ") -> v" << n.output << " [" << g.values()[n.output].channels() << "]\n";
  }
  for (const auto& b : g.barriers()) {
    os << "barrier " << b.op << " keeps the channels of";
    for (const auto& l : b.layers) os << " '" << l << "'";
    os << "\n";
  }
  return os;
}

// Builds a Graph node by node, applying the channel rules of the banner. Values are ids
// returned by each call.
class GraphBuilder {
 public:
  std::int64_t input(std::int64_t channels, std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = fresh_value(channels, std::move(shape), channel_dim);
    fix(v);
    graph_.input_ = add_node(make_node(OpKind::Input, "input", "", {}, v), v);
    return v;
  }

  // A layer (its rule's role is Producer) reading `in` (-1: it reads no channels, an
  // Embedding's indices) and making `out_channels` new channels.
  std::int64_t layer(const LayerRule* rule, std::string op, std::string module, std::int64_t in,
                     std::int64_t out_channels, std::int64_t groups = 1,
                     std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = fresh_value(out_channels, std::move(shape), channel_dim);
    if (groups > 1 && in >= 0) join_groups(graph_.values_[in].elements, graph_.values_[v].elements, groups);
    if (rule && rule->tied_widths && in >= 0) {  // output channel o is input channel o mod the input width
      const auto& ein = graph_.values_[in].elements;
      const auto& eout = graph_.values_[v].elements;
      for (std::size_t o = 0; o < eout.size() && !ein.empty(); ++o) join(eout[o], ein[o % ein.size()]);
    }
    GraphNode n = make_node(OpKind::Layer, std::move(op), module, {}, v);
    if (in >= 0) n.inputs.push_back(in);
    n.rule = rule;
    n.groups = groups;
    if (in >= 0) couple_shared_call(module, in, v);
    add_node(std::move(n), v);
    return v;
  }

  // A normalization module: the output has the input's channels; `groups` > 1 makes each
  // group's channels one unit (GroupNorm); `across_channels` marks them approximate (LayerNorm).
  std::int64_t norm(const LayerRule* rule, std::string op, std::string module, std::int64_t in,
                    std::int64_t groups = 1, bool across_channels = false,
                    std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = alias_value(in, std::move(shape), channel_dim);
    if (groups > 1) join_groups(graph_.values_[in].elements, graph_.values_[v].elements, groups);
    if (across_channels)
      for (auto e : graph_.values_[v].elements) approximate_.push_back(e);
    couple_shared_call(module, in, v);
    GraphNode n = make_node(OpKind::Norm, std::move(op), std::move(module), {in}, v);
    n.rule = rule;
    n.groups = groups;
    n.across_channels = across_channels;
    add_node(std::move(n), v);
    return v;
  }

  // A parameter of no layer, used as data with `channels` channels on its dimension `dim`.
  std::int64_t parameter(std::string module, std::string name, std::int64_t dim, std::int64_t channels,
                         std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = fresh_value(channels, std::move(shape), channel_dim);
    GraphNode n = make_node(OpKind::Parameter, "parameter", std::move(module), {}, v);
    n.parameter = std::move(name);
    n.parameter_dim = dim;
    add_node(std::move(n), v);
    return v;
  }

  std::int64_t per_channel(std::string op, std::int64_t in, bool zero_preserving,
                           std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = alias_value(in, std::move(shape), channel_dim);
    GraphNode n = make_node(OpKind::PerChannel, std::move(op), "", {in}, v);
    n.zero_preserving = zero_preserving;
    add_node(std::move(n), v);
    return v;
  }

  // add/sub (kind Add) or mul (kind Mul) of same-channel operands; `constant_operand` when an
  // operand is not traced. Operands broadcast over channels (one channel) are kept as they are.
  std::int64_t elementwise(OpKind kind, std::string op, std::vector<std::int64_t> operands,
                           bool constant_operand, std::vector<std::int64_t> shape = {},
                           std::int64_t channel_dim = 1) {
    std::int64_t channels = 0;
    for (auto o : operands) channels = std::max(channels, graph_.values_[o].channels());
    std::vector<std::int64_t> full;
    for (auto o : operands) {
      if (graph_.values_[o].channels() == channels) {
        full.push_back(o);
      } else {  // broadcast over channels: acts like a constant on the others
        fix(o);
        constant_operand = true;
      }
    }
    auto v = alias_value(full.front(), std::move(shape), channel_dim);
    for (std::size_t k = 1; k < full.size(); ++k)
      for (std::int64_t c = 0; c < channels; ++c)
        join(graph_.values_[full[0]].elements[c], graph_.values_[full[k]].elements[c]);
    GraphNode n = make_node(kind, std::move(op), "", operands, v);
    n.constant_operand = constant_operand;
    add_node(std::move(n), v);
    return v;
  }

  // Channels of `operands` side by side (cat along the channel dimension).
  std::int64_t concat(std::string op, const std::vector<std::int64_t>& operands,
                      std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = new_value(std::move(shape), channel_dim);
    for (auto o : operands) {
      const auto& e = graph_.values_[o].elements;
      graph_.values_[v].elements.insert(graph_.values_[v].elements.end(), e.begin(), e.end());
    }
    add_node(make_node(OpKind::Concat, std::move(op), "", operands, v), v);
    return v;
  }

  // The channels [offset, offset + channels) of `in`: one piece of a split.
  std::int64_t split(std::string op, std::int64_t in, std::int64_t offset, std::int64_t channels,
                     std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = new_value(std::move(shape), channel_dim);
    const auto& e = graph_.values_[in].elements;  // after new_value, which may move the values
    graph_.values_[v].elements.assign(e.begin() + offset, e.begin() + offset + channels);
    graph_.values_[v].outer = graph_.values_[in].outer;
    GraphNode n = make_node(OpKind::Split, std::move(op), "", {in}, v);
    n.offset = offset;
    add_node(std::move(n), v);
    return v;
  }

  // Each run of `in.channels() / heads` consecutive channels becomes one channel (one element
  // for the whole run), on dimension `channel_dim` of `shape` whose index is n·heads + h.
  std::int64_t heads(std::string op, std::int64_t in, std::int64_t heads, std::vector<std::int64_t> shape,
                     std::int64_t channel_dim, std::int64_t outer) {
    const auto e = graph_.values_[in].elements;  // a copy: new_value may move the values
    const auto per = static_cast<std::int64_t>(e.size()) / heads;
    auto v = new_value(std::move(shape), channel_dim);
    graph_.values_[v].outer = outer;
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t k = 1; k < per; ++k) join(e[h * per], e[h * per + k]);
      graph_.values_[v].elements.push_back(e[h * per]);
    }
    add_node(make_node(OpKind::Heads, std::move(op), "", {in}, v), v);
    return v;
  }

  // Each channel of `in` becomes `block` consecutive features.
  std::int64_t flatten(std::string op, std::int64_t in, std::int64_t block,
                       std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = new_value(std::move(shape), channel_dim);
    for (auto e : graph_.values_[in].elements)
      graph_.values_[v].elements.insert(graph_.values_[v].elements.end(), static_cast<std::size_t>(block), e);
    add_node(make_node(OpKind::Flatten, std::move(op), "", {in}, v), v);
    return v;
  }

  // An operation whose effect on channels is not known: everything around it is kept.
  std::int64_t barrier(std::string op, std::string module, const std::vector<std::int64_t>& operands,
                       std::int64_t out_channels, std::vector<std::int64_t> shape = {},
                       std::int64_t channel_dim = 1) {
    auto v = fresh_value(std::max<std::int64_t>(out_channels, 0), std::move(shape), channel_dim);
    for (auto o : operands) fix(o);
    fix(v);
    add_node(make_node(OpKind::Barrier, op, std::move(module), operands, v), v);
    pending_barriers_.push_back({std::move(op), operands, v});
    return v;
  }

  void output(std::int64_t v) {
    fix(v);
    graph_.output_ = v;
    pending_barriers_.push_back({"model output", {v}, -1});
  }

  void untraced(std::string layer) { graph_.untraced_.push_back(std::move(layer)); }

  // The same data read along another channel dimension, when every channel of `in` is kept
  // anyway (behind a barrier): fresh channels, kept too. Not a barrier of its own.
  std::int64_t reread(std::int64_t in, std::int64_t channels, std::vector<std::int64_t> shape, std::int64_t channel_dim) {
    auto v = fresh_value(channels, std::move(shape), channel_dim);
    fix(v);
    add_node(make_node(OpKind::Barrier, "reread", "", {in}, v), v);
    return v;
  }

  // Whether every channel of `v` is kept (an input, an output or a barrier holds it).
  bool kept(std::int64_t v) {
    std::set<std::int64_t> roots;
    for (auto e : fixed_) roots.insert(find(e));
    for (auto e : graph_.values_[v].elements)
      if (!roots.count(find(e))) return false;
    return true;
  }

  const GraphValue& value(std::int64_t v) const { return graph_.values_[v]; }
  const GraphNode& node(std::int64_t n) const { return graph_.nodes_[n]; }
  // The rule of an opaque layer's barrier node, for its cost.
  void set_rule(std::int64_t n, const LayerRule* rule) { graph_.nodes_[n].rule = rule; }
  // A value's channels share their dimension with a batch factor (see GraphValue::outer).
  void set_outer(std::int64_t v, std::int64_t outer) { graph_.values_[v].outer = outer; }

  // Resolve units and coupled groups; the builder is spent afterwards.
  Graph finish() &&;

 private:
  struct PendingBarrier {
    std::string op;
    std::vector<std::int64_t> inputs;
    std::int64_t output;
  };

  std::int64_t new_value(std::vector<std::int64_t> shape, std::int64_t channel_dim = 1) {
    graph_.values_.push_back({{}, std::move(shape), -1, channel_dim, 1});
    return static_cast<std::int64_t>(graph_.values_.size()) - 1;
  }
  std::int64_t fresh_value(std::int64_t channels, std::vector<std::int64_t> shape, std::int64_t channel_dim = 1) {
    auto v = new_value(std::move(shape), channel_dim);
    auto& e = graph_.values_[v].elements;
    e.resize(static_cast<std::size_t>(channels));
    for (auto& x : e) {
      x = static_cast<std::int64_t>(parent_.size());
      parent_.push_back(x);
    }
    return v;
  }
  std::int64_t alias_value(std::int64_t in, std::vector<std::int64_t> shape = {}, std::int64_t channel_dim = 1) {
    auto v = new_value(std::move(shape), channel_dim);
    graph_.values_[v].elements = graph_.values_[in].elements;
    graph_.values_[v].outer = graph_.values_[in].outer;
    return v;
  }
  std::int64_t add_node(GraphNode n, std::int64_t v) {
    graph_.nodes_.push_back(std::move(n));
    const auto id = static_cast<std::int64_t>(graph_.nodes_.size()) - 1;
    graph_.values_[v].producer = id;
    return id;
  }
  std::int64_t find(std::int64_t x) {
    while (parent_[x] != x) x = parent_[x] = parent_[parent_[x]];
    return x;
  }
  void join(std::int64_t a, std::int64_t b) {
    a = find(a), b = find(b);
    if (a != b) parent_[std::max(a, b)] = std::min(a, b);
  }
  // Each of `groups` consecutive blocks of `in` and of `out` becomes one element set.
  void join_groups(const std::vector<std::int64_t>& in, const std::vector<std::int64_t>& out, std::int64_t groups) {
    const auto in_per = static_cast<std::int64_t>(in.size()) / groups;
    const auto out_per = static_cast<std::int64_t>(out.size()) / groups;
    for (std::int64_t g = 0; g < groups; ++g) {
      const auto anchor = out[g * out_per];
      for (std::int64_t k = 0; k < out_per; ++k) join(anchor, out[g * out_per + k]);
      for (std::int64_t k = 0; k < in_per; ++k) join(anchor, in[g * in_per + k]);
    }
  }
  void fix(std::int64_t v) {
    for (auto e : graph_.values_[v].elements) fixed_.push_back(e);
  }
  // A module called a second time reads and writes the same channels as the first time.
  void couple_shared_call(const std::string& module, std::int64_t in, std::int64_t out) {
    if (module.empty()) return;
    auto [it, first] = first_call_.try_emplace(module, in, out);
    if (first) return;
    auto pair_up = [&](std::int64_t a, std::int64_t b) {
      const auto& ea = graph_.values_[a].elements;
      const auto& eb = graph_.values_[b].elements;
      for (std::size_t k = 0; k < std::min(ea.size(), eb.size()); ++k) join(ea[k], eb[k]);
    };
    pair_up(it->second.first, in);
    pair_up(it->second.second, out);
  }

  Graph graph_;
  std::vector<std::int64_t> parent_;
  std::vector<std::int64_t> fixed_;
  std::vector<std::int64_t> approximate_;
  std::vector<PendingBarrier> pending_barriers_;
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> first_call_;
};

inline Graph GraphBuilder::finish() && {
  Graph& g = graph_;
  // Units: one per element class, numbered in order of first appearance.
  const auto elements = static_cast<std::int64_t>(parent_.size());
  std::vector<std::int64_t> unit_of_root(static_cast<std::size_t>(elements), -1);
  g.unit_of_.assign(static_cast<std::size_t>(elements), -1);
  for (std::int64_t e = 0; e < elements; ++e) {
    auto r = find(e);
    if (unit_of_root[r] < 0) {
      unit_of_root[r] = static_cast<std::int64_t>(g.units_.size());
      g.units_.push_back({});
    }
    g.unit_of_[e] = unit_of_root[r];
  }
  for (auto e : fixed_) g.units_[g.unit_of_[e]].fixed = true;
  for (auto e : approximate_) g.units_[g.unit_of_[e]].approximate = true;

  // Coupled groups: units with the same producing layers.
  std::vector<std::set<std::string>> producers(g.units_.size());
  for (const auto& n : g.nodes_)
    if (n.kind == OpKind::Layer || n.kind == OpKind::Parameter)
      for (auto e : g.values_[n.output].elements)
        producers[g.unit_of_[e]].insert(n.kind == OpKind::Layer ? n.module : parameter_name(n));
  std::map<std::set<std::string>, std::int64_t> group_of;
  for (std::size_t u = 0; u < g.units_.size(); ++u) {
    auto [it, added] = group_of.try_emplace(producers[u], static_cast<std::int64_t>(g.groups_.size()));
    if (added) g.groups_.push_back({{producers[u].begin(), producers[u].end()}, {}});
    g.units_[u].group = it->second;
    g.groups_[it->second].units.push_back(static_cast<std::int64_t>(u));
  }

  // Name each barrier's protected layers: the producers of the units it holds.
  for (const auto& b : pending_barriers_) {
    std::set<std::string> layers;
    auto collect = [&](std::int64_t v) {
      if (v < 0) return;
      for (auto e : g.values_[v].elements)
        for (const auto& p : producers[g.unit_of_[e]]) layers.insert(p);
    };
    for (auto v : b.inputs) collect(v);
    collect(b.output);
    g.barriers_.push_back({b.op, {layers.begin(), layers.end()}});
  }
  return std::move(g);
}

}  // namespace fasterai
