// Batch and thread scaling: how the gain of pruning and int8 grows or shrinks with the batch
// size and the thread count, next to the MACs it removes.
//
//   Scaling/<model>/<variant>/batch:<b>/threads:<t>
//     model    vgg16_bn     VGG16-BN, 10 classes, 3×224×224
//              resnet50     ResNet-50, 1000 classes, 3×224×224
//              mobilenet_v2 MobileNetV2, 1000 classes, 3×224×224
//              vit_ti_16    models::vit at ViT-Ti/16's shape (DeiT-Tiny): 224×224, patches of
//                           16, 12 layers of 3 heads, hidden 192, MLP 768, 1000 classes
//     variant  original     untrained weights, BatchNorm statistics as after training, eager
//              pruned       Filter/Local/L1 at 50% through the traced graph, then
//                           Pruner().prune_ (exact). CNNs: every coupled group keeps half its
//                           channels; the ViT: half of every block's MLP hidden units (its
//                           hidden size sits under LayerNorms, which exact pruning leaves
//                           alone). BatchNorms are kept, as in the original, so that the two
//                           differ only by the widths. Eager.
//              pruned_int8  CNNs: the pruned model, static int8 through its traced graph
//                           (quantize_traced: BatchNorms folded, oneDNN, 7-bit activations,
//                           min-max on 2 random images), run as the TorchScript module it
//                           returns. The ViT: the pruned model with its MLPs' and head's
//                           Linears dynamic int8 (quantize_dynamic, the library's default
//                           Linear engine), eager; attention stays fp32.
//     batch    images per forward; threads  torch::set_num_threads and OpenBLAS's pool
//   Time: the median of the timed runs of this process (manual time, per batch); counters:
//   batch, threads, images_per_s, MACs per image (the fp32 model's; an int8 model counts the
//   MACs of the pruned model it quantizes), runs, warmup runs, min/max of the runs (ms), and
//   once per model the largest |pruned − masked| / max |masked| and |int8 − pruned| /
//   max |pruned| of the logits at batch 1 (pruning is exact; int8 is not).
//
// Runs are sized by time, not count (a VGG16-BN forward at batch 64 is about 1 TMAC): after
// FASTERAI_SCALING_WARMUP_SECONDS of warm-up (default 0.3 s, at least one run, two for the
// TorchScript int8 modules, whose executor profiles its first run; none for an eager point
// whose first run takes over a second, see Scaling), timed runs until
// FASTERAI_SCALING_MIN_SECONDS (default 0.5 s, at least one run).
// With FASTERAI_SCALING_SHAPES=<dir>, building a model writes <dir>/<model>.json: its MACs,
// parameters and the pruned model's state_dict shapes, from which scripts/scaling_baseline.py
// builds the same pruned architecture in Python.
//
// One process is one round; scripts/scaling_curves.sh interleaves rounds with Python's and
// draws the curves:
//   fasterai_benchmarks --benchmark_filter='^Scaling/resnet50/.*/batch:(1|8)/'
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "benchmark_models.hpp"
#include <fasterai/core/latency.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/models/mobilenet_v2.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/models/vgg.hpp>
#include <fasterai/models/vit.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/pruner.hpp>

namespace {

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;
using FilterL1 = fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1>;

constexpr double kSparsity = 50.0;
constexpr double kLongRunMs = 1000.0;
const char* const kModels[] = {"vgg16_bn", "resnet50", "mobilenet_v2", "vit_ti_16"};
const char* const kVariants[] = {"original", "pruned", "pruned_int8"};
constexpr int kBatches[] = {1, 8, 32, 64};
constexpr int kThreads[] = {1, 2};

double env_seconds(const char* name, double fallback) {
  const char* v = std::getenv(name);
  return v ? std::atof(v) : fallback;
}

struct Variant {
  Forward forward;
  std::int64_t macs = 0;  // per image
  bool scripted = false;  // a TorchScript module (its executor profiles the first run)
};

struct Built {
  std::map<std::string, Variant> variants;
  double prune_difference = 0, int8_difference = 0;
};

double relative_difference(const torch::Tensor& a, const torch::Tensor& reference) {
  return (a - reference).abs().max().item<double>() / reference.abs().max().item<double>();
}

// The pruned model's state_dict shapes and the MACs, for the Python side of the comparison.
void write_shapes(const std::string& name, torch::nn::Module& pruned, std::int64_t original_macs,
                  std::int64_t pruned_macs, std::int64_t original_parameters) {
  const char* dir = std::getenv("FASTERAI_SCALING_SHAPES");
  if (dir == nullptr) return;
  std::filesystem::create_directories(dir);
  std::ofstream out(std::filesystem::path(dir) / (name + ".json"));
  out << "{\"model\": \"" << name << "\", \"sparsity\": " << kSparsity << ", \"macs_original\": " << original_macs
      << ", \"macs_pruned\": " << pruned_macs << ", \"parameters_original\": " << original_parameters
      << ", \"parameters_pruned\": " << fasterai::count_parameters(pruned) << ", \"shapes\": {";
  bool first = true;
  const auto emit = [&](const std::string& key, const torch::Tensor& t) {
    out << (first ? "" : ", ") << "\"" << key << "\": [";
    for (std::int64_t d = 0; d < t.dim(); ++d) out << (d ? ", " : "") << t.size(d);
    out << "]";
    first = false;
  };
  for (const auto& p : pruned.named_parameters()) emit(p.key(), p.value());
  for (const auto& b : pruned.named_buffers()) emit(b.key(), b.value());
  out << "}}\n";
}

// Calibration for static int8: two random images, as the Quant benchmarks.
std::vector<torch::Tensor> calibration_batches() {
  torch::manual_seed(1);
  return {torch::randn({1, 3, 224, 224}), torch::randn({1, 3, 224, 224})};
}

// A CNN of the zoo: original, pruned and pruned int8. `make` builds the same untrained
// network each time it is called (fixed seed).
template <class Make>
Built build_cnn(const std::string& name, Make make) {
  const auto x = torch::randn({1, 3, 224, 224});
  const std::vector<std::int64_t> shape{3, 224, 224};
  auto original = make();
  auto pruned = make();
  FilterL1(pruned, x, fasterai::SparsifierOptions(kSparsity)).prune(kSparsity);
  torch::Tensor masked, after;
  {
    torch::NoGradGuard no_grad;
    masked = pruned->forward(x);
  }
  fasterai::Pruner().prune_(pruned, x);
  pruned->eval();
  auto int8 = fasterai::quantize_traced(pruned, x, calibration_batches());
  Built b;
  {
    c10::InferenceMode inference;
    after = pruned->forward(x);
    b.prune_difference = relative_difference(after, masked);
    b.int8_difference = relative_difference(int8.forward({x}).toTensor(), after);
  }
  const auto original_macs = fasterai::count_macs(original, shape).total();
  const auto pruned_macs = fasterai::count_macs(pruned, shape).total();
  write_shapes(name, *pruned, original_macs, pruned_macs, fasterai::count_parameters(original));
  b.variants["original"] = {[original](const torch::Tensor& in) mutable { return original->forward(in); },
                            original_macs};
  b.variants["pruned"] = {[pruned](const torch::Tensor& in) mutable { return pruned->forward(in); }, pruned_macs};
  b.variants["pruned_int8"] = {[int8](const torch::Tensor& in) mutable { return int8.forward({in}).toTensor(); },
                               pruned_macs, /*scripted=*/true};
  return b;
}

template <class Network>
Network trained_looking(Network network) {
  fasterai::bench::trained_looking_batch_norms(*network);
  network->eval();
  return network;
}

fasterai::models::VisionTransformer make_vit() {
  torch::manual_seed(0);
  auto vit = fasterai::models::vit(fasterai::models::VisionTransformerOptions(224, 16)
                                       .num_layers(12)
                                       .num_heads(3)
                                       .hidden_dim(192)
                                       .mlp_dim(768)
                                       .num_classes(1000));
  torch::NoGradGuard no_grad;
  for (auto& p : vit->heads->parameters()) p.normal_(0.0, 0.02);  // torchvision zeroes the head
  vit->eval();
  return vit;
}

// quantize_dynamic returns a Sequential; the ViT's members are NamedSequentials (its forward
// calls them), so the int8 layers go into a NamedSequential under the same names.
fasterai::NamedSequential dynamic_int8(const fasterai::NamedSequential& stage) {
  const auto q = fasterai::quantize_dynamic(stage);
  const auto names = q->named_children();
  fasterai::NamedSequential out;
  for (std::size_t i = 0; i < q->size(); ++i) out->push_back(names[i].key(), q->begin()[static_cast<std::ptrdiff_t>(i)]);
  out->eval();
  return out;
}

Built build_vit() {
  const auto x = torch::randn({1, 3, 224, 224});
  const std::vector<std::int64_t> shape{3, 224, 224};
  auto original = make_vit();
  auto pruned = make_vit();
  std::vector<std::string> mlp_inputs;  // each block's first MLP Linear: its outputs are the units
  for (std::size_t i = 0; i < pruned->encoder->layers->size(); ++i)
    mlp_inputs.push_back("encoder.layers.encoder_layer_" + std::to_string(i) + ".mlp.0");
  FilterL1(pruned, x, fasterai::SparsifierOptions(kSparsity).include(mlp_inputs)).prune(kSparsity);
  torch::Tensor masked, after;
  {
    torch::NoGradGuard no_grad;
    masked = pruned->forward(x);
  }
  fasterai::Pruner().prune_(pruned, x);
  pruned->eval();
  fasterai::models::VisionTransformer int8(
      std::dynamic_pointer_cast<fasterai::models::VisionTransformerImpl>(pruned->clone()));
  for (const auto& child : int8->encoder->layers->children()) {
    auto* block = child->as<fasterai::models::EncoderBlockImpl>();
    block->mlp = block->replace_module("mlp", dynamic_int8(block->mlp));
  }
  int8->heads = int8->replace_module("heads", dynamic_int8(int8->heads));
  int8->eval();
  Built b;
  {
    c10::InferenceMode inference;
    after = pruned->forward(x);
    b.prune_difference = relative_difference(after, masked);
    b.int8_difference = relative_difference(int8->forward(x), after);
  }
  const auto original_macs = fasterai::count_macs(original, shape).total();
  const auto pruned_macs = fasterai::count_macs(pruned, shape).total();
  write_shapes("vit_ti_16", *pruned, original_macs, pruned_macs, fasterai::count_parameters(original));
  b.variants["original"] = {[original](const torch::Tensor& in) mutable { return original->forward(in); },
                            original_macs};
  b.variants["pruned"] = {[pruned](const torch::Tensor& in) mutable { return pruned->forward(in); }, pruned_macs};
  b.variants["pruned_int8"] = {[int8](const torch::Tensor& in) mutable { return int8->forward(in); }, pruned_macs};
  return b;
}

// Every variant of a model, built once per process.
Built& built(const std::string& model) {
  static std::map<std::string, Built> cache;
  if (auto it = cache.find(model); it != cache.end()) return it->second;
  // Building (tracing, calibrating) on the machine's threads; timing sets its own count.
  Built b;
  if (model == "vgg16_bn") {
    b = build_cnn(model, [] {
      torch::manual_seed(0);
      return trained_looking(fasterai::models::vgg16_bn(10));
    });
  } else if (model == "resnet50") {
    b = build_cnn(model, [] {
      torch::manual_seed(0);
      return trained_looking(fasterai::models::resnet50(1000));
    });
  } else if (model == "mobilenet_v2") {
    b = build_cnn(model, [] {
      torch::manual_seed(0);
      return trained_looking(fasterai::models::mobilenet_v2(1000));
    });
  } else {
    b = build_vit();
  }
  return cache.emplace(model, std::move(b)).first->second;
}

const torch::Tensor& input(int batch) {
  static std::map<int, torch::Tensor> inputs;
  if (auto it = inputs.find(batch); it != inputs.end()) return it->second;
  torch::manual_seed(2);
  return inputs.emplace(batch, torch::randn({batch, 3, 224, 224})).first->second;
}

double run_ms(Variant& v, const torch::Tensor& x) {
  const auto start = std::chrono::steady_clock::now();
  auto out = v.forward(x);
  benchmark::DoNotOptimize(out.data_ptr());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

void Scaling(benchmark::State& state, const std::string& model, const std::string& variant, int batch, int threads) {
  Built& b = built(model);
  Variant& v = b.variants.at(variant);
  const torch::Tensor& x = input(batch);
  torch::set_num_threads(threads);
  fasterai::detail::BlasThreads::set(threads);
  const double warmup_s = env_seconds("FASTERAI_SCALING_WARMUP_SECONDS", 0.3);
  const double min_s = env_seconds("FASTERAI_SCALING_MIN_SECONDS", 0.5);
  c10::InferenceMode inference;
  // Warm-up. The TorchScript int8 modules always get two runs (their executor profiles the
  // first run at a new shape and optimizes at the second). An eager first run that takes
  // longer than kLongRunMs counts as the first timed run: at such sizes the first run at a new
  // batch shape costs the same as the next within noise (VGG16-BN at batch 8 and 32, measured),
  // and a second run would double the cost of the largest points.
  std::vector<double> ms;
  int warmup = 0;
  for (double spent = 0; warmup < (v.scripted ? 2 : 1) || spent < warmup_s * 1e3; ++warmup) {
    const double t = run_ms(v, x);
    if (warmup == 0 && !v.scripted && t > kLongRunMs) {
      ms.push_back(t);
      break;
    }
    spent += t;
  }
  for (auto _ : state) {
    for (double spent = ms.empty() ? 0.0 : ms.front(); ms.empty() || spent < min_s * 1e3;) {
      ms.push_back(run_ms(v, x));
      spent += ms.back();
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    state.SetIterationTime(fasterai::detail::quantile_sorted(sorted, 0.5) / 1e3);
  }
  std::sort(ms.begin(), ms.end());
  const double median = fasterai::detail::quantile_sorted(ms, 0.5);
  state.counters["batch"] = batch;
  state.counters["threads"] = threads;
  state.counters["images_per_s"] = batch / (median / 1e3);
  state.counters["MACs"] = double(v.macs);
  state.counters["runs"] = double(ms.size());
  state.counters["warmup"] = warmup;
  state.counters["min_ms"] = ms.front();
  state.counters["max_ms"] = ms.back();
  if (variant == "original" && batch == 1) {
    state.counters["prune_diff"] = b.prune_difference;
    state.counters["int8_diff"] = b.int8_difference;
  }
}

struct Registration {
  Registration() {
    // Variants of a point side by side, so that their ratio compares neighbours in time.
    for (const char* model : kModels)
      for (int threads : kThreads)
        for (int batch : kBatches)
          for (const char* variant : kVariants) {
            const std::string name = std::string("Scaling/") + model + "/" + variant + "/batch:" +
                                     std::to_string(batch) + "/threads:" + std::to_string(threads);
            benchmark::RegisterBenchmark(name.c_str(), Scaling, std::string(model), std::string(variant), batch,
                                         threads)
                ->UseManualTime()
                ->Iterations(1)
                ->Unit(benchmark::kMillisecond);
          }
  }
} registration;

}  // namespace
