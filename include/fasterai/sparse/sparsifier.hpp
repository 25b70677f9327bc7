#pragma once
// fasterai::Sparsifier<Granularity, Method, Criteria, Schedule>: the article's
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
// The sparsifier binds to the model's layers when it is created (selection, per-layer
// criteria state such as Movement's initial weights) and keeps one persistent mask per layer
// on the weight's device. Masks are recomputed only when the number of groups to remove
// changes; between recomputations a step costs one masked_fill_ per tensor.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/core/statistics.hpp>
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
  TORCH_ARG(bool, include_linear) = false;           // Conv2d only by default (the article)
  TORCH_ARG(std::vector<std::string>, include) = {}; // only these layers (state_dict names)
  TORCH_ARG(std::vector<std::string>, exclude) = {}; // never these layers
  TORCH_ARG(LayerTargets, layer_targets) = {};       // per-layer targets (Local method only)
  TORCH_ARG(std::uint64_t, seed) = 0;                // Random criteria
};

namespace detail {
// Whether a schedule keeps the masks in force instead of recomputing them (Constant).
template <class S>
bool keeps_masks(const S& s) {
  if constexpr (requires { s.keeps_masks; })
    return static_cast<bool>(s.keeps_masks);
  else
    return false;
}
}  // namespace detail

template <granularity_policy Granularity, method_policy Method, criteria_policy Criteria,
          schedule_policy Schedule = schedule::OneShot>
class Sparsifier final : public SparsifierInterface {
 public:
  using granularity_type = Granularity;
  using method_type = Method;
  using criteria_type = Criteria;
  using schedule_type = Schedule;

  template <sequential_like Model>
  explicit Sparsifier(const Model& model, SparsifierOptions options = {}, Schedule schedule = {})
      : options_(std::move(options)), schedule_(std::move(schedule)) {
    select_layers(layers(model));
    if (detail::keeps_masks(schedule_)) adopt_zero_groups();
  }

  void prune(double sparsity) override {
    detail::check_sparsity(where("prune"), sparsity);
    check_reachable("sparsity", sparsity);
    std::vector<double> per_layer(targets_.size(), sparsity);
    recompute(per_layer, /*force=*/true);
    current_ = sparsity;
    apply();
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
      recompute(per_layer, /*force=*/false);
      current_ = options_.start() + (options_.target() - options_.start()) * f;
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
    std::optional<Layer> batch_norm;  // the BatchNorm right after the layer, if any
    double target = 0;                // final sparsity of this layer
    torch::Tensor state;              // the criteria's per-layer state
    torch::Tensor pruned;             // bool, like the weight: true = pruned
    torch::Tensor channels;           // bool [out]: whole pruned channels (Filter)
    std::int64_t groups_pruned = -1;  // count in force; -1 = no mask yet
    // The masks as 1/0 multipliers in the weight's dtype, derived from the ones above: on CPU
    // a same-dtype multiply is ~50x faster than masked_fill_, and this runs every step.
    torch::Tensor keep, keep_channels;

    void set_masks(torch::Tensor pruned_weights, torch::Tensor pruned_channels, std::int64_t groups) {
      pruned = std::move(pruned_weights);
      channels = std::move(pruned_channels);
      keep = multiplier(pruned, keep);
      keep_channels = channels.defined() ? multiplier(channels, keep_channels) : torch::Tensor();
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
      if (channels.defined()) channels = channels.to(d), keep_channels = keep_channels.to(d);
    }
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
        if (is_prunable(l.kind)) s.append(s.empty() ? "" : ", ").append(l.name);
      return detail::concat("the name of a Conv2d or Linear layer (", s, ")");
    };
    auto find_prunable = [&](const std::string& name) {
      return std::find_if(all.begin(), all.end(),
                          [&](const Layer& l) { return l.name == name && is_prunable(l.kind); });
    };
    for (const auto& n : options_.include())
      detail::check_argument(find_prunable(n) != all.end(), ctor, "include", n, names_of());
    for (const auto& n : options_.exclude())
      detail::check_argument(find_prunable(n) != all.end(), ctor, "exclude", n, names_of());
    detail::check_sparsity(detail::concat(ctor, " (options.target)"), options_.target());
    detail::check_sparsity(detail::concat(ctor, " (options.start)"), options_.start());
    check_reachable("options.target", options_.target());
    detail::check_argument(!Method::global || options_.layer_targets().empty(), ctor,
                           "layer_targets", options_.layer_targets().size(),
                           "no per-layer targets with the Global method (one threshold for all)");

    auto contains = [](const std::vector<std::string>& v, const std::string& s) {
      return std::find(v.begin(), v.end(), s) != v.end();
    };
    std::vector<Target> selected;
    for (auto it = all.begin(); it != all.end(); ++it) {
      const Layer& l = *it;
      if (!is_prunable(l.kind)) continue;
      const bool wanted = options_.include().empty()
                              ? (l.kind == LayerKind::Conv2d || options_.include_linear())
                              : contains(options_.include(), l.name);
      if (!wanted || contains(options_.exclude(), l.name)) continue;
      Granularity::check(l.weight(), l.name);
      Target t;
      t.layer = l;
      t.target = options_.target();
      auto next = std::next(it);
      if (next != all.end() && (next->kind == LayerKind::BatchNorm2d || next->kind == LayerKind::BatchNorm1d))
        t.batch_norm = *next;
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

  // Masks from the groups that are already entirely zero (Constant schedule: keep what an
  // earlier round removed).
  void adopt_zero_groups() {
    torch::NoGradGuard no_grad;
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

  // Recompute masks for per-layer sparsities; all checks happen before any state changes.
  void recompute(const std::vector<double>& sparsity, bool force) {
    torch::NoGradGuard no_grad;
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
    if (!changed) return;

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
  }

  // f(tensor, keep) for every masked tensor: each selected weight with its mask and, for Filter
  // granularity, the channel tensors with the channel mask. Masks follow a model moved to
  // another device.
  template <class F>
  void for_each_masked(F&& f) {
    torch::NoGradGuard no_grad;
    for (auto& t : targets_) {
      if (!t.keep.defined()) continue;
      auto& w = t.layer.weight();
      if (t.keep.device() != w.device()) t.move_masks(w.device());
      f(w, t.keep);
      if (Granularity::whole_channel)
        for_each_channel_tensor(t, [&](torch::Tensor& x) { f(x, t.keep_channels); });
    }
  }

  // The per-channel tensors a removed filter takes with it: the layer's bias and the
  // following BatchNorm's gamma and beta.
  template <class F>
  static void for_each_channel_tensor(Target& t, F&& f) {
    if (auto& b = t.layer.bias(); b.defined()) f(b);
    if (!t.batch_norm) return;
    if (auto* bn = t.batch_norm->template as<torch::nn::BatchNorm2dImpl>()) {
      if (bn->weight.defined() && bn->weight.size(0) == t.channels.size(0)) f(bn->weight), f(bn->bias);
    } else if (auto* bn1 = t.batch_norm->template as<torch::nn::BatchNorm1dImpl>()) {
      if (bn1->weight.defined() && bn1->weight.size(0) == t.channels.size(0)) f(bn1->weight), f(bn1->bias);
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
  double current_ = 0.0;
};

// Friendly names for the common combinations.
// The article's structured run: whole filters, each layer on its own, by magnitude.
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
