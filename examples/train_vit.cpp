// A small Vision Transformer on Fashion-MNIST, compressed end to end: models::vit with patches
// of 7x7 (16 tokens and a class token), trained with fit_one_cycle, then fine-tuned while
// SparsifyCallback removes MLP units gradually (Filter/Local/L1 over the traced graph: each
// block's MLP hidden units are one coupled group), then the zero units are removed in place
// (exact). Then the heads: LibTorch's MultiheadAttention ties them to the hidden size, so half
// the heads go with their hidden channels, scored over every layer that writes the hidden
// stream, zeroed while fine-tuning and removed with approximate pruning (the LayerNorms then
// normalise over fewer channels), and one more epoch of fine-tuning recovers what that cost.
// For each stage: test accuracy, parameters, MACs, latency (1 thread, batch 1, median of
// interleaved rounds).
//
//   train_vit [--epochs 4] [--finetune 2] [--sparsity 50] [--subset N] [--data PATH] [--seed 42]
//             [--quick]
#include <fasterai/fasterai.hpp>
#include <fasterai/models/vit.hpp>

#include <iostream>
#include <string>
#include <vector>

#include "common/compression_run.hpp"

using fasterai::models::VisionTransformer;

int main(int argc, char** argv) try {
  using namespace fasterai;
  example::CompressionRun run{.epochs = 4, .finetune = 2, .lr = 2e-3};
  example::Cli cli("train_vit", "Train a small ViT, remove half of its MLP units, then half of its heads, while fine-tuning.");
  run.parse(cli, argc, argv, "each block's MLP units");
  torch::manual_seed(static_cast<std::int64_t>(run.seed));
  const auto vit_options =
      models::VisionTransformerOptions(28, 7).in_channels(1).num_layers(4).num_heads(4).hidden_dim(64).mlp_dim(256).num_classes(10);
  VisionTransformer model(vit_options);
  Learner learn = run.learner(model);
  const auto example_input = torch::zeros({1, 1, 28, 28});
  std::vector<example::StageRow<VisionTransformer>> rows;
  auto record = [&](std::string stage) {
    rows.push_back({std::move(stage), learn.validate().metric("accuracy"), count_parameters(model),
                    count_macs(model, {1, 28, 28}).total(),
                    VisionTransformer(std::dynamic_pointer_cast<models::VisionTransformerImpl>(model->clone())), {}});
  };

  std::cout << "Baseline: " << run.epochs << " epochs of fit_one_cycle\n";
  learn.fit_one_cycle(run.epochs, run.lr);
  record("baseline");

  std::vector<std::string> mlp_inputs;
  for (std::int64_t i = 0; i < vit_options.num_layers(); ++i)
    mlp_inputs.push_back("encoder.layers.encoder_layer_" + std::to_string(i) + ".mlp.0");
  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, example_input, SparsifierOptions(run.sparsity).include(mlp_inputs));
  // Prune over the first half of the fine-tuning, recover during the second.
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << run.finetune << " epochs while removing " << run.sparsity
            << "% of each block's MLP units\n";
  learn.fit(run.finetune, run.lr / 5, {sparsify});
  record("sparsified (masked)");

  const PruneReport pruned = Pruner().prune_(model, example_input);
  record("MLP units pruned");

  // Every layer that writes the hidden stream: the patch convolution, the attentions' input
  // projections (their heads are tied to the stream) and output projections, the MLPs' second
  // Linears. Local: half of the stream's units, each a head's block of channels.
  std::vector<std::string> stream{"conv_proj"};
  for (std::int64_t i = 0; i < vit_options.num_layers(); ++i) {
    const auto block = "encoder.layers.encoder_layer_" + std::to_string(i);
    for (const auto* layer : {".self_attention", ".self_attention.out_proj", ".mlp.3"}) stream.push_back(block + layer);
  }
  Sparsifier<granularity::Filter, method::Local, criteria::L1, schedule::Gradual> heads(
      model, example_input, SparsifierOptions(run.sparsity).include(stream).approximate(true));
  SparsifyCallback sparsify_heads(heads, SparsifyCallbackOptions().end(0.5));
  std::cout << "\nFine-tuning " << run.finetune << " epochs while zeroing " << run.sparsity
            << "% of the heads with their hidden channels (approximate)\n";
  learn.fit(run.finetune, run.lr / 5, {sparsify_heads});
  record("heads sparsified");
  const PruneReport approximate = Pruner(PrunerOptions().approximate(true)).prune_(model, example_input);
  record("heads pruned (approx.)");
  std::cout << "\nFine-tuning 1 epoch after pruning\n";
  learn.fit(1, run.lr / 10);
  record("+ 1 epoch fine-tuning");
  const auto& attention = model->encoder->layers[0]->as<models::EncoderBlockImpl>()->self_attention;

  example::time_and_print(rows, example_input, run.rounds);
  std::cout << "\n" << pruned.channels_removed() << " MLP units removed (" << (pruned.exact() ? "exact" : "approximate")
            << "); then heads: " << attention->options.num_heads() << " of " << vit_options.num_heads()
            << " left, hidden size " << attention->options.embed_dim() << " (" << approximate.approximate.size()
            << " LayerNorms normalise over fewer channels); latency: median of " << run.rounds
            << " interleaved rounds of 20 runs, spread = max - min of the rounds\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "train_vit: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "train_vit: " << e.what() << "\n";
  return 1;
}
