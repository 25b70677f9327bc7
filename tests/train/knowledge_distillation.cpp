#include "catch.hpp"

#include <fasterai/train/knowledge_distillation.hpp>
#include <fasterai/train/learner.hpp>

#include <cmath>
#include <sstream>
#include <vector>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;
namespace F = torch::nn::functional;

namespace {

// The formula written out with loops over plain doubles.
double by_hand(const std::vector<std::vector<double>>& s, const std::vector<std::vector<double>>& t,
               const std::vector<int>& y, double T, double alpha) {
  auto log_softmax = [](std::vector<double> v, double temp) {
    double mx = -1e300;
    for (auto& x : v) x /= temp, mx = std::max(mx, x);
    double z = 0;
    for (double x : v) z += std::exp(x - mx);
    for (auto& x : v) x = x - mx - std::log(z);
    return v;
  };
  double ce = 0, kl = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const auto ls = log_softmax(s[i], 1.0);
    ce += -ls[static_cast<size_t>(y[i])];
    const auto lps = log_softmax(s[i], T), lpt = log_softmax(t[i], T);
    for (size_t c = 0; c < s[i].size(); ++c) kl += std::exp(lpt[c]) * (lpt[c] - lps[c]);
  }
  const double n = double(s.size());
  return (1 - alpha) * ce / n + alpha * T * T * kl / n;
}

torch::Tensor to_tensor(const std::vector<std::vector<double>>& v) {
  std::vector<torch::Tensor> rows;
  for (const auto& r : v) rows.push_back(torch::tensor(r, torch::kDouble));
  return torch::stack(rows);
}

}  // namespace

TEST_CASE("distillation_loss matches the formula computed by hand", "[knowledge_distillation]") {
  const std::vector<std::vector<double>> s{{1.0, -0.5, 2.0, 0.1}, {0.3, 0.3, -1.2, 4.0},
                                           {-2.0, 0.0, 0.5, 0.5}};
  const std::vector<std::vector<double>> t{{3.0, 0.0, 1.0, -1.0}, {0.0, 1.0, 0.0, 2.0},
                                           {1.0, 1.0, 1.0, 1.0}};
  const std::vector<int> y{2, 3, 1};
  const auto targets = torch::tensor({2, 3, 1}, torch::kLong);
  for (double T : {1.0, 2.0, 4.0, 20.0})
    for (double alpha : {0.0, 0.3, 0.5, 1.0}) {
      CAPTURE(T, alpha);
      const auto loss = distillation_loss(to_tensor(s), to_tensor(t), targets, T, alpha);
      CHECK(loss.dim() == 0);
      CHECK(loss.item<double>() == Approx(by_hand(s, t, y, T, alpha)).epsilon(1e-12));
    }
}

TEST_CASE("distillation_loss agrees with LibTorch's KL divergence", "[knowledge_distillation]") {
  torch::manual_seed(0);
  const auto s = torch::randn({16, 10}) * 3, t = torch::randn({16, 10}) * 3;
  const auto y = torch::randint(10, {16}, torch::kLong);
  const double T = 3, alpha = 0.7;
  const auto kl = F::kl_div(torch::log_softmax(s / T, 1), torch::softmax(t / T, 1),
                            F::KLDivFuncOptions().reduction(torch::kBatchMean));
  const auto expected = (1 - alpha) * F::cross_entropy(s, y) + alpha * T * T * kl;
  CHECK(distillation_loss(s, t, y, T, alpha).item<double>() ==
        Approx(expected.item<double>()).epsilon(1e-5));
  // A student that predicts the teacher's distribution pays only the hard term.
  CHECK(distillation_loss(t, t, y, T, alpha).item<double>() ==
        Approx((1 - alpha) * F::cross_entropy(t, y).item<double>()).epsilon(1e-5));
  // Saturated teachers (probabilities that underflow to 0) keep the loss finite.
  auto sharp = torch::zeros({2, 3});
  sharp.index_put_({torch::indexing::Slice(), 0}, 1e4);
  CHECK(std::isfinite(distillation_loss(torch::randn({2, 3}), sharp, y.narrow(0, 0, 2) % 3, 1, 0.5)
                          .item<double>()));
}

TEST_CASE("distillation_loss rejects bad arguments", "[knowledge_distillation]") {
  const auto s = torch::randn({4, 10});
  const auto y = torch::zeros({4}, torch::kLong);
  CHECK_THROWS_WITH(distillation_loss(s, torch::randn({4, 5}), y, 2, 0.5),
                    Contains("teacher_logits") && Contains("[4, 5]") && Contains("[4, 10]"));
  CHECK_THROWS_WITH(distillation_loss(s, torch::randn({3, 10}), y, 2, 0.5), Contains("[3, 10]"));
  CHECK_THROWS_WITH(distillation_loss(s.flatten(), s.flatten(), y, 2, 0.5),
                    Contains("student_logits") && Contains("[batch, classes]"));
  CHECK_THROWS_WITH(distillation_loss(s, s, y, 0, 0.5), Contains("temperature") && Contains("positive"));
  CHECK_THROWS_WITH(distillation_loss(s, s, y, 2, 1.5), Contains("alpha") && Contains("[0, 1]"));
  CHECK_THROWS_WITH(KnowledgeDistillation(fixtures::mlp(), -1.0, 0.5), Contains("temperature"));
  CHECK_THROWS_WITH(KnowledgeDistillation(fixtures::mlp(), 2.0, -0.1), Contains("alpha"));
}

TEST_CASE("KnowledgeDistillation adds the teacher's term to the Learner's loss",
          "[knowledge_distillation]") {
  torch::manual_seed(0);
  auto teacher = torch::nn::Sequential(torch::nn::Linear(2, 32), torch::nn::ReLU(),
                                       torch::nn::Dropout(0.5), torch::nn::Linear(32, 3));
  auto student = fixtures::mlp(4);
  teacher->train();  // the callback must evaluate it in eval mode anyway
  const auto teacher_before = fixtures::snapshot(*teacher);
  KnowledgeDistillation kd(teacher, 2.0, 0.4);

  // A callback after KD sees the replaced loss; check it against the formula by hand.
  struct Check : Callback {
    torch::nn::Sequential teacher;
    std::vector<double> got, expected;
    explicit Check(torch::nn::Sequential t) : teacher(std::move(t)) {}
    void after_loss(TrainingState& s) override {
      torch::NoGradGuard no_grad;
      teacher->eval();
      const auto t = teacher->forward(s.x);
      teacher->train();
      got.push_back(s.loss.item<double>());
      expected.push_back(distillation_loss(s.pred.detach(), t, s.y, 2.0, 0.4).item<double>());
      CHECK(s.loss.requires_grad() == s.training);
    }
  } check(teacher);

  std::ostringstream out;
  // On the CPU, where Check's teacher is (the Learner on CUDA is tests/cuda's).
  Learner learn(student, fixtures::blobs(96, 16, 1), fixtures::blobs(32, 16, 2),
                LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU));
  learn.fit(2, 1e-2, {kd, check});
  REQUIRE(check.got.size() == 2 * (6 + 2));
  for (size_t i = 0; i < check.got.size(); ++i)
    CHECK(check.got[i] == Approx(check.expected[i]).epsilon(1e-5));
  // The teacher was not trained and is back in the mode it was in.
  CHECK(fixtures::same(teacher_before, fixtures::snapshot(*teacher)));
  CHECK(teacher->is_training());
  for (const auto& p : teacher->parameters()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("a student distilled from a trained teacher learns the task",
          "[knowledge_distillation]") {
  torch::manual_seed(1);
  auto teacher = fixtures::mlp(32);
  auto student = fixtures::mlp(8);
  std::ostringstream out;
  const auto train = fixtures::blobs(512, 32, 3), valid = fixtures::blobs(256, 64, 4);
  Learner teach(teacher, train, valid, LearnerOptions().out(&out).progress(Progress::None));
  teach.fit_one_cycle(3, 1e-2);
  REQUIRE(teach.validate().metric("accuracy") > 0.95);

  Learner learn(student, train, valid, LearnerOptions().out(&out).progress(Progress::None));
  KnowledgeDistillation kd(teacher, 3.0, 0.5);
  const auto records = learn.fit_one_cycle(4, 1e-2, {kd});
  CHECK(records.back().metrics[0] > 0.9);
  CHECK(records.back().train_loss < records.front().train_loss);
}

TEST_CASE("KnowledgeDistillation in a hand-written loop", "[knowledge_distillation]") {
  torch::manual_seed(2);
  auto teacher = fixtures::mlp(8), student = fixtures::mlp(4);
  KnowledgeDistillation kd(teacher, 4.0, 0.25);
  const auto x = torch::randn({8, 2});
  const auto y = torch::randint(3, {8}, torch::kLong);
  const auto logits = student->forward(x);
  const auto loss = kd.loss(x, logits, y);
  CHECK(loss.item<double>() ==
        Approx(distillation_loss(logits, teacher->forward(x), y, 4.0, 0.25).item<double>()));
  loss.backward();
  for (const auto& p : student->parameters()) CHECK(p.grad().defined());
  for (const auto& p : teacher->parameters()) CHECK_FALSE(p.grad().defined());
  CHECK_FALSE(kd.teacher_logits(x).requires_grad());

  // A teacher that predicts other classes than the student is refused in the loop too.
  KnowledgeDistillation wrong(fixtures::mlp(8, 5), 2.0, 0.5);
  std::ostringstream out;
  Learner learn(student, fixtures::blobs(16, 8, 1), {}, LearnerOptions().out(&out).progress(Progress::None));
  CHECK_THROWS_WITH(learn.fit(1, 1e-3, {wrong}),
                    Contains("KnowledgeDistillation") && Contains("after_loss") &&
                        Contains("[8, 5]") && Contains("[8, 3]"));
  CHECK(fixtures::grads_zero(*student));
}
