#pragma once
// Named, nestable Sequentials and structure-preserving copies.
//
// LibTorch cannot store a `torch::nn::Sequential` inside another one (its templated forward
// does not fit `AnyModule`), and `SequentialImpl::clone` renames children to "0", "1", ...
// Models shaped like torchvision's need both nesting and names, so stages are
// `NamedSequential`s (a `SequentialImpl` with a tensor forward and a name-keeping clone), and
// every transform copies models with `clone_model`, never with `clone()`.

#include <memory>
#include <string>
#include <utility>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>

namespace fasterai {

class NamedSequentialImpl : public torch::nn::SequentialImpl {
 public:
  using torch::nn::SequentialImpl::SequentialImpl;

  torch::Tensor forward(torch::Tensor x) {
    return torch::nn::SequentialImpl::forward<torch::Tensor>(std::move(x));
  }

  inline std::shared_ptr<torch::nn::Module> clone(
      const c10::optional<torch::Device>& device = c10::nullopt) const override;
};
TORCH_MODULE(NamedSequential);

namespace detail {

// Children of a Sequential as (name, AnyModule) in forward order.
template <class F>
void for_each_child(const torch::nn::SequentialImpl& seq, F&& f) {
  const auto children = seq.named_children();
  for (size_t i = 0; i < seq.size(); ++i)
    f(children[i].key(), seq.begin()[static_cast<std::ptrdiff_t>(i)]);
}

// Copy `from` into `to` child by child, keeping names, types and train/eval mode.
inline void copy_children(const torch::nn::SequentialImpl& from, torch::nn::SequentialImpl& to,
                          const c10::optional<torch::Device>& device) {
  for_each_child(from, [&](const std::string& name, const torch::nn::AnyModule& child) {
    to.push_back(name, child.clone(device));
  });
  to.train(from.is_training());
}

}  // namespace detail

inline std::shared_ptr<torch::nn::Module> NamedSequentialImpl::clone(
    const c10::optional<torch::Device>& device) const {
  auto copy = std::make_shared<NamedSequentialImpl>();
  detail::copy_children(*this, *copy, device);
  return copy;
}

// A deep copy of `model` with the same structure, names, values and mode.
template <sequential_like Model>
torch::nn::Sequential clone_model(const Model& model,
                                  const c10::optional<torch::Device>& device = c10::nullopt) {
  torch::nn::Sequential copy;
  detail::copy_children(detail::impl(model), *copy, device);
  return copy;
}

}  // namespace fasterai
