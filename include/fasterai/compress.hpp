#pragma once
// Compress for deployment: the common path from a trained model to a file to ship, in one call.
//
//   auto result = fasterai::compress_for_deployment(model, torch::randn({1, 3, 224, 224}),
//       fasterai::CompressOptions().target(50).export_path("model.pt"));
//   std::cout << result.report;       // parameters, MACs, size, latency at batch 1 and 32, path
//   torch::Tensor y = result.inference(x);   // the faster of eager and optimized, measured
//
// The steps, each the library's own transform, on a deep copy (the model is left as it was):
//   1. Filter sparsity at `target` percent of every coupled channel group (Filter/Local/L1,
//      one shot) over the model's channel graph: static for a Sequential, traced otherwise;
//   2. the Pruner removes the zero channels (exact);
//   3. the BNFolder folds BatchNorms into the layers before them (exact; `fold_bn`);
//   4. optimize_for_inference on the example: the faster of the optimized TorchScript module and
//      the eager model, measured (deploy/optimize.hpp);
//   5. optionally int8 weights and activations (quantize_traced, calibrated on the batches
//      given; `int8`);
//   6. optionally an export (`export_path`): the int8 module, or the compressed model exported
//      by to_torchscript — a file Python's torch.jit.load and LibTorch's torch::jit::load read.
// Then the report: parameters, MACs and size before and after, latency of the original and the
// compressed model at each batch size (original and compressed timed alternately, medians over
// the rounds), what the masked and the compressed model's outputs differ by, which path the
// InferenceModel runs.
//
// Accuracy needs data and fine-tuning, which this call does not do: prune by a schedule while
// training (SparsifyCallback) for the best accuracy, then use this call with target 0 to remove,
// fold, optimize and export what training zeroed.
//
// The model must be copyable (a Sequential, or a torch::nn::Cloneable such as the zoo's models):
// the call works on a copy so that an error at any step leaves the model as it was. Options are
// checked, and the export path tried, before any work; the file is written to a temporary name
// beside it and renamed, so a failed export leaves no file and an existing file unchanged.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/latency.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/transform/bn_folder.hpp>
#include <fasterai/transform/pruner.hpp>

namespace fasterai {

struct CompressOptions {
  CompressOptions() = default;
  TORCH_ARG(double, target) = 50;            // percent of the channels of each group, [0, 100)
  TORCH_ARG(std::int64_t, round_to) = 1;     // keep channel counts multiples of this (Sparsifier)
  TORCH_ARG(bool, fold_bn) = true;           // step 3
  TORCH_ARG(bool, int8) = false;             // step 5; needs `calibration`
  TORCH_ARG(std::vector<torch::Tensor>, calibration) = {};  // batches for the int8 ranges
  TORCH_ARG(std::string, export_path) = "";  // step 6; empty: nothing written
  TORCH_ARG(OptimizeOptions, optimize) = {};  // step 4
  // Latency in the report: at these batch sizes (the example's first sample repeated), each
  // `latency_rounds` times alternately for the original and the compressed model with
  // `latency`'s warm-up, runs and threads. No batch sizes: no timing.
  TORCH_ARG(std::vector<std::int64_t>, latency_batches) = std::vector<std::int64_t>{1, 32};
  TORCH_ARG(int, latency_rounds) = 3;
  TORCH_ARG(LatencyOptions, latency) = LatencyOptions().warmup(2).runs(10);
};

// Latency of one batch size, medians in ms.
struct BatchLatency {
  std::int64_t batch = 0;
  double original_ms = 0;
  double compressed_ms = 0;
  double int8_ms = 0;  // 0 without int8
};

struct CompressReport {
  std::int64_t parameters_before = 0, parameters_after = 0;
  std::int64_t macs_before = 0, macs_after = 0;  // per sample (count_macs)
  std::int64_t bytes_before = 0, bytes_after = 0;  // parameters and buffers (model_size_bytes)
  std::int64_t channels_removed = 0;               // by the Pruner
  std::size_t batch_norms_folded = 0;              // by the BNFolder
  // max |compressed − masked| / max |masked| of the outputs on the example (absolute when the
  // masked outputs are all 0): the masked model is the copy after step 1, so this is what steps
  // 2 and 3 changed — float rounding, as they are exact. Relative to the outputs' own scale, so
  // that it reads the same for a network whose untrained outputs are tiny.
  double max_difference = 0;
  std::vector<BatchLatency> latency;
  OptimizeReport inference;  // step 4: the path `inference` runs and what it measured
  bool int8 = false;
  // The int8 module's size as a file: serialized as export_path gets it (int8 weights, their
  // scales, fp32 biases, and the graph's code). Its tensors are not parameters or buffers of a
  // torch::nn::Module, so model_size_bytes cannot count them; 0 without int8.
  std::int64_t int8_bytes = 0;
  std::string exported;      // the file written, or empty
};

// A table: before, after and their ratio per row; then the path and the file.
inline std::ostream& operator<<(std::ostream& out, const CompressReport& r) {
  const auto row = [&](const std::string& name, const std::string& before, const std::string& after, double ratio) {
    out << std::left << std::setw(22) << name << std::right << std::setw(18) << before << std::setw(18) << after
        << std::setw(9) << std::fixed << std::setprecision(2) << ratio << "x\n";
  };
  const auto ms = [](double v) {
    std::ostringstream s;
    s << std::fixed << std::setprecision(3) << v << " ms";
    return s.str();
  };
  out << std::left << std::setw(22) << "" << std::right << std::setw(18) << "original" << std::setw(18)
      << "compressed" << std::setw(10) << "ratio" << "\n";
  row("parameters", with_thousands(r.parameters_before), with_thousands(r.parameters_after),
      double(r.parameters_before) / double(r.parameters_after));
  row("MACs per sample", with_thousands(r.macs_before), with_thousands(r.macs_after),
      double(r.macs_before) / double(r.macs_after));
  row("size (bytes)", with_thousands(r.bytes_before), with_thousands(r.bytes_after),
      double(r.bytes_before) / double(r.bytes_after));
  if (r.int8)
    row("  int8 file (bytes)", with_thousands(r.bytes_before), with_thousands(r.int8_bytes),
        double(r.bytes_before) / double(r.int8_bytes));
  for (const auto& l : r.latency) {
    row("latency, batch " + std::to_string(l.batch), ms(l.original_ms), ms(l.compressed_ms),
        l.original_ms / l.compressed_ms);
    if (r.int8) row("  int8, batch " + std::to_string(l.batch), ms(l.original_ms), ms(l.int8_ms), l.original_ms / l.int8_ms);
  }
  // int8 is not faster everywhere: at batch 1 a small network can lose to fp32 (the quantize,
  // dequantize and kernel-call costs do not shrink with the batch), so say which to serve.
  if (r.int8 && !r.latency.empty()) {
    out << "faster of fp32 and int8:";
    for (const auto& l : r.latency)
      out << " batch " << l.batch << ": " << (l.int8_ms < l.compressed_ms ? "int8" : "fp32") << " ("
          << std::max(l.int8_ms, l.compressed_ms) / std::min(l.int8_ms, l.compressed_ms) << "x)"
          << (&l == &r.latency.back() ? "\n" : ";");
  }
  out << std::defaultfloat << "channels removed: " << r.channels_removed << ", BatchNorms folded: "
      << r.batch_norms_folded << ", max difference to the masked model: " << r.max_difference
      << "\ninference path: " << r.inference << "\n";
  if (!r.exported.empty()) out << "exported" << (r.int8 ? " (int8)" : "") << ": " << r.exported << "\n";
  return out;
}

// The compressed model's type: a Sequential stays one; any other module comes back in a holder
// of its implementation (a zoo holder converts: models::ResNet(result.model.ptr())).
template <class Model>
using compressed_model_t =
    std::conditional_t<sequential_like<Model>, torch::nn::Sequential, torch::nn::ModuleHolder<impl_of_t<Model>>>;

template <class Model>
struct Compressed {
  compressed_model_t<Model> model;        // fp32: pruned (and folded), eval mode
  InferenceModel inference;               // `model` for the example's shape, the faster path
  std::optional<torch::jit::Module> int8;  // with CompressOptions::int8
  CompressReport report;
};

namespace detail {

inline constexpr const char* compress_where = "fasterai::compress_for_deployment";

// The example's first sample repeated `batch` times.
inline torch::Tensor batch_of(const torch::Tensor& example, std::int64_t batch) {
  std::vector<std::int64_t> repeats(static_cast<std::size_t>(example.dim()), 1);
  repeats[0] = batch;
  return example.narrow(0, 0, 1).repeat(repeats);
}

// Checks that `path` can be written, by creating (then removing) the temporary file the export
// will go through; returns that temporary name.
inline std::filesystem::path check_export_path(const std::string& path) {
  const std::filesystem::path target(path);
  std::error_code ec;
  check_argument(!std::filesystem::is_directory(target, ec), compress_where, "export_path", path,
                 "a file name (this is a directory)");
  const auto parent = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  check_argument(std::filesystem::is_directory(parent, ec), compress_where, "export_path", path,
                 "a file in an existing directory");
  auto temporary = target;
  temporary += ".tmp" + std::to_string(::getpid());
  {
    std::ofstream probe(temporary, std::ios::binary);
    check_argument(probe.good(), compress_where, "export_path", path, "a file in a writable directory");
  }
  std::filesystem::remove(temporary, ec);
  return temporary;
}

template <class Model>
compressed_model_t<Model> deep_copy(const Model& model) {
  if constexpr (sequential_like<Model>) {
    return clone_model(model);
  } else {
    using Impl = impl_of_t<Model>;
    return torch::nn::ModuleHolder<Impl>(std::dynamic_pointer_cast<Impl>(impl(model).clone()));
  }
}

}  // namespace detail

// Compresses a copy of `model` for inputs like `example` (a batch, e.g. [1, 3, 224, 224]); see
// the banner. Bad options are a fasterai::argument_error naming the option, before any work;
// errors of the steps pass through. The model is left as it was either way.
template <traceable Model>
  requires detail::copyable_module<Model>
Compressed<Model> compress_for_deployment(const Model& model, const torch::Tensor& example,
                                          const CompressOptions& options = {}) {
  using detail::check_argument;
  constexpr auto where = detail::compress_where;
  check_argument(example.defined(), where, "example", "an undefined tensor",
                 "a batch of inputs of the model, e.g. torch::randn({1, 3, 224, 224})");
  check_argument(example.dim() >= 2 && example.size(0) >= 1, where, "example", example.sizes(),
                 "a batch of inputs: [N, ...] with N >= 1");
  check_argument(options.target() >= 0 && options.target() < 100, where, "target", options.target(),
                 "a percentage in [0, 100)");
  check_argument(options.round_to() >= 1, where, "round_to", options.round_to(), "a count >= 1");
  check_argument(!options.int8() || !options.calibration().empty(), where, "calibration", "no batches",
                 "batches of inputs for the int8 ranges when int8 is on");
  check_argument(options.latency_rounds() >= 1, where, "latency_rounds", options.latency_rounds(), "a count >= 1");
  for (const auto b : options.latency_batches())
    check_argument(b >= 1, where, "latency_batches", b, "batch sizes >= 1");
  std::optional<std::filesystem::path> temporary;
  if (!options.export_path().empty()) temporary = detail::check_export_path(options.export_path());

  const auto sample_shape = example.sizes().slice(1).vec();
  Compressed<Model> result{detail::deep_copy(model), InferenceModel(nullptr), std::nullopt, {}};
  CompressReport& report = result.report;
  report.parameters_before = count_parameters(model);
  report.macs_before = count_macs(model, sample_shape).total();
  report.bytes_before = model_size_bytes(model);

  auto& copy = result.model;
  copy->eval();
  const SparsifierOptions sparsity = SparsifierOptions(options.target()).round_to(options.round_to());
  torch::Tensor masked;
  if constexpr (sequential_like<Model>) {
    Sparsifier<granularity::Filter, method::Local, criteria::L1>(copy, sparsity).prune(options.target());
    {
      torch::NoGradGuard no_grad;
      masked = copy->forward(example);
    }
    report.channels_removed = Pruner().prune_(copy).channels_removed();
    if (options.fold_bn()) {
      BNFolder folder;
      copy = folder.fold(copy);
      report.batch_norms_folded = folder.report().folded.size();
    }
  } else {
    Sparsifier<granularity::Filter, method::Local, criteria::L1>(copy, example, sparsity).prune(options.target());
    {
      torch::NoGradGuard no_grad;
      masked = copy->forward(example);
    }
    report.channels_removed = Pruner().prune_(copy, example).channels_removed();
    if (options.fold_bn()) report.batch_norms_folded = BNFolder().fold_(copy, example).folded.size();
  }
  copy->eval();
  {
    torch::NoGradGuard no_grad;
    report.max_difference = detail::difference_to_scale(copy->forward(example), masked);
  }
  report.parameters_after = count_parameters(copy);
  report.macs_after = count_macs(copy, sample_shape).total();
  report.bytes_after = model_size_bytes(copy);

  result.inference = optimize_for_inference(copy, example, options.optimize());
  report.inference = result.inference->report();
  std::string int8_file;  // the int8 module serialized once: its size and, with export_path, the file
  if (options.int8()) {
    result.int8 = quantize_traced(copy, example, options.calibration());
    report.int8 = true;
    std::ostringstream serialized;
    result.int8->save(serialized);
    int8_file = std::move(serialized).str();
    report.int8_bytes = static_cast<std::int64_t>(int8_file.size());
  }

  // Original and compressed alternately, round by round, so that a slow phase of a shared
  // machine hits both; the median of the rounds' medians.
  auto& original = const_cast<impl_of_t<Model>&>(detail::impl(model));
  std::optional<TorchScriptModule> int8_module;
  if (result.int8) int8_module.emplace(*result.int8);
  for (const auto batch : options.latency_batches()) {
    const torch::Tensor x = detail::batch_of(example, batch);
    std::vector<double> before, after, quantized;
    for (int round = 0; round < options.latency_rounds(); ++round) {
      before.push_back(measure_latency(original, x, options.latency()).median_ms);
      after.push_back(measure_latency(copy, x, options.latency()).median_ms);
      if (int8_module) quantized.push_back(measure_latency(*int8_module, x, options.latency()).median_ms);
    }
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : detail::quantile_sorted(v, 0.5);
    };
    report.latency.push_back({batch, median(before), median(after), median(quantized)});
  }

  if (temporary) {
    try {
      if (result.int8) {
        std::ofstream out(*temporary, std::ios::binary);
        out.write(int8_file.data(), static_cast<std::streamsize>(int8_file.size()));
        out.close();
        check_argument(out.good(), where, "export_path", options.export_path(), "a file that can be written in full");
      } else {
        to_torchscript(copy, example).save(temporary->string());
      }
      std::filesystem::rename(*temporary, options.export_path());
    } catch (...) {
      std::error_code ignored;
      std::filesystem::remove(*temporary, ignored);
      throw;
    }
    report.exported = options.export_path();
  }
  return result;
}

}  // namespace fasterai
