// int8 against fp32, batch 1, one thread, on the compressed VGG16-BN (10 classes, 3×224×224:
// 40% of the filters removed by Filter/Local/L1 and the Pruner, BatchNorms folded) and on the
// walkthrough's compact VGG (1×28×28, pruned and folded the same way). Untrained weights with
// trained-looking BatchNorms: latency does not depend on the values.
//
//   Quant_Interleaved/<net>   each iteration runs fp32, int8 static and int8 dynamic in turn
//                             and times each; counters: the three medians (ms) and the speedups
//                             fp32/int8 — the numbers to quote on a busy machine, since the
//                             variants share whatever load there is
//   Quant_Latency/<net>_<variant>   one variant alone, Google Benchmark's own timing
//   Quant_TorchAO/<net>       Python's torch.ao on the same architecture
//                             (scripts/quant_baseline.py, run from here so that it is the same
//                             run); skipped without /usr/bin/python3 and torch
//   Quant_ResNet50_Interleaved   the zoo's ResNet-50: fp32 eager, fp32 optimized for inference
//                             and int8 through the traced graph, interleaved
//   Quant_Calibrate/vgg16_bn  Calibrator: fold, plan, observe 2 batches, convert
//
//   fasterai_benchmarks --benchmark_filter=Quant
//
// int8 static: Conv2d packed for oneDNN and Linear for QNNPACK (quant::QuantEngines' defaults,
// which measurement chose: see docs/quantization.md), min-max calibration on 2 random batches.
//
// One thread means one thread for BLAS too: Debian's LibTorch runs fp32 Linear layers (and
// some convolutions) through OpenBLAS, whose own thread pool torch::set_num_threads does not
// size. On a loaded machine its spinning threads made the fp32 compact VGG 80× slower in wall
// time than with one BLAS thread. The benchmarks therefore set OpenBLAS to one thread when it
// is loaded (the same as OPENBLAS_NUM_THREADS=1).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "benchmark_models.hpp"
#include <fasterai/core/statistics.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

using FilterL1 = fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local,
                                      fasterai::criteria::L1, fasterai::schedule::OneShot>;

enum class Network { vgg16_bn, compact_vgg };
enum class Variant { fp32, int8_static, int8_dynamic };

std::vector<std::int64_t> input_shape(Network network) {
  return network == Network::vgg16_bn ? std::vector<std::int64_t>{1, 3, 224, 224}
                                      : std::vector<std::int64_t>{1, 1, 28, 28};
}

// The compressed fp32 model and its two int8 versions, built once per network.
struct Models {
  torch::nn::Sequential fp32, int8_static, int8_dynamic;
};

torch::nn::Sequential compressed(Network network) {
  torch::manual_seed(0);
  auto model = network == Network::vgg16_bn ? fasterai::models::vgg16_bn(10)
                                            : fasterai::models::compact_vgg();
  fasterai::bench::trained_looking_batch_norms(*model);
  model->eval();
  FilterL1(model).prune(40.0);
  auto folded = fasterai::BNFolder().fold(fasterai::Pruner().prune(model));
  folded->eval();
  return folded;
}

std::vector<torch::Tensor> calibration_batches(Network network) {
  torch::manual_seed(1);
  return {torch::randn(input_shape(network)), torch::randn(input_shape(network))};
}

Models& models(Network network) {
  static std::map<Network, Models> built;
  auto it = built.find(network);
  if (it == built.end()) {
    Models m;
    m.fp32 = compressed(network);
    m.int8_static = fasterai::quantize_static(m.fp32, calibration_batches(network));
    m.int8_dynamic = fasterai::quantize_dynamic(m.fp32);
    it = built.emplace(network, m).first;
  }
  return it->second;
}

torch::nn::Sequential& model_of(Network network, Variant variant) {
  auto& m = models(network);
  return variant == Variant::fp32 ? m.fp32 : variant == Variant::int8_static ? m.int8_static : m.int8_dynamic;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void Quant_Interleaved(benchmark::State& state, Network network) {
  fasterai::bench::one_thread();
  c10::InferenceMode inference;
  const auto input = torch::randn(input_shape(network));
  const Variant variants[] = {Variant::fp32, Variant::int8_static, Variant::int8_dynamic};
  for (Variant v : variants) model_of(network, v)->forward(input);  // warm-up (oneDNN primitives)
  std::map<Variant, std::vector<double>> ms;
  for (auto _ : state) {
    double total = 0;
    for (Variant v : variants) {
      const auto start = std::chrono::steady_clock::now();
      auto out = model_of(network, v)->forward(input);
      benchmark::DoNotOptimize(out.data_ptr());
      const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      ms[v].push_back(t);
      total += t;
    }
    state.SetIterationTime(total / 1e3);
  }
  const double fp32 = median(ms[Variant::fp32]), q = median(ms[Variant::int8_static]),
               d = median(ms[Variant::int8_dynamic]);
  state.counters["fp32_ms"] = fp32;
  state.counters["int8_static_ms"] = q;
  state.counters["int8_dynamic_ms"] = d;
  state.counters["speedup_static"] = fp32 / q;
  state.counters["speedup_dynamic"] = fp32 / d;
  state.counters["size_ratio_static"] = double(fasterai::model_size_bytes(models(network).fp32)) /
                                        double(fasterai::model_size_bytes(models(network).int8_static));
}

void Quant_Latency(benchmark::State& state, Network network, Variant variant) {
  fasterai::bench::one_thread();
  c10::InferenceMode inference;
  auto& model = model_of(network, variant);
  const auto input = torch::randn(input_shape(network));
  model->forward(input);
  for (auto _ : state) {
    auto out = model->forward(input);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  state.counters["bytes"] = double(fasterai::model_size_bytes(model));
}

void Quant_Calibrate(benchmark::State& state) {
  fasterai::bench::one_thread();
  const auto& fp32 = models(Network::vgg16_bn).fp32;
  const auto batches = calibration_batches(Network::vgg16_bn);
  for (auto _ : state) {
    auto q = fasterai::quantize_static(fp32, batches);
    benchmark::DoNotOptimize(q.ptr().get());
  }
}

// ResNet-50 (the zoo's, 1000 classes, 3×224×224, trained-looking BatchNorms): fp32 as written
// (its forward, eager), fp32 optimized for inference (TorchScript, BatchNorms folded, frozen:
// deploy/optimize.hpp) and int8 through its traced graph (quant/traced_calibrator.hpp: residual
// adds in int8), calibrated on 2 random batches.
struct ResNetVariants {
  fasterai::models::ResNet eager{nullptr};
  fasterai::InferenceModel optimized{nullptr};
  torch::jit::Module int8;
};

ResNetVariants& resnet50_variants() {
  static ResNetVariants built = [] {
    ResNetVariants v;
    torch::manual_seed(0);
    v.eager = fasterai::models::resnet50(1000);
    fasterai::bench::trained_looking_batch_norms(*v.eager);
    v.eager->eval();
    const auto example = torch::randn({1, 3, 224, 224});
    // The optimized module as labelled, not the faster path optimize_for_inference would keep.
    v.optimized = fasterai::optimize_for_inference(
        v.eager, example, fasterai::OptimizeOptions().choose_by_measurement(false));
    torch::manual_seed(1);
    const std::vector<torch::Tensor> batches{torch::randn({1, 3, 224, 224}), torch::randn({1, 3, 224, 224})};
    v.int8 = fasterai::quantize_traced(v.eager, example, batches);
    return v;
  }();
  return built;
}

std::size_t saved_bytes(const torch::jit::Module& m) {
  std::ostringstream os;
  m.save(os);
  return os.str().size();
}

void Quant_ResNet50_Interleaved(benchmark::State& state) {
  fasterai::bench::one_thread();
  c10::InferenceMode inference;
  auto& v = resnet50_variants();
  const auto input = torch::randn({1, 3, 224, 224});
  const std::function<torch::Tensor()> run[] = {
      [&] { return v.eager->forward(input); }, [&] { return v.optimized->forward(input); },
      [&] { return v.int8.forward({input}).toTensor(); }};
  for (const auto& f : run) f(), f();  // warm-up: oneDNN primitives, the graph executor's plans
  std::vector<double> ms[3];
  for (auto _ : state) {
    double total = 0;
    for (int i = 0; i < 3; ++i) {
      const auto start = std::chrono::steady_clock::now();
      auto out = run[i]();
      benchmark::DoNotOptimize(out.data_ptr());
      const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
      ms[i].push_back(t);
      total += t;
    }
    state.SetIterationTime(total / 1e3);
  }
  const double eager = median(ms[0]), optimized = median(ms[1]), int8 = median(ms[2]);
  state.counters["fp32_ms"] = eager;
  state.counters["fp32_optimized_ms"] = optimized;
  state.counters["int8_ms"] = int8;
  state.counters["speedup_vs_fp32"] = eager / int8;
  state.counters["speedup_vs_optimized"] = optimized / int8;
  state.counters["size_ratio"] = double(fasterai::model_size_bytes(v.eager)) / double(saved_bytes(v.int8));
}

// Python's torch.ao on the same architecture, run as a child process and read back as JSON.
void Quant_TorchAO(benchmark::State& state, const std::string& model) {
  const auto script = std::filesystem::path(__FILE__).parent_path().parent_path() / "scripts" / "quant_baseline.py";
  const bool python = std::filesystem::exists("/usr/bin/python3") && std::filesystem::exists(script) &&
                      std::system("/usr/bin/python3 -c 'import torch, torchvision' 2>/dev/null") == 0;
  if (!python) {
    state.SkipWithError("no /usr/bin/python3 with torch and torchvision, or no scripts/quant_baseline.py");
    return;
  }
  const std::string command =
      "OPENBLAS_NUM_THREADS=1 /usr/bin/python3 " + script.string() + " --model " + model + " --runs 15 2>/dev/null";
  double fp32 = 0, int8 = 0;
  for (auto _ : state) {
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
    std::string out;
    char buffer[512];
    while (pipe && fgets(buffer, sizeof buffer, pipe.get()) != nullptr) out += buffer;
    const auto number = [&](const std::string& key) {
      const auto at = out.find("\"" + key + "\": ");
      return at == std::string::npos ? 0.0 : std::stod(out.substr(at + key.size() + 4));
    };
    fp32 = number("fp32_ms");
    int8 = number("int8_ms");
    if (fp32 <= 0 || int8 <= 0) {
      state.SkipWithError(("quant_baseline.py gave no result: " + out).c_str());
      return;
    }
  }
  state.counters["fp32_ms"] = fp32;
  state.counters["int8_ms"] = int8;
  state.counters["speedup"] = fp32 / int8;
}

void repeated(benchmark::internal::Benchmark* b, benchmark::TimeUnit unit) {
  b->UseRealTime()->Unit(unit)->Repetitions(3)->ReportAggregatesOnly(true);
}

}  // namespace

BENCHMARK_CAPTURE(Quant_Interleaved, vgg16_bn, Network::vgg16_bn)
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(15)->Repetitions(3)->ReportAggregatesOnly(true);
BENCHMARK_CAPTURE(Quant_Interleaved, compact_vgg, Network::compact_vgg)
    ->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(300)->Repetitions(3)->ReportAggregatesOnly(true);
BENCHMARK_CAPTURE(Quant_TorchAO, vgg16_bn, std::string("vgg16_bn"))
    ->UseRealTime()->Unit(benchmark::kSecond)->Iterations(1)->Repetitions(1);
BENCHMARK(Quant_ResNet50_Interleaved)
    ->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(15)->Repetitions(3)->ReportAggregatesOnly(true);
BENCHMARK_CAPTURE(Quant_TorchAO, resnet50, std::string("resnet50"))
    ->UseRealTime()->Unit(benchmark::kSecond)->Iterations(1)->Repetitions(1);
BENCHMARK_CAPTURE(Quant_Latency, vgg16_bn_fp32, Network::vgg16_bn, Variant::fp32)
    ->Apply([](auto* b) { repeated(b, benchmark::kMillisecond); });
BENCHMARK_CAPTURE(Quant_Latency, vgg16_bn_int8_static, Network::vgg16_bn, Variant::int8_static)
    ->Apply([](auto* b) { repeated(b, benchmark::kMillisecond); });
BENCHMARK_CAPTURE(Quant_Latency, vgg16_bn_int8_dynamic, Network::vgg16_bn, Variant::int8_dynamic)
    ->Apply([](auto* b) { repeated(b, benchmark::kMillisecond); });
BENCHMARK_CAPTURE(Quant_Latency, compact_vgg_fp32, Network::compact_vgg, Variant::fp32)
    ->Apply([](auto* b) { repeated(b, benchmark::kMicrosecond); });
BENCHMARK_CAPTURE(Quant_Latency, compact_vgg_int8_static, Network::compact_vgg, Variant::int8_static)
    ->Apply([](auto* b) { repeated(b, benchmark::kMicrosecond); });
BENCHMARK_CAPTURE(Quant_Latency, compact_vgg_int8_dynamic, Network::compact_vgg, Variant::int8_dynamic)
    ->Apply([](auto* b) { repeated(b, benchmark::kMicrosecond); });
BENCHMARK(Quant_Calibrate)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(1)->Repetitions(3);
