#pragma once
// The rule of LibTorch's MultiheadAttention. Its query, key and value projections
// (in_proj_weight [3·E, E]) and its output projection all have the embedding size E, which is
// also the width it reads and writes: a head cannot go without the residual stream losing
// channels too. So it is Opaque: a barrier whose channels are kept, counted for its cost (the
// input projection and the two attention products; its out_proj is a Linear of its own).

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

inline LayerRule multihead_attention() {
  using Impl = torch::nn::MultiheadAttentionImpl;
  LayerRule r;
  r.kind = "MultiheadAttention";
  r.role = LayerRole::Opaque;
  r.channel_dim = -1;
  r.tensors = {{"in_proj_weight", 0, 1}, {"in_proj_bias", 0, -1}};
  r.set_widths = [](torch::nn::Module&, std::int64_t, std::int64_t, std::int64_t) {};
  // Traced on a batch of one, the projection reads [tokens, E]: tokens·3E·E, then scores and
  // their weighted sum, 2·tokens²·E.
  r.macs = [](const torch::nn::Module& m, const std::vector<std::int64_t>& in, const std::vector<std::int64_t>&) {
    const auto e = dynamic_cast<const Impl&>(m).options.embed_dim();
    const auto tokens = detail::elements(in) / e;
    return tokens * 3 * e * e + 2 * tokens * tokens * e;
  };
  return r;
}

}  // namespace fasterai::rules
