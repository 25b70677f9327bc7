// The article's compression table on VGG16-BN with 10 classes at 3x224x224, without training:
// one-shot 40% Filter/Local/L1 sparsification, Pruner, BNFolder, FCDecomposer(0.5). For each
// stage: parameters (printed like the article), MACs and latency (median and spread over
// repeated runs), plus the check that pruning and folding left the outputs unchanged.
//
//   vgg16_seed_table [--runs 5] [--threads N] [--seed 0] [--device cpu|cuda]
//
// With --device cuda the same network (same seed, same input) is built on the CPU, moved to the
// GPU and compressed there; the latency is then the GPU's (measure_latency waits for the device).
#include <fasterai/fasterai.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/fc_decomposer.hpp>
#include <fasterai/transform/pruner.hpp>

#include <iomanip>
#include <iostream>

#include "common/cli.hpp"

namespace {

struct Args {
  int runs = 5;
  int threads = 0;  // 0: LibTorch's default
  std::uint64_t seed = 0;
  int size = 224;
  std::string device = "cpu";
};

struct Stage {
  std::string name;
  std::int64_t parameters, macs;
  fasterai::LatencyStats latency;
};

Stage measure(const std::string& name, torch::nn::Sequential& model, const torch::Tensor& x,
              const Args& a) {
  using namespace fasterai;
  std::cout << "\n== " << name << "\nTotal parameters : " << with_thousands(count_parameters(model))
            << "\nMACs             : " << with_thousands(count_macs(model, x.sizes().slice(1).vec()).total())
            << std::endl;
  const auto latency = measure_latency(
      model, x, LatencyOptions().warmup(1).runs(a.runs).threads(a.threads));
  std::cout << std::fixed << std::setprecision(1) << "Latency          : " << latency.median_ms
            << " ms median (IQR " << latency.iqr_ms << " ms, " << latency.runs << " runs, "
            << a.threads << " threads" << (a.device == "cpu" ? "" : ", " + a.device) << ")\n";
  return {name, count_parameters(model), count_macs(model, x.sizes().slice(1).vec()).total(), latency};
}

// max|new - old| / max|old| on the same input, in eval mode. In full float32: on CUDA, cuDNN's
// convolutions run in TF32 by default (the latency is measured that way), whose rounding alone
// would exceed the exactness threshold below.
double relative_change(torch::nn::Sequential& before, torch::nn::Sequential& after,
                       const torch::Tensor& x) {
  struct NoTF32 {
    bool cudnn = at::globalContext().allowTF32CuDNN(), cublas = at::globalContext().allowTF32CuBLAS();
    NoTF32() {
      at::globalContext().setAllowTF32CuDNN(false);
      at::globalContext().setAllowTF32CuBLAS(false);
    }
    ~NoTF32() {
      at::globalContext().setAllowTF32CuDNN(cudnn);
      at::globalContext().setAllowTF32CuBLAS(cublas);
    }
  } const no_tf32;
  torch::NoGradGuard no_grad;
  before->eval();
  after->eval();
  const auto a = before->forward(x), b = after->forward(x);
  return (b - a).abs().max().item<double>() / a.abs().max().item<double>();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  example::Cli cli("vgg16_seed_table", "The article's table on VGG16-BN (10 classes), no training.");
  cli.option("--runs", a.runs, "timed forward passes per stage")
      .option("--threads", a.threads, "intra-op threads for the latency (0: LibTorch's default)")
      .option("--size", a.size, "input height and width")
      .option("--seed", a.seed, "seed of the initialization and the input")
      .option("--device", a.device, "where the network runs: cpu or cuda");
  return cli.run(argc, argv, [&] {
    using namespace fasterai;
    if (a.device != "cpu" && a.device != "cuda")
      throw example::usage_error("bad value '" + a.device + "' for --device (cpu or cuda)");
    if (a.device == "cuda" && !torch::cuda::is_available())
      throw std::runtime_error("--device cuda: this LibTorch sees no CUDA device");
    const torch::Device device = a.device == "cuda" ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
    if (a.threads == 0) a.threads = torch::get_num_threads();
    torch::manual_seed(a.seed);
    auto original = models::vgg16_bn(10);
    original->eval();
    // Give the BatchNorms non-trivial statistics, as a trained network has, so that folding
    // is really exercised.
    {
      torch::NoGradGuard no_grad;
      for (const auto& l : layers(original, LayerKind::BatchNorm2d)) {
        auto* bn = l.as<torch::nn::BatchNorm2dImpl>();
        bn->running_mean.normal_(0, 0.1);
        bn->running_var.uniform_(0.5, 1.5);
        bn->weight.uniform_(0.5, 1.5);
        bn->bias.normal_(0, 0.1);
      }
    }
    // Drawn on the CPU whatever the device, so that both devices see the same network and input.
    original->to(device);
    const auto x = torch::randn({1, 3, a.size, a.size}).to(device);
    std::vector<Stage> stages;
    stages.push_back(measure("VGG16-BN (10 classes)", original, x, a));

    auto sparse = clone_model(original);
    FilterSparsifier<> sparsifier(sparse);
    sparsifier.prune(40);
    std::cout << "\nFilter/Local/L1 one-shot at 40%:\n" << sparsifier.report();
    stages.push_back(measure("sparsified (zeros in place)", sparse, x, a));

    auto pruned = Pruner().prune(sparse);
    stages.push_back(measure("Pruner", pruned, x, a));
    const double prune_change = relative_change(sparse, pruned, x);

    auto folded = BNFolder().fold(pruned);
    stages.push_back(measure("BNFolder", folded, x, a));
    const double fold_change = relative_change(pruned, folded, x);

    auto factorized = FCDecomposer().decompose(folded, 0.5);
    stages.push_back(measure("FCDecomposer(0.5)", factorized, x, a));
    const double factor_change = relative_change(folded, factorized, x);

    std::cout << "\n" << std::left << std::setw(30) << "stage" << std::right << std::setw(14)
              << "parameters" << std::setw(18) << "MACs" << std::setw(14) << "latency ms"
              << std::setw(10) << "speedup" << std::setw(12) << "MAC ratio" << "\n";
    for (const auto& s : stages)
      std::cout << std::left << std::setw(30) << s.name << std::right << std::setw(14)
                << with_thousands(s.parameters) << std::setw(18) << with_thousands(s.macs)
                << std::setw(14) << std::setprecision(1) << s.latency.median_ms << std::setw(9)
                << std::setprecision(2) << stages.front().latency.median_ms / s.latency.median_ms
                << "x" << std::setw(11) << double(stages.front().macs) / double(s.macs) << "x\n";
    std::cout << std::scientific << std::setprecision(2)
              << "\nOutput change, max|new - old| / max|old| on the same input:\n"
              << "  Pruner       " << prune_change << (prune_change <= 1e-5 ? "  (exact)" : "  (NOT exact)") << "\n"
              << "  BNFolder     " << fold_change << (fold_change <= 1e-5 ? "  (exact)" : "  (NOT exact)") << "\n"
              << "  FCDecomposer " << factor_change << "  (an approximation: fine-tune after it)\n";
    return prune_change <= 1e-5 && fold_change <= 1e-5 ? 0 : 1;
  });
}
