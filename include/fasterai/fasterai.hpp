#pragma once
// fasterai: make trained LibTorch networks smaller and faster. Include this one header.

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/latency.hpp>
#include <fasterai/core/layer_walk.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/core/state_dict.hpp>
#include <fasterai/core/statistics.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/vgg.hpp>
