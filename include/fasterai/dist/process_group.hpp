#pragma once
// fasterai::dist::ProcessGroup: the processes of one data-parallel job, joined the way the
// PyTorch ecosystem joins them. `torchrun` (and scripts/launch.sh) give every process
// MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK; rank 0 serves a c10d TCPStore on
// MASTER_ADDR:MASTER_PORT, every rank registers there, and LibTorch's own c10d process group
// (Gloo on CPU; NCCL where LibTorch was built with it) carries the collectives.
//
//   auto group = fasterai::dist::ProcessGroup::from_environment(
//       fasterai::dist::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
//   if (group.is_main()) std::cout << "training on " << group.world_size() << " processes\n";
//
// Nothing waits forever. Joining is bounded by the timeout: a rank that never joins makes the
// others throw a dist::error naming the missing ranks and the timeout. So is every collective:
// when one fails (a peer died, or stopped answering for longer than the timeout) the survivors
// check in with each other through the store and throw a dist::error that names the ranks that
// did not, the timeout and the backend's own message.
//
// Backends: Gloo is built into Debian's and PyTorch's LibTorch, but its headers come only with
// Debian's libgloo-dev (PyTorch's pip wheels ship LibTorch without them). NCCL is compiled in
// only where LibTorch's build defines USE_C10D_NCCL (CUDA builds) and nccl.h is on the include
// path. A backend whose headers are missing is left out (FASTERAI_C10D_GLOO / FASTERAI_C10D_NCCL
// say which are in); asking for it is an argument_error.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <torch/torch.h>

// LibTorch's CMake package defines USE_C10D_GLOO for builds with Gloo; a consumer that does not
// use it (plain compiler flags) gets it here when the Gloo headers are present, since the
// ProcessGroupGloo header compiles only with it.
#if !defined(USE_C10D_GLOO) && __has_include(<gloo/context.h>)
#define USE_C10D_GLOO 1
#endif

#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)
#define FASTERAI_C10D_GLOO 1
#endif
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#define FASTERAI_C10D_NCCL 1
#endif

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef FASTERAI_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef FASTERAI_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <fasterai/core/error.hpp>
#include <fasterai/core/libtorch_version.hpp>

namespace fasterai::dist {

// A failure of the job rather than of an argument: a rank missing, dead or too slow.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Backend {
  Gloo,  // CPU tensors; every LibTorch build with distributed support
  NCCL,  // CUDA tensors; only where LibTorch was built with NCCL
};

inline const char* backend_name(Backend b) { return b == Backend::NCCL ? "nccl" : "gloo"; }

// Whether this build of fasterai can create a process group of backend `b`.
inline bool backend_available(Backend b) {
#ifdef FASTERAI_C10D_NCCL
  if (b == Backend::NCCL) return true;
#endif
#ifdef FASTERAI_C10D_GLOO
  if (b == Backend::Gloo) return true;
#endif
  return false;
}

struct ProcessGroupOptions {
  ProcessGroupOptions() = default;
  TORCH_ARG(Backend, backend) = Backend::Gloo;
  // Bound on joining and on every collective (torch.distributed's default is 30 minutes).
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(30);
};

// The variables torchrun sets, read and checked.
struct Environment {
  std::string master_addr;
  int master_port = 0;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;

  // From the process's environment; an argument_error names a missing or bad variable.
  static Environment from_process();
  // True when WORLD_SIZE is set: the program was started by a launcher.
  static bool launched() { return std::getenv("WORLD_SIZE") != nullptr; }
};

class ProcessGroup {
 public:
  // Join the job described by the environment (torchrun's variables).
  static ProcessGroup from_environment(ProcessGroupOptions options = {}) {
    return ProcessGroup(Environment::from_process(), std::move(options));
  }
  ProcessGroup(Environment environment, ProcessGroupOptions options = {});

  int rank() const noexcept { return env_.rank; }
  int world_size() const noexcept { return env_.world_size; }
  int local_rank() const noexcept { return env_.local_rank; }
  bool is_main() const noexcept { return env_.rank == 0; }
  std::chrono::milliseconds timeout() const noexcept { return options_.timeout(); }
  Backend backend() const noexcept { return options_.backend(); }
  const Environment& environment() const noexcept { return env_; }

  // The c10d objects, for anything fasterai does not wrap.
  const c10::intrusive_ptr<c10d::ProcessGroup>& c10d() const noexcept { return group_; }
  c10d::Store& store() const noexcept { return *store_; }

  // Collectives that wait for their result; `what` names the operation in errors.
  // Sum `tensors` over the ranks, in place, each tensor one all-reduce launched together.
  void all_reduce_sum(std::vector<torch::Tensor>& tensors, const char* what) const {
    all_reduce(tensors, c10d::ReduceOp::SUM, what);
  }
  void all_reduce(std::vector<torch::Tensor>& tensors, c10d::ReduceOp op, const char* what) const;
  // Rank `root`'s values into `tensors` on every rank.
  void broadcast(std::vector<torch::Tensor>& tensors, int root, const char* what) const;
  void barrier(const char* what) const;
  // Sum of `values` over the ranks (in double, exact for counts below 2^53).
  std::vector<double> sum(std::vector<double> values, const char* what) const;

 private:
  Environment env_;
  ProcessGroupOptions options_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;

  void wait(const std::vector<c10::intrusive_ptr<c10d::Work>>& works, const char* what) const;
  [[noreturn]] void fail(const char* what, const std::string& cause) const;
  std::string describe(const char* what) const;
};

namespace detail {

inline std::string seconds_text(std::chrono::milliseconds t) {
  std::ostringstream os;
  os << double(t.count()) / 1000.0 << " s";
  return os.str();
}

inline int env_int(const char* name, bool required, int fallback, int minimum) {
  const char* text = std::getenv(name);
  if (!text) {
    if (required)
      fasterai::detail::throw_argument_error("fasterai::dist::Environment", name, "(unset)",
                                             "an integer set by the launcher (torchrun, scripts/launch.sh)");
    return fallback;
  }
  char* end = nullptr;
  const long v = std::strtol(text, &end, 10);
  if (end == text || *end != '\0' || v < minimum || v > 1'000'000'000)
    fasterai::detail::throw_argument_error("fasterai::dist::Environment", name, text,
                                           fasterai::detail::concat("an integer >= ", std::to_string(minimum)));
  return static_cast<int>(v);
}

// Store keys of this library, apart from c10d's own.
inline std::string joined_key(int rank) { return "fasterai/joined/" + std::to_string(rank); }
inline std::string alive_key(int rank) { return "fasterai/alive/" + std::to_string(rank); }

// Wait until `keys` are all in the store or the deadline passes; returns the indices of the
// missing ones. Polls with check(): a c10d wait() that times out says nothing of which key.
inline std::vector<int> wait_for_keys(c10d::Store& store, const std::vector<std::string>& keys,
                                      std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto sleep = std::chrono::milliseconds(1);
  for (;;) {
    std::vector<int> missing;
    for (size_t i = 0; i < keys.size(); ++i)
      if (!store.check({keys[i]})) missing.push_back(static_cast<int>(i));
    if (missing.empty() || std::chrono::steady_clock::now() >= deadline) return missing;
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(100));
  }
}

inline bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

inline std::string rank_list(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

}  // namespace detail

inline Environment Environment::from_process() {
  Environment e;
  const char* addr = std::getenv("MASTER_ADDR");
  e.world_size = detail::env_int("WORLD_SIZE", true, 1, 1);
  e.rank = detail::env_int("RANK", true, 0, 0);
  e.local_rank = detail::env_int("LOCAL_RANK", false, e.rank, 0);
  e.master_port = detail::env_int("MASTER_PORT", e.world_size > 1, 29500, 1);
  if (e.master_port > 65535)
    fasterai::detail::throw_argument_error("fasterai::dist::Environment", "MASTER_PORT",
                                           e.master_port, "a TCP port in [1, 65535]");
  if (e.rank >= e.world_size)
    fasterai::detail::throw_argument_error("fasterai::dist::Environment", "RANK", e.rank,
                                           fasterai::detail::concat("a rank below WORLD_SIZE = ",
                                                                    std::to_string(e.world_size)));
  if (!addr && e.world_size > 1)
    fasterai::detail::throw_argument_error("fasterai::dist::Environment", "MASTER_ADDR", "(unset)",
                                           "the address of rank 0's machine");
  e.master_addr = addr ? addr : "127.0.0.1";
  return e;
}

inline ProcessGroup::ProcessGroup(Environment environment, ProcessGroupOptions options)
    : env_(std::move(environment)), options_(std::move(options)) {
  constexpr auto where = "fasterai::dist::ProcessGroup";
  using fasterai::detail::check_argument;
  check_argument(env_.world_size >= 1, where, "world_size", env_.world_size, "a count >= 1");
  check_argument(env_.rank >= 0 && env_.rank < env_.world_size, where, "rank", env_.rank,
                 "a rank in [0, world_size)");
  check_argument(options_.timeout().count() > 0, where, "timeout",
                 detail::seconds_text(options_.timeout()), "a positive duration");
  check_argument(backend_available(options_.backend()), where, "backend",
                 backend_name(options_.backend()),
                 "a backend this LibTorch was built with and whose headers are installed (NCCL "
                 "needs a CUDA build with USE_C10D_NCCL and nccl.h; Gloo needs the Gloo headers, "
                 "Debian's libgloo-dev)");

  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(env_.master_port);
  store_options.isServer = env_.rank == 0;
  store_options.numWorkers = static_cast<std::size_t>(env_.world_size);
  store_options.waitWorkers = false;  // joining is checked below, with names
  store_options.timeout = options_.timeout();
  try {
    store_ = c10::make_intrusive<c10d::TCPStore>(env_.master_addr,
                                                 libtorch::tcp_store_options(store_options));
  } catch (const std::exception& e) {
    std::ostringstream os;
    os << where << ": rank " << env_.rank << " of " << env_.world_size
       << (env_.rank == 0 ? " could not serve the store at " : " could not reach rank 0's store at ")
       << env_.master_addr << ':' << env_.master_port << " within the timeout of "
       << detail::seconds_text(options_.timeout()) << ": " << e.what();
    throw error(os.str());
  }

  // Every rank registers, then waits for all: a rank that never comes is named.
  store_->set(detail::joined_key(env_.rank), std::vector<std::uint8_t>{1});
  std::vector<std::string> keys;
  for (int r = 0; r < env_.world_size; ++r) keys.push_back(detail::joined_key(r));
  const auto missing = detail::wait_for_keys(*store_, keys, options_.timeout());
  if (!missing.empty()) {
    std::ostringstream os;
    os << where << ": " << detail::rank_list(missing) << " of " << env_.world_size
       << " did not join within the timeout of " << detail::seconds_text(options_.timeout())
       << " (rank " << env_.rank << " waited at " << env_.master_addr << ':' << env_.master_port
       << ")";
    throw error(os.str());
  }

  try {
    if (options_.backend() == Backend::NCCL) {
#ifdef FASTERAI_C10D_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = options_.timeout();
      group_ = libtorch::process_group<c10d::ProcessGroup>(
          c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, env_.rank, env_.world_size, o),
          store_, env_.rank, env_.world_size, c10::DeviceType::CUDA, /*nccl=*/true);
#endif
    } else {
#ifdef FASTERAI_C10D_GLOO
      auto o = c10d::ProcessGroupGloo::Options::create(options_.timeout());
      // As torch.distributed: GLOO_SOCKET_IFNAME names the interface; otherwise a job on
      // loopback stays on loopback, and others use the address this host's name resolves to.
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"))
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (detail::is_loopback(env_.master_addr))
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(env_.master_addr));
      else
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      group_ = libtorch::process_group<c10d::ProcessGroup>(
          c10::make_intrusive<c10d::ProcessGroupGloo>(store_, env_.rank, env_.world_size, o),
          store_, env_.rank, env_.world_size, c10::DeviceType::CPU, /*nccl=*/false);
#endif
    }
  } catch (const std::exception& e) {
    fail("creating the process group", e.what());
  }
}

inline std::string ProcessGroup::describe(const char* what) const {
  std::ostringstream os;
  os << "fasterai::dist: " << what << " failed on rank " << env_.rank << " of "
     << env_.world_size << " (" << backend_name(options_.backend()) << ", timeout "
     << detail::seconds_text(options_.timeout()) << ")";
  return os.str();
}

inline void ProcessGroup::fail(const char* what, const std::string& cause) const {
  // Find out who is gone: the survivors check in through the store and wait a while for the
  // others. Every survivor of a broken collective comes here too, within moments of each
  // other; a rank that does not is dead or stuck. Rank 0 serves the store: when it is gone,
  // so is the store.
  std::string who;
  try {
    store_->set(detail::alive_key(env_.rank), std::vector<std::uint8_t>{1});
    std::vector<std::string> keys;
    for (int r = 0; r < env_.world_size; ++r) keys.push_back(detail::alive_key(r));
    const auto window = std::min(options_.timeout(), std::chrono::milliseconds(10'000));
    const auto missing = detail::wait_for_keys(*store_, keys, window);
    if (!missing.empty())
      who = detail::rank_list(missing) + " stopped responding (no sign of it within " +
            detail::seconds_text(window) + " of the failure)";
  } catch (const std::exception&) {
    who = "rank 0, which serves the store, is unreachable";
  }
  std::string message = describe(what);
  if (!who.empty()) message += ": " + who;
  message += "; backend: " + cause;
  throw error(message);
}

inline void ProcessGroup::wait(const std::vector<c10::intrusive_ptr<c10d::Work>>& works,
                               const char* what) const {
  try {
    for (const auto& w : works) w->wait(options_.timeout());
  } catch (const std::exception& e) {
    fail(what, e.what());
  }
}

inline void ProcessGroup::all_reduce(std::vector<torch::Tensor>& tensors, c10d::ReduceOp op,
                                     const char* what) const {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  try {
    c10d::AllreduceOptions o;
    o.reduceOp = op;
    for (auto& t : tensors) {
      std::vector<torch::Tensor> one{t};
      works.push_back(group_->allreduce(one, o));
    }
  } catch (const std::exception& e) {
    fail(what, e.what());
  }
  wait(works, what);
}

inline void ProcessGroup::broadcast(std::vector<torch::Tensor>& tensors, int root,
                                    const char* what) const {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  try {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (auto& t : tensors) {
      std::vector<torch::Tensor> one{t};
      works.push_back(group_->broadcast(one, o));
    }
  } catch (const std::exception& e) {
    fail(what, e.what());
  }
  wait(works, what);
}

inline void ProcessGroup::barrier(const char* what) const {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  try {
    works.push_back(group_->barrier());
  } catch (const std::exception& e) {
    fail(what, e.what());
  }
  wait(works, what);
}

inline std::vector<double> ProcessGroup::sum(std::vector<double> values, const char* what) const {
  if (values.empty()) return values;
  std::vector<torch::Tensor> t{torch::tensor(values, torch::kDouble)};
  all_reduce_sum(t, what);
  const auto* p = t[0].data_ptr<double>();
  return std::vector<double>(p, p + values.size());
}

}  // namespace fasterai::dist
