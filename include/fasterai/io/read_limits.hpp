#pragma once
// Limits on what reading one state_dict file may cost. A weight file is input from elsewhere:
// these bound the memory and time a hostile or damaged file can take before it is refused.
// The defaults are far above what any torch.save(model.state_dict()) needs (a state_dict
// nests 4 levels deep and holds about 25 pickle values per tensor); a refusal names the limit
// and the setter that raises it, e.g. `fasterai::ReadLimits().max_tensor_bytes(std::int64_t{1} << 36)`.

#include <cstdint>
#include <string>
#include <string_view>

#include <torch/arg.h>

namespace fasterai {

struct ReadLimits {
  // Containers (tuples, lists, dicts) inside containers in data.pkl.
  TORCH_ARG(std::int64_t, max_depth) = 100;
  // Values held at once by the unpickler, each count on its own: on its stack, in its memo, and
  // inside all of its containers together (a 100,000-tensor state_dict needs about 2.5 million).
  TORCH_ARG(std::int64_t, max_entries) = std::int64_t{1} << 24;
  // Bytes of data.pkl once decompressed.
  TORCH_ARG(std::int64_t, max_pickle_bytes) = std::int64_t{1} << 28;
  // Bytes of all storage records together: the tensors the file yields.
  TORCH_ARG(std::int64_t, max_tensor_bytes) = std::int64_t{1} << 33;  // 8 GiB
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
