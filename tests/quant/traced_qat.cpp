// Quantization-aware training on the traced graph (quant/traced_qat.hpp): weights fake-quantized
// exactly as they convert, the trained graph converting to the int8 graph it simulates (residual
// add in int8), training that recovers what post-training quantization loses on a residual
// network, the Learner callback, and bad input.
#include "catch.hpp"

#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/quant/traced_qat.hpp>
#include <fasterai/train/learner.hpp>

#include "../transform/transform_testing.hpp"
#include "squares.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using namespace fasterai::testing;
using Catch::Contains;
using fixtures::squares;
using fixtures::train;

namespace {

// A residual network with its own forward (what the Calibrator cannot rebuild) on 1×8×8
// images: conv–BN–ReLU stem, a block whose shortcut is added before its ReLU, a conv–ReLU after
// pooling (written as users write it, `torch::max_pool2d(x, 2)`: one number for two), a Linear
// head.
struct ResidualNetImpl : nn::Module {
  nn::Conv2d stem{nullptr}, r1{nullptr}, r2{nullptr}, c3{nullptr};
  nn::BatchNorm2d stem_bn{nullptr}, r1_bn{nullptr}, r2_bn{nullptr};
  nn::Linear head{nullptr};
  ResidualNetImpl() {
    auto conv = [&](const char* name, std::int64_t in, std::int64_t out) {
      return register_module(name, nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1).bias(false)));
    };
    stem = conv("stem", 1, 8), stem_bn = register_module("stem_bn", nn::BatchNorm2d(8));
    r1 = conv("r1", 8, 8), r1_bn = register_module("r1_bn", nn::BatchNorm2d(8));
    r2 = conv("r2", 8, 8), r2_bn = register_module("r2_bn", nn::BatchNorm2d(8));
    c3 = register_module("c3", nn::Conv2d(nn::Conv2dOptions(8, 12, 3).padding(1)));
    head = register_module("head", nn::Linear(12, 3));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(stem_bn(stem(x)));
    x = torch::relu(r2_bn(r2(torch::relu(r1_bn(r1(x))))) + x);
    x = torch::relu(c3(torch::max_pool2d(x, 2)));
    return head(torch::flatten(torch::adaptive_avg_pool2d(x, {1, 1}), 1));
  }
};
TORCH_MODULE(ResidualNet);

ResidualNet residual_net(std::uint64_t seed) {
  torch::manual_seed(seed);
  ResidualNet net;
  randomize_batch_norms(*net);
  net->eval();
  return net;
}

template <class Forward>
double accuracy_of(Forward forward, const std::vector<torch::data::Example<>>& data) {
  torch::NoGradGuard no_grad;
  double right = 0, n = 0;
  for (const auto& b : data) {
    right += (forward(b.data).argmax(1) == b.target).sum().template item<double>();
    n += double(b.target.size(0));
  }
  return right / n;
}

torch::Tensor run(torch::jit::Module& m, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return m.forward({x}).toTensor();
}

int count_kernel(const torch::jit::Module& m, const char* kind) {
  int n = 0;
  for (const torch::jit::Node* node : m.get_method("forward").graph()->nodes())
    n += std::string(node->kind().toQualString()) == kind;
  return n;
}

// Switches the fake quantization of every observer of the QAT graph off (the graph's fp32
// function with the same weights), and back on when it goes out of scope.
struct Fp32View {
  std::vector<torch::jit::Module> observers;
  explicit Fp32View(const torch::jit::Module& graph) : observers(fasterai::detail::range_observers(graph)) {
    for (auto& o : observers) o.setattr("fake_quantize", false);
  }
  ~Fp32View() {
    for (auto& o : observers) o.setattr("fake_quantize", true);
  }
};

}  // namespace

TEST_CASE("traced QAT: weights are fake-quantized as they convert; the model is left as it was",
          "[quant][traced][qat]") {
  auto net = residual_net(1);
  const auto before = snapshot(*net);
  const auto example = torch::randn({1, 1, 8, 8});
  TracedQuantizationAwareTraining qat(net, example);
  CHECK(qat.batch_norms_folded() == 3);
  auto model = qat.model();
  CHECK(model->is_training());
  // Its parameters are the graph's tensors (trained in place of the model's).
  CHECK(model->parameters().size() == qat.model()->graph().parameters().size());
  CHECK(model->parameters().front().data_ptr() == (*qat.model()->graph().parameters().begin()).data_ptr());
  CHECK(unchanged(before, *net));

  // The first training batch: no activation observed yet, so only the weights are rounded.
  // The same graph with each int8-read weight replaced by quantize_weight(w).dequantize():
  int folded = 0;
  torch::jit::Module reference = fasterai::detail::prepared_for_quantization(
      to_torchscript(net, example, ExportOptions().check(false)), true, folded);
  int rounded = 0;
  for (const auto& p : reference.named_parameters(/*recurse=*/true)) {
    if (p.value.dim() < 2) continue;
    const auto dot = p.name.rfind('.');
    auto owner = reference.attr(p.name.substr(0, dot)).toModule();
    owner.setattr(p.name.substr(dot + 1), quant::quantize_weight(p.value).dequantize());
    ++rounded;
  }
  CHECK(rounded == 5);
  const auto x = torch::randn({4, 1, 8, 8});
  const auto simulated = model->forward(x);
  CHECK(relative_error(simulated.detach(), run(reference, x)) <= 1e-6);
  CHECK(qat.batches_observed() == 1);
  CHECK(unchanged(before, *net));
}

TEST_CASE("traced QAT converts to the int8 graph it simulates, residual add in int8", "[quant][traced][qat]") {
  auto net = residual_net(2);
  const auto before = snapshot(*net);
  const auto data = squares(128, 32, 3);
  TracedQuantizationAwareTraining qat(net, torch::randn({1, 1, 8, 8}));
  const auto start = snapshot(*qat.model());
  train(qat.model(), data, 2, 1e-3);
  CHECK(qat.batches_observed() == 8);
  CHECK_FALSE(unchanged(start, *qat.model()));  // the gradient reaches the graph's weights
  CHECK(unchanged(before, *net));                // and not the model's
  auto q = qat.convert();
  CHECK(count_kernel(q, "aten::quantize_per_tensor") == 1);
  CHECK(count_kernel(q, "aten::dequantize") == 1);
  CHECK(count_kernel(q, "quantized::add_relu") == 1);
  CHECK(count_kernel(q, "quantized::conv2d_relu") == 3);  // stem, r1, c3
  CHECK(count_kernel(q, "quantized::conv2d") == 1);       // r2, added before its ReLU
  CHECK(count_kernel(q, "quantized::linear") == 1);

  // In eval mode the QAT graph computes what the int8 graph computes, up to the kernels'
  // integer accumulation: far closer to it than the same weights in fp32.
  auto model = qat.model();
  model->eval();
  const auto x = squares(64, 64, 4).front().data;
  torch::Tensor simulated, fp32;
  {
    torch::NoGradGuard no_grad;
    simulated = model->forward(x);
    const Fp32View view(model->graph());
    fp32 = model->forward(x);
  }
  const auto int8 = run(q, x);
  // In output steps (the scale of the observer on the graph's output, the head's).
  const torch::jit::Node* last = model->graph().get_method("forward").graph()->outputs()[0]->node();
  REQUIRE(last->kind() == c10::prim::CallMethod);
  const double step = model->graph()
                          .attr(last->input(0)->node()->s(c10::attr::name))
                          .toModule()
                          .attr("scale")
                          .toTensor()
                          .item<double>();
  const double sim_max = (int8 - simulated).abs().max().item<double>() / step;
  const double sim_mean = (int8 - simulated).abs().mean().item<double>() / step;
  const double fp32_mean = (int8 - fp32).abs().mean().item<double>() / step;
  INFO("int8 vs simulated: at most " << sim_max << " steps, " << sim_mean << " on average; vs fp32 "
                                     << fp32_mean << " on average");
  // Measured (LibTorch 1.13): at most 1 output step apart, 0.34 on average, against 0.43 from fp32.
  CHECK(sim_max <= 2.0 + 1e-6);
  CHECK(sim_mean < fp32_mean);

  // convert() changes nothing: twice the same graph, and the QAT model computes as before.
  auto again = qat.convert();
  CHECK(run(again, x).equal(int8));
  torch::NoGradGuard no_grad;
  CHECK(model->forward(x).equal(simulated));
}

TEST_CASE("traced QAT recovers the accuracy post-training quantization loses on a residual network",
          "[quant][traced][qat]") {
  // Noisy enough that int8 rounding costs accuracy.
  const auto train_data = squares(256, 32, 5, 0.8, 1.0), valid = squares(256, 64, 6, 0.8, 1.0);
  auto net = residual_net(7);
  train(net, train_data, 20, 3e-3);
  // The stem's channel 0 made 50× larger than the others, the same function in fp32: its BN's
  // γ and β scaled, and so the block's second BN on that channel (the shortcut adds the two);
  // the convolutions reading it (r1, and c3 after the add) divide it back. ReLU and max pooling
  // commute with a positive scale. Per-tensor activations then round the other channels of
  // the stem and of the add to a few steps.
  {
    torch::NoGradGuard no_grad;
    for (auto* bn : {net->stem_bn.get(), net->r2_bn.get()}) bn->weight[0] *= 50, bn->bias[0] *= 50;
    net->r1->weight.select(1, 0).div_(50);
    net->c3->weight.select(1, 0).div_(50);
  }
  net->eval();
  const double fp32 = accuracy_of([&](const torch::Tensor& x) { return net->forward(x); }, valid);
  auto ptq = quantize_traced(net, torch::randn({1, 1, 8, 8}),
                             std::vector<torch::Tensor>{train_data[0].data, train_data[1].data});
  const double ptq_accuracy = accuracy_of([&](const torch::Tensor& x) { return run(ptq, x); }, valid);

  // The control: the same fine-tuning in fp32 (BatchNorms training), then the same PTQ.
  auto tuned = residual_net(7);
  {
    torch::NoGradGuard no_grad;
    const auto from = net->named_parameters();
    for (auto& p : tuned->named_parameters()) p.value().copy_(from[p.key()]);
    const auto buffers = net->named_buffers();
    for (auto& b : tuned->named_buffers()) b.value().copy_(buffers[b.key()]);
  }
  train(tuned, train_data, 10, 3e-3);
  tuned->eval();
  auto tuned_ptq = quantize_traced(tuned, torch::randn({1, 1, 8, 8}),
                                   std::vector<torch::Tensor>{train_data[0].data, train_data[1].data});
  const double tuned_accuracy = accuracy_of([&](const torch::Tensor& x) { return run(tuned_ptq, x); }, valid);

  TracedQuantizationAwareTraining qat(net, torch::randn({1, 1, 8, 8}));
  train(qat.model(), train_data, 10, 3e-3);
  auto q = qat.convert();
  const double qat_accuracy = accuracy_of([&](const torch::Tensor& x) { return run(q, x); }, valid);
  INFO("fp32 " << fp32 << ", PTQ " << ptq_accuracy << ", fine-tuned then PTQ " << tuned_accuracy << ", QAT "
               << qat_accuracy);
  // Measured (LibTorch 1.13): fp32 92.6%, PTQ int8 86.3%, fine-tuned then PTQ 89.8%, QAT 91.4%.
  // LibTorch 2.6 (oneDNN capped at AVX, whose gradients are right): fp32 93.0%, PTQ 85.5%,
  // fine-tuned then PTQ 91.0%, QAT 91.0% on a 2-core AMD EPYC; fp32 93.0%, PTQ 85.5%, 90.6%,
  // QAT 90.2% (one image of 256 behind) on a 2-core Intel Xeon. QAT's gain over PTQ holds
  // everywhere; against the control fine-tuned in fp32 it is a tie on 2.6, so that check allows
  // one point (2.56 images): it still fails for a QAT that recovers nothing (PTQ is 5 points
  // below the control).
  CHECK(fp32 > 0.9);
  CHECK(qat_accuracy > ptq_accuracy + 0.03);
  CHECK(qat_accuracy >= tuned_accuracy - 0.01);
}

TEST_CASE("TracedQuantizationAwareTraining as a Learner callback", "[quant][traced][qat]") {
  auto net = residual_net(8);
  TracedQuantizationAwareTraining qat(net, torch::randn({1, 1, 8, 8}));
  qat.freeze_observers_at(0.5);
  std::ostringstream out;
  Learner learn(qat.model(), squares(64, 16, 9), squares(32, 16, 10),
                LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU));
  learn.fit(2, 1e-3, {qat});
  CHECK(qat.observers_frozen());
  CHECK(qat.batches_observed() == 4);  // 2 epochs of 4 batches, frozen at half
  auto q = qat.convert();
  CHECK(count_kernel(q, "quantized::add_relu") == 1);

  // The ranges stay where the first half of training left them.
  auto ranges = [&] {
    std::vector<double> out;
    for (const auto& o : qat.model()->activation_observers())
      if (o.attr("min_val").toTensor().numel() > 0)
        out.push_back(o.attr("min_val").toTensor().item<double>()), out.push_back(o.attr("max_val").toTensor().item<double>());
    return out;
  };
  const auto frozen = ranges();
  CHECK(frozen.size() >= 12);
  learn.fit(1, 1e-3);  // without the callback: the last state (frozen) holds
  CHECK(ranges() == frozen);
  CHECK(qat.batches_observed() == 4);
}

TEST_CASE("TracedQuantizationAwareTraining refuses bad input, naming it, and changes nothing",
          "[quant][traced][qat][errors]") {
  auto net = residual_net(11);
  const auto before = snapshot(*net);
  const auto example = torch::randn({1, 1, 8, 8});
  CHECK_THROWS_WITH(TracedQuantizationAwareTraining(net, torch::randn({1, 3, 8, 8})), Contains("shape"));
  CHECK_THROWS_WITH(TracedQuantizationAwareTraining(net, example, TracedQuantOptions().engine("no-such-engine")),
                    Contains("'no-such-engine'"));
  CHECK(unchanged(before, *net));

  TracedQuantizationAwareTraining qat(net, example);
  CHECK_THROWS_WITH(qat.convert(), Contains("training batches observed") && Contains("train model()"));
  CHECK_THROWS_WITH(qat.freeze_observers_at(1.5), Contains("freeze_observers_at") && Contains("[0, 1]"));
  CHECK_THROWS_WITH(qat.freeze_observers_at(-0.1), Contains("freeze_observers_at"));

  // A Learner of another model with this callback: refused before any step.
  std::ostringstream out;
  Learner other(net, squares(32, 16, 12), {}, LearnerOptions().out(&out).progress(Progress::None));
  CHECK_THROWS_WITH(other.fit(1, 1e-3, {qat}), Contains("qat.model()"));
  CHECK(unchanged(before, *net));

  // A diverged weight: convert names it and builds nothing; once repaired it converts.
  train(qat.model(), squares(32, 16, 13), 1, 1e-3);
  auto weight = qat.model()->parameters().front();
  const auto kept = weight.detach().clone();
  {
    torch::NoGradGuard no_grad;
    weight.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
  }
  CHECK_THROWS_WITH(qat.convert(), Contains("NaN or infinity"));
  {
    torch::NoGradGuard no_grad;
    weight.copy_(kept);
  }
  CHECK_NOTHROW(qat.convert());
  CHECK(unchanged(before, *net));
}
