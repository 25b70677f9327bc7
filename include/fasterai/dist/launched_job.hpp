#pragma once
// One call that lets a program written for one process run data-parallel under a launcher
// (scripts/launch.sh, torchrun), as torch.distributed.init_process_group does for Python:
//
//   int main() {
//     const auto job = fasterai::dist::join_launched_job();   // nothing happens unless launched
//     ... Learners, callbacks, std::cout as before ...
//   }
//
// When the launcher's variables are set it joins the process group, installs a DataParallel
// context as the default of every Learner made afterwards (gradients averaged, metrics
// reduced, the model broadcast from rank 0; the unsharded batches the program makes are dealt
// out to the ranks batch by batch), and silences std::cout on every rank but 0, so the
// program's tables and summary are printed once. std::cerr stays open on every rank: errors
// name their rank. Everything is put back when the returned object is destroyed. Without the
// variables it returns an inactive job and the program runs as one process.
//
// Code that shards its data itself (dist::shard) builds its DataParallel directly instead.

#include <iostream>
#include <memory>
#include <streambuf>
#include <utility>

#include <fasterai/dist/data_parallel.hpp>
#include <fasterai/dist/process_group.hpp>
#include <fasterai/train/learner.hpp>

namespace fasterai::dist {

class LaunchedJob {
 public:
  LaunchedJob() = default;
  LaunchedJob(const LaunchedJob&) = delete;
  LaunchedJob& operator=(const LaunchedJob&) = delete;
  LaunchedJob(LaunchedJob&& other) noexcept { *this = std::move(other); }
  LaunchedJob& operator=(LaunchedJob&& other) noexcept {
    std::swap(group_, other.group_);
    std::swap(parallel_, other.parallel_);
    std::swap(saved_cout_, other.saved_cout_);
    return *this;
  }
  ~LaunchedJob() { release(); }

  bool active() const noexcept { return group_ != nullptr; }
  int rank() const noexcept { return group_ ? group_->rank() : 0; }
  int world_size() const noexcept { return group_ ? group_->world_size() : 1; }
  bool is_main() const noexcept { return rank() == 0; }
  // The group and the Learners' default context; null when not launched.
  const std::shared_ptr<ProcessGroup>& group() const noexcept { return group_; }
  const std::shared_ptr<DataParallel>& parallel() const noexcept { return parallel_; }

 private:
  friend LaunchedJob join_launched_job(ProcessGroupOptions options);
  std::shared_ptr<ProcessGroup> group_;
  std::shared_ptr<DataParallel> parallel_;
  std::streambuf* saved_cout_ = nullptr;

  void release() noexcept {
    if (saved_cout_) std::cout.rdbuf(saved_cout_);
    saved_cout_ = nullptr;
    if (parallel_ && default_parallel_context() == parallel_) default_parallel_context() = nullptr;
  }
};

namespace detail {
// Discards what is written to it.
class NullBuffer : public std::streambuf {
 protected:
  int overflow(int c) override { return traits_type::not_eof(c); }
  std::streamsize xsputn(const char*, std::streamsize n) override { return n; }
};
inline NullBuffer& null_buffer() {
  static NullBuffer buffer;
  return buffer;
}
}  // namespace detail

inline LaunchedJob join_launched_job(ProcessGroupOptions options = {}) {
  LaunchedJob job;
  if (!Environment::launched()) return job;
  job.group_ = std::make_shared<ProcessGroup>(ProcessGroup::from_environment(std::move(options)));
  job.parallel_ = std::make_shared<DataParallel>(job.group_, DataParallelOptions().deal_batches(true));
  default_parallel_context() = job.parallel_;
  if (!job.group_->is_main()) job.saved_cout_ = std::cout.rdbuf(&detail::null_buffer());
  return job;
}

}  // namespace fasterai::dist
