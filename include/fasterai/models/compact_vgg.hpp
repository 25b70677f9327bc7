#pragma once
// A compact VGG-style network for 1x28x28 inputs (Fashion-MNIST), laid out like the VGG zoo
// (features / avgpool / flatten / classifier) so every sparsifier and transform applies to it
// unchanged. Three stages of Conv3x3-BN-ReLU blocks, each ending in a 2x2 max-pool
// (28 -> 14 -> 7 -> 3), then a two-layer classifier.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/models/vgg.hpp>

namespace fasterai::models {

struct CompactVGGOptions {
  CompactVGGOptions() = default;
  TORCH_ARG(std::int64_t, num_classes) = 10;
  TORCH_ARG(int, in_channels) = 1;
  // Channels of the three stages; the first stage has one convolution, the others two.
  TORCH_ARG(std::vector<int>, widths) = std::vector<int>{16, 32, 64};
  TORCH_ARG(int, hidden) = 256;  // width of the classifier's hidden layer
  TORCH_ARG(bool, batch_norm) = true;
  TORCH_ARG(double, dropout) = 0.25;
};

inline torch::nn::Sequential compact_vgg(const CompactVGGOptions& options = {}) {
  using namespace torch::nn;
  constexpr auto where = "fasterai::models::compact_vgg";
  const auto& w = options.widths();
  fasterai::detail::check_argument(w.size() == 3, where, "widths.size()", w.size(),
                                   "3 (one width per stage)");
  for (int c : w)
    fasterai::detail::check_argument(c >= 1, where, "widths", c, "channel counts >= 1");
  fasterai::detail::check_argument(options.num_classes() >= 1, where, "num_classes",
                                   options.num_classes(), "a count >= 1");
  fasterai::detail::check_argument(options.hidden() >= 1, where, "hidden", options.hidden(),
                                   "a width >= 1");
  fasterai::detail::check_argument(options.dropout() >= 0 && options.dropout() < 1, where,
                                   "dropout", options.dropout(), "a probability in [0, 1)");
  const VGGConfig config{w[0], 0, w[1], w[1], 0, w[2], w[2], 0};
  Sequential model;
  model->push_back("features",
                   detail::make_features(config, options.batch_norm(), options.in_channels()));
  model->push_back("avgpool", AdaptiveAvgPool2d(AdaptiveAvgPool2dOptions({3, 3})));
  model->push_back("flatten", Flatten());
  fasterai::NamedSequential classifier;
  classifier->push_back("0", Linear(w[2] * 9, options.hidden()));
  classifier->push_back("1", ReLU(ReLUOptions().inplace(true)));
  classifier->push_back("2", Dropout(options.dropout()));
  classifier->push_back("3", Linear(options.hidden(), options.num_classes()));
  model->push_back("classifier", classifier);
  detail::init_like_torchvision(*model);
  return model;
}

}  // namespace fasterai::models
