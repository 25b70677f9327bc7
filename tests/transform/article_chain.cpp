// The article's compression table on VGG16-BN with 10 classes, reproduced stage by stage:
//
//   original                          134,309,962 parameters
//   Filter/Local/L1 at 40% + Pruner    83,975,344
//   + BNFolder                         83,970,260
//   + FCDecomposer(0.5)                61,430,022
//
// Pruning and folding must not change the outputs. The factorization runs for real: SVDs in
// double of 4096×15092 and 4096×4096 matrices, about 50 s on an idle 2-core machine with
// OpenBLAS (a project dependency; the reference LAPACK that Debian's libtorch falls back to
// without it takes over ten minutes). Tagged [slow] so that "~[slow]" can leave it out.

#include "catch.hpp"

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

#include "transform_testing.hpp"

using namespace fasterai;
using namespace fasterai::testing;

namespace {

using FilterL1 = Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::OneShot>;

struct Chain {
  torch::nn::Sequential original, pruned, folded;
};

// VGG16-BN with trained-looking BatchNorms, sparsified to 40% of filters, pruned and folded;
// checks every stage's count and exactness on the way.
Chain pruned_and_folded() {
  torch::manual_seed(2020);
  Chain c;
  c.original = models::vgg16_bn(10);
  randomize_batch_norms(*c.original);
  CHECK(count_parameters(c.original) == 134'309'962);

  FilterL1(c.original).prune(40.0);  // zeroes filters, biases and the BatchNorms' γ, β in place
  CHECK(count_parameters(c.original) == 134'309'962);  // zeros alone save nothing
  c.original->eval();
  const auto sparsified = snapshot(*c.original);
  const auto x = torch::randn({2, 3, 32, 32});  // the adaptive pool makes 32×32 enough
  torch::Tensor y;
  {
    torch::NoGradGuard no_grad;
    y = c.original->forward(x);
  }

  Pruner pruner;
  c.pruned = pruner.prune(c.original);
  CHECK(count_parameters(c.pruned) == 83'975'344);
  CHECK(pruner.report().layers.size() == 13 + 3);  // the 13 convolutions and the 3 Linears
  CHECK(pruner.report().layers[0].channels_after == 64 - 25);
  CHECK(pruner.report().layers[12].channels_after == 512 - 204);
  BNFolder folder;
  c.folded = folder.fold(c.pruned);
  CHECK(count_parameters(c.folded) == 83'970'260);
  CHECK(folder.report().folded.size() == 13);

  CHECK(unchanged(sparsified, *c.original));
  torch::NoGradGuard no_grad;
  const double pruning_error = relative_error(c.pruned->forward(x), y);
  const double folding_error = relative_error(c.folded->forward(x), y);
  INFO("pruning error " << pruning_error << ", pruning + folding error " << folding_error);
  CHECK(pruning_error <= 1e-5);
  CHECK(folding_error <= 1e-5);
  return c;
}

}  // namespace

TEST_CASE("article chain on VGG16-BN: sparsify, prune, fold, factorize", "[article][slow]") {
  Chain c = pruned_and_folded();

  FCDecomposer decomposer;
  const auto plan = decomposer.preview(c.folded, 0.5);
  REQUIRE(plan.layers.size() == 3);
  CHECK(plan.layers[0].name == "classifier.0");
  CHECK(plan.layers[0].in_features == 308 * 49);
  CHECK(plan.layers[0].rank == 2048);
  CHECK(plan.layers[1].rank == 2048);
  CHECK(plan.layers[2].rank == 5);
  CHECK(count_parameters(c.folded) - plan.parameters_saved() == 61'430'022);

  auto factorized = decomposer.decompose(c.folded, 0.5);
  CHECK(count_parameters(factorized) == 61'430'022);
  CHECK(decomposer.report().factorized() == 3);
  const auto p = factorized->named_parameters();
  CHECK(p["classifier.0.0.weight"].sizes() == std::vector<std::int64_t>{2048, 308 * 49});
  CHECK(p["classifier.0.1.weight"].sizes() == std::vector<std::int64_t>{4096, 2048});
  CHECK(p["classifier.3.1.bias"].sizes() == std::vector<std::int64_t>{4096});
  CHECK(p["classifier.6.0.weight"].sizes() == std::vector<std::int64_t>{5, 4096});
  CHECK(p["classifier.6.1.weight"].sizes() == std::vector<std::int64_t>{10, 5});
  factorized->eval();
  torch::NoGradGuard no_grad;
  CHECK(factorized->forward(torch::randn({1, 3, 32, 32})).sizes() == std::vector<std::int64_t>{1, 10});
}
