// A user's program: include the umbrella header, build a model, report its statistics.
#include <fasterai/fasterai.hpp>

#include <iostream>

int main() {
  auto model = fasterai::models::compact_vgg();
  const auto params = fasterai::count_parameters(model);
  const auto macs = fasterai::count_macs(model, {1, 28, 28}).total();
  std::cout << "compact VGG: " << params << " parameters, " << macs << " MACs\n";
  return params > 0 && macs > 0 ? 0 : 1;
}
