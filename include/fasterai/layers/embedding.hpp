#pragma once
// The rule of Embedding: weight [num_embeddings, embedding_dim]. It reads indices, not
// channels, so its embedding dimension is a set of new channels (the last dimension of its
// output) that joins the stream it feeds: a text encoder's token embedding and everything
// added to it are one group.

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include <fasterai/layers/rule.hpp>

namespace fasterai::rules {

inline LayerRule embedding() {
  using Impl = torch::nn::EmbeddingImpl;
  LayerRule r;
  r.kind = "Embedding";
  r.role = LayerRole::Producer;
  r.channel_dim = -1;
  r.tensors = {{"weight", 1, -1}};
  r.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t, std::int64_t) {
    dynamic_cast<Impl&>(m).options.embedding_dim(out);
  };
  return r;  // a lookup: no multiply-accumulates
}

}  // namespace fasterai::rules
