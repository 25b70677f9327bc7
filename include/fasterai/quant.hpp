#pragma once
// fasterai's int8 quantization: dynamic, static (calibrated), traced for any module, and
// quantization-aware training. Opt-in beside <fasterai/fasterai.hpp>: it pulls LibTorch's JIT.

#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/engine.hpp>
#include <fasterai/quant/observer.hpp>
#include <fasterai/quant/qat.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>
#include <fasterai/quant/quantized_layers.hpp>
#include <fasterai/quant/traced_calibrator.hpp>
#include <fasterai/quant/traced_qat.hpp>
