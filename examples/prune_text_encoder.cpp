// Compress a text classifier built on torch::nn::TransformerEncoder — a token Embedding, a
// learned position embedding, encoder layers (d = 256, 8 heads, feed-forward 1024), mean
// pooling over the tokens and a Linear head — through its traced graph: 50% of each layer's
// feed-forward units (linear1's outputs, read by linear2 through ReLU) scored by L1 and removed,
// exactly. Parameters, MACs, latency (1 thread, batch 1, interleaved rounds) and the largest
// relative difference between the masked model's logits and the pruned one's (random weights).
//
// Kept here: the heads, which LibTorch's MultiheadAttention ties to the model width, and the
// model width itself (normalised by every LayerNorm: approximate pruning). The Pruner removes
// them from zeros with PrunerOptions::approximate, but the Sparsifier cannot select them in this
// model: the width is also the Embedding's, whose channels are its weight's columns, which the
// Sparsifier does not score.
//
//   prune_text_encoder [--layers 4] [--tokens 64] [--rounds 3] [--runs 5] [--quick]
#include <fasterai/fasterai.hpp>

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.hpp"

namespace {

using namespace fasterai;
namespace nn = torch::nn;

// A user's text classifier: token ids [N, T] -> logits [N, classes].
struct TextClassifierImpl : nn::Module {
  nn::Embedding embedding{nullptr};
  torch::Tensor pos_embedding;
  nn::TransformerEncoder encoder{nullptr};
  nn::Linear head{nullptr};
  TextClassifierImpl(std::int64_t vocabulary, std::int64_t tokens, std::int64_t d, std::int64_t heads,
                     std::int64_t feed_forward, std::int64_t layers, std::int64_t classes) {
    embedding = register_module("embedding", nn::Embedding(vocabulary, d));
    pos_embedding = register_parameter("pos_embedding", 0.02 * torch::randn({1, tokens, d}));
    encoder = register_module(
        "encoder", nn::TransformerEncoder(nn::TransformerEncoderOptions(
                                              nn::TransformerEncoderLayerOptions(d, heads).dim_feedforward(feed_forward),
                                              layers)));
    head = register_module("head", nn::Linear(d, classes));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = embedding(ids) + pos_embedding;
    x = encoder(x.transpose(0, 1)).transpose(0, 1);  // LibTorch's encoder reads [T, N, d]
    return head(x.mean(1));
  }
};
TORCH_MODULE(TextClassifier);

struct Stage {
  std::string name;
  TextClassifier model;
  std::int64_t parameters = 0, macs = 0;
  double difference = 0;
  std::vector<double> medians;
};

}  // namespace

int main(int argc, char** argv) try {
  std::int64_t layers = 4, tokens = 64;
  int rounds = 3, runs = 5;
  bool quick = false;
  example::Cli cli("prune_text_encoder", "Feed-forward units of a TransformerEncoder text classifier removed.");
  cli.option("--layers", layers, "encoder layers")
      .option("--tokens", tokens, "tokens per input")
      .option("--rounds", rounds, "interleaved timing rounds over the stages")
      .option("--runs", runs, "timed runs per stage and round")
      .flag("--quick", quick, "one layer of 16 tokens, 1 round of 1 run (a smoke test)");
  cli.parse(argc, argv);
  if (quick) layers = 1, tokens = 16, rounds = 1, runs = 1;
  if (layers < 1 || tokens < 1 || rounds < 1 || runs < 1)
    throw example::usage_error("--layers, --tokens, --rounds and --runs must be >= 1");
  const std::int64_t vocabulary = 1000, d = 256, heads = 8, feed_forward = 1024, classes = 2;
  auto make = [&] {
    torch::manual_seed(0);  // the same random model each time
    TextClassifier model(vocabulary, tokens, d, heads, feed_forward, layers, classes);
    model->eval();
    return model;
  };
  const auto ids = torch::randint(vocabulary, {1, tokens}, torch::kLong);
  auto logits = [&](TextClassifier& m) {
    torch::NoGradGuard no_grad;
    return m->forward(ids);
  };

  std::vector<Stage> stages;
  auto original = make();
  stages.push_back({"original", original, count_parameters(original), count_macs(original, ids).total(), 0.0, {}});
  for (double sparsity : {50.0}) {
    auto model = make();
    std::vector<std::string> feed_forward_inputs;
    for (std::int64_t i = 0; i < layers; ++i) feed_forward_inputs.push_back("encoder.layers." + std::to_string(i) + ".linear1");
    Sparsifier<granularity::Filter, method::Local, criteria::L1> sparsifier(
        model, ids, SparsifierOptions(sparsity).include(feed_forward_inputs));
    sparsifier.prune(sparsity);
    const auto masked = logits(model);
    const auto report = Pruner().prune_(model, ids);
    const double difference = (logits(model) - masked).abs().max().item<double>() / masked.abs().max().item<double>();
    stages.push_back({"feed-forward " + std::to_string(int(sparsity)) + "%, pruned" + (report.exact() ? "" : " (approximate)"),
                      model, count_parameters(model), count_macs(model, ids).total(), difference, {}});
  }
  for (int r = 0; r < rounds; ++r)
    for (auto& s : stages)
      s.medians.push_back(measure_latency(s.model, ids, LatencyOptions().warmup(1).runs(runs).threads(1)).median_ms);

  std::cout << "TransformerEncoder text classifier (random weights; " << layers << " layers, d " << d << ", " << heads
            << " heads, feed-forward " << feed_forward << ", " << tokens << " tokens), batch 1, 1 thread; latency: median of "
            << rounds << " interleaved rounds of " << runs << " runs\n\n";
  std::cout << std::left << std::setw(30) << "stage" << std::right << std::setw(13) << "parameters" << std::setw(15)
            << "MACs" << std::setw(12) << "latency" << std::setw(11) << "max diff" << std::setw(9) << "MACs/"
            << std::setw(9) << "time/" << "\n";
  for (auto& s : stages) std::sort(s.medians.begin(), s.medians.end());
  const auto median_of = [](const Stage& s) { return s.medians[s.medians.size() / 2]; };
  for (const auto& s : stages)
    std::cout << std::left << std::setw(30) << s.name << std::right << std::setw(13) << with_thousands(s.parameters)
              << std::setw(15) << with_thousands(s.macs) << std::fixed << std::setprecision(2) << std::setw(9)
              << median_of(s) << " ms" << std::setw(11) << std::scientific << std::setprecision(1) << s.difference
              << std::fixed << std::setprecision(2) << std::setw(8) << double(stages.front().macs) / double(s.macs)
              << "x" << std::setw(8) << median_of(stages.front()) / median_of(s) << "x\n";
  std::cout << "\nKept, and why: the heads (LibTorch's MultiheadAttention ties them to the model width) and the\n"
               "model width (every LayerNorm normalises over it: PrunerOptions::approximate; and the Embedding\n"
               "that makes it is not scored by the Sparsifier).\n";
  return 0;
} catch (const example::usage_error& e) {
  std::cerr << "prune_text_encoder: " << e.what() << "\n";
  return 2;
} catch (const std::exception& e) {
  std::cerr << "prune_text_encoder: " << e.what() << "\n";
  return 1;
}
