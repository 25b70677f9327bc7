#pragma once
// Selection of the k lowest scores over several tensors, without sorting.
//
// A global threshold over a whole network means selecting among up to ~10^8 values: sorting
// them (or torch.kthvalue) takes seconds and torch.quantile refuses more than 16M elements.
// Floats map to unsigned integers in the same order, so the k-th smallest is found with two
// histogram passes (radix select on the high then the low 16 bits): linear time, no copy, no
// size limit. Ties at the threshold are broken deterministically by position (tensor order,
// then flat index), so exactly k values are selected.

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

namespace fasterai::detail {

// Order-preserving map from float to uint32 (negative floats reversed below positives).
inline std::uint32_t ordered_bits(float f) {
  const auto u = std::bit_cast<std::uint32_t>(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_ordered_bits(std::uint32_t key) {
  const std::uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return std::bit_cast<float>(u);
}

using Histogram = std::vector<std::int64_t>;

// Histogram of 16 bits of the keys (high half, or low half of keys whose high half is `high`).
inline Histogram histogram16(const std::vector<torch::Tensor>& scores, bool low_half,
                             std::uint32_t high) {
  Histogram total(1 << 16, 0);
  for (const auto& t : scores) {
    const float* data = t.data_ptr<float>();
    const std::int64_t n = t.numel();
    const int chunks = std::max(1, std::min<int>(at::get_num_threads(), int(n / (1 << 20)) + 1));
    std::vector<Histogram> partial(static_cast<size_t>(chunks), Histogram(1 << 16, 0));
    at::parallel_for(0, chunks, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t c = begin; c < end; ++c) {
        auto& h = partial[static_cast<size_t>(c)];
        const std::int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
        for (std::int64_t i = lo; i < hi; ++i) {
          const std::uint32_t key = ordered_bits(data[i]);
          if (!low_half) {
            ++h[key >> 16];
          } else if ((key >> 16) == high) {
            ++h[key & 0xffffu];
          }
        }
      }
    });
    for (const auto& h : partial)
      for (size_t b = 0; b < total.size(); ++b) total[b] += h[b];
  }
  return total;
}

// The bin holding the k-th (1-based) smallest value; k becomes its rank inside the bin.
inline std::uint32_t find_bin(const Histogram& h, std::int64_t& k) {
  for (std::uint32_t b = 0; b < h.size(); ++b) {
    if (k <= h[b]) return b;
    k -= h[b];
  }
  throw std::logic_error("fasterai: selection rank beyond the number of values");
}

// The k-th smallest (1-based) value over all `scores` (contiguous float32 CPU tensors).
inline float kth_smallest(const std::vector<torch::Tensor>& scores, std::int64_t k) {
  const std::uint32_t high = find_bin(histogram16(scores, false, 0), k);
  const std::uint32_t low = find_bin(histogram16(scores, true, high), k);
  return from_ordered_bits((high << 16) | low);
}

// Masks (true = selected) of the k lowest scores over all tensors; ties at the threshold go to
// the earliest positions. Each score tensor is flat; the masks have the same shapes.
inline std::vector<torch::Tensor> select_lowest(const std::vector<torch::Tensor>& scores,
                                                std::int64_t k) {
  std::vector<torch::Tensor> cpu;
  cpu.reserve(scores.size());
  for (const auto& s : scores) cpu.push_back(s.detach().to(torch::kCPU, torch::kFloat32).contiguous().view(-1));
  std::vector<torch::Tensor> masks;
  masks.reserve(scores.size());
  if (k <= 0) {
    for (const auto& s : scores) masks.push_back(torch::zeros(s.sizes(), s.options().dtype(torch::kBool)));
    return masks;
  }
  const float threshold = kth_smallest(cpu, k);
  std::int64_t below = 0;
  for (const auto& s : cpu) below += s.lt(threshold).sum().item<std::int64_t>();
  std::int64_t ties_left = k - below;  // how many of the values equal to the threshold go
  for (size_t i = 0; i < cpu.size(); ++i) {
    auto mask = cpu[i].lt(threshold);
    if (ties_left > 0) {
      auto equal = cpu[i].eq(threshold);
      auto rank = equal.cumsum(0);  // 1-based rank among this tensor's ties
      mask |= equal & rank.le(ties_left);
      ties_left -= std::min<std::int64_t>(ties_left, equal.sum().item<std::int64_t>());
    }
    masks.push_back(mask.view(scores[i].sizes()).to(scores[i].device()));
  }
  return masks;
}

}  // namespace fasterai::detail
