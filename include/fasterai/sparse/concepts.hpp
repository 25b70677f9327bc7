#pragma once
// What each policy family of `Sparsifier<Granularity, Method, Criteria, Schedule>` must
// provide. The policies are small types; these concepts are the contract, so a user's own
// policy works as soon as it satisfies them.

#include <concepts>
#include <cstdint>
#include <string_view>

#include <torch/torch.h>

namespace fasterai {

// Granularity: how per-weight scores group into the units that are kept or removed together.
//   group_scores(scores)        -> one score per group (shaped for broadcasting back)
//   expand(pruned_groups, scores) -> element mask (true = pruned), shaped like the weight
//   groups_to_prune(n, s)       -> how many of n groups a sparsity of s percent removes
//   max_sparsity()              -> the highest sparsity the pattern can reach (percent)
//   check(weight, name)         -> throws when the layer's shape does not fit the pattern
template <class G>
concept granularity_policy = requires(const torch::Tensor& t, std::int64_t n, double s,
                                      const std::string& name) {
  { G::name() } -> std::convertible_to<std::string_view>;
  { G::whole_channel } -> std::convertible_to<bool>;
  { G::group_scores(t) } -> std::same_as<torch::Tensor>;
  { G::expand(t, t) } -> std::same_as<torch::Tensor>;
  { G::groups_to_prune(n, s) } -> std::same_as<std::int64_t>;
  { G::max_sparsity() } -> std::convertible_to<double>;
  G::check(t, name);
};

// Method: where the threshold is taken — per layer (local) or over all layers (global).
template <class M>
concept method_policy = requires {
  { M::name() } -> std::convertible_to<std::string_view>;
  { M::global } -> std::convertible_to<bool>;
};

// Criteria: the importance of each weight (low scores are removed first).
//   init(weight, seed)          -> per-layer state recorded when the sparsifier is created
//   score(weight, grad, state)  -> a float score per weight
template <class C>
concept criteria_policy = requires(const torch::Tensor& t, std::uint64_t seed) {
  { C::name() } -> std::convertible_to<std::string_view>;
  { C::needs_gradients } -> std::convertible_to<bool>;
  { C::init(t, seed) } -> std::same_as<torch::Tensor>;
  { C::score(t, t, t) } -> std::same_as<torch::Tensor>;
};

// Schedule: training progress in [0, 1] -> fraction of the way from the start sparsity to the
// target, in [0, 1]. Any callable `double(double)` is one.
template <class S>
concept schedule_policy = std::copy_constructible<S> && std::invocable<const S&, double> &&
                          std::convertible_to<std::invoke_result_t<const S&, double>, double>;

}  // namespace fasterai
