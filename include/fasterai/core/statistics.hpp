#pragma once
// Model statistics: parameter counts (total and nonzero) and size in bytes, the numbers the
// fasterai article (2020) reports at each stage of compression with the sparsity of each layer
// (layers/sparsity_report.hpp) and the multiply-accumulates (graph/macs.hpp).

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>

namespace fasterai {

// Number of parameters (trainable tensors; buffers such as running statistics are not counted,
// as in PyTorch's `sum(p.numel() for p in model.parameters())`).
template <module Model>
std::int64_t count_parameters(const Model& model) {
  std::int64_t n = 0;
  for (const auto& p : detail::impl(model).parameters()) n += p.numel();
  return n;
}

// Number of parameters that are not exactly zero.
template <module Model>
std::int64_t count_nonzero_parameters(const Model& model) {
  torch::NoGradGuard no_grad;
  std::int64_t n = 0;
  for (const auto& p : detail::impl(model).parameters()) n += p.count_nonzero().template item<std::int64_t>();
  return n;
}

// Bytes taken by the parameters and buffers (what a saved state_dict holds).
template <module Model>
std::int64_t model_size_bytes(const Model& model) {
  std::int64_t bytes = 0;
  for (const auto& p : detail::impl(model).parameters())
    bytes += p.numel() * static_cast<std::int64_t>(p.element_size());
  for (const auto& b : detail::impl(model).buffers())
    bytes += b.numel() * static_cast<std::int64_t>(b.element_size());
  return bytes;
}

// A count with thousands separators, as the fasterai article prints it ("134,309,962").
inline std::string with_thousands(std::int64_t n) {
  const std::string digits = std::to_string(n);
  const size_t sign = n < 0 ? 1 : 0;
  std::string out(digits, 0, sign);
  for (size_t i = sign; i < digits.size(); ++i) {
    if (i > sign && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

}  // namespace fasterai
