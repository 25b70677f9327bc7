#pragma once
// Observers: what a calibration run learns about a tensor's values, turned into the affine map
// of int8 quantization, x ≈ scale·(q − zero_point).
//
//   MinMaxObserver       the range of every value seen: nothing is clipped, but one outlier
//                        widens the step for all values. The default; exact for weights.
//   PercentileObserver   a histogram of every value seen, clipped to the given percentiles
//                        (99.99 keeps all but the 0.01% most extreme values on each side):
//                        a finer step for the bulk of the values of long-tailed activations.
//
// Activations are quantized to quint8 (asymmetric, zero_point in [0, 255]); weights to qint8,
// symmetric per output channel (zero_point 0, scale = max|w_c| / 127), which every engine
// accepts and which keeps each weight within half a step of its value.
//
// `reduce_range` uses 7 of the 8 bits of activations (q in [0, 127]). Without VNNI
// instructions (e.g. AVX2 CPUs), oneDNN's int8 convolution sums pairs of u8·s8 products in
// 16 bits, which saturates when both factors are near their maximum (255·127·2 > 32767):
// a convolution of such values came out hundreds of steps wrong on such a CPU. Seven-bit
// activations cannot saturate, at the price of one bit of resolution; torch.ao makes the same
// choice for its x86 engines.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai::quant {

// The affine map of a tensor quantized as a whole.
struct QuantParams {
  double scale = 1.0;
  std::int64_t zero_point = 0;
};

// The quint8 map that covers [lo, hi] (widened to contain 0, so that zero — padding, ReLU's
// output — is exact), with q in [0, qmax].
inline QuantParams affine_params(double lo, double hi, bool reduce_range) {
  const double qmax = reduce_range ? 127.0 : 255.0;
  lo = std::min(lo, 0.0);
  hi = std::max(hi, 0.0);
  // A constant-zero tensor still needs a positive step.
  const double scale = std::max((hi - lo) / qmax, static_cast<double>(std::numeric_limits<float>::epsilon()));
  const auto zero_point =
      static_cast<std::int64_t>(std::clamp(std::nearbyint(-lo / scale), 0.0, qmax));
  return {scale, zero_point};
}

// The quantization step and the range of values a QuantParams represents without clipping.
inline double lowest_value(const QuantParams& p) { return -p.scale * double(p.zero_point); }

// Running minimum and maximum of every value observed.
class MinMaxObserver {
 public:
  explicit MinMaxObserver(bool reduce_range = true) : reduce_range_(reduce_range) {}

  void observe(const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    const auto [lo, hi] = torch::aminmax(x.detach().to(torch::kFloat32));
    min_ = std::min(min_, lo.item<double>());
    max_ = std::max(max_, hi.item<double>());
    ++count_;
  }
  bool observed() const { return count_ > 0; }
  QuantParams params() const { return affine_params(min_, max_, reduce_range_); }
  double min() const { return min_; }
  double max() const { return max_; }

 private:
  bool reduce_range_;
  double min_ = std::numeric_limits<double>::infinity();
  double max_ = -std::numeric_limits<double>::infinity();
  std::int64_t count_ = 0;
};

// A histogram of every value observed (`bins` equal bins over the running [min, max]; when a
// batch widens the range, the counts so far are moved to the bins of the wider range by their
// bin centers), clipped at the `percentile`-th and (100 − `percentile`)-th percentiles.
class PercentileObserver {
 public:
  explicit PercentileObserver(double percentile = 99.99, std::int64_t bins = 2048,
                              bool reduce_range = true)
      : percentile_(percentile), bins_(bins), reduce_range_(reduce_range) {
    constexpr auto where = "fasterai::quant::PercentileObserver";
    fasterai::detail::check_argument(percentile > 50.0 && percentile <= 100.0, where,
                                     "percentile", percentile, "a percentile in (50, 100]");
    fasterai::detail::check_argument(bins >= 16, where, "bins", bins, "a count >= 16");
  }

  void observe(const torch::Tensor& x) {
    torch::NoGradGuard no_grad;
    const torch::Tensor v = x.detach().to(torch::kFloat64).flatten();
    const auto [lo_t, hi_t] = torch::aminmax(v);
    const double lo = lo_t.item<double>(), hi = hi_t.item<double>();
    if (!histogram_.defined()) {
      min_ = lo, max_ = hi;
      histogram_ = torch::zeros({bins_}, torch::kFloat64);
    } else if (lo < min_ || hi > max_) {
      rebin(std::min(lo, min_), std::max(hi, max_));
    }
    // Out of place: copies of an observer share tensors, and a copy must not change the original
    // (the Calibrator observes on copies so that a failing batch changes nothing).
    histogram_ = histogram_ + counts_of(v, min_, max_);
  }
  bool observed() const { return histogram_.defined(); }
  QuantParams params() const {
    TORCH_CHECK(observed(), "fasterai::quant::PercentileObserver::params: nothing observed");
    const torch::Tensor cdf = histogram_.cumsum(0) / histogram_.sum();
    const double tail = (100.0 - percentile_) / 100.0;
    // First bin whose cumulative mass exceeds the lower tail; last bin before the upper tail.
    const auto first = (cdf <= tail).sum().item<std::int64_t>();
    const auto last = bins_ - (cdf >= 1.0 - tail).sum().item<std::int64_t>();
    const double width = (max_ - min_) / double(bins_);
    const double lo = min_ + width * double(std::clamp<std::int64_t>(first, 0, bins_ - 1));
    const double hi = min_ + width * double(std::clamp<std::int64_t>(last + 1, 1, bins_));
    return affine_params(lo, hi, reduce_range_);
  }

 private:
  torch::Tensor counts_of(const torch::Tensor& v, double lo, double hi) const {
    if (hi <= lo) {  // every value equal so far: all in the first bin
      torch::Tensor c = torch::zeros({bins_}, torch::kFloat64);
      c[0] = double(v.numel());
      return c;
    }
    return torch::histc(v, bins_, lo, hi);
  }
  void rebin(double lo, double hi) {
    const double old_width = (max_ - min_) / double(bins_);
    const torch::Tensor centers =
        min_ + old_width * (torch::arange(bins_, torch::kFloat64) + 0.5);
    const double width = (hi - lo) / double(bins_);
    const torch::Tensor index =
        ((centers - lo) / width).floor().clamp(0, double(bins_ - 1)).to(torch::kLong);
    torch::Tensor moved = torch::zeros({bins_}, torch::kFloat64);
    moved.index_add_(0, index, histogram_);
    histogram_ = moved;
    min_ = lo, max_ = hi;
  }

  double percentile_;
  std::int64_t bins_;
  bool reduce_range_;
  double min_ = 0, max_ = 0;
  torch::Tensor histogram_;
};

// What a calibration needs from an observer.
template <class O>
concept observer = std::copy_constructible<O> && requires(O o, const O& c, const torch::Tensor& x) {
  o.observe(x);
  { c.observed() } -> std::convertible_to<bool>;
  { c.params() } -> std::convertible_to<QuantParams>;
};

// Symmetric qint8 scales from the largest magnitudes: max|w| / 127, and 1 where everything is
// zero (float64, like `amax`'s shape).
inline torch::Tensor symmetric_scales(const torch::Tensor& amax) {
  const torch::Tensor a = amax.to(torch::kFloat64);
  return torch::where(a > 0, a / 127.0, torch::ones_like(a));
}

// The weight `w` (output channels first) as qint8: symmetric, per output channel or for the
// whole tensor, zero_point 0, scale = max|w| / 127 (a channel of zeros gets scale 1).
inline torch::Tensor quantize_weight(const torch::Tensor& w, bool per_channel = true) {
  torch::NoGradGuard no_grad;
  const torch::Tensor wf = w.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  if (!per_channel) {
    const double scale = symmetric_scales(wf.abs().max()).item<double>();
    return torch::quantize_per_tensor(wf, scale, 0, torch::kQInt8);
  }
  const torch::Tensor scales = symmetric_scales(wf.abs().flatten(1).amax(1));
  return torch::quantize_per_channel(wf, scales, torch::zeros({wf.size(0)}, torch::kLong), 0,
                                     torch::kQInt8);
}

}  // namespace fasterai::quant
