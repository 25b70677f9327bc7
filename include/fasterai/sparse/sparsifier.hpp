#pragma once
// fasterai::Sparsifier<Granularity, Method, Criteria, Schedule>: the fasterai article's (2020)
// `Sparsifier(granularity, method, criteria)` and its schedules as one class template, usable
// from any LibTorch training loop.
//
//   auto model = fasterai::models::vgg16_bn(10);
//   fasterai::Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(model);
//   sparsifier.prune(40);                      // one-shot: 40% of the filters of each conv
//
//   fasterai::Sparsifier<granularity::Weight, method::Global, criteria::L1, schedule::Gradual>
//       gradual(model, SparsifierOptions(80).include_linear(true));
//   // in the training loop, after backward():
//   gradual.step(progress); gradual.mask_gradients(); optimizer.step(); gradual.apply();
//
// Any module works: layers are found through named_modules() with their qualified names.
// Filter granularity removes channels that other layers share — the output channels of every
// conv added into one residual stream, a depthwise conv's channels with the ones it reads — so it
// works on the model's channel-dependency graph (graph/graph.hpp): a Sequential's is known
// statically, any other module is traced once from an example input:
//
//   fasterai::Sparsifier<granularity::Filter, method::Local, criteria::L1> s(resnet, example, 30);
//
// A coupled group (the channels one residual stream or one plain conv makes) is scored unit by
// unit, a unit's score being the sum of its members' criteria (as DepGraph does), and pruned unit
// by unit: every conv/linear output channel and BatchNorm γ/β of the unit is zeroed together, so
// the masked model computes exactly what the Pruner's physically pruned model computes. Units
// the Pruner could not remove (held by the input, the output or a barrier, or followed by an
// operation that turns zeros into something else) are never selected. Local counts floor(n·s/100)
// per coupled group; Global selects over all groups by each unit's score divided by the mean
// score of its group (`normalize`, on by default for Filter), because raw sums grow with a
// layer's fan-in and would empty the small layers first; every group keeps at least one unit.
//
// The sparsifier binds to the model's layers when it is created (selection, per-layer
// criteria state such as Movement's initial weights) and keeps one persistent mask per layer
// on the weight's device. Masks are recomputed only when the number of groups to remove
// changes; between recomputations a step costs one multiply per tensor. After the Pruner has
// removed channels, build a new sparsifier: the masks have the old shapes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/layers/sparsity_report.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/granularity.hpp>
#include <fasterai/sparse/method.hpp>
#include <fasterai/sparse/schedule.hpp>
#include <fasterai/sparse/selection.hpp>
#include <fasterai/sparse/sparsifier_interface.hpp>

namespace fasterai {

using LayerTargets = std::map<std::string, double>;

struct SparsifierOptions {
  /* implicit */ SparsifierOptions(double target = 0.0) : target_(target) {}
  TORCH_ARG(double, target);                         // s_f, percent, where schedules lead
  TORCH_ARG(double, start) = 0.0;                    // s_i, percent, where schedules start
  TORCH_ARG(bool, include_linear) = false;           // Conv2d only by default (the fasterai article); with it
                                                     // Linears and MultiheadAttention's projection
  TORCH_ARG(std::vector<std::string>, include) = {}; // only these layers (state_dict names)
  TORCH_ARG(std::vector<std::string>, exclude) = {}; // never these layers
  TORCH_ARG(LayerTargets, layer_targets) = {};       // per-layer targets (Local method only)
  TORCH_ARG(std::uint64_t, seed) = 0;                // Random criteria
  // Global method with Filter granularity: compare units by score / mean score of their
  // coupled group, so that layers with a large fan-in do not keep all their channels.
  TORCH_ARG(bool, normalize) = true;
  // Filter granularity: prune fewer units where needed so that every coupled group keeps a
  // multiple of this many channels (or all of them): convolution kernels often run fastest at
  // widths that are multiples of 8 or 16.
  TORCH_ARG(std::int64_t, round_to) = 1;
  // Filter granularity: also select channels a LayerNorm normalises over (a transformer's
  // hidden size, ConvNeXt's stage widths), zeroing with them their norms' γ and β and the free
  // parameters added to or multiplied with them (class token, position embedding, layer
  // scale). Removing them is approximate: prune with PrunerOptions::approximate, fine-tune.
  TORCH_ARG(bool, approximate) = false;
};

// Whether the sparsifier can find its groups without running the model: any granularity on a
// Sequential, and every granularity but Filter (whose channels are coupled across layers) on
// any module. Otherwise pass an example input to trace the model with.
template <class Model, class Granularity>
concept structure_known_statically = sequential_like<Model> || !Granularity::whole_channel;

namespace detail {
// Whether a schedule keeps the masks in force instead of recomputing them (Constant).
template <class S>
bool keeps_masks(const S& s) {
  if constexpr (requires { s.keeps_masks; })
    return static_cast<bool>(s.keeps_masks);
  else
    return false;
}
// Whether a criterion scores channels by the γ of their norms (criteria::BNScale) rather than
// by the layer's weights: only the channel graph knows which norm reads which channel.
template <class C>
constexpr bool scores_norms() {
  if constexpr (requires { C::scores_norms; })
    return static_cast<bool>(C::scores_norms);
  else
    return false;
}
}  // namespace detail

template <granularity_policy Granularity, method_policy Method, criteria_policy Criteria,
          schedule_policy Schedule = schedule::OneShot>
class Sparsifier final : public SparsifierInterface {
  static_assert(!detail::scores_norms<Criteria>() || Granularity::whole_channel,
                "a criterion that scores channels by their norm's gamma (BNScale) needs granularity::Filter");

 public:
  using granularity_type = Granularity;
  using method_type = Method;
  using criteria_type = Criteria;
  using schedule_type = Schedule;

  // Layers of any module; for Filter granularity a Sequential only (its graph is static).
  template <module Model>
    requires structure_known_statically<Model, Granularity>
  explicit Sparsifier(const Model& model, SparsifierOptions options = {}, Schedule schedule = {})
      : options_(std::move(options)), schedule_(std::move(schedule)) {
    const LayerView all = layers(model);
    select_layers(all);
    if constexpr (Granularity::whole_channel) bind_channels(graph_of(model), detail::impl(model));
    if (detail::keeps_masks(schedule_)) adopt_zero_groups();
  }

  // Any module with a tensor forward, traced once on `example` (a batch of inputs) when the
  // granularity needs the channel coupling.
  template <traceable Model>
  Sparsifier(Model&& model, const torch::Tensor& example, SparsifierOptions options = {},
             Schedule schedule = {})
      : options_(std::move(options)), schedule_(std::move(schedule)) {
    const LayerView all = layers(model);
    select_layers(all);
    if constexpr (Granularity::whole_channel) bind_channels(trace(model, example), detail::impl(model));
    if (detail::keeps_masks(schedule_)) adopt_zero_groups();
  }

  void prune(double sparsity) override {
    detail::check_sparsity(where("prune"), sparsity);
    check_reachable("sparsity", sparsity);
    std::vector<double> per_layer(targets_.size(), sparsity);
    const bool applied = recompute(per_layer, /*force=*/true);
    current_ = sparsity;
    if (!applied) apply();
  }

  void step(double progress) override {
    detail::check_argument(progress >= 0.0 && progress <= 1.0, where("step"), "progress",
                           progress, "a fraction of training in [0, 1]");
    if (!detail::keeps_masks(schedule_)) {
      const double f = schedule_(progress);
      detail::check_argument(f >= 0.0 && f <= 1.0, where("step"), "schedule(progress)", f,
                             "a fraction in [0, 1]");
      std::vector<double> per_layer;
      per_layer.reserve(targets_.size());
      for (const auto& t : targets_) per_layer.push_back(options_.start() + (t.target - options_.start()) * f);
      const bool applied = recompute(per_layer, /*force=*/false);
      current_ = options_.start() + (options_.target() - options_.start()) * f;
      if (applied) return;
    }
    apply();
  }

  void apply() override {
    for_each_masked([](torch::Tensor& x, const torch::Tensor& keep) { x.mul_(keep); });
  }

  void mask_gradients() override {
    for_each_masked([](torch::Tensor& x, const torch::Tensor& keep) {
      if (x.grad().defined()) x.mutable_grad().mul_(keep);
    });
  }

  double sparsity() const override { return current_; }
  double target_sparsity() const override { return options_.target(); }
  const SparsifierOptions& options() const { return options_; }

  SparsityReport report() const override {
    SparsityReport r;
    for (const auto& t : targets_) r.layers.push_back(layer_sparsity(t.layer));
    return r;
  }

  std::string name() const override {
    std::string schedule = "custom schedule";
    if constexpr (requires { schedule_.name(); }) schedule = std::string(schedule_.name());
    return detail::concat(Granularity::name(), "/", Method::name(), "/", Criteria::name(), "/",
                          schedule);
  }

  // Names of the selected layers, in forward order.
  std::vector<std::string> layer_names() const {
    std::vector<std::string> names;
    for (const auto& t : targets_) names.push_back(t.layer.name);
    return names;
  }

  // The mask of a selected layer (true = pruned), shaped like its weight; undefined before
  // the first prune() or step().
  const torch::Tensor& mask(const std::string& layer) const { return find(layer).pruned; }

 private:
  struct Target {
    Layer layer;
    double target = 0;                // final sparsity of this layer
    torch::Tensor state;              // the criteria's per-layer state
    torch::Tensor pruned;             // bool, like the weight: true = pruned
    torch::Tensor channels;           // bool [out]: whole pruned channels (Filter)
    std::int64_t groups_pruned = -1;  // count in force; -1 = no mask yet
    // The mask as 1/0 multipliers in the weight's dtype, derived from the one above: on CPU
    // a same-dtype multiply is much cheaper than masked_fill_, and this runs every step.
    torch::Tensor keep;
    torch::Tensor units;              // Filter: long [out], the graph unit of each output channel

    void set_masks(torch::Tensor pruned_weights, torch::Tensor pruned_channels, std::int64_t groups) {
      pruned = std::move(pruned_weights);
      channels = std::move(pruned_channels);
      keep = multiplier(pruned, keep);
      groups_pruned = groups;
    }
    // 1 where kept, 0 where pruned, written into the previous buffer when it fits (a new
    // 500 MB tensor per recomputation would cost more than computing it).
    torch::Tensor multiplier(const torch::Tensor& mask, torch::Tensor buffer) const {
      const auto& w = layer.weight();
      if (!buffer.defined() || buffer.sizes() != mask.sizes() || buffer.device() != mask.device())
        buffer = torch::empty(mask.sizes(), w.options().requires_grad(false).device(mask.device()));
      return at::logical_not_out(buffer, mask);
    }
    void move_masks(const torch::Device& d) {
      pruned = pruned.to(d);
      keep = keep.to(d);
      if (channels.defined()) channels = channels.to(d);
    }
  };

  // Filter granularity: a coupled group of the graph that can be pruned, unit by unit.
  struct Producer {
    std::size_t target;       // the layer (index into targets_) making some of its channels
    torch::Tensor channels;   // long [k]: the layer's output channels in the group
    torch::Tensor positions;  // long [k]: their units' positions in the group
  };
  struct Coupled {
    torch::Tensor units;      // long [n]: graph unit ids
    std::vector<Producer> producers;
    std::int64_t pruned_count = -1;
  };
  // A per-channel tensor zeroed with its unit: a layer's bias, a BatchNorm's γ or β.
  struct ChannelTensor {
    torch::Tensor tensor;     // shares the module's tensor
    torch::Tensor units;      // long [C]: the graph unit of each channel
    torch::Tensor keep;       // 1/0 multipliers in the tensor's dtype, shaped to broadcast
    std::int64_t dim = 0;     // the tensor's channel dimension (a position embedding's last)
  };

  struct Computed {
    torch::Tensor pruned, channels;
    std::int64_t groups = 0;
  };

  static std::string where(const char* fn) { return detail::concat("fasterai::Sparsifier::", fn); }

  void select_layers(const LayerView& all) {
    const std::string ctor = where("Sparsifier");
    auto names_of = [&] {
      std::string s;
      for (const Layer& l : all)
        if (is_prunable(l)) s.append(s.empty() ? "" : ", ").append(l.name);
      return detail::concat("the name of a prunable layer (", s, ")");
    };
    auto find_prunable = [&](const std::string& name) {
      return std::find_if(all.begin(), all.end(),
                          [&](const Layer& l) { return l.name == name && is_prunable(l); });
    };
    for (const auto& n : options_.include())
      detail::check_argument(find_prunable(n) != all.end(), ctor, "include", n, names_of());
    for (const auto& n : options_.exclude())
      detail::check_argument(find_prunable(n) != all.end(), ctor, "exclude", n, names_of());
    detail::check_sparsity(detail::concat(ctor, " (options.target)"), options_.target());
    detail::check_sparsity(detail::concat(ctor, " (options.start)"), options_.start());
    check_reachable("options.target", options_.target());
    detail::check_argument(options_.round_to() >= 1, ctor, "round_to", options_.round_to(),
                           "a channel multiple >= 1 (1: no rounding)");
    detail::check_argument(!Method::global || options_.layer_targets().empty(), ctor,
                           "layer_targets", options_.layer_targets().size(),
                           "no per-layer targets with the Global method (one threshold for all)");

    auto contains = [](const std::vector<std::string>& v, const std::string& s) {
      return std::find(v.begin(), v.end(), s) != v.end();
    };
    std::vector<Target> selected;
    for (auto it = all.begin(); it != all.end(); ++it) {
      const Layer& l = *it;
      if (!is_prunable(l)) continue;
      // By default Conv2d; with include_linear also the layers whose weight is a matrix (Linear,
      // MultiheadAttention's projection); others (Conv1d, ...) when named in include.
      const bool wanted = options_.include().empty()
                              ? (l.kind == LayerKind::Conv2d || (options_.include_linear() && l.weight().dim() == 2))
                              : contains(options_.include(), l.name);
      if (!wanted || contains(options_.exclude(), l.name)) continue;
      Granularity::check(l.weight(), l.name);
      Target t;
      t.layer = l;
      t.target = options_.target();
      selected.push_back(std::move(t));
    }
    detail::check_argument(!selected.empty(), ctor, "model", "a model with no selected layer",
                           "at least one Conv2d (or, with include_linear, Linear) layer selected "
                           "after include/exclude");
    for (const auto& [name, s] : options_.layer_targets()) {
      auto it = std::find_if(selected.begin(), selected.end(), [&](const Target& t) { return t.layer.name == name; });
      detail::check_argument(it != selected.end(), ctor, "layer_targets", name, "the name of a selected layer");
      detail::check_sparsity(detail::concat(ctor, " (layer_targets[", name, "])"), s);
      check_reachable(detail::concat("layer_targets[", name, "]"), s);
      it->target = s;
    }
    for (size_t i = 0; i < selected.size(); ++i)
      selected[i].state = Criteria::init(selected[i].layer.weight().detach(), options_.seed() + i);
    targets_ = std::move(selected);
  }

  void check_reachable(const std::string& argument, double s) const {
    detail::check_argument(s <= Granularity::max_sparsity(), where("Sparsifier"), argument, s,
                           detail::concat("at most ", std::to_string(Granularity::max_sparsity()),
                                          "% for granularity ", Granularity::name()));
  }

  // Filter granularity: the coupled groups of the graph whose units the sparsifier may zero —
  // those the Pruner can remove once zeroed, all of whose producing layers are selected.
  void bind_channels(const Graph& g, const torch::nn::Module& model) {
    const auto n_units = static_cast<std::int64_t>(g.units().size());
    const std::int64_t none = n_units;  // a slot that is never pruned
    auto all_zero = [&](const GraphNode& n) {
      return std::vector<char>(static_cast<std::size_t>(g.values()[n.output].channels()), 1);
    };
    std::vector<char> candidate =
        detail::removable_units(g, detail::zero_channels(g, all_zero), options_.approximate());
    std::map<std::string, std::size_t> target_of;
    for (std::size_t i = 0; i < targets_.size(); ++i) target_of[targets_[i].layer.name] = i;
    std::set<std::string> free_parameters;  // zeroed with their channels, never scored
    for (const auto& n : g.nodes())
      if (n.kind == OpKind::Parameter) free_parameters.insert(parameter_name(n));
    for (const auto& group : g.groups()) {
      const bool selected =
          std::any_of(group.producers.begin(), group.producers.end(),
                      [&](const std::string& p) { return target_of.count(p) != 0; }) &&
          std::all_of(group.producers.begin(), group.producers.end(),
                      [&](const std::string& p) { return target_of.count(p) != 0 || free_parameters.count(p) != 0; });
      if (!selected)
        for (auto u : group.units) candidate[u] = 0;
    }
    // A layer named in `include` whose every unit could go only with approximate pruning (the
    // channels a LayerNorm normalises over): say so rather than select nothing of it.
    if (!options_.approximate() && !options_.include().empty()) {
      const std::vector<char> if_approximate = detail::removable_units(g, detail::zero_channels(g, all_zero), true);
      for (const auto& n : g.nodes()) {
        if (n.kind != OpKind::Layer || !target_of.count(n.module)) continue;
        const auto units = g.units_of(n.output);
        const bool none = std::none_of(units.begin(), units.end(), [&](auto u) { return candidate[u] != 0; });
        const bool approximate = std::any_of(units.begin(), units.end(), [&](auto u) { return if_approximate[u] != 0; });
        detail::check_argument(!(none && approximate), where("Sparsifier"), "include", n.module,
                               "a layer with channels removable exactly; its channels are normalised by a "
                               "LayerNorm (removing them is approximate): set SparsifierOptions::approximate(true)");
      }
    }
    // Candidate units by coupled group, with their positions.
    std::vector<std::int64_t> coupled_of(static_cast<std::size_t>(n_units), -1), position(static_cast<std::size_t>(n_units), -1);
    for (const auto& group : g.groups()) {
      std::vector<std::int64_t> units;
      for (auto u : group.units)
        if (candidate[u]) position[u] = static_cast<std::int64_t>(units.size()), units.push_back(u);
      if (units.empty()) continue;
      for (auto u : units) coupled_of[u] = static_cast<std::int64_t>(coupled_.size());
      Coupled c;
      c.units = torch::tensor(units, torch::kLong);
      coupled_.push_back(std::move(c));
    }
    auto unit_index = [&](const std::vector<std::int64_t>& units) {
      std::vector<std::int64_t> idx;
      for (auto u : units) idx.push_back(candidate[u] ? u : none);
      return torch::tensor(idx, torch::kLong);
    };
    for (auto& t : targets_) t.units = torch::full({t.layer.weight().size(0)}, none, torch::kLong);
    const detail::ModuleMap modules = detail::module_map(model);
    std::set<std::string> seen;
    for (const auto& n : g.nodes()) {
      if (n.kind == OpKind::Parameter) {
        if (!seen.insert(parameter_name(n)).second) continue;
        const auto idx = unit_index(g.units_of(n.output));
        if ((idx != none).any().template item<bool>())
          channel_tensors_.push_back({detail::graph_parameter(modules, n), idx, {}, n.parameter_dim});
        continue;
      }
      if (n.module.empty() || !seen.insert(n.module).second) continue;  // first call of a module
      const auto units = g.units_of(n.output);
      if (n.kind == OpKind::Norm) {
        // Its γ and β are zeroed with the unit, so that the norm emits zeros there.
        const auto idx = unit_index(units);
        if ((idx != none).any().template item<bool>())
          for (const auto& t : n.rule->tensors)
            if (t.decides_zero && t.out_dim == 0)
              if (auto x = detail::layer_tensor(*modules.at(n.module), t.name); x.defined() && x.dim() == 1)
                channel_tensors_.push_back({x, idx, {}, 0});
        if constexpr (detail::scores_norms<Criteria>())
          if (auto gamma = detail::layer_tensor(*modules.at(n.module), "weight"); gamma.defined() && gamma.dim() == 1)
            norm_scales_.push_back({gamma, idx, {}, 0});
        continue;
      }
      if (n.kind != OpKind::Layer) continue;
      const auto it = target_of.find(n.module);
      if (it == target_of.end()) continue;
      Target& t = targets_[it->second];
      t.units = unit_index(units);
      if (const auto& b = t.layer.bias(); b.defined()) channel_tensors_.push_back({b, t.units, {}, 0});
      std::map<std::int64_t, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> by_coupled;
      for (std::size_t o = 0; o < units.size(); ++o) {
        if (!candidate[units[o]]) continue;
        auto& [channels, positions] = by_coupled[coupled_of[units[o]]];
        channels.push_back(static_cast<std::int64_t>(o));
        positions.push_back(position[units[o]]);
      }
      for (auto& [c, cp] : by_coupled)
        coupled_[c].producers.push_back({it->second, torch::tensor(cp.first, torch::kLong),
                                         torch::tensor(cp.second, torch::kLong)});
    }
    unit_pruned_ = torch::zeros({n_units + 1}, torch::kBool);
    if constexpr (detail::scores_norms<Criteria>()) {
      // A unit no norm reads would score 0 and go first: refuse the layer instead.
      auto scored = torch::zeros({n_units + 1}, torch::kBool);
      for (const auto& ns : norm_scales_) scored.index_fill_(0, ns.units, true);
      for (const auto& t : targets_) {
        const auto missing = (t.units != none) & ~scored.index_select(0, t.units);
        detail::check_argument(!missing.any().template item<bool>(), where("Sparsifier"), "criteria",
                               Criteria::name(),
                               detail::concat("a criterion the layers' channels support: layer '", t.layer.name,
                                              "' has channels no BatchNorm (or other norm with a per-channel "
                                              "gamma) reads; exclude it or use another criterion"));
      }
    }
  }

  // Masks from the groups that are already entirely zero (Constant schedule: keep what an
  // earlier round removed).
  void adopt_zero_groups() {
    torch::NoGradGuard no_grad;
    if constexpr (Granularity::whole_channel) {
      // A unit is already removed when every producing channel of it is zero.
      std::vector<torch::Tensor> zero_units;
      std::int64_t pruned = 0, total = 0;
      for (const auto& c : coupled_) {
        auto nonzero = torch::zeros({c.units.numel()}, torch::kLong);
        for (const auto& p : c.producers) {
          const auto& w = targets_[p.target].layer.weight();
          const auto alive = (~detail::zero_slices(w, 0)).to(torch::kCPU);  // rows are outputs
          nonzero.index_add_(0, p.positions, alive.index_select(0, p.channels).to(torch::kLong));
        }
        zero_units.push_back(nonzero.eq(0));
        pruned += zero_units.back().sum().template item<std::int64_t>();
        total += c.units.numel();
      }
      commit_units(zero_units, std::vector<std::int64_t>(coupled_.size(), -1));
      current_ = total == 0 ? 0.0 : 100.0 * double(pruned) / double(total);
      return;
    }
    std::int64_t pruned = 0, total = 0;
    for (auto& t : targets_) {
      auto w = t.layer.weight().detach().to(torch::kFloat32).abs();
      auto zero_groups = Granularity::group_scores(w).eq(0);
      t.set_masks((Granularity::expand(zero_groups, w) & w.eq(0)).contiguous(),
                  Granularity::whole_channel ? zero_groups.reshape({-1}) : torch::Tensor(),
                  zero_groups.sum().template item<std::int64_t>());
      pruned += t.groups_pruned;
      total += zero_groups.numel();
    }
    current_ = total == 0 ? 0.0 : 100.0 * double(pruned) / double(total);
  }

  // Single weights by magnitude, float32 on the CPU: the selection reads the weights' own bits
  // (detail::select_lowest_magnitude: no score tensor, the finiteness check folded into its
  // first pass, masks, multipliers and zeroed weights written together in its last, so no
  // apply() follows). False when the weights do not qualify or no count changes: the general
  // path then runs.
  bool recompute_magnitudes(const std::vector<double>& sparsity, bool force) {
    std::vector<torch::Tensor> weights, keep;
    std::int64_t total = 0;
    for (const auto& t : targets_) {
      const auto& w = t.layer.weight();
      if (w.scalar_type() != torch::kFloat32 || !w.device().is_cpu() || !w.is_contiguous()) return false;
      weights.push_back(w.detach());
      total += w.numel();
    }
    std::vector<std::int64_t> counts;
    bool changed = force;
    for (size_t i = 0; i < targets_.size(); ++i) {
      counts.push_back(Method::global ? Granularity::groups_to_prune(total, sparsity.front())
                                      : Granularity::groups_to_prune(weights[i].numel(), sparsity[i]));
      changed |= counts[i] != targets_[i].groups_pruned;
    }
    if (!changed) return false;
    std::vector<torch::Tensor> masks;
    for (size_t i = 0; i < targets_.size(); ++i) {  // the previous multipliers are overwritten
      const auto& k = targets_[i].keep;
      const bool fits = k.defined() && k.device().is_cpu() && k.scalar_type() == torch::kFloat32 &&
                        k.is_contiguous() && k.sizes() == weights[i].sizes();
      keep.push_back(fits ? k : torch::empty_like(weights[i]));
      // The previous mask is rewritten only when no copy of it was handed out through mask().
      const auto& m = targets_[i].pruned;
      const bool sole = m.defined() && m.use_count() == 1 && m.storage().use_count() == 1;
      masks.push_back(sole ? m : torch::Tensor());
    }
    auto selection = detail::select_lowest_magnitude(
        weights, Method::global ? std::vector<std::int64_t>{counts.front()} : counts, keep,
        /*zero_weights=*/true, /*keep_one=*/Method::global, masks);
    if (selection.non_finite >= 0)
      detail::throw_argument_error(
          where("prune/step"),
          detail::concat("weights of layer '", targets_[static_cast<size_t>(selection.non_finite)].layer.name, "'"),
          "NaN or Inf", "finite values");
    masks.clear();  // our references to the old masks: t.pruned holds the only other one
    for (size_t i = 0; i < targets_.size(); ++i) {  // commit
      auto& t = targets_[i];
      torch::autograd::impl::bump_version(t.layer.weight());  // written through its data pointer
      t.pruned = std::move(selection.masks[i]);
      t.keep = std::move(keep[i]);
      t.channels = torch::Tensor();
      t.groups_pruned = counts[i];
    }
    return true;
  }

  // Recompute masks for per-layer sparsities; all checks happen before any state changes.
  // True when the masks are already applied to the weights.
  bool recompute(const std::vector<double>& sparsity, bool force) {
    torch::NoGradGuard no_grad;
    if constexpr (std::is_same_v<Granularity, granularity::Weight> && std::is_same_v<Criteria, criteria::L1>)
      if (recompute_magnitudes(sparsity, force)) return true;
    std::vector<torch::Tensor> scores, groups;
    std::int64_t all_groups = 0;
    for (auto& t : targets_) {
      const auto& w = t.layer.weight();
      // NaN propagates to the min and max, Inf shows in them: one vectorized pass, where
      // isfinite().all() costs several.
      const auto [lowest, highest] = torch::aminmax(w.detach());
      detail::check_argument(std::isfinite(lowest.template item<double>()) &&
                                 std::isfinite(highest.template item<double>()),
                             where("prune/step"),
                             detail::concat("weights of layer '", t.layer.name, "'"), "NaN or Inf",
                             "finite values");
      torch::Tensor grad;
      if constexpr (Criteria::needs_gradients) {
        detail::check_argument(w.grad().defined(), where("prune/step"),
                               detail::concat("gradient of layer '", t.layer.name, "'"), "undefined",
                               detail::concat("gradients from loss.backward() before sparsifying with ",
                                              Criteria::name()));
        grad = w.grad().detach().to(torch::kFloat32);
      }
      auto s = Criteria::score(w.detach().to(torch::kFloat32), grad, t.state);
      scores.push_back(s);
      groups.push_back(Granularity::group_scores(s));
      all_groups += groups.back().numel();
    }
    if constexpr (Granularity::whole_channel) {
      recompute_units(groups, sparsity, force);
      return false;
    }
    std::vector<std::int64_t> counts(targets_.size());
    if constexpr (Method::global) {
      const auto k = Granularity::groups_to_prune(all_groups, sparsity.front());
      std::fill(counts.begin(), counts.end(), k);  // one count for the whole selection
    } else {
      for (size_t i = 0; i < targets_.size(); ++i)
        counts[i] = Granularity::groups_to_prune(groups[i].numel(), sparsity[i]);
    }
    bool changed = force;
    for (size_t i = 0; i < targets_.size(); ++i) changed |= counts[i] != targets_[i].groups_pruned;
    if (!changed) return false;

    std::vector<torch::Tensor> selected;
    if constexpr (Method::global) {
      std::vector<torch::Tensor> flat;
      for (const auto& g : groups) flat.push_back(g.reshape({-1}));
      auto selection = detail::select_lowest(flat, counts.front());
      selected = std::move(selection.masks);
      // Every layer keeps at least one group (its most important), or the network is cut.
      for (size_t i = 0; i < selected.size(); ++i)
        if (selection.counts[i] == flat[i].numel())
          selected[i][flat[i].argmax().template item<std::int64_t>()] = false;
    } else {
      for (size_t i = 0; i < targets_.size(); ++i)
        selected.push_back(detail::select_lowest({groups[i].reshape({-1})}, counts[i]).masks.front());
    }
    std::vector<Computed> out;
    for (size_t i = 0; i < targets_.size(); ++i) {
      auto pruned_groups = selected[i].view(groups[i].sizes());
      Computed c{Granularity::expand(pruned_groups, scores[i]).contiguous(), {}, counts[i]};
      if (Granularity::whole_channel) c.channels = pruned_groups.reshape({-1});
      out.push_back(std::move(c));
    }
    for (size_t i = 0; i < targets_.size(); ++i)  // commit
      targets_[i].set_masks(std::move(out[i].pruned), std::move(out[i].channels), out[i].groups);
    return false;
  }

  // Units to prune out of n when `k` are wanted and the rest must be a multiple of round_to.
  std::int64_t rounded(std::int64_t n, std::int64_t k) const {
    const auto r = options_.round_to();
    if (r <= 1 || k == 0) return k;
    const auto kept = std::min(n, (n - k + r - 1) / r * r);
    return n - kept;
  }

  // Filter granularity: a unit's score is the sum of its producing channels' scores; Local
  // selects within each coupled group (at the smallest target of its layers), Global over all
  // of them (normalized by each group's mean score unless told otherwise).
  void recompute_units(const std::vector<torch::Tensor>& filter_scores, const std::vector<double>& sparsity,
                       bool force) {
    std::vector<torch::Tensor> unit_scores;
    std::vector<std::int64_t> counts(coupled_.size());
    std::int64_t total = 0;
    torch::Tensor norm_scores;  // BNScale: Σ |γ| over the norms reading each unit
    if constexpr (detail::scores_norms<Criteria>()) {
      norm_scores = torch::zeros({unit_pruned_.numel()}, torch::kFloat32);
      for (const auto& ns : norm_scales_)
        norm_scores.index_add_(0, ns.units, ns.tensor.detach().abs().to(torch::kCPU, torch::kFloat32));
    }
    for (std::size_t i = 0; i < coupled_.size(); ++i) {
      const auto& c = coupled_[i];
      auto u = torch::zeros({c.units.numel()}, torch::kFloat32);
      double s = 100.0;
      for (const auto& p : c.producers) {
        if constexpr (!detail::scores_norms<Criteria>())
          u.index_add_(0, p.positions, filter_scores[p.target].reshape({-1}).to(torch::kCPU).index_select(0, p.channels));
        s = std::min(s, sparsity[p.target]);
      }
      if constexpr (detail::scores_norms<Criteria>()) u = norm_scores.index_select(0, c.units);
      if constexpr (!Method::global) counts[i] = rounded(u.numel(), Granularity::groups_to_prune(u.numel(), s));
      total += u.numel();
      unit_scores.push_back(std::move(u));
    }
    if constexpr (Method::global)
      std::fill(counts.begin(), counts.end(), Granularity::groups_to_prune(total, sparsity.front()));
    bool changed = force;
    for (std::size_t i = 0; i < coupled_.size(); ++i) changed |= counts[i] != coupled_[i].pruned_count;
    if (!changed) return;

    std::vector<torch::Tensor> selected;
    if constexpr (Method::global) {
      if (options_.normalize())
        for (auto& u : unit_scores) {
          const double mean = u.mean().template item<double>();
          if (mean > 0) u.div_(mean);
        }
      auto selection = detail::select_lowest(unit_scores, counts.front());
      selected = std::move(selection.masks);
      for (std::size_t i = 0; i < selected.size(); ++i) {
        // Every group keeps its best unit, and a multiple of round_to: the best of the
        // selected units are given back.
        const auto n = unit_scores[i].numel();
        const auto give_back = selection.counts[i] - rounded(n, std::min(selection.counts[i], n - 1));
        if (give_back > 0) {
          const auto scores = unit_scores[i].masked_fill(~selected[i], -std::numeric_limits<float>::infinity());
          selected[i].index_put_({std::get<1>(scores.topk(give_back))}, false);
        }
      }
    } else {
      for (std::size_t i = 0; i < coupled_.size(); ++i)
        selected.push_back(detail::select_lowest({unit_scores[i]}, counts[i]).masks.front());
    }
    commit_units(selected, counts);
  }

  // Pruned units -> the masks of every selected weight and channel tensor; computed first, then
  // committed.
  void commit_units(const std::vector<torch::Tensor>& selected, const std::vector<std::int64_t>& counts) {
    torch::Tensor pruned = torch::zeros_like(unit_pruned_);
    for (std::size_t i = 0; i < coupled_.size(); ++i) pruned.index_put_({coupled_[i].units}, selected[i]);
    std::vector<Computed> out;
    for (const auto& t : targets_) {
      const auto& w = t.layer.weight();
      const torch::Tensor channels = pruned.index_select(0, t.units).to(w.device());
      std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
      shape[0] = w.size(0);
      out.push_back({Granularity::expand(channels.view(shape), w).contiguous(), channels,
                     channels.sum().template item<std::int64_t>()});
    }
    std::vector<torch::Tensor> keeps;
    for (const auto& ct : channel_tensors_) {
      std::vector<std::int64_t> shape(static_cast<std::size_t>(ct.tensor.dim()), 1);
      shape[static_cast<std::size_t>(ct.dim)] = ct.units.numel();
      keeps.push_back(torch::logical_not(pruned.index_select(0, ct.units))
                          .to(ct.tensor.options().requires_grad(false))
                          .view(shape));
    }
    unit_pruned_ = pruned;  // commit
    for (std::size_t i = 0; i < coupled_.size(); ++i) coupled_[i].pruned_count = counts[i];
    for (std::size_t i = 0; i < targets_.size(); ++i)
      targets_[i].set_masks(std::move(out[i].pruned), std::move(out[i].channels), out[i].groups);
    for (std::size_t i = 0; i < channel_tensors_.size(); ++i) channel_tensors_[i].keep = std::move(keeps[i]);
  }

  // f(tensor, keep) for every masked tensor: each selected weight with its mask and, for Filter
  // granularity, each channel tensor (bias, BatchNorm γ and β) with its channels' mask. Masks
  // follow a model moved to another device.
  template <class F>
  void for_each_masked(F&& f) {
    torch::NoGradGuard no_grad;
    for (auto& t : targets_) {
      if (!t.keep.defined()) continue;
      auto w = t.layer.weight();
      if (t.keep.device() != w.device()) t.move_masks(w.device());
      f(w, t.keep);
    }
    for (auto& ct : channel_tensors_) {
      if (!ct.keep.defined()) continue;
      if (ct.keep.device() != ct.tensor.device()) ct.keep = ct.keep.to(ct.tensor.device());
      f(ct.tensor, ct.keep);
    }
  }

  const Target& find(const std::string& layer) const {
    for (const auto& t : targets_)
      if (t.layer.name == layer) return t;
    detail::throw_argument_error(where("mask"), "layer", layer, "the name of a selected layer");
  }

  SparsifierOptions options_;
  Schedule schedule_;
  std::vector<Target> targets_;
  std::vector<Coupled> coupled_;              // Filter granularity only
  std::vector<ChannelTensor> channel_tensors_;  // Filter granularity only
  std::vector<ChannelTensor> norm_scales_;      // BNScale: each norm's γ and its channels' units
  torch::Tensor unit_pruned_;                 // bool [graph units + 1]: the last slot is never pruned
  double current_ = 0.0;
};

// Friendly names for the common combinations.
// The fasterai article's structured run: whole filters, each layer on its own, by magnitude.
template <schedule_policy S = schedule::OneShot>
using FilterSparsifier = Sparsifier<granularity::Filter, method::Local, criteria::L1, S>;
// Zhu & Gupta's gradual magnitude pruning: single weights, one global threshold.
template <schedule_policy S = schedule::Gradual>
using MagnitudeSparsifier = Sparsifier<granularity::Weight, method::Global, criteria::L1, S>;
// 2:4 semi-structured sparsity by magnitude (at 50% every block of 4 keeps 2).
template <schedule_policy S = schedule::OneShot>
using TwoFourSparsifier = Sparsifier<granularity::NM<2, 4>, method::Local, criteria::L1, S>;
// The baseline any criterion must beat.
template <granularity_policy G = granularity::Weight, schedule_policy S = schedule::OneShot>
using RandomSparsifier = Sparsifier<G, method::Local, criteria::Random, S>;

}  // namespace fasterai
