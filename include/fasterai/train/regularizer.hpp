#pragma once
// Sparsity-inducing regularization: a penalty added to the training loss that drives whole
// units of the network toward zero, so that a later Sparsifier/Pruner removes them at little
// cost in accuracy.
//
//   Penalty::L1          Σ |w|             over the weights of the selected layers: single
//                                          weights toward zero (for Weight granularity)
//   Penalty::GroupLasso  Σ_u ‖θ_u‖₂        over the removable units of the channel graph, θ_u
//                                          being everything the unit's removal zeroes: the
//                                          rows of every layer producing it (a filter; all
//                                          the convs writing one residual channel), their
//                                          biases, the γ and β of the norms reading it (Yuan &
//                                          Lin 2006; Wen et al. 2016, structured sparsity
//                                          learning). The norm is not squared, so a unit's
//                                          gradient does not vanish as it shrinks: units reach
//                                          zero, not just small values
//   Penalty::BNScale     Σ |γ|             over the per-channel γ of every norm layer
//                                          (BatchNorm, GroupNorm): network slimming (Liu et
//                                          al. 2017); prune after with criteria::BNScale
//
// As a Learner callback: the strength times the penalty is added to the loss of each training
// batch (after_loss), never to validation losses.
//
//   fasterai::Regularizer slim(model, fasterai::RegularizerOptions(1e-4).penalty(fasterai::Penalty::BNScale));
//   learn.fit_one_cycle(5, 1e-3, {slim});
//
// In a hand-written loop, the same penalty as a loss term (built once: it finds the layers and,
// for GroupLasso, the channel graph's units when it is created):
//
//   fasterai::SparsityPenalty group_lasso(model, fasterai::Penalty::GroupLasso);
//   auto loss = torch::nn::functional::cross_entropy(model->forward(x), y) + 1e-4 * group_lasso();
//
// A model that is not a Sequential is traced once on an example batch for GroupLasso (its units
// couple channels across layers); L1 and BNScale need no graph. Build a new penalty after the
// Pruner has changed the model's shapes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/graph/graph.hpp>
#include <fasterai/graph/removal.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/train/callback.hpp>

namespace fasterai {

enum class Penalty { L1, GroupLasso, BNScale };

constexpr std::string_view to_string(Penalty p) {
  switch (p) {
    case Penalty::L1: return "L1";
    case Penalty::GroupLasso: return "GroupLasso";
    case Penalty::BNScale: return "BNScale";
  }
  return "L1";
}

// Which layers a penalty covers.
struct PenaltyOptions {
  PenaltyOptions() = default;
  // L1 and GroupLasso: Conv2d only by default; with it also the layers whose weight is a matrix
  // (Linear), as SparsifierOptions::include_linear.
  TORCH_ARG(bool, include_linear) = false;
  // Layers left out (state_dict names): producing layers for L1 and GroupLasso (a unit some of
  // whose producers are left out is not penalised), norm layers for BNScale.
  TORCH_ARG(std::vector<std::string>, exclude) = {};
};

// The penalty of one model, unscaled; call it for a scalar tensor that backpropagates into the
// model's parameters.
class SparsityPenalty {
 public:
  // Any module for L1 and BNScale, a Sequential for GroupLasso (its graph is static).
  template <module Model>
  SparsityPenalty(const Model& model, Penalty penalty, PenaltyOptions options = {})
      : penalty_(penalty), options_(std::move(options)) {
    if (penalty_ == Penalty::GroupLasso) {
      if constexpr (sequential_like<Model>) {
        const LayerView all = layers(model);
        check_options(all);
        bind_units(all, graph_of(model));
      } else {
        detail::throw_argument_error(where, "model", "a module that is not a Sequential",
                                     "a Sequential for GroupLasso, or pass an example batch to trace the model with");
      }
    } else {
      const LayerView all = layers(model);
      check_options(all);
      bind_layers(all);
    }
  }

  // Any module with a tensor forward; traced once on `example` for GroupLasso.
  template <traceable Model>
  SparsityPenalty(Model&& model, const torch::Tensor& example, Penalty penalty, PenaltyOptions options = {})
      : penalty_(penalty), options_(std::move(options)) {
    const LayerView all = layers(model);
    check_options(all);
    if (penalty_ == Penalty::GroupLasso)
      bind_units(all, trace(model, example));
    else
      bind_layers(all);
  }

  torch::Tensor operator()() const {
    if (penalty_ == Penalty::GroupLasso) return group_lasso();
    torch::Tensor sum;
    for (const auto& t : tensors_) {
      const auto term = t.tensor.abs().sum();
      sum = sum.defined() ? sum + term.to(sum.device()) : term;
    }
    return sum;
  }

  Penalty penalty() const { return penalty_; }
  // The layers it covers (producing layers for L1 and GroupLasso, norms for BNScale).
  const std::vector<std::string>& layer_names() const { return names_; }
  // GroupLasso: the number of units penalised; otherwise 0.
  std::int64_t units() const { return units_; }

  // GroupLasso: the L2 norm of each penalised unit (detached, float32 on the CPU), in the order
  // of the graph's units: what falls as the regularized training goes on.
  torch::Tensor unit_norms() const {
    detail::check_argument(penalty_ == Penalty::GroupLasso, "fasterai::SparsityPenalty::unit_norms",
                           "penalty", to_string(penalty_), "GroupLasso");
    torch::NoGradGuard no_grad;
    return squared_unit_norms().to(torch::kCPU, torch::kFloat32).sqrt();
  }

 private:
  static constexpr std::string_view where = "fasterai::SparsityPenalty";

  struct UnitTensor {
    torch::Tensor tensor;       // shares the module's tensor
    torch::Tensor units;        // long [C]: the penalised unit of each channel, or the last slot
    std::int64_t dim = 0;       // the channel dimension
  };

  Penalty penalty_;
  PenaltyOptions options_;
  std::vector<std::string> names_;
  std::vector<UnitTensor> tensors_;  // L1/BNScale: whole tensors; GroupLasso: by unit
  torch::Tensor penalised_;          // GroupLasso: long [units]: slots of the penalised units
  std::int64_t slots_ = 0;           // GroupLasso: graph units + 1 (the last never penalised)
  std::int64_t units_ = 0;

  void check_options(const LayerView& all) const {
    std::string names;
    for (const Layer& l : all) names.append(names.empty() ? "" : ", ").append(l.name);
    for (const auto& n : options_.exclude()) {
      const bool found = std::any_of(all.begin(), all.end(), [&](const Layer& l) { return l.name == n; });
      detail::check_argument(found, where, "exclude", n, detail::concat("the name of a layer of the model (", names, ")"));
    }
  }

  bool excluded(const std::string& name) const {
    return std::find(options_.exclude().begin(), options_.exclude().end(), name) != options_.exclude().end();
  }

  // The producing layers L1 and GroupLasso cover (the Sparsifier's default choice).
  bool selected_producer(const Layer& l) const {
    if (!is_prunable(l) || excluded(l.name)) return false;
    return l.kind == LayerKind::Conv2d || (options_.include_linear() && l.weight().dim() == 2);
  }

  static bool is_norm(const Layer& l) { return l.rule != nullptr && l.rule->role == LayerRole::Norm; }

  void bind_layers(const LayerView& all) {
    for (const Layer& l : all) {
      if (penalty_ == Penalty::L1 && selected_producer(l)) {
        tensors_.push_back({l.weight(), {}, 0});
        names_.push_back(l.name);
      }
      if (penalty_ == Penalty::BNScale && is_norm(l) && !excluded(l.name)) {
        const auto gamma = detail::layer_tensor(*l.handle, "weight");
        if (!gamma.defined()) continue;  // affine=false: nothing to slim
        tensors_.push_back({gamma, {}, 0});
        names_.push_back(l.name);
      }
    }
    detail::check_argument(!tensors_.empty(), where, "model", "a model with nothing to penalise",
                           penalty_ == Penalty::L1
                               ? "at least one Conv2d (or, with include_linear, Linear) layer not excluded"
                               : "at least one norm layer with a per-channel gamma (affine) not excluded");
  }

  // GroupLasso: the units the Pruner could remove once zero (as the Sparsifier selects them),
  // whose every producing layer is covered, with each tensor that a unit's removal zeroes.
  void bind_units(const LayerView& all, const Graph& g) {
    std::map<std::string, const Layer*> producers, norms;
    for (const Layer& l : all) {
      if (selected_producer(l)) producers[l.name] = &l;
      if (is_norm(l)) norms[l.name] = &l;
    }
    const auto n_units = static_cast<std::int64_t>(g.units().size());
    const std::int64_t none = n_units;
    auto all_zero = [&](const GraphNode& n) {
      return std::vector<char>(static_cast<std::size_t>(g.values()[n.output].channels()), 1);
    };
    std::vector<char> candidate = detail::removable_units(g, detail::zero_channels(g, all_zero));
    std::set<std::string> free_parameters;
    for (const auto& n : g.nodes())
      if (n.kind == OpKind::Parameter) free_parameters.insert(parameter_name(n));
    for (const auto& group : g.groups()) {
      const bool covered =
          std::any_of(group.producers.begin(), group.producers.end(), [&](const std::string& p) { return producers.count(p) != 0; }) &&
          std::all_of(group.producers.begin(), group.producers.end(),
                      [&](const std::string& p) { return producers.count(p) != 0 || free_parameters.count(p) != 0; });
      if (!covered)
        for (auto u : group.units) candidate[u] = 0;
    }
    auto unit_index = [&](const std::vector<std::int64_t>& units) {
      std::vector<std::int64_t> idx;
      for (auto u : units) idx.push_back(candidate[u] ? u : none);
      return torch::tensor(idx, torch::kLong);
    };
    std::set<std::string> seen;
    for (const auto& n : g.nodes()) {
      if (n.module.empty() || !seen.insert(n.module).second) continue;  // first call of a module
      const bool producer = n.kind == OpKind::Layer && producers.count(n.module);
      const bool norm = n.kind == OpKind::Norm && norms.count(n.module);
      if (!producer && !norm) continue;
      const auto idx = unit_index(g.units_of(n.output));
      if (!(idx != none).any().item<bool>()) continue;
      if (producer) {
        const Layer& l = *producers.at(n.module);
        tensors_.push_back({l.weight(), idx, 0});
        if (const auto b = l.bias(); b.defined()) tensors_.push_back({b, idx, 0});
        names_.push_back(l.name);
      } else {
        for (const char* name : {"weight", "bias"})
          if (const auto x = detail::layer_tensor(*norms.at(n.module)->handle, name); x.defined() && x.dim() == 1)
            tensors_.push_back({x, idx, 0});
      }
    }
    std::vector<std::int64_t> penalised;
    for (std::int64_t u = 0; u < n_units; ++u)
      if (candidate[static_cast<std::size_t>(u)]) penalised.push_back(u);
    detail::check_argument(!penalised.empty(), where, "model", "a model with no removable unit",
                           "a model with at least one Conv2d (or, with include_linear, Linear) whose output "
                           "channels the Pruner can remove");
    penalised_ = torch::tensor(penalised, torch::kLong);
    slots_ = n_units + 1;
    units_ = static_cast<std::int64_t>(penalised.size());
  }

  // Σ over each unit's tensors of their squared entries, one value per penalised unit.
  torch::Tensor squared_unit_norms() const {
    const auto& first = tensors_.front().tensor;
    auto squares = torch::zeros({slots_}, first.options().requires_grad(false));
    for (const auto& t : tensors_) {
      const auto& x = t.tensor;
      auto per_channel = x.square();
      if (x.dim() > 1) per_channel = per_channel.movedim(t.dim, 0).reshape({x.size(t.dim), -1}).sum(1);
      squares = squares.index_add(0, t.units.to(x.device()), per_channel.to(squares.device()));
    }
    return squares.index_select(0, penalised_.to(squares.device()));
  }

  // √ of each unit's sum, with gradient 0 (a subgradient) at a unit that is already zero,
  // where √'s derivative is infinite.
  torch::Tensor group_lasso() const {
    const auto squares = squared_unit_norms();
    const auto alive = squares > 0;
    return torch::where(alive, torch::where(alive, squares, torch::ones_like(squares)).sqrt(),
                        torch::zeros_like(squares))
        .sum();
  }
};

struct RegularizerOptions {
  /* implicit */ RegularizerOptions(double strength) : strength_(strength) {}
  TORCH_ARG(double, strength);                           // λ: the loss becomes loss + λ·penalty
  TORCH_ARG(Penalty, penalty) = Penalty::GroupLasso;
  TORCH_ARG(PenaltyOptions, layers) = {};
};

// Adds strength · penalty to the loss of every training batch.
class Regularizer : public Callback {
 public:
  template <module Model>
  Regularizer(const Model& model, RegularizerOptions options)
      : options_(checked(std::move(options))), penalty_(model, options_.penalty(), options_.layers()) {}

  template <traceable Model>
  Regularizer(Model&& model, const torch::Tensor& example, RegularizerOptions options)
      : options_(checked(std::move(options))),
        penalty_(std::forward<Model>(model), example, options_.penalty(), options_.layers()) {}

  std::string name() const override { return "Regularizer"; }
  const RegularizerOptions& options() const noexcept { return options_; }
  const SparsityPenalty& penalty() const noexcept { return penalty_; }

  void after_loss(TrainingState& s) override {
    if (!s.training || options_.strength() == 0.0) return;
    s.loss = s.loss + options_.strength() * penalty_().to(s.loss.device());
  }

 private:
  RegularizerOptions options_;
  SparsityPenalty penalty_;

  static RegularizerOptions checked(RegularizerOptions o) {
    detail::check_argument(o.strength() >= 0.0 && std::isfinite(o.strength()), "fasterai::Regularizer",
                           "strength", o.strength(), "a finite weight >= 0 of the penalty in the loss");
    return o;
  }
};

}  // namespace fasterai
