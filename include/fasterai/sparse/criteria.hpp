#pragma once
// Criteria policies: the importance of each weight; the lowest-scoring groups are removed.
//
//   L1        |w|                 magnitude; the default of the fasterai article (2020),
//                                 needs nothing else
//   Taylor    (w * dL/dw)^2       first-order estimate of the loss change; needs gradients,
//                                 so call the sparsifier after backward()
//   Movement  |w| - |w0|          weights moving toward zero during fine-tuning go first;
//                                 w0 is recorded when the sparsifier is created
//   Random    uniform, seeded     a baseline: any criterion worth using must beat it
//   SecondOrderTaylor  w² · Σ_b g_b²   Hessian-free second-order estimate: Optimal Brain
//                                 Damage's saliency ½·H_ii·w² (LeCun et al. 1990) with the
//                                 Hessian's diagonal replaced by the empirical Fisher, the
//                                 squared gradients summed over the batches the sparsifier has
//                                 scored (Theis et al. 2018, "Faster gaze prediction with dense
//                                 networks and Fisher pruning"); the constant ½ and the batch
//                                 count do not change the ranking and are left out
//   BNScale   |γ|                 network slimming (Liu et al. 2017): a channel scores the
//                                 |γ| of the BatchNorm that normalises it, summed over the
//                                 norms of a coupled unit; Filter granularity only, and every
//                                 selected layer's channels must reach such a norm
//
// From the structural-pruning literature; each scores the groups of the granularity it is
// given (the same as the sparsifier's), because its score is a function of the whole group:
//   L2<G>     ‖group‖₂            the norm of each filter (kernel, row, ...); |w| for Weight
//   LAMP<G>   ‖g‖² / Σ_{‖h‖≥‖g‖} ‖h‖²   Lee et al. 2021, "Layer-adaptive sparsity for the
//                                 magnitude-based pruning": the squared norm divided by the sum
//                                 of the squared norms of the layer's groups at least as large,
//                                 so scores lie in (0, 1], each layer's largest group scores 1,
//                                 and one Global threshold compares layers fairly
//   FPGM      Σ_j ‖f − f_j‖₂      He et al. 2019, "Filter pruning via geometric median": a
//                                 filter's summed distance to the other filters of its layer;
//                                 filters near the geometric median are replaceable by the
//                                 others and go first, whatever their norm. Defined for filters
//                                 (output channels; a Linear's rows): use it with Filter
//
// A criterion returns one score per weight and the granularity sums them over each group; these
// three spread a group's score evenly over the group's weights, so the granularity's sum is the
// group's score (up to float rounding). With Filter granularity on a model with coupled channels
// a unit's score is the sum over the layers that make it, as for every criterion.

#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include <fasterai/sparse/granularity.hpp>

namespace fasterai::criteria {

struct L1 {
  static constexpr std::string_view name() { return "L1"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    return w.abs();
  }
};

struct Taylor {
  static constexpr std::string_view name() { return "Taylor"; }
  static constexpr bool needs_gradients = true;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor& grad,
                             const torch::Tensor&) {
    return (w * grad).square();
  }
};

struct Movement {
  static constexpr std::string_view name() { return "Movement"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor& w, std::uint64_t) {
    return w.detach().abs().to(torch::kFloat32).clone();
  }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&,
                             const torch::Tensor& initial_abs) {
    return w.abs() - initial_abs;
  }
};

// The squared gradients are summed into the per-layer state each time the sparsifier scores
// (every step(), once per training batch under SparsifyCallback; prune() scores once), so call
// it once per backward(): a second call on the same gradients counts that batch twice. The
// current weight multiplies the sum, so a weight that moved scores by where it is now.
struct SecondOrderTaylor {
  static constexpr std::string_view name() { return "SecondOrderTaylor"; }
  static constexpr bool needs_gradients = true;
  static torch::Tensor init(const torch::Tensor& w, std::uint64_t) {
    return torch::zeros(w.sizes(), w.options().dtype(torch::kFloat32).requires_grad(false));
  }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor& grad,
                             const torch::Tensor& squared_gradients) {
    // The state is the sparsifier's own tensor: adding in place is what accumulates it.
    auto sum = squared_gradients;
    sum.add_(grad.to(sum.device()).square());
    return w.square() * sum;
  }
};

// The sparsifier scores each channel by the |γ| of the norms its unit reaches (it knows them from
// the channel graph); the per-weight score below is never used for selection, it only meets the
// criteria concept. `scores_norms` is what tells the sparsifier.
struct BNScale {
  static constexpr std::string_view name() { return "BNScale"; }
  static constexpr bool needs_gradients = false;
  static constexpr bool scores_norms = true;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    return torch::zeros(w.sizes(), w.options().dtype(torch::kFloat32));
  }
};

// Scores are drawn once, when the sparsifier is created, so masks grow monotonically as the
// target rises and a run is reproducible from its seed alone (no global RNG state is touched).
struct Random {
  static constexpr std::string_view name() { return "Random"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor& w, std::uint64_t seed) {
    std::mt19937_64 engine(seed);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    std::vector<float> values(static_cast<size_t>(w.numel()));
    for (auto& v : values) v = uniform(engine);
    return torch::tensor(values).reshape(w.sizes()).to(w.device());
  }
  static torch::Tensor score(const torch::Tensor&, const torch::Tensor&,
                             const torch::Tensor& drawn) {
    return drawn;
  }
};

namespace detail {

// The sums of x over each group of G: the structured granularities (Weight, Vector, Kernel,
// Filter) say which dimensions a group spans; any other (N:M, a user's) scores single weights.
template <class G>
torch::Tensor group_sums(const torch::Tensor& x) {
  if constexpr (requires { G::reduced_dims(); })
    return granularity::detail::sum_over(x, G::reduced_dims());
  else
    return x;
}

// A score per group, shaped to broadcast over the weight -> a score per weight whose sum over
// each group is the group's score.
inline torch::Tensor spread(const torch::Tensor& group_scores, const torch::Tensor& w) {
  if (group_scores.numel() == w.numel()) return group_scores.reshape(w.sizes()).to(torch::kFloat32);
  const double members = double(w.numel()) / double(group_scores.numel());
  return (group_scores / members).to(torch::kFloat32).expand(w.sizes()).contiguous();
}

// LAMP over a set of squared norms: each divided by the sum of those at least as large (ties
// count on both sides, so equal norms get equal scores); 0 where that sum is 0.
inline torch::Tensor lamp_of_squares(const torch::Tensor& squares) {
  const auto flat = squares.reshape({-1}).to(torch::kFloat64);
  const auto ascending = std::get<0>(flat.sort());
  // at_least[i] = sum of ascending[i:]
  const auto at_least = ascending.flip({0}).cumsum(0).flip({0});
  const auto first = torch::searchsorted(ascending, flat);  // first position >= each value
  const auto denominator = at_least.index_select(0, first);
  const auto scores = torch::where(denominator > 0, flat / denominator, torch::zeros_like(flat));
  return scores.reshape(squares.sizes());
}

}  // namespace detail

// The L2 norm of each group of granularity G (pass the sparsifier's own).
template <class G>
struct L2 {
  static constexpr std::string_view name() { return "L2"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    const auto squares = detail::group_sums<G>(w.to(torch::kFloat64).square());
    if (squares.numel() == w.numel()) return w.abs().to(torch::kFloat32);  // single weights: |w|
    return detail::spread(squares.sqrt(), w);
  }
};

// Layer-adaptive magnitude (Lee et al. 2021) of each group of granularity G within its layer.
// Meant for the Global method: Local with LAMP selects what L2 selects, LAMP being monotone in
// the norm within a layer.
template <class G>
struct LAMP {
  static constexpr std::string_view name() { return "LAMP"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    return detail::spread(detail::lamp_of_squares(detail::group_sums<G>(w.to(torch::kFloat64).square())), w);
  }
};

// Geometric-median redundancy (He et al. 2019) of each output channel: the sum of its Euclidean
// distances to the layer's other output channels. Costs n² · (weights per filter) per layer.
struct FPGM {
  static constexpr std::string_view name() { return "FPGM"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    const auto filters = w.to(torch::kFloat64).reshape({w.size(0), -1});
    // Exact distances (no ‖a‖² + ‖b‖² − 2ab shortcut, whose rounding leaves d(f, f) ≠ 0).
    const auto distances = torch::cdist(filters, filters, 2.0, /*donot_use_mm_for_euclid_dist=*/2);
    std::vector<std::int64_t> shape(static_cast<std::size_t>(w.dim()), 1);
    shape[0] = w.size(0);
    return detail::spread(distances.sum(1).reshape(shape), w);
  }
};

}  // namespace fasterai::criteria
