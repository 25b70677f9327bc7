#pragma once
// Sensitivity analysis: how much a trained model loses when one layer alone is pruned — the
// table users read before choosing per-layer sparsities (Han et al. 2015, "Learning both weights
// and connections"; Li et al. 2017, "Pruning filters for efficient ConvNets", figure 2).
//
//   auto table = fasterai::sensitivity<granularity::Filter, criteria::L1>(model, valid);
//   std::cout << table;                        // the metric's drop per layer and sparsity
//   table.write_csv("sensitivity.csv");
//   auto targets = fasterai::layer_targets_for_budget(table, /*parameters=*/200'000);
//   // or: ... = fasterai::layer_targets_for_budget(table, table.macs / 2, fasterai::Budget::Macs);
//   fasterai::Sparsifier<granularity::Filter, method::Local, criteria::L1> s(
//       model, fasterai::SparsifierOptions(0).layer_targets(targets));
//   s.step(1.0);                               // each layer at its own target
//
// For each unit — a selected layer, or with Filter granularity a coupled group of the channel
// graph (the layers whose output channels one residual stream holds are pruned together) — and
// each sparsity, a `Sparsifier<Granularity, method::Local, Criteria>` restricted to the unit
// prunes it one-shot, the metric is measured on the validation batches, and every parameter and
// buffer is copied back bit for bit before the next trial. The model is evaluated in eval mode
// without gradients; the modes of its modules are restored at the end, and on an exception the
// model is restored before it propagates. Units nothing can be removed from (a group held by the
// model's output, an input or a barrier) are left out of the table.
//
// "Removed" counts the parameters a trial turns to zero (weights; with Filter granularity also
// biases and BatchNorm γ and β; one already zero is not counted). The Pruner removes more — the
// next layers' input channels too — so a budget of removed parameters met here is met at least
// as well after physical pruning. "MACs removed" is what the Pruner would take off the MACs of
// one example after the trial (graph/macs.hpp, PrunedMacs: exact for Conv and Linear layers):
// zeros alone save no MAC, whole removed channels do, including the next layers' inputs.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/graph/sequential_graph.hpp>
#include <fasterai/graph/trace.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/granularity.hpp>
#include <fasterai/sparse/sparsifier.hpp>

namespace fasterai {

// The mean of a per-example quantity over a batch (prediction and targets in, a scalar out);
// the analysis averages it over the validation examples, weighted by batch size.
using SensitivityMetric = std::function<torch::Tensor(const torch::Tensor& pred, const torch::Tensor& target)>;

struct SensitivityOptions {
  SensitivityOptions() = default;
  // Percentages in (0, 100) at which each unit is pruned alone.
  TORCH_ARG(std::vector<double>, sparsities) = {10, 20, 30, 40, 50, 60, 70, 80, 90};
  // Top-1 accuracy by default.
  TORCH_ARG(SensitivityMetric, metric) = [](const torch::Tensor& pred, const torch::Tensor& target) {
    return pred.argmax(1).eq(target).to(torch::kFloat64).mean();
  };
  TORCH_ARG(std::string, metric_name) = "accuracy";
  // false for a loss-like metric: the drop is then metric − baseline.
  TORCH_ARG(bool, higher_is_better) = true;
  // Which layers are analysed, as in SparsifierOptions.
  TORCH_ARG(bool, include_linear) = false;
  TORCH_ARG(std::vector<std::string>, include) = {};
  TORCH_ARG(std::vector<std::string>, exclude) = {};
};

struct SensitivityRow {
  std::vector<std::string> layers;  // the layer, or the layers of a coupled group
  double sparsity = 0;              // percent of the unit's groups asked for
  std::int64_t removed = 0;         // parameters turned to zero
  double metric = 0;                // the metric with this unit pruned
  double drop = 0;                  // how much worse than the baseline (> 0: worse)
  std::int64_t macs_removed = 0;    // MACs of one example the Pruner would remove after it
  // The units of `SensitivityTable::pruned_macs`'s graph that the Pruner would remove after it.
  std::vector<std::int64_t> units_removed;
};

// What a budget counts: parameters turned to zero, or MACs of one example removed by the Pruner.
enum class Budget { Parameters, Macs };

struct SensitivityTable {
  std::string configuration;        // e.g. "Filter/L1"
  std::string metric_name;
  double baseline = 0;              // the metric of the unpruned model
  std::int64_t parameters = 0;      // of the whole model
  std::int64_t macs = 0;            // of one example through the whole model
  // The model's MACs as traced on one example: combines rows' removed units exactly. Null in a
  // table made by hand (rows' macs_removed then add up).
  std::shared_ptr<const PrunedMacs> pruned_macs;
  std::vector<SensitivityRow> rows; // unit by unit, each at the sparsities in the order given

  // The rows of each unit, in table order.
  std::vector<std::vector<const SensitivityRow*>> units() const {
    std::vector<std::vector<const SensitivityRow*>> out;
    for (const auto& r : rows) {
      if (out.empty() || out.back().front()->layers != r.layers) out.emplace_back();
      out.back().push_back(&r);
    }
    return out;
  }

  // One line per row: layers (joined by '+'), sparsity, removed, metric, drop, macs_removed.
  void write_csv(const std::string& path) const;
};

namespace detail {

inline std::string join_layers(const std::vector<std::string>& layers) {
  std::string s;
  for (const auto& l : layers) s.append(s.empty() ? "" : "+").append(l);
  return s;
}

// Every parameter and buffer of a module with a copy of its values, and the mode of every
// submodule: what the analysis restores.
class ModelSnapshot {
 public:
  explicit ModelSnapshot(torch::nn::Module& model) {
    torch::NoGradGuard no_grad;
    for (const auto& p : model.parameters()) tensors_.emplace_back(p, p.detach().clone());
    for (const auto& b : model.buffers()) tensors_.emplace_back(b, b.detach().clone());
    for (const auto& m : model.modules(/*include_self=*/true)) modes_.emplace_back(m, m->is_training());
  }
  void restore_values() {
    torch::NoGradGuard no_grad;
    for (auto& [live, saved] : tensors_) live.copy_(saved);
  }
  void restore_modes() {
    for (auto& [m, training] : modes_) m->train(training);
  }
  // Parameters and buffers non-zero in the snapshot and zero now.
  std::int64_t zeroed() const {
    torch::NoGradGuard no_grad;
    std::int64_t n = 0;
    for (const auto& [live, saved] : tensors_)
      n += (saved.ne(0) & live.eq(0)).sum().template item<std::int64_t>();
    return n;
  }

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> tensors_;
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> modes_;
};

template <class Impl>
double evaluate_metric(Impl& model, const data::Batches& valid, const SensitivityMetric& metric,
                       const char* where) {
  torch::NoGradGuard no_grad;
  torch::Device device = torch::kCPU;
  for (const auto& p : model.parameters()) {
    device = p.device();
    break;
  }
  double sum = 0;
  std::int64_t examples = 0;
  valid.for_each([&](const torch::data::Example<>& batch) {
    const auto x = batch.data.to(device);
    const auto value = metric(model.forward(x), batch.target.to(device));
    check_argument(value.defined() && value.numel() == 1, where, "metric",
                   value.defined() ? value.sizes() : c10::IntArrayRef{}, "a function returning a scalar tensor");
    const auto n = x.size(0);
    sum += value.template item<double>() * double(n);
    examples += n;
  });
  check_argument(examples > 0, where, "data", "batches holding no example", "validation batches with examples");
  return sum / double(examples);
}

}  // namespace detail

// The sensitivity of `model` to pruning each unit alone at each of options.sparsities, with
// Criteria choosing what goes, measured on `valid`. The model is traced on one example of the
// first validation batch (for its MACs, and for its channel graph when it is not a Sequential).
template <granularity_policy Granularity, criteria_policy Criteria = criteria::L1, traceable Model>
SensitivityTable sensitivity(Model& model, const data::Batches& valid, SensitivityOptions options = {}) {
  constexpr auto where = "fasterai::sensitivity";
  using Local = Sparsifier<Granularity, method::Local, Criteria>;
  // Every argument is checked before the model is touched.
  detail::check_argument(!options.sparsities().empty(), where, "sparsities", "an empty list",
                         "at least one percentage in (0, 100)");
  for (double s : options.sparsities())
    detail::check_argument(s > 0 && s < 100 && s <= Granularity::max_sparsity(), where, "sparsities", s,
                           detail::concat("percentages in (0, 100), at most ",
                                          std::to_string(Granularity::max_sparsity()), " for granularity ",
                                          std::string(Granularity::name())));
  detail::check_argument(!valid.empty(), where, "data", "no batches", "validation batches (at least one)");
  detail::check_argument(static_cast<bool>(options.metric()), where, "metric", "an empty function",
                         "a function (pred, target) -> scalar tensor");

  auto& impl = detail::impl(model);
  // The input to trace the model on: the first validation batch.
  torch::Tensor example;
  valid.for_each([&](const torch::data::Example<>& b) {
    if (!example.defined()) example = b.data;
  });
  detail::check_argument(example.defined() && example.dim() > 0 && example.size(0) > 0, where, "data",
                         "a first batch holding no example", "validation batches with examples");
  for (const auto& p : impl.parameters()) {
    example = example.to(p.device());
    break;
  }

  auto make_options = [&](std::vector<std::string> include) {
    return SparsifierOptions(0).include_linear(options.include_linear()).include(std::move(include)).exclude(options.exclude());
  };
  auto sparsifier_for = [&](std::vector<std::string> include) {
    if constexpr (structure_known_statically<Model, Granularity>)
      return Local(model, make_options(std::move(include)));
    else
      return Local(model, example, make_options(std::move(include)));
  };

  // The units: the selected layers, or the selected producers of each coupled group.
  const std::vector<std::string> selected = sparsifier_for(options.include()).layer_names();
  std::vector<std::vector<std::string>> units;
  if constexpr (Granularity::whole_channel) {
    Graph graph = [&] {
      if constexpr (sequential_like<Model>)
        return graph_of(model);
      else
        return trace(model, example);
    }();
    for (const auto& group : graph.groups()) {
      std::vector<std::string> unit;
      for (const auto& p : group.producers)
        if (std::find(selected.begin(), selected.end(), p) != selected.end()) unit.push_back(p);
      if (!unit.empty() && std::find(units.begin(), units.end(), unit) == units.end()) units.push_back(unit);
    }
  } else {
    for (const auto& l : selected) units.push_back({l});
  }

  SensitivityTable table;
  table.configuration = detail::concat(Granularity::name(), "/", Criteria::name());
  table.metric_name = options.metric_name();
  for (const auto& p : impl.parameters()) table.parameters += p.numel();
  const auto pruned_macs = std::make_shared<const PrunedMacs>(model, example.narrow(0, 0, 1));
  table.pruned_macs = pruned_macs;
  table.macs = pruned_macs->total();

  detail::ModelSnapshot snapshot(impl);
  try {
    impl.eval();
    table.baseline = detail::evaluate_metric(impl, valid, options.metric(), where);
    for (const auto& unit : units) {
      Local sparsifier = sparsifier_for(unit);
      std::vector<SensitivityRow> rows;
      std::int64_t removed = 0;
      for (double s : options.sparsities()) {
        sparsifier.prune(s);
        SensitivityRow row{unit, s, snapshot.zeroed(), 0, 0, 0, {}};
        const auto removed_units = pruned_macs->removed_now();
        row.macs_removed = table.macs - pruned_macs->after(removed_units);
        for (std::size_t u = 0; u < removed_units.size(); ++u)
          if (removed_units[u]) row.units_removed.push_back(static_cast<std::int64_t>(u));
        row.metric = detail::evaluate_metric(impl, valid, options.metric(), where);
        row.drop = options.higher_is_better() ? table.baseline - row.metric : row.metric - table.baseline;
        snapshot.restore_values();
        removed = std::max(removed, row.removed);
        rows.push_back(std::move(row));
      }
      if (removed > 0) table.rows.insert(table.rows.end(), rows.begin(), rows.end());
    }
  } catch (...) {
    snapshot.restore_values();
    snapshot.restore_modes();
    throw;
  }
  snapshot.restore_modes();
  return table;
}

// Per-layer targets (SparsifierOptions::layer_targets, Local method) that remove at least
// `amount` parameters (turned to zero) or MACs (of one example, taken off by the Pruner after
// the sparsifier) at the least cost according to `table`: greedily, each step raises the unit
// whose next sparsity costs the smallest drop (the least sensitive first; on a tie the one
// removing more). Units never raised are absent (give the sparsifier a target of 0 for them).
// MACs of several units are combined exactly through the table's trace (pruning two adjacent
// layers removes less than the sum of each alone: the second layer's inputs go only once).
// Throws when the table's highest sparsities together remove less than `amount`.
inline LayerTargets layer_targets_for_budget(const SensitivityTable& table, std::int64_t amount,
                                             Budget of = Budget::Parameters) {
  constexpr auto where = "fasterai::layer_targets_for_budget";
  std::vector<std::vector<const SensitivityRow*>> levels;
  for (auto rows : table.units()) {
    std::stable_sort(rows.begin(), rows.end(),
                     [](const SensitivityRow* a, const SensitivityRow* b) { return a->sparsity < b->sparsity; });
    levels.push_back(std::move(rows));
  }
  const bool macs = of == Budget::Macs;
  auto alone = [&](const SensitivityRow* r) { return macs ? r->macs_removed : r->removed; };
  // What the units remove together at the given levels (-1: not raised).
  auto removed_at = [&](const std::vector<std::ptrdiff_t>& level) {
    std::int64_t sum = 0;
    std::vector<char> units;
    if (macs && table.pruned_macs) units.assign(table.pruned_macs->graph().units().size(), 0);
    for (std::size_t u = 0; u < levels.size(); ++u) {
      if (level[u] < 0) continue;
      const auto* r = levels[u][static_cast<std::size_t>(level[u])];
      sum += alone(r);
      for (auto unit : r->units_removed)
        if (!units.empty()) units[static_cast<std::size_t>(unit)] = 1;
    }
    return units.empty() ? sum : table.macs - table.pruned_macs->after(units);
  };
  std::vector<std::ptrdiff_t> top(levels.size());
  for (std::size_t u = 0; u < levels.size(); ++u) top[u] = static_cast<std::ptrdiff_t>(levels[u].size()) - 1;
  const std::int64_t reachable = removed_at(top);
  detail::check_argument(amount >= 0 && amount <= reachable, where, macs ? "macs" : "parameters", amount,
                         detail::concat("a count in [0, ", std::to_string(reachable),
                                        "]: what the table's highest sparsities remove together"));
  std::vector<std::ptrdiff_t> level(levels.size(), -1);
  auto gain = [&](std::size_t u) {
    const auto next = alone(levels[u][static_cast<std::size_t>(level[u] + 1)]);
    return next - (level[u] < 0 ? 0 : alone(levels[u][static_cast<std::size_t>(level[u])]));
  };
  while (removed_at(level) < amount) {
    std::ptrdiff_t best = -1;
    for (std::size_t u = 0; u < levels.size(); ++u) {
      if (level[u] + 1 >= static_cast<std::ptrdiff_t>(levels[u].size())) continue;
      const auto b = static_cast<std::size_t>(best);
      if (best < 0) {
        best = static_cast<std::ptrdiff_t>(u);
        continue;
      }
      const double drop = levels[u][static_cast<std::size_t>(level[u] + 1)]->drop;
      const double best_drop = levels[b][static_cast<std::size_t>(level[b] + 1)]->drop;
      if (drop < best_drop || (drop == best_drop && gain(u) > gain(b))) best = static_cast<std::ptrdiff_t>(u);
    }
    if (best < 0) break;  // cannot happen: every unit at its top level reaches the amount
    ++level[static_cast<std::size_t>(best)];
  }
  LayerTargets targets;
  for (std::size_t u = 0; u < levels.size(); ++u)
    if (level[u] >= 0)
      for (const auto& layer : levels[u].front()->layers) targets[layer] = levels[u][static_cast<std::size_t>(level[u])]->sparsity;
  return targets;
}

// The table with one line per unit: the drop of the metric at each sparsity.
inline std::ostream& operator<<(std::ostream& os, const SensitivityTable& table) {
  const auto flags = os.flags();
  const auto precision = os.precision();
  os << "Sensitivity (" << table.configuration << "), " << table.metric_name << " " << std::fixed
     << std::setprecision(4) << table.baseline << " unpruned (" << table.parameters << " parameters, "
     << table.macs << " MACs); drop when pruned alone at\n";
  const auto units = table.units();
  std::size_t width = 6;
  for (const auto& u : units) width = std::max(width, detail::join_layers(u.front()->layers).size());
  os << std::left << std::setw(static_cast<int>(width)) << "layer" << std::right;
  if (!units.empty())
    for (const auto* r : units.front()) os << std::setw(10) << std::setprecision(0) << r->sparsity << "%";
  os << '\n';
  for (const auto& u : units) {
    os << std::left << std::setw(static_cast<int>(width)) << detail::join_layers(u.front()->layers) << std::right;
    for (const auto* r : u) os << std::setw(11) << std::setprecision(4) << r->drop;
    os << '\n';
  }
  os.flags(flags);
  os.precision(precision);
  return os;
}

inline void SensitivityTable::write_csv(const std::string& path) const {
  std::ofstream out(path);
  detail::check_argument(out.good(), "fasterai::SensitivityTable::write_csv", "path", path,
                         "a file that can be written");
  out << "layers,sparsity,removed," << metric_name << ",drop,macs_removed\n";
  out << std::setprecision(std::numeric_limits<double>::max_digits10);
  for (const auto& r : rows)
    out << detail::join_layers(r.layers) << ',' << r.sparsity << ',' << r.removed << ',' << r.metric << ','
        << r.drop << ',' << r.macs_removed << '\n';
  detail::check_argument(out.good(), "fasterai::SensitivityTable::write_csv", "path", path,
                         "a file that can be written");
}

}  // namespace fasterai
