// Data-parallel training on c10d/Gloo: time per epoch of the compact VGG on 2,048
// Fashion-MNIST images (global batch 128, SGD), in one process and in two processes of this
// machine joined over 127.0.0.1, and the share of a step spent averaging gradients
// (DataParallel's bucketed all-reduce: copies into buckets, the all-reduce, copies back).
//
//   DataParallelEpoch/processes:1/threads:T    one process, T intra-op threads, no group
//   DataParallelEpoch/processes:2/threads:1    two processes, one thread each (torchrun's
//                                              default), batch 64 per process
//
// For two processes this benchmark is rank 0 and starts rank 1 as a child: the same
// executable, running only the hidden DataParallelPeer benchmark, which trains an epoch each
// time rank 0 broadcasts "go" and stops at "stop". Counters: allreduce_share = time in
// gradient averaging / epoch time; allreduce_bytes = gradient bytes all-reduced per step.
#include <benchmark/benchmark.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/dist/data_parallel.hpp>
#include <fasterai/dist/shard.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/train/learner.hpp>

extern char** environ;

namespace {

using namespace fasterai;

constexpr std::int64_t kExamples = 2048, kGlobalBatch = 128;
constexpr double kLr = 0.01;

int free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(s);
  return ntohs(addr.sin_port);
}

struct Replica {
  std::shared_ptr<dist::ProcessGroup> group;
  std::shared_ptr<dist::DataParallel> parallel;
  torch::nn::Sequential model = nullptr;
  std::unique_ptr<Learner> learn;

  Replica(std::shared_ptr<dist::ProcessGroup> g) : group(std::move(g)) {
    const int rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
    torch::manual_seed(0);
    model = models::compact_vgg();
    auto train = dist::shard(
        data::FashionMNIST(data::Split::Train, data::FashionMNISTOptions().subset(kExamples).subset_seed(0)),
        data::LoaderOptions(static_cast<std::size_t>(kGlobalBatch / world)), rank, world,
        dist::ShardOptions().seed(0));
    if (group) parallel = std::make_shared<dist::DataParallel>(group);
    learn = std::make_unique<Learner>(model, train, data::Batches{},
                                      LearnerOptions().device(torch::kCPU).out(nullptr)
                                          .progress(Progress::None).optimizer(OptimizerKind::SGD)
                                          .parallel(parallel));
  }

  // Rank 0 tells the others whether another epoch follows.
  bool agree(bool go) {
    std::vector<torch::Tensor> flag{torch::tensor({go ? 1 : 0}, torch::kInt)};
    group->broadcast(flag, 0, "benchmark control");
    return flag[0].item<int>() == 1;
  }
};

pid_t start_peer(int port, int threads) {
  const auto exe = std::filesystem::read_symlink("/proc/self/exe").string();
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  for (std::string v : {"MASTER_ADDR=127.0.0.1", "WORLD_SIZE=2", "RANK=1", "LOCAL_RANK=1",
                        "FASTERAI_DIST_BENCH_PEER=1"})
    env_strings.push_back(v);
  env_strings.push_back("MASTER_PORT=" + std::to_string(port));
  env_strings.push_back("OMP_NUM_THREADS=" + std::to_string(threads));
  std::vector<char*> envp;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::string filter = "--benchmark_filter=^DataParallelPeer";  // its name ends in /iterations:1
  std::string out = "--benchmark_out=/dev/null";
  std::vector<char*> argv{const_cast<char*>(exe.c_str()), filter.data(), out.data(), nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  if (posix_spawn(&pid, exe.c_str(), &actions, nullptr, argv.data(), envp.data()) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

void DataParallelEpoch(benchmark::State& state) {
  const int processes = static_cast<int>(state.range(0)), threads = static_cast<int>(state.range(1));
  const int saved_threads = torch::get_num_threads();
  torch::set_num_threads(threads);
  std::shared_ptr<dist::ProcessGroup> group;
  pid_t peer = -1;
  if (processes == 2) {
    const int port = free_port();
    peer = start_peer(port, threads);
    if (peer < 0) {
      state.SkipWithError("could not start the peer process");
      return;
    }
    dist::Environment e;
    e.master_addr = "127.0.0.1";
    e.master_port = port;
    e.world_size = 2;
    group = std::make_shared<dist::ProcessGroup>(
        e, dist::ProcessGroupOptions().timeout(std::chrono::seconds(120)));
  }
  Replica replica(group);
  double reduce_seconds = 0, epoch_seconds = 0;
  std::int64_t bytes = 0, steps = 0;
  for (auto _ : state) {
    if (group) replica.agree(true);
    if (replica.parallel) replica.parallel->reset_stats();
    const auto start = std::chrono::steady_clock::now();
    replica.learn->fit(1, kLr);
    epoch_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (replica.parallel) {
      reduce_seconds += replica.parallel->stats().seconds;
      bytes += replica.parallel->stats().bytes;
      steps += replica.parallel->stats().steps;
    }
  }
  if (group) replica.agree(false);
  if (peer > 0) ::waitpid(peer, nullptr, 0);
  torch::set_num_threads(saved_threads);
  state.counters["allreduce_share"] = epoch_seconds > 0 ? reduce_seconds / epoch_seconds : 0.0;
  state.counters["allreduce_bytes"] = steps > 0 ? double(bytes) / double(steps) : 0.0;
  state.SetItemsProcessed(state.iterations() * kExamples);
}

// Rank 1 of DataParallelEpoch/processes:2 (registered only in the peer process).
void DataParallelPeer(benchmark::State& state) {
  torch::set_num_threads(std::atoi(std::getenv("OMP_NUM_THREADS")));
  auto group = std::make_shared<dist::ProcessGroup>(dist::ProcessGroup::from_environment(
      dist::ProcessGroupOptions().timeout(std::chrono::seconds(120))));
  Replica replica(group);
  for (auto _ : state)
    while (replica.agree(false)) replica.learn->fit(1, kLr);
}

[[maybe_unused]] const bool registered = [] {
  if (std::getenv("FASTERAI_DIST_BENCH_PEER")) {
    benchmark::RegisterBenchmark("DataParallelPeer", DataParallelPeer)->Iterations(1);
  } else {
    benchmark::RegisterBenchmark("DataParallelEpoch", DataParallelEpoch)
        ->ArgNames({"processes", "threads"})
        ->Args({1, 1})
        ->Args({1, 2})
        ->Args({2, 1})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(3)
        ->Repetitions(3)
        ->ReportAggregatesOnly(true);
  }
  return true;
}();

}  // namespace
