#pragma once
// Batches: the data a Learner goes through once per epoch, whatever produces it — a LibTorch
// data loader, or batches already made and held in memory — behind one small type, together
// with the number of batches per epoch (a one-cycle schedule and a progress bar need it before
// the first batch, and LibTorch's loaders do not tell).
//
// Usage:
//   auto train = fasterai::data::make_batches(
//       fasterai::data::FashionMNIST(fasterai::data::Split::Train),
//       fasterai::data::LoaderOptions(128).shuffle(true));
//   fasterai::data::Batches premade(std::vector<torch::data::Example<>>{...});
//   fasterai::data::Batches own(torch::data::make_data_loader(dataset.map(Stack<>()), opts),
//                               /*batches_per_epoch=*/469);
//   train.for_each([](const torch::data::Example<>& batch) { ... });
//
// A loader that yields std::vector<Example<>> (a Dataset without Stack) is stacked here.
// Shuffling is the loader's RandomSampler, which draws from LibTorch's global generator:
// torch::manual_seed (or the Learner's seed option) makes the order reproducible.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>

namespace fasterai::data {

class Batches {
 public:
  using Visitor = std::function<void(const torch::data::Example<>&)>;

  // No batches: a Learner without validation data.
  Batches() = default;
  // Batches made beforehand, gone through in this order every epoch.
  Batches(std::vector<torch::data::Example<>> batches);  // NOLINT: implicit by design
  // A LibTorch data loader (or anything range-for can walk that yields Example<> or
  // std::vector<Example<>>), shared with the caller, giving `batches_per_epoch` per pass.
  template <class Loader>
  Batches(std::shared_ptr<Loader> loader, std::size_t batches_per_epoch);
  template <class Loader>
  Batches(std::unique_ptr<Loader> loader, std::size_t batches_per_epoch)
      : Batches(std::shared_ptr<Loader>(std::move(loader)), batches_per_epoch) {}

  // Batches per epoch.
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  // Call `f` on each batch of one epoch, in the source's order.
  void for_each(const Visitor& f) const {
    if (walk_) walk_(f);
  }

 private:
  std::function<void(const Visitor&)> walk_;
  std::size_t size_ = 0;
};

struct LoaderOptions {
  /* implicit */ LoaderOptions(std::size_t batch_size) : batch_size_(batch_size) {}  // NOLINT
  TORCH_ARG(std::size_t, batch_size);
  TORCH_ARG(bool, shuffle) = false;    // a new random order each epoch (RandomSampler)
  TORCH_ARG(bool, drop_last) = false;  // drop a last, smaller batch
  // Background threads of the LibTorch loader; 0 loads in the training thread, which is what
  // an in-memory dataset such as FashionMNIST wants.
  TORCH_ARG(std::size_t, workers) = 0;
};

// A LibTorch data loader over `dataset` (a sized torch::data dataset) wrapped as Batches.
template <class Dataset>
Batches make_batches(Dataset dataset, const LoaderOptions& options);

namespace detail {

inline torch::data::Example<> as_example(const torch::data::Example<>& batch) { return batch; }

// A batch of single examples, as a Dataset without a Stack transform yields it.
inline torch::data::Example<> as_example(const std::vector<torch::data::Example<>>& examples) {
  std::vector<torch::Tensor> data, target;
  data.reserve(examples.size());
  target.reserve(examples.size());
  for (const auto& e : examples) {
    data.push_back(e.data);
    target.push_back(e.target);
  }
  return {torch::stack(data), torch::stack(target)};
}

}  // namespace detail

inline Batches::Batches(std::vector<torch::data::Example<>> batches) : size_(batches.size()) {
  auto held = std::make_shared<const std::vector<torch::data::Example<>>>(std::move(batches));
  walk_ = [held](const Visitor& f) {
    for (const auto& b : *held) f(b);
  };
}

template <class Loader>
Batches::Batches(std::shared_ptr<Loader> loader, std::size_t batches_per_epoch)
    : size_(batches_per_epoch) {
  fasterai::detail::check_argument(loader != nullptr, "fasterai::data::Batches", "loader",
                                   "nullptr", "a data loader");
  walk_ = [loader = std::move(loader)](const Visitor& f) {
    for (auto&& batch : *loader) {
      using B = std::remove_cvref_t<decltype(batch)>;
      if constexpr (std::is_same_v<B, torch::data::Example<>>) {
        f(batch);
      } else {
        f(detail::as_example(batch));
      }
    }
  };
}

template <class Dataset>
Batches make_batches(Dataset dataset, const LoaderOptions& options) {
  constexpr auto where = "fasterai::data::make_batches";
  fasterai::detail::check_argument(options.batch_size() >= 1, where, "batch_size",
                                   options.batch_size(), "a count >= 1");
  const auto examples = dataset.size();
  fasterai::detail::check_argument(examples.has_value(), where, "dataset", "an unsized dataset",
                                   "a dataset whose size() is known");
  const std::size_t n = *examples, bs = options.batch_size();
  const std::size_t count = options.drop_last() ? n / bs : (n + bs - 1) / bs;
  const auto loader_options = torch::data::DataLoaderOptions(bs)
                                  .drop_last(options.drop_last())
                                  .workers(options.workers());
  if (options.shuffle())
    return Batches(torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
                       std::move(dataset), loader_options),
                   count);
  return Batches(torch::data::make_data_loader<torch::data::samplers::SequentialSampler>(
                     std::move(dataset), loader_options),
                 count);
}

}  // namespace fasterai::data
