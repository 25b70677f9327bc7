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
#include <string>
#include <type_traits>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/layers/sparsity_report.hpp>
#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/granularity.hpp>
#include <fasterai/sparse/layer_selection.hpp>
#include <fasterai/sparse/masks.hpp>
#include <fasterai/sparse/method.hpp>
#include <fasterai/sparse/schedule.hpp>
#include <fasterai/sparse/selection.hpp>
#include <fasterai/sparse/sparsifier_interface.hpp>
#include <fasterai/sparse/sparsifier_options.hpp>
#include <fasterai/sparse/units.hpp>

namespace fasterai {

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
    select(layers(model));
    if constexpr (Granularity::whole_channel) bind_units(graph_of(model), detail::impl(model));
    if (detail::keeps_masks(schedule_)) adopt_zero_groups();
  }

  // Any module with a tensor forward, traced once on `example` (a batch of inputs) when the
  // granularity needs the channel coupling.
  template <traceable Model>
  Sparsifier(Model&& model, const torch::Tensor& example, SparsifierOptions options = {},
             Schedule schedule = {})
      : options_(std::move(options)), schedule_(std::move(schedule)) {
    select(layers(model));
    if constexpr (Granularity::whole_channel) bind_units(trace(model, example), detail::impl(model));
    if (detail::keeps_masks(schedule_)) adopt_zero_groups();
  }

  void prune(double sparsity) override {
    detail::check_sparsity(where("prune"), sparsity);
    detail::check_reachable<Granularity>(where("Sparsifier"), "sparsity", sparsity);
    update_masks(std::vector<double>(layers_.size(), sparsity), /*force=*/true);
    current_ = sparsity;
  }

  void step(double progress) override {
    detail::check_argument(progress >= 0.0 && progress <= 1.0, where("step"), "progress",
                           progress, "a fraction of training in [0, 1]");
    if (detail::keeps_masks(schedule_)) return apply();
    const double f = schedule_(progress);
    detail::check_argument(f >= 0.0 && f <= 1.0, where("step"), "schedule(progress)", f, "a fraction in [0, 1]");
    std::vector<double> per_layer;
    per_layer.reserve(layers_.size());
    for (const auto& l : layers_) per_layer.push_back(options_.start() + (l.target.sparsity - options_.start()) * f);
    update_masks(per_layer, /*force=*/false);
    current_ = options_.start() + (options_.target() - options_.start()) * f;
  }

  // Every mask in force: each selected weight and, for Filter granularity, each per-channel
  // tensor (bias, BatchNorm γ and β) with its channels' mask. Masks follow a model moved to
  // another device.
  void apply() override {
    for (auto& l : layers_) l.mask.apply(l.target.layer.weight());
    units_.for_each_channel_mask([](TensorMask& m, const torch::Tensor& x) { m.apply(x); });
  }

  void mask_gradients() override {
    for (auto& l : layers_) l.mask.mask_gradient(l.target.layer.weight());
    units_.for_each_channel_mask([](TensorMask& m, const torch::Tensor& x) { m.mask_gradient(x); });
  }

  double sparsity() const override { return current_; }
  double target_sparsity() const override { return options_.target(); }
  const SparsifierOptions& options() const { return options_; }

  SparsityReport report() const override {
    SparsityReport r;
    for (const auto& l : layers_) r.layers.push_back(layer_sparsity(l.target.layer));
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
    for (const auto& l : layers_) names.push_back(l.target.layer.name);
    return names;
  }

  // The mask of a selected layer (true = pruned), shaped like its weight, on the weight's
  // device; a copy, which later steps do not change. Undefined before the first prune() or step().
  torch::Tensor mask(const std::string& layer) const { return find(layer).mask.pruned(); }

 private:
  // A selected layer, its criteria's state (Movement's initial weights, Random's draws) and the
  // mask of its weight.
  struct Masked {
    LayerTarget target;
    torch::Tensor criteria_state;
    TensorMask mask;
    std::int64_t groups_pruned = -1;  // count in force; -1 = no mask yet
  };

  static std::string where(const char* fn) { return detail::concat("fasterai::Sparsifier::", fn); }

  void select(const LayerView& all) {
    auto selected = detail::select_layers<Granularity, Method>(all, options_, where("Sparsifier"));
    for (std::size_t i = 0; i < selected.size(); ++i) {
      Masked m;
      m.criteria_state = Criteria::init(selected[i].layer.weight().detach(), options_.seed() + i);
      m.target = std::move(selected[i]);
      layers_.push_back(std::move(m));
    }
  }

  // Filter granularity: the graph's units that the selected layers make.
  void bind_units(const Graph& g, const torch::nn::Module& model) {
    std::vector<Layer> selected;
    for (const auto& l : layers_) selected.push_back(l.target.layer);
    units_ = CoupledUnits(g, model, selected,
                          {options_.approximate(), !options_.include().empty(), detail::scores_norms<Criteria>(),
                           std::string(Criteria::name()), where("Sparsifier")});
  }

  // Masks from the groups that are already entirely zero (Constant schedule: keep what an
  // earlier round removed).
  void adopt_zero_groups() {
    torch::NoGradGuard no_grad;
    std::int64_t pruned = 0, total = 0;
    if constexpr (Granularity::whole_channel) {
      // A unit is already removed when every producing channel of it is zero.
      std::vector<torch::Tensor> weights;
      for (const auto& l : layers_) weights.push_back(l.target.layer.weight());
      const auto zero_units = units_.zero_units(weights);
      for (const auto& z : zero_units) pruned += z.sum().template item<std::int64_t>(), total += z.numel();
      commit_units(zero_units, std::vector<std::int64_t>(zero_units.size(), -1));
    } else {
      for (auto& l : layers_) {
        auto w = l.target.layer.weight().detach().to(torch::kFloat32).abs();
        auto zero_groups = Granularity::group_scores(w).eq(0);
        l.mask.set_pruned(Granularity::expand(zero_groups, w) & w.eq(0), l.target.layer.weight());
        l.groups_pruned = zero_groups.sum().template item<std::int64_t>();
        pruned += l.groups_pruned;
        total += zero_groups.numel();
      }
    }
    current_ = total == 0 ? 0.0 : 100.0 * double(pruned) / double(total);
  }

  // Brings the masks to `sparsity` (percent, per layer) when the number of groups to prune
  // changed (or `force`), and applies them. All checks happen before any state changes.
  void update_masks(const std::vector<double>& sparsity, bool force) {
    torch::NoGradGuard no_grad;
    if constexpr (std::is_same_v<Granularity, granularity::Weight> && std::is_same_v<Criteria, criteria::L1>) {
      switch (select_magnitudes(sparsity, force)) {
        case Magnitudes::selected: return;  // masks written with the weights zeroed
        case Magnitudes::unchanged: check_finite(); apply(); return;
        case Magnitudes::not_fused: break;
      }
    }
    recompute(sparsity, force);
    apply();
  }

  enum class Magnitudes { selected, unchanged, not_fused };

  // Single weights by magnitude, float32 on the CPU: the selection reads the weights' own bits
  // (no score tensor, the finiteness check folded into its first pass) and writes the
  // multipliers and the zeroed weights in its last, so no apply() follows. `unchanged` when no
  // count changes (nothing to score then), `not_fused` when the weights do not qualify: the
  // general path runs.
  Magnitudes select_magnitudes(const std::vector<double>& sparsity, bool force) {
    std::vector<torch::Tensor> weights, keep;
    std::int64_t total = 0;
    for (const auto& l : layers_) {
      const auto& w = l.target.layer.weight();
      if (w.scalar_type() != torch::kFloat32 || !w.device().is_cpu() || !w.is_contiguous()) return Magnitudes::not_fused;
      weights.push_back(w.detach());
      total += w.numel();
    }
    std::vector<std::int64_t> counts;
    bool changed = force;
    for (size_t i = 0; i < layers_.size(); ++i) {
      counts.push_back(Method::global ? Granularity::groups_to_prune(total, sparsity.front())
                                      : Granularity::groups_to_prune(weights[i].numel(), sparsity[i]));
      changed |= counts[i] != layers_[i].groups_pruned;
    }
    if (!changed) return Magnitudes::unchanged;
    for (size_t i = 0; i < layers_.size(); ++i) keep.push_back(layers_[i].mask.multiplier_buffer(weights[i]));
    const auto selection = detail::radix_select<detail::MagnitudeOrder>(
        weights, Method::global ? std::vector<std::int64_t>{counts.front()} : counts,
        {keep, /*zero_selected=*/true, /*keep_one=*/Method::global, {}, /*masks=*/false});
    if (selection.non_finite >= 0)
      detail::throw_argument_error(
          where("prune/step"),
          detail::concat("weights of layer '", layers_[static_cast<size_t>(selection.non_finite)].target.layer.name, "'"),
          "NaN or Inf", "finite values");
    for (size_t i = 0; i < layers_.size(); ++i) {  // commit
      torch::autograd::impl::bump_version(layers_[i].target.layer.weight());  // written through its data pointer
      layers_[i].mask.set_multiplier(std::move(keep[i]));
      layers_[i].groups_pruned = counts[i];
    }
    return Magnitudes::selected;
  }

  // Throws argument_error naming the first layer whose weights hold a NaN or an Inf.
  void check_finite() const {
    for (const auto& l : layers_) check_finite(l);
  }
  void check_finite(const Masked& l) const {
    // NaN propagates to the min and max, Inf shows in them: one vectorized pass, where
    // isfinite().all() costs several.
    const auto [lowest, highest] = torch::aminmax(l.target.layer.weight().detach());
    detail::check_argument(std::isfinite(lowest.template item<double>()) && std::isfinite(highest.template item<double>()),
                           where("prune/step"), detail::concat("weights of layer '", l.target.layer.name, "'"),
                           "NaN or Inf", "finite values");
  }

  // Each layer's criteria scores, shaped like its weight, after checking that the weights are
  // finite and, for the criteria that need them, that gradients exist.
  std::vector<torch::Tensor> scores() const {
    std::vector<torch::Tensor> out;
    for (const auto& l : layers_) {
      const auto& w = l.target.layer.weight();
      check_finite(l);
      torch::Tensor grad;
      if constexpr (Criteria::needs_gradients) {
        detail::check_argument(w.grad().defined(), where("prune/step"),
                               detail::concat("gradient of layer '", l.target.layer.name, "'"), "undefined",
                               detail::concat("gradients from loss.backward() before sparsifying with ",
                                              Criteria::name()));
        grad = w.grad().detach().to(torch::kFloat32);
      }
      out.push_back(Criteria::score(w.detach().to(torch::kFloat32), grad, l.criteria_state));
    }
    return out;
  }

  // Recomputes the masks for per-layer sparsities when a count changed (or `force`).
  void recompute(const std::vector<double>& sparsity, bool force) {
    const std::vector<torch::Tensor> score = scores();
    std::vector<torch::Tensor> groups;
    std::int64_t all_groups = 0;
    for (const auto& s : score) {
      groups.push_back(Granularity::group_scores(s));
      all_groups += groups.back().numel();
    }
    if constexpr (Granularity::whole_channel) {
      recompute_units(groups, sparsity, force);
      return;
    }
    std::vector<std::int64_t> counts(layers_.size());
    if constexpr (Method::global) {
      const auto k = Granularity::groups_to_prune(all_groups, sparsity.front());
      std::fill(counts.begin(), counts.end(), k);  // one count for the whole selection
    } else {
      for (size_t i = 0; i < layers_.size(); ++i) counts[i] = Granularity::groups_to_prune(groups[i].numel(), sparsity[i]);
    }
    bool changed = force;
    for (size_t i = 0; i < layers_.size(); ++i) changed |= counts[i] != layers_[i].groups_pruned;
    if (!changed) return;

    std::vector<torch::Tensor> selected;
    if constexpr (Method::global) {
      std::vector<torch::Tensor> flat;
      for (const auto& g : groups) flat.push_back(g.reshape({-1}));
      auto selection = detail::select_lowest(flat, counts.front());
      selected = std::move(selection.masks);
      // Every layer keeps at least one group (its most important), or the network is cut.
      for (size_t i = 0; i < selected.size(); ++i)
        if (selection.counts[i] == flat[i].numel()) selected[i][flat[i].argmax().template item<std::int64_t>()] = false;
    } else {
      for (size_t i = 0; i < layers_.size(); ++i)
        selected.push_back(detail::select_lowest({groups[i].reshape({-1})}, counts[i]).masks.front());
    }
    std::vector<torch::Tensor> pruned;
    for (size_t i = 0; i < layers_.size(); ++i)
      pruned.push_back(Granularity::expand(selected[i].view(groups[i].sizes()), score[i]));
    for (size_t i = 0; i < layers_.size(); ++i) {  // commit
      layers_[i].mask.set_pruned(pruned[i], layers_[i].target.layer.weight());
      layers_[i].groups_pruned = counts[i];
    }
  }

  // Units to prune out of n when `k` are wanted and the rest must be a multiple of round_to.
  std::int64_t rounded(std::int64_t n, std::int64_t k) const {
    const auto r = options_.round_to();
    if (r <= 1 || k == 0) return k;
    const auto kept = std::min(n, (n - k + r - 1) / r * r);
    return n - kept;
  }

  // Filter granularity: Local selects within each coupled group (at the smallest target of its
  // layers), Global over all of them (normalized by each group's mean score unless told
  // otherwise).
  void recompute_units(const std::vector<torch::Tensor>& filter_scores, const std::vector<double>& sparsity, bool force) {
    std::vector<torch::Tensor> unit_scores =
        detail::scores_norms<Criteria>() ? units_.norm_scale_scores() : units_.sum_of_producers(filter_scores);
    const auto& groups = units_.groups();
    std::vector<std::int64_t> counts(groups.size());
    std::int64_t total = 0;
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const auto n = unit_scores[i].numel();
      double s = 100.0;
      for (const auto& p : groups[i].producers) s = std::min(s, sparsity[p.layer]);
      if constexpr (!Method::global) counts[i] = rounded(n, Granularity::groups_to_prune(n, s));
      total += n;
    }
    if constexpr (Method::global)
      std::fill(counts.begin(), counts.end(), Granularity::groups_to_prune(total, sparsity.front()));
    bool changed = force;
    for (std::size_t i = 0; i < groups.size(); ++i) changed |= counts[i] != units_.count(i);
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
          const auto s = unit_scores[i].masked_fill(~selected[i], -std::numeric_limits<float>::infinity());
          selected[i].index_put_({std::get<1>(s.topk(give_back))}, false);
        }
      }
    } else {
      for (std::size_t i = 0; i < groups.size(); ++i)
        selected.push_back(detail::select_lowest({unit_scores[i]}, counts[i]).masks.front());
    }
    commit_units(selected, counts);
  }

  // Pruned units -> the masks of every selected weight and channel tensor; computed first, then
  // committed.
  void commit_units(const std::vector<torch::Tensor>& selected, std::vector<std::int64_t> counts) {
    const CoupledUnits::Pruning pruning = units_.pruning(selected);
    std::vector<torch::Tensor> pruned;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const auto& w = layers_[i].target.layer.weight();
      std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
      shape[0] = w.size(0);
      pruned.push_back(Granularity::expand(pruning.layer_channels[i].to(w.device()).view(shape), w));
    }
    units_.commit(pruning, std::move(counts));
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      layers_[i].mask.set_pruned(pruned[i], layers_[i].target.layer.weight());
      layers_[i].groups_pruned = pruning.layer_channels[i].sum().template item<std::int64_t>();
    }
  }

  const Masked& find(const std::string& layer) const {
    for (const auto& l : layers_)
      if (l.target.layer.name == layer) return l;
    detail::throw_argument_error(where("mask"), "layer", layer, "the name of a selected layer");
  }

  SparsifierOptions options_;
  Schedule schedule_;
  std::vector<Masked> layers_;
  CoupledUnits units_;  // Filter granularity only
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
