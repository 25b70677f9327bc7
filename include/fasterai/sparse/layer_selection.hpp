#pragma once
// Which layers of a model a Sparsifier masks, and the final sparsity of each: the options
// checked against the model before anything is bound.

#include <algorithm>
#include <string>
#include <vector>

#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/sparse/concepts.hpp>
#include <fasterai/sparse/sparsifier_options.hpp>

namespace fasterai {

// A layer a sparsifier masks, and the sparsity (percent) its schedule leads it to.
struct LayerTarget {
  Layer layer;
  double sparsity = 0;
};

namespace detail {

// A sparsity the granularity can reach (N:M keeps N of every M).
template <granularity_policy Granularity>
void check_reachable(const std::string& caller, const std::string& argument, double s) {
  check_argument(s <= Granularity::max_sparsity(), caller, argument, s,
                 concat("at most ", std::to_string(Granularity::max_sparsity()), "% for granularity ",
                        Granularity::name()));
}

// The layers of `all` that `options` select, in forward order, with their targets; every option
// is checked first (names that exist and are prunable, sparsities in range and reachable).
template <granularity_policy Granularity, method_policy Method>
std::vector<LayerTarget> select_layers(const LayerView& all, const SparsifierOptions& options,
                                       const std::string& caller) {
  auto names_of = [&] {
    std::string s;
    for (const Layer& l : all)
      if (is_prunable(l)) s.append(s.empty() ? "" : ", ").append(l.name);
    return concat("the name of a prunable layer (", s, ")");
  };
  auto find_prunable = [&](const std::string& name) {
    return std::find_if(all.begin(), all.end(), [&](const Layer& l) { return l.name == name && is_prunable(l); });
  };
  for (const auto& n : options.include()) check_argument(find_prunable(n) != all.end(), caller, "include", n, names_of());
  for (const auto& n : options.exclude()) check_argument(find_prunable(n) != all.end(), caller, "exclude", n, names_of());
  check_sparsity(concat(caller, " (options.target)"), options.target());
  check_sparsity(concat(caller, " (options.start)"), options.start());
  check_reachable<Granularity>(caller, "options.target", options.target());
  check_argument(options.round_to() >= 1, caller, "round_to", options.round_to(),
                 "a channel multiple >= 1 (1: no rounding)");
  check_argument(!Method::global || options.layer_targets().empty(), caller, "layer_targets",
                 options.layer_targets().size(), "no per-layer targets with the Global method (one threshold for all)");

  auto contains = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  std::vector<LayerTarget> selected;
  for (const Layer& l : all) {
    if (!is_prunable(l)) continue;
    // By default Conv2d; with include_linear also the layers whose weight is a matrix (Linear,
    // MultiheadAttention's projection); others (Conv1d, ...) when named in include.
    const bool wanted = options.include().empty()
                            ? (l.kind == LayerKind::Conv2d || (options.include_linear() && l.weight().dim() == 2))
                            : contains(options.include(), l.name);
    if (!wanted || contains(options.exclude(), l.name)) continue;
    Granularity::check(l.weight(), l.name);
    selected.push_back({l, options.target()});
  }
  check_argument(!selected.empty(), caller, "model", "a model with no selected layer",
                 "at least one Conv2d (or, with include_linear, Linear) layer selected after include/exclude");
  for (const auto& [name, s] : options.layer_targets()) {
    auto it = std::find_if(selected.begin(), selected.end(), [&](const LayerTarget& t) { return t.layer.name == name; });
    check_argument(it != selected.end(), caller, "layer_targets", name, "the name of a selected layer");
    check_sparsity(concat(caller, " (layer_targets[", name, "])"), s);
    check_reachable<Granularity>(caller, concat("layer_targets[", name, "]"), s);
    it->sparsity = s;
  }
  return selected;
}

}  // namespace detail
}  // namespace fasterai
