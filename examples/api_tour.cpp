// The API tour of docs/guide.md, compiled and run in CI: every snippet between `// [name]` and
// `// [end]` appears verbatim there or in README.md (checked by the `guide_snippets` and
// `readme_snippets` tests).
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/io/state_dict.hpp>
#include <fasterai/quant.hpp>  // quantize_traced: int8 is opt-in, it pulls LibTorch's JIT

#include <iostream>

int main() {
  torch::manual_seed(0);
  // [models]
  auto model = fasterai::models::compact_vgg();          // 1x28x28 -> 10 classes
  auto vgg = fasterai::models::vgg16_bn(/*num_classes=*/10);
  std::cout << "Total parameters : " << fasterai::with_thousands(fasterai::count_parameters(vgg))
            << "\n";                                      // 134,309,962, as torchvision
  for (const fasterai::Layer& layer : fasterai::layers(model, fasterai::LayerKind::Conv2d))
    std::cout << layer.name << "\n";                      // features.0, features.4, ...
  // [end]

  // [statistics]
  std::cout << fasterai::count_macs(model, {1, 28, 28}).total() << " MACs, "
            << fasterai::model_size_bytes(model) << " bytes, "
            << fasterai::count_nonzero_parameters(model) << " nonzero parameters\n";
  auto latency = fasterai::measure_latency(model, torch::randn({1, 1, 28, 28}),
                                           fasterai::LatencyOptions().runs(100).threads(1));
  std::cout << latency.median_ms << " ms median, IQR " << latency.iqr_ms << " ms\n";
  // [end]

  // [one_shot]
  namespace fg = fasterai::granularity;
  fasterai::Sparsifier<fg::Filter, fasterai::method::Local, fasterai::criteria::L1> sparsifier(vgg);
  sparsifier.prune(40);                                   // 40% of the filters of every conv
  std::cout << sparsifier.report();                       // Sparsity in Conv2d features.0: 39.06% ...
  // [end]

  // [transforms]
  auto pruned = fasterai::Pruner().prune(vgg);            // 83,975,344 parameters
  auto folded = fasterai::BNFolder().fold(pruned);        // 83,970,260
  auto small = fasterai::FCDecomposer().decompose(folded, 0.5);  // 61,430,022
  std::cout << fasterai::with_thousands(fasterai::count_parameters(small)) << "\n";
  // [end]

  // [own_module]
  auto resnet = fasterai::models::resnet18(/*num_classes=*/10);  // a Module with its own forward()
  auto example = torch::randn({1, 3, 64, 64});
  fasterai::Sparsifier<fg::Filter, fasterai::method::Local, fasterai::criteria::L1> coupled(
      resnet, example, fasterai::SparsifierOptions(30));  // traced: residual streams are one group
  coupled.prune(30);
  auto report = fasterai::Pruner().prune_(resnet, example);  // in place: same modules, fewer channels
  fasterai::BNFolder().fold_(resnet, example);
  std::cout << report.channels_removed() << " channels removed, "
            << fasterai::count_macs(resnet, {3, 64, 64}).total() << " MACs\n";
  // [end]

  // [int8_traced]
  std::vector<torch::Tensor> calibration{torch::randn({8, 3, 64, 64}), torch::randn({8, 3, 64, 64})};
  torch::jit::Module int8 = fasterai::quantize_traced(resnet, example, calibration);  // adds stay int8
  std::cout << int8.forward({example}).toTensor().argmax(1) << "\n";
  int8.save("resnet18_int8.pt");                          // Python: torch.jit.load("resnet18_int8.pt")
  std::remove("resnet18_int8.pt");
  // [end]

  // [training]
  using namespace fasterai;
  auto subset = data::FashionMNISTOptions().subset(2000).subset_seed(0);
  Learner learn(model,
                data::make_batches(data::FashionMNIST(data::Split::Train, subset),
                                   data::LoaderOptions(128).shuffle(true)),
                data::make_batches(data::FashionMNIST(data::Split::Test, subset), 1000),
                LearnerOptions().seed(42));
  learn.fit_one_cycle(1, 5e-3);                           // prints the epoch table

  auto teacher = models::compact_vgg(models::CompactVGGOptions().widths({32, 64, 128}));
  KnowledgeDistillation kd(teacher, /*temperature=*/3.0, /*alpha=*/0.5);
  Sparsifier<granularity::Weight, method::Global, criteria::L1, schedule::Gradual> gradual(
      model, SparsifierOptions(/*target=*/60).include_linear(true));
  SparsifyCallback sparsify(gradual);                     // "Sparsity at epoch i: x%"
  learn.fit(1, 1e-3, {kd, sparsify});
  // [end]

  // [hand_written_loop]
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-3));
  const int steps = 20;
  for (int step = 0; step < steps; ++step) {
    auto x = torch::randn({32, 1, 28, 28});
    auto y = torch::randint(0, 10, {32});
    optimizer.zero_grad();
    auto logits = model->forward(x);
    auto loss = kd.loss(x, logits, y);                    // distillation as a plain loss
    loss.backward();
    gradual.step(double(step + 1) / steps);               // schedule -> masks (after backward)
    gradual.mask_gradients();                             // pruned weights get no update
    optimizer.step();
    gradual.apply();                                      // nor decay back from zero
  }
  // [end]

  // [factory]
  auto from_strings = fasterai::make_sparsifier(model, {"kernel", "global", "l1", "cos"},
                                                fasterai::SparsifierOptions(50));
  from_strings->step(1.0);
  std::cout << from_strings->name() << ": " << from_strings->sparsity() << "%\n";
  // [end]

  // [state_dict]
  fasterai::save_state_dict(model, "compact_vgg.pt");     // Python: torch.load("compact_vgg.pt")
  auto copy = fasterai::models::compact_vgg();
  fasterai::load_state_dict(copy, "compact_vgg.pt");      // also reads torch.save(m.state_dict())
  std::remove("compact_vgg.pt");
  // [end]
  return 0;
}
