#pragma once
// Granularity policies: the unit that is kept or removed as a whole.
//
//   Weight   each element                       finest; best accuracy, needs sparse kernels
//   Vector   a kernel row W[o, i, h, :]         between weight and kernel
//   Kernel   a 2-D kernel W[o, i, :, :]         removes whole connections between channels
//   Filter   an output channel W[o, :, :, :]    the only one the Pruner can remove physically
//   NM<N, M> in M consecutive weights along the input dimension, N are kept
//            (semi-structured: the pattern sparse tensor cores accelerate, e.g. 2:4)
//
// A Linear layer W[out, in] is treated as a 1x1 convolution: Filter removes an output row,
// Vector and Kernel fall back to single weights.

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai::granularity {
namespace detail {

// A structured granularity sums scores over `dims` of the weight (dims beyond the weight's
// rank are ignored, which is how Linear layers fall back).
inline torch::Tensor sum_over(const torch::Tensor& scores, std::vector<std::int64_t> dims) {
  std::erase_if(dims, [&](std::int64_t d) { return d >= scores.dim(); });
  return dims.empty() ? scores : scores.sum(dims, /*keepdim=*/true);
}

inline std::int64_t floor_fraction(std::int64_t n, double sparsity) {
  return static_cast<std::int64_t>(std::floor(double(n) * sparsity / 100.0));
}

// Shared by the structured granularities: each group is a block of the weight.
template <class Self>
struct Structured {
  static constexpr bool whole_channel = false;
  static torch::Tensor group_scores(const torch::Tensor& scores) {
    return sum_over(scores, Self::reduced_dims());
  }
  static torch::Tensor expand(const torch::Tensor& pruned_groups, const torch::Tensor& scores) {
    return pruned_groups.expand_as(scores);
  }
  static std::int64_t groups_to_prune(std::int64_t n, double sparsity) {
    return floor_fraction(n, sparsity);
  }
  static constexpr double max_sparsity() { return 100.0; }
  static void check(const torch::Tensor&, const std::string&) {}
};

}  // namespace detail

struct Weight : detail::Structured<Weight> {
  static constexpr std::string_view name() { return "Weight"; }
  static std::vector<std::int64_t> reduced_dims() { return {}; }
};

struct Vector : detail::Structured<Vector> {
  static constexpr std::string_view name() { return "Vector"; }
  static std::vector<std::int64_t> reduced_dims() { return {3}; }
};

struct Kernel : detail::Structured<Kernel> {
  static constexpr std::string_view name() { return "Kernel"; }
  static std::vector<std::int64_t> reduced_dims() { return {2, 3}; }
};

struct Filter : detail::Structured<Filter> {
  static constexpr std::string_view name() { return "Filter"; }
  // A removed filter takes its bias and the following BatchNorm's gamma and beta with it, so
  // the channel is exactly zero downstream and the Pruner can remove it without changing
  // outputs.
  static constexpr bool whole_channel = true;
  static std::vector<std::int64_t> reduced_dims() { return {1, 2, 3}; }
};

// N:M semi-structured sparsity. Each block of M consecutive weights along the input
// dimension is a group; pruning a group zeroes its M - N lowest-scoring weights, so a layer at
// the maximum sparsity (M - N) / M has the exact N:M pattern. The cost of a group is the score
// of the weights it would lose, so schedules and global selection work as for the others.
template <int N, int M>
  requires(0 < N && N < M)
struct NM {
  static std::string name() { return std::to_string(N) + ":" + std::to_string(M); }
  static constexpr bool whole_channel = false;
  static constexpr double max_sparsity() { return 100.0 * (M - N) / M; }

  static void check(const torch::Tensor& weight, const std::string& layer) {
    fasterai::detail::check_argument(
        weight.size(1) % M == 0, fasterai::detail::concat("fasterai::granularity::NM<", name(), ">"),
        fasterai::detail::concat("input dimension of layer '", layer, "'"), weight.size(1),
        fasterai::detail::concat("a multiple of M = ", std::to_string(M)));
  }
  static torch::Tensor group_scores(const torch::Tensor& scores) {
    auto sorted = std::get<0>(blocks(scores).sort(/*stable=*/true, -1, false));
    return sorted.narrow(-1, 0, M - N).sum(-1);
  }
  static torch::Tensor expand(const torch::Tensor& pruned_groups, const torch::Tensor& scores) {
    auto b = blocks(scores);
    auto order = std::get<1>(b.sort(/*stable=*/true, -1, false));
    auto lowest = torch::zeros_like(b, torch::kBool)
                      .scatter_(-1, order.narrow(-1, 0, M - N), true);
    auto pruned = lowest & pruned_groups.unsqueeze(-1);
    return unblocks(pruned, scores);
  }
  static std::int64_t groups_to_prune(std::int64_t n, double sparsity) {
    // Each pruned block removes (M - N) / M of its weights.
    return static_cast<std::int64_t>(std::floor(double(n) * sparsity * M / (100.0 * (M - N))));
  }

 private:
  // [out, in, ...] -> [out, ..., in / M, M]: blocks run along the input dimension.
  static torch::Tensor blocks(const torch::Tensor& w) {
    auto moved = w.dim() > 2 ? w.movedim(1, -1) : w;
    // Built from the front (GCC 14 cannot prove a `back()` of the sizes non-empty).
    std::vector<std::int64_t> sizes(moved.sizes().begin(), moved.sizes().end() - 1);
    sizes.push_back(moved.size(-1) / M);
    sizes.push_back(M);
    return moved.reshape(sizes);
  }
  static torch::Tensor unblocks(const torch::Tensor& b, const torch::Tensor& like) {
    auto sizes = b.sizes().vec();
    sizes.pop_back();
    sizes.back() *= M;
    auto moved = b.reshape(sizes);
    return like.dim() > 2 ? moved.movedim(-1, 1).contiguous() : moved;
  }
};

}  // namespace fasterai::granularity
