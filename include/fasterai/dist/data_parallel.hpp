#pragma once
// fasterai::dist::DataParallel: the Learner's data-parallel side over a c10d process group.
// Every rank holds a replica of the model and trains it on its shard (dist::shard); after
// each backward the gradients are averaged over the ranks, so every replica takes the same
// optimizer step and the replicas stay identical without ever sending weights.
//
//   auto group = std::make_shared<dist::ProcessGroup>(dist::ProcessGroup::from_environment());
//   torch::manual_seed(0);                               // same initial weights everywhere
//   auto model = models::compact_vgg();                  // (rank 0's are broadcast anyway)
//   Learner learn(model, dist::shard(train_set, 64, *group, dist::ShardOptions().seed(0)),
//                 dist::shard(test_set, 512, *group, dist::ShardOptions().shuffle(false).pad(false)),
//                 LearnerOptions().parallel(std::make_shared<dist::DataParallel>(group)));
//   learn.fit_one_cycle(3, 5e-3, {kd, sparsify});       // rank 0 prints the table
//
// Gradients go in buckets, as DDP's Reducer does: the gradients of consecutive parameters
// (same dtype and device) are copied into one flat buffer of at most bucket_bytes, one
// all-reduce per bucket, all buckets launched before the first is waited on, then divided by
// the world size and copied back. Few large messages instead of one per parameter is what
// keeps the per-message latency out of the step. (LibTorch's Reducer also overlaps the
// all-reduce with the backward pass through autograd hooks; on CPU, where computation and
// Gloo's communication share the same cores, there is little to overlap — the benchmark
// measures what the all-reduce costs per step.)
//
// Buffers (BatchNorm's running statistics) are not averaged: each replica updates its own
// from its shard, and rank 0's are broadcast before every validation, as DDP broadcasts them
// before forward passes. A parameter without a gradient on a rank is reduced as zeros.

#include <chrono>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/dist/process_group.hpp>
#include <fasterai/train/learner.hpp>

namespace fasterai::dist {

struct DataParallelOptions {
  DataParallelOptions() = default;
  // Largest bucket of gradients reduced at once (DDP's default bucket_cap_mb is 25).
  TORCH_ARG(std::int64_t, bucket_bytes) = 25 * 1024 * 1024;
  // The ranks were given the same, unsharded batches (a program not written for data
  // parallelism): they are dealt out, rank r taking batches r, r + W, ... of an order every
  // rank draws alike, and a last round of fewer than W batches is dropped. False for batches
  // made by dist::shard.
  TORCH_ARG(bool, deal_batches) = false;
};

// What the gradient all-reduces have cost so far.
struct CommunicationStats {
  std::int64_t steps = 0;             // average_gradients calls
  std::int64_t buckets = 0;           // all-reduces launched for gradients
  std::int64_t bytes = 0;             // gradient bytes all-reduced (per rank)
  double seconds = 0;                 // time in average_gradients (copies and all-reduce)
};

class DataParallel : public ParallelContext {
 public:
  explicit DataParallel(std::shared_ptr<const ProcessGroup> group, DataParallelOptions options = {});

  int rank() const override { return group_->rank(); }
  int world_size() const override { return group_->world_size(); }
  inline void broadcast_model(torch::nn::Module& model) override;
  inline void broadcast_buffers(torch::nn::Module& model) override;
  inline void average_gradients(const std::vector<torch::Tensor>& parameters) override;
  std::vector<double> sum(std::vector<double> values) override {
    return group_->sum(std::move(values), "all-reduce of metrics");
  }

  // The Learner's hooks (see fasterai/train/parallel.hpp).
  inline void begin_fit(torch::nn::Module& model, std::int64_t batches_per_epoch) override;
  inline void begin_epoch(int epoch) override;
  inline void order_drawn(int epoch) override;
  std::int64_t batches_per_epoch(std::int64_t batches) const override {
    return options_.deal_batches() ? batches / world_size() : batches;
  }
  bool takes(std::int64_t index, std::int64_t rounds) const override {
    if (!options_.deal_batches()) return true;
    const auto w = world_size();
    return index % w == rank() && (rounds < 0 || index / w < rounds);
  }

  const ProcessGroup& group() const noexcept { return *group_; }
  const CommunicationStats& stats() const noexcept { return stats_; }
  void reset_stats() noexcept { stats_ = {}; }
  // The buckets the last average_gradients used: parameter indices, in order.
  const std::vector<std::vector<std::size_t>>& buckets() const noexcept { return buckets_; }

 private:
  std::shared_ptr<const ProcessGroup> group_;
  DataParallelOptions options_;
  CommunicationStats stats_;
  std::vector<std::vector<std::size_t>> buckets_;
  std::vector<std::int64_t> bucket_shapes_;  // numel of each parameter when buckets_ was made
  std::uint64_t deal_seed_ = 0;               // rank 0's draw for this fit (dealt batches)

  void plan_buckets(const std::vector<torch::Tensor>& parameters);
  void broadcast_tensors(std::vector<torch::Tensor> tensors, const char* what);
};

// Parameters (or gradients, masks...) of consecutive entries grouped by dtype and device into
// runs of at most `bucket_bytes` (a tensor larger than that is a bucket of its own).
inline std::vector<std::vector<std::size_t>> bucket_by_size(const std::vector<torch::Tensor>& tensors,
                                                            std::int64_t bucket_bytes) {
  std::vector<std::vector<std::size_t>> out;
  std::int64_t filled = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    const auto bytes = t.numel() * static_cast<std::int64_t>(t.element_size());
    const bool fits = !out.empty() && filled + bytes <= bucket_bytes &&
                      tensors[out.back().front()].scalar_type() == t.scalar_type() &&
                      tensors[out.back().front()].device() == t.device();
    if (!fits) {
      out.emplace_back();
      filled = 0;
    }
    out.back().push_back(i);
    filled += bytes;
  }
  return out;
}

inline DataParallel::DataParallel(std::shared_ptr<const ProcessGroup> group, DataParallelOptions options)
    : group_(std::move(group)), options_(std::move(options)) {
  constexpr auto where = "fasterai::dist::DataParallel";
  fasterai::detail::check_argument(group_ != nullptr, where, "group", "nullptr", "a process group");
  fasterai::detail::check_argument(options_.bucket_bytes() >= 1, where, "bucket_bytes",
                                   options_.bucket_bytes(), "a size >= 1 byte");
}

inline void DataParallel::broadcast_tensors(std::vector<torch::Tensor> tensors, const char* what) {
  if (group_->world_size() == 1 || tensors.empty()) return;
  torch::NoGradGuard no_grad;
  // Flattened per bucket (the same layout on every rank: same model), then copied back.
  for (const auto& bucket : bucket_by_size(tensors, options_.bucket_bytes())) {
    std::vector<torch::Tensor> parts;
    for (auto i : bucket) parts.push_back(tensors[i].detach().reshape({-1}));
    std::vector<torch::Tensor> flat{torch::cat(parts)};
    group_->broadcast(flat, 0, what);
    std::int64_t offset = 0;
    for (auto i : bucket) {
      const auto n = tensors[i].numel();
      tensors[i].detach().copy_(flat[0].narrow(0, offset, n).view(tensors[i].sizes()));
      offset += n;
    }
  }
}

inline void DataParallel::broadcast_model(torch::nn::Module& model) {
  // Shapes first: replicas of different architectures would otherwise fail inside a copy with
  // a message that says nothing of the cause.
  std::vector<torch::Tensor> tensors = model.parameters();
  for (const auto& b : model.buffers()) tensors.push_back(b);
  std::vector<double> shape_sum{static_cast<double>(tensors.size()), 0.0};
  for (const auto& t : tensors) shape_sum[1] += static_cast<double>(t.numel());
  const auto sums = group_->sum(shape_sum, "checking that the replicas have the same shapes");
  if (sums[0] != shape_sum[0] * world_size() || sums[1] != shape_sum[1] * world_size())
    fasterai::detail::throw_argument_error("fasterai::dist::DataParallel::broadcast_model", "model",
                                           "replicas of different sizes",
                                           "the same architecture on every rank");
  broadcast_tensors(std::move(tensors), "broadcast of the model from rank 0");
}

inline void DataParallel::begin_fit(torch::nn::Module& model, std::int64_t batches_per_epoch) {
  // Σn² · W = (Σn)² holds exactly when every rank has the same n.
  const auto n = static_cast<double>(batches_per_epoch);
  const auto sums = sum({n, n * n});
  if (sums[1] * world_size() != sums[0] * sums[0])
    fasterai::detail::throw_argument_error("fasterai::Learner::fit", "train", batches_per_epoch,
                                           "the same number of training batches on every rank "
                                           "(see fasterai::dist::shard)");
  broadcast_model(model);
  // Dealt batches: every rank's loader must shuffle alike, so each epoch starts from a seed
  // rank 0 draws for this fit.
  if (options_.deal_batches())
    deal_seed_ = static_cast<std::uint64_t>(
        sum({rank() == 0 ? static_cast<double>(torch::randint(1 << 30, {1}, torch::kLong).item<std::int64_t>())
                         : 0.0})[0]);
}

inline void DataParallel::begin_epoch(int epoch) {
  if (options_.deal_batches()) torch::manual_seed(deal_seed_ + static_cast<std::uint64_t>(epoch));
}

inline void DataParallel::order_drawn(int epoch) {
  // The loader drew its order when the pass began; from here each rank draws its own random
  // numbers (dropout), as replicas with different seeds would. The prime spaces the ranks'
  // seeds far apart from the epochs' consecutive ones.
  constexpr std::uint64_t rank_stride = 1000003;
  if (options_.deal_batches())
    torch::manual_seed(deal_seed_ + static_cast<std::uint64_t>(epoch) +
                       rank_stride * static_cast<std::uint64_t>(rank() + 1));
}

inline void DataParallel::broadcast_buffers(torch::nn::Module& model) {
  broadcast_tensors(model.buffers(), "broadcast of the buffers from rank 0");
}

inline void DataParallel::plan_buckets(const std::vector<torch::Tensor>& parameters) {
  std::vector<std::int64_t> shapes;
  for (const auto& p : parameters) shapes.push_back(p.numel());
  if (shapes == bucket_shapes_ && !buckets_.empty()) return;
  buckets_ = bucket_by_size(parameters, options_.bucket_bytes());
  bucket_shapes_ = std::move(shapes);
}

inline void DataParallel::average_gradients(const std::vector<torch::Tensor>& all) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> parameters;
  for (const auto& p : all)
    if (p.requires_grad()) parameters.push_back(p);
  plan_buckets(parameters);
  ++stats_.steps;
  if (group_->world_size() > 1) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> flats;
    for (const auto& bucket : buckets_) {
      std::vector<torch::Tensor> parts;
      for (auto i : bucket) {
        const auto& g = parameters[i].grad();
        parts.push_back(g.defined() ? g.reshape({-1}) : torch::zeros({parameters[i].numel()},
                                                                     parameters[i].options()));
      }
      flats.push_back(torch::cat(parts));
      stats_.bytes += flats.back().numel() * static_cast<std::int64_t>(flats.back().element_size());
    }
    stats_.buckets += static_cast<std::int64_t>(flats.size());
    group_->all_reduce_sum(flats, "all-reduce of gradients");
    const double inverse = 1.0 / static_cast<double>(group_->world_size());
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      flats[b].mul_(inverse);
      std::int64_t offset = 0;
      for (auto i : buckets_[b]) {
        auto& p = parameters[i];
        const auto n = p.numel();
        auto averaged = flats[b].narrow(0, offset, n).view(p.sizes());
        if (p.grad().defined()) p.mutable_grad().copy_(averaged);
        else p.mutable_grad() = averaged.clone();
        offset += n;
      }
    }
  }
  stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace fasterai::dist
