#pragma once
// Sharding a dataset over the ranks of a data-parallel job, as PyTorch's DistributedSampler
// does: each epoch one permutation of the whole dataset, seeded by (seed, epoch) so that every
// rank draws the same one without talking to the others, dealt out round-robin — rank r takes
// positions r, r + W, r + 2W, ... With local batches of b, step k of all ranks together covers
// positions [k·b·W, (k+1)·b·W) of the permutation: exactly the batch a single process with
// batch b·W and the same seed takes at step k, so averaging the ranks' mean gradients gives
// that process's gradient.
//
//   auto train = fasterai::dist::shard(data::FashionMNIST(data::Split::Train),
//                                      data::LoaderOptions(64), group,   // 64 per rank
//                                      fasterai::dist::ShardOptions().seed(42));
//   auto valid = fasterai::dist::shard(data::FashionMNIST(data::Split::Test), 512, group,
//                                      fasterai::dist::ShardOptions().shuffle(false).pad(false));
//
// Training shards are padded (the permutation's first examples repeated) so that every rank
// takes the same number of steps — ranks that disagree would wait on each other's all-reduce.
// Validation shards need no padding: every rank validates its share and the sums are reduced.
// The epoch advances each time the loader starts a pass; `first_epoch` resumes the sequence.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/dist/process_group.hpp>

namespace fasterai::dist {

struct ShardOptions {
  ShardOptions() = default;
  TORCH_ARG(bool, shuffle) = true;          // a new permutation each epoch
  TORCH_ARG(std::uint64_t, seed) = 0;       // the same on every rank
  TORCH_ARG(bool, pad) = true;              // equal shards by repeating examples (training)
  TORCH_ARG(std::int64_t, first_epoch) = 0; // the epoch of the first pass (resuming)
};

// LibTorch's Sampler interface (c10::optional: LibTorch 1.13's signature, std::optional's alias
// in LibTorch 2.x).
class ShardSampler : public torch::data::samplers::Sampler<> {
 public:
  ShardSampler(std::size_t size, int rank, int world_size, ShardOptions options = {});

  // Start the next epoch (the loader calls this at the start of each pass).
  inline void reset(c10::optional<std::size_t> new_size = c10::nullopt) override;
  inline c10::optional<std::vector<std::size_t>> next(std::size_t batch_size) override;
  inline void save(torch::serialize::OutputArchive& archive) const override;
  inline void load(torch::serialize::InputArchive& archive) override;

  // This rank's indices of epoch `epoch`, in order.
  std::vector<std::size_t> indices(std::int64_t epoch) const;
  // Examples per rank and epoch.
  std::size_t shard_size() const;
  std::int64_t epoch() const noexcept { return epoch_; }

 private:
  std::size_t size_;
  int rank_, world_size_;
  ShardOptions options_;
  std::int64_t epoch_;
  std::vector<std::size_t> current_;
  std::size_t position_ = 0;
};

// A LibTorch data loader over this rank's shard of `dataset`, as Batches (batch_size is per
// rank). The overload with ranks given explicitly serves tests and single-process runs
// (rank 0 of 1 is the whole dataset in the same order).
template <class Dataset>
data::Batches shard(Dataset dataset, const data::LoaderOptions& loader, int rank, int world_size,
                    ShardOptions options = {});
template <class Dataset>
data::Batches shard(Dataset dataset, const data::LoaderOptions& loader, const ProcessGroup& group,
                    ShardOptions options = {}) {
  return shard(std::move(dataset), loader, group.rank(), group.world_size(), std::move(options));
}

inline ShardSampler::ShardSampler(std::size_t size, int rank, int world_size, ShardOptions options)
    : size_(size), rank_(rank), world_size_(world_size), options_(std::move(options)),
      epoch_(options_.first_epoch() - 1) {
  constexpr auto where = "fasterai::dist::ShardSampler";
  using fasterai::detail::check_argument;
  check_argument(world_size >= 1, where, "world_size", world_size, "a count >= 1");
  check_argument(rank >= 0 && rank < world_size, where, "rank", rank, "a rank in [0, world_size)");
  check_argument(options_.first_epoch() >= 0, where, "first_epoch", options_.first_epoch(),
                 "an epoch >= 0");
}

inline std::size_t ShardSampler::shard_size() const {
  const auto w = static_cast<std::size_t>(world_size_), r = static_cast<std::size_t>(rank_);
  if (options_.pad()) return (size_ + w - 1) / w;
  return size_ / w + (r < size_ % w ? 1 : 0);
}

inline std::vector<std::size_t> ShardSampler::indices(std::int64_t epoch) const {
  std::vector<std::size_t> order(size_);
  if (options_.shuffle() && size_ > 0) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(
        options_.seed() + static_cast<std::uint64_t>(epoch));
    const auto perm = torch::randperm(static_cast<std::int64_t>(size_), generator, torch::kLong);
    const auto* p = perm.data_ptr<std::int64_t>();
    for (std::size_t i = 0; i < size_; ++i) order[i] = static_cast<std::size_t>(p[i]);
  } else {
    for (std::size_t i = 0; i < size_; ++i) order[i] = i;
  }
  std::vector<std::size_t> mine;
  const auto w = static_cast<std::size_t>(world_size_);
  const std::size_t total = options_.pad() ? shard_size() * w : size_;
  for (std::size_t pos = static_cast<std::size_t>(rank_); pos < total && size_ > 0; pos += w)
    mine.push_back(order[pos % size_]);
  return mine;
}

inline void ShardSampler::reset(c10::optional<std::size_t> new_size) {
  if (new_size) size_ = *new_size;
  ++epoch_;
  current_ = indices(epoch_);
  position_ = 0;
}

inline c10::optional<std::vector<std::size_t>> ShardSampler::next(std::size_t batch_size) {
  if (position_ >= current_.size()) return c10::nullopt;
  const auto end = std::min(current_.size(), position_ + batch_size);
  std::vector<std::size_t> batch(current_.begin() + static_cast<std::ptrdiff_t>(position_),
                                 current_.begin() + static_cast<std::ptrdiff_t>(end));
  position_ = end;
  return batch;
}

inline void ShardSampler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("epoch", torch::tensor(epoch_, torch::kLong), /*is_buffer=*/true);
  archive.write("position", torch::tensor(static_cast<std::int64_t>(position_), torch::kLong),
                /*is_buffer=*/true);
}

inline void ShardSampler::load(torch::serialize::InputArchive& archive) {
  torch::Tensor epoch, position;
  archive.read("epoch", epoch, /*is_buffer=*/true);
  archive.read("position", position, /*is_buffer=*/true);
  epoch_ = epoch.item<std::int64_t>();
  current_ = indices(epoch_);
  position_ = static_cast<std::size_t>(position.item<std::int64_t>());
}

template <class Dataset>
data::Batches shard(Dataset dataset, const data::LoaderOptions& loader, int rank, int world_size,
                    ShardOptions options) {
  constexpr auto where = "fasterai::dist::shard";
  fasterai::detail::check_argument(loader.batch_size() >= 1, where, "batch_size",
                                   loader.batch_size(), "a count >= 1");
  const auto examples = dataset.size();
  fasterai::detail::check_argument(examples.has_value(), where, "dataset", "an unsized dataset",
                                   "a dataset whose size() is known");
  ShardSampler sampler(*examples, rank, world_size, std::move(options));
  const std::size_t n = sampler.shard_size(), bs = loader.batch_size();
  const std::size_t count = loader.drop_last() ? n / bs : (n + bs - 1) / bs;
  const auto loader_options = torch::data::DataLoaderOptions(bs)
                                  .drop_last(loader.drop_last())
                                  .workers(loader.workers());
  return data::Batches(torch::data::make_data_loader(std::move(dataset), std::move(sampler),
                                                     loader_options),
                       count);
}

}  // namespace fasterai::dist
