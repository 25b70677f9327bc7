// Static int8 quantization of any traceable module (quant/traced_calibrator.hpp): the BatchNorm
// folding pass is exact on random users' modules; residual adds and concatenations stay int8;
// the result agrees with fp32, is deterministic, saves and loads; bad inputs change nothing.
#include "catch.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <torch/script.h>

#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/quant/traced_calibrator.hpp>

#include "../transform/random_nets.hpp"
#include "../transform/transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;

namespace {

std::map<std::string, int> kernel_counts(const torch::jit::Module& m) {
  std::map<std::string, int> counts;
  for (const torch::jit::Node* n : m.get_method("forward").graph()->nodes())
    if (n->kind() != c10::prim::Constant && n->kind() != c10::prim::GetAttr) ++counts[n->kind().toQualString()];
  return counts;
}

// A user's module: conv–BN–ReLU stem, a residual block with an identity shortcut, a
// concatenation of two branches of different widths, a depthwise-separable pair, a Linear head.
struct UserNetImpl : nn::Module {
  nn::Conv2d stem{nullptr}, r1{nullptr}, r2{nullptr}, a{nullptr}, b{nullptr}, dw{nullptr}, pw{nullptr};
  nn::BatchNorm2d stem_bn{nullptr}, r1_bn{nullptr}, r2_bn{nullptr}, b_bn{nullptr}, dw_bn{nullptr};
  nn::Linear head{nullptr};
  UserNetImpl() {
    auto conv = [&](const char* name, std::int64_t in, std::int64_t out, std::int64_t k, std::int64_t groups = 1) {
      return register_module(name, nn::Conv2d(nn::Conv2dOptions(in, out, k).padding(k / 2).groups(groups).bias(false)));
    };
    stem = conv("stem", 3, 16, 3), stem_bn = register_module("stem_bn", nn::BatchNorm2d(16));
    r1 = conv("r1", 16, 16, 3), r1_bn = register_module("r1_bn", nn::BatchNorm2d(16));
    r2 = conv("r2", 16, 16, 3), r2_bn = register_module("r2_bn", nn::BatchNorm2d(16));
    a = register_module("a", nn::Conv2d(nn::Conv2dOptions(16, 8, 1)));
    b = conv("b", 16, 12, 3), b_bn = register_module("b_bn", nn::BatchNorm2d(12));
    dw = conv("dw", 20, 20, 3, 20), dw_bn = register_module("dw_bn", nn::BatchNorm2d(20));
    pw = register_module("pw", nn::Conv2d(nn::Conv2dOptions(20, 24, 1)));
    head = register_module("head", nn::Linear(24, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(stem_bn(stem(x)));
    auto y = torch::relu(r1_bn(r1(x)));
    x = torch::relu(r2_bn(r2(y)) + x);
    x = torch::cat({torch::relu(a(x)), torch::relu(b_bn(b(x)))}, 1);
    x = torch::relu(pw(torch::relu(dw_bn(dw(x)))));
    return head(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(UserNet);

UserNet user_net() {
  torch::manual_seed(3);
  UserNet net;
  randomize_batch_norms(*net);
  net->eval();
  return net;
}

std::vector<torch::Tensor> batches(std::uint64_t seed, int count, std::vector<std::int64_t> shape) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < count; ++i) out.push_back(torch::randn(shape));
  return out;
}

torch::Tensor run(torch::jit::Module& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return m.forward({x}).toTensor();
}

// max |int8 − fp32| / max |fp32| of the logits.
template <class Model>
double error_against_fp32(torch::jit::Module& q, Model& net, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return relative_error(q.forward({x}).toTensor(), net->forward(x));
}

int count_of(const std::map<std::string, int>& kernels, const std::string& kind) {
  const auto it = kernels.find(kind);
  return it == kernels.end() ? 0 : it->second;
}

}  // namespace

TEST_CASE("traced quantization: BatchNorm folding on the graph is exact on random users' modules",
          "[quant][traced][property]") {
  int folded = 0;
  for (int k = 0; k < 30; ++k) {
    auto [seed, in, size, net] = random_case(9000, k);
    INFO("seed " << seed << ": " << net->description);
    const auto before = snapshot(*net);
    const auto x = torch::randn({2, in, size, size});
    const torch::jit::Module exported = to_torchscript(net, x);  // (its forward ran: the check)
    int n = 0;
    torch::jit::Module copy = fasterai::detail::prepared_for_quantization(exported, true, n);
    folded += n;
    const auto kernels = kernel_counts(copy);
    CHECK(kernels.count("aten::relu_") == 0);
    CHECK(kernels.count("aten::_convolution") == 0);
    // Every BatchNorm of these networks follows a convolution: all are folded.
    const auto norms = kernel_counts(exported);
    CHECK(n == count_of(norms, "aten::batch_norm"));
    CHECK(kernels.count("aten::batch_norm") == 0);
    const auto probe = torch::randn({3, in, size, size});
    torch::NoGradGuard no_grad;
    const torch::Tensor folded_out = copy.forward({probe}).toTensor(), fp32_out = net->forward(probe);
    // Which side went wrong, if one did: CI once saw NaN here on LibTorch 2.6 (seed 9011), which
    // 40 reruns of this test and 1,000 rounds of that network's export, fold and run did not
    // reproduce. (Not by running the graph again: a second call compiles it with the CPU fuser
    // of a LibTorch built with LLVM, Debian's 2.6, which hangs on the folded graph of seed 9000;
    // core/libtorch_version.hpp.)
    INFO("finite: folded graph " << torch::isfinite(folded_out).all().item<bool>() << ", fp32 model "
                                 << torch::isfinite(fp32_out).all().item<bool>());
    CHECK(relative_error(folded_out, fp32_out) <= 1e-5);
    CHECK(unchanged(before, *net));
  }
  CHECK(folded > 30);
}

TEST_CASE("traced quantization keeps residual adds and concatenations in int8", "[quant][traced]") {
  auto net = user_net();
  const auto before = snapshot(*net);
  const auto calibration = batches(1, 4, {4, 3, 16, 16});
  TracedCalibrator calibrator(net, torch::randn({1, 3, 16, 16}));
  CHECK(calibrator.batch_norms_folded() == 5);
  calibrator.observe(calibration);
  CHECK(calibrator.batches_observed() == 4);
  auto q = calibrator.convert();
  const auto kernels = kernel_counts(q);
  const auto count = [&](const std::string& k) { return count_of(kernels, k); };
  // One quantize at the entry, one dequantize at the exit: everything between runs on int8.
  CHECK(count("aten::quantize_per_tensor") == 1);
  CHECK(count("aten::dequantize") == 1);
  CHECK(count("quantized::add_relu") == 1);
  CHECK(count("quantized::cat") == 1);
  CHECK(count("quantized::conv2d_relu") == 6);   // stem, r1, a, b, dw, pw
  CHECK(count("quantized::conv2d") == 1);        // r2, whose ReLU comes after the add
  CHECK(count("quantized::linear") == 1);
  CHECK(count("aten::batch_norm") + count("aten::conv2d") + count("aten::_convolution") + count("aten::linear") == 0);
  CHECK(unchanged(before, *net));

  // Agreement with fp32 on inputs not seen in calibration: 7-bit activations through seven
  // layers stay within a few percent of the output's range.
  for (const auto& x : batches(2, 3, {2, 3, 16, 16})) {
    const double error = error_against_fp32(q, net, x);
    INFO("relative error " << error);
    CHECK(error <= 0.05);
  }

  // Deterministic: the same batches give the same model.
  TracedCalibrator again(net, torch::randn({1, 3, 16, 16}));
  again.observe(calibration);
  auto q2 = again.convert();
  const auto probe = torch::randn({2, 3, 16, 16});
  CHECK(run(q2, probe).equal(run(q, probe)));

  // Saved and loaded, it gives the same outputs.
  std::stringstream file;
  q.save(file);
  auto loaded = torch::jit::load(file);
  CHECK(run(loaded, probe).equal(run(q, probe)));
}

TEST_CASE("traced quantization of the zoo's ResNet-18", "[quant][traced]") {
  torch::manual_seed(4);
  auto net = models::resnet18(10);
  randomize_batch_norms(*net);
  net->eval();
  auto q = quantize_traced(net, torch::randn({1, 3, 32, 32}), batches(5, 3, {2, 3, 32, 32}));
  const auto kernels = kernel_counts(q);
  CHECK(kernels.at("quantized::add_relu") == 8);  // every residual add, its ReLU fused
  CHECK(kernels.at("quantized::conv2d_relu") == 9);
  CHECK(kernels.at("quantized::conv2d") == 11);   // before an add (8) and the 3 projections
  CHECK(kernels.at("aten::quantize_per_tensor") == 1);
  CHECK(kernels.at("aten::dequantize") == 1);
  const auto x = torch::randn({2, 3, 32, 32});
  const double error = error_against_fp32(q, net, x);
  INFO("relative error " << error);
  CHECK(error <= 0.1);
}

TEST_CASE("traced quantization of the zoo's MobileNetV2: ReLU6 and residual adds stay int8", "[quant][traced]") {
  torch::manual_seed(6);
  auto net = models::mobilenet_v2(10);
  randomize_batch_norms(*net);
  net->eval();
  TracedCalibrator calibrator(net, torch::randn({1, 3, 32, 32}));
  CHECK(calibrator.batch_norms_folded() == 52);
  calibrator.observe(batches(7, 2, {2, 3, 32, 32}));
  auto q = calibrator.convert();
  const auto kernels = kernel_counts(q);
  const auto count = [&](const std::string& k) { return count_of(kernels, k); };
  CHECK(count("aten::quantize_per_tensor") == 1);
  CHECK(count("aten::dequantize") == 1);
  CHECK(count("quantized::conv2d") == 52);
  CHECK(count("quantized::add") == 10);        // the inverted residuals with a shortcut
  CHECK(count("aten::hardtanh") == 35);        // ReLU6, on int8 tensors
  CHECK(count("aten::relu6_") + count("aten::relu6") == 0);
  const auto x = torch::randn({2, 3, 32, 32});
  const double error = error_against_fp32(q, net, x);
  INFO("relative error " << error);
  CHECK(error <= 0.1);
}

TEST_CASE("traced quantization: bad inputs give clear errors and change nothing", "[quant][traced]") {
  auto net = user_net();
  const auto before = snapshot(*net);
  const auto example = torch::randn({1, 3, 16, 16});
  TracedCalibrator calibrator(net, example);
  CHECK_THROWS_WITH(calibrator.convert(), Catch::Contains("batches observed") && Catch::Contains("observe"));

  const auto engines = quant::available_engines();
  if (std::find(engines.begin(), engines.end(), "fbgemm") == engines.end())
    CHECK_THROWS_WITH(TracedCalibrator(net, example, TracedQuantOptions().engine("fbgemm")),
                      Catch::Contains("'fbgemm'") && Catch::Contains("built into this LibTorch"));
  CHECK_THROWS_WITH(TracedCalibrator(net, torch::randn({1, 5, 16, 16})), Catch::Contains("shape"));

  calibrator.observe(batches(1, 2, {4, 3, 16, 16}));
  const auto probe = torch::randn({2, 3, 16, 16});
  auto first = calibrator.convert();
  const auto reference = run(first, probe);

  // A batch of the wrong shape, a NaN batch, an infinite one: errors, and the ranges observed
  // so far are kept, so the converted model is the same.
  CHECK_THROWS_WITH(calibrator.observe(torch::randn({4, 5, 16, 16})),
                    Catch::Contains("'batch'") && Catch::Contains("[4, 5, 16, 16]"));
  auto nan_batch = torch::randn({4, 3, 16, 16});
  nan_batch[1][2][3][4] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(calibrator.observe(nan_batch), Catch::Contains("NaN or infinite"));
  CHECK_THROWS_WITH(calibrator.observe(torch::full({4, 3, 16, 16}, std::numeric_limits<float>::infinity())),
                    Catch::Contains("NaN or infinite"));
  CHECK(calibrator.batches_observed() == 2);
  auto q = calibrator.convert();
  CHECK(run(q, probe).equal(reference));

  // Non-finite weights: named as the model's, at the first batch.
  {
    torch::NoGradGuard no_grad;
    net->pw->weight[0][0][0][0] = std::numeric_limits<float>::infinity();
  }
  TracedCalibrator broken(net, example);
  CHECK_THROWS_WITH(broken.observe(probe), Catch::Contains("model") && Catch::Contains("weight holding NaN or infinity"));
  {
    torch::NoGradGuard no_grad;
    net->pw->weight.copy_(before.at("pw.weight"));
  }
  CHECK(unchanged(before, *net));
}
