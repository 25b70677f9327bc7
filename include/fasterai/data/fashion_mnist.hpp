#pragma once
// Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): 70,000 28x28 grayscale images of clothing in
// 10 classes, 60,000 for training and 10,000 for test — MNIST's format with a harder task,
// small enough to train on a laptop CPU in minutes. The examples and tests of fasterai train
// on it.
//
// Usage:
//   fasterai::data::FashionMNIST train(fasterai::data::Split::Train);           // Debian's copy
//   fasterai::data::FashionMNIST quick(fasterai::data::Split::Test,
//       fasterai::data::FashionMNISTOptions().root("/data/fmnist").subset(500).subset_seed(0));
//   auto loader = torch::data::make_data_loader(std::move(train),
//                                               torch::data::DataLoaderOptions(128));
//   for (torch::data::Example<>& batch : *loader) { /* batch.data [128,1,28,28] float */ }
//
// The images of a split are read once into one uint8 tensor (47 MB for training). The dataset
// is a `torch::data::datasets::BatchDataset` whose batch is already one Example<> of stacked
// tensors: `get_batch` gathers its images with a single index_select and normalizes the batch
// in place, where LibTorch's usual Dataset + Stack pipeline would build, normalize and stack
// one small tensor per image. `get(i)` returns one example the same way, and the default
// RandomSampler of torch::data shuffles (seeded by torch::manual_seed).

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/data/idx.hpp>

namespace fasterai::data {

enum class Split { Train, Test };

struct FashionMNISTOptions {
  FashionMNISTOptions() = default;
  // The folder holding the four files (gzip-compressed or not); this default is where Debian's
  // fashion-mnist data package installs them.
  TORCH_ARG(std::filesystem::path, root) = "/usr/share/datasets/fashion-mnist";
  // Scale to [0, 1] then standardize with the training set's mean and std; false gives [0, 1].
  TORCH_ARG(bool, normalize) = true;
  // Keep only this many images (tests and quick runs): the first N, or a random N when
  // subset_seed is set (the same seed picks the same images).
  TORCH_ARG(std::optional<std::int64_t>, subset);
  TORCH_ARG(std::optional<std::uint64_t>, subset_seed);
};

class FashionMNIST
    : public torch::data::datasets::BatchDataset<FashionMNIST, torch::data::Example<>> {
 public:
  // Pixel statistics of the 60,000 training images, scaled to [0, 1].
  static constexpr double pixel_mean = 0.2860;
  static constexpr double pixel_std = 0.3530;
  static constexpr std::int64_t num_classes = 10;
  static constexpr std::int64_t image_size = 28;
  static const std::vector<std::string>& class_names() {
    static const std::vector<std::string> names{"T-shirt/top", "Trouser", "Pullover", "Dress",
                                                "Coat",        "Sandal",  "Shirt",    "Sneaker",
                                                "Bag",         "Ankle boot"};
    return names;
  }

  explicit FashionMNIST(Split split = Split::Train, const FashionMNISTOptions& options = {});

  // One image [1, 28, 28] float and its label (an int64 scalar).
  torch::data::Example<> get(size_t index);
  // The images [B, 1, 28, 28] float and labels [B] int64 at `indices`, in that order.
  inline torch::data::Example<> get_batch(c10::ArrayRef<size_t> indices) override;
  c10::optional<size_t> size() const override { return static_cast<size_t>(labels_.size(0)); }

  // All images [N, 28, 28] uint8 and labels [N] int64, as read (and subset).
  const torch::Tensor& images() const noexcept { return images_; }
  const torch::Tensor& targets() const noexcept { return labels_; }
  Split split() const noexcept { return split_; }
  const FashionMNISTOptions& options() const noexcept { return options_; }

 private:
  torch::Tensor images_;  // [N, 28, 28] uint8
  torch::Tensor labels_;  // [N] int64
  Split split_;
  FashionMNISTOptions options_;

  torch::Tensor prepare(torch::Tensor images) const;
};

namespace detail {

// A file of the split, gzip-compressed or plain (whichever exists; gzip first).
inline std::filesystem::path fashion_mnist_file(const std::filesystem::path& root,
                                                const std::string& stem) {
  auto gz = root / (stem + ".gz");
  if (std::filesystem::exists(gz)) return gz;
  auto plain = root / stem;
  if (std::filesystem::exists(plain)) return plain;
  return gz;  // reported missing by read_idx, under the name the package installs
}

// `n` distinct indices in [0, size) drawn with a seeded Fisher-Yates shuffle, in ascending
// order. std::mt19937_64 is fully specified, so a seed picks the same images everywhere.
inline std::vector<std::int64_t> random_subset(std::int64_t size, std::int64_t n,
                                               std::uint64_t seed) {
  std::vector<std::int64_t> all(static_cast<size_t>(size));
  for (std::int64_t i = 0; i < size; ++i) all[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto j = i + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(size - i));
    std::swap(all[static_cast<size_t>(i)], all[static_cast<size_t>(j)]);
  }
  all.resize(static_cast<size_t>(n));
  std::sort(all.begin(), all.end());
  return all;
}

}  // namespace detail

inline FashionMNIST::FashionMNIST(Split split, const FashionMNISTOptions& options)
    : split_(split), options_(options) {
  constexpr auto where = "fasterai::data::FashionMNIST";
  const std::string prefix = split == Split::Train ? "train" : "t10k";
  const auto images_path = detail::fashion_mnist_file(options.root(), prefix + "-images-idx3-ubyte");
  const auto labels_path = detail::fashion_mnist_file(options.root(), prefix + "-labels-idx1-ubyte");

  torch::Tensor images = read_idx(images_path);
  if (images.scalar_type() != torch::kUInt8 || images.dim() != 3 ||
      images.size(1) != image_size || images.size(2) != image_size) {
    std::ostringstream os;
    os << "holds " << images.scalar_type() << " values of shape " << images.sizes()
       << "; Fashion-MNIST images are uint8 of shape [N, 28, 28]";
    throw file_error(where, images_path, os.str());
  }
  torch::Tensor labels = read_idx(labels_path);
  if (labels.scalar_type() != torch::kUInt8 || labels.dim() != 1) {
    std::ostringstream os;
    os << "holds " << labels.scalar_type() << " values of shape " << labels.sizes()
       << "; Fashion-MNIST labels are uint8 of shape [N]";
    throw file_error(where, labels_path, os.str());
  }
  if (labels.size(0) != images.size(0))
    throw file_error(where, labels_path,
                     "holds " + std::to_string(labels.size(0)) + " labels but '" +
                         images_path.string() + "' holds " + std::to_string(images.size(0)) +
                         " images");
  if (labels.numel() > 0) {
    const int top = labels.max().item<int>();
    if (top >= num_classes)
      throw file_error(where, labels_path,
                       "holds the label " + std::to_string(top) + "; expected 0 to 9");
  }

  const std::int64_t total = images.size(0);
  if (options.subset()) {
    const std::int64_t n = *options.subset();
    fasterai::detail::check_argument(n >= 1 && n <= total, where, "subset", n,
                                     "a count from 1 to the " + std::to_string(total) +
                                         " images of the split");
    if (options.subset_seed()) {
      const auto picked = detail::random_subset(total, n, *options.subset_seed());
      const auto index = torch::tensor(picked, torch::kLong);
      images = images.index_select(0, index);
      labels = labels.index_select(0, index);
    } else {
      images = images.narrow(0, 0, n).clone();  // drop the rest of the 47 MB
      labels = labels.narrow(0, 0, n);
    }
  }
  images_ = images.contiguous();
  labels_ = labels.to(torch::kLong);
}

inline torch::Tensor FashionMNIST::prepare(torch::Tensor images) const {
  // One pass per batch: uint8 -> float, then x/255 or (x/255 - mean)/std as one affine map.
  images = images.to(torch::kFloat).unsqueeze_(1);
  if (options_.normalize())
    return images.mul_(1.0 / (255.0 * pixel_std)).sub_(pixel_mean / pixel_std);
  return images.mul_(1.0 / 255.0);
}

inline torch::data::Example<> FashionMNIST::get(size_t index) {
  fasterai::detail::check_argument(index < *size(), "fasterai::data::FashionMNIST::get", "index",
                                   index, "an index below size() = " + std::to_string(*size()));
  const auto i = static_cast<std::int64_t>(index);
  return {prepare(images_.narrow(0, i, 1)).squeeze_(0), labels_[i]};
}

inline torch::data::Example<> FashionMNIST::get_batch(c10::ArrayRef<size_t> indices) {
  const auto n = static_cast<size_t>(labels_.size(0));
  std::vector<std::int64_t> rows(indices.size());
  for (size_t k = 0; k < indices.size(); ++k) {
    fasterai::detail::check_argument(indices[k] < n, "fasterai::data::FashionMNIST::get_batch",
                                     "indices", indices[k],
                                     "indices below size() = " + std::to_string(n));
    rows[k] = static_cast<std::int64_t>(indices[k]);
  }
  const auto index = torch::tensor(rows, torch::kLong);
  return {prepare(images_.index_select(0, index)), labels_.index_select(0, index)};
}

}  // namespace fasterai::data
