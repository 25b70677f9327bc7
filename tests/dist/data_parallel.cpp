// Data-parallel training on LibTorch's c10d (Gloo), on 127.0.0.1 only.
//
// The multi-process cases start this same executable twice through scripts/launch.sh, running
// a hidden worker test case ("[.worker]") in each process with torchrun's variables; the
// workers write what they end with (weights, masks, validation numbers, checks) to files that
// the parent compares with each other and with a single-process run it does itself.

#include "catch.hpp"

#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/dist/checkpoint.hpp>
#include <fasterai/dist/consistency.hpp>
#include <fasterai/dist/data_parallel.hpp>
#include <fasterai/dist/launched_job.hpp>
#include <fasterai/dist/process_group.hpp>
#include <fasterai/dist/shard.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/sparse/sparsifier.hpp>
#include <fasterai/train/knowledge_distillation.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/sparsify_callback.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

using namespace fasterai;
using Catch::Contains;
namespace fs = std::filesystem;

namespace {

// The test's training run, the same in the workers and in the single-process reference.
constexpr std::int64_t kTrainExamples = 512, kValidExamples = 200, kGlobalBatch = 64;
constexpr int kEpochs = 2;
using TestSparsifier = Sparsifier<granularity::Weight, method::Global, criteria::L1, schedule::Gradual>;

torch::nn::Sequential small_cnn() {
  // No BatchNorm and no dropout: with them a replica's batch statistics and random draws are
  // those of its shard, and no single process with the global batch computes the same.
  return models::compact_vgg(
      models::CompactVGGOptions().widths({4, 8, 8}).hidden(32).batch_norm(false).dropout(0.0));
}

data::FashionMNIST train_set() {
  return data::FashionMNIST(data::Split::Train,
                            data::FashionMNISTOptions().subset(kTrainExamples).subset_seed(3));
}
data::FashionMNIST valid_set() {
  return data::FashionMNIST(data::Split::Test,
                            data::FashionMNISTOptions().subset(kValidExamples).subset_seed(3));
}

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v ? v : fallback;
}

// After every step: do all ranks hold bitwise the same masks and weights? (hash all-reduce)
struct ReplicaCheck : Callback {
  const dist::ProcessGroup* group;
  const TestSparsifier* sparsifier;
  int checks = 0, mismatches = 0;
  ReplicaCheck(const dist::ProcessGroup* g, const TestSparsifier* s) : group(g), sparsifier(s) {}
  std::string name() const override { return "ReplicaCheck"; }
  void after_step(TrainingState& s) override {
    auto tensors = dist::masks_of(*sparsifier);
    for (const auto& p : s.model->parameters()) tensors.push_back(p);
    ++checks;
    if (!dist::same_on_all_ranks(*group, tensors)) ++mismatches;
  }
};

// Rank `rank` kills itself (SIGKILL: no handler, no goodbye) after epoch `epoch`.
struct Killer : Callback {
  int rank, my_rank, epoch;
  Killer(int r, int me, int e) : rank(r), my_rank(me), epoch(e) {}
  std::string name() const override { return "Killer"; }
  void after_epoch(TrainingState& s) override {
    if (s.epoch == epoch && my_rank == rank) ::raise(SIGKILL);
  }
};

struct RunResult {
  std::vector<torch::Tensor> weights, masks;
  ValidationResult valid;
  double sparsity = 0;
  int checks = 0, mismatches = 0;
};

// One fit of kEpochs with distillation from a fixed teacher (run by each rank on its shard)
// and gradual sparsification, data-parallel when `group` is given.
RunResult run(const std::shared_ptr<dist::ProcessGroup>& group, const std::string& checkpoint,
              int kill_rank, std::shared_ptr<dist::DataParallel>* parallel_out = nullptr) {
  const int rank = group ? group->rank() : 0, world = group ? group->world_size() : 1;
  const auto resume_epoch = checkpoint.empty() ? 0 : dist::checkpoint_epoch(checkpoint);
  torch::manual_seed(11 + rank);  // different on each rank: the broadcast must fix it
  auto model = small_cnn();
  const auto local_batch = static_cast<std::size_t>(kGlobalBatch / world);
  auto train = dist::shard(train_set(), data::LoaderOptions(local_batch), rank, world,
                           dist::ShardOptions().seed(5).first_epoch(resume_epoch));
  auto valid = dist::shard(valid_set(), data::LoaderOptions(64), rank, world,
                           dist::ShardOptions().shuffle(false).pad(false));
  std::shared_ptr<dist::DataParallel> parallel;
  if (group) parallel = std::make_shared<dist::DataParallel>(group);
  if (parallel_out) *parallel_out = parallel;
  std::ostringstream quiet;
  Learner learn(model, train, valid,
                LearnerOptions().device(torch::kCPU).optimizer(OptimizerKind::SGD).momentum(0.9)
                    .progress(Progress::None).out(&quiet).parallel(parallel));
  // The sparsifier is made after the Learner broadcast rank 0's weights.
  TestSparsifier sparsifier(model, SparsifierOptions(60).include_linear(true));
  SparsifyCallback sparsify(sparsifier);
  torch::manual_seed(99);  // the same teacher on every rank
  KnowledgeDistillation kd(small_cnn(), /*temperature=*/3.0, /*alpha=*/0.5);
  std::vector<CallbackRef> callbacks{kd, sparsify};
  std::shared_ptr<dist::Checkpoint> saver;
  if (!checkpoint.empty()) {
    saver = std::make_shared<dist::Checkpoint>(checkpoint, rank == 0);
    saver->track(sparsifier);
    callbacks.push_back(saver);
    if (resume_epoch > 0) dist::resume(learn, checkpoint, sparsify, sparsifier);
  }
  auto check = std::make_shared<ReplicaCheck>(group.get(), &sparsifier);
  if (group) callbacks.push_back(check);
  if (kill_rank >= 0) callbacks.push_back(std::make_shared<Killer>(kill_rank, rank, 0));
  learn.fit(kEpochs, 0.05, callbacks);

  RunResult r;
  for (const auto& p : model->parameters()) r.weights.push_back(p.detach().clone());
  r.masks = dist::masks_of(sparsifier);
  r.valid = learn.validate();
  r.sparsity = sparsifier.sparsity();
  r.checks = check->checks;
  r.mismatches = check->mismatches;
  return r;
}

void save_result(const RunResult& r, const fs::path& prefix) {
  torch::save(r.weights, prefix.string() + "_weights.pt");
  torch::save(r.masks, prefix.string() + "_masks.pt");
  std::ofstream out(prefix.string() + "_numbers.txt");
  out.precision(17);
  out << r.valid.loss << ' ' << r.valid.metric("accuracy") << ' ' << r.valid.examples << ' '
      << r.sparsity << ' ' << r.checks << ' ' << r.mismatches << '\n';
}

struct Numbers {
  double loss = 0, accuracy = 0, examples = 0, sparsity = 0, checks = 0, mismatches = 0;
};
Numbers read_numbers(const fs::path& prefix) {
  Numbers n;
  std::ifstream in(prefix.string() + "_numbers.txt");
  REQUIRE(in);
  in >> n.loss >> n.accuracy >> n.examples >> n.sparsity >> n.checks >> n.mismatches;
  return n;
}
std::vector<torch::Tensor> load_tensors(const std::string& path) {
  std::vector<torch::Tensor> t;
  torch::load(t, path);
  return t;
}

int free_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(s >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  REQUIRE(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  socklen_t len = sizeof addr;
  REQUIRE(::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
  ::close(s);
  return ntohs(addr.sin_port);
}

fs::path repository_root() { return fs::path(__FILE__).parent_path().parent_path().parent_path(); }

struct Launch {
  int status = 0;
  double seconds = 0;
  std::string log;
};

// scripts/launch.sh --nproc 2 -- <this test executable> "<worker>", bounded by `timeout`.
Launch launch_workers(const std::string& worker, const std::string& env, const fs::path& dir) {
  const auto exe = fs::read_symlink("/proc/self/exe");
  const auto log = dir / (worker.substr(worker.find(':') + 2) + ".log");
  std::ostringstream cmd;
  cmd << "cd " << dir << " && OMP_NUM_THREADS=1 " << env << " timeout 300 "
      << (repository_root() / "scripts" / "launch.sh") << " --nproc 2 --grace 2 --master-port "
      << free_port() << " -- " << exe << " '" << worker << "' > " << log << " 2>&1";
  const auto start = std::chrono::steady_clock::now();
  const int raw = std::system(cmd.str().c_str());
  Launch l;
  l.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  l.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(log);
  l.log.assign(std::istreambuf_iterator<char>(in), {});
  return l;
}

// Both ranks started by hand with torchrun's variables; the status is rank 0's, the log too.
Launch start_workers_directly(const std::string& worker, const std::string& env, const fs::path& dir) {
  const auto exe = fs::read_symlink("/proc/self/exe");
  std::ostringstream cmd;
  const std::string common = "OMP_NUM_THREADS=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
                             std::to_string(free_port()) + " WORLD_SIZE=2 " + env;
  cmd << "cd " << dir << " && { " << common << " RANK=1 LOCAL_RANK=1 timeout 300 " << exe << " '"
      << worker << "' > rank1.log 2>&1 & " << common << " RANK=0 LOCAL_RANK=0 timeout 300 " << exe
      << " '" << worker << "' > rank0.log 2>&1; status=$?; wait; exit $status; }";
  const auto start = std::chrono::steady_clock::now();
  const int raw = std::system(cmd.str().c_str());
  Launch l;
  l.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  l.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(dir / "rank0.log");
  l.log.assign(std::istreambuf_iterator<char>(in), {});
  return l;
}

fs::path scratch(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("fasterai_dist_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::shared_ptr<dist::ProcessGroup> group_from_env() {
  const auto ms = std::stoi(env_or("FASTERAI_DIST_TIMEOUT_MS", "60000"));
  return std::make_shared<dist::ProcessGroup>(dist::ProcessGroup::from_environment(
      dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(ms))));
}

}  // namespace

// ---- workers (hidden; started by the tests below) ----

// Every group these tests make runs on Gloo. A LibTorch without Gloo's headers (PyTorch's pip
// wheels) has no backend to test on this machine: those tests report SKIPPED.
#define FASTERAI_REQUIRE_GLOO()                                                                  \
  if (!dist::backend_available(dist::Backend::Gloo))                                             \
  FASTERAI_SKIP("this LibTorch build has no Gloo backend (its headers are not installed)")

TEST_CASE("dist worker: train", "[.worker]") {
  const fs::path out = env_or("FASTERAI_DIST_OUT", ".");
  const auto prefix = out / ("rank" + env_or("RANK", "0"));
  try {
    auto group = group_from_env();
    const auto kill_rank = std::stoi(env_or("FASTERAI_DIST_KILL", "-1"));
    const auto result = run(group, env_or("FASTERAI_DIST_CHECKPOINT", ""), kill_rank);
    save_result(result, prefix);
  } catch (const std::exception& e) {
    std::ofstream(prefix.string() + "_error.txt") << e.what();  // unwrapped, for the parent
    throw;
  }
}

// A program written for one process (the same unsharded, unshuffled batches everywhere),
// made data-parallel by join_launched_job alone.
TEST_CASE("dist worker: launched job", "[.worker]") {
  const fs::path out = env_or("FASTERAI_DIST_OUT", ".");
  const auto job = dist::join_launched_job(dist::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
  REQUIRE(job.active());
  std::cout << "printed by rank " << job.rank() << std::endl;
  torch::manual_seed(21);
  auto model = small_cnn();
  Learner learn(model, data::make_batches(train_set(), 32), data::make_batches(valid_set(), 50),
                LearnerOptions().device(torch::kCPU).optimizer(OptimizerKind::SGD).progress(Progress::None));
  learn.fit(1, 0.05);
  RunResult r;
  for (const auto& p : model->parameters()) r.weights.push_back(p.detach().clone());
  r.valid = learn.validate();
  save_result(r, out / ("rank" + std::to_string(job.rank())));
}

// ---- single process ----

TEST_CASE("ShardSampler deals one permutation round-robin", "[dist][shard]") {
  const std::size_t n = 103;
  for (int world : {1, 2, 3}) {
    std::vector<std::vector<std::size_t>> shards;
    for (int r = 0; r < world; ++r)
      shards.push_back(dist::ShardSampler(n, r, world, dist::ShardOptions().seed(9)).indices(4));
    const auto whole = dist::ShardSampler(n, 0, 1, dist::ShardOptions().seed(9)).indices(4);
    REQUIRE(whole.size() == n);
    CHECK(std::set<std::size_t>(whole.begin(), whole.end()).size() == n);
    for (int r = 0; r < world; ++r) {
      CHECK(shards[r].size() == (n + world - 1) / world);  // padded: the same on every rank
      for (std::size_t i = 0; i < shards[r].size(); ++i)
        CHECK(shards[r][i] == whole[(i * world + r) % n]);
    }
  }
  // Local batches of b on W ranks at step k = the single process's batch b·W at step k.
  const std::size_t b = 8;
  auto r0 = dist::ShardSampler(96, 0, 2, dist::ShardOptions().seed(1));
  auto r1 = dist::ShardSampler(96, 1, 2, dist::ShardOptions().seed(1));
  auto one = dist::ShardSampler(96, 0, 1, dist::ShardOptions().seed(1));
  r0.reset(), r1.reset(), one.reset();
  for (int step = 0; step < 6; ++step) {
    auto a = *r0.next(b), c = *r1.next(b), g = *one.next(2 * b);
    a.insert(a.end(), c.begin(), c.end());
    CHECK(std::multiset<std::size_t>(a.begin(), a.end()) == std::multiset<std::size_t>(g.begin(), g.end()));
  }
  CHECK_FALSE(r0.next(b).has_value());

  // A new order each epoch, the same for the same (seed, epoch); first_epoch resumes it.
  auto s = dist::ShardSampler(50, 0, 1, dist::ShardOptions().seed(2));
  CHECK(s.indices(0) != s.indices(1));
  s.reset();
  CHECK(s.epoch() == 0);
  s.reset();
  CHECK(s.epoch() == 1);
  auto resumed = dist::ShardSampler(50, 0, 1, dist::ShardOptions().seed(2).first_epoch(1));
  resumed.reset();
  CHECK(resumed.epoch() == 1);
  CHECK(*resumed.next(50) == s.indices(1));

  // Without padding the shards split the set exactly (validation).
  std::size_t total = 0;
  for (int r = 0; r < 3; ++r)
    total += dist::ShardSampler(10, r, 3, dist::ShardOptions().shuffle(false).pad(false)).indices(0).size();
  CHECK(total == 10);

  CHECK_THROWS_AS(dist::ShardSampler(10, 2, 2), argument_error);
  CHECK_THROWS_WITH(dist::ShardSampler(10, 0, 0), Contains("world_size") && Contains("0"));
  CHECK_THROWS_WITH(dist::ShardSampler(10, 0, 1, dist::ShardOptions().first_epoch(-1)),
                    Contains("first_epoch"));
}

TEST_CASE("Gradients are bucketed by size, dtype and device", "[dist]") {
  std::vector<torch::Tensor> t{torch::zeros({10}), torch::zeros({10}), torch::zeros({30}),
                               torch::zeros({5}, torch::kDouble), torch::zeros({2})};
  const auto buckets = dist::bucket_by_size(t, 100);  // bytes: 40, 40, 120, 40, 8
  REQUIRE(buckets.size() == 4);
  CHECK(buckets[0] == std::vector<std::size_t>{0, 1});
  CHECK(buckets[1] == std::vector<std::size_t>{2});     // larger than a bucket: alone
  CHECK(buckets[2] == std::vector<std::size_t>{3});     // another dtype
  CHECK(buckets[3] == std::vector<std::size_t>{4});
}

TEST_CASE("The environment of torchrun is read and checked", "[dist]") {
  struct Restore {
    std::vector<std::pair<std::string, std::optional<std::string>>> saved;
    void set(const char* name, const char* value) {
      const char* old = std::getenv(name);
      saved.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      if (value) ::setenv(name, value, 1);
      else ::unsetenv(name);
    }
    ~Restore() {
      for (auto it = saved.rbegin(); it != saved.rend(); ++it)
        if (it->second) ::setenv(it->first.c_str(), it->second->c_str(), 1);
        else ::unsetenv(it->first.c_str());
    }
  } env;
  env.set("MASTER_ADDR", "10.1.2.3");
  env.set("MASTER_PORT", "29511");
  env.set("WORLD_SIZE", "4");
  env.set("RANK", "3");
  env.set("LOCAL_RANK", "1");
  const auto e = dist::Environment::from_process();
  CHECK(e.master_addr == "10.1.2.3");
  CHECK(e.master_port == 29511);
  CHECK(e.world_size == 4);
  CHECK(e.rank == 3);
  CHECK(e.local_rank == 1);
  CHECK(dist::Environment::launched());

  env.set("RANK", "4");
  CHECK_THROWS_WITH(dist::Environment::from_process(), Contains("RANK") && Contains("4"));
  env.set("RANK", "x1");
  CHECK_THROWS_AS(dist::Environment::from_process(), argument_error);
  env.set("RANK", "0");
  env.set("MASTER_PORT", "70000");
  CHECK_THROWS_WITH(dist::Environment::from_process(), Contains("MASTER_PORT") && Contains("70000"));
  env.set("MASTER_PORT", "29511");
  env.set("MASTER_ADDR", nullptr);
  CHECK_THROWS_WITH(dist::Environment::from_process(), Contains("MASTER_ADDR"));
  env.set("WORLD_SIZE", nullptr);
  CHECK_THROWS_WITH(dist::Environment::from_process(), Contains("WORLD_SIZE"));
  CHECK_FALSE(dist::Environment::launched());
}

TEST_CASE("A rank that never joins is named, within the timeout", "[dist][faults]") {
  FASTERAI_REQUIRE_GLOO();
  dist::Environment e;
  e.master_addr = "127.0.0.1";
  e.master_port = free_port();
  e.world_size = 3;
  const auto timeout = std::chrono::milliseconds(1500);
  const auto start = std::chrono::steady_clock::now();
  try {
    dist::ProcessGroup group(e, dist::ProcessGroupOptions().timeout(timeout));
    FAIL("joined a group whose other ranks never came");
  } catch (const dist::error& err) {
    CHECK_THAT(err.what(), Contains("ranks 1, 2 of 3 did not join") && Contains("1.5 s"));
  }
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(30));

  // A rank other than 0 whose store (rank 0) never comes up.
  e.rank = 1;
  e.master_port = free_port();
  try {
    dist::ProcessGroup group(e, dist::ProcessGroupOptions().timeout(timeout));
    FAIL("joined a group without rank 0");
  } catch (const dist::error& err) {
    CHECK_THAT(err.what(), Contains("rank 1 of 3 could not reach rank 0's store") &&
                               Contains("1.5 s"));
  }
  if (!dist::backend_available(dist::Backend::NCCL))  // CPU builds; CUDA builds without nccl.h
    CHECK_THROWS_WITH(dist::ProcessGroup(e, dist::ProcessGroupOptions().backend(dist::Backend::NCCL)),
                      Contains("backend") && Contains("nccl"));
  CHECK_THROWS_WITH(dist::ProcessGroup(e, dist::ProcessGroupOptions().timeout(std::chrono::milliseconds(0))),
                    Contains("timeout"));
}

TEST_CASE("A group of one process: sums, fingerprints, gradients unchanged", "[dist]") {
  FASTERAI_REQUIRE_GLOO();
  dist::Environment e;
  e.master_addr = "127.0.0.1";
  e.master_port = free_port();
  auto group = std::make_shared<dist::ProcessGroup>(e, dist::ProcessGroupOptions().timeout(std::chrono::seconds(20)));
  CHECK(group->is_main());
  CHECK(group->sum({1.5, 2.0}, "test") == std::vector<double>{1.5, 2.0});
  const auto a = torch::arange(6).reshape({2, 3});
  CHECK(dist::same_on_all_ranks(*group, {a}));
  CHECK(dist::fingerprint({a}) == dist::fingerprint({a.clone()}));
  CHECK(dist::fingerprint({a}) != dist::fingerprint({a.reshape({3, 2})}));
  CHECK(dist::fingerprint({a}) != dist::fingerprint({a.to(torch::kInt)}));
  auto b = a.clone();
  b[1][2] = 7;
  CHECK(dist::fingerprint({a}) != dist::fingerprint({b}));

  dist::DataParallel dp(group);
  auto w = torch::ones({3}, torch::requires_grad());
  w.mutable_grad() = torch::full({3}, 2.0);
  dp.average_gradients({w});
  CHECK(torch::equal(w.grad(), torch::full({3}, 2.0)));
  CHECK(dp.stats().steps == 1);
}

TEST_CASE("Checkpoint files are checked before anything changes", "[dist][checkpoint]") {
  if (const auto root = data::FashionMNISTOptions().root();
      !fs::exists(root / "train-images-idx3-ubyte.gz") && !fs::exists(root / "train-images-idx3-ubyte"))
    FASTERAI_SKIP("Fashion-MNIST is not installed at " << root.string());
  const auto dir = scratch("bad_checkpoint");
  torch::manual_seed(0);
  auto model = small_cnn();
  std::ostringstream quiet;
  Learner learn(model, dist::shard(train_set(), 64, 0, 1), {},
                LearnerOptions().device(torch::kCPU).out(&quiet).progress(Progress::None));
  std::vector<torch::Tensor> before;
  for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
  CHECK_THROWS_WITH(dist::resume(learn, dir / "missing.pt"), Contains("path") && Contains("missing.pt"));
  std::ofstream(dir / "garbage.pt") << "not a checkpoint";
  CHECK_THROWS_AS(dist::resume(learn, dir / "garbage.pt"), argument_error);
  CHECK(dist::checkpoint_epoch(dir / "none.pt") == 0);

  // A checkpoint of another architecture: refused, weights unchanged.
  auto other = models::compact_vgg(models::CompactVGGOptions().widths({2, 4, 4}).hidden(8));
  Learner other_learn(other, dist::shard(train_set(), 64, 0, 1), {},
                      LearnerOptions().device(torch::kCPU).out(&quiet).progress(Progress::None));
  dist::Checkpoint saver(dir / "other.pt", true);
  other_learn.fit(1, 1e-3, {saver});
  CHECK(dist::checkpoint_epoch(dir / "other.pt") == 1);
  CHECK_THROWS(dist::resume(learn, dir / "other.pt"));
  for (size_t i = 0; i < before.size(); ++i) CHECK(torch::equal(model->parameters()[i], before[i]));
  fs::remove_all(dir);
}

// ---- two processes ----

TEST_CASE("Two processes train as one process with the global batch", "[dist][multiprocess]") {
  FASTERAI_REQUIRE_GLOO();
  const auto dir = scratch("equivalence");
  const auto l = launch_workers("dist worker: train", "FASTERAI_DIST_OUT=" + dir.string(), dir);
  INFO(l.log);
  REQUIRE(l.status == 0);

  const auto single = run(nullptr, "", -1);
  const auto w0 = load_tensors((dir / "rank0_weights.pt").string());
  const auto w1 = load_tensors((dir / "rank1_weights.pt").string());
  const auto m0 = load_tensors((dir / "rank0_masks.pt").string());
  const auto m1 = load_tensors((dir / "rank1_masks.pt").string());
  const auto n0 = read_numbers(dir / "rank0"), n1 = read_numbers(dir / "rank1");

  // Replicas: bitwise the same weights and masks, checked after every step by a hash
  // all-reduce (16 steps), and at the end.
  CHECK(n0.checks == kEpochs * (kTrainExamples / kGlobalBatch));
  CHECK(n0.mismatches == 0);
  CHECK(n1.mismatches == 0);
  REQUIRE(w0.size() == w1.size());
  for (size_t i = 0; i < w0.size(); ++i) CHECK(torch::equal(w0[i], w1[i]));
  REQUIRE(m0.size() == m1.size());
  REQUIRE_FALSE(m0.empty());
  for (size_t i = 0; i < m0.size(); ++i) CHECK(torch::equal(m0[i], m1[i]));
  // Validation: identical on both ranks, over the whole validation set.
  CHECK(n0.loss == n1.loss);
  CHECK(n0.accuracy == n1.accuracy);
  CHECK(n0.examples == kValidExamples);
  CHECK(n1.examples == kValidExamples);
  CHECK(n0.sparsity == Approx(60.0));

  // Against one process with the global batch and the same seed: the same weights within
  // float tolerance (the ranks' mean gradients are averaged in another order), the same
  // sparsity, masks equal but for weights tied with the threshold within that tolerance.
  REQUIRE(single.weights.size() == w0.size());
  double worst = 0;
  for (size_t i = 0; i < w0.size(); ++i)
    worst = std::max(worst, (single.weights[i] - w0[i]).abs().max().item<double>());
  INFO("largest weight difference " << worst);
  CHECK(worst < 1e-6);
  CHECK(single.sparsity == n0.sparsity);
  std::int64_t differing = 0, total = 0;
  for (size_t i = 0; i < m0.size(); ++i) {
    differing += (single.masks[i] != m0[i]).sum().item<std::int64_t>();
    total += m0[i].numel();
  }
  INFO("mask entries differing from the single process: " << differing << " of " << total);
  CHECK(differing <= total / 1000);
  CHECK(single.valid.loss == Approx(n0.loss).epsilon(1e-4));
  CHECK(std::abs(single.valid.metric("accuracy") - n0.accuracy) <= 1.0 / kValidExamples + 1e-12);
  fs::remove_all(dir);
}

TEST_CASE("A killed rank stops the job with its name, resuming reproduces the run",
          "[dist][multiprocess][faults][checkpoint]") {
  FASTERAI_REQUIRE_GLOO();
  const auto dir = scratch("resume");
  const auto checkpoint = (dir / "checkpoint.pt").string();
  const auto uninterrupted = dir / "uninterrupted";
  fs::create_directories(uninterrupted);
  auto a = launch_workers("dist worker: train", "FASTERAI_DIST_OUT=" + uninterrupted.string() +
                                                    " FASTERAI_DIST_CHECKPOINT=" + checkpoint + "_a",
                          dir);
  {
    INFO(a.log);
    REQUIRE(a.status == 0);
  }

  // Rank 1 is killed after the first epoch (and its checkpoint): rank 0 fails in the next
  // all-reduce and names rank 1 and the timeout (5 s).
  // (Started without the launcher, which would stop rank 0 as soon as rank 1 is gone.)
  const auto killed = start_workers_directly(
      "dist worker: train",
      "FASTERAI_DIST_OUT=" + dir.string() + " FASTERAI_DIST_CHECKPOINT=" + checkpoint +
          " FASTERAI_DIST_KILL=1 FASTERAI_DIST_TIMEOUT_MS=5000",
      dir);
  {
    INFO(killed.log);
    CHECK(killed.status != 0);
    std::ifstream in(dir / "rank0_error.txt");
    const std::string message(std::istreambuf_iterator<char>(in), {});
    CHECK_THAT(message, Contains("failed on rank 0 of 2") && Contains("timeout 5 s") &&
                               Contains("rank 1 stopped responding"));
    CHECK(killed.seconds < 120);  // bounded: the launcher's timeout (300 s) was never reached
  }
  REQUIRE(dist::checkpoint_epoch(checkpoint) == 1);

  // The restarted job resumes at epoch 1 and ends where the uninterrupted one did.
  const auto resumed_dir = dir / "resumed";
  fs::create_directories(resumed_dir);
  const auto resumed = launch_workers(
      "dist worker: train",
      "FASTERAI_DIST_OUT=" + resumed_dir.string() + " FASTERAI_DIST_CHECKPOINT=" + checkpoint, dir);
  INFO(resumed.log);
  REQUIRE(resumed.status == 0);
  const auto na = read_numbers(uninterrupted / "rank0"), nr = read_numbers(resumed_dir / "rank0");
  CHECK(nr.sparsity == na.sparsity);
  CHECK(nr.checks == kTrainExamples / kGlobalBatch);  // one epoch of steps after resuming
  CHECK(nr.mismatches == 0);
  const auto ma = load_tensors((uninterrupted / "rank0_masks.pt").string());
  const auto mr = load_tensors((resumed_dir / "rank0_masks.pt").string());
  const auto mr1 = load_tensors((resumed_dir / "rank1_masks.pt").string());
  REQUIRE(ma.size() == mr.size());
  for (size_t i = 0; i < ma.size(); ++i) {
    CHECK(torch::equal(ma[i], mr[i]));
    CHECK(torch::equal(mr[i], mr1[i]));
  }
  const auto wa = load_tensors((uninterrupted / "rank0_weights.pt").string());
  const auto wr = load_tensors((resumed_dir / "rank0_weights.pt").string());
  REQUIRE(wa.size() == wr.size());
  for (size_t i = 0; i < wa.size(); ++i) CHECK(torch::allclose(wa[i], wr[i], 1e-6, 1e-7));
  CHECK(nr.loss == Approx(na.loss).epsilon(1e-6));
  fs::remove_all(dir);
}

TEST_CASE("A launched job deals one process's batches out to the ranks", "[dist][multiprocess]") {
  FASTERAI_REQUIRE_GLOO();
  const auto dir = scratch("launched_job");
  const auto l = launch_workers("dist worker: launched job", "FASTERAI_DIST_OUT=" + dir.string(), dir);
  INFO(l.log);
  REQUIRE(l.status == 0);
  CHECK_THAT(l.log, Contains("printed by rank 0"));
  CHECK_THAT(l.log, !Contains("printed by rank 1"));  // std::cout is silenced on rank 1

  // One process with batches of 64 over the same order: rank 0 took batches 0, 2, 4, ... of
  // 32 and rank 1 batches 1, 3, 5, ..., so each step's two batches make one batch of 64.
  torch::manual_seed(21);
  auto model = small_cnn();
  std::ostringstream quiet;
  Learner learn(model, data::make_batches(train_set(), 64), data::make_batches(valid_set(), 50),
                LearnerOptions().device(torch::kCPU).optimizer(OptimizerKind::SGD)
                    .progress(Progress::None).out(&quiet));
  learn.fit(1, 0.05);
  const auto result = learn.validate();
  const auto w0 = load_tensors((dir / "rank0_weights.pt").string());
  const auto w1 = load_tensors((dir / "rank1_weights.pt").string());
  REQUIRE(w0.size() == model->parameters().size());
  for (size_t i = 0; i < w0.size(); ++i) {
    CHECK(torch::equal(w0[i], w1[i]));
    CHECK(torch::allclose(w0[i], model->parameters()[i], 1e-5, 1e-6));
  }
  const auto n0 = read_numbers(dir / "rank0"), n1 = read_numbers(dir / "rank1");
  CHECK(n0.loss == n1.loss);
  CHECK(n0.examples == kValidExamples);  // 4 validation batches dealt 2 + 2, sums reduced
  CHECK(n0.loss == Approx(result.loss).epsilon(1e-4));
  fs::remove_all(dir);
}
