#pragma once
// Criteria policies: the importance of each weight; the lowest-scoring groups are removed.
//
//   L1        |w|                 magnitude; the default of the fasterai article (2020),
//                                 needs nothing else
//   Taylor    (w * dL/dw)^2       first-order estimate of the loss change; needs gradients,
//                                 so call the sparsifier after backward()
//   Movement  |w| - |w0|          weights moving toward zero during fine-tuning go first;
//                                 w0 is recorded when the sparsifier is created
//   Random    uniform, seeded     a baseline: any criterion worth using must beat it

#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

#include <torch/torch.h>

namespace fasterai::criteria {

struct L1 {
  static constexpr std::string_view name() { return "L1"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&, const torch::Tensor&) {
    return w.abs();
  }
};

struct Taylor {
  static constexpr std::string_view name() { return "Taylor"; }
  static constexpr bool needs_gradients = true;
  static torch::Tensor init(const torch::Tensor&, std::uint64_t) { return {}; }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor& grad,
                             const torch::Tensor&) {
    return (w * grad).square();
  }
};

struct Movement {
  static constexpr std::string_view name() { return "Movement"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor& w, std::uint64_t) {
    return w.detach().abs().to(torch::kFloat32).clone();
  }
  static torch::Tensor score(const torch::Tensor& w, const torch::Tensor&,
                             const torch::Tensor& initial_abs) {
    return w.abs() - initial_abs;
  }
};

// Scores are drawn once, when the sparsifier is created, so masks grow monotonically as the
// target rises and a run is reproducible from its seed alone (no global RNG state is touched).
struct Random {
  static constexpr std::string_view name() { return "Random"; }
  static constexpr bool needs_gradients = false;
  static torch::Tensor init(const torch::Tensor& w, std::uint64_t seed) {
    std::mt19937_64 engine(seed);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    std::vector<float> values(static_cast<size_t>(w.numel()));
    for (auto& v : values) v = uniform(engine);
    return torch::tensor(values).reshape(w.sizes()).to(w.device());
  }
  static torch::Tensor score(const torch::Tensor&, const torch::Tensor&,
                             const torch::Tensor& drawn) {
    return drawn;
  }
};

}  // namespace fasterai::criteria
