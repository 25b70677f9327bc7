#pragma once
// FCDecomposer: replaces each fully-connected layer by two thinner ones, from the truncated
// singular value decomposition of its weight, W[out, in] ≈ U_L·diag(S_L)·V_Lᵀ:
//
//   Linear(in → out)   becomes   Linear(in → L, no bias, weight diag(S_L)·V_Lᵀ)
//                                Linear(L → out, weight U_L, the original bias)
//
// with L = max(1, floor((1 − percent_removed)·min(out, in))) singular values kept. The pair
// takes L·(in + out) weights instead of in·out, and by Eckart–Young it is the best rank-L
// approximation: ‖W − W_L‖_F = √(Σ discarded σ²). It is NOT exact — fine-tune afterwards. Use
// it on networks whose parameters sit in large Linear layers (VGG's classifier holds 90%):
//
//   auto small = fasterai::FCDecomposer().decompose(model, 0.5);   // `model` is left as it was
//   auto some  = fasterai::FCDecomposer(fasterai::FCDecomposerOptions()
//                                           .layers({"classifier.0"})
//                                           .only_if_smaller(true))
//                    .decompose(model, 0.5);
//
// The pair is a NamedSequential under the original layer's name, so its parameters are named
// `classifier.0.0.weight` and `classifier.0.1.weight` / `classifier.0.1.bias`. `preview` gives
// the ranks and parameter counts without computing any SVD (the expensive step: an SVD in
// double costs m·n·min(m, n) for an m×n layer such as VGG16's 4096×15092, and is far slower
// with the reference LAPACK than with OpenBLAS).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/core/libtorch_version.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/transform/rebuild.hpp>

namespace fasterai {

struct FCDecomposerOptions {
  FCDecomposerOptions() = default;
  // Names of the Linear layers to factorize, as the layer walk names them ("classifier.0");
  // empty: every Linear of the model.
  TORCH_ARG(std::vector<std::string>, layers) = {};
  // Leave a layer as it is when its factorization would not have fewer parameters, i.e. when
  // L·(in + out) >= in·out (at percent_removed = 0.5 a square layer breaks even).
  TORCH_ARG(bool, only_if_smaller) = false;
};

// What the decomposer did (or, from `preview`, would do) to one Linear layer.
struct DecomposedLayer {
  std::string name;                 // e.g. "classifier.0"
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  std::int64_t rank = 0;            // L, singular values kept
  std::int64_t parameters_before = 0;
  std::int64_t parameters_after = 0;  // equal to parameters_before when left alone
  bool factorized = false;
};

struct DecomposeReport {
  std::vector<DecomposedLayer> layers;  // every selected Linear, in forward order
  std::int64_t factorized() const {
    std::int64_t n = 0;
    for (const auto& l : layers) n += l.factorized ? 1 : 0;
    return n;
  }
  std::int64_t parameters_saved() const {
    std::int64_t n = 0;
    for (const auto& l : layers) n += l.parameters_before - l.parameters_after;
    return n;
  }
  // False when no layer was factorized: the result is then a plain copy.
  bool changed() const { return factorized() > 0; }
};

class FCDecomposer {
 public:
  explicit FCDecomposer(FCDecomposerOptions options = {}) : options(std::move(options)) {}

  // A new model in which every selected Linear is factorized with rank
  // L = max(1, floor((1 − percent_removed)·min(out, in))); percent_removed is in [0, 1).
  // Sequentials only (the constraint refuses other modules at compile time): a Linear that is a
  // member of a user's module is called by that module's forward, which cannot be made to call
  // two Linears instead.
  template <sequential_like Model>
  torch::nn::Sequential decompose(const Model& model, double percent_removed);

  // What `decompose(model, percent_removed)` would do, without computing it.
  template <sequential_like Model>
  DecomposeReport preview(const Model& model, double percent_removed) const;

  // What the last `decompose` did.
  const DecomposeReport& report() const { return report_; }

  FCDecomposerOptions options;

 private:
  DecomposeReport report_;
};

namespace detail {

inline constexpr const char* decomposer_where = "fasterai::FCDecomposer::decompose";

// floor((1 − p)·n) with a margin for rounding: 1 − 0.9 is 0.0999…, and 10 of them must keep 1.
inline std::int64_t kept_rank(double percent_removed, std::int64_t n) {
  const auto kept = static_cast<std::int64_t>(std::floor((1.0 - percent_removed) * double(n) + 1e-9));
  return std::max<std::int64_t>(1, std::min(kept, n));
}

inline DecomposeReport plan_decomposition(const std::vector<Layer>& all,
                                          const FCDecomposerOptions& options,
                                          double percent_removed) {
  check_argument(percent_removed >= 0.0 && percent_removed < 1.0, decomposer_where,
                 "percent_removed", percent_removed,
                 "a fraction of singular values in [0, 1) (0.5 keeps half of them)");
  std::set<std::string> wanted(options.layers().begin(), options.layers().end());
  for (const auto& name : wanted) {
    bool found = false;
    for (const Layer& l : all) found = found || (l.name == name && l.kind == LayerKind::Linear);
    check_argument(found, decomposer_where, "layers", "'" + name + "'",
                   "names of Linear layers of the model, as the layer walk names them "
                   "(e.g. 'classifier.0')");
  }
  DecomposeReport report;
  for (const Layer& layer : all) {
    if (layer.kind != LayerKind::Linear) continue;
    if (!wanted.empty() && wanted.count(layer.name) == 0) continue;
    const auto& o = layer.as<torch::nn::LinearImpl>()->options;
    DecomposedLayer d;
    d.name = layer.name;
    d.in_features = o.in_features();
    d.out_features = o.out_features();
    d.rank = kept_rank(percent_removed, std::min(d.in_features, d.out_features));
    const std::int64_t bias = o.bias() ? d.out_features : 0;
    d.parameters_before = d.in_features * d.out_features + bias;
    const std::int64_t factorized = d.rank * (d.in_features + d.out_features) + bias;
    d.factorized = !options.only_if_smaller() || factorized < d.parameters_before;
    d.parameters_after = d.factorized ? factorized : d.parameters_before;
    report.layers.push_back(d);
  }
  return report;
}

// The two Linears of rank `rank` that best approximate `linear`. The SVD runs in double so
// that the factors carry no more error than their final rounding to the weight's dtype.
inline NamedSequential factorized_linear(const torch::nn::LinearImpl& linear, std::int64_t rank) {
  const auto& o = linear.options;
  const auto [u, s, vh] = libtorch::svd(linear.weight.to(torch::kFloat64));
  torch::nn::Linear first = placed_like(
      torch::nn::Linear(torch::nn::LinearOptions(o.in_features(), rank).bias(false)),
      linear.weight);
  torch::nn::Linear second = placed_like(
      torch::nn::Linear(torch::nn::LinearOptions(rank, o.out_features()).bias(o.bias())),
      linear.weight);
  first->weight.copy_(s.narrow(0, 0, rank).unsqueeze(1) * vh.narrow(0, 0, rank));
  second->weight.copy_(u.narrow(1, 0, rank));
  if (o.bias()) second->bias.copy_(linear.bias);
  NamedSequential pair;
  pair->push_back("0", first);
  pair->push_back("1", second);
  return pair;
}

}  // namespace detail

template <sequential_like Model>
DecomposeReport FCDecomposer::preview(const Model& model, double percent_removed) const {
  const LayerView view = layers(model);
  return detail::plan_decomposition(std::vector<Layer>(view.begin(), view.end()), options,
                                    percent_removed);
}

template <sequential_like Model>
torch::nn::Sequential FCDecomposer::decompose(const Model& model, double percent_removed) {
  DecomposeReport plan = preview(model, percent_removed);
  std::map<std::string, std::int64_t> ranks;
  for (const auto& l : plan.layers)
    if (l.factorized) ranks[l.name] = l.rank;
  torch::NoGradGuard no_grad;
  auto result = detail::rebuild(model, [&](const std::string& name, const torch::nn::AnyModule& any) {
    const auto it = ranks.find(name);
    if (it == ranks.end()) return detail::LeafAction::keep();
    return detail::LeafAction::replace(
        detail::factorized_linear(*any.ptr()->as<torch::nn::LinearImpl>(), it->second));
  });
  report_ = std::move(plan);
  return result;
}

}  // namespace fasterai
