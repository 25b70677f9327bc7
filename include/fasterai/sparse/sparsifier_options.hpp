#pragma once
// fasterai::SparsifierOptions: which layers a Sparsifier masks, and how far.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace fasterai {

using LayerTargets = std::map<std::string, double>;

struct SparsifierOptions {
  /* implicit */ SparsifierOptions(double target = 0.0) : target_(target) {}
  TORCH_ARG(double, target);                         // s_f, percent, where schedules lead
  TORCH_ARG(double, start) = 0.0;                    // s_i, percent, where schedules start
  TORCH_ARG(bool, include_linear) = false;           // Conv2d only by default (the fasterai article); with it
                                                     // Linears and MultiheadAttention's projection
  TORCH_ARG(std::vector<std::string>, include) = {}; // only these layers (state_dict names)
  TORCH_ARG(std::vector<std::string>, exclude) = {}; // never these layers
  TORCH_ARG(LayerTargets, layer_targets) = {};       // per-layer targets (Local method only)
  TORCH_ARG(std::uint64_t, seed) = 0;                // Random criteria
  // Global method with Filter granularity: compare units by score / mean score of their
  // coupled group, so that layers with a large fan-in do not keep all their channels.
  TORCH_ARG(bool, normalize) = true;
  // Filter granularity: prune fewer units where needed so that every coupled group keeps a
  // multiple of this many channels (or all of them): convolution kernels often run fastest at
  // widths that are multiples of 8 or 16.
  TORCH_ARG(std::int64_t, round_to) = 1;
  // Filter granularity: also select channels a LayerNorm normalises over (a transformer's
  // hidden size, ConvNeXt's stage widths), zeroing with them their norms' γ and β and the free
  // parameters added to or multiplied with them (class token, position embedding, layer
  // scale). Removing them is approximate: prune with PrunerOptions::approximate, fine-tune.
  TORCH_ARG(bool, approximate) = false;
};

}  // namespace fasterai
