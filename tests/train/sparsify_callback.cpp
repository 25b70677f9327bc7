#include "catch.hpp"

#include <fasterai/sparse/sparsifier_interface.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/sparsify_callback.hpp>

#include <fasterai/sparse/sparsifier.hpp>

#include <cmath>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;

namespace {

// A stand-in for a Sparsifier<..., Gradual>: records the calls it gets, and zeroes the
// smallest-magnitude fraction of the first Linear's weights, that fraction following
// Zhu & Gupta's gradual schedule s(p) = target·(1 − (1 − p)³).
class FakeSparsifier : public SparsifierInterface {
 public:
  FakeSparsifier(torch::nn::Sequential model, double target)
      : weight_(model[0]->as<torch::nn::Linear>()->weight), target_(target) {}

  std::vector<std::string> calls;
  std::vector<double> steps;

  void prune(double sparsity) override {
    calls.push_back("prune");
    set(sparsity);
  }
  void step(double progress) override {
    calls.push_back("step");
    steps.push_back(progress);
    set(target_ * (1 - std::pow(1 - progress, 3)));
  }
  void apply() override {
    calls.push_back("apply");
    torch::NoGradGuard no_grad;
    if (mask_.defined()) weight_.masked_fill_(mask_, 0);
  }
  void mask_gradients() override {
    calls.push_back("mask_gradients");
    if (mask_.defined() && weight_.grad().defined()) weight_.mutable_grad().masked_fill_(mask_, 0);
  }
  double sparsity() const override { return current_; }
  double target_sparsity() const override { return target_; }
  SparsityReport report() const override { return {}; }
  std::string name() const override { return "Fake/Gradual"; }

  double zero_percent() const {
    return 100.0 * double(weight_.numel() - weight_.count_nonzero().item<std::int64_t>()) /
           double(weight_.numel());
  }
  const torch::Tensor& mask() const { return mask_; }

 private:
  torch::Tensor weight_;
  double target_;
  double current_ = 0;
  torch::Tensor mask_;  // true where pruned

  void set(double sparsity) {
    current_ = sparsity;
    torch::NoGradGuard no_grad;
    const auto n = static_cast<std::int64_t>(std::floor(weight_.numel() * sparsity / 100.0));
    mask_ = torch::zeros_like(weight_, torch::kBool);
    if (n > 0) {
      const auto order = weight_.abs().flatten().argsort();
      mask_.view(-1).index_fill_(0, order.narrow(0, 0, n), true);
    }
    weight_.masked_fill_(mask_, 0);
  }
};

// Counts calls per training batch: the protocol is step, mask_gradients, (optimizer), apply.
std::vector<std::string> per_batch(const std::vector<std::string>& calls, size_t from, size_t n) {
  return {calls.begin() + static_cast<std::ptrdiff_t>(from),
          calls.begin() + static_cast<std::ptrdiff_t>(from + n)};
}

}  // namespace

TEST_CASE("SparsifyCallback drives a sparsifier to its target and reports each epoch",
          "[sparsify_callback]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp(32);
  FakeSparsifier sparsifier(model, 50);
  SparsifyCallback sparsify(sparsifier);
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(64, 16, 1), fixtures::blobs(32, 16, 2),
                LearnerOptions().out(&out).progress(Progress::None));
  learn.fit(3, 1e-2, {sparsify});

  // 3 epochs of 4 batches: at each, step((i+1)/12), mask_gradients, then apply after the step.
  REQUIRE(sparsifier.steps.size() == 12);
  for (size_t i = 0; i < 12; ++i) {
    CHECK(sparsifier.steps[i] == Approx(double(i + 1) / 12));
    CHECK(per_batch(sparsifier.calls, 3 * i, 3) ==
          std::vector<std::string>{"step", "mask_gradients", "apply"});
  }
  // The last batch ends exactly at the target, so after the fit the masks are only applied.
  CHECK(sparsifier.steps.back() == 1.0);
  CHECK(per_batch(sparsifier.calls, 36, 1) == std::vector<std::string>{"apply"});
  CHECK(sparsifier.calls.size() == 37);
  CHECK(sparsifier.sparsity() == 50.0);
  CHECK(sparsifier.zero_percent() == Approx(50.0));

  const std::string text = out.str();
  CAPTURE(text);
  CHECK_THAT(text, Contains("Pruning of Fake/Gradual until a sparsity of 50%"));
  // The gradual schedule's value at the end of each epoch: 50·(1 − (1 − e/3)³).
  CHECK_THAT(text, Contains("Sparsity at epoch 0: 35.19%\n"));
  CHECK_THAT(text, Contains("Sparsity at epoch 1: 48.15%\n"));
  CHECK_THAT(text, Contains("Sparsity at epoch 2: 50.00%\n"));
  CHECK_THAT(text, Contains("Final Sparsity: 50.00%\n"));
  // Reports follow their epoch's row.
  CHECK(text.find("Sparsity at epoch 0") > text.find("\n0  "));
  CHECK(text.find("Sparsity at epoch 0") < text.find("\n1  "));
}

TEST_CASE("SparsifyCallback keeps pruned weights at zero through Adam and weight decay",
          "[sparsify_callback]") {
  // Without masking the gradients and re-applying the masks, Adam's running averages and the
  // decay term would move a pruned weight away from zero at the next step.
  struct Watch : Callback {
    FakeSparsifier* sparsifier;
    torch::Tensor weight;
    int violations = 0, checked = 0;
    void after_step(TrainingState&) override {
      if (!sparsifier->mask().defined()) return;
      ++checked;
      if (weight.masked_select(sparsifier->mask()).abs().sum().item<double>() != 0) ++violations;
    }
  };
  torch::manual_seed(0);
  auto model = fixtures::mlp(32);
  auto sparsifier = std::make_shared<FakeSparsifier>(model, 80);
  SparsifyCallback sparsify(sparsifier);
  Watch watch;
  watch.sparsifier = sparsifier.get();
  watch.weight = model[0]->as<torch::nn::Linear>()->weight;
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(128, 16, 1), {},
                LearnerOptions().out(&out).progress(Progress::None).optimizer(OptimizerKind::AdamW)
                    .weight_decay(0.1));
  learn.fit_one_cycle(2, 1e-2, {sparsify, watch});
  CHECK(watch.checked == 16);
  CHECK(watch.violations == 0);
  CHECK(sparsifier->zero_percent() == Approx(80.0).margin(1.6));
}

TEST_CASE("SparsifyCallback spreads the schedule over [start, end] of the fit",
          "[sparsify_callback]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp(16);
  FakeSparsifier sparsifier(model, 40);
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().start(0.25).end(0.75));
  CHECK(sparsify.progress(0.1) == 0);
  CHECK(sparsify.progress(0.5) == 0.5);
  CHECK(sparsify.progress(0.9) == 1);
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(64, 8, 1), {},
                LearnerOptions().out(&out).progress(Progress::None));
  learn.fit(2, 1e-3, {sparsify});  // 16 batches: (i+1)/16
  // Batches 0..3 finish at or before 25%: no pruning yet.
  CHECK(sparsifier.calls.front() == "step");
  REQUIRE_FALSE(sparsifier.steps.empty());
  CHECK(sparsifier.steps.front() == Approx((5.0 / 16 - 0.25) / 0.5));
  // The schedule reaches 1 at 75% (batch 11) and is not stepped again, after the fit neither.
  std::vector<double> expected;
  for (int i = 4; i < 12; ++i) expected.push_back((double(i + 1) / 16 - 0.25) / 0.5);
  CHECK(expected.back() == 1.0);
  REQUIRE(sparsifier.steps.size() == expected.size());
  for (size_t i = 0; i < expected.size(); ++i) CHECK(sparsifier.steps[i] == Approx(expected[i]));
  // Masks stay in force after the end: mask_gradients and apply at every later batch.
  const auto masks = std::count(sparsifier.calls.begin(), sparsifier.calls.end(), "mask_gradients");
  CHECK(masks == 12);
  CHECK(sparsifier.sparsity() == 40.0);
  CHECK_THAT(out.str(), Contains("Final Sparsity: 40.00%"));
}

TEST_CASE("SparsifyCallback with its hooks called from a hand-written loop",
          "[sparsify_callback]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp(16);
  FakeSparsifier sparsifier(model, 30);
  SparsifyCallback sparsify(sparsifier, SparsifyCallbackOptions().verbose(false));
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(0.1));
  const auto data = fixtures::blobs(32, 8, 1);

  TrainingState s;
  s.model = model.ptr().get();
  s.n_epochs = 2;
  s.n_iter = static_cast<std::int64_t>(data.size());
  CallbackList callbacks{sparsify};
  callbacks.before_fit(s);
  for (s.epoch = 0; s.epoch < s.n_epochs; ++s.epoch) {
    callbacks.before_epoch(s);
    for (s.iter = 0; s.iter < s.n_iter; ++s.iter, ++s.train_iter) {
      const auto& batch = data[static_cast<size_t>(s.iter)];
      s.x = batch.data;
      s.y = batch.target;
      s.pred = model->forward(s.x);
      s.loss = torch::nn::functional::cross_entropy(s.pred, s.y);
      s.loss.backward();
      callbacks.before_step(s);
      sgd.step();
      callbacks.after_step(s);
      sgd.zero_grad();
    }
    callbacks.after_epoch(s);
  }
  callbacks.after_fit(s);
  CHECK(sparsifier.steps.size() == 8);
  CHECK(sparsifier.steps[7] == 1.0);
  CHECK(sparsifier.zero_percent() == Approx(100.0 * 9 / 32));  // floor(32 weights · 30%)

  // A loop that stops before its last batch: after_fit steps to the target.
  FakeSparsifier early(model, 30);
  SparsifyCallback early_sparsify(early, SparsifyCallbackOptions().verbose(false));
  CallbackList early_callbacks{early_sparsify};
  TrainingState e;
  e.model = model.ptr().get();
  e.n_epochs = 2;
  e.n_iter = 4;
  early_callbacks.before_fit(e);
  for (e.iter = 0; e.iter < 3; ++e.iter, ++e.train_iter) early_callbacks.before_step(e);
  early_callbacks.after_fit(e);
  CHECK(early.steps == std::vector<double>{1.0 / 8, 2.0 / 8, 3.0 / 8, 1.0});
  CHECK(early.zero_percent() == Approx(100.0 * 9 / 32));

  // A TrainingState without the number of batches cannot give progress.
  TrainingState empty;
  CHECK_THROWS_WITH(callbacks.before_fit(empty), Contains("SparsifyCallback") &&
                                                     Contains("before_fit") &&
                                                     Contains("n_epochs * n_iter"));
}

TEST_CASE("SparsifyCallback rejects bad options", "[sparsify_callback]") {
  auto model = fixtures::mlp(4);
  FakeSparsifier sparsifier(model, 30);
  CHECK_THROWS_WITH(SparsifyCallback(sparsifier, SparsifyCallbackOptions().start(0.5).end(0.5)),
                    Contains("end") && Contains("(start, 1]"));
  CHECK_THROWS_WITH(SparsifyCallback(sparsifier, SparsifyCallbackOptions().start(-0.1)),
                    Contains("start"));
  CHECK_THROWS_WITH(SparsifyCallback(sparsifier, SparsifyCallbackOptions().end(1.5)),
                    Contains("end") && Contains("1.5"));
  CHECK_THROWS_WITH(SparsifyCallback(std::shared_ptr<SparsifierInterface>()),
                    Contains("sparsifier") && Contains("nullptr"));
}

TEST_CASE("SparsifyCallback with a real gradual Sparsifier ends at the target",
          "[sparsify_callback]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(2, 64), torch::nn::ReLU(),
                                     torch::nn::Linear(64, 64), torch::nn::ReLU(),
                                     torch::nn::Linear(64, 3));
  Sparsifier<granularity::Weight, method::Local, criteria::L1, schedule::Gradual> sparsifier(
      model, SparsifierOptions(50).include_linear(true));
  SparsifyCallback sparsify(sparsifier);
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(256, 32, 1), fixtures::blobs(128, 64, 2),
                LearnerOptions().out(&out).progress(Progress::None));
  const auto records = learn.fit_one_cycle(3, 1e-2, {sparsify});
  CHECK(sparsifier.sparsity() == Approx(50.0));
  const auto report = sparsity_report(model);
  for (const auto& layer : report.layers) CHECK(layer.percent() == Approx(50.0).margin(1.0));
  CHECK(records.back().metrics[0] > 0.9);
  const std::string text = out.str();
  CAPTURE(text);
  CHECK(std::regex_search(text, std::regex(R"(Sparsity at epoch 0: \d+\.\d\d%)")));
  CHECK_THAT(text, Contains("Sparsity at epoch 2: 50.00%") && Contains("Final Sparsity: 50.00%"));
}

// LibTorch 2.x's zero_grad() sets gradients to none (1.13 zeroes them), so after the fit's last
// step no gradient is left: a criterion that reads them must not be asked again in after_fit
// once the last batch has brought the sparsifier to its target.
TEST_CASE("SparsifyCallback with a gradient criterion ends the fit at its target",
          "[sparsify_callback]") {
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(2, 64), torch::nn::ReLU(),
                                     torch::nn::Linear(64, 64), torch::nn::ReLU(),
                                     torch::nn::Linear(64, 3));
  Sparsifier<granularity::Weight, method::Local, criteria::Taylor, schedule::Cos> sparsifier(
      model, SparsifierOptions(50).include_linear(true));
  SparsifyCallback sparsify(sparsifier);
  std::ostringstream out;
  Learner learn(model, fixtures::blobs(256, 32, 1), {},
                LearnerOptions().out(&out).progress(Progress::None));
  learn.fit_one_cycle(2, 1e-2, {sparsify});
  CHECK(sparsifier.sparsity() == Approx(50.0));
  for (const auto& layer : sparsity_report(model).layers)
    CHECK(layer.percent() == Approx(50.0).margin(1.0));
  CHECK_THAT(out.str(), Contains("Final Sparsity: 50.00%"));
}
