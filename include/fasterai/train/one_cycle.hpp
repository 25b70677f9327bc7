#pragma once
// The one-cycle policy (Smith, 2018) as fastai's fit_one_cycle runs it: over the first
// pct_start of training the learning rate rises from max_lr/div_factor to max_lr along a
// half cosine while the momentum falls from max_momentum to base_momentum; over the rest the
// learning rate anneals, again along a cosine, to max_lr/(div_factor·final_div_factor) while the
// momentum climbs back. Warm-up keeps early, large gradients from wrecking a fresh model; the
// long annealing tail is where most of the final accuracy comes from. With Adam the momentum is
// β1.
//
//   fasterai::OneCycle sched(3e-3);                 // pct_start 0.25, 3e-3/25 -> 3e-3 -> 1.2e-8
//   for (std::int64_t i = 0; i < total; ++i) {      // in a hand-written loop
//     const double pct = double(i) / double(total);
//     fasterai::set_learning_rate(optimizer, sched.lr(pct));
//     fasterai::set_momentum(optimizer, sched.momentum(pct));
//     ...
//   }

#include <algorithm>
#include <cmath>
#include <numbers>
#include <tuple>
#include <utility>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai {

struct OneCycleOptions {
  OneCycleOptions() = default;
  TORCH_ARG(double, pct_start) = 0.25;          // fraction of training spent warming up
  TORCH_ARG(double, div_factor) = 25.0;         // start at max_lr / div_factor
  TORCH_ARG(double, final_div_factor) = 1e4;    // end at max_lr / (div_factor · final_div_factor)
  TORCH_ARG(double, max_momentum) = 0.95;       // momentum (Adam β1) at both ends
  TORCH_ARG(double, base_momentum) = 0.85;      // momentum at the peak learning rate
  TORCH_ARG(bool, cycle_momentum) = true;       // false: leave the momentum alone
};

class OneCycle {
 public:
  explicit OneCycle(double max_lr, OneCycleOptions options = {});

  // Learning rate and momentum at training progress `pct` in [0, 1] (clamped).
  double lr(double pct) const;
  double momentum(double pct) const;

  double max_lr() const noexcept { return max_lr_; }
  const OneCycleOptions& options() const noexcept { return options_; }

 private:
  double max_lr_;
  OneCycleOptions options_;
};

// Cosine interpolation from `start` (pct = 0) to `end` (pct = 1): fastai's annealing_cos.
inline double annealing_cos(double start, double end, double pct) {
  return end + (start - end) / 2.0 * (std::cos(std::numbers::pi * pct) + 1.0);
}

// Set the learning rate of every parameter group.
inline void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

// Set the momentum of every parameter group: SGD's and RMSprop's momentum, Adam's and AdamW's
// β1. Returns false (and changes nothing) for an optimizer without one.
inline bool set_momentum(torch::optim::Optimizer& optimizer, double momentum) {
  bool any = false;
  for (auto& group : optimizer.param_groups()) {
    auto& o = group.options();
    if (auto* adam = dynamic_cast<torch::optim::AdamOptions*>(&o)) {
      adam->betas(std::make_tuple(momentum, std::get<1>(adam->betas())));
    } else if (auto* adamw = dynamic_cast<torch::optim::AdamWOptions*>(&o)) {
      adamw->betas(std::make_tuple(momentum, std::get<1>(adamw->betas())));
    } else if (auto* sgd = dynamic_cast<torch::optim::SGDOptions*>(&o)) {
      sgd->momentum(momentum);
    } else if (auto* rms = dynamic_cast<torch::optim::RMSpropOptions*>(&o)) {
      rms->momentum(momentum);
    } else {
      continue;
    }
    any = true;
  }
  return any;
}

inline OneCycle::OneCycle(double max_lr, OneCycleOptions options)
    : max_lr_(max_lr), options_(std::move(options)) {
  constexpr auto where = "fasterai::OneCycle";
  using detail::check_argument;
  check_argument(std::isfinite(max_lr) && max_lr > 0, where, "max_lr", max_lr,
                 "a positive, finite learning rate");
  const auto& o = options_;
  check_argument(o.pct_start() >= 0 && o.pct_start() < 1, where, "pct_start", o.pct_start(),
                 "a fraction in [0, 1)");
  check_argument(std::isfinite(o.div_factor()) && o.div_factor() >= 1, where, "div_factor",
                 o.div_factor(), "a finite factor >= 1");
  check_argument(std::isfinite(o.final_div_factor()) && o.final_div_factor() >= 1, where,
                 "final_div_factor", o.final_div_factor(), "a finite factor >= 1");
  check_argument(o.max_momentum() >= 0 && o.max_momentum() < 1, where, "max_momentum",
                 o.max_momentum(), "a momentum in [0, 1)");
  check_argument(o.base_momentum() >= 0 && o.base_momentum() < 1, where, "base_momentum",
                 o.base_momentum(), "a momentum in [0, 1)");
}

inline double OneCycle::lr(double pct) const {
  pct = std::clamp(pct, 0.0, 1.0);
  const double start = max_lr_ / options_.div_factor();
  const double end = start / options_.final_div_factor();
  const double split = options_.pct_start();
  if (pct < split) return annealing_cos(start, max_lr_, pct / split);
  return annealing_cos(max_lr_, end, (pct - split) / (1.0 - split));
}

inline double OneCycle::momentum(double pct) const {
  pct = std::clamp(pct, 0.0, 1.0);
  const double hi = options_.max_momentum(), lo = options_.base_momentum();
  const double split = options_.pct_start();
  if (pct < split) return annealing_cos(hi, lo, pct / split);
  return annealing_cos(lo, hi, (pct - split) / (1.0 - split));
}

}  // namespace fasterai
