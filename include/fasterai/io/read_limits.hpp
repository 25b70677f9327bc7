#pragma once
// Limits on what reading one state_dict file may cost. A weight file is input from elsewhere:
// these bound the memory and time a hostile or damaged file can take before it is refused.
// The defaults are far above what any torch.save(model.state_dict()) needs (a state_dict
// nests 4 levels deep and holds about 25 pickle values per tensor), and keep what a hostile
// file can cost beyond the tensors it yields near max_pickle_bytes + 16 * max_entries bytes
// (about 200 MB) and linear time. A refusal names the limit and the setter that raises it,
// e.g. `fasterai::ReadLimits().max_tensor_bytes(std::int64_t{1} << 36)`.

#include <cstdint>
#include <string>
#include <string_view>

#include <torch/arg.h>

namespace fasterai {

struct ReadLimits {
  // Containers (tuples, lists, dicts) inside containers in data.pkl.
  TORCH_ARG(std::int64_t, max_depth) = 100;
  // Values the unpickler holds at once, on its stack, in its memo and inside its containers,
  // each about 16 bytes (a container, a tensor and a dict key's index count as several, by
  // their size). A state_dict of 100,000 tensors reads within the default.
  TORCH_ARG(std::int64_t, max_entries) = std::int64_t{1} << 23;
  // Bytes of data.pkl once decompressed (a few MB for a state_dict of 100,000 tensors).
  TORCH_ARG(std::int64_t, max_pickle_bytes) = std::int64_t{1} << 26;
  // Bytes of all storage records together, and of the copies that resolve PyTorch 2.x's
  // conjugate and negative views: the tensors the file yields.
  TORCH_ARG(std::int64_t, max_tensor_bytes) = std::int64_t{1} << 33;  // 8 GiB
  // Dimensions of one tensor: PyTorch supports at most 64 (its TensorIterator and CUDA kernels
  // do not index more). Sizes and strides shared through the pickle's memo are charged per
  // tensor, by their dimension count, against max_entries as well.
  TORCH_ARG(std::int64_t, max_dims) = 64;
  // Elements of one tensor beyond the elements of its storage: a view with stride 0 repeats one
  // value without bound, so a tiny file could hand out a tensor that no copy fits in memory.
  // A tensor with no more elements than its storage is never refused by this limit.
  TORCH_ARG(std::int64_t, max_view_elements) = std::int64_t{1} << 24;
};

namespace detail {

// "... exceeds ReadLimits::max_depth = 100 (raise it with fasterai::ReadLimits().max_depth(n)
// if the file is trusted)".
inline std::string limit_exceeded(std::string_view what, std::string_view limit,
                                  std::int64_t value) {
  std::string s(what);
  s.append(" exceeds ReadLimits::").append(limit).append(" = ").append(std::to_string(value));
  s.append(" (raise it with fasterai::ReadLimits().").append(limit);
  s.append("(n) if the file is trusted)");
  return s;
}

}  // namespace detail
}  // namespace fasterai
