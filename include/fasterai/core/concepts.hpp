#pragma once
// Module concepts: what counts as a convolution, a linear layer, a batch norm and a
// Sequential-like container. Each accepts a LibTorch module implementation (`Conv2dImpl`) and
// its holder (`Conv2d`), so public functions can say which modules they take and reject
// anything else at compile time.

#include <concepts>
#include <type_traits>

#include <torch/torch.h>

namespace fasterai {
namespace detail {

template <class M>
struct impl_of {
  using type = M;
};
// A holder (`torch::nn::Conv2d`) stands for the implementation it holds (`Conv2dImpl`).
template <class M>
  requires requires { typename M::ContainedType; }
struct impl_of<M> {
  using type = typename M::ContainedType;
};

}  // namespace detail

// The implementation type behind a module or a module holder.
template <class M>
using impl_of_t = typename detail::impl_of<std::remove_cvref_t<M>>::type;

template <class M>
concept module = std::derived_from<impl_of_t<M>, torch::nn::Module>;

// A module whose forward takes one tensor and returns one tensor: what can be traced, exported
// and trained. (A Sequential qualifies; its last layer must return a tensor, which is checked
// at run time.)
template <class M>
concept traceable = module<M> && requires(impl_of_t<M>& m, torch::Tensor x) {
  { m.forward(x) } -> std::convertible_to<torch::Tensor>;
};

template <class M>
concept convolution =
    module<M> && (std::derived_from<impl_of_t<M>, torch::nn::Conv1dImpl> ||
                  std::derived_from<impl_of_t<M>, torch::nn::Conv2dImpl> ||
                  std::derived_from<impl_of_t<M>, torch::nn::Conv3dImpl>);

template <class M>
concept linear_layer = module<M> && std::derived_from<impl_of_t<M>, torch::nn::LinearImpl>;

template <class M>
concept batch_norm = module<M> && (std::derived_from<impl_of_t<M>, torch::nn::BatchNorm1dImpl> ||
                                   std::derived_from<impl_of_t<M>, torch::nn::BatchNorm2dImpl> ||
                                   std::derived_from<impl_of_t<M>, torch::nn::BatchNorm3dImpl>);

// A layer whose weights a sparsifier can score and mask.
template <class M>
concept prunable_layer = convolution<M> || linear_layer<M>;

// A chain of layers applied in order: the shape every transform of fasterai works on.
template <class M>
concept sequential_like = module<M> && std::derived_from<impl_of_t<M>, torch::nn::SequentialImpl>;

namespace detail {

// The implementation object behind a holder or an implementation reference.
template <module M>
decltype(auto) impl(M&& m) {
  if constexpr (requires { typename std::remove_cvref_t<M>::ContainedType; }) {
    return *m;
  } else {
    return (m);
  }
}

}  // namespace detail
}  // namespace fasterai
