#pragma once
// fasterai's deployment: reloading pruned models (resize-on-load), TorchScript export, inference
// optimization and the cost model. Opt-in beside <fasterai/fasterai.hpp>: it pulls LibTorch's JIT.

#include <fasterai/deploy/cost_model.hpp>
#include <fasterai/deploy/load.hpp>
#include <fasterai/deploy/optimize.hpp>
#include <fasterai/deploy/torchscript.hpp>
