#pragma once
// fasterai::TensorMask: how a sparsifier keeps one tensor's mask in force.
//
// A mask has one representation: the 1/0 multiplier of the tensor (1 kept, 0 pruned) in the
// tensor's dtype, shaped like it (a layer's weight) or to broadcast along its channel dimension
// (a bias, a norm's γ or β, a position embedding). Keeping the mask in force is then one
// same-dtype multiply per step, which on the CPU costs much less than masked_fill_; which
// entries are pruned is read from the multiplier when asked (pruned()), never stored beside it.
// The masked tensor itself is passed in each time: a layer's weight is looked up on the layer,
// which follows a module whose tensor was replaced.

#include <utility>

#include <torch/torch.h>

namespace fasterai {

class TensorMask {
 public:
  // No mask yet: nothing is multiplied.
  bool defined() const { return keep_.defined(); }

  // true where pruned, on the multiplier's device; undefined while there is no mask.
  torch::Tensor pruned() const { return keep_.defined() ? keep_.eq(0) : torch::Tensor(); }

  // The mask of `x` from `pruned` (bool, true = pruned; shaped like x or to broadcast with it):
  // a multiplier in x's dtype on x's device, written into the previous one when it fits (a new
  // 500 MB tensor per recomputation would cost more than computing it).
  void set_pruned(const torch::Tensor& pruned, const torch::Tensor& x) {
    const auto p = pruned.to(x.device());
    if (!keep_.defined() || keep_.sizes() != p.sizes() || keep_.device() != p.device() ||
        keep_.scalar_type() != x.scalar_type())
      keep_ = torch::empty(p.sizes(), x.options().requires_grad(false));
    at::logical_not_out(keep_, p);
  }

  // A buffer that x's multiplier can be written into directly (by the fused magnitude
  // selection): the current one when it is a contiguous float32 CPU tensor of x's shape.
  torch::Tensor multiplier_buffer(const torch::Tensor& x) const {
    const bool fits = keep_.defined() && keep_.device().is_cpu() && keep_.scalar_type() == torch::kFloat32 &&
                      keep_.is_contiguous() && keep_.sizes() == x.sizes();
    return fits ? keep_ : torch::empty(x.sizes(), x.options().requires_grad(false));
  }
  // Takes a multiplier written elsewhere (into multiplier_buffer()).
  void set_multiplier(torch::Tensor keep) { keep_ = std::move(keep); }

  // Multiplies x (the masked tensor, a handle on the module's own) by the mask; nothing while
  // there is none. The multiplier follows a tensor moved to another device.
  void apply(torch::Tensor x) {
    if (!follow_device(x)) return;
    torch::NoGradGuard no_grad;
    x.mul_(keep_);
  }
  // The same for x's gradient, where there is one: pruned entries get no update.
  void mask_gradient(torch::Tensor x) {
    if (!follow_device(x) || !x.grad().defined()) return;
    torch::NoGradGuard no_grad;
    x.mutable_grad().mul_(keep_);
  }

 private:
  bool follow_device(const torch::Tensor& x) {
    if (!keep_.defined()) return false;
    if (keep_.device() != x.device()) keep_ = keep_.to(x.device());
    return true;
  }

  torch::Tensor keep_;
};

}  // namespace fasterai
