#pragma once
// What a Learner asks of data-parallel training, one process per replica: every rank runs the
// same Learner on its own shard of the data, and a ParallelContext keeps the replicas in step.
// The Learner calls it at fixed points of its loop, as it calls its callbacks, and knows
// nothing else of parallelism: the agreement checks, the seeds of dealt batches and every
// message between ranks live behind it. fasterai::dist::DataParallel
// (fasterai/dist/data_parallel.hpp) implements it over a LibTorch c10d process group; the
// Learner itself depends on no communication library.

#include <cstdint>
#include <memory>
#include <vector>

#include <torch/torch.h>

namespace fasterai {

class ParallelContext {
 public:
  virtual ~ParallelContext() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // Give every rank rank 0's parameters and buffers (the Learner's construction).
  virtual void broadcast_model(torch::nn::Module& model) = 0;
  // The start of a fit, on every rank: check that the ranks agree on the training batches
  // this rank takes per epoch (ranks that disagree would wait on each other's all-reduces) and
  // give every rank rank 0's model.
  virtual void begin_fit(torch::nn::Module& model, std::int64_t batches_per_epoch) = 0;
  // Before the training pass of `epoch` draws its order of batches, and once it has drawn it.
  virtual void begin_epoch(int /*epoch*/) {}
  virtual void order_drawn(int /*epoch*/) {}
  // Training batches this rank takes per epoch of a loader that gives `batches`.
  virtual std::int64_t batches_per_epoch(std::int64_t batches) const { return batches; }
  // Whether this rank takes the `index`-th batch of a pass; `rounds` (-1: all) is how many
  // this rank takes at most.
  virtual bool takes(std::int64_t /*index*/, std::int64_t /*rounds*/) const { return true; }

  // Replace each parameter's gradient by its mean over the ranks (after every backward).
  virtual void average_gradients(const std::vector<torch::Tensor>& parameters) = 0;
  // Give every rank rank 0's buffers (BatchNorm statistics drift apart between shards; before
  // each validation).
  virtual void broadcast_buffers(torch::nn::Module& model) = 0;
  // Element-wise sums over the ranks (validation sums, the smoothed loss).
  virtual std::vector<double> sum(std::vector<double> values) = 0;
  double mean(double value) { return sum({value})[0] / world_size(); }
};

// The context of Learners whose options name none; set by fasterai::dist::join_launched_job
// when a launcher started the program (as torch.distributed's default process group).
inline std::shared_ptr<ParallelContext>& default_parallel_context() {
  static std::shared_ptr<ParallelContext> context;
  return context;
}

}  // namespace fasterai
