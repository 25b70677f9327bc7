// Quantized models through TorchScript export (deploy/torchscript.hpp): while traced, the int8
// layers pack their weights inside the forward, so the exported module holds the int8 weights
// as attributes and packs them where it runs.
#include "catch.hpp"

#include <cstdio>
#include <string>

#include <torch/script.h>

#include <fasterai/deploy/torchscript.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/quant/calibrator.hpp>
#include <fasterai/quant/quantize_dynamic.hpp>

using namespace fasterai;

TEST_CASE("Quantized models export to TorchScript and reload with the same outputs", "[quant][export]") {
  const auto engines = quant::available_engines();
  // One engine for every layer, set globally when the exported module runs (it packs under the
  // engine it finds), so that its kernels are the C++ model's.
  const std::string engine = engines.front();
  torch::manual_seed(30);
  auto model = models::compact_vgg();
  model->eval();
  std::vector<torch::Tensor> batches{torch::randn({8, 1, 28, 28}), torch::randn({8, 1, 28, 28})};
  const auto x = torch::randn({3, 1, 28, 28});
  for (bool dynamic : {true, false}) {
    INFO((dynamic ? "dynamic" : "static") << ", engine " << engine);
    auto q = dynamic ? quantize_dynamic(model, DynamicQuantOptions().engine(engine))
                     : quantize_static(model, batches,
                                       StaticQuantOptions().engines(quant::QuantEngines().linear(engine).conv(engine)));
    torch::Tensor expected;
    {
      c10::InferenceMode inference;
      expected = q->forward(x);
    }
    quant::EngineGuard global(quant::engine_from_name("test", "engine", engine));
    auto exported = to_torchscript(q, x);  // its own check runs the exported module: same engine
    const std::string path = dynamic ? "quant_dynamic_export.pt" : "quant_static_export.pt";
    exported.save(path);
    auto loaded = torch::jit::load(path);
    std::remove(path.c_str());
    // The graph holds the int8 operators, not fp32 ones.
    const std::string graph = loaded.get_method("forward").graph()->toString();
    CHECK(graph.find(dynamic ? "quantized::linear_dynamic" : "quantized::conv2d_relu") != std::string::npos);
    CHECK(graph.find("aten::linear") == std::string::npos);
    torch::NoGradGuard no_grad;
    CHECK(torch::equal(loaded.forward({x}).toTensor(), expected));
  }
}
