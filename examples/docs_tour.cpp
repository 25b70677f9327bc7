// The code blocks of docs/ outside the guide (whose blocks are in api_tour.cpp), compiled and run
// in CI: every region between `// [name]` and `// [end]` appears verbatim in a page of docs/,
// checked by the `snippets/...` tests. The regions run on small stand-ins (a 256-image subset of
// Fashion-MNIST, few epochs) so that the whole tour takes about a minute; the pages say what a
// real run would use.
//
//   docs_tour                                              every page but data-parallel training
//   scripts/launch.sh --nproc 2 --master-port auto -- docs_tour --distributed
#include <fasterai/compress.hpp>
#include <fasterai/deploy.hpp>
#include <fasterai/dist.hpp>
#include <fasterai/fasterai.hpp>
#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/quant.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string_view>

#include "common/small_resnet.hpp"

namespace {

using fasterai::data::Batches;

// A user's layer kind for docs/graph.md: a Linear whose rows are scaled by a learned factor.
struct ScaledLinearImpl : torch::nn::Module {
  std::int64_t in_features, out_features;
  torch::Tensor weight, bias, scale;
  ScaledLinearImpl(std::int64_t in, std::int64_t out) : in_features(in), out_features(out) {
    weight = register_parameter("weight", torch::randn({out, in}) / std::sqrt(double(in)));
    bias = register_parameter("bias", torch::zeros({out}));
    scale = register_parameter("scale", torch::ones({out}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::addmm(bias, x, (weight * scale.unsqueeze(1)).t());
  }
};
TORCH_MODULE(ScaledLinear);

fasterai::data::FashionMNISTOptions small_subset() {
  return fasterai::data::FashionMNISTOptions().subset(256).subset_seed(0);
}
Batches train_batches() {
  using namespace fasterai::data;
  return make_batches(FashionMNIST(Split::Train, small_subset()), LoaderOptions(64).shuffle(true));
}
Batches valid_batches() {
  using namespace fasterai::data;
  return make_batches(FashionMNIST(Split::Test, small_subset()), 256);
}
fasterai::Learner make_learner(torch::nn::Sequential model) {
  return fasterai::Learner(model, train_batches(), valid_batches(), fasterai::LearnerOptions().seed(0));
}

void toolbox_page() {
  // [toolbox_aliases]
  namespace g = fasterai::granularity;
  namespace m = fasterai::method;
  namespace c = fasterai::criteria;
  // [end]
  {
    auto model = fasterai::models::compact_vgg();
    // [criteria]
    // One global threshold over single weights, every layer judged relative to itself.
    fasterai::Sparsifier<g::Weight, m::Global, c::LAMP<g::Weight>> lamp(model,
        fasterai::SparsifierOptions(80).include_linear(true));
    lamp.prune(80);

    // Remove the most replaceable 30% of each conv's filters.
    fasterai::Sparsifier<g::Filter, m::Local, c::FPGM> fpgm(model);
    fpgm.prune(30);

    fasterai::Sparsifier<g::Filter, m::Local, c::L2<g::Filter>> l2(model);
    // [end]
  }
  {
    auto model = fasterai::models::compact_vgg();
    auto learn = make_learner(model);
    // [slimming_and_second_order]
    // Network slimming: one threshold on |γ| over every conv's BatchNorm.
    fasterai::Sparsifier<g::Filter, m::Global, c::BNScale> slim(model,
        fasterai::SparsifierOptions().normalize(false));
    slim.prune(50);

    // Hessian-free second-order scores, accumulated while fine-tuning.
    fasterai::Sparsifier<g::Filter, m::Local, c::SecondOrderTaylor, fasterai::schedule::Gradual> obd(
        model, fasterai::SparsifierOptions(40));
    fasterai::SparsifyCallback sparsify(obd);   // or obd.step(progress) after each backward()
    learn.fit(2, 1e-4, {sparsify});
    // [end]
  }
  {
    auto model = fasterai::models::compact_vgg();
    auto learn = make_learner(model);
    // [schedules]
    fasterai::Sparsifier<g::Weight, m::Global, c::L1, fasterai::schedule::DSD> dsd(model,
        fasterai::SparsifierOptions(50).include_linear(true), fasterai::schedule::DSD{0.3, 0.8});
    fasterai::SparsifyCallback sparsify(dsd);
    learn.fit(10, 1e-3, {sparsify});  // dense, then 50% sparse, then dense

    auto one_cycle = fasterai::make_sparsifier(model, {"weight", "global", "l1", "one_cycle"},
                                               fasterai::SparsifierOptions(80));
    // [end]
  }
  {
    auto model = fasterai::models::compact_vgg();
    auto learn = make_learner(model);
    auto x = torch::randn({64, 1, 28, 28});
    auto y = torch::randint(10, {64});
    // [regularization]
    // As a Learner callback: network slimming, then prune by |γ|.
    fasterai::Regularizer slimming(model,
        fasterai::RegularizerOptions(1e-3).penalty(fasterai::Penalty::BNScale));
    learn.fit_one_cycle(5, 0.05, {slimming});
    fasterai::Sparsifier<g::Filter, m::Global, c::BNScale> prune(model,
        fasterai::SparsifierOptions().normalize(false));
    prune.prune(50);

    // In a hand-written loop: the same term, built once.
    fasterai::SparsityPenalty group_lasso(model, fasterai::Penalty::GroupLasso);
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y) + 1e-3 * group_lasso();
    auto norms = group_lasso.unit_norms();  // one per unit: watch them fall
    // [end]
    loss.backward();
  }
  {
    auto model = fasterai::models::compact_vgg();
    make_learner(model).fit_one_cycle(2, 5e-3);
    auto valid = valid_batches();
    // [sensitivity]
    // valid: fasterai::data::Batches (e.g. data::make_batches(FashionMNIST(Split::Test), 512))
    auto table = fasterai::sensitivity<g::Filter, c::L1>(model, valid,
        fasterai::SensitivityOptions().sparsities({10, 30, 50, 70, 90}));
    std::cout << table;                    // drop of the accuracy per unit and sparsity
    table.write_csv("sensitivity.csv");    // layers,sparsity,removed,accuracy,drop,macs_removed

    auto targets = fasterai::layer_targets_for_budget(table, /*parameters=*/50'000);
    // or half the MACs of one example, taken off by the Pruner after the sparsifier:
    // auto targets = fasterai::layer_targets_for_budget(table, table.macs / 2, fasterai::Budget::Macs);
    fasterai::Sparsifier<g::Filter, m::Local, c::L1> s(model,
        fasterai::SparsifierOptions(0).layer_targets(targets));
    s.step(1.0);                           // every layer at its own target
    // [end]
    std::remove("sensitivity.csv");
  }
  {
    auto model = fasterai::models::compact_vgg();
    auto learn = make_learner(model);
    // [lottery_ticket]
    fasterai::LotteryTicket<g::Weight, m::Global, c::L1> ticket(model,
        fasterai::SparsifierOptions(90).include_linear(true), /*rounds=*/3);   // saves the weights
    for (int round = 0; round <= ticket.rounds(); ++round) {
      if (round > 0) ticket.next_round();          // prune, then rewind the survivors
      auto keep = fasterai::SparsifyCallback(ticket.sparsifier());  // masks stay in force
      learn.fit_one_cycle(5, 1e-3, {keep});        // or a hand-written loop: mask_gradients(),
    }                                              // optimizer.step(), apply()
    // [end]
  }
  {
    auto student = fasterai::models::compact_vgg();
    auto teacher = fasterai::models::compact_vgg(fasterai::models::CompactVGGOptions().widths({32, 64, 128}));
    auto example_batch = torch::randn({8, 1, 28, 28});
    auto learn = make_learner(student);
    fasterai::KnowledgeDistillation kd(teacher, /*temperature=*/3.0, /*alpha=*/0.5);
    torch::optim::Adam optimizer(student->parameters(), 1e-3);
    auto x = torch::randn({64, 1, 28, 28});
    auto y = torch::randint(10, {64});
    // [feature_distillation]
    fasterai::FeatureDistillation fd(student, teacher, example_batch,
        {fasterai::fitnet_hint("features.9", "features.9"),           // weight 1
         fasterai::attention_hint("features.3", "features.3")});      // weight 500
    learn.fit_one_cycle(5, 1e-3, {kd, fd});   // after KnowledgeDistillation, which rescales the loss
    // hand-written loop:
    optimizer.add_param_group(torch::optim::OptimizerParamGroup(fd.parameters()));   // the adapters
    auto out = fasterai::forward_with_features(student, x, fd.student_layers());
    auto loss = torch::nn::functional::cross_entropy(out.output, y) + fd.loss(x, out.features);
    // [end]
    loss.backward();
    optimizer.step();
  }
  {
    auto model = fasterai::models::compact_vgg();
    make_learner(model).fit_one_cycle(1, 5e-3);
    auto train = train_batches();
    auto valid = valid_batches();
    // [qat]
    fasterai::QuantizationAwareTraining qat(model);      // Calibrator's plan; `model` is unchanged
    fasterai::Learner learn(qat.model(), train, valid);   // the fake-quantized model is the one trained
    learn.fit(2, 1e-4, {qat.freeze_observers_at(0.8)});   // optional: ranges stop moving at 80%
    torch::nn::Sequential int8 = qat.convert();           // Calibrator::convert with the trained ranges
    // [end]
    std::cout << "QAT int8 output " << int8->forward(torch::randn({1, 1, 28, 28})).sizes() << "\n";
  }
  {
    example::SmallResNet model;   // a module with its own forward: residual additions
    auto example = torch::randn({1, 1, 28, 28});
    auto train = train_batches();
    auto valid = valid_batches();
    // [traced_qat]
    fasterai::TracedQuantizationAwareTraining qat(model, example);   // any traceable module, unchanged
    fasterai::Learner learn(qat.model(), train, valid);              // its traced graph, fake-quantized
    learn.fit(2, 1e-4, {qat.freeze_observers_at(0.8)});
    torch::jit::Module int8 = qat.convert();                         // as TracedCalibrator::convert
    // [end]
    std::cout << "traced QAT int8 output " << int8.forward({example}).toTensor().sizes() << "\n";
  }
}

void deployment_page() {
  auto pruned = fasterai::models::compact_vgg();
  fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1>(pruned)
      .prune(50);
  fasterai::Pruner().prune_(pruned, torch::randn({1, 1, 28, 28}));
  {
    // [resize_on_load]
    fasterai::save_state_dict(pruned, "pruned.pt");
    auto model = fasterai::models::compact_vgg();                 // the original architecture
    fasterai::load_state_dict(model, "pruned.pt", fasterai::LoadOptions().resize(true));
    // [end]
    std::remove("pruned.pt");
    // [torchscript]
    torch::jit::Module exported = fasterai::to_torchscript(model, torch::randn({1, 1, 28, 28}));
    exported.save("model.pt");
    // [end]
    std::remove("model.pt");
  }
  {
    // [compress]
    auto model = fasterai::models::resnet18(10);          // trained weights loaded
    auto result = fasterai::compress_for_deployment(model, torch::randn({1, 3, 64, 64}),
        fasterai::CompressOptions().target(50).fold_bn(true).int8(false).export_path("resnet18_pruned.pt"));
    std::cout << result.report;                           // the table: original, compressed, ratio
    torch::Tensor y = result.inference(torch::randn({1, 3, 64, 64}));
    // [end]
    std::remove("resnet18_pruned.pt");
  }
}

void quantization_page() {
  auto model = fasterai::models::compact_vgg();
  auto learner = make_learner(model);
  learner.fit_one_cycle(1, 5e-3);
  std::vector<torch::Tensor> batches{torch::randn({16, 1, 28, 28}), torch::randn({16, 1, 28, 28})};
  {
    // [int8_sequential]
    // Dynamic: Linear weights int8, activations quantized on the fly; no data needed.
    auto q = fasterai::quantize_dynamic(model);                       // `model` is left as it was
    auto some = fasterai::quantize_dynamic(model, fasterai::DynamicQuantOptions().layers({"classifier.0"}));

    // Static: Conv2d/Linear chains int8 end to end, calibrated on your batches.
    fasterai::Calibrator calibrator(model);                           // folds BN, fuses ReLU, plans chains
    calibrator.observe(learner.valid_data(), /*max_batches=*/16);     // or any range of tensors / Examples
    auto int8 = calibrator.convert();
    auto same = fasterai::quantize_static(model, batches);            // both steps in one call
    fasterai::Calibrator<fasterai::quant::PercentileObserver> clipped(model, {}, fasterai::quant::PercentileObserver(99.99));
    // [end]
  }
  {
    auto example = torch::randn({1, 1, 28, 28});
    // [traced_calibrator]
    fasterai::TracedCalibrator calibrator(model, example);          // any traceable module; `model` unchanged
    calibrator.observe(learner.valid_data(), /*max_batches=*/16);   // or any range of tensors / Examples
    torch::jit::Module int8 = calibrator.convert();                  // forward, save, torch::jit::load, Python
    auto same = fasterai::quantize_traced(model, example, batches);  // both steps in one call
    // [end]
  }
}

struct NetImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, head{nullptr};
  ScaledLinear custom{nullptr};
  NetImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 8));
    custom = register_module("custom", ScaledLinear(8, 5));
    head = register_module("head", torch::nn::Linear(5, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::relu(custom(torch::relu(fc1(x))))); }
};
TORCH_MODULE(Net);

void graph_page() {
  // [layer_rule]
  fasterai::LayerRule rule;
  rule.kind = "ScaledLinear";
  rule.role = fasterai::LayerRole::Producer;
  rule.channel_dim = -1;                              // tokens: channels last
  rule.tensors = {{"weight", 0, 1}, {"bias", 0, -1}, {"scale", 0, -1, /*decides_zero=*/false}};
  rule.set_widths = [](torch::nn::Module& m, std::int64_t out, std::int64_t in, std::int64_t) {
    auto& layer = dynamic_cast<ScaledLinearImpl&>(m);
    layer.out_features = out, layer.in_features = in;
  };
  fasterai::register_layer<ScaledLinearImpl>(rule);  // before tracing; unregistered: a barrier
  // [end]
  Net net;
  auto x = torch::randn({4, 6});
  fasterai::Sparsifier<fasterai::granularity::Filter, fasterai::method::Local, fasterai::criteria::L1>(
      net, x, fasterai::SparsifierOptions(40).include_linear(true)).prune(40);
  const auto report = fasterai::Pruner().prune_(net, x);
  std::cout << "ScaledLinear after pruning: " << net->custom->weight.sizes() << ", "
            << report.channels_removed() << " channels removed\n";
}

void security_page() {
  auto model = fasterai::models::compact_vgg();
  const std::string path = "security_tour.pt";
  fasterai::save_state_dict(model, path);
  // [read_limits]
  auto state = fasterai::read_state_dict(path, fasterai::ReadLimits().max_tensor_bytes(std::int64_t{64} << 30));
  fasterai::load_state_dict(model, state);  // the same all-or-nothing checks as load_state_dict(model, path)
  // [end]
  std::remove(path.c_str());
}

// Run by scripts/launch.sh, one process per rank.
void distributed_page() {
  using namespace fasterai;
  namespace dist = fasterai::dist;
  auto model = models::compact_vgg();
  auto teacher = models::compact_vgg(models::CompactVGGOptions().widths({32, 64, 128}));
  KnowledgeDistillation kd(teacher, /*temperature=*/3.0, /*alpha=*/0.5);
  Sparsifier<granularity::Weight, method::Global, criteria::L1, schedule::Gradual> sparsifier(
      model, SparsifierOptions(50).include_linear(true));
  SparsifyCallback sparsify(sparsifier);
  auto train_set = data::FashionMNIST(data::Split::Train, small_subset());
  auto valid_set = data::FashionMNIST(data::Split::Test, small_subset());
  const int epochs = 2;
  const double lr = 1e-3;
  std::shared_ptr<dist::ProcessGroup> shared_group;
  {
    // [data_parallel]
    // train_set, valid_set: e.g. data::FashionMNIST(data::Split::Train) and (data::Split::Test)
    auto group = std::make_shared<dist::ProcessGroup>(dist::ProcessGroup::from_environment(
        dist::ProcessGroupOptions().timeout(std::chrono::minutes(5))));   // torchrun's variables
    auto train = dist::shard(train_set, 64, *group, dist::ShardOptions().seed(42));   // 64 per rank
    auto valid = dist::shard(valid_set, 512, *group, dist::ShardOptions().shuffle(false).pad(false));
    Learner learn(model, train, valid,
                  LearnerOptions().parallel(std::make_shared<dist::DataParallel>(group)));
    learn.fit_one_cycle(3, 5e-3, {kd, sparsify});          // rank 0 prints the table
    // [end]
    shared_group = group;
  }
  auto group = shared_group;
  auto valid = dist::shard(valid_set, 512, *group, dist::ShardOptions().shuffle(false).pad(false));
  // [checkpoint]
  const auto done = dist::checkpoint_epoch("run.ckpt");              // 0 on the first start
  auto train = dist::shard(train_set, 64, *group, dist::ShardOptions().seed(0).first_epoch(done));
  Learner learn(model, train, valid, LearnerOptions().parallel(std::make_shared<dist::DataParallel>(group)));
  dist::Checkpoint checkpoint("run.ckpt", group->is_main());
  checkpoint.track(sparsifier);
  if (done > 0) dist::resume(learn, "run.ckpt", sparsify, sparsifier);
  learn.fit(epochs, lr, {sparsify, checkpoint});
  // [end]
  group->barrier("docs_tour: the checkpoint is written");
  if (group->is_main()) std::remove("run.ckpt");
}

}  // namespace

int main(int argc, char** argv) {
  torch::manual_seed(0);
  if (argc == 2 && std::string_view(argv[1]) == "--distributed") {
    if (!fasterai::dist::backend_available(fasterai::dist::Backend::Gloo)) {
      std::cout << "docs_tour --distributed: SKIPPED, this LibTorch has no Gloo backend\n";
      return 77;  // CTest's SKIP_RETURN_CODE
    }
    distributed_page();
    return 0;
  }
  if (argc != 1) {
    std::cerr << "usage: docs_tour [--distributed]  (the second under scripts/launch.sh)\n";
    return 2;
  }
  toolbox_page();
  deployment_page();
  quantization_page();
  graph_page();
  security_page();
  std::cout << "docs_tour: every snippet ran\n";
  return 0;
}
