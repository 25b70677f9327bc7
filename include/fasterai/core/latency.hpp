#pragma once
// Latency harness: warm-up, N timed forward passes without autograd on a fixed number of
// threads, reported as median and spread. Examples and benchmarks share it so their numbers
// are measured the same way.
//
// "Threads" covers the BLAS too: Debian's LibTorch runs convolutions and Linears through
// OpenBLAS, whose own thread pool ignores torch::set_num_threads and busy-waits; on a machine
// where other processes run, its spinning threads can make a small network several times
// slower than with one thread (docs/results.md, "OpenBLAS threads"). So OpenBLAS's count is
// set too while timing, when it is loaded.

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>

namespace fasterai {

struct LatencyOptions {
  LatencyOptions() = default;
  TORCH_ARG(int, warmup) = 5;   // untimed runs first (allocator, caches, lazy init)
  TORCH_ARG(int, runs) = 50;    // timed runs
  TORCH_ARG(int, threads) = 1;  // intra-op threads during the measurement (restored after)
};

struct LatencyStats {
  double median_ms = 0;
  double min_ms = 0;
  double max_ms = 0;
  double iqr_ms = 0;  // interquartile range: the spread that outliers do not dominate
  int runs = 0;
};

namespace detail {

// OpenBLAS's thread count, looked up at run time: the BLAS behind LibTorch is a system choice.
class BlasThreads {
 public:
  static int get() {
    using Get = int (*)();
    const auto f = reinterpret_cast<Get>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    return f ? f() : 0;
  }
  static void set(int threads) {
    using Set = void (*)(int);
    if (const auto f = reinterpret_cast<Set>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); f && threads > 0)
      f(threads);
  }
};

inline double quantile_sorted(const std::vector<double>& v, double q) {
  const double pos = q * double(v.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const auto hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}
}  // namespace detail

// Time `model.forward(input)` in eval mode (the model's mode is restored afterwards).
template <module Model>
LatencyStats measure_latency(Model& model, const torch::Tensor& input,
                             const LatencyOptions& options = {}) {
  constexpr auto where = "fasterai::measure_latency";
  detail::check_argument(options.warmup() >= 0, where, "warmup", options.warmup(), "a count >= 0");
  detail::check_argument(options.runs() >= 1, where, "runs", options.runs(), "a count >= 1");
  detail::check_argument(options.threads() >= 1, where, "threads", options.threads(),
                         "a count >= 1");
  auto& m = detail::impl(model);
  // Mode and thread count come back even if forward throws.
  struct Restore {
    torch::nn::Module& m;
    bool training;
    int threads, blas_threads;
    ~Restore() {
      m.train(training);
      torch::set_num_threads(threads);
      detail::BlasThreads::set(blas_threads);
    }
  } restore{m, m.is_training(), torch::get_num_threads(), detail::BlasThreads::get()};
  torch::set_num_threads(options.threads());
  detail::BlasThreads::set(options.threads());
  m.eval();
  // Inference mode, not just no-grad: no autograd metadata or version counters per op, which
  // is what a deployed model pays.
  c10::InferenceMode inference;
  std::vector<double> times;
  times.reserve(static_cast<size_t>(options.runs()));
  // CUDA kernels run asynchronously: without waiting for the device, a timed run would end
  // when its kernels are queued, not done (and the next would pay for them).
  const bool cuda = input.is_cuda();
  for (int i = 0; i < options.warmup() + options.runs(); ++i) {
    if (cuda) torch::cuda::synchronize();
    const auto start = std::chrono::steady_clock::now();
    auto out = m.forward(input);
    if (cuda) torch::cuda::synchronize();
    const auto stop = std::chrono::steady_clock::now();
    if (i >= options.warmup())
      times.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  std::sort(times.begin(), times.end());
  LatencyStats s;
  s.runs = options.runs();
  s.median_ms = detail::quantile_sorted(times, 0.5);
  s.min_ms = times.front();
  s.max_ms = times.back();
  s.iqr_ms = detail::quantile_sorted(times, 0.75) - detail::quantile_sorted(times, 0.25);
  return s;
}

}  // namespace fasterai
