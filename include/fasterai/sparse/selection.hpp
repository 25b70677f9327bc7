#pragma once
// Selection of the k lowest scores over several tensors, without sorting.
//
// A global threshold over a whole network means selecting among up to ~10^8 values: sorting
// them (or torch.kthvalue) takes seconds and torch.quantile refuses more than 16M elements.
// Floats map to unsigned integers in the same order, so the k-th smallest is found with two
// histogram passes (radix select on the high, then the low 16 bits): linear time, no copy, no
// size limit, and the histograms also tell how many values lie below the threshold and how
// many tie with it. Ties at the threshold are broken deterministically by position (tensor
// order, then flat index), so exactly k values are selected.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <stdexcept>
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

// Runs f(data, begin, end) over chunks of every tensor in parallel, then reduces the
// per-chunk results in order. Chunks are large enough to amortize the thread hand-off.
template <class PerChunk>
void for_each_chunk(const std::vector<torch::Tensor>& values, PerChunk&& f) {
  constexpr std::int64_t grain = 1 << 18;
  for (size_t t = 0; t < values.size(); ++t) {
    const float* data = values[t].data_ptr<float>();
    const std::int64_t n = values[t].numel();
    const std::int64_t chunks = (n + grain - 1) / grain;
    at::parallel_for(0, chunks, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t c = begin; c < end; ++c)
        f(t, c, data, c * grain, std::min(n, (c + 1) * grain));
    });
  }
}

inline std::int64_t chunk_count(const torch::Tensor& t) { return (t.numel() + (1 << 18) - 1) >> 18; }

// Histogram of 16 bits of the keys: the high half, or the low half of the keys whose high half
// is `high`. One partial histogram per thread, merged at the end.
inline Histogram histogram16(const std::vector<torch::Tensor>& values, bool low_half,
                             std::uint32_t high) {
  std::vector<Histogram> partial(static_cast<size_t>(at::get_num_threads()), Histogram(1 << 16, 0));
  for_each_chunk(values, [&](size_t, std::int64_t, const float* data, std::int64_t lo, std::int64_t hi) {
    auto& h = partial[static_cast<size_t>(at::get_thread_num())];
    if (!low_half) {
      for (std::int64_t i = lo; i < hi; ++i) ++h[ordered_bits(data[i]) >> 16];
    } else {
      for (std::int64_t i = lo; i < hi; ++i) {
        const std::uint32_t key = ordered_bits(data[i]);
        if ((key >> 16) == high) ++h[key & 0xffffu];
      }
    }
  });
  Histogram total(1 << 16, 0);
  for (const auto& h : partial)
    for (size_t b = 0; b < total.size(); ++b) total[b] += h[b];
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

struct Threshold {
  float value;               // the k-th smallest value
  std::int64_t ties_taken;   // how many values equal to it are selected (the earliest)
  std::int64_t ties_total;   // how many values equal it
};

// The k-th smallest (1-based, 1 <= k <= total) over contiguous float32 CPU tensors.
inline Threshold kth_smallest(const std::vector<torch::Tensor>& values, std::int64_t k) {
  const std::uint32_t high = find_bin(histogram16(values, false, 0), k);
  const Histogram low_hist = histogram16(values, true, high);
  const std::uint32_t low = find_bin(low_hist, k);
  return {from_ordered_bits((high << 16) | low), k, low_hist[low]};
}

struct Selection {
  std::vector<torch::Tensor> masks;   // bool, true = selected, shaped like the inputs
  std::vector<std::int64_t> counts;   // selected per tensor
};

// The k lowest scores over all tensors; ties at the threshold go to the earliest positions.
inline Selection select_lowest(const std::vector<torch::Tensor>& scores, std::int64_t k) {
  std::vector<torch::Tensor> values;
  Selection out;
  for (const auto& s : scores) {
    values.push_back(s.detach().to(torch::kCPU, torch::kFloat32).contiguous().view(-1));
    // Every element is written below when k > 0; zeros only for the k == 0 case.
    out.masks.push_back(k > 0 ? torch::empty(s.sizes(), torch::TensorOptions().dtype(torch::kBool))
                              : torch::zeros(s.sizes(), torch::TensorOptions().dtype(torch::kBool)));
    out.counts.push_back(0);
  }
  std::int64_t total = 0;
  for (const auto& v : values) total += v.numel();
  k = std::clamp<std::int64_t>(k, 0, total);
  if (k > 0) {
    const Threshold t = kth_smallest(values, k);
    // Quota of ties per chunk, in position order (only needed when some ties stay).
    std::vector<std::vector<std::int64_t>> quota(values.size());
    for (size_t i = 0; i < values.size(); ++i) quota[i].assign(static_cast<size_t>(chunk_count(values[i])), 0);
    if (t.ties_taken < t.ties_total) {
      for_each_chunk(values, [&](size_t i, std::int64_t c, const float* data, std::int64_t lo, std::int64_t hi) {
        quota[i][static_cast<size_t>(c)] = std::count(data + lo, data + hi, t.value);
      });
      std::int64_t left = t.ties_taken;
      for (auto& per_tensor : quota)
        for (auto& q : per_tensor) q = std::min(q, left), left -= q;
    }
    std::vector<std::vector<std::int64_t>> selected(values.size());
    for (size_t i = 0; i < values.size(); ++i) selected[i].assign(quota[i].size(), 0);
    const bool all_ties = t.ties_taken == t.ties_total;
    for_each_chunk(values, [&](size_t i, std::int64_t c, const float* data, std::int64_t lo, std::int64_t hi) {
      bool* mask = out.masks[i].data_ptr<bool>();
      std::int64_t n = 0;
      if (all_ties) {  // the common case: a branch-free, vectorizable pass
        for (std::int64_t j = lo; j < hi; ++j) n += (mask[j] = data[j] <= t.value);
      } else {
        std::int64_t ties = quota[i][static_cast<size_t>(c)];
        for (std::int64_t j = lo; j < hi; ++j) {
          bool take = data[j] < t.value;
          if (data[j] == t.value) take = ties-- > 0;
          n += (mask[j] = take);
        }
      }
      selected[i][static_cast<size_t>(c)] = n;
    });
    for (size_t i = 0; i < values.size(); ++i)
      for (auto n : selected[i]) out.counts[i] += n;
  }
  for (size_t i = 0; i < scores.size(); ++i) out.masks[i] = out.masks[i].to(scores[i].device());
  return out;
}

}  // namespace fasterai::detail
