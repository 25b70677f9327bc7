#include "catch.hpp"

#include <fasterai/data/fashion_mnist.hpp>
#include <fasterai/models/compact_vgg.hpp>
#include <fasterai/train/learner.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;
namespace F = torch::nn::functional;

namespace {

LearnerOptions quiet(std::ostream& out) {
  return LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU);
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

struct Thrower : Callback {
  std::string hook;
  int epoch, iter;
  bool validation;
  Thrower(std::string h, int e, int i, bool v = false) : hook(std::move(h)), epoch(e), iter(i), validation(v) {}
  std::string name() const override { return "Thrower"; }
  void maybe(const char* h, TrainingState& s) {
    if (hook == h && s.epoch == epoch && s.iter == iter && s.training != validation)
      throw std::runtime_error("thrown on purpose");
  }
  void before_fit(TrainingState& s) override { maybe("before_fit", s); }
  void after_pred(TrainingState& s) override { maybe("after_pred", s); }
  void after_loss(TrainingState& s) override { maybe("after_loss", s); }
  void before_step(TrainingState& s) override { maybe("before_step", s); }
  void after_step(TrainingState& s) override { maybe("after_step", s); }
  void after_epoch(TrainingState& s) override { maybe("after_epoch", s); }
};

}  // namespace

TEST_CASE("Learner trains a small model and prints the article's table", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(512, 32, 1), fixtures::blobs(256, 64, 2), quiet(out));
  const auto before = learn.validate();
  const auto records = learn.fit(3, 1e-2);
  REQUIRE(records.size() == 3);
  CHECK(learn.history().size() == 3);
  CHECK(records.back().metrics.at(0) > 0.95);
  CHECK(records.back().valid_loss < before.loss);
  CHECK(records.back().train_loss < records.front().train_loss);

  const auto text = lines(out.str());
  REQUIRE(text.size() == 4);
  CHECK(text[0] == "epoch  train_loss  valid_loss  accuracy  time");
  const std::regex row(R"(\d      \d\.\d{6}    \d\.\d{6}    \d\.\d{6}  \d\d:\d\d)");
  for (int i = 1; i <= 3; ++i) {
    CAPTURE(text[static_cast<size_t>(i)]);
    CHECK(std::regex_match(text[static_cast<size_t>(i)], row));
    CHECK(text[static_cast<size_t>(i)].rfind(std::to_string(i - 1), 0) == 0);
  }
  // The fit leaves the model in the mode it found it in.
  CHECK(model->is_training());
}

TEST_CASE("Learner::validate: mean loss and accuracy over the examples, in eval mode",
          "[learner]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(2, 3), torch::nn::Dropout(0.9));
  std::ostringstream out;
  const auto valid = fixtures::blobs(100, 30, 3);  // batches of 30, 30, 30, 10
  Learner learn(model, {}, valid, quiet(out));
  model->train();
  const auto result = learn.validate();
  CHECK(model->is_training());
  CHECK(result.examples == 100);

  torch::NoGradGuard no_grad;
  model->eval();
  std::vector<torch::Tensor> xs, ys;
  for (const auto& b : valid) xs.push_back(b.data), ys.push_back(b.target);
  const auto pred = model->forward(torch::cat(xs));
  const auto y = torch::cat(ys);
  CHECK(result.loss == Approx(F::cross_entropy(pred, y).item<double>()).epsilon(1e-5));
  CHECK(result.metric("accuracy") ==
        Approx(pred.argmax(1).eq(y).to(torch::kFloat).mean().item<double>()));
  CHECK_THROWS_WITH(result.metric("f1"), Contains("f1") && Contains("accuracy"));
}

TEST_CASE("Learner::fit is the hand-written LibTorch loop", "[learner]") {
  // Same initial weights, same batches, same optimizer: the same weights after one epoch.
  torch::manual_seed(3);
  auto a = fixtures::mlp();
  auto b = fixtures::mlp();
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  }
  const auto data = fixtures::blobs(128, 16, 4);
  std::ostringstream out;
  Learner learn(a, data, {}, quiet(out).optimizer(OptimizerKind::SGD).momentum(0.9));
  learn.fit(1, 0.05);

  torch::optim::SGD sgd(b->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
  for (const auto& batch : data) {
    sgd.zero_grad();
    auto loss = F::cross_entropy(b->forward(batch.data), batch.target);
    loss.backward();
    sgd.step();
  }
  for (size_t i = 0; i < a->parameters().size(); ++i)
    CHECK(torch::allclose(a->parameters()[i], b->parameters()[i], 1e-6, 1e-7));
}

TEST_CASE("Learner calls the hooks in fastai's order", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  fixtures::Recorder rec;
  Learner learn(model, fixtures::blobs(4, 2, 1), fixtures::blobs(2, 2, 2), quiet(out));
  learn.fit(2, 1e-3, {rec});
  std::vector<std::string> expected{"before_fit:t:0:0"};
  for (int e = 0; e < 2; ++e) {
    const auto E = std::to_string(e);
    expected.push_back("before_epoch:t:" + E + ":0");
    for (int i = 0; i < 2; ++i) {
      const auto I = ":t:" + E + ":" + std::to_string(i);
      for (const char* h : {"before_batch", "after_pred", "after_loss", "before_step", "after_step",
                            "after_batch"})
        expected.push_back(h + I);
    }
    for (const char* h : {"before_batch", "after_pred", "after_loss", "after_batch"})
      expected.push_back(std::string(h) + ":v:" + E + ":0");
    expected.push_back("after_epoch:t:" + E + ":1");
  }
  expected.push_back("after_fit:t:1:1");
  CHECK(rec.events == expected);

  // Callbacks given to fit are for that fit; add_callback's stay.
  rec.events.clear();
  learn.fit(1, 1e-3);
  CHECK(rec.events.empty());
  learn.add_callback(rec);
  learn.fit(1, 1e-3);
  CHECK(rec.events.size() == 1 + 1 + 2 * 6 + 4 + 1 + 1);
  CHECK(learn.remove_callback(rec));
}

TEST_CASE("Learner callbacks can replace the loss", "[learner]") {
  struct ZeroLoss : Callback {
    void after_loss(TrainingState& s) override { s.loss = s.loss * 0.0; }
  } zero;
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(64, 16, 1), {}, quiet(out).optimizer(OptimizerKind::SGD));
  const auto before = fixtures::snapshot(*model);
  const auto records = learn.fit(1, 0.1, {zero});
  CHECK(fixtures::same(before, fixtures::snapshot(*model)));
  CHECK(records[0].train_loss == 0.0);
  CHECK(std::isnan(records[0].valid_loss));  // no validation data
}

TEST_CASE("fit_one_cycle follows the one-cycle schedule batch by batch", "[learner]") {
  struct Hyper : Callback {
    std::vector<double> lr, beta1, pct;
    void before_step(TrainingState& s) override {
      const auto& o = static_cast<torch::optim::AdamOptions&>(s.optimizer->param_groups()[0].options());
      lr.push_back(o.lr());
      beta1.push_back(std::get<0>(o.betas()));
      pct.push_back(s.pct_train());
    }
  } hyper;
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(80, 10, 1), {}, quiet(out));
  learn.fit_one_cycle(2, 1e-2, {hyper});
  REQUIRE(hyper.lr.size() == 16);
  const OneCycle sched(1e-2);
  for (size_t i = 0; i < 16; ++i) {
    CHECK(hyper.pct[i] == Approx(double(i) / 16));
    CHECK(hyper.lr[i] == Approx(sched.lr(double(i) / 16)));
    CHECK(hyper.beta1[i] == Approx(sched.momentum(double(i) / 16)));
  }
  CHECK(hyper.lr.front() == Approx(1e-2 / 25));
  // The momentum is put back for later fits.
  const auto& o = static_cast<torch::optim::AdamOptions&>(learn.optimizer().param_groups()[0].options());
  CHECK(std::get<0>(o.betas()) == 0.9);
  hyper.lr.clear();
  learn.fit(1, 3e-4, {hyper});
  CHECK(hyper.lr == std::vector<double>(8, 3e-4));
}

TEST_CASE("Learner's seed makes fits repeat exactly", "[learner]") {
  // Shuffled batches from a data loader and dropout both draw from the seeded generators.
  struct Points : torch::data::datasets::Dataset<Points> {
    std::vector<torch::data::Example<>> all = fixtures::blobs(96, 1, 5);
    torch::data::Example<> get(size_t i) override {
      return {all[i].data.squeeze(0), all[i].target.squeeze(0)};
    }
    c10::optional<size_t> size() const override { return all.size(); }
  };
  auto run = [](std::optional<std::uint64_t> seed) {
    torch::manual_seed(11);
    auto model = torch::nn::Sequential(torch::nn::Linear(2, 32), torch::nn::ReLU(),
                                       torch::nn::Dropout(0.3), torch::nn::Linear(32, 3));
    std::ostringstream out;
    Learner learn(model, data::make_batches(Points(), data::LoaderOptions(8).shuffle(true)), {},
                  LearnerOptions().out(&out).progress(Progress::None).seed(seed));
    torch::manual_seed(static_cast<std::uint64_t>(std::random_device{}()));
    learn.fit(2, 1e-2);
    return fixtures::snapshot(*model);
  };
  CHECK(fixtures::same(run(7), run(7)));
  CHECK_FALSE(fixtures::same(run(7), run(8)));
}

TEST_CASE("Learner writes a CSV log: created by the first fit, appended by later ones",
          "[learner]") {
  const auto path = std::filesystem::temp_directory_path() /
                    ("fasterai-learner-" + std::to_string(::getpid()) + ".csv");
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  {
    Learner learn(model, fixtures::blobs(32, 16, 1), fixtures::blobs(16, 16, 2),
                  quiet(out).csv_log(path.string()));
    learn.fit(2, 1e-3);
    learn.fit(1, 1e-3);
  }
  std::ifstream in(path);
  std::vector<std::string> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(line);
  std::filesystem::remove(path);
  REQUIRE(rows.size() == 4);
  CHECK(rows[0] == "epoch,train_loss,valid_loss,accuracy,time");
  const std::regex row(R"(\d,\d\.\d{6},\d\.\d{6},\d\.\d{6},\d+\.\d{3})");
  for (size_t i = 1; i < 4; ++i) CHECK(std::regex_match(rows[i], row));
  CHECK(rows[3].rfind("0,", 0) == 0);  // a new fit counts epochs from 0 again

  Learner bad(model, fixtures::blobs(32, 16, 1), {}, quiet(out).csv_log("/no/such/dir/log.csv"));
  const auto before = fixtures::snapshot(*model);
  CHECK_THROWS_WITH(bad.fit(1, 1e-3), Contains("csv_log") && Contains("/no/such/dir/log.csv"));
  CHECK(fixtures::same(before, fixtures::snapshot(*model)));
}

TEST_CASE("Learner shows progress as plain lines or as a bar", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream lines_out, bar_out;
  Learner by_lines(model, fixtures::blobs(64, 4, 1), fixtures::blobs(8, 4, 2),
                   LearnerOptions().out(&lines_out).progress(Progress::Lines));
  by_lines.fit(1, 1e-3);
  const auto text = lines(lines_out.str());
  REQUIRE(text.size() == 5);  // header, three quarters, the row
  CHECK_THAT(text[1], Contains("epoch 0 train 4/16 batches, loss ") && Contains("elapsed"));
  CHECK_THAT(text[3], Contains("12/16"));
  CHECK(lines_out.str().find('\r') == std::string::npos);

  Learner by_bar(model, fixtures::blobs(64, 4, 1), fixtures::blobs(8, 4, 2),
                 LearnerOptions().out(&bar_out).progress(Progress::Bar));
  by_bar.fit(1, 1e-3);
  CHECK_THAT(bar_out.str(), Contains("\repoch 0/1 train |") && Contains("16/16") &&
                                Contains("epoch  train_loss"));
  // Auto on a string stream (not a terminal) is plain lines.
  std::ostringstream auto_out;
  Learner by_auto(model, fixtures::blobs(64, 4, 1), {}, LearnerOptions().out(&auto_out));
  by_auto.fit(1, 1e-3);
  CHECK(auto_out.str().find('\r') == std::string::npos);
  CHECK_THAT(auto_out.str(), Contains("epoch 0 train 8/16"));
}

TEST_CASE("Learner takes other losses, metrics and optimizers", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  auto nll = [](const torch::Tensor& pred, const torch::Tensor& y) {
    return F::nll_loss(torch::log_softmax(pred, 1), y);
  };
  Metric error{"error_rate", [](const torch::Tensor& p, const torch::Tensor& y) {
                 return p.argmax(1).ne(y).to(torch::kFloat).mean();
               }};
  Learner learn(model, fixtures::blobs(256, 32, 1), fixtures::blobs(64, 32, 2),
                quiet(out).loss(nll).metrics({accuracy(), error}).optimizer_factory(
                    [](std::vector<torch::Tensor> p) {
                      return std::make_unique<torch::optim::RMSprop>(
                          std::move(p), torch::optim::RMSpropOptions(1e-2));
                    }));
  CHECK(dynamic_cast<torch::optim::RMSprop*>(&learn.optimizer()) != nullptr);
  const auto r = learn.fit_one_cycle(3, 1e-2).back();
  REQUIRE(r.metrics.size() == 2);
  CHECK(r.metrics[0] + r.metrics[1] == Approx(1.0));
  CHECK(r.metrics[0] > 0.9);
  CHECK_THAT(out.str(), Contains("accuracy  error_rate  time"));
}

TEST_CASE("A NaN training loss stops the fit before its step, naming the batch", "[learner]") {
  // Batches of 16 from 64 examples: 4 per epoch, in order, at a constant learning rate. The
  // loss turns NaN at the 5th batch (epoch 1, batch 0): the weights must be those of a fit of
  // one epoch (4 steps) from the same start.
  auto run = [](int epochs, int nan_at, bool stop, std::vector<torch::Tensor>* weights) {
    torch::manual_seed(0);
    auto model = fixtures::mlp();
    std::ostringstream out;
    int calls = 0;
    auto options = quiet(out).optimizer(OptimizerKind::SGD).stop_on_nan(stop).loss(
        [&calls, nan_at](const torch::Tensor& pred, const torch::Tensor& target) {
          auto loss = torch::nn::functional::cross_entropy(pred, target);
          return ++calls == nan_at ? loss * std::numeric_limits<float>::quiet_NaN() : loss;
        });
    Learner learn(model, fixtures::blobs(64, 16, 2), {}, options);
    std::string error;
    try {
      learn.fit(epochs, 0.1);
    } catch (const std::exception& e) {
      error = e.what();
    }
    *weights = fixtures::snapshot(*model);
    return error;
  };
  std::vector<torch::Tensor> stopped, one_epoch, trained_on;
  CHECK_THAT(run(2, 5, true, &stopped), Contains("fasterai::Learner::fit") &&
                                            Contains("the training loss is nan") &&
                                            Contains("epoch 1, batch 0") && Contains("stop_on_nan"));
  CHECK(run(1, -1, true, &one_epoch).empty());
  CHECK(fixtures::same(stopped, one_epoch));
  // Not stopping: the NaN step spreads NaN into the weights, and the fit ends without error.
  CHECK(run(2, 5, false, &trained_on).empty());
  bool any_nan = false;
  for (const auto& w : trained_on) any_nan = any_nan || !w.isfinite().all().item<bool>();
  CHECK(any_nan);
}

TEST_CASE("Learner rejects bad arguments before touching the model", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(32, 16, 1), {}, quiet(out));
  const auto before = fixtures::snapshot(*model);
  CHECK_THROWS_WITH(learn.fit(0, 1e-3),
                    Contains("fasterai::Learner::fit") && Contains("'epochs' = 0") && Contains(">= 1"));
  CHECK_THROWS_WITH(learn.fit(1, -1e-3), Contains("'lr' = -0.001") && Contains("positive"));
  CHECK_THROWS_WITH(learn.fit(1, std::nan("")), Contains("'lr'"));
  CHECK_THROWS_WITH(learn.fit_one_cycle(-2, 1e-3), Contains("fit_one_cycle") && Contains("epochs"));
  CHECK_THROWS_WITH(learn.fit_one_cycle(1, 0), Contains("max_lr"));
  CHECK_THROWS_WITH(learn.fit_one_cycle(1, 1e-3, {}, OneCycleOptions().pct_start(2)),
                    Contains("pct_start"));
  CHECK_THROWS_AS(learn.fit(0, 1e-3), argument_error);
  CHECK(fixtures::same(before, fixtures::snapshot(*model)));
  CHECK(out.str().empty());

  Learner no_train(model, {}, fixtures::blobs(8, 8, 1), quiet(out));
  CHECK_THROWS_WITH(no_train.fit(1, 1e-3), Contains("train") && Contains("no batches"));
  CHECK_THROWS_WITH(Learner(model, {}, {}, quiet(out).momentum(1.0)), Contains("momentum"));
  CHECK_THROWS_WITH(Learner(model, {}, {}, quiet(out).weight_decay(-1)), Contains("weight_decay"));
  CHECK_THROWS_WITH(Learner(model, {}, {}, quiet(out).loss(nullptr)), Contains("loss"));
  CHECK_THROWS_WITH(Learner(model, {}, {}, quiet(out).metrics({Metric{"", nullptr}})),
                    Contains("metrics"));
  Learner vector_loss(model, fixtures::blobs(8, 8, 1), {},
                      quiet(out).loss([](const torch::Tensor& p, const torch::Tensor& y) {
                        return F::cross_entropy(p, y, F::CrossEntropyFuncOptions().reduction(torch::kNone));
                      }));
  CHECK_THROWS_WITH(vector_loss.fit(1, 1e-3), Contains("loss") && Contains("[8]") && Contains("scalar"));
  CHECK(fixtures::grads_zero(*model));
}

TEST_CASE("a callback that throws is named, and leaves the model usable", "[learner]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(2, 8), torch::nn::BatchNorm1d(8),
                                     torch::nn::ReLU(), torch::nn::Linear(8, 3));
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(64, 16, 1), fixtures::blobs(32, 16, 2),
                quiet(out).optimizer(OptimizerKind::SGD));
  const auto [hook, epoch, iter, validation] = GENERATE(table<std::string, int, int, bool>({
      {"before_fit", 0, 0, false},
      {"after_pred", 1, 2, false},
      {"after_loss", 0, 1, false},
      {"before_step", 1, 3, false},
      {"after_step", 0, 0, false},
      {"after_pred", 1, 1, true},
      {"after_loss", 0, 0, true},
      {"after_epoch", 1, 2, false},
  }));
  CAPTURE(hook, epoch, iter, validation);
  Thrower thrower(hook, epoch, iter, validation);
  const bool mode = GENERATE(true, false);
  model->train(mode);
  try {
    learn.fit_one_cycle(2, 1e-2, {thrower});
    FAIL("no exception");
  } catch (const callback_error& e) {
    CHECK(e.callback() == "Thrower");
    CHECK(e.hook() == hook);
    CHECK_THAT(e.what(), Contains("Thrower") && Contains(hook) &&
                             Contains("epoch " + std::to_string(epoch)) &&
                             Contains("batch " + std::to_string(iter)) &&
                             Contains("thrown on purpose"));
  }
  CHECK(model->is_training() == mode);
  CHECK(fixtures::grads_zero(*model));
  CHECK(torch::GradMode::is_enabled());
  CHECK_FALSE(learn.state().loss.defined());
  // The momentum one-cycle was cycling is back, and training works again.
  const auto& o = static_cast<torch::optim::SGDOptions&>(learn.optimizer().param_groups()[0].options());
  CHECK(o.momentum() == 0.9);
  const auto r = learn.fit(1, 1e-2);
  CHECK(std::isfinite(r[0].train_loss));
  CHECK(model->is_training() == mode);
}

TEST_CASE("an error in the model's forward leaves the Learner usable", "[learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp();
  std::ostringstream out;
  // Inputs of 3 features for a model that takes 2.
  std::vector<torch::data::Example<>> wrong{{torch::randn({4, 3}), torch::zeros({4}, torch::kLong)}};
  Learner learn(model, fixtures::blobs(16, 8, 1), wrong, quiet(out));
  model->eval();
  CHECK_THROWS(learn.fit(1, 1e-3));
  CHECK_FALSE(model->is_training());
  CHECK(fixtures::grads_zero(*model));
  CHECK_THROWS(learn.validate());
  CHECK_FALSE(model->is_training());
  CHECK(learn.validate(fixtures::blobs(8, 8, 2)).examples == 8);
}

TEST_CASE("Learner trains the compact VGG on a Fashion-MNIST subset", "[learner]") {
  const std::filesystem::path root = "/usr/share/datasets/fashion-mnist";
  if (!std::filesystem::exists(root / "train-images-idx3-ubyte.gz")) {
    FASTERAI_SKIP("Fashion-MNIST is not installed at " << root);
  }
  using namespace fasterai::data;
  torch::manual_seed(0);
  auto model = models::compact_vgg(models::CompactVGGOptions().widths({8, 16, 16}).hidden(64));
  std::ostringstream out;
  Learner learn(
      model,
      make_batches(FashionMNIST(Split::Train, FashionMNISTOptions().subset(512).subset_seed(1)),
                   LoaderOptions(32).shuffle(true)),
      make_batches(FashionMNIST(Split::Test, FashionMNISTOptions().subset(256).subset_seed(1)), 128),
      quiet(out).seed(0));
  const auto records = learn.fit_one_cycle(3, 1e-2);
  CAPTURE(out.str());
  CHECK(records.back().metrics[0] > 0.5);  // 10 classes: chance is 0.1
  CHECK(records.back().valid_loss < std::log(10.0));
}

TEST_CASE("Learner rebuilds its optimizer after parameters change shape", "[learner]") {
  // An in-place pruning shrinks parameters with set_data (same tensors, new shapes); the
  // optimizer's state of the old shapes must not be stepped with the new gradients.
  torch::manual_seed(5);
  auto model = fixtures::mlp(16);
  const auto data = fixtures::blobs(96, 16, 2);
  std::ostringstream out;
  Learner learn(model, data, {}, quiet(out));
  learn.fit(1, 1e-2);
  CHECK_FALSE(learn.optimizer_is_stale());
  const auto* before = &learn.optimizer();

  {  // keep the first 8 hidden units, as Pruner::prune_ would
    torch::NoGradGuard no_grad;
    auto& first = *model[0]->as<torch::nn::Linear>();
    auto& second = *model[2]->as<torch::nn::Linear>();
    first.weight.set_data(first.weight.narrow(0, 0, 8).clone());
    first.bias.set_data(first.bias.narrow(0, 0, 8).clone());
    second.weight.set_data(second.weight.narrow(1, 0, 8).clone());
  }
  CHECK(learn.optimizer_is_stale());

  // The second fit must equal a fresh Adam (same options) on the shrunk model.
  auto reference = fixtures::mlp(8);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < model->parameters().size(); ++i)
      reference->parameters()[i].copy_(model->parameters()[i]);
  }
  REQUIRE_NOTHROW(learn.fit(1, 1e-2));
  CHECK(&learn.optimizer() != before);
  CHECK_FALSE(learn.optimizer_is_stale());
  CHECK(learn.state().optimizer == &learn.optimizer());
  for (const auto& p : learn.optimizer().param_groups()[0].params()) CHECK(p.size(0) <= 8);

  torch::optim::Adam adam(reference->parameters(),
                          torch::optim::AdamOptions(1e-2).betas({0.9, 0.99}).eps(1e-5));
  for (const auto& batch : data) {
    adam.zero_grad();
    F::cross_entropy(reference->forward(batch.data), batch.target).backward();
    adam.step();
  }
  for (size_t i = 0; i < model->parameters().size(); ++i)
    CHECK(torch::allclose(model->parameters()[i], reference->parameters()[i], 1e-6, 1e-7));

  // fit_one_cycle notices too, and the public rebuild drops the state.
  {
    torch::NoGradGuard no_grad;
    auto& second = *model[2]->as<torch::nn::Linear>();
    second.weight.set_data(second.weight.narrow(0, 0, 3).clone().contiguous());
    auto& first = *model[0]->as<torch::nn::Linear>();
    first.weight.set_data(first.weight.narrow(0, 0, 6).clone());
    first.bias.set_data(first.bias.narrow(0, 0, 6).clone());
    second.weight.set_data(second.weight.narrow(1, 0, 6).clone());
  }
  REQUIRE_NOTHROW(learn.fit_one_cycle(1, 1e-2));
  CHECK_FALSE(learn.optimizer().state().empty());
  learn.rebuild_optimizer();
  CHECK(learn.optimizer().state().empty());
}
