#include <fasterai/compress.hpp>

#include "catch.hpp"
#include "deploy_testing.hpp"
#include <torch/script.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <fasterai/core/statistics.hpp>
#include <fasterai/graph/macs.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/models/resnet.hpp>

#include "python_oracle.hpp"

using namespace fasterai;

namespace {

using fasterai::testing::relative_difference;
using fasterai::testing::trained_looking;


// Options that keep a test quick: two batch sizes, few runs, a short measurement.
CompressOptions quick() {
  return CompressOptions()
      .latency_batches({1, 4})
      .latency_rounds(1)
      .latency(LatencyOptions().warmup(1).runs(2))
      .optimize(OptimizeOptions().rounds(1).runs(1));
}

std::vector<torch::Tensor> snapshot(torch::nn::Module& model) {
  std::vector<torch::Tensor> state;
  for (const auto& t : model.parameters()) state.push_back(t.clone());
  for (const auto& t : model.buffers()) state.push_back(t.clone());
  return state;
}

void check_unchanged(torch::nn::Module& model, const std::vector<torch::Tensor>& before) {
  const auto now = snapshot(model);
  REQUIRE(now.size() == before.size());
  for (std::size_t i = 0; i < now.size(); ++i) CHECK(torch::equal(now[i], before[i]));
}

}  // namespace

TEST_CASE("compress_for_deployment: a Sequential gives what the separate steps give",
          "[compress]") {
  torch::manual_seed(21);
  auto model = models::compact_vgg();
  trained_looking(*model);
  model->train();
  const auto before = snapshot(*model);
  const auto x = torch::randn({1, 1, 28, 28});

  auto result = compress_for_deployment(model, x, quick().target(50));
  const CompressReport& r = result.report;

  // The same steps, one by one, on another copy.
  auto masked = clone_model(model);
  masked->eval();
  Sparsifier<granularity::Filter, method::Local, criteria::L1>(masked).prune(50);
  BNFolder folder;
  auto expected = folder.fold(Pruner().prune(masked));
  CHECK(r.parameters_before == count_parameters(model));
  CHECK(r.macs_before == count_macs(model, {1, 28, 28}).total());
  CHECK(r.bytes_before == model_size_bytes(model));
  CHECK(r.parameters_after == count_parameters(expected));
  CHECK(r.macs_after == count_macs(expected, {1, 28, 28}).total());
  CHECK(r.bytes_after == model_size_bytes(expected));
  CHECK(r.parameters_after == count_parameters(result.model));
  CHECK(r.parameters_after < r.parameters_before);
  CHECK(r.batch_norms_folded == folder.report().folded.size());
  CHECK(r.batch_norms_folded == 5);
  CHECK(r.channels_removed > 0);
  CHECK(!r.int8);
  CHECK(r.exported.empty());
  CHECK(!result.int8);

  // The compressed model and its InferenceModel compute the masked model.
  torch::NoGradGuard no_grad;
  const auto other = torch::randn({3, 1, 28, 28});
  CHECK(r.max_difference < 1e-5);
  CHECK(relative_difference(result.model->forward(other), masked->forward(other)) < 1e-5);
  CHECK(relative_difference(result.inference(x), masked->forward(x)) < 1e-5);
  CHECK(r.inference.path == result.inference->path());

  // Latency rows in the order asked, every median measured.
  REQUIRE(r.latency.size() == 2);
  CHECK(r.latency[0].batch == 1);
  CHECK(r.latency[1].batch == 4);
  for (const auto& l : r.latency) {
    CHECK(l.original_ms > 0);
    CHECK(l.compressed_ms > 0);
    CHECK(l.int8_ms == 0);
  }
  std::ostringstream table;
  table << r;
  CHECK(table.str().find("latency, batch 4") != std::string::npos);
  CHECK(table.str().find(with_thousands(r.parameters_after)) != std::string::npos);

  // The model is left as it was, mode included.
  CHECK(model->is_training());
  check_unchanged(*model, before);

  // Target 0 on a model sparsified before (as by training): the channels already zero go, no
  // others.
  const auto again = compress_for_deployment(masked, x, quick().target(0).latency_batches({}));
  CHECK(again.report.parameters_after == r.parameters_after);
  CHECK(again.report.macs_after == r.macs_after);
  CHECK(again.report.channels_removed == r.channels_removed);
}

TEST_CASE("compress_for_deployment: a zoo ResNet through its traced graph, exported",
          "[compress]") {
  torch::manual_seed(22);
  auto model = models::resnet18(10);
  trained_looking(*model);
  model->eval();
  const auto x = torch::randn({1, 3, 32, 32});
  deploy_test::TempDir dir("fasterai_compress");
  const auto file = dir / "resnet18.pt";

  auto result =
      compress_for_deployment(model, x, quick().target(30).latency_batches({}).export_path(file.string()));
  const CompressReport& r = result.report;

  models::ResNet masked(std::dynamic_pointer_cast<models::ResNetImpl>(model->clone()));
  masked->eval();
  Sparsifier<granularity::Filter, method::Local, criteria::L1>(masked, x, SparsifierOptions(30)).prune(30);
  models::ResNet expected(std::dynamic_pointer_cast<models::ResNetImpl>(masked->clone()));
  const PruneReport pruned = Pruner().prune_(expected, x);
  const FoldReport folded = BNFolder().fold_(expected, x);
  CHECK(r.channels_removed == pruned.channels_removed());
  CHECK(r.batch_norms_folded == folded.folded.size());
  CHECK(r.parameters_after == count_parameters(expected));
  CHECK(r.macs_after == count_macs(expected, {3, 32, 32}).total());
  CHECK(r.macs_after < r.macs_before);
  CHECK(r.latency.empty());

  torch::NoGradGuard no_grad;
  const auto other = torch::randn({1, 3, 32, 32});
  CHECK(relative_difference(result.model->forward(other), masked->forward(other)) < 1e-5);
  CHECK(relative_difference(result.inference(other), masked->forward(other)) < 1e-5);
  // The file is the compressed model, and no temporary is left beside it.
  CHECK(r.exported == file.string());
  auto loaded = torch::jit::load(file.string());
  CHECK(relative_difference(loaded.forward({other}).toTensor(), masked->forward(other)) < 1e-5);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path())) ++files;
  CHECK(files == 1);
}

TEST_CASE("compress_for_deployment: int8 calibrates, times and exports the quantized module",
          "[compress][oracle]") {
  torch::manual_seed(23);
  auto model = models::compact_vgg();
  trained_looking(*model);
  model->eval();
  const auto x = torch::randn({1, 1, 28, 28});
  std::vector<torch::Tensor> calibration;
  for (int i = 0; i < 4; ++i) calibration.push_back(torch::randn({8, 1, 28, 28}));
  deploy_test::TempDir dir("fasterai_compress_int8");
  const auto file = dir / "int8.pt";

  auto result = compress_for_deployment(
      model, x, quick().latency_batches({2}).int8(true).calibration(calibration).export_path(file.string()));
  const CompressReport& r = result.report;
  REQUIRE(result.int8);
  CHECK(r.int8);
  REQUIRE(r.latency.size() == 1);
  CHECK(r.latency[0].int8_ms > 0);
  torch::NoGradGuard no_grad;
  const auto fp32 = result.model->forward(x);
  const auto int8 = result.int8->forward({x}).toTensor();
  // Quantization is approximate: close to the fp32 model, not equal (7-bit activations).
  CHECK(relative_difference(int8, fp32) < 0.2);
  CHECK(relative_difference(int8, fp32) > 0);
  auto loaded = torch::jit::load(file.string());
  CHECK(torch::allclose(loaded.forward({x}).toTensor(), int8));
  // Its size is the file's: the int8 tensors are no module's parameters or buffers.
  CHECK(r.int8_bytes == static_cast<std::int64_t>(std::filesystem::file_size(file)));
  CHECK(r.int8_bytes < r.bytes_after);

  // The report says which of fp32 and int8 to serve at each batch size, from its own timings.
  std::ostringstream text;
  text << r;
  const std::string faster = r.latency[0].int8_ms < r.latency[0].compressed_ms ? "int8" : "fp32";
  CHECK(text.str().find("faster of fp32 and int8: batch 2: " + faster + " (") != std::string::npos);
  CHECK(text.str().find("int8 file (bytes)") != std::string::npos);

  // The int8 module behind a module interface: what the walkthrough's table times and validates.
  TorchScriptModule held(*result.int8);
  CHECK(held->parameters().empty());
  torch::nn::Sequential in_sequential(held);
  CHECK(torch::equal(in_sequential->forward(x), int8));
  CHECK(measure_latency(in_sequential, x, LatencyOptions().warmup(0).runs(1)).median_ms > 0);

  // The exported int8 file is what ships (the walkthrough's export): Python runs it.
  if (deploy_test::python().empty()) FASTERAI_SKIP("python3 with torch not found: Python's torch.jit.load not tried");
  const auto xs = torch::randn({3, 1, 28, 28});
  const auto expected = result.int8->forward({xs}).toTensor();
  const auto python = deploy_test::python_forward(dir, "int8.pt", xs);
  INFO(deploy_test::log(dir));
  REQUIRE(python.status == 0);
  const auto y = python.output.view(expected.sizes());
  // Python may pack the weights for another int8 engine (its default), whose rounding can move
  // an output by a quantization step; the same model within that.
  CHECK(relative_difference(y, expected) < 0.05);
}

TEST_CASE("compress_for_deployment: bad options are refused before any work, the model and "
          "the files unchanged", "[compress][bad_input]") {
  torch::manual_seed(24);
  auto model = models::compact_vgg();
  model->train();
  const auto before = snapshot(*model);
  const auto x = torch::randn({1, 1, 28, 28});
  deploy_test::TempDir dir("fasterai_compress_bad");
  const auto existing = dir / "existing.pt";
  std::ofstream(existing) << "keep me";

  const auto fails = [&](const torch::Tensor& example, const CompressOptions& options, const std::string& argument,
                         const std::string& allowed) {
    CHECK_THROWS_WITH(compress_for_deployment(model, example, options),
                      Catch::Contains("fasterai::compress_for_deployment") &&
                          Catch::Contains("'" + argument + "'") && Catch::Contains(allowed));
  };
  fails(x, quick().target(100), "target", "[0, 100)");
  fails(x, quick().target(-1), "target", "[0, 100)");
  fails(torch::Tensor(), quick(), "example", "a batch of inputs");
  fails(torch::randn({28}), quick(), "example", "[N, ...]");
  fails(x, quick().round_to(0), "round_to", ">= 1");
  fails(x, quick().int8(true), "calibration", "when int8 is on");
  fails(x, quick().latency_batches({1, 0}), "latency_batches", ">= 1");
  fails(x, quick().latency_rounds(0), "latency_rounds", ">= 1");
  fails(x, quick().export_path((dir / "missing" / "m.pt").string()), "export_path", "existing directory");
  fails(x, quick().export_path(dir.path().string()), "export_path", "this is a directory");

  CHECK(model->is_training());
  check_unchanged(*model, before);
  // Nothing was written: the directory holds the file it held, as it was.
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path())) ++files;
  CHECK(files == 1);
  std::ifstream in(existing);
  std::string text;
  std::getline(in, text);
  CHECK(text == "keep me");
}
