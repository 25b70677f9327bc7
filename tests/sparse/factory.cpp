#include "catch.hpp"

#include <fasterai/core/sequential.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/sparse/factory.hpp>

using namespace fasterai;

TEST_CASE("the factory maps names to the compile-time combinations", "[factory]") {
  auto model = models::compact_vgg();
  const std::vector<std::string> granularities{"weight", "vector", "kernel", "filter", "2:4"};
  for (const auto& g : granularities)
    for (const auto& m : {"local", "global"})
      for (const auto& c : {"l1", "movement", "random"}) {
        auto sp = make_sparsifier(model, {g, m, c, "one_shot"}, SparsifierOptions().exclude({"features.0"}));
        INFO(sp->name());
        CHECK_NOTHROW(sp->prune(g == "2:4" ? 25 : 30));
        CHECK(sp->report().layers.size() == 4);
      }
  auto sp = make_sparsifier(model, {"filter", "local", "l1", "gradual"}, SparsifierOptions(40));
  CHECK(sp->name() == "Filter/Local/L1/Gradual");
  sp->step(0.5);
  CHECK(sp->sparsity() == Approx(40 * 0.875));
  sp->step(1.0);
  CHECK(sp->sparsity() == 40.0);
  CHECK(sp->target_sparsity() == 40.0);

  // The same result as the type named directly.
  auto a = models::compact_vgg(), b = clone_model(a);
  auto from_factory = make_sparsifier(a, {"kernel", "global", "l1", "iterative:4"}, SparsifierOptions(60));
  Sparsifier<granularity::Kernel, method::Global, criteria::L1, schedule::Iterative> direct(
      b, SparsifierOptions(60), schedule::Iterative{4});
  from_factory->step(0.6);
  direct.step(0.6);
  CHECK(from_factory->sparsity() == 30.0);
  CHECK(direct.sparsity() == 30.0);
  for (const auto& name : direct.layer_names())
    CHECK(a->named_parameters()[name + ".weight"].equal(b->named_parameters()[name + ".weight"]));
  CHECK(make_sparsifier(a, {"filter", "local", "l1", "constant"})->name() == "Filter/Local/L1/Constant");
}

TEST_CASE("an unknown name lists the valid ones", "[factory]") {
  auto model = models::compact_vgg();
  CHECK_THROWS_WITH(make_sparsifier(model, {"channel", "local", "l1", "cos"}),
                    Catch::Contains("granularity") && Catch::Contains("channel") &&
                        Catch::Contains("weight, vector, kernel, filter, 2:4"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "layer", "l1", "cos"}),
                    Catch::Contains("method") && Catch::Contains("local, global"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l3", "cos"}),
                    Catch::Contains("criteria") && Catch::Contains("l3") &&
                        Catch::Contains("l1, taylor, movement, random, l2, lamp, fpgm, second_order_taylor, bn_scale"));
  // BNScale scores channels: no other granularity; the names are checked before anything is built.
  CHECK_THROWS_WITH(make_sparsifier(model, {"weight", "global", "bn_scale", "one_shot"}),
                    Catch::Contains("criteria") && Catch::Contains("bn_scale") && Catch::Contains("granularity weight"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "annealing"}),
                    Catch::Contains("schedule") && Catch::Contains("annealing") &&
                        Catch::Contains("gradual"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "iterative:0"}),
                    Catch::Contains("iterative:0") && Catch::Contains(">= 1"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "iterative:x"}),
                    Catch::Contains("iterative:x"));
}

TEST_CASE("the factory's L2, LAMP, FPGM, SecondOrderTaylor and BNScale equal the types named directly",
          "[factory]") {
  // Same model twice: each pair of sparsifiers must leave identical weights.
  auto same_result = [](const SparsifierSpec& spec, auto direct_type, double sparsity, SparsifierOptions options) {
    using Direct = typename decltype(direct_type)::type;
    torch::manual_seed(3);
    auto a = models::compact_vgg();
    auto b = clone_model(a);
    auto from_factory = make_sparsifier(a, spec, options);
    Direct direct(b, options, schedule::Runtime{"OneShot", schedule::OneShot{}});
    if (spec.criteria == "second_order_taylor") {
      // The same gradients in both models.
      auto x = torch::randn({4, 1, 28, 28});
      for (auto* m : {&a, &b}) {
        (*m)->eval();
        (*m)->forward(x).square().sum().backward();
      }
    }
    from_factory->prune(sparsity);
    direct.prune(sparsity);
    INFO(from_factory->name());
    for (const auto& name : direct.layer_names())
      CHECK(a->named_parameters()[name + ".weight"].equal(b->named_parameters()[name + ".weight"]));
    CHECK(from_factory->name() == direct.name());
    // Something was pruned: the comparison is not between two untouched models.
    bool pruned = false;
    for (const auto& name : direct.layer_names())
      pruned |= a->named_parameters()[name + ".weight"].eq(0).any().template item<bool>();
    CHECK(pruned);
  };
  namespace g = granularity;
  namespace c = criteria;
  using S = schedule::Runtime;
  same_result({"weight", "global", "l2", "one_shot"}, fasterai::detail::type_tag<Sparsifier<g::Weight, method::Global, c::L2<g::Weight>, S>>{}, 50,
              SparsifierOptions());
  same_result({"kernel", "global", "lamp", "one_shot"}, fasterai::detail::type_tag<Sparsifier<g::Kernel, method::Global, c::LAMP<g::Kernel>, S>>{}, 50,
              SparsifierOptions());
  same_result({"filter", "local", "fpgm", "one_shot"}, fasterai::detail::type_tag<Sparsifier<g::Filter, method::Local, c::FPGM, S>>{}, 30,
              SparsifierOptions());
  same_result({"filter", "global", "bn_scale", "one_shot"}, fasterai::detail::type_tag<Sparsifier<g::Filter, method::Global, c::BNScale, S>>{}, 30,
              SparsifierOptions().normalize(false));
  same_result({"filter", "local", "second_order_taylor", "one_shot"},
              fasterai::detail::type_tag<Sparsifier<g::Filter, method::Local, c::SecondOrderTaylor, S>>{}, 30, SparsifierOptions());
}

TEST_CASE("the factory's dsd and one_cycle schedules", "[factory]") {
  auto model = models::compact_vgg();
  auto dsd = make_sparsifier(model, {"filter", "local", "l1", "dsd"}, SparsifierOptions(40));
  CHECK(dsd->name() == "Filter/Local/L1/DSD");
  dsd->step(0.2);
  CHECK(dsd->sparsity() == 0.0);
  dsd->step(0.5);
  CHECK(dsd->sparsity() == 40.0);
  dsd->step(1.0);
  CHECK(dsd->sparsity() == 0.0);
  auto one_cycle = make_sparsifier(model, {"weight", "global", "l1", "one_cycle"}, SparsifierOptions(80));
  CHECK(one_cycle->name() == "Weight/Global/L1/OneCycle");
  one_cycle->step(0.25);
  CHECK(one_cycle->sparsity() == Approx(80 * schedule::OneCycle{}(0.25)));
  one_cycle->step(1.0);
  CHECK(one_cycle->sparsity() == 80.0);
}
