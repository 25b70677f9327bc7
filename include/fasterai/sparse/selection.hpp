#pragma once
// Selection of the k lowest values over several tensors, without sorting: one routine for
// every selection the sparsifiers make.
//
// A global threshold over a whole network means selecting among up to ~10^8 values: sorting
// them costs n log n and, as torch.kthvalue, a full copy; torch.quantile refuses more than
// 16M elements.
// A float's bits map to an unsigned integer in the order of what is ranked (an `Order`: the
// score itself, or the magnitude of a weight), so the k-th smallest is found with two
// histogram passes (radix select on the high, then the low 16 bits): linear time, no copy, no
// size limit, and the histograms also tell how many values lie below the threshold and how
// many tie with it. Ties at the threshold are broken deterministically by position (tensor
// order, then flat index), so exactly k values are selected. A last pass writes the masks and,
// where asked, the 1/0 multipliers and the zeroed weights in the same sweep.
//
// Two entry points: select_lowest over scores (any criterion, any granularity), and
// select_lowest_magnitude over weights, where the scores are |w|: a non-negative float orders
// like its bits with the sign cleared, so no score tensor is made, a NaN or Inf shows in the
// largest key of the first pass before anything is written, and the masks, multipliers and
// zeroed weights come out of the same sweep. The two select the same values, bit for bit.

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

// Four 32-bit lanes, for the loops GCC does not vectorize on its own.
using lanes32 = std::uint32_t __attribute__((vector_size(16)));
using signed_lanes32 = std::int32_t __attribute__((vector_size(16)));

// Scores: any float, negatives reversed below positives; -0 ranks as +0, as comparing the
// floats would.
struct ScoreOrder {
  static constexpr std::uint32_t high_bins = 1u << 16;
  static std::uint32_t key(std::uint32_t bits) {
    bits = bits == 0x80000000u ? 0u : bits;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  static lanes32 key(lanes32 bits) {
    bits &= ~reinterpret_cast<lanes32>(bits == 0x80000000u);                  // -0 -> +0
    const auto negative = reinterpret_cast<lanes32>(reinterpret_cast<signed_lanes32>(bits) >> 31);
    return bits ^ (negative | 0x80000000u);
  }
  static float value(std::uint32_t key) {
    return std::bit_cast<float>((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
  }
  static bool finite(std::uint32_t) { return true; }  // not checked: scores come from checked weights
};

// Weights ranked by magnitude: the bits with the sign cleared (+Inf above every finite value,
// NaN above +Inf).
struct MagnitudeOrder {
  static constexpr std::uint32_t high_bins = 1u << 15;
  static std::uint32_t key(std::uint32_t bits) { return bits & 0x7fffffffu; }
  static lanes32 key(lanes32 bits) { return bits & 0x7fffffffu; }
  static float value(std::uint32_t key) { return std::bit_cast<float>(key); }
  static bool finite(std::uint32_t largest) { return largest < 0x7f800000u; }
};

template <class Order>
inline std::uint32_t key_of(const float* p) {
  std::uint32_t bits;
  std::memcpy(&bits, p, 4);
  return Order::key(bits);
}

using Histogram = std::vector<std::int64_t>;
constexpr std::int64_t chunk_grain = 1 << 18;

// Runs f(tensor, chunk, data, begin, end) over chunks of every tensor in parallel. Chunks are
// large enough to amortize the thread hand-off; results are kept per chunk and reduced in order
// by the caller, so the outcome does not depend on the number of threads.
template <class PerChunk>
void for_each_chunk(const std::vector<torch::Tensor>& values, PerChunk&& f) {
  for (size_t t = 0; t < values.size(); ++t) {
    float* data = values[t].data_ptr<float>();
    const std::int64_t n = values[t].numel();
    const std::int64_t chunks = (n + chunk_grain - 1) / chunk_grain;
    at::parallel_for(0, chunks, 1, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t c = begin; c < end; ++c)
        f(t, c, data, c * chunk_grain, std::min(n, (c + 1) * chunk_grain));
    });
  }
}

inline std::int64_t chunk_count(const torch::Tensor& t) { return (t.numel() + chunk_grain - 1) / chunk_grain; }

// The bin holding the k-th (1-based) smallest value; k becomes its rank inside the bin.
inline std::uint32_t find_bin(const Histogram& h, std::int64_t& k) {
  for (std::uint32_t b = 0; b < h.size(); ++b) {
    if (k <= h[b]) return b;
    k -= h[b];
  }
  throw std::logic_error("fasterai: selection rank beyond the number of values");
}

// The k-th smallest key of one set of tensors and its ties.
struct KeyThreshold {
  std::uint32_t key = 0;
  std::int64_t ties_taken = 0;  // how many values with that key are selected (the earliest)
  std::int64_t ties_total = 0;  // how many values have it
  bool any = false;             // k > 0
};

// The tensors [first, end) of `values` form one set: one count over all of them (ks of size 1),
// or each tensor is its own set (one count per tensor).
struct Sets {
  size_t tensors = 0;
  bool global = true;
  size_t count() const { return global ? 1 : tensors; }
  size_t first(size_t set) const { return global ? 0 : set; }
  size_t end(size_t set) const { return global ? tensors : set + 1; }
  size_t of(size_t tensor) const { return global ? 0 : tensor; }
  std::vector<torch::Tensor> members(const std::vector<torch::Tensor>& values, size_t set) const {
    return {values.begin() + static_cast<std::ptrdiff_t>(first(set)),
            values.begin() + static_cast<std::ptrdiff_t>(end(set))};
  }
};

// Passes 1 and 2: the threshold of each set (ks[s] clamped to the set's size) and each tensor's
// largest key. Pass 1 is the high-half histogram per set; two interleaved histograms per thread,
// so that runs of equal bins do not wait on each other's increments. Pass 2 is the low-half
// histogram inside the threshold's bin: most blocks of 16 values hold no value of that bin, so
// one vector test per block, the scalar count only on a hit. `finite` is false as soon as a
// largest key is not (MagnitudeOrder), and then pass 2 is skipped.
template <class Order>
struct Thresholds {
  std::vector<KeyThreshold> sets;
  std::vector<std::uint32_t> largest;   // per tensor
  std::int64_t non_finite = -1;         // the first tensor whose largest key is not finite
};

template <class Order>
Thresholds<Order> find_thresholds(const std::vector<torch::Tensor>& values, const Sets& sets,
                                  std::vector<std::int64_t>& ks) {
  const auto threads = static_cast<size_t>(at::get_num_threads());
  Thresholds<Order> out;
  out.sets.resize(sets.count());
  out.largest.assign(sets.tensors, 0);
  std::vector<std::uint32_t> high(sets.count(), 0);
  std::vector<std::vector<std::uint32_t>> chunk_largest(sets.tensors);
  for (size_t i = 0; i < sets.tensors; ++i) chunk_largest[i].assign(static_cast<size_t>(chunk_count(values[i])), 0);
  {
    constexpr std::uint32_t bins = Order::high_bins;
    std::vector<Histogram> partial(threads, Histogram(2 * bins, 0));
    for (size_t s = 0; s < sets.count(); ++s) {
      std::int64_t total = 0;
      for (size_t i = sets.first(s); i < sets.end(s); ++i) total += values[i].numel();
      ks[s] = std::clamp<std::int64_t>(ks[s], 0, total);
      for_each_chunk(sets.members(values, s), [&](size_t t, std::int64_t c, const float* w, std::int64_t lo, std::int64_t hi) {
        std::int64_t* h0 = partial[static_cast<size_t>(at::get_thread_num())].data();
        std::int64_t* h1 = h0 + bins;
        std::uint32_t m0 = 0, m1 = 0;
        std::int64_t i = lo;
        for (; i + 1 < hi; i += 2) {
          const std::uint32_t a = key_of<Order>(w + i), b = key_of<Order>(w + i + 1);
          ++h0[a >> 16], ++h1[b >> 16];
          m0 = std::max(m0, a), m1 = std::max(m1, b);
        }
        if (i < hi) {
          const std::uint32_t a = key_of<Order>(w + i);
          ++h0[a >> 16], m0 = std::max(m0, a);
        }
        chunk_largest[sets.first(s) + t][static_cast<size_t>(c)] = std::max(m0, m1);
      });
      Histogram merged(bins, 0);
      for (auto& h : partial) {
        for (size_t b = 0; b < merged.size(); ++b) merged[b] += h[b] + h[b + bins];
        std::fill(h.begin(), h.end(), 0);
      }
      if (ks[s] > 0) high[s] = find_bin(merged, ks[s]);  // ks[s] becomes the rank inside the bin
    }
  }
  for (size_t i = 0; i < sets.tensors; ++i) {
    for (auto m : chunk_largest[i]) out.largest[i] = std::max(out.largest[i], m);
    if (!Order::finite(out.largest[i]) && out.non_finite < 0) out.non_finite = static_cast<std::int64_t>(i);
  }
  if (out.non_finite >= 0) return out;

  std::vector<Histogram> partial(threads, Histogram(1 << 16, 0));
  for (size_t s = 0; s < sets.count(); ++s) {
    if (ks[s] == 0) continue;
    const std::uint32_t bin = high[s];
    for_each_chunk(sets.members(values, s), [&](size_t, std::int64_t, const float* w, std::int64_t lo, std::int64_t hi) {
      std::int64_t* h = partial[static_cast<size_t>(at::get_thread_num())].data();
      std::int64_t i = lo;
      for (; i + 16 <= hi; i += 16) {
        lanes32 a, b, c, d;
        std::memcpy(&a, w + i, 16), std::memcpy(&b, w + i + 4, 16);
        std::memcpy(&c, w + i + 8, 16), std::memcpy(&d, w + i + 12, 16);
        const auto hit = ((Order::key(a) >> 16) == bin) | ((Order::key(b) >> 16) == bin) |
                         ((Order::key(c) >> 16) == bin) | ((Order::key(d) >> 16) == bin);
        if (hit[0] | hit[1] | hit[2] | hit[3])
          for (std::int64_t j = i; j < i + 16; ++j)
            if (const auto key = key_of<Order>(w + j); (key >> 16) == bin) ++h[key & 0xffffu];
      }
      for (; i < hi; ++i)
        if (const auto key = key_of<Order>(w + i); (key >> 16) == bin) ++h[key & 0xffffu];
    });
    Histogram merged(1 << 16, 0);
    for (auto& h : partial) {
      for (size_t b = 0; b < merged.size(); ++b) merged[b] += h[b];
      std::fill(h.begin(), h.end(), 0);
    }
    std::int64_t rank = ks[s];
    const std::uint32_t low = find_bin(merged, rank);
    out.sets[s] = {(bin << 16) | low, rank, merged[low], true};
  }
  return out;
}

struct Threshold {
  float value;               // the k-th smallest value
  std::int64_t ties_taken;   // how many values equal to it are selected (the earliest)
  std::int64_t ties_total;   // how many values equal it
};

// The k-th smallest (1-based, 1 <= k <= total) over contiguous float32 CPU tensors.
inline Threshold kth_smallest(const std::vector<torch::Tensor>& values, std::int64_t k) {
  std::vector<std::int64_t> ks{k};
  const auto t = find_thresholds<ScoreOrder>(values, Sets{values.size(), true}, ks).sets.front();
  return {ScoreOrder::value(t.key), t.ties_taken, t.ties_total};
}

// The last pass over [lo, hi) when every value up to the threshold's key (Inclusive) or below
// it is selected: mask true and, where asked, multiplier 0 and the value 0. Written on the bits
// with restrict pointers and no branch, so that GCC vectorizes it (the same loop over floats
// and bools through aliasing pointers stayed scalar, at a third of the whole selection's time).
template <class Order, bool Inclusive, bool Mask, bool Multiplier, bool ZeroValues>
std::int64_t write_selection(float* __restrict value, bool* __restrict mask, float* __restrict multiplier,
                             std::int64_t lo, std::int64_t hi, std::uint32_t bound) {
  std::int64_t n = 0;
  for (std::int64_t j = lo; j < hi; ++j) {
    std::uint32_t bits;
    std::memcpy(&bits, value + j, 4);
    const std::uint32_t key = Order::key(bits);
    const bool take = Inclusive ? key <= bound : key < bound;
    const std::uint32_t kept = take ? 0u : 0xffffffffu;
    if constexpr (Mask) mask[j] = take;
    if constexpr (Multiplier) {
      const std::uint32_t one_or_zero = 0x3f800000u & kept;  // 1.0f or 0.0f
      std::memcpy(multiplier + j, &one_or_zero, 4);
    }
    if constexpr (ZeroValues) {
      const std::uint32_t zeroed = bits & kept;
      std::memcpy(value + j, &zeroed, 4);
    }
    n += take;
  }
  return n;
}

template <class Order, bool Mask, bool Multiplier, bool ZeroValues>
std::int64_t write_selection_to(float* value, bool* mask, float* multiplier, std::int64_t lo, std::int64_t hi,
                                std::uint32_t bound, bool inclusive) {
  return inclusive ? write_selection<Order, true, Mask, Multiplier, ZeroValues>(value, mask, multiplier, lo, hi, bound)
                   : write_selection<Order, false, Mask, Multiplier, ZeroValues>(value, mask, multiplier, lo, hi, bound);
}

struct Selection {
  std::vector<torch::Tensor> masks;   // bool, true = selected, shaped like the inputs
  std::vector<std::int64_t> counts;   // selected per tensor
  std::int64_t non_finite = -1;       // select_lowest_magnitude: the first tensor holding NaN or
                                      // Inf; then nothing is written
};

// What the last pass writes besides the masks.
struct SelectionWrites {
  std::vector<torch::Tensor> multipliers;   // float32, like each value: 1 kept, 0 selected (or none)
  bool zero_selected = false;               // the selected values become 0
  bool keep_one = false;                    // a tensor selected entirely keeps its largest key
  std::vector<torch::Tensor> mask_buffers;  // written into where they fit
  bool masks = true;                        // false: no masks (then multipliers are needed)
};

// The k lowest keys over contiguous float32 CPU tensors: `ks` holds one count for one selection
// over all tensors, or one per tensor.
template <class Order>
Selection radix_select(const std::vector<torch::Tensor>& values, std::vector<std::int64_t> ks,
                       const SelectionWrites& writes) {
  const Sets sets{values.size(), ks.size() == 1};
  if (!sets.global && ks.size() != values.size())
    throw std::logic_error("fasterai: a selection needs one count or one per tensor");
  const auto found = find_thresholds<Order>(values, sets, ks);
  Selection out;
  out.non_finite = found.non_finite;
  if (out.non_finite >= 0) return out;
  const auto& threshold = found.sets;

  // Pass 3, only where some ties stay: ties per chunk, then the earliest ones get the quota.
  // quota[i][c]: the ties chunk c of tensor i selects (-1: all of its ties).
  std::vector<std::vector<std::int64_t>> quota(sets.tensors), ties_in(sets.tensors);
  for (size_t i = 0; i < sets.tensors; ++i) quota[i].assign(static_cast<size_t>(chunk_count(values[i])), -1);
  for (size_t s = 0; s < sets.count(); ++s) {
    const KeyThreshold& t = threshold[s];
    if (!t.any || t.ties_taken == t.ties_total) continue;
    for (size_t i = sets.first(s); i < sets.end(s); ++i) {
      ties_in[i].assign(quota[i].size(), 0);
      for_each_chunk({values[i]}, [&](size_t, std::int64_t c, const float* w, std::int64_t lo, std::int64_t hi) {
        std::int64_t n = 0;
        for (std::int64_t j = lo; j < hi; ++j) n += key_of<Order>(w + j) == t.key;
        ties_in[i][static_cast<size_t>(c)] = n;
      });
    }
    std::int64_t left = t.ties_taken;
    for (size_t i = sets.first(s); i < sets.end(s); ++i)
      for (size_t c = 0; c < quota[i].size(); ++c) quota[i][c] = std::min(ties_in[i][c], left), left -= quota[i][c];
  }

  // A tensor selected entirely keeps its largest key (first by position): found now and
  // skipped by the last pass, which then cannot lose its value.
  std::vector<std::int64_t> spared(sets.tensors, -1);
  if (writes.keep_one)
    for (size_t i = 0; i < sets.tensors; ++i) {
      const KeyThreshold& t = threshold[sets.of(i)];
      if (!t.any || values[i].numel() == 0 || found.largest[i] > t.key) continue;
      if (found.largest[i] == t.key && !ties_in[i].empty()) {  // full only if all its ties are taken
        bool all = true;
        for (size_t c = 0; c < ties_in[i].size(); ++c) all = all && quota[i][c] == ties_in[i][c];
        if (!all) continue;
      }
      const float* w = values[i].data_ptr<float>();
      std::int64_t p = 0;
      while (key_of<Order>(w + p) != found.largest[i]) ++p;
      spared[i] = p;
    }

  // Pass 4: masks (into the caller's buffers where they fit: a fresh 134 MB tensor costs its
  // page faults on every recomputation), multipliers and zeroed values in one sweep.
  const bool multiply = !writes.multipliers.empty();
  if (!writes.masks && !multiply) throw std::logic_error("fasterai: a selection that writes neither masks nor multipliers");
  for (size_t i = 0; i < sets.tensors && writes.masks; ++i) {
    const auto& b = i < writes.mask_buffers.size() ? writes.mask_buffers[i] : torch::Tensor();
    const bool fits = b.defined() && b.scalar_type() == torch::kBool && b.device().is_cpu() && b.is_contiguous() &&
                      b.sizes() == values[i].sizes();
    out.masks.push_back(fits ? b : torch::empty(values[i].sizes(), torch::TensorOptions().dtype(torch::kBool)));
  }
  out.counts.assign(sets.tensors, 0);
  for (size_t i = 0; i < sets.tensors; ++i) {
    const KeyThreshold& t = threshold[sets.of(i)];
    bool* mask = writes.masks ? out.masks[i].data_ptr<bool>() : nullptr;
    float* multiplier = multiply ? writes.multipliers[i].data_ptr<float>() : nullptr;
    float* value = values[i].data_ptr<float>();
    std::vector<std::int64_t> selected(quota[i].size(), 0);
    for_each_chunk({values[i]}, [&](size_t, std::int64_t c, const float*, std::int64_t lo, std::int64_t hi) {
      const std::int64_t q = quota[i][static_cast<size_t>(c)];
      const std::int64_t ties = ties_in[i].empty() ? 0 : ties_in[i][static_cast<size_t>(c)];
      const std::int64_t p = spared[i];
      const bool has_spared = p >= lo && p < hi;
      const float spared_value = has_spared ? value[p] : 0.0f;
      auto sweep = [&](bool inclusive) {
        if (!mask) {
          return writes.zero_selected
                     ? write_selection_to<Order, false, true, true>(value, mask, multiplier, lo, hi, t.key, inclusive)
                     : write_selection_to<Order, false, true, false>(value, mask, multiplier, lo, hi, t.key, inclusive);
        }
        if (multiply && writes.zero_selected)
          return write_selection_to<Order, true, true, true>(value, mask, multiplier, lo, hi, t.key, inclusive);
        if (multiply) return write_selection_to<Order, true, true, false>(value, mask, multiplier, lo, hi, t.key, inclusive);
        if (writes.zero_selected)
          return write_selection_to<Order, true, false, true>(value, mask, multiplier, lo, hi, t.key, inclusive);
        return write_selection_to<Order, true, false, false>(value, mask, multiplier, lo, hi, t.key, inclusive);
      };
      std::int64_t n = 0;
      if (!t.any) {
        if (mask) std::fill(mask + lo, mask + hi, false);
        if (multiply) std::fill(multiplier + lo, multiplier + hi, 1.0f);
      } else if (q < 0 || q == ties) {  // every value up to the threshold, inclusive
        n = sweep(true);
      } else if (q == 0) {              // every value below it
        n = sweep(false);
      } else {  // the chunk where the ties run out
        std::int64_t left = q;
        for (std::int64_t j = lo; j < hi; ++j) {
          const std::uint32_t key = key_of<Order>(value + j);
          const bool take = key < t.key || (key == t.key && left-- > 0);
          if (mask) mask[j] = take;
          if (multiply) multiplier[j] = take ? 0.0f : 1.0f;
          if (writes.zero_selected && take) value[j] = 0.0f;
          n += take;
        }
      }
      if (has_spared && (mask ? mask[p] : multiplier[p] == 0.0f)) {
        value[p] = spared_value;
        if (mask) mask[p] = false;
        if (multiply) multiplier[p] = 1.0f;
        --n;
      }
      selected[static_cast<size_t>(c)] = n;
    });
    for (auto n : selected) out.counts[i] += n;
  }
  return out;
}

// The k lowest scores over all tensors (any device and dtype; compared as float32); ties at the
// threshold go to the earliest positions. Masks on each score's device.
inline Selection select_lowest(const std::vector<torch::Tensor>& scores, std::int64_t k) {
  std::vector<torch::Tensor> values;
  for (const auto& s : scores) values.push_back(s.detach().to(torch::kCPU, torch::kFloat32).contiguous());
  auto out = radix_select<ScoreOrder>(values, {k}, {});
  for (size_t i = 0; i < scores.size(); ++i) out.masks[i] = out.masks[i].to(scores[i].device());
  return out;
}

// Selects the lowest |w| and writes the result into the weights' own buffers: `keep[i]` (float32,
// shaped like weights[i]) gets 1 where kept and 0 where selected and, with `zero_weights`, the
// selected weights become 0. `ks` holds one count for one selection over all tensors (Global)
// or one per tensor (Local). With `keep_one`, a tensor that would be selected entirely keeps
// its largest magnitude (the first, by position), as the Global method asks. Weights: float32,
// contiguous, on the CPU. A NaN or Inf anywhere is reported before anything is written. The
// masks are written into `masks[i]` where it is a contiguous bool CPU tensor of the weight's
// shape (the caller's previous mask, when nobody else holds it), otherwise into a new tensor.
inline Selection select_lowest_magnitude(const std::vector<torch::Tensor>& weights, std::vector<std::int64_t> ks,
                                         const std::vector<torch::Tensor>& keep, bool zero_weights, bool keep_one,
                                         const std::vector<torch::Tensor>& masks = {}) {
  for (size_t i = 0; i < weights.size(); ++i)
    if (weights[i].scalar_type() != torch::kFloat32 || !weights[i].is_contiguous() ||
        !weights[i].device().is_cpu() || i >= keep.size() || keep[i].scalar_type() != torch::kFloat32 ||
        !keep[i].is_contiguous() || keep[i].numel() != weights[i].numel())
      throw std::logic_error("fasterai: select_lowest_magnitude needs contiguous float32 CPU tensors");
  return radix_select<MagnitudeOrder>(weights, std::move(ks), {keep, zero_weights, keep_one, masks});
}

}  // namespace fasterai::detail
