#pragma once
// fasterai::libtorch: everything fasterai does differently on LibTorch 1.13 (Debian 12) and 2.x
// (Debian 13's 2.6, the pytorch.org archives). This is the only header that looks at
// TORCH_VERSION_MAJOR; the rest of the library calls the helpers below.
//
//   static_assert(fasterai::libtorch::major == TORCH_VERSION_MAJOR);
//   std::cout << fasterai::libtorch::branch;   // "LibTorch 1.x" or "LibTorch 2.x"
//
// What differs, and how both are served:
// - Linear algebra: Debian's 2.x headers have no <torch/linalg.h> (torch::linalg::svd); ATen's
//   torch::linalg_svd / torch::linalg_svdvals exist in both, so the helpers call those.
// - c10d: in 1.13 ProcessGroupGloo / ProcessGroupNCCL *are* c10d::ProcessGroups; in 2.x they are
//   c10d::Backends that a c10d::ProcessGroup dispatches to per device type, as torch.distributed
//   builds them (ProcessGroup(store, rank, size); setBackend(device, type, backend)).
//   process_group() below takes a backend of either generation and returns the ProcessGroup.
//   It is a template so that this header needs no c10d include: only dist/ instantiates it.
// - c10d's TCPStore: from 2.4 its server defaults to libuv, which Debian's 2.6 is built without
//   ("use_libuv was requested but PyTorch was build without libuv support");
//   tcp_store_options() asks for the classic server, which every version has.
// - c10's warning handlers: 1.13 calls process(location, message, verbatim) and scopes a handler
//   with c10::Warning::WarningHandlerGuard; 2.x calls process(const c10::Warning&) and has
//   c10::WarningUtils::WarningHandlerGuard. WarningCollector and WarningHandlerGuard serve both.
//
// Two differences come from how a LibTorch was built, not from its version (Debian 13's 2.6 has
// both, Debian 12's 1.13 neither); the guards below are taken on every build, at no cost where
// they change nothing:
// - Vulkan kernels (USE_VULKAN): Vulkan and oneDNN (MkldnnCPU) tensors share the AutogradOther
//   dispatch key, so an op that is CompositeImplicitAutograd *and* has a Vulkan kernel
//   (aten::max_pool2d) gets an ambiguity kernel there that asserts ("aten::max_pool2d has
//   kernels registered to both CompositeImplicitAutograd and a backend mapped to
//   AutogradOther") for every oneDNN tensor that goes through autograd dispatch, NoGradGuard or
//   not. torch::jit::optimize_for_inference's graphs carry oneDNN tensors from op to op: they
//   run under InferenceGuard, which skips the autograd keys (Python on that build fails the
//   same way outside torch.inference_mode()).
// - LLVM (USE_LLVM): TorchScript's TensorExpr fuser (NNC) then fuses on the CPU by default
//   (pytorch.org's and Debian 12's builds have no LLVM, so no CPU fusion), and in 2.6 its
//   lowering of depthwise convolutions (tensorexpr::conv2d_depthwise) crashes in
//   LoopNest::sliceTail (MobileNetV2) or never finishes compiling (LLVMCodeGen, a 1-channel
//   grouped convolution). The profiling executor builds a graph's plan once, at its second
//   run, and keeps it: fasterai builds the plans of the graphs it runs under NoTensorExprFuser,
//   so they run unfused, as on every build without LLVM.

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/passes/tensorexpr_fuser.h>
#include <torch/torch.h>
#include <torch/version.h>

namespace fasterai::libtorch {

inline constexpr int major = TORCH_VERSION_MAJOR;
inline constexpr int minor = TORCH_VERSION_MINOR;
// True on LibTorch 2.x and later: the branch every helper below takes.
inline constexpr bool v2 = TORCH_VERSION_MAJOR >= 2;
inline constexpr const char* branch = v2 ? "LibTorch 2.x" : "LibTorch 1.x";

// Reduced SVD of a matrix: U[m,k], S[k], Vh[k,n] with k = min(m, n) (full_matrices = false).
inline std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> svd(const torch::Tensor& a) {
  return torch::linalg_svd(a, /*full_matrices=*/false, c10::nullopt);
}

// Singular values of a matrix, in descending order.
inline torch::Tensor svdvals(const torch::Tensor& a) {
  return torch::linalg_svdvals(a, c10::nullopt);
}

// The c10d::ProcessGroup that carries collectives on `device` through `backend` (a
// ProcessGroupGloo or ProcessGroupNCCL made with `store`, `rank` and `size`). `nccl` says which
// of the two it is. On 1.13 the backend is itself the process group.
template <class Group, class BackendImpl, class Store>
c10::intrusive_ptr<Group> process_group(c10::intrusive_ptr<BackendImpl> backend,
                                        const c10::intrusive_ptr<Store>& store, int rank,
                                        int size, c10::DeviceType device, bool nccl) {
  if constexpr (v2) {
    auto group = c10::make_intrusive<Group>(store, rank, size);
    const auto type = nccl ? Group::BackendType::NCCL : Group::BackendType::GLOO;
    group->setDefaultBackend(type);
    group->setBackend(device, type, backend);
    return group;
  } else {
    (void)store, (void)rank, (void)size, (void)device, (void)nccl;
    return backend;
  }
}

// `options` (a c10d::TCPStoreOptions) with the store server every LibTorch build has.
template <class StoreOptions>
StoreOptions tcp_store_options(StoreOptions options) {
  if constexpr (requires { options.useLibUV; }) options.useLibUV = false;
  return options;
}

// A warning handler that keeps the messages LibTorch warns with (TORCH_WARN), for code and tests
// that check what was said; install it for a scope with WarningHandlerGuard.
class WarningCollector : public c10::WarningHandler {
 public:
  std::vector<std::string> messages;
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& message, bool) override {
    messages.push_back(message);
  }
#endif
};
#if TORCH_VERSION_MAJOR >= 2
using WarningHandlerGuard = c10::WarningUtils::WarningHandlerGuard;
#else
using WarningHandlerGuard = c10::Warning::WarningHandlerGuard;
#endif

// TorchScript's TensorExpr fuser (NNC) off for a scope, then as it was (see the banner: on a
// LibTorch built with LLVM it fuses on the CPU, and its depthwise convolutions crash or hang).
// A graph whose plan was built in this scope keeps running unfused after it. The switch is
// process-wide, as LibTorch's own is; the environment's PYTORCH_TENSOREXPR still wins.
class NoTensorExprFuser {
 public:
  NoTensorExprFuser() : was_enabled_(torch::jit::tensorExprFuserEnabled()) {
    torch::jit::setTensorExprFuserEnabled(false);
  }
  ~NoTensorExprFuser() { torch::jit::setTensorExprFuserEnabled(was_enabled_); }
  NoTensorExprFuser(const NoTensorExprFuser&) = delete;
  NoTensorExprFuser& operator=(const NoTensorExprFuser&) = delete;

 private:
  bool was_enabled_;
};

// What a finished inference graph (fasterai::InferenceModel's) runs under: c10::InferenceMode,
// whose dispatch skips the autograd keys (on a build with Vulkan kernels, oneDNN tensors would
// otherwise hit the AutogradOther ambiguity assert, see the banner), and no TensorExpr fuser.
// Tensors made in the scope are inference tensors: no autograd, no in-place change outside
// InferenceMode (clone() one to get an ordinary tensor).
struct InferenceGuard {
  c10::InferenceMode inference_mode;
  NoTensorExprFuser no_fuser;
};

}  // namespace fasterai::libtorch
