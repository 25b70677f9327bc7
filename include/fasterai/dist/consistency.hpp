#pragma once
// Checking that the replicas of a data-parallel job agree, cheaply: each rank hashes its
// tensors (bytes, shapes and dtypes), and one all-reduce of the hash with MIN and one with MAX
// tells every rank whether all hashes are equal. Masks are a pure function of the weights and
// the averaged gradients, so they agree by construction; this is the check that says so.
//
//   if (!fasterai::dist::same_on_all_ranks(group, fasterai::dist::masks_of(sparsifier)))
//     throw std::runtime_error("masks differ between ranks");

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/dist/process_group.hpp>

namespace fasterai::dist {

// FNV-1a over the tensors' dtypes, shapes and bytes, in order (contiguous CPU copies).
inline std::uint64_t fingerprint(const std::vector<torch::Tensor>& tensors) {
  std::uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  };
  for (const auto& t : tensors) {
    if (!t.defined()) {
      mix("undefined", 9);
      continue;
    }
    const auto c = t.detach().to(torch::kCPU).contiguous();
    const auto dtype = static_cast<int>(c.scalar_type());
    mix(&dtype, sizeof dtype);
    for (auto s : c.sizes()) mix(&s, sizeof s);
    mix(c.data_ptr(), c.numel() * c.element_size());
  }
  return h;
}

// The masks of a Sparsifier (any with layer_names() and mask(name)), in layer order.
template <class S>
  requires requires(const S& s, std::string name) {
    { s.layer_names() } -> std::convertible_to<std::vector<std::string>>;
    { s.mask(name) } -> std::convertible_to<torch::Tensor>;
  }
std::vector<torch::Tensor> masks_of(const S& sparsifier) {
  std::vector<torch::Tensor> out;
  for (const auto& name : sparsifier.layer_names()) out.push_back(sparsifier.mask(name));
  return out;
}

// True on every rank when every rank's `tensors` hash the same; a collective.
inline bool same_on_all_ranks(const ProcessGroup& group, const std::vector<torch::Tensor>& tensors) {
  std::int64_t h = 0;
  const auto f = fingerprint(tensors);
  std::memcpy(&h, &f, sizeof h);
  if (group.world_size() == 1) return true;
  // min(h) and max(h) = ~min(~h), in one launch of two all-reduces.
  std::vector<torch::Tensor> both{torch::tensor({h}, torch::kLong), torch::tensor({~h}, torch::kLong)};
  group.all_reduce(both, c10d::ReduceOp::MIN, "all-reduce of a fingerprint");
  return both[0].item<std::int64_t>() == h && ~both[1].item<std::int64_t>() == h;
}

}  // namespace fasterai::dist
