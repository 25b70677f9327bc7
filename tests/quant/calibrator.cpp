// Model-level quantization (quant/quantize_dynamic.hpp, quant/calibrator.hpp): structure of
// the result, agreement with fp32, deterministic calibration, bad inputs that change nothing,
// and save/load of the packed weights.
#include "catch.hpp"

#include <cstdio>
#include <string>
#include <vector>

#include <fasterai/core/statistics.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>

#include "../transform/transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

template <class M>
concept dynamically_quantizable = requires(const M& m) { fasterai::quantize_dynamic(m); };
static_assert(dynamically_quantizable<nn::Sequential>);
static_assert(!dynamically_quantizable<nn::Linear>);  // a bare Linear holder cannot be swapped

namespace {

nn::Sequential trained_looking_compact_vgg(std::uint64_t seed) {
  torch::manual_seed(seed);
  auto model = models::compact_vgg();
  randomize_batch_norms(*model);
  model->eval();
  return model;
}

std::vector<torch::Tensor> batches(std::uint64_t seed, int count, std::int64_t size = 16) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < count; ++i) out.push_back(torch::randn({size, 1, 28, 28}));
  return out;
}

torch::Tensor run(nn::Sequential& m, const torch::Tensor& x) {
  c10::InferenceMode inference;
  return m->forward(x);
}

template <class Impl>
int count_of(const nn::Module& m) {
  int n = 0;
  for (const auto& c : m.modules(false))
    if (c->as<Impl>() != nullptr) ++n;
  return n;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const argument_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("quantize_dynamic: every Linear to int8, the rest copied, the input untouched",
          "[quant][dynamic]") {
  auto model = trained_looking_compact_vgg(5);
  const auto before = snapshot(*model);
  auto q = quantize_dynamic(model);
  CHECK(unchanged(before, *model));
  CHECK_FALSE(q->is_training());
  CHECK(count_of<quant::QuantizedLinearImpl>(*q) == 2);
  CHECK(count_of<nn::LinearImpl>(*q) == 0);
  CHECK(count_of<nn::Conv2dImpl>(*q) == count_of<nn::Conv2dImpl>(*model));
  // Same names as the model (the int8 layers keep theirs).
  std::vector<std::string> names_q, names_m;
  for (const auto& c : q->named_modules("", false)) names_q.push_back(c.key());
  for (const auto& c : model->named_modules("", false)) names_m.push_back(c.key());
  CHECK(names_q == names_m);
  const auto x = batches(6, 1).front();
  const auto y = run(q, x), reference = run(model, x);
  CHECK(relative_error(y, reference) < 0.02);
  CHECK(relative_error(y, reference) > 0);
  // Only chosen layers.
  auto one = quantize_dynamic(model, DynamicQuantOptions().layers({"classifier.3"}));
  CHECK(count_of<quant::QuantizedLinearImpl>(*one) == 1);
  CHECK(one->named_modules()["classifier.0"]->as<nn::LinearImpl>() != nullptr);
  // Linear weights shrink 4× (int8 plus one double scale per row).
  CHECK(model_size_bytes(q) < model_size_bytes(model));
}

TEST_CASE("quantize_dynamic: a Sequential member of a user's module is swapped by its holder",
          "[quant][dynamic]") {
  struct Net : nn::Module {
    nn::Conv2d conv{nullptr};
    nn::Sequential head{nullptr};
    Net() {
      conv = register_module("conv", nn::Conv2d(nn::Conv2dOptions(1, 4, 3)));
      head = register_module("head", nn::Sequential(nn::Flatten(), nn::Linear(4 * 26 * 26, 10)));
    }
    torch::Tensor forward(const torch::Tensor& x) { return head->forward(torch::relu(conv->forward(x))); }
  };
  torch::manual_seed(7);
  auto net = std::make_shared<Net>();
  const auto x = torch::randn({2, 1, 28, 28});
  torch::Tensor reference;
  {
    torch::NoGradGuard no_grad;
    reference = net->forward(x);
  }
  net->head = net->replace_module("head", quantize_dynamic(net->head));
  CHECK(count_of<quant::QuantizedLinearImpl>(*net) == 1);
  torch::NoGradGuard no_grad;
  CHECK(relative_error(net->forward(x), reference) < 0.02);
}

TEST_CASE("quantize_dynamic refuses bad input, naming it, and leaves the model as it was",
          "[quant][dynamic][errors]") {
  auto model = trained_looking_compact_vgg(8);
  const auto before = snapshot(*model);
  CHECK(error_of([&] { quantize_dynamic(model, DynamicQuantOptions().layers({"features.0"})); })
            .find("'features.0' (a Conv2d)") != std::string::npos);
  CHECK(error_of([&] { quantize_dynamic(model, DynamicQuantOptions().layers({"head"})); })
            .find("'head'") != std::string::npos);
  CHECK(error_of([&] { quantize_dynamic(model, DynamicQuantOptions().engine("tpu")); })
            .find("quantized engine built into this LibTorch") != std::string::npos);
  nn::Sequential convs(nn::Conv2d(1, 2, 3));
  CHECK(error_of([&] { quantize_dynamic(convs); }).find("without Linear") != std::string::npos);
  {
    torch::NoGradGuard no_grad;
    model->named_modules()["classifier.3"]->as<nn::LinearImpl>()->weight[0][0] = INFINITY;
  }
  const auto diverged = snapshot(*model);
  CHECK(error_of([&] { quantize_dynamic(model); }).find("non-finite") != std::string::npos);
  CHECK(unchanged(diverged, *model));
  CHECK_FALSE(unchanged(before, *model));  // the snapshot does see a change
}

TEST_CASE("Calibrator: BN folded, ReLU fused, one quantize at the entry, one dequantize at the exit",
          "[quant][static]") {
  auto model = trained_looking_compact_vgg(9);
  const auto before = snapshot(*model);
  Calibrator calibrator(model);
  CHECK(calibrator.fold_report().folded.size() == 5);
  calibrator.observe(batches(10, 4));
  CHECK(calibrator.batches_observed() == 4);
  auto q = calibrator.convert();
  CHECK(unchanged(before, *model));
  CHECK(count_of<quant::QuantizedConv2dImpl>(*q) == 5);
  CHECK(count_of<quant::QuantizedLinearImpl>(*q) == 2);
  CHECK(count_of<nn::BatchNorm2dImpl>(*q) == 0);
  CHECK(count_of<nn::ReLUImpl>(*q) == 0);  // all fused
  int entries = 0, exits = 0;
  for (const auto& m : q->modules(false)) {
    const quant::QuantizedLayerOptions* o = nullptr;
    if (auto* c = m->as<quant::QuantizedConv2dImpl>()) o = &c->layer_options();
    if (auto* l = m->as<quant::QuantizedLinearImpl>()) o = &l->layer_options();
    if (o == nullptr) continue;
    CHECK(o->relu() == (m->as<quant::QuantizedLinearImpl>() == nullptr ||
                        o->dequantize_output() == false));  // every layer but the logits has a ReLU
    entries += o->input().has_value();
    exits += o->dequantize_output();
  }
  CHECK(entries == 1);
  CHECK(exits == 1);
  CHECK(q->named_modules()["features.0"]->as<quant::QuantizedConv2dImpl>()->layer_options().input().has_value());
  CHECK(q->named_modules()["classifier.3"]->as<quant::QuantizedLinearImpl>()->layer_options().dequantize_output());
  const auto x = batches(11, 1).front();
  const auto y = run(q, x), reference = run(model, x);
  CHECK_FALSE(y.is_quantized());
  CHECK(relative_error(y, reference) < 0.1);
  CHECK(model_size_bytes(q) * 3.5 < model_size_bytes(model));
}

TEST_CASE("Calibrator: a layer left in fp32 splits the chain in two", "[quant][static]") {
  auto model = trained_looking_compact_vgg(12);
  Calibrator calibrator(model, StaticQuantOptions().layers({"features.0", "features.4", "classifier.0", "classifier.3"}));
  calibrator.observe(batches(13, 2));
  auto q = calibrator.convert();
  CHECK(count_of<quant::QuantizedConv2dImpl>(*q) == 2);
  CHECK(count_of<quant::QuantizedLinearImpl>(*q) == 2);
  const auto options_of = [&](const std::string& name) {
    auto m = q->named_modules()[name];
    if (auto* c = m->as<quant::QuantizedConv2dImpl>()) return c->layer_options();
    return m->as<quant::QuantizedLinearImpl>()->layer_options();
  };
  // features.0 → (relu, pool) → features.4 is one chain; features.7 stays fp32, so features.4
  // dequantizes and the classifier starts a new chain.
  CHECK(options_of("features.0").input().has_value());
  CHECK_FALSE(options_of("features.0").dequantize_output());
  CHECK_FALSE(options_of("features.4").input().has_value());
  CHECK(options_of("features.4").dequantize_output());
  CHECK(options_of("classifier.0").input().has_value());
  CHECK(options_of("classifier.3").dequantize_output());
  const auto x = batches(14, 1).front();
  CHECK(relative_error(run(q, x), run(model, x)) < 0.1);
}

TEST_CASE("Calibration is deterministic, observers differ as they should", "[quant][static]") {
  auto model = trained_looking_compact_vgg(15);
  const auto data = batches(16, 3);
  const auto x = batches(17, 1).front();
  auto a = quantize_static(model, data), b = quantize_static(model, data);
  CHECK(torch::equal(run(a, x), run(b, x)));
  auto p1 = quantize_static<quant::PercentileObserver>(model, data);
  auto p2 = quantize_static<quant::PercentileObserver>(model, data);
  CHECK(torch::equal(run(p1, x), run(p2, x)));
  CHECK(relative_error(run(p1, x), run(model, x)) < 0.15);
  // Batches as Examples, and as data::Batches, calibrate alike.
  std::vector<torch::data::Example<>> examples;
  for (const auto& t : data) examples.push_back({t, torch::zeros({t.size(0)}, torch::kLong)});
  auto c = quantize_static(model, examples);
  CHECK(torch::equal(run(a, x), run(c, x)));
  Calibrator from_batches(model);
  from_batches.observe(data::Batches(examples), /*max_batches=*/2);
  CHECK(from_batches.batches_observed() == 2);
}

TEST_CASE("Calibrator refuses bad input, naming it, and changes nothing", "[quant][static][errors]") {
  auto model = trained_looking_compact_vgg(18);
  const auto before = snapshot(*model);
  // Uncalibrated.
  Calibrator calibrator(model);
  CHECK(error_of([&] { calibrator.convert(); }).find("at least one calibration batch") != std::string::npos);
  // A layer kind static quantization does not take; a name the model lacks; a missing engine.
  CHECK(error_of([&] { Calibrator c(model, StaticQuantOptions().layers({"features.1"})); })
            .find("'features.1' (a BatchNorm2d)") != std::string::npos);
  CHECK(error_of([&] { Calibrator c(model, StaticQuantOptions().layers({"nope"})); }).find("'nope'") !=
        std::string::npos);
  CHECK(error_of([&] {
          Calibrator c(model, StaticQuantOptions().engines(quant::QuantEngines().conv("tpu")));
        }).find("engines.conv") != std::string::npos);
  // A batch of the wrong shape throws and leaves the calibration as it was.
  calibrator.observe(batches(19, 1));
  auto first = calibrator.convert();
  CHECK_THROWS(calibrator.observe(torch::randn({2, 3, 28, 28})));
  CHECK(error_of([&] { calibrator.observe(torch::randn({5})); }).find("'batch'") != std::string::npos);
  CHECK(calibrator.batches_observed() == 1);
  const auto x = batches(20, 1).front();
  CHECK(torch::equal(run(first, x), run(*std::make_unique<nn::Sequential>(calibrator.convert()), x)));
  // The same with a histogram observer, whose state is a tensor.
  Calibrator<quant::PercentileObserver> histogram(model);
  histogram.observe(batches(19, 1));
  auto before_failure = histogram.convert();
  // Within the observed range (no re-binning), then a shape error at the first convolution.
  CHECK_THROWS(histogram.observe(torch::cat({batches(27, 1).front() * 0.1, torch::zeros({16, 2, 28, 28})}, 1)));
  CHECK(torch::equal(run(before_failure, x), run(*std::make_unique<nn::Sequential>(histogram.convert()), x)));
  // Non-finite activations.
  Calibrator nan_calibrator(model);
  auto bad = batches(21, 1).front();
  bad[0][0][0][0] = INFINITY;
  nan_calibrator.observe(bad);
  CHECK(error_of([&] { nan_calibrator.convert(); }).find("NaN or infinity") != std::string::npos);
  // Convolutions the int8 kernels cannot run.
  nn::Sequential reflect(nn::Conv2d(nn::Conv2dOptions(1, 2, 3).padding(1).padding_mode(torch::kReflect)),
                         nn::Flatten(), nn::Linear(2 * 28 * 28, 3));
  CHECK(error_of([&] { Calibrator c(reflect); }).find("padding_mode") != std::string::npos);
  Calibrator without_it(reflect, StaticQuantOptions().layers({"2"}));  // leave it out: fine
  CHECK(unchanged(before, *model));
}

TEST_CASE("Quantized models save and load: the packed weights round-trip", "[quant][save]") {
  auto model = trained_looking_compact_vgg(22);
  auto q = quantize_static(model, batches(23, 2));
  auto d = quantize_dynamic(model);
  const std::string path_q = "quant_static_roundtrip.pt", path_d = "quant_dynamic_roundtrip.pt";
  torch::save(q, path_q);
  torch::save(d, path_d);
  // Load into models of the same structure made from other weights and other calibration data.
  auto other = trained_looking_compact_vgg(24);
  auto loaded_q = quantize_static(other, batches(25, 1));
  auto loaded_d = quantize_dynamic(other);
  const auto x = batches(26, 1).front();
  REQUIRE_FALSE(torch::equal(run(loaded_q, x), run(q, x)));
  {
    // Packing again happens under each layer's recorded engine, whatever is set globally.
    quant::EngineGuard global(quant::engine_from_name("test", "engine", quant::available_engines().back()));
    torch::load(loaded_q, path_q);
    torch::load(loaded_d, path_d);
  }
  CHECK(torch::equal(run(loaded_q, x), run(q, x)));
  CHECK(torch::equal(run(loaded_d, x), run(d, x)));
  const auto* linear = loaded_q->named_modules()["classifier.0"]->as<quant::QuantizedLinearImpl>();
  CHECK(linear->layer_options().engine() == quant::QuantEngines().linear());
  const auto* conv = loaded_q->named_modules()["features.0"]->as<quant::QuantizedConv2dImpl>();
  CHECK(conv->layer_options().engine() == quant::QuantEngines().conv());
  CHECK(conv->layer_options().input()->scale == q->named_modules()["features.0"]
                                                   ->as<quant::QuantizedConv2dImpl>()
                                                   ->layer_options()
                                                   .input()
                                                   ->scale);
  std::remove(path_q.c_str());
  std::remove(path_d.c_str());
  // clone_model copies int8 layers too.
  auto copy = clone_model(q);
  CHECK(torch::equal(run(copy, x), run(q, x)));
}
