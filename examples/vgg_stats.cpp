// Demo: the statistics fasterai reports, on VGG16-BN with 10 classes at 3x224x224.
#include <fasterai/fasterai.hpp>

#include <iomanip>
#include <iostream>

int main() {
  using fasterai::with_thousands;
  torch::manual_seed(0);
  auto model = fasterai::models::vgg16_bn(10);
  const auto macs = fasterai::count_macs(model, {3, 224, 224});
  std::cout << "VGG16-BN, 10 classes, input 3x224x224\n"
            << "Total parameters : " << with_thousands(fasterai::count_parameters(model)) << '\n'
            << "Nonzero parameters : " << with_thousands(fasterai::count_nonzero_parameters(model)) << '\n'
            << "Size : " << std::fixed << std::setprecision(1)
            << fasterai::model_size_bytes(model) / 1e6 << " MB\n"
            << "MACs : " << with_thousands(macs.total()) << '\n';
  const auto latency = fasterai::measure_latency(model, torch::randn({1, 3, 224, 224}),
                                                 fasterai::LatencyOptions().warmup(2).runs(10));
  std::cout << std::setprecision(2) << "Latency (batch 1, 1 thread) : " << latency.median_ms
            << " ms median, IQR " << latency.iqr_ms << " ms over " << latency.runs << " runs\n\n"
            << fasterai::sparsity_report(model);
}
