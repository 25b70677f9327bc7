#pragma once
// The rule of LibTorch's MultiheadAttention (self-attention: one input read as query, key and
// value). Its in_proj_weight [3·E, E] makes the query, key and value of the E channels it
// reads, and its forward requires that inner width to equal the width it reads (embed_dim is
// query.size(-1)): so output channel o of the projection is also input channel o mod E
// (`tied_widths`), and a head goes only with its E/H channels of the stream it reads — the
// hidden size, which LayerNorms normalise over, so removing heads here is approximate pruning.
// The head dimension stays (the attention's scale 1/√d with it); num_heads follows. Its
// out_proj is a Linear of its own. Attention written with Linears has no such tie: its heads
// are removed exactly (the graph follows q·kᵀ and the attention times v head by head).

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

inline LayerRule multihead_attention() {
  using Impl = torch::nn::MultiheadAttentionImpl;
  LayerRule r;
  r.kind = "MultiheadAttention";
  r.role = LayerRole::Producer;
  r.channel_dim = -1;
  r.tensors = {{"in_proj_weight", 0, 1}, {"in_proj_bias", 0, -1}};
  r.tied_widths = true;
  // Separate q/k/v weights (kdim or vdim differ from embed_dim) and the learned key/value
  // biases (add_bias_kv) are not followed: a barrier then.
  r.supported = [](const torch::nn::Module& m) {
    const auto& a = dynamic_cast<const Impl&>(m);
    return a._qkv_same_embed_dim && !a.bias_k.defined() && !a.bias_v.defined();
  };
  r.set_widths = [](torch::nn::Module& m, std::int64_t, std::int64_t in, std::int64_t) {
    auto& a = dynamic_cast<Impl&>(m);
    const auto head_dim = a.options.embed_dim() / a.options.num_heads();
    a.options.embed_dim(in).num_heads(in / head_dim).kdim(in).vdim(in);
    a.head_dim = head_dim;
  };
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
