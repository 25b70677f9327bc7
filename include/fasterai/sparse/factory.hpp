#pragma once
// Runtime factory: strings ("filter", "global", "l1", "gradual") -> the matching compile-time
// `Sparsifier<...>`, behind `SparsifierInterface`. For harnesses and recipes that read their
// configuration from a command line or a file; code that knows its configuration at compile
// time should name the type directly.
//
//   auto sp = fasterai::make_sparsifier(model, {"filter", "local", "l1", "cos"},
//                                       fasterai::SparsifierOptions(40));

#include <charconv>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/sparse/sparsifier.hpp>

namespace fasterai {

struct SparsifierSpec {
  std::string granularity = "filter";  // weight | vector | kernel | filter | 2:4
  std::string method = "local";        // local | global
  std::string criteria = "l1";         // l1 | taylor | movement | random | l2 | lamp | fpgm |
                                       // second_order_taylor | bn_scale (filter only)
  std::string schedule = "one_shot";   // one_shot | linear | cos | gradual | iterative:<n> |
                                       // constant | dsd | one_cycle
};

namespace schedule {

// A schedule chosen at run time (what the factory instantiates with).
struct Runtime {
  std::string label;
  std::function<double(double)> fraction;
  bool keeps_masks = false;
  std::string_view name() const { return label; }
  double operator()(double p) const { return fraction(p); }
};

}  // namespace schedule

namespace detail {

template <class T>
struct type_tag {
  using type = T;
};

inline constexpr auto valid_granularities = "one of weight, vector, kernel, filter, 2:4";
inline constexpr auto valid_methods = "one of local, global";
inline constexpr auto valid_criteria =
    "one of l1, taylor, movement, random, l2, lamp, fpgm, second_order_taylor, bn_scale";
inline constexpr auto valid_schedules =
    "one of one_shot, linear, cos, gradual, iterative:<steps>, constant, dsd, one_cycle";

inline schedule::Runtime runtime_schedule(const std::string& name) {
  constexpr auto where = "fasterai::make_sparsifier";
  if (name == "one_shot") return {"OneShot", schedule::OneShot{}};
  if (name == "linear") return {"Linear", schedule::Linear{}};
  if (name == "cos") return {"Cos", schedule::Cos{}};
  if (name == "gradual") return {"Gradual", schedule::Gradual{}};
  if (name == "constant") return {"Constant", schedule::Constant{}, true};
  if (name == "dsd") return {"DSD", schedule::DSD{}};
  if (name == "one_cycle") return {"OneCycle", schedule::OneCycle{}};
  if (name.starts_with("iterative:")) {
    int steps = 0;
    const auto digits = std::string_view(name).substr(10);
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), steps);
    check_argument(ec == std::errc{} && end == digits.data() + digits.size() && steps >= 1, where,
                   "schedule", name, "iterative:<steps> with steps an integer >= 1");
    return {"Iterative" + std::to_string(steps), schedule::Iterative{steps}};
  }
  throw_argument_error(where, "schedule", name, valid_schedules);
}

template <class F>
auto with_granularity(const std::string& name, F&& f) {
  if (name == "weight") return f(type_tag<granularity::Weight>{});
  if (name == "vector") return f(type_tag<granularity::Vector>{});
  if (name == "kernel") return f(type_tag<granularity::Kernel>{});
  if (name == "filter") return f(type_tag<granularity::Filter>{});
  if (name == "2:4") return f(type_tag<granularity::NM<2, 4>>{});
  throw_argument_error("fasterai::make_sparsifier", "granularity", name, valid_granularities);
}

template <class F>
auto with_method(const std::string& name, F&& f) {
  if (name == "local") return f(type_tag<method::Local>{});
  if (name == "global") return f(type_tag<method::Global>{});
  throw_argument_error("fasterai::make_sparsifier", "method", name, valid_methods);
}

// The criteria that score whole groups (L2, LAMP) are instantiated with the granularity G
// chosen at run time, as the sparsifier's own.
template <class G, class F>
auto with_criteria(const std::string& name, F&& f) {
  if (name == "l1") return f(type_tag<criteria::L1>{});
  if (name == "taylor") return f(type_tag<criteria::Taylor>{});
  if (name == "movement") return f(type_tag<criteria::Movement>{});
  if (name == "random") return f(type_tag<criteria::Random>{});
  if (name == "l2") return f(type_tag<criteria::L2<G>>{});
  if (name == "lamp") return f(type_tag<criteria::LAMP<G>>{});
  if (name == "fpgm") return f(type_tag<criteria::FPGM>{});
  if (name == "second_order_taylor") return f(type_tag<criteria::SecondOrderTaylor>{});
  if (name == "bn_scale") return f(type_tag<criteria::BNScale>{});
  throw_argument_error("fasterai::make_sparsifier", "criteria", name, valid_criteria);
}

}  // namespace detail

template <sequential_like Model>
std::unique_ptr<SparsifierInterface> make_sparsifier(const Model& model, const SparsifierSpec& spec,
                                                     SparsifierOptions options = {}) {
  // Every name is checked before anything is built.
  auto sched = detail::runtime_schedule(spec.schedule);
  using Result = std::unique_ptr<SparsifierInterface>;
  return detail::with_granularity(spec.granularity, [&](auto g) -> Result {
    return detail::with_method(spec.method, [&](auto m) -> Result {
      using G = typename decltype(g)::type;
      return detail::with_criteria<G>(spec.criteria, [&](auto c) -> Result {
        using C = typename decltype(c)::type;
        if constexpr (detail::scores_norms<C>() && !G::whole_channel) {
          detail::throw_argument_error("fasterai::make_sparsifier", "criteria", spec.criteria,
                                       detail::concat("a criterion defined for granularity ", spec.granularity,
                                                      " (bn_scale scores whole channels: granularity filter)"));
        } else {
          using S = Sparsifier<G, typename decltype(m)::type, C, schedule::Runtime>;
          return std::make_unique<S>(model, options, sched);
        }
      });
    });
  });
}

}  // namespace fasterai
