#pragma once
// Quantized engines: the int8 kernel libraries LibTorch was built with (QNNPACK, oneDNN,
// FBGEMM, x86), told apart by name, checked before use, and chosen per layer kind.
//
// An engine is picked when a weight is packed: `quantized::linear_prepack` and
// `conv2d_prepack` build the packed weight of whatever engine is set globally at that moment,
// and the packed weight then runs its own kernel whatever the global engine is later. So a
// model can mix engines — Linear layers packed for one, convolutions for another — as long as
// each layer is packed under its engine; `EngineGuard` sets one for a scope and restores the
// previous one. Packing happens again when a saved model is loaded (see quantized_layers.hpp),
// under the engines recorded with each layer.
//
// Which engine is faster depends on the CPU: measure (benchmarks/quant.cpp) and set
// `QuantEngines` accordingly. The defaults, QNNPACK for Linear and oneDNN for Conv2d, are what
// measurements on both an AVX-512/AMX Intel Xeon and an AVX2 AMD EPYC agreed on.

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/Context.h>
#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai::quant {

// The engines LibTorch knows, by the names torch.backends.quantized.engine uses.
inline std::string engine_name(at::QEngine engine) {
  switch (engine) {
    case at::QEngine::QNNPACK: return "qnnpack";
    case at::QEngine::ONEDNN: return "onednn";
    case at::QEngine::FBGEMM: return "fbgemm";
    case at::QEngine::X86: return "x86";
    case at::QEngine::NoQEngine: return "none";
  }
  return "none";
}

// The engines this LibTorch was built with, by name (e.g. "qnnpack", "onednn").
inline std::vector<std::string> available_engines() {
  std::vector<std::string> names;
  for (at::QEngine e : at::globalContext().supportedQEngines())
    if (e != at::QEngine::NoQEngine) names.push_back(engine_name(e));
  return names;
}

namespace detail {

inline std::string joined(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s.append(s.empty() ? "" : ", ").append(n);
  return s.empty() ? "none (this LibTorch has no quantized engine)" : s;
}

}  // namespace detail

// The engine called `name`, or fasterai::argument_error naming `where` and the engines that
// are built in.
inline at::QEngine engine_from_name(std::string_view where, std::string_view argument,
                                    const std::string& name) {
  for (at::QEngine e : at::globalContext().supportedQEngines())
    if (e != at::QEngine::NoQEngine && engine_name(e) == name) return e;
  fasterai::detail::throw_argument_error(
      where, argument, "'" + name + "'",
      "a quantized engine built into this LibTorch: " + detail::joined(available_engines()));
}

// Sets the global quantized engine for a scope; the previous one comes back on exit, also when
// packing throws.
class EngineGuard {
 public:
  explicit EngineGuard(at::QEngine engine) : previous_(at::globalContext().qEngine()) {
    at::globalContext().setQEngine(engine);
  }
  ~EngineGuard() { at::globalContext().setQEngine(previous_); }
  EngineGuard(const EngineGuard&) = delete;
  EngineGuard& operator=(const EngineGuard&) = delete;

 private:
  at::QEngine previous_;
};

// The engine each layer kind is packed for.
struct QuantEngines {
  QuantEngines() = default;
  TORCH_ARG(std::string, linear) = "qnnpack";
  TORCH_ARG(std::string, conv) = "onednn";
};

}  // namespace fasterai::quant
