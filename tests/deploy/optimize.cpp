#include <fasterai/deploy/optimize.hpp>
#include <fasterai/deploy/cost_model.hpp>

#include "catch.hpp"
#include "deploy_testing.hpp"
#include <torch/script.h>

#include <sstream>

#include <fasterai/core/latency.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/core/libtorch_version.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

#include "python_oracle.hpp"

using namespace fasterai;

namespace {

using fasterai::testing::relative_difference;
using fasterai::testing::trained_looking;

struct SmallResidualImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{torch::nn::Conv2dOptions(3, 6, 3).padding(1).bias(false)};
  torch::nn::BatchNorm2d bn1{6};
  torch::nn::Conv2d conv2{torch::nn::Conv2dOptions(6, 6, 3).padding(1)};
  torch::nn::Dropout dropout{0.5};
  torch::nn::Linear fc{6, 3};
  SmallResidualImpl() {
    register_module("conv1", conv1);
    register_module("bn1", bn1);
    register_module("conv2", conv2);
    register_module("dropout", dropout);
    register_module("fc", fc);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn1(conv1(x)));
    x = torch::relu(x + conv2(x));
    return fc(dropout(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1)));
  }
};
TORCH_MODULE(SmallResidual);

// The same network as a torch::nn::Cloneable: optimize_for_inference can copy it for the eager
// path.
struct CloneableResidualImpl : torch::nn::Cloneable<CloneableResidualImpl> {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  torch::nn::Linear fc{nullptr};
  CloneableResidualImpl() { reset(); }
  void reset() override {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 6, 3).padding(1).bias(false)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(6));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(6, 6, 3).padding(1)));
    fc = register_module("fc", torch::nn::Linear(6, 3));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn1(conv1(x)));
    x = torch::relu(x + conv2(x));
    return fc(torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1));
  }
};
TORCH_MODULE(CloneableResidual);

using CollectWarnings = libtorch::WarningCollector;


}  // namespace

TEST_CASE("optimize_for_inference: every step keeps the eval-mode outputs", "[optimize]") {
  torch::manual_seed(4);
  auto model = models::compact_vgg();
  trained_looking(*model);
  model->eval();
  const auto x = torch::randn({1, 1, 28, 28});
  torch::NoGradGuard no_grad;
  const torch::Tensor expected = model->forward(x);
  const std::vector<std::pair<std::string, OptimizeOptions>> configurations = {
      {"export only", OptimizeOptions().fold_batch_norm(false).freeze(false).optimize(false)},
      {"folded", OptimizeOptions().freeze(false).optimize(false)},
      {"folded + frozen", OptimizeOptions().optimize(false)},
      {"all steps", OptimizeOptions()},
      {"frozen + optimized, not folded", OptimizeOptions().fold_batch_norm(false)},
  };
  for (const auto& [name, options] : configurations) {
    INFO(name);
    InferenceModel fast = optimize_for_inference(model, x, options);
    CHECK(fast->report().frozen == (options.freeze() || options.optimize()));
    CHECK(fast->report().optimized == options.optimize());
    CHECK(fast->report().batch_norms_folded == (options.fold_batch_norm() ? 5u : 0u));
    // Folding and oneDNN change the order of summation: equal up to float rounding.
    CHECK(relative_difference(fast(x), expected) < 1e-5);
    const auto other = torch::randn({1, 1, 28, 28});
    CHECK(relative_difference(fast(other), model->forward(other)) < 1e-5);
  }
}

TEST_CASE("optimize_for_inference: a user's module in training mode is optimized in eval mode "
          "and left as it was", "[optimize][bad_input]") {
  torch::manual_seed(5);
  auto model = SmallResidual();
  trained_looking(*model);
  model->train();
  std::vector<torch::Tensor> before;
  for (const auto& t : model->parameters()) before.push_back(t.clone());
  for (const auto& t : model->buffers()) before.push_back(t.clone());
  const auto x = torch::randn({1, 3, 8, 8});

  CollectWarnings warnings;
  InferenceModel fast = [&] {
    libtorch::WarningHandlerGuard guard(&warnings);
    return optimize_for_inference(model, x);
  }();
  REQUIRE(warnings.messages.size() == 1);
  CHECK(warnings.messages[0].find("training mode") != std::string::npos);
  CHECK(fast->report().was_training);
  CHECK(model->is_training());
  CHECK(model->bn1->is_training());
  std::size_t i = 0;
  for (const auto& t : model->parameters()) CHECK(torch::equal(t, before[i++]));
  for (const auto& t : model->buffers()) CHECK(torch::equal(t, before[i++]));

  torch::NoGradGuard no_grad;
  torch::Tensor expected;
  {
    fasterai::detail::EvalModeGuard eval(*model);
    expected = model->forward(x);
  }
  CHECK(relative_difference(fast(x), expected) < 1e-5);
  // The optimized copy owns its weights: changing the model afterwards does not reach it.
  model->fc->weight.mul_(2);
  CHECK(relative_difference(fast(x), expected) < 1e-5);
}

TEST_CASE("optimize_for_inference: the result runs with gradients on and gives inference tensors",
          "[optimize]") {
  // No NoGradGuard, an input that requires grad: the optimized model runs its oneDNN graph
  // under c10::InferenceMode (on a LibTorch with Vulkan kernels, aten::max_pool2d on oneDNN
  // tensors asserts in autograd dispatch otherwise; see core/libtorch_version.hpp).
  torch::manual_seed(8);
  auto model = models::compact_vgg();
  trained_looking(*model);
  model->eval();
  const auto x = torch::randn({1, 1, 28, 28});
  InferenceModel fast = optimize_for_inference(model, x);
  REQUIRE(torch::GradMode::is_enabled());
  const auto input = torch::randn({1, 1, 28, 28}).requires_grad_();
  torch::Tensor y;
  for (int i = 0; i < 3; ++i) y = fast(input);  // the third run uses the plan built by the second
  CHECK(y.is_inference());
  CHECK(!y.requires_grad());
  CHECK(!c10::InferenceMode::is_enabled());
  torch::NoGradGuard no_grad;
  CHECK(relative_difference(y, model->forward(input)) < 1e-5);
  CHECK(relative_difference(y.clone().mul_(2), 2 * y) == 0);  // a clone is an ordinary tensor
}

TEST_CASE("optimize_for_inference: the result saves, loads, and runs in the latency harness",
          "[optimize]") {
  torch::manual_seed(6);
  auto model = models::compact_vgg();
  model->eval();
  const auto x = torch::randn({1, 1, 28, 28});
  InferenceModel fast = optimize_for_inference(model, x);
  deploy_test::TempDir dir("fasterai_optimize");
  fast->save(dir / "fast.pt");
  torch::jit::Module loaded = torch::jit::load((dir / "fast.pt").string());
  torch::NoGradGuard no_grad;
  CHECK(relative_difference(loaded.forward({x}).toTensor(), model->forward(x)) < 1e-5);
  const auto latency = measure_latency(fast, x, LatencyOptions().warmup(2).runs(5));
  CHECK(latency.runs == 5);
  CHECK(latency.median_ms > 0);
}

TEST_CASE("cost_model: MACs as count_macs, bytes of weights and activations", "[cost_model]") {
  torch::manual_seed(7);
  SECTION("VGG11-BN at 64x64: the MACs equal count_macs, layer by layer") {
    auto model = models::vgg11_bn(10);
    const CostReport cost = cost_model(model, torch::zeros({1, 3, 64, 64}));
    const MacReport macs = count_macs(model, {3, 64, 64});
    std::vector<std::pair<std::string, std::int64_t>> from_cost, from_count;
    for (const auto& l : cost.layers)
      if (l.macs > 0) from_cost.emplace_back(l.name, l.macs);
    for (const auto& l : macs.layers) from_count.emplace_back(l.name, l.macs);
    CHECK(from_cost == from_count);
    CHECK(cost.macs() == macs.total());
    // Every parameter and buffer is read once (num_batches_tracked is not read in eval mode).
    std::int64_t state_bytes = 0;
    for (const auto& p : model->named_parameters()) state_bytes += p.value().numel() * 4;
    for (const auto& b : model->named_buffers())
      if (b.key().find("num_batches_tracked") == std::string::npos) state_bytes += b.value().numel() * 4;
    CHECK(cost.weight_bytes() == state_bytes);
    CHECK(model->is_training());  // mode restored
  }
  SECTION("a hand-counted network: conv, BN, ReLU, flatten, linear, and a residual add") {
    auto model = SmallResidual();
    model->eval();
    const CostReport cost = cost_model(model, torch::zeros({1, 3, 8, 8}));
    std::vector<std::string> ops;
    for (const auto& l : cost.layers) ops.push_back(l.op + " " + l.name);
    INFO(cost);
    const std::vector<std::string> expected_ops = {
        "aten::_convolution conv1", "aten::batch_norm bn1",
        "aten::relu bn1 > relu",    "aten::_convolution conv2",
        "aten::add conv2 > add",    "aten::relu conv2 > relu",
        "aten::adaptive_avg_pool2d conv2 > adaptive_avg_pool2d", "aten::addmm fc"};  // LibTorch runs a 2-D Linear as t + addmm
    CHECK(ops == expected_ops);
    REQUIRE(cost.layers.size() == expected_ops.size());
    const std::int64_t act = 6 * 8 * 8 * 4;  // one 6x8x8 float activation, bytes
    // conv1: 6·8·8 outputs × 3·3·3 MACs; reads the input (3x8x8), writes act; weight 6·3·3·3.
    CHECK(cost.layers[0].macs == 6 * 8 * 8 * 27);
    CHECK(cost.layers[0].weight_bytes == 6 * 27 * 4);
    CHECK(cost.layers[0].activation_bytes == 3 * 8 * 8 * 4 + act);
    // batch_norm: reads γ, β, μ, σ² (4·6 floats); reads and writes act.
    CHECK(cost.layers[1].macs == 0);
    CHECK(cost.layers[1].weight_bytes == 4 * 6 * 4);
    CHECK(cost.layers[1].activation_bytes == 2 * act);
    CHECK(cost.layers[3].macs == 6 * 8 * 8 * 54);
    CHECK(cost.layers[3].weight_bytes == (6 * 54 + 6) * 4);
    CHECK(cost.layers[4].activation_bytes == 3 * act);  // two operands, one result
    CHECK(cost.layers[6].activation_bytes == act + 6 * 4);
    CHECK(cost.layers[7].macs == 3 * 6);
    CHECK(cost.layers[7].weight_bytes == (3 * 6 + 3) * 4);
  }
}

TEST_CASE("cost_model: roofline estimate from measured peak rates", "[cost_model]") {
  const PeakRates peak = measure_peak_rates(CalibrationOptions().gemm_size(256).copy_bytes(8 << 20).runs(3));
  CHECK(peak.macs_per_second > 1e8);  // any machine this runs on does 0.1 GMAC/s
  CHECK(peak.bytes_per_second > 1e8);
  CHECK(peak.seconds_per_op > 0);
  CHECK(peak.seconds_per_op < 1e-3);
  CostReport report;
  report.layers.push_back({"a", "aten::linear", 1000, 400, 100});
  report.layers.push_back({"b", "aten::relu", 0, 0, 800});
  const PeakRates fixed{1e9, 1e8, 1e-6, 1};
  // a: max(1000 MACs / 1e9, 500 B / 1e8) = 5 µs, + 1 µs; b: 800 B / 1e8 = 8 µs, + 1 µs.
  CHECK(CostReport::estimate_ms(report.layers[0], fixed) == Approx(0.006));
  CHECK(report.estimate_ms(fixed) == Approx(0.015));
  CHECK_THROWS_WITH(measure_peak_rates(CalibrationOptions().threads(0)),
                    Catch::Contains("fasterai::measure_peak_rates") && Catch::Contains("threads"));
}

namespace {

// compact_vgg with half of every conv's filters removed (odd widths, as in the walkthrough) and
// its BatchNorms folded: the kind of model on which step 5 was measured slower than eager.
torch::nn::Sequential pruned_compact_vgg() {
  auto model = models::compact_vgg();
  trained_looking(*model);
  model->eval();
  Sparsifier<granularity::Filter, method::Local, criteria::L1>(model).prune(50);
  auto pruned = Pruner().prune(model);
  return BNFolder().fold(pruned);
}

}  // namespace

TEST_CASE("optimize_for_inference: by default it times both paths and keeps the faster, "
          "with the eager outputs", "[optimize][choice]") {
  torch::manual_seed(11);
  auto model = pruned_compact_vgg();
  const auto x = torch::randn({1, 1, 28, 28});
  InferenceModel fast = optimize_for_inference(model, x, OptimizeOptions().rounds(3).runs(2));
  const OptimizeReport& r = fast->report();
  INFO(r);
  CHECK(r.measured);
  CHECK(r.alternative == InferencePath::eager);  // a Sequential is copied for the eager path
  CHECK(r.optimized_ms > 0);
  CHECK(r.alternative_ms > 0);
  CHECK(r.threads == torch::get_num_threads());
  // The decision follows the ratio it reports (a tie keeps the optimized module).
  CHECK(r.ratio > 0);
  CHECK(r.path == (r.ratio < 1 ? InferencePath::eager : InferencePath::optimized));
  CHECK(fast->path() == r.path);
  torch::NoGradGuard no_grad;
  const auto other = torch::randn({1, 1, 28, 28});
  CHECK(relative_difference(fast(x), model->forward(x)) < 1e-5);
  CHECK(relative_difference(fast(other), model->forward(other)) < 1e-5);
  // Both candidates compute the model, whichever won.
  CHECK(relative_difference(fast->run(InferencePath::optimized, other), model->forward(other)) < 1e-5);
  std::ostringstream text;
  text << r;
  CHECK(text.str().find("measured: optimized ") != std::string::npos);
}

TEST_CASE("optimize_for_inference: choose_by_measurement(false) forces either path",
          "[optimize][choice]") {
  torch::manual_seed(12);
  auto model = pruned_compact_vgg();
  const auto x = torch::randn({1, 1, 28, 28});
  const auto other = torch::randn({1, 1, 28, 28});
  torch::NoGradGuard no_grad;
  SECTION("eager: the copy's own forward, bit for bit, independent of the model afterwards") {
    InferenceModel fast =
        optimize_for_inference(model, x, OptimizeOptions().choose_by_measurement(false).path(InferencePath::eager));
    CHECK(fast->path() == InferencePath::eager);
    CHECK(!fast->report().measured);
    CHECK(fast->report().optimized_ms == 0);
    CHECK(fast->report().alternative_ms == 0);
    CHECK(fast->report().ratio == 0);
    const torch::Tensor expected = model->forward(other);
    // The same kernels on the same shapes as the model (the model has no BatchNorm left to
    // fold): equal exactly, which the oneDNN graph of the optimized path is not bound to be.
    CHECK(torch::equal(fast(other), expected));
    CHECK(fast(other).is_inference());
    model->parameters()[0].mul_(2);
    CHECK(torch::equal(fast(other), expected));
  }
  SECTION("optimized: the TorchScript module, unmeasured") {
    InferenceModel fast = optimize_for_inference(
        model, x, OptimizeOptions().choose_by_measurement(false).path(InferencePath::optimized));
    CHECK(fast->path() == InferencePath::optimized);
    CHECK(!fast->report().measured);
    CHECK(fast->report().optimized);
    CHECK(relative_difference(fast(other), model->forward(other)) < 1e-5);
    // No eager copy is kept: asking for that path is an error, not a crash.
    CHECK_THROWS_WITH(fast->run(InferencePath::eager, other),
                      Catch::Contains("fasterai::InferenceModel::run") && Catch::Contains("no eager copy"));
  }
}

TEST_CASE("optimize_for_inference: a Cloneable module is copied for the eager path, any other "
          "module is measured against the frozen module", "[optimize][choice]") {
  torch::manual_seed(13);
  const auto x = torch::randn({2, 3, 8, 8});
  torch::NoGradGuard no_grad;
  SECTION("Cloneable") {
    auto model = CloneableResidual();
    trained_looking(*model);
    model->eval();
    InferenceModel measured = optimize_for_inference(model, x, OptimizeOptions().rounds(2).runs(2));
    CHECK(measured->report().alternative == InferencePath::eager);
    CHECK(relative_difference(measured(x), model->forward(x)) < 1e-5);
    InferenceModel eager =
        optimize_for_inference(model, x, OptimizeOptions().choose_by_measurement(false).path(InferencePath::eager));
    const torch::Tensor expected = model->forward(x);
    CHECK(torch::equal(eager(x), expected));  // the copy, unfolded: the model's own kernels
    model->fc->weight.mul_(2);
    CHECK(torch::equal(eager(x), expected));
  }
  SECTION("not Cloneable") {
    auto model = SmallResidual();
    trained_looking(*model);
    model->eval();
    InferenceModel measured = optimize_for_inference(model, x, OptimizeOptions().rounds(2).runs(2));
    const OptimizeReport& r = measured->report();
    CHECK(r.measured);
    CHECK(r.alternative == InferencePath::frozen);
    CHECK(r.path == (r.ratio < 1 ? InferencePath::frozen : InferencePath::optimized));
    CHECK(relative_difference(measured(x), model->forward(x)) < 1e-5);
    CHECK(relative_difference(measured->run(InferencePath::frozen, x), model->forward(x)) < 1e-5);
    // Without step 5 the optimized module is the frozen one: nothing to compare.
    InferenceModel frozen = optimize_for_inference(model, x, OptimizeOptions().optimize(false));
    CHECK(!frozen->report().measured);
    CHECK(frozen->path() == InferencePath::optimized);
  }
}

TEST_CASE("optimize_for_inference: bad choice options are refused before anything is done",
          "[optimize][choice][bad_input]") {
  torch::manual_seed(14);
  auto model = SmallResidual();
  model->train();
  const auto x = torch::randn({1, 3, 8, 8});
  std::vector<torch::Tensor> before;
  for (const auto& t : model->parameters()) before.push_back(t.clone());
  const auto fails = [&](const OptimizeOptions& options, const std::string& argument, const std::string& allowed) {
    CollectWarnings warnings;
    libtorch::WarningHandlerGuard guard(&warnings);
    CHECK_THROWS_WITH(optimize_for_inference(model, x, options),
                      Catch::Contains("fasterai::optimize_for_inference") && Catch::Contains(argument) &&
                          Catch::Contains(allowed));
    CHECK(warnings.messages.empty());  // refused before the training-mode warning
  };
  fails(OptimizeOptions().rounds(0), "rounds", "a count >= 1");
  fails(OptimizeOptions().runs(-1), "runs", "a count >= 1");
  fails(OptimizeOptions().path(InferencePath::eager), "path", "choose_by_measurement");
  fails(OptimizeOptions().choose_by_measurement(false).path(InferencePath::frozen), "path", "optimize(false)");
  // SmallResidual is not a torch::nn::Cloneable: no eager copy can be made.
  fails(OptimizeOptions().choose_by_measurement(false).path(InferencePath::eager), "path", "Cloneable");
  CHECK(model->is_training());
  std::size_t i = 0;
  for (const auto& t : model->parameters()) CHECK(torch::equal(t, before[i++]));
}
