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

}  // namespace fasterai::schedule
