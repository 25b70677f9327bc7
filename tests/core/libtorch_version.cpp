// The LibTorch-generation header: it compiles on 1.13 and 2.x, says which branch it took, and
// its helpers give the same answers on both.
#include "catch.hpp"

#include <cstdlib>
#include <string>

#include <torch/version.h>

#include <fasterai/core/libtorch_version.hpp>

TEST_CASE("libtorch_version: the branch matches the LibTorch being compiled against",
          "[libtorch_version]") {
  STATIC_REQUIRE(fasterai::libtorch::major == TORCH_VERSION_MAJOR);
  STATIC_REQUIRE(fasterai::libtorch::v2 == (TORCH_VERSION_MAJOR >= 2));
  const std::string expected = TORCH_VERSION_MAJOR >= 2 ? "LibTorch 2.x" : "LibTorch 1.x";
  CHECK(fasterai::libtorch::branch == expected);
  WARN("compiled against LibTorch " << TORCH_VERSION << ": " << fasterai::libtorch::branch);
}

TEST_CASE("libtorch_version: reduced SVD and singular values", "[libtorch_version]") {
  torch::manual_seed(0);
  for (const auto& shape : {std::pair{7, 5}, std::pair{5, 7}}) {
    const auto a = torch::randn({shape.first, shape.second}, torch::kFloat64);
    const auto [u, s, vh] = fasterai::libtorch::svd(a);
    const auto k = std::min(shape.first, shape.second);
    CHECK(u.sizes() == torch::IntArrayRef{shape.first, k});
    CHECK(s.sizes() == torch::IntArrayRef{k});
    CHECK(vh.sizes() == torch::IntArrayRef{k, shape.second});
    CHECK(torch::allclose(u.matmul(torch::diag(s)).matmul(vh), a, 1e-10, 1e-10));
    CHECK(torch::allclose(fasterai::libtorch::svdvals(a), s, 1e-10, 1e-10));
  }
}

TEST_CASE("libtorch_version: the guards for builds with LLVM and Vulkan kernels", "[libtorch_version]") {
  const bool fuser = torch::jit::tensorExprFuserEnabled();
  {
    const fasterai::libtorch::NoTensorExprFuser no_fuser;
    if (std::getenv("PYTORCH_TENSOREXPR") == nullptr) CHECK(!torch::jit::tensorExprFuserEnabled());
    {
      const fasterai::libtorch::NoTensorExprFuser nested;
    }
    if (std::getenv("PYTORCH_TENSOREXPR") == nullptr) CHECK(!torch::jit::tensorExprFuserEnabled());
  }
  CHECK(torch::jit::tensorExprFuserEnabled() == fuser);

  const auto x = torch::randn({3}).requires_grad_();
  torch::Tensor y;
  {
    const fasterai::libtorch::InferenceGuard guard;
    CHECK(c10::InferenceMode::is_enabled());
    y = x * 2;
  }
  CHECK(!c10::InferenceMode::is_enabled());
  CHECK(y.is_inference());
  CHECK(!y.requires_grad());
  CHECK(torch::jit::tensorExprFuserEnabled() == fuser);
}
