#pragma once
// Selection of the k lowest scores over several tensors, without sorting.
//
// A global threshold over a whole network means selecting among up to ~10^8 values: sorting
// them costs n log n and, as torch.kthvalue, a full copy; torch.quantile refuses more than
// 16M elements.
// Floats map to unsigned integers in the same order, so the k-th smallest is found with two
// histogram passes (radix select on the high, then the low 16 bits): linear time, no copy, no
// size limit, and the histograms also tell how many values lie below the threshold and how
// many tie with it. Ties at the threshold are broken deterministically by position (tensor
// order, then flat index), so exactly k values are selected.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
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


// ---- The same selection over magnitudes, straight from the weights ------------------------
//
// For the L1 criteria at Weight granularity the scores are |w|, and a non-negative float orders
// like its bit pattern read as an unsigned integer (+Inf above every finite value, NaN above
// +Inf). So the k smallest |w| are found from the weights' own bits with the sign cleared, and
// no score tensor is made: one pass builds the histogram of the high 16 bits and notes each
// tensor's largest magnitude (which tells a NaN or Inf before anything is written), one the
// histogram of the low 16 bits inside the threshold's bin, and one writes the mask, the 1/0
// multiplier and the zeroed weights together. Only when the threshold ties with values that
// are not all selected does one more (vectorized) pass count the ties per chunk. The selection
// is select_lowest's over w.abs(), bit for bit: ties by position, exactly k.

// The order-preserving key of |w|, from w's bits.
inline std::uint32_t magnitude_key(float w) { return std::bit_cast<std::uint32_t>(w) & 0x7fffffffu; }
constexpr std::uint32_t infinity_key = 0x7f800000u;  // +Inf; NaNs lie above it

// Selects the magnitudes below `bound` (or up to it, Inclusive) in [lo, hi): mask true,
// multiplier 0 and, with ZeroWeights, the weight 0; returns how many. Written on the bits
// with restrict pointers and no branch, so that GCC vectorizes it (the same loop over floats
// and bools through aliasing pointers stayed scalar, at a third of the whole selection's time).
template <bool Inclusive, bool ZeroWeights>
std::int64_t write_selection(float* __restrict weight, bool* __restrict mask, float* __restrict multiplier,
                             std::int64_t lo, std::int64_t hi, std::uint32_t bound) {
  std::int64_t n = 0;
  for (std::int64_t j = lo; j < hi; ++j) {
    std::uint32_t bits;
    std::memcpy(&bits, weight + j, 4);
    const std::uint32_t key = bits & 0x7fffffffu;
    const bool take = Inclusive ? key <= bound : key < bound;
    const std::uint32_t kept = take ? 0u : 0xffffffffu;
    mask[j] = take;
    const std::uint32_t one_or_zero = 0x3f800000u & kept;  // 1.0f or 0.0f
    std::memcpy(multiplier + j, &one_or_zero, 4);
    if constexpr (ZeroWeights) {
      const std::uint32_t zeroed = bits & kept;
      std::memcpy(weight + j, &zeroed, 4);
    }
    n += take;
  }
  return n;
}

struct MagnitudeSelection {
  std::vector<torch::Tensor> masks;   // bool, true = selected, shaped like the weights
  std::vector<std::int64_t> counts;   // selected per tensor
  std::int64_t non_finite = -1;       // first tensor holding NaN or Inf; then nothing is written
};

// Selects the lowest |w| and writes the result into the weights' own buffers: `keep[i]` (float32,
// shaped like weights[i]) gets 1 where kept and 0 where selected and, with `zero_weights`, the
// selected weights become 0. `ks` holds one count for one selection over all tensors (Global)
// or one per tensor (Local). With `keep_one`, a tensor that would be selected entirely keeps
// its largest magnitude (the first, by position), as the Global method asks. Weights: float32,
// contiguous, on the CPU. A NaN or Inf anywhere is reported before anything is written. The
// masks are written into `masks[i]` where it is a contiguous bool CPU tensor of the weight's
// shape (the caller's previous mask, when nobody else holds it), otherwise into a new tensor.
inline MagnitudeSelection select_lowest_magnitude(const std::vector<torch::Tensor>& weights,
                                                  std::vector<std::int64_t> ks,
                                                  const std::vector<torch::Tensor>& keep,
                                                  bool zero_weights, bool keep_one,
                                                  const std::vector<torch::Tensor>& masks = {}) {
  const size_t n_tensors = weights.size();
  const bool global = ks.size() == 1;
  if (!global && ks.size() != n_tensors)
    throw std::logic_error("fasterai: select_lowest_magnitude needs one count or one per tensor");
  for (size_t i = 0; i < n_tensors; ++i)
    if (weights[i].scalar_type() != torch::kFloat32 || !weights[i].is_contiguous() ||
        !weights[i].device().is_cpu() || keep[i].scalar_type() != torch::kFloat32 ||
        !keep[i].is_contiguous() || keep[i].numel() != weights[i].numel())
      throw std::logic_error("fasterai: select_lowest_magnitude needs contiguous float32 CPU tensors");
  const size_t n_sets = global ? 1 : n_tensors;
  auto first_of = [&](size_t set) { return global ? size_t{0} : set; };
  auto end_of = [&](size_t set) { return global ? n_tensors : set + 1; };
  for (size_t s = 0; s < n_sets; ++s) {
    std::int64_t total = 0;
    for (size_t i = first_of(s); i < end_of(s); ++i) total += weights[i].numel();
    ks[s] = std::clamp<std::int64_t>(ks[s], 0, total);
  }
  std::vector<std::vector<std::int64_t>> chunk_value(n_tensors);  // per-chunk scratch
  for (size_t i = 0; i < n_tensors; ++i) chunk_value[i].assign(static_cast<size_t>(chunk_count(weights[i])), 0);
  const auto threads = static_cast<size_t>(at::get_num_threads());

  // Pass 1: high-half histogram per set, largest key per tensor. Two interleaved histograms
  // per thread, so that runs of equal bins do not wait on each other's increments.
  std::vector<std::uint32_t> high(n_sets, 0);
  std::vector<std::uint32_t> largest(n_tensors, 0);
  {
    std::vector<Histogram> partial(threads, Histogram(2 << 15, 0));
    for (size_t s = 0; s < n_sets; ++s) {
      const std::vector<torch::Tensor> set(weights.begin() + static_cast<std::ptrdiff_t>(first_of(s)),
                                           weights.begin() + static_cast<std::ptrdiff_t>(end_of(s)));
      for_each_chunk(set, [&](size_t t, std::int64_t c, const float* w, std::int64_t lo, std::int64_t hi) {
        std::int64_t* h0 = partial[static_cast<size_t>(at::get_thread_num())].data();
        std::int64_t* h1 = h0 + (1 << 15);
        std::uint32_t m0 = 0, m1 = 0;
        std::int64_t i = lo;
        for (; i + 1 < hi; i += 2) {
          const std::uint32_t a = magnitude_key(w[i]), b = magnitude_key(w[i + 1]);
          ++h0[a >> 16], ++h1[b >> 16];
          m0 = std::max(m0, a), m1 = std::max(m1, b);
        }
        if (i < hi) m0 = std::max(m0, magnitude_key(w[i])), ++h0[magnitude_key(w[i]) >> 16];
        chunk_value[first_of(s) + t][static_cast<size_t>(c)] = std::max(m0, m1);
      });
      Histogram merged(1 << 15, 0);
      for (auto& h : partial) {
        for (size_t b = 0; b < merged.size(); ++b) merged[b] += h[b] + h[b + (1 << 15)];
        std::fill(h.begin(), h.end(), 0);
      }
      if (ks[s] > 0) high[s] = find_bin(merged, ks[s]);  // ks[s] becomes the rank inside the bin
    }
  }
  MagnitudeSelection out;
  for (size_t i = 0; i < n_tensors; ++i) {
    for (auto m : chunk_value[i]) largest[i] = std::max(largest[i], static_cast<std::uint32_t>(m));
    if (largest[i] >= infinity_key && out.non_finite < 0) out.non_finite = static_cast<std::int64_t>(i);
  }
  if (out.non_finite >= 0) return out;

  // Pass 2: low-half histogram inside each set's bin; the threshold and its ties.
  struct SetThreshold {
    std::uint32_t key = 0;
    std::int64_t ties_taken = 0, ties_total = 0;
    bool any = false;  // k > 0
  };
  std::vector<SetThreshold> threshold(n_sets);
  {
    std::vector<Histogram> partial(threads, Histogram(1 << 16, 0));
    for (size_t s = 0; s < n_sets; ++s) {
      if (ks[s] == 0) continue;
      const std::uint32_t bin = high[s];
      const std::vector<torch::Tensor> set(weights.begin() + static_cast<std::ptrdiff_t>(first_of(s)),
                                           weights.begin() + static_cast<std::ptrdiff_t>(end_of(s)));
      for_each_chunk(set, [&](size_t, std::int64_t, const float* w, std::int64_t lo, std::int64_t hi) {
        std::int64_t* h = partial[static_cast<size_t>(at::get_thread_num())].data();
        // Most blocks of 16 hold no value of the bin: one vector test per block (written with
        // vector types, which GCC does not find on its own here), the scalar count only on a hit.
        using lanes = std::int32_t __attribute__((vector_size(16)));
        const lanes magnitude = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
        const auto wanted = static_cast<std::int32_t>(bin);
        std::int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
          lanes a, b, c, d;
          std::memcpy(&a, w + i, 16), std::memcpy(&b, w + i + 4, 16);
          std::memcpy(&c, w + i + 8, 16), std::memcpy(&d, w + i + 12, 16);
          const lanes hit = (((a & magnitude) >> 16) == wanted) | (((b & magnitude) >> 16) == wanted) |
                            (((c & magnitude) >> 16) == wanted) | (((d & magnitude) >> 16) == wanted);
          if (hit[0] | hit[1] | hit[2] | hit[3])
            for (std::int64_t j = i; j < i + 16; ++j)
              if (const auto key = magnitude_key(w[j]); (key >> 16) == bin) ++h[key & 0xffffu];
        }
        for (; i < hi; ++i)
          if (const auto key = magnitude_key(w[i]); (key >> 16) == bin) ++h[key & 0xffffu];
      });
      Histogram merged(1 << 16, 0);
      for (auto& h : partial) {
        for (size_t b = 0; b < merged.size(); ++b) merged[b] += h[b];
        std::fill(h.begin(), h.end(), 0);
      }
      std::int64_t rank = ks[s];
      const std::uint32_t low = find_bin(merged, rank);
      threshold[s] = {(bin << 16) | low, rank, merged[low], true};
    }
  }

  // Pass 3, only where some ties stay: ties per chunk, then the earliest ones get the quota.
  // chunk_value becomes the number of ties each chunk selects (-1: all of its ties).
  for (auto& v : chunk_value) std::fill(v.begin(), v.end(), -1);
  std::vector<std::vector<std::int64_t>> ties_in(n_tensors);
  for (size_t s = 0; s < n_sets; ++s) {
    const SetThreshold& t = threshold[s];
    if (!t.any || t.ties_taken == t.ties_total) continue;
    for (size_t i = first_of(s); i < end_of(s); ++i) {
      ties_in[i].assign(chunk_value[i].size(), 0);
      for_each_chunk({weights[i]}, [&](size_t, std::int64_t c, const float* w, std::int64_t lo, std::int64_t hi) {
        std::int64_t n = 0;
        for (std::int64_t j = lo; j < hi; ++j) n += magnitude_key(w[j]) == t.key;
        ties_in[i][static_cast<size_t>(c)] = n;
      });
    }
    std::int64_t left = t.ties_taken;
    for (size_t i = first_of(s); i < end_of(s); ++i)
      for (size_t c = 0; c < chunk_value[i].size(); ++c)
        chunk_value[i][c] = std::min(ties_in[i][c], left), left -= chunk_value[i][c];
  }

  // A tensor selected entirely keeps its largest magnitude (first by position): found now and
  // skipped by the last pass, which then cannot lose its value.
  std::vector<std::int64_t> spared(n_tensors, -1);
  if (keep_one)
    for (size_t i = 0; i < n_tensors; ++i) {
      const SetThreshold& t = threshold[global ? 0 : i];
      if (!t.any || weights[i].numel() == 0 || largest[i] > t.key) continue;
      if (largest[i] == t.key && !ties_in[i].empty()) {  // full only if all its ties are taken
        bool all = true;
        for (size_t c = 0; c < ties_in[i].size(); ++c) all = all && chunk_value[i][c] == ties_in[i][c];
        if (!all) continue;
      }
      const float* w = weights[i].data_ptr<float>();
      std::int64_t p = 0;
      while (magnitude_key(w[p]) != largest[i]) ++p;
      spared[i] = p;
    }

  // Pass 4: mask, multiplier and zeroed weights in one pass, into the caller's mask buffers
  // where they fit (a fresh 134 MB tensor costs its page faults on every recomputation).
  for (size_t i = 0; i < n_tensors; ++i) {
    const bool fits = i < masks.size() && masks[i].defined() && masks[i].scalar_type() == torch::kBool &&
                      masks[i].device().is_cpu() && masks[i].is_contiguous() &&
                      masks[i].sizes() == weights[i].sizes();
    out.masks.push_back(fits ? masks[i] : torch::empty(weights[i].sizes(), torch::TensorOptions().dtype(torch::kBool)));
    out.counts.push_back(0);
  }
  for (size_t i = 0; i < n_tensors; ++i) {
    const SetThreshold& t = threshold[global ? 0 : i];
    bool* mask = out.masks[i].data_ptr<bool>();
    float* multiplier = keep[i].data_ptr<float>();
    float* weight = weights[i].data_ptr<float>();
    std::vector<std::int64_t> selected(chunk_value[i].size(), 0);
    for_each_chunk({weights[i]}, [&](size_t, std::int64_t c, const float*, std::int64_t lo, std::int64_t hi) {
      const std::int64_t quota = chunk_value[i][static_cast<size_t>(c)];
      const std::int64_t ties = ties_in[i].empty() ? 0 : ties_in[i][static_cast<size_t>(c)];
      const std::int64_t p = spared[i];
      const bool has_spared = p >= lo && p < hi;
      const float spared_value = has_spared ? weight[p] : 0.0f;
      std::int64_t n = 0;
      if (!t.any) {
        std::fill(mask + lo, mask + hi, false);
        std::fill(multiplier + lo, multiplier + hi, 1.0f);
      } else if (quota < 0 || quota == ties) {  // everything up to the threshold, inclusive
        n = zero_weights ? write_selection<true, true>(weight, mask, multiplier, lo, hi, t.key)
                         : write_selection<true, false>(weight, mask, multiplier, lo, hi, t.key);
      } else if (quota == 0) {                  // everything below it
        n = zero_weights ? write_selection<false, true>(weight, mask, multiplier, lo, hi, t.key)
                         : write_selection<false, false>(weight, mask, multiplier, lo, hi, t.key);
      } else {  // the chunk where the ties run out
        std::int64_t left = quota;
        for (std::int64_t j = lo; j < hi; ++j) {
          const std::uint32_t key = magnitude_key(weight[j]);
          const bool take = key < t.key || (key == t.key && left-- > 0);
          mask[j] = take;
          multiplier[j] = take ? 0.0f : 1.0f;
          if (zero_weights && take) weight[j] = 0.0f;
          n += take;
        }
      }
      if (has_spared && mask[p]) {
        mask[p] = false, multiplier[p] = 1.0f, weight[p] = spared_value;
        --n;
      }
      selected[static_cast<size_t>(c)] = n;
    });
    for (auto n : selected) out.counts[i] += n;
  }
  return out;
}

}  // namespace fasterai::detail
