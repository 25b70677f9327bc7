// Observers, weight quantization, engines and the int8 layers (quant/observer.hpp,
// quant/engine.hpp, quant/quantized_layers.hpp): quantize→dequantize error bounds on known
// tensors, and each int8 layer against its fp32 reference within the quantization steps.
#include "catch.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/quant/quantized_layers.hpp>

using namespace fasterai;
using namespace fasterai::quant;

namespace {

torch::Tensor round_trip(const torch::Tensor& x, const QuantParams& p) {
  return torch::quantize_per_tensor(x, p.scale, p.zero_point, torch::kQUInt8).dequantize();
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

// An error bound for y = W·x + b computed from int8 values: each weight is within half its
// channel's step s_w of its value, each input within half the input step s_x, so
// |Δy_j| ≤ Σ_i (|w_ji|·s_x/2 + |x_i|·s_wj/2 + s_x·s_wj/4); the output, if requantized, adds
// half the output step.
torch::Tensor linear_bound(const torch::Tensor& x, const torch::Tensor& w, double s_x,
                           const torch::Tensor& s_w, double s_y) {
  const auto fan_in = static_cast<double>(w.size(1));
  return torch::matmul(torch::full_like(x, s_x / 2), w.abs().t()) +
         torch::matmul(x.abs(), torch::ones_like(w).t()) * s_w.to(torch::kFloat32) / 2 +
         s_x * s_w.to(torch::kFloat32) / 4 * fan_in + s_y / 2;
}

}  // namespace

TEST_CASE("affine_params covers the range with zero exact", "[quant][observer]") {
  const QuantParams p = affine_params(-1.0, 3.0, /*reduce_range=*/false);
  CHECK(p.scale == Approx(4.0 / 255.0));
  CHECK(p.zero_point == 64);  // round(1 / (4/255)) = round(63.75)
  const QuantParams r = affine_params(-1.0, 3.0, /*reduce_range=*/true);
  CHECK(r.scale == Approx(4.0 / 127.0));
  CHECK(r.zero_point == 32);  // round(31.75)
  // Zero is widened in, and represented exactly.
  const QuantParams pos = affine_params(2.0, 5.0, false);
  CHECK(pos.zero_point == 0);
  CHECK(pos.scale == Approx(5.0 / 255.0));
  CHECK(round_trip(torch::zeros({1}), p).item<float>() == 0.0f);
  // A constant-zero tensor still gets a positive step.
  CHECK(affine_params(0.0, 0.0, false).scale > 0);
}

TEST_CASE("MinMaxObserver: every value within half a step after quantize-dequantize",
          "[quant][observer]") {
  for (bool reduce : {false, true}) {
    INFO("reduce_range " << reduce);
    MinMaxObserver observer(reduce);
    const auto a = torch::linspace(-2.0, 1.0, 777);
    const auto b = torch::linspace(-0.5, 6.0, 1001);
    observer.observe(a);
    observer.observe(b);
    CHECK(observer.min() == Approx(-2.0));
    CHECK(observer.max() == Approx(6.0));
    const QuantParams p = observer.params();
    CHECK(p.scale == Approx(8.0 / (reduce ? 127.0 : 255.0)));
    const auto all = torch::cat({a, b});
    CHECK(max_abs(round_trip(all, p) - all) <= p.scale / 2 + 1e-6);
  }
}

TEST_CASE("PercentileObserver clips outliers for a finer step on the bulk", "[quant][observer]") {
  torch::manual_seed(0);
  auto bulk = torch::rand({20000});           // [0, 1)
  auto x = torch::cat({bulk, torch::tensor({1000.0f, -40.0f})});
  MinMaxObserver minmax(false);
  PercentileObserver percentile(99.9, 2048, false);
  minmax.observe(x);
  percentile.observe(x);
  const QuantParams pm = minmax.params(), pp = percentile.params();
  CHECK(pm.scale == Approx(1040.0 / 255.0));
  // The clipped range holds the bulk: at most one histogram bin (1040/2048) beyond [0, 1].
  const double bin = 1040.0 / 2048.0;
  CHECK(pp.scale * 255.0 <= 1.0 + 2 * bin + 1e-9);
  CHECK(pp.scale * 255.0 >= 1.0 - 1e-9);
  // Values inside the clipped range: within half a step; the bulk's error is far below min-max's.
  const double hi = pp.scale * double(255 - pp.zero_point);
  const auto inside = bulk.masked_select(bulk <= hi);
  CHECK(max_abs(round_trip(inside, pp) - inside) <= pp.scale / 2 + 1e-6);
  CHECK(max_abs(round_trip(bulk, pp) - bulk) * 20 < max_abs(round_trip(bulk, pm) - bulk));
  // Outliers are clipped to the range's ends.
  CHECK(round_trip(torch::tensor({1000.0f}), pp).item<double>() == Approx(hi));

  // A widening second batch re-bins the histogram: the same clip as one batch, within two bins.
  PercentileObserver two(99.9, 2048, false), one(99.9, 2048, false);
  const auto first = torch::rand({5000}), second = 3.0 * torch::rand({5000}) - 1.0;
  two.observe(first);
  two.observe(second);
  one.observe(torch::cat({first, second}));
  const double width = 4.0 / 2048.0;
  CHECK(std::abs(two.params().scale - one.params().scale) * 255.0 <= 2 * width + 1e-9);

  CHECK_THROWS_AS(PercentileObserver(40.0), argument_error);
  CHECK_THROWS_AS(PercentileObserver(99.0, 4), argument_error);
}

TEST_CASE("quantize_weight: symmetric int8 within half a step per channel", "[quant][observer]") {
  torch::manual_seed(1);
  auto w = torch::randn({6, 3, 3, 3}) * torch::tensor({0.01, 1.0, 5.0, 0.2, 3.0, 0.0}).view({6, 1, 1, 1}).to(torch::kFloat32);
  const auto q = quantize_weight(w, /*per_channel=*/true);
  REQUIRE(q.scalar_type() == torch::kQInt8);
  const auto scales = q.q_per_channel_scales();
  CHECK(torch::all(q.q_per_channel_zero_points() == 0).item<bool>());
  for (int c = 0; c < 6; ++c) {
    const double amax = w[c].abs().max().item<double>();
    const double s = scales[c].item<double>();
    CHECK(s == Approx(amax > 0 ? amax / 127.0 : 1.0));
    CHECK(max_abs(q.dequantize()[c] - w[c]) <= s / 2 + 1e-7);
  }
  CHECK(max_abs(q.dequantize()[5]) == 0.0);  // a zero channel stays exactly zero
  const auto t = quantize_weight(w, /*per_channel=*/false);
  CHECK(t.q_scale() == Approx(max_abs(w) / 127.0));
  CHECK(max_abs(t.dequantize() - w) <= t.q_scale() / 2 + 1e-6);
}

TEST_CASE("Engines: names, the built-in list, a guard that restores", "[quant][engine]") {
  const auto engines = available_engines();
  REQUIRE_FALSE(engines.empty());
  const at::QEngine before = at::globalContext().qEngine();
  {
    EngineGuard guard(engine_from_name("test", "engine", engines.front()));
    CHECK(engine_name(at::globalContext().qEngine()) == engines.front());
  }
  CHECK(at::globalContext().qEngine() == before);
  try {
    engine_from_name("fasterai::test", "engine", "tpu");
    FAIL("no error");
  } catch (const argument_error& e) {
    const std::string m = e.what();
    CHECK(m.find("'tpu'") != std::string::npos);
    CHECK(m.find(engines.front()) != std::string::npos);  // lists what is built in
  }
  // An engine LibTorch knows but this build lacks.
  for (const char* name : {"fbgemm", "x86", "onednn", "qnnpack"}) {
    if (std::find(engines.begin(), engines.end(), name) != engines.end()) continue;
    CHECK_THROWS_AS(engine_from_name("test", "engine", name), argument_error);
  }
}

TEST_CASE("Dynamic QuantizedLinear matches fp32 within the quantization steps", "[quant][layers]") {
  torch::manual_seed(2);
  for (const std::string& engine : available_engines()) {
    INFO("engine " << engine);
    auto fc = torch::nn::Linear(48, 20);
    const auto x = torch::randn({5, 48}) * 2.0;
    const auto qw = quantize_weight(fc->weight, true);
    QuantizedLinear q(qw, fc->bias, QuantizedLayerOptions().dynamic(true).engine(engine));
    torch::NoGradGuard no_grad;
    const auto y = q->forward(x);
    REQUIRE(y.scalar_type() == torch::kFloat32);
    const auto reference = fc->forward(x);
    // The input is quantized per batch to quint8 over its own [min, max] ∪ {0}: 8 bits on
    // QNNPACK, 7 elsewhere (see QuantizedLinearImpl::forward).
    const double levels = engine == "qnnpack" ? 255.0 : 127.0;
    const double s_x = (std::max(0.0, x.max().item<double>()) - std::min(0.0, x.min().item<double>())) / levels;
    const auto bound = linear_bound(x, fc->weight, s_x, qw.q_per_channel_scales(), 0.0);
    CHECK(torch::all((y - reference).abs() <= bound * 1.001 + 1e-5).item<bool>());
    // And it is not a no-op: int8 differs from fp32.
    CHECK(max_abs(y - reference) > 0);
  }
}

TEST_CASE("Static QuantizedLinear and QuantizedConv2d match fp32 within the steps", "[quant][layers]") {
  torch::manual_seed(3);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({2, 8, 10, 10});
  const QuantParams in = affine_params(x.min().item<double>(), x.max().item<double>(), true);
  for (const std::string& engine : available_engines()) {
    for (bool relu : {false, true}) {
      INFO("engine " << engine << ", relu " << relu);
      auto conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(8, 12, 3).padding(1).stride(2));
      auto reference = conv->forward(x);
      if (relu) reference = torch::relu(reference);
      const QuantParams out = affine_params(reference.min().item<double>(), reference.max().item<double>(), true);
      const auto qw = quantize_weight(conv->weight, true);
      ConvGeometry g;
      g.stride = {2, 2};
      g.padding = {1, 1};
      QuantizedConv2d q(qw, conv->bias, g,
                        QuantizedLayerOptions().relu(relu).input(in).output(out).dequantize_output(true).engine(engine));
      const auto y = q->forward(x);
      REQUIRE(y.scalar_type() == torch::kFloat32);
      // Bound: Σ over the receptive field of |w|·s_x/2 + |x|·s_w/2 + s_x·s_w/4, plus s_y/2.
      const auto s_w = qw.q_per_channel_scales().to(torch::kFloat32).view({1, -1, 1, 1});
      const auto ones = torch::ones_like(conv->weight);
      namespace F = torch::nn::functional;
      const auto conv_of = [&](const torch::Tensor& a, const torch::Tensor& k) {
        return F::conv2d(a, k, F::Conv2dFuncOptions().stride(2).padding(1));
      };
      const auto bound = conv_of(torch::full_like(x, in.scale / 2), conv->weight.abs()) +
                         conv_of(x.abs(), ones) * s_w / 2 + conv_of(torch::ones_like(x), ones) * s_w * (in.scale / 4) +
                         out.scale / 2;
      CHECK(torch::all((y - reference).abs() <= bound * 1.001 + 1e-5).item<bool>());
    }
    // A static Linear, quint8 in (chain entry) and out.
    auto fc = torch::nn::Linear(30, 7);
    const auto v = torch::randn({4, 30});
    const auto reference = fc->forward(v);
    const QuantParams vin = affine_params(v.min().item<double>(), v.max().item<double>(), true);
    const QuantParams vout = affine_params(reference.min().item<double>(), reference.max().item<double>(), true);
    const auto qw = quantize_weight(fc->weight, true);
    QuantizedLinear q(qw, fc->bias, QuantizedLayerOptions().input(vin).output(vout).engine(engine));
    const auto y = q->forward(v);
    REQUIRE(y.is_quantized());  // no dequantize_output: the chain continues in int8
    const auto bound = linear_bound(v, fc->weight, vin.scale, qw.q_per_channel_scales(), vout.scale);
    CHECK(torch::all((y.dequantize() - reference).abs() <= bound * 1.001 + 1e-5).item<bool>());
  }
}

TEST_CASE("Seven-bit activations keep oneDNN's int8 convolution exact at the extremes",
          "[quant][layers]") {
  // Every activation and weight at its maximum: the worst case for 16-bit pair sums on CPUs
  // without VNNI. With reduce_range the result stays within the quantization error.
  const auto engines = available_engines();
  if (std::find(engines.begin(), engines.end(), "onednn") == engines.end()) {
    FASTERAI_SKIP("no oneDNN in this LibTorch");
  }
  torch::NoGradGuard no_grad;
  const auto x = torch::full({1, 32, 6, 6}, 2.0f);
  auto conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 16, 3).padding(1).bias(false));
  conv->weight.fill_(0.5f);
  const auto reference = conv->forward(x);
  const QuantParams in = affine_params(0.0, 2.0, /*reduce_range=*/true);
  const QuantParams out = affine_params(0.0, reference.max().item<double>(), true);
  ConvGeometry g;
  g.padding = {1, 1};
  QuantizedConv2d q(quantize_weight(conv->weight), torch::Tensor(), g,
                    QuantizedLayerOptions().input(in).output(out).dequantize_output(true).engine("onednn"));
  CHECK(max_abs(q->forward(x) - reference) <= out.scale / 2 + 1e-4);
}

TEST_CASE("Quantized layers refuse what they cannot run", "[quant][layers]") {
  const auto qw = quantize_weight(torch::randn({3, 4}));
  // A static layer needs its calibrated output map.
  CHECK_THROWS_AS(QuantizedLinear(qw, torch::Tensor(), QuantizedLayerOptions()), argument_error);
  CHECK_THROWS_AS(QuantizedLinear(qw, torch::Tensor(), QuantizedLayerOptions().dynamic(true).engine("tpu")),
                  argument_error);
  QuantizedLinear ok(qw, torch::Tensor(), QuantizedLayerOptions().dynamic(true));
  CHECK_THROWS_AS(ok->clone(torch::Device("cuda")), argument_error);
}
