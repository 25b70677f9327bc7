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
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l2", "cos"}),
                    Catch::Contains("criteria") && Catch::Contains("l1, taylor, movement, random"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "annealing"}),
                    Catch::Contains("schedule") && Catch::Contains("annealing") &&
                        Catch::Contains("gradual"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "iterative:0"}),
                    Catch::Contains("iterative:0") && Catch::Contains(">= 1"));
  CHECK_THROWS_WITH(make_sparsifier(model, {"filter", "local", "l1", "iterative:x"}),
                    Catch::Contains("iterative:x"));
}
