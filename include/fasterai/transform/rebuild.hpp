#pragma once
// Rebuilding a model with some leaf layers replaced or dropped: the one mechanism that the
// Pruner, the BNFolder and the FCDecomposer share to return a new model of the same nested,
// named structure while the input stays untouched.
//
// Use it when a transform decides, layer by layer (by the layer walk's qualified names), what
// each leaf becomes. Leaves that the decision leaves alone are deep copies (`AnyModule::clone`),
// so the result never shares a tensor with the input.

#include <string>
#include <utility>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/core/sequential.hpp>

namespace fasterai::detail {

// What becomes of one leaf layer: `keep` copies it, `drop` removes it, `replace` puts another
// module in its place under the same name.
class LeafAction {
 public:
  static LeafAction keep() { return LeafAction(Kind::keep, {}); }
  static LeafAction drop() { return LeafAction(Kind::drop, {}); }
  static LeafAction replace(torch::nn::AnyModule module) {
    return LeafAction(Kind::replace, std::move(module));
  }
  template <module M>
  static LeafAction replace(M module) {
    return replace(torch::nn::AnyModule(std::move(module)));
  }

  bool keeps() const { return kind_ == Kind::keep; }
  bool drops() const { return kind_ == Kind::drop; }
  const torch::nn::AnyModule& replacement() const { return module_; }

 private:
  enum class Kind { keep, drop, replace };
  LeafAction(Kind kind, torch::nn::AnyModule module) : kind_(kind), module_(std::move(module)) {}
  Kind kind_;
  torch::nn::AnyModule module_;
};

template <class Decide>
void rebuild_children(const torch::nn::SequentialImpl& from, torch::nn::SequentialImpl& to,
                      const std::string& prefix, Decide& decide);

// A copy of `model` in which every leaf layer (named as the layer walk names it, e.g.
// "features.3") has become what `decide(name, leaf)` says. Nested stages are rebuilt as
// `NamedSequential`s under their names; a stage left with no layer becomes an `Identity`, since
// LibTorch refuses to run an empty Sequential. Train/eval modes are copied.
template <sequential_like Model, class Decide>
torch::nn::Sequential rebuild(const Model& model, Decide decide) {
  const auto& from = impl(model);
  torch::nn::Sequential to;
  rebuild_children(from, *to, "", decide);
  to->train(from.is_training());
  return to;
}

template <class Decide>
void rebuild_children(const torch::nn::SequentialImpl& from, torch::nn::SequentialImpl& to,
                      const std::string& prefix, Decide& decide) {
  for_each_child(from, [&](const std::string& child, const torch::nn::AnyModule& any) {
    const std::string name = join_name(prefix, child);
    if (const auto* nested = any.ptr()->as<torch::nn::SequentialImpl>()) {
      NamedSequential stage;
      rebuild_children(*nested, *stage, name, decide);
      stage->train(nested->is_training());
      if (stage->is_empty()) {
        torch::nn::Identity identity;
        identity->train(nested->is_training());
        to.push_back(child, torch::nn::AnyModule(identity));
      } else {
        to.push_back(child, torch::nn::AnyModule(stage));
      }
      return;
    }
    const LeafAction action = decide(name, any);
    if (action.keeps()) {
      to.push_back(child, any.clone());
    } else if (!action.drops()) {
      action.replacement().ptr()->train(any.ptr()->is_training());
      to.push_back(child, action.replacement());
    }
  });
}

// A new module placed like `like` (device, floating dtype): replacements are built on the CPU in
// float by LibTorch's constructors and must follow the model they join. `Module::to(dtype)` would
// also convert integer buffers (BatchNorm's num_batches_tracked), so tensors are moved one by one.
template <module M>
M placed_like(M module, const torch::Tensor& like) {
  torch::NoGradGuard no_grad;
  for (auto& p : impl(module).parameters()) p.set_data(p.to(like.device(), like.scalar_type()));
  for (auto& b : impl(module).buffers())
    b.set_data(b.is_floating_point() ? b.to(like.device(), like.scalar_type()) : b.to(like.device()));
  return module;
}

}  // namespace fasterai::detail
