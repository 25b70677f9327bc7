#pragma once
// Inference optimization: a model turned into a frozen, optimized TorchScript module that is
// called like a model.
//
//   fasterai::InferenceModel fast = fasterai::optimize_for_inference(model, example_input);
//   torch::Tensor y = fast(x);                     // or fast->forward(x); fast->save("m.pt")
//
// The steps, each of which can be switched off to measure what it buys:
//   1. eval mode, on a copy: the user's model keeps its mode and its tensors;
//   2. BatchNorm folded into the convolution or linear layer before it (fasterai::BNFolder);
//   3. export by tracing (fasterai::to_torchscript: one path, see there);
//   4. torch::jit::freeze: parameters become constants, the graph is inlined and cleaned;
//   5. torch::jit::optimize_for_inference: conv–BN/ReLU/add fusion, oneDNN (MKLDNN) layouts and
//      prepacked weights where LibTorch's build has them.
// Python's equivalent is torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(
// model.eval(), x))), called under torch.inference_mode(). The result works for inputs of the example's shape; other shapes may run
// slower or, where the trace captured a shape, fail.
//
// Never slower than eager. By default the result times its optimized module against the model's
// own forward on the example — an eval-mode copy of the model (BatchNorms folded for
// Sequential-like models, as step 2 does) — in interleaved rounds after warm-up, at the current
// thread count, and keeps the faster; report() says which path it runs and what it measured.
// Step 5 does not pay on every model. Measured on the walkthrough's compact VGG (benchmarks/
// inference_path.cpp, docs/results.md "Optimized or eager"): unpruned, step 5 is faster than
// eager; pruned to 2.2 M MACs it is slower, and it stays slower when round_to 8 makes every width
// a multiple of 8, so odd widths are not the cause. The frozen module with step 5's fusions but
// without its oneDNN conversion (ConvertFrozenOpsToMKLDNN) is as fast as the frozen one: the
// conversion is what makes step 5 slower than freezing alone there, and freezing alone is no
// faster than eager (the interpreter's costs). On a network this small (2.2 M MACs)
// such fixed costs per op (oneDNN's layout reorders and primitive calls, the interpreter's
// dispatch) outweigh what prepacked kernels save on the arithmetic. On ResNet-50 and
// MobileNetV2, pruned or not, step 5 wins. Where the line falls depends on the machine and its
// load, so it is measured where the model is optimized rather than predicted. A module that is
// not a torch::nn::Cloneable cannot be copied for the eager path; it is measured against the
// frozen module before step 5. OptimizeOptions().choose_by_measurement(false).path(...) forces
// a path (reproducible results, tests).

#include <algorithm>
#include <filesystem>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <torch/csrc/jit/api/module.h>
#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/latency.hpp>
#include <fasterai/core/libtorch_version.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/transform/bn_folder.hpp>

namespace fasterai {

// What an InferenceModel's forward runs.
enum class InferencePath {
  optimized,  // the TorchScript module of the steps asked for (all five by default)
  eager,      // an eval-mode copy of the model, its forward in C++ (BatchNorms folded by step 2)
  frozen,     // the TorchScript module before step 5 (the measured alternative for modules
              // that cannot be copied)
};

inline const char* to_string(InferencePath path) {
  switch (path) {
    case InferencePath::optimized: return "optimized";
    case InferencePath::eager: return "eager";
    case InferencePath::frozen: return "frozen";
  }
  return "?";
}
inline std::ostream& operator<<(std::ostream& out, InferencePath path) { return out << to_string(path); }

struct OptimizeOptions {
  OptimizeOptions() = default;
  TORCH_ARG(bool, fold_batch_norm) = true;  // step 2 (Sequential-like models)
  TORCH_ARG(bool, freeze) = true;           // step 4
  TORCH_ARG(bool, optimize) = true;         // step 5 (implies freezing)
  // Time the optimized module against the eager copy (or the frozen module) on the example and
  // keep the faster (see the banner). Off: `path` runs, unmeasured.
  TORCH_ARG(bool, choose_by_measurement) = true;
  // The path forced when choose_by_measurement is off: optimized or eager.
  TORCH_ARG(InferencePath, path) = InferencePath::optimized;
  // The measurement: `rounds` interleaved rounds (the two paths alternate which goes first), each
  // one warm-up call then the median of `runs` timed calls per path; the median over the rounds
  // of their ratio decides. 5 × (1 + 3) forwards per path by default.
  TORCH_ARG(int, rounds) = 5;
  TORCH_ARG(int, runs) = 3;
};

// What optimize_for_inference did.
struct OptimizeReport {
  bool was_training = false;            // the model was in training mode (it still is)
  std::size_t batch_norms_folded = 0;   // by step 2
  bool frozen = false;
  bool optimized = false;
  InferencePath path = InferencePath::optimized;  // what forward runs
  // Set when the paths were timed: the optimized module's median and the alternative's
  // (eager or frozen), in ms, at `threads` intra-op threads, and the median over the rounds of
  // alternative / optimized within a round, which decides (< 1: the alternative runs).
  // Otherwise all 0.
  bool measured = false;
  InferencePath alternative = InferencePath::eager;
  double optimized_ms = 0;
  double alternative_ms = 0;
  double ratio = 0;
  int threads = 0;
  // Step 5 ran but changed the outputs on the example by more than 1e-3 of their scale (the
  // relative max difference it did), so the frozen module stands in for it: LibTorch 2.6's
  // optimize_for_inference did so on a pruned, folded ResNet-18 (13%), 1.13's did not.
  bool optimized_rejected = false;
  double optimized_difference = 0;
};

// "optimized (measured: optimized 0.41 ms, eager 0.38 ms at 1 thread)", or "eager (forced)".
inline std::ostream& operator<<(std::ostream& out, const OptimizeReport& r) {
  out << r.path;
  if (r.optimized_rejected)
    out << " (LibTorch's optimize_for_inference changed the outputs by " << r.optimized_difference
        << " of their scale on the example: the frozen module runs instead)";
  if (!r.measured) return out << " (not measured)";
  return out << " (measured: optimized " << r.optimized_ms << " ms, " << r.alternative << " "
             << r.alternative_ms << " ms, ratio " << r.ratio << ", at " << r.threads
             << (r.threads == 1 ? " thread)" : " threads)");
}

// A TorchScript module behind a module interface: `forward(x)` runs it, so the latency harness
// and user code call it like the model it came from. It has no parameters of its own (a frozen
// module's weights are constants of its graph; an eager copy, when that path won, is held but
// not registered): take statistics from the source model.
class InferenceModelImpl : public torch::nn::Module {
 public:
  using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

  // `eager`: the eager copy's forward, needed when report.path is eager.
  InferenceModelImpl(torch::jit::Module module, torch::jit::Module portable, OptimizeReport report,
                     Forward eager = {})
      : torch::nn::Module("fasterai::InferenceModel"),
        module_(std::move(module)),
        portable_(std::move(portable)),
        eager_(std::move(eager)),
        report_(report) {
    detail::check_argument(report_.path != InferencePath::eager || eager_, "fasterai::InferenceModel",
                           "eager", "an empty function", "the eager copy's forward when the path is eager");
  }

  // Runs under libtorch::InferenceGuard (c10::InferenceMode, no TensorExpr fuser): the result is
  // an inference tensor (no autograd; clone() it to change it in place). Without the guard, a
  // LibTorch built with Vulkan kernels (Debian 13's 2.6) asserts in aten::max_pool2d on the
  // oneDNN tensors of step 5, and one built with LLVM fuses with TorchScript's CPU fuser, whose
  // depthwise convolutions crash (see core/libtorch_version.hpp). Calling script_module()
  // directly bypasses the guard. The eager path runs under the same guard, so both paths
  // return the same kind of tensor.
  torch::Tensor forward(torch::Tensor x) { return run(report_.path, x); }

  // Python's torch.jit.load and LibTorch's torch::jit::load read the file. It holds the module
  // before step 5: the oneDNN constants that optimize_for_inference creates do not serialize
  // in LibTorch 1.13 (saving succeeds, loading fails, in Python too), so whoever loads the
  // file applies torch.jit.optimize_for_inference again, on their machine. Whichever path won
  // here, the file is that module: the loader's machine may choose differently.
  void save(const std::filesystem::path& path) const { portable_.save(path.string()); }

  torch::jit::Module& script_module() { return module_; }
  const OptimizeReport& report() const { return report_; }
  // What forward runs: report().path.
  InferencePath path() const { return report_.path; }

  // One forward on the given path (what optimize_for_inference times; eager needs the copy).
  torch::Tensor run(InferencePath path, const torch::Tensor& x) {
    detail::check_argument(path != InferencePath::eager || eager_, "fasterai::InferenceModel::run",
                           "path", to_string(path), "optimized or frozen: this model holds no eager copy");
    const libtorch::InferenceGuard guard;
    switch (path) {
      case InferencePath::eager: return eager_(x);
      case InferencePath::frozen: return portable_.forward({x}).toTensor();
      case InferencePath::optimized: break;
    }
    return module_.forward({x}).toTensor();
  }

 private:
  torch::jit::Module module_;
  torch::jit::Module portable_;
  Forward eager_;
  OptimizeReport report_;
};
TORCH_MODULE(InferenceModel);

namespace detail {

// A module fasterai can deep-copy: a Sequential (clone_model) or a torch::nn::Cloneable (the
// zoo); Module::clone() throws for any other.
template <class M>
concept copyable_module =
    sequential_like<M> || std::derived_from<impl_of_t<M>, torch::nn::Cloneable<impl_of_t<M>>>;

// An eval-mode deep copy of `model` for the eager path, or nothing when the model cannot be
// copied.
template <class Model>
InferenceModelImpl::Forward eager_copy(Model& model) {
  using Impl = impl_of_t<Model>;
  if constexpr (sequential_like<Model>) {
    auto copy = clone_model(model);
    copy->eval();
    return [copy](const torch::Tensor& x) mutable { return copy->forward(x); };
  } else if constexpr (copyable_module<Model>) {
    auto copy = std::dynamic_pointer_cast<Impl>(impl(model).clone());
    copy->eval();
    return [copy](const torch::Tensor& x) { return copy->forward(x); };
  } else {
    return {};
  }
}

// One path of an InferenceModel as a module, for measure_latency.
struct PathForward : torch::nn::Module {
  PathForward(InferenceModelImpl& model, InferencePath path) : model(model), path(path) {}
  torch::Tensor forward(const torch::Tensor& x) { return model.run(path, x); }
  InferenceModelImpl& model;
  InferencePath path;
};

struct PathTimes {
  double optimized_ms, alternative_ms;  // medians over the rounds
  double ratio;                         // median over the rounds of alternative / optimized
};

// The optimized path against `alternative`, interleaved round by round.
inline PathTimes time_paths(InferenceModelImpl& model, InferencePath alternative, const torch::Tensor& x,
                            const OptimizeOptions& options) {
  PathForward optimized(model, InferencePath::optimized), other(model, alternative);
  const auto latency = LatencyOptions().warmup(1).runs(options.runs()).threads(torch::get_num_threads());
  std::vector<double> a, b, ratios;
  for (int round = 0; round < options.rounds(); ++round) {
    // Alternate which path goes first, so that neither always runs on the caches the other
    // left or always first after a pause of the machine.
    if (round % 2 == 0) {
      a.push_back(measure_latency(optimized, x, latency).median_ms);
      b.push_back(measure_latency(other, x, latency).median_ms);
    } else {
      b.push_back(measure_latency(other, x, latency).median_ms);
      a.push_back(measure_latency(optimized, x, latency).median_ms);
    }
    ratios.push_back(b.back() / a.back());
  }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return quantile_sorted(v, 0.5);
  };
  // The decision compares the paths within each round, where they met the same load: on a
  // shared machine a slow phase moves both medians of a round, not their ratio.
  return {median(a), median(b), median(ratios)};
}

}  // namespace detail

// The model, optimized for inference on inputs like `example_input` (see the banner). The model
// is left as it was; when it was in training mode a warning says that the result computes the
// eval-mode function. Errors of the export (fasterai::argument_error) pass through; bad options
// are a fasterai::argument_error before anything is done.
template <traceable Model>
InferenceModel optimize_for_inference(Model& model, const torch::Tensor& example_input,
                                      const OptimizeOptions& options = {}) {
  constexpr auto where = "fasterai::optimize_for_inference";
  constexpr bool copyable = detail::copyable_module<Model>;
  if (options.choose_by_measurement()) {
    detail::check_argument(options.path() == InferencePath::optimized, where, "path",
                           to_string(options.path()),
                           "optimized (the default) while choose_by_measurement is on: the "
                           "measurement chooses; turn it off to force a path");
    detail::check_argument(options.rounds() >= 1, where, "rounds", options.rounds(), "a count >= 1");
    detail::check_argument(options.runs() >= 1, where, "runs", options.runs(), "a count >= 1");
  } else {
    detail::check_argument(options.path() != InferencePath::frozen, where, "path", "frozen",
                           "optimized or eager (a frozen module is OptimizeOptions().optimize(false))");
    detail::check_argument(options.path() != InferencePath::eager || copyable, where, "path", "eager",
                           "optimized: this module cannot be copied for an eager path (derive it "
                           "from torch::nn::Cloneable, or keep the model and call it)");
  }
  auto& m = detail::impl(model);
  OptimizeReport report;
  report.was_training = detail::any_training(m);
  if (report.was_training)
    TORCH_WARN(where, ": the model is in training mode; the optimized copy is in eval mode "
               "(BatchNorm uses its running statistics, Dropout is off) and the model keeps its "
               "mode");

  torch::jit::Module exported;
  InferenceModelImpl::Forward eager;
  const bool want_eager = options.choose_by_measurement() || options.path() == InferencePath::eager;
  bool folded_copy = false;
  if constexpr (sequential_like<Model>) {
    if (options.fold_batch_norm()) {
      // The BNFolder returns a new model in eval mode; the input is untouched.
      BNFolder folder;
      auto folded = folder.fold(model);
      report.batch_norms_folded = folder.report().folded.size();
      exported = to_torchscript(folded, example_input);
      folded_copy = true;
      // The export shares the folded copy's tensors and is deep-copied below: the copy itself
      // is the eager path.
      if (want_eager) eager = [folded](const torch::Tensor& x) mutable { return folded->forward(x); };
    }
  }
  if (!folded_copy) {
    // Trace the model itself in eval mode, then give it its mode back; the export shares the
    // model's tensors, so it is deep-copied below before anything is frozen into constants.
    detail::EvalModeGuard eval(m);
    exported = to_torchscript(model, example_input);
  }
  if (want_eager && !eager) eager = detail::eager_copy(model);
  exported = exported.deepcopy();  // own tensors: later changes to the model do not leak in
  exported.eval();
  if (options.freeze() || options.optimize()) {
    exported = torch::jit::freeze(exported);
    report.frozen = true;
  }
  // optimize_for_inference rewrites a frozen module's graph in place: keep a savable copy.
  torch::jit::Module portable = options.optimize() ? exported.clone() : exported;
  if (options.optimize()) {
    exported = torch::jit::optimize_for_inference(exported);
    report.optimized = true;
    // Checked once on the example against the frozen module: a rewrite that changes the outputs
    // is not used (see OptimizeReport::optimized_rejected). Under InferenceMode, as
    // InferenceModel runs it (the oneDNN operators have no autograd kernels).
    c10::InferenceMode inference;
    report.optimized_difference =
        detail::difference_to_scale(exported.clone().forward({example_input}).toTensor(),
                                    portable.clone().forward({example_input}).toTensor());
    if (!(report.optimized_difference <= 1e-3)) {
      TORCH_WARN(where, ": LibTorch's optimize_for_inference changed the outputs by ",
                 report.optimized_difference, " of their scale on the example; the frozen module is used");
      exported = portable.clone();
      report.optimized = false;
      report.optimized_rejected = true;
    }
  }
  if (!options.choose_by_measurement()) report.path = options.path();
  InferenceModel result(exported, portable, report, eager);
  // TorchScript's profiling executor records the inputs of the first call and compiles its
  // optimized plan on the second (1.13 and 2.x): make those calls here, so that the first call a
  // user makes, or times, runs the plan (the two cost ten times a planned call on a small ViT).
  for (int i = 0; i < 2; ++i) result->forward(example_input);

  // The alternative to time: the eager copy, or for a module without one the frozen module
  // (when step 5 ran; without it the optimized module is the frozen one).
  if (options.choose_by_measurement() && (eager || options.optimize())) {
    report.alternative = eager ? InferencePath::eager : InferencePath::frozen;
    if (!eager)  // the frozen module's plan too, before it is timed
      for (int i = 0; i < 2; ++i) result->run(InferencePath::frozen, example_input);
    const detail::PathTimes times = detail::time_paths(*result, report.alternative, example_input, options);
    report.optimized_ms = times.optimized_ms;
    report.alternative_ms = times.alternative_ms;
    report.ratio = times.ratio;
    report.measured = true;
    report.threads = torch::get_num_threads();
    // Strictly faster: a tie keeps the optimized module, the path users asked for.
    if (report.ratio < 1) report.path = report.alternative;
    // Only the chosen path is kept: the eager copy's tensors go when the optimized one won.
    if (report.path != InferencePath::eager) eager = {};
    result = InferenceModel(exported, portable, report, eager);
  }
  return result;
}

}  // namespace fasterai
