// The code paths that take a device, run on a CUDA device and compared with the same work on
// the CPU: the Sparsifier's masks, the Pruner and BNFolder through the traced graph, the
// Learner's loop and optimize_for_inference.
//
// tests/CMakeLists.txt builds this area only where the LibTorch found has CUDA; every test
// still skips itself when no GPU is visible at run time (a CUDA LibTorch on a machine without
// one). scripts/gpu_check.sh builds and runs it on a GPU machine.
#include "catch.hpp"

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/sequential.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

#include "train/fixtures.hpp"
#include "transform/transform_testing.hpp"

namespace nn = torch::nn;
using namespace fasterai;
using fasterai::testing::randomize_batch_norms;
using fasterai::testing::relative_error;

// A test that needs the GPU says so and reports SKIPPED where there is none (FASTERAI_SKIP
// returns from the test case, so this must be a macro).
#define FASTERAI_REQUIRE_CUDA()                                                        \
  do {                                                                                 \
    if (!torch::cuda::is_available())                                                  \
      FASTERAI_SKIP("no CUDA device visible to LibTorch (torch::cuda::is_available())"); \
  } while (false)

namespace {

const torch::Device cuda(torch::kCUDA, 0);

// cuDNN convolutions run in TF32 by default (PyTorch's torch.backends.cudnn.allow_tf32), whose
// 10-bit mantissa would put CUDA outputs ~1e-3 away from the CPU's: the comparisons below are
// of float32 against float32. Restored at the end of each test.
class NoTF32 {
 public:
  NoTF32() : cudnn_(at::globalContext().allowTF32CuDNN()), cublas_(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32() {
    at::globalContext().setAllowTF32CuDNN(cudnn_);
    at::globalContext().setAllowTF32CuBLAS(cublas_);
  }
  NoTF32(const NoTF32&) = delete;
  NoTF32& operator=(const NoTF32&) = delete;

 private:
  bool cudnn_, cublas_;
};

// conv(3→16) BN ReLU MaxPool conv(16→32) BN ReLU AdaptiveAvgPool(2×2) Flatten Linear(128→10):
// convolutions, norms and a Linear behind a flatten, each masked by one of the granularities.
nn::Sequential small_cnn() {
  NamedSequential features;
  features->push_back("0", nn::Conv2d(nn::Conv2dOptions(3, 16, 3).padding(1)));
  features->push_back("1", nn::BatchNorm2d(16));
  features->push_back("2", nn::ReLU());
  features->push_back("3", nn::MaxPool2d(2));
  features->push_back("4", nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1)));
  features->push_back("5", nn::BatchNorm2d(32));
  features->push_back("6", nn::ReLU());
  nn::Sequential model;
  model->push_back("features", features);
  model->push_back("avgpool", nn::AdaptiveAvgPool2d(nn::AdaptiveAvgPool2dOptions({2, 2})));
  model->push_back("flatten", nn::Flatten());
  model->push_back("fc", nn::Linear(32 * 2 * 2, 10));
  randomize_batch_norms(*model);
  return model;
}

// Every parameter and buffer on `device`.
bool all_on(const nn::Module& model, const torch::Device& device) {
  for (const auto& p : model.parameters())
    if (p.device() != device) return false;
  for (const auto& b : model.buffers())
    if (b.device() != device) return false;
  return true;
}

// The sparsifier's masks of the CUDA model: on the weight's device and, brought to the CPU,
// equal to the CPU model's bit for bit; the masked weights equal too (multiplying by 1 or 0 is
// exact on both devices, and both models started from the same values).
template <class S>
void check_same_masks(const S& on_cpu, const S& on_cuda, nn::Sequential& cpu_model,
                      nn::Sequential& cuda_model) {
  REQUIRE(on_cpu.layer_names() == on_cuda.layer_names());
  REQUIRE_FALSE(on_cpu.layer_names().empty());
  auto cuda_parameters = cuda_model->named_parameters();
  for (const auto& name : on_cpu.layer_names()) {
    INFO(name);
    const auto& cpu_mask = on_cpu.mask(name);
    const auto& cuda_mask = on_cuda.mask(name);
    REQUIRE(cpu_mask.defined());
    REQUIRE(cuda_mask.defined());
    CHECK(cuda_mask.device() == cuda_parameters[name + ".weight"].device());
    CHECK(cuda_mask.is_cuda());
    CHECK(torch::equal(cuda_mask.cpu(), cpu_mask));
  }
  for (const auto& p : cpu_model->named_parameters()) {
    INFO(p.key());
    CHECK(torch::equal(cuda_parameters[p.key()].cpu(), p.value()));
  }
  // Not vacuous: the sparsifier did mask something.
  std::int64_t pruned = 0;
  for (const auto& name : on_cpu.layer_names()) pruned += on_cpu.mask(name).sum().template item<std::int64_t>();
  CHECK(pruned > 0);
}

// A small ResNet-like module (not a Sequential, so the Pruner and BNFolder go through the traced
// graph): a stem, two residual blocks on one 16-channel stream with an 8-channel branch each,
// a max pool, and a Linear after a flatten.
struct ResidualNetImpl : nn::Cloneable<ResidualNetImpl> {
  nn::Conv2d stem{nullptr}, a1{nullptr}, b1{nullptr}, a2{nullptr}, b2{nullptr};
  nn::BatchNorm2d bn_stem{nullptr}, bn_a1{nullptr}, bn_b1{nullptr}, bn_a2{nullptr}, bn_b2{nullptr};
  nn::Linear fc{nullptr};
  ResidualNetImpl() { reset(); }
  void reset() override {
    auto conv = [&](const char* name, std::int64_t in, std::int64_t out) {
      return register_module(name, nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1).bias(false)));
    };
    auto bn = [&](const char* name, std::int64_t n) { return register_module(name, nn::BatchNorm2d(n)); };
    stem = conv("stem", 3, 16), bn_stem = bn("bn_stem", 16);
    a1 = conv("a1", 16, 8), bn_a1 = bn("bn_a1", 8), b1 = conv("b1", 8, 16), bn_b1 = bn("bn_b1", 16);
    a2 = conv("a2", 16, 8), bn_a2 = bn("bn_a2", 8), b2 = conv("b2", 8, 16), bn_b2 = bn("bn_b2", 16);
    fc = register_module("fc", nn::Linear(16 * 2 * 2, 10));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(bn_stem(stem(x)));
    x = torch::relu(x + bn_b1(b1(torch::relu(bn_a1(a1(x))))));
    x = torch::max_pool2d(x, 2);
    x = torch::relu(x + bn_b2(b2(torch::relu(bn_a2(a2(x))))));
    return fc(torch::flatten(torch::adaptive_avg_pool2d(x, {2, 2}), 1));
  }
};
TORCH_MODULE(ResidualNet);

torch::Tensor eval_forward(ResidualNet& net, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  return net->forward(x);
}

// What sparsifying, pruning and folding did to one copy of the network.
struct Compressed {
  torch::Tensor masked, folded;  // outputs after sparsification, after pruning and folding
  PruneReport pruned;
  std::set<std::string> barrier_ops;
  std::map<std::string, std::vector<std::int64_t>> shapes;
  std::int64_t parameters = 0;
};

Compressed compress(ResidualNet& net, const torch::Tensor& x) {
  Compressed c;
  Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(net, x, SparsifierOptions(30));
  sparsifier.prune(30);
  c.masked = eval_forward(net, x);
  c.pruned = Pruner().prune_(net, x);
  for (const auto& b : c.pruned.barriers) c.barrier_ops.insert(b.op);
  BNFolder().fold_(net, x);
  c.folded = eval_forward(net, x);
  for (const auto& p : net->named_parameters()) c.shapes[p.key()] = p.value().sizes().vec();
  c.parameters = count_parameters(net);
  return c;
}

}  // namespace

TEST_CASE("CUDA: Filter/Local/L1 masks live on the weight's device and equal the CPU's",
          "[cuda][sparsifier]") {
  FASTERAI_REQUIRE_CUDA();
  const NoTF32 no_tf32;
  torch::manual_seed(0);
  auto cpu_model = small_cnn();
  auto cuda_model = clone_model(cpu_model, cuda);
  REQUIRE(all_on(*cuda_model, cuda));
  // The scores are L1 norms of whole filters, summed in another order on the GPU; the selection
  // itself runs on the CPU (sparse/selection.hpp). Random filters' norms are far apart compared
  // with float rounding, so the same filters must be chosen.
  FilterSparsifier<> on_cpu(cpu_model);
  FilterSparsifier<> on_cuda(cuda_model);
  on_cpu.prune(40);
  on_cuda.prune(40);
  check_same_masks(on_cpu, on_cuda, cpu_model, cuda_model);
  // The BatchNorms' γ and β of the pruned filters are zeroed with them, on the GPU too.
  auto bn = cuda_model->named_parameters();
  CHECK(torch::equal(bn["features.1.weight"].cpu(), cpu_model->named_parameters()["features.1.weight"]));
  CHECK(bn["features.1.weight"].eq(0).sum().item<std::int64_t>() == 6);  // floor(16 · 40 / 100)
}

TEST_CASE("CUDA: Weight/Global/L1 masks live on the weight's device and equal the CPU's",
          "[cuda][sparsifier]") {
  FASTERAI_REQUIRE_CUDA();
  const NoTF32 no_tf32;
  torch::manual_seed(1);
  auto cpu_model = small_cnn();
  auto cuda_model = clone_model(cpu_model, cuda);
  // On the CPU float32 weights take the magnitude fast path (select_lowest_magnitude), on the
  // GPU the general one (scores, then select_lowest): the two must agree exactly.
  using Global = Sparsifier<granularity::Weight, method::Global, criteria::L1>;
  Global on_cpu(cpu_model, SparsifierOptions().include_linear(true));
  Global on_cuda(cuda_model, SparsifierOptions().include_linear(true));
  on_cpu.prune(60);
  on_cuda.prune(60);
  check_same_masks(on_cpu, on_cuda, cpu_model, cuda_model);
  std::int64_t weights = 0, pruned = 0;
  for (const auto& name : on_cuda.layer_names()) {
    weights += on_cuda.mask(name).numel();
    pruned += on_cuda.mask(name).sum().item<std::int64_t>();
  }
  CHECK(pruned == weights * 60 / 100);
}

TEST_CASE("CUDA: masks follow a sparsified model moved to the GPU", "[cuda][sparsifier]") {
  FASTERAI_REQUIRE_CUDA();
  torch::manual_seed(2);
  auto model = small_cnn();
  FilterSparsifier<> sparsifier(model);
  sparsifier.prune(50);
  const auto mask = sparsifier.mask("features.4").clone();
  REQUIRE(mask.device().is_cpu());
  model->to(cuda);
  // The weights were overwritten on the GPU with values the mask does not zero: apply() must
  // use a mask on the weights' device and zero exactly the masked filters again.
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(1.0);
  }
  sparsifier.apply();
  CHECK(sparsifier.mask("features.4").is_cuda());
  CHECK(torch::equal(sparsifier.mask("features.4").cpu(), mask));
  const auto w = model->named_parameters()["features.4.weight"].cpu();
  CHECK(torch::equal(w.eq(0), mask));
}

TEST_CASE("CUDA: Pruner and BNFolder through the traced graph match the CPU's pruned model",
          "[cuda][pruner][bn_folder]") {
  FASTERAI_REQUIRE_CUDA();
  const NoTF32 no_tf32;
  torch::manual_seed(3);
  ResidualNet cpu_net;
  randomize_batch_norms(*cpu_net);
  cpu_net->eval();
  ResidualNet cuda_net(std::dynamic_pointer_cast<ResidualNetImpl>(cpu_net->clone(cuda)));
  cuda_net->eval();
  REQUIRE(all_on(*cuda_net, cuda));
  const auto parameters = count_parameters(cpu_net);
  const auto x = torch::randn({4, 3, 16, 16});

  const Compressed on_cpu = compress(cpu_net, x);
  const Compressed on_cuda = compress(cuda_net, x.to(cuda));

  // The same channels removed: the trace on the GPU (cuDNN's batch norm, CUDA's pooling) is
  // understood as on the CPU, with no new barrier.
  REQUIRE(on_cpu.pruned.changed());
  CHECK(on_cuda.pruned.channels_removed() == on_cpu.pruned.channels_removed());
  CHECK(on_cuda.barrier_ops == on_cpu.barrier_ops);
  CHECK(on_cuda.shapes == on_cpu.shapes);
  CHECK(on_cuda.parameters == on_cpu.parameters);
  CHECK(on_cpu.parameters < parameters);
  // Every tensor stays on the GPU, the biases that folding adds to bias-less convolutions too.
  CHECK(all_on(*cuda_net, cuda));
  CHECK(on_cuda.folded.is_cuda());
  // Pruning and folding change nothing on the GPU, and the GPU's model computes what the CPU's
  // does (float32 against float32; summation orders differ).
  CHECK(relative_error(on_cuda.folded, on_cuda.masked) <= 1e-4);
  CHECK(relative_error(on_cuda.folded.cpu(), on_cpu.folded) <= 1e-4);
  CHECK(relative_error(on_cpu.folded, on_cpu.masked) <= 1e-5);
}

TEST_CASE("CUDA: the Learner fits an epoch on the GPU and the loss falls as on the CPU",
          "[cuda][learner]") {
  FASTERAI_REQUIRE_CUDA();
  const NoTF32 no_tf32;
  // Sees where every training and validation batch and prediction is.
  struct DeviceSpy : Callback {
    std::int64_t batches = 0, on_cuda = 0;
    void after_pred(TrainingState& s) override {
      ++batches;
      on_cuda += s.x.is_cuda() && s.y.is_cuda() && s.pred.is_cuda();
    }
  };
  auto fit_on = [](const torch::Device& device, DeviceSpy& spy) {
    torch::manual_seed(0);  // the same initial weights on both devices
    auto model = fixtures::mlp();
    std::ostringstream out;
    Learner learn(model, fixtures::blobs(512, 32, 1), fixtures::blobs(256, 64, 2),
                  LearnerOptions().device(device).out(&out).progress(Progress::None).seed(5));
    CHECK(all_on(learn.model(), device));
    const auto before = learn.validate();
    const auto records = learn.fit(1, 1e-2, {spy});
    REQUIRE(records.size() == 1);
    CHECK(all_on(learn.model(), device));
    return std::make_pair(before.loss, records.front());
  };
  DeviceSpy cuda_spy, cpu_spy;
  const auto [cuda_before, cuda_epoch] = fit_on(cuda, cuda_spy);
  const auto [cpu_before, cpu_epoch] = fit_on(torch::kCPU, cpu_spy);
  // 16 training and 4 validation batches, all on the GPU.
  CHECK(cuda_spy.batches == 20);
  CHECK(cuda_spy.on_cuda == cuda_spy.batches);
  CHECK(cpu_spy.on_cuda == 0);
  CHECK(std::isfinite(cuda_epoch.train_loss));
  CHECK(cuda_epoch.valid_loss < cuda_before);
  // The same loop on both devices: the same numbers up to float rounding over 16 Adam steps.
  CHECK(cuda_before == Approx(cpu_before).epsilon(1e-5));
  CHECK(cuda_epoch.valid_loss == Approx(cpu_epoch.valid_loss).epsilon(1e-3));
  CHECK(cuda_epoch.train_loss == Approx(cpu_epoch.train_loss).epsilon(1e-3));
}

TEST_CASE("CUDA: optimize_for_inference keeps a GPU model's outputs and runs on the GPU",
          "[cuda][optimize]") {
  FASTERAI_REQUIRE_CUDA();
  const NoTF32 no_tf32;
  torch::manual_seed(4);
  auto model = small_cnn();
  model->to(cuda);
  model->eval();
  const auto x = torch::randn({2, 3, 16, 16}, torch::TensorOptions().device(cuda));
  torch::Tensor expected;
  {
    torch::NoGradGuard no_grad;
    expected = model->forward(x);
  }
  // Default options: the optimized module is timed against the eager copy on the GPU
  // (measure_latency synchronizes the device), and either may win; both must be right.
  InferenceModel fast = optimize_for_inference(model, x);
  CHECK(fast->report().measured);
  CHECK(fast->report().optimized_ms > 0);
  CHECK(fast->report().alternative_ms > 0);
  const auto y = fast(x);
  CHECK(y.is_cuda());
  CHECK(relative_error(y, expected) <= 1e-4);
  // Only the path that won is kept (the eager copy's tensors go when optimized won); each path,
  // forced, runs on the GPU with the model's outputs.
  CHECK(relative_error(fast->run(fast->report().path, x), expected) <= 1e-4);
  for (const auto path : {InferencePath::optimized, InferencePath::eager}) {
    INFO(to_string(path));
    InferenceModel forced =
        optimize_for_inference(model, x, OptimizeOptions().choose_by_measurement(false).path(path));
    CHECK(forced->report().path == path);
    const auto z = forced->run(path, x);
    CHECK(z.is_cuda());
    CHECK(relative_error(z, expected) <= 1e-4);
  }
}
