#pragma once
// A cost model that predicts latency: per layer and in total, multiply-accumulates (MACs) AND
// the bytes of weights and activations one forward moves, and a roofline estimate of its time
// from the machine's peak rates, which a small calibration measures.
//
//   auto cost = fasterai::cost_model(model, torch::randn({1, 3, 224, 224}));
//   auto peak = fasterai::measure_peak_rates();            // times GEMMs, copies, tiny ops
//   std::cout << cost << cost.estimate_ms(peak) << " ms\n";
//
// Why bytes: MACs alone are the wrong cost where a layer is bound by memory. At batch 1, a
// Linear layer does one MAC per weight it reads (VGG16's classifier reads about 480 MB of
// weights per image), and BatchNorm, ReLU and pooling do no MACs but read and write every
// activation. The roofline model charges each op the larger of its compute time (MACs at the
// measured GEMM rate) and its memory time (bytes at the measured copy bandwidth), plus the
// fixed cost of one op call (dispatch, allocation, which dominate small networks).
//
// The ops are those a forward executes, found by tracing it once (fasterai::to_torchscript), so
// any module the library exports is costed, with the model's qualified layer names. Bytes are
// counted as each op reads its inputs and writes its outputs once (no cache reuse between ops,
// which makes memory time an upper bound for small activations); views (flatten, reshape)
// and eval-mode dropout move nothing.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iomanip>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/deploy/torchscript.hpp>

namespace fasterai {

// The cost of one op of the forward.
struct LayerCost {
  std::string name;                   // the layer it belongs to ("features.0"), or the op after
                                      // the last layer for parameter-free ops ("features.1 > relu_")
  std::string op;                     // "aten::_convolution", "aten::linear", ...
  std::int64_t macs = 0;
  std::int64_t weight_bytes = 0;      // parameters and buffers read
  std::int64_t activation_bytes = 0;  // activations read and written
  std::int64_t bytes() const { return weight_bytes + activation_bytes; }
};

// Peak rates of one machine at one thread count (measure_peak_rates).
struct PeakRates {
  double macs_per_second = 0;   // float32 matrix multiplication
  double bytes_per_second = 0;  // a large copy: bytes read plus bytes written
  double seconds_per_op = 0;    // one op call on a tiny tensor: the fixed cost of an op
  int threads = 1;
};

struct CostReport {
  std::vector<LayerCost> layers;  // in execution order

  std::int64_t macs() const { return sum(&LayerCost::macs); }
  std::int64_t weight_bytes() const { return sum(&LayerCost::weight_bytes); }
  std::int64_t activation_bytes() const { return sum(&LayerCost::activation_bytes); }
  std::int64_t bytes() const { return weight_bytes() + activation_bytes(); }

  // Roofline time of one op: max(compute, memory) + the fixed cost of a call.
  static double estimate_ms(const LayerCost& layer, const PeakRates& peak) {
    const double compute = double(layer.macs) / peak.macs_per_second;
    const double memory = double(layer.bytes()) / peak.bytes_per_second;
    return 1e3 * (std::max(compute, memory) + peak.seconds_per_op);
  }
  double estimate_ms(const PeakRates& peak) const {
    double total = 0;
    for (const auto& layer : layers) total += estimate_ms(layer, peak);
    return total;
  }

 private:
  std::int64_t sum(std::int64_t LayerCost::*field) const {
    std::int64_t total = 0;
    for (const auto& layer : layers) total += layer.*field;
    return total;
  }
};

// The ops of one forward of `model` on `example_input` (in eval mode; the model's mode is
// restored), with their MACs and bytes. Errors of the trace (fasterai::argument_error) pass
// through.
template <traceable Model>
CostReport cost_model(Model& model, const torch::Tensor& example_input);

struct CalibrationOptions {
  CalibrationOptions() = default;
  TORCH_ARG(int, threads) = 1;              // intra-op threads while measuring (restored after)
  TORCH_ARG(std::int64_t, gemm_size) = 512; // n of an n×n×n float32 matrix multiplication
  TORCH_ARG(std::int64_t, copy_bytes) = std::int64_t(64) << 20;  // far beyond the caches
  TORCH_ARG(int, runs) = 7;                 // the best of these is the peak
};

// The machine's peak rates, measured: the fastest of `runs` GEMMs, large copies and tiny op
// calls. It runs real work (large GEMMs and copies): measure once and reuse the result.
inline PeakRates measure_peak_rates(const CalibrationOptions& options = {});

// A table: one row per op with MACs, bytes and, given peak rates, the estimate.
inline void print_costs(std::ostream& os, const CostReport& report, const PeakRates* peak = nullptr);
inline std::ostream& operator<<(std::ostream& os, const CostReport& report) {
  print_costs(os, report);
  return os;
}

namespace detail {

// Ops that return a view or their input: no bytes move.
inline bool moves_nothing(const std::string& op) {
  static const std::vector<std::string> free_ops = {
      "aten::flatten", "aten::view",    "aten::reshape",  "aten::_reshape_alias",
      "aten::size",    "aten::dropout", "aten::dropout_", "aten::feature_dropout",
      "aten::alpha_dropout", "aten::detach", "aten::contiguous", "aten::expand",
      "aten::squeeze", "aten::unsqueeze", "aten::t",        "aten::transpose",
      "aten::permute", "aten::select",  "aten::slice",    "aten::numpy_T",
      "aten::Int",     "aten::item",    "aten::ScalarImplicit"};
  return std::find(free_ops.begin(), free_ops.end(), op) != free_ops.end();
}

inline std::int64_t tensor_bytes(const torch::jit::Value* value) {
  const auto type = value->type()->cast<c10::TensorType>();
  if (!type) return 0;
  const auto numel = type->numel();
  const auto dtype = type->scalarType();
  if (!numel || !dtype) return 0;
  return static_cast<std::int64_t>(*numel) * static_cast<std::int64_t>(c10::elementSize(*dtype));
}

inline std::vector<std::int64_t> tensor_sizes(const torch::jit::Value* value) {
  const auto type = value->type()->cast<c10::TensorType>();
  if (!type) return {};
  const auto sizes = type->sizes().concrete_sizes();
  return sizes ? *sizes : std::vector<std::int64_t>{};
}

inline std::int64_t size_product(const std::vector<std::int64_t>& v, std::size_t from = 0) {
  std::int64_t p = 1;
  for (std::size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

}  // namespace detail

template <traceable Model>
CostReport cost_model(Model& model, const torch::Tensor& example_input) {
  auto& m = detail::impl(model);
  torch::jit::Module traced;
  {
    detail::EvalModeGuard eval(m);
    traced = to_torchscript(model, example_input, ExportOptions().check(false));
  }
  std::map<std::string, torch::Tensor> state;
  for (const auto& p : m.named_parameters()) state[p.key()] = p.value();
  for (const auto& b : m.named_buffers()) state[b.key()] = b.value();

  const auto graph = traced.get_method("forward").graph();
  // Qualified names of the GetAttr chain from `self`: "features", "features.0", "features.0.weight".
  std::map<const torch::jit::Value*, std::string> attr_name;
  attr_name[graph->inputs().at(0)] = "";
  CostReport report;
  std::string last_layer;
  for (const torch::jit::Node* node : graph->nodes()) {
    if (node->kind() == c10::prim::GetAttr) {
      const auto parent = attr_name.find(node->input(0));
      if (parent != attr_name.end()) {
        const std::string field = node->s(c10::attr::name);
        attr_name[node->output()] = parent->second.empty() ? field : parent->second + "." + field;
      }
      continue;
    }
    const std::string op = node->kind().toQualString();
    if (!node->kind().is_aten()) continue;
    if (detail::moves_nothing(op)) {
      // A view of a weight (the transpose a Linear multiplies by) is still that weight.
      const auto viewed = node->inputs().empty() ? attr_name.end() : attr_name.find(node->input(0));
      if (viewed != attr_name.end() && node->outputs().size() == 1)
        attr_name[node->output()] = viewed->second;
      continue;
    }
    LayerCost cost;
    cost.op = op;
    std::vector<std::vector<std::int64_t>> weight_sizes;
    for (const torch::jit::Value* input : node->inputs()) {
      const auto attr = attr_name.find(input);
      if (attr != attr_name.end()) {
        const auto tensor = state.find(attr->second);
        if (tensor == state.end()) continue;
        cost.weight_bytes += tensor->second.numel() * std::int64_t(tensor->second.element_size());
        weight_sizes.push_back(tensor->second.sizes().vec());
        if (cost.name.empty()) cost.name = attr->second.substr(0, attr->second.rfind('.'));
      } else {
        cost.activation_bytes += detail::tensor_bytes(input);
      }
    }
    for (const torch::jit::Value* output : node->outputs())
      cost.activation_bytes += detail::tensor_bytes(output);
    const auto out = node->outputs().empty() ? std::vector<std::int64_t>{}
                                             : detail::tensor_sizes(node->output(0));
    const bool conv = op == "aten::_convolution" || op == "aten::conv2d" ||
                      op == "aten::convolution" || op == "aten::conv1d" || op == "aten::conv3d";
    if (conv && !weight_sizes.empty()) {
      // Each output element sums over in/groups channels times the kernel.
      cost.macs = detail::size_product(out) * detail::size_product(weight_sizes.front(), 1);
    } else if (op == "aten::linear" && !weight_sizes.empty()) {
      cost.macs = detail::size_product(out) * weight_sizes.front().at(1);
    } else if (op == "aten::matmul" || op == "aten::mm" || op == "aten::bmm" || op == "aten::addmm") {
      const auto a = detail::tensor_sizes(node->input(op == "aten::addmm" ? 1 : 0));
      if (!a.empty()) cost.macs = detail::size_product(out) * a.back();
    }
    if (cost.name.empty())
      cost.name = (last_layer.empty() ? std::string("input") : last_layer) + " > " + op.substr(6);
    else
      last_layer = cost.name;
    report.layers.push_back(std::move(cost));
  }
  return report;
}

inline PeakRates measure_peak_rates(const CalibrationOptions& options) {
  constexpr auto where = "fasterai::measure_peak_rates";
  detail::check_argument(options.threads() >= 1, where, "threads", options.threads(), "a count >= 1");
  detail::check_argument(options.gemm_size() >= 16, where, "gemm_size", options.gemm_size(), "n >= 16");
  detail::check_argument(options.copy_bytes() >= (1 << 20), where, "copy_bytes",
                         options.copy_bytes(), "at least 1 MiB");
  detail::check_argument(options.runs() >= 1, where, "runs", options.runs(), "a count >= 1");
  struct RestoreThreads {
    int threads;
    ~RestoreThreads() { torch::set_num_threads(threads); }
  } restore{torch::get_num_threads()};
  torch::set_num_threads(options.threads());
  c10::InferenceMode inference;

  auto best_seconds = [&](auto&& f) {
    f();  // warm-up: first-touch page faults, lazy initialization
    double best = std::numeric_limits<double>::infinity();
    for (int i = 0; i < options.runs(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      f();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best;
  };
  PeakRates peak;
  peak.threads = options.threads();
  const std::int64_t n = options.gemm_size();
  const auto a = torch::randn({n, n}), b = torch::randn({n, n});
  auto c = torch::empty({n, n});
  peak.macs_per_second = double(n) * double(n) * double(n) / best_seconds([&] { torch::mm_out(c, a, b); });
  const std::int64_t floats = options.copy_bytes() / 4;
  const auto source = torch::rand({floats});
  auto destination = torch::empty({floats});
  peak.bytes_per_second =
      2.0 * double(floats) * 4.0 / best_seconds([&] { destination.copy_(source); });
  // One op call is too short to time alone: the best of batches of 1000.
  const auto tiny = torch::ones({1});
  peak.seconds_per_op = best_seconds([&] {
    for (int i = 0; i < 1000; ++i) torch::relu(tiny);
  }) / 1000.0;
  return peak;
}

inline void print_costs(std::ostream& os, const CostReport& report, const PeakRates* peak) {
  const auto flags = os.flags();
  const auto precision = os.precision();
  os << "| op | layer | MACs | weight bytes | activation bytes |" << (peak ? " estimate (ms) |" : "")
     << "\n|---|---|---:|---:|---:|" << (peak ? "---:|" : "") << "\n";
  os << std::fixed << std::setprecision(4);
  for (const auto& l : report.layers) {
    os << "| " << l.op << " | " << l.name << " | " << l.macs << " | " << l.weight_bytes << " | "
       << l.activation_bytes << " |";
    if (peak) os << ' ' << CostReport::estimate_ms(l, *peak) << " |";
    os << "\n";
  }
  os << "| total | | " << report.macs() << " | " << report.weight_bytes() << " | "
     << report.activation_bytes() << " |";
  if (peak) os << ' ' << report.estimate_ms(*peak) << " |";
  os << "\n";
  os.flags(flags);
  os.precision(precision);
}

}  // namespace fasterai
