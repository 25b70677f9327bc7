#pragma once
// Schedule policies: training progress p in [0, 1] -> fraction f(p) in [0, 1] of the way from
// the start sparsity s_i to the target s_f; the sparsity in force is s_i + (s_f - s_i) f(p).
//
//   OneShot       f = 1            everything at once (then fine-tune)
//   Linear        f = p
//   Cos           f = (1 - cos(pi p)) / 2       starts and ends slowly (the run of the
//                                               fasterai article, 2020)
//   Gradual       f = 1 - (1 - p)^3             Zhu & Gupta's automated gradual pruning:
//                                               s(p) = s_f + (s_i - s_f)(1 - p)^3
//   Iterative{n}  f = floor(n p) / n            n equal steps
//   Constant      keeps the current masks       fine-tuning between iterative rounds
//                                               (the fasterai article's annealing_no)
//   DSD{a, b}     f = 1 on [a, b), else 0       dense-sparse-dense (Han et al., ICLR 2017):
//                                               dense training, sparse training in the
//                                               middle, then the pruned weights come back
//                                               (from zero) and the network ends dense
//   OneCycle{α, β} f = (1 + e^(β-α)) / (1 + e^(β-αp))   one-cycle pruning (Hubens et al.
//                                               2021, Python fasterai's sched_onecycle): a
//                                               logistic ramp, slow, then steep, then flat
//
// Any callable double(double) is a schedule too.

#include <cmath>
#include <numbers>
#include <string_view>

#include <fasterai/core/error.hpp>

namespace fasterai::schedule {

struct OneShot {
  static constexpr std::string_view name() { return "OneShot"; }
  double operator()(double) const { return 1.0; }
};

struct Linear {
  static constexpr std::string_view name() { return "Linear"; }
  double operator()(double p) const { return p; }
};

struct Cos {
  static constexpr std::string_view name() { return "Cos"; }
  double operator()(double p) const { return (1.0 - std::cos(std::numbers::pi * p)) / 2.0; }
};

struct Gradual {
  static constexpr std::string_view name() { return "Gradual"; }
  double operator()(double p) const { return 1.0 - (1.0 - p) * (1.0 - p) * (1.0 - p); }
};

struct Iterative {
  int steps = 1;
  static constexpr std::string_view name() { return "Iterative"; }
  double operator()(double p) const {
    fasterai::detail::check_argument(steps >= 1, "fasterai::schedule::Iterative", "steps", steps,
                                     "a count >= 1");
    return std::floor(double(steps) * p) / double(steps);
  }
};

// The sparsifier never recomputes masks under this schedule: those in force (or, for a fresh
// sparsifier, the groups already entirely zero in the model) are kept and re-applied.
struct Constant {
  static constexpr std::string_view name() { return "Constant"; }
  static constexpr bool keeps_masks = true;
  double operator()(double) const { return 1.0; }
};

// Dense-sparse-dense: the target sparsity holds for progress in [sparse_from, dense_from) and
// none outside it. When the sparsity drops back to the start, masks are recomputed at the
// start sparsity (0: nothing masked), so the weights pruned in the sparse phase are free again;
// they restart from zero, as in DSD's re-dense phase.
struct DSD {
  double sparse_from = 1.0 / 3.0;  // progress where the sparse phase begins
  double dense_from = 2.0 / 3.0;   // progress where the network is dense again
  static constexpr std::string_view name() { return "DSD"; }
  double operator()(double p) const {
    fasterai::detail::check_argument(sparse_from >= 0.0 && sparse_from < dense_from,
                                     "fasterai::schedule::DSD", "sparse_from", sparse_from,
                                     "a fraction of training in [0, dense_from)");
    fasterai::detail::check_argument(dense_from <= 1.0, "fasterai::schedule::DSD", "dense_from",
                                     dense_from, "a fraction of training in (sparse_from, 1]");
    return p >= sparse_from && p < dense_from ? 1.0 : 0.0;
  }
};

// One-cycle pruning: a logistic in p scaled so that f(1) = 1 exactly; f(0) = (1 + e^(β-α)) /
// (1 + e^β), 0.0025 with the defaults, so almost nothing goes in the first steps. The steepest
// point is at p = β/α (0.43 with the defaults); α sets how steep it is.
struct OneCycle {
  double alpha = 14.0;
  double beta = 6.0;
  static constexpr std::string_view name() { return "OneCycle"; }
  double operator()(double p) const {
    fasterai::detail::check_argument(alpha > 0.0 && std::isfinite(alpha), "fasterai::schedule::OneCycle",
                                     "alpha", alpha, "a finite steepness > 0");
    fasterai::detail::check_argument(beta >= 0.0 && beta <= alpha, "fasterai::schedule::OneCycle",
                                     "beta", beta, "an offset in [0, alpha] (the steepest point, beta/alpha, "
                                     "inside training)");
    return (1.0 + std::exp(beta - alpha)) / (1.0 + std::exp(beta - alpha * p));
  }
};

}  // namespace fasterai::schedule
