#include "catch.hpp"

#include <fasterai/core/sequential.hpp>
#include <fasterai/models/resnet.hpp>
#include <fasterai/train/feature_distillation.hpp>
#include <fasterai/train/learner.hpp>

#include <cmath>
#include <sstream>
#include <vector>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;
namespace nn = torch::nn;
namespace F = torch::nn::functional;

namespace {

// 1×8×8 images: a student 4 channels wide, a teacher 8 wide with a nested stage.
nn::Sequential small_student() {
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 4, 3).padding(1)), nn::ReLU(),
                        nn::Conv2d(nn::Conv2dOptions(4, 4, 3).padding(1)), nn::ReLU(),
                        nn::AdaptiveAvgPool2d(1), nn::Flatten(), nn::Linear(4, 3));
}

nn::Sequential small_teacher() {
  NamedSequential stage;
  stage->push_back("conv", nn::Conv2d(nn::Conv2dOptions(8, 8, 3).padding(1)));
  stage->push_back("relu", nn::ReLU());
  nn::Sequential t;
  t->push_back("stem", nn::Conv2d(nn::Conv2dOptions(1, 8, 3).padding(1)));
  t->push_back("relu", nn::ReLU());
  t->push_back("stage", stage);
  t->push_back("pool", nn::AdaptiveAvgPool2d(1));
  t->push_back("flatten", nn::Flatten());
  t->push_back("fc", nn::Linear(8, 3));
  return t;
}

// Images whose class decides where a bright square sits, so that a small convnet learns them.
std::vector<torch::data::Example<>> squares(std::int64_t n, std::int64_t batch, std::uint64_t seed) {
  torch::manual_seed(seed);
  const auto y = torch::randint(3, {n}, torch::kLong);
  auto x = 0.3 * torch::randn({n, 1, 8, 8});
  for (std::int64_t i = 0; i < n; ++i) {
    const auto c = y[i].item<std::int64_t>() * 2;
    x[i].narrow(1, c, 3).narrow(2, c, 3).add_(2.0);
  }
  std::vector<torch::data::Example<>> out;
  for (std::int64_t i = 0; i < n; i += batch) {
    const auto len = std::min(batch, n - i);
    out.push_back({x.narrow(0, i, len), y.narrow(0, i, len)});
  }
  return out;
}

// A module with a hand-written forward that keeps its layers in a Sequential member: the shape
// of many users' models.
struct TwoStageImpl : nn::Module {
  explicit TwoStageImpl(std::int64_t width)
      : body(register_module("body", nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, width, 3).padding(1)),
                                                    nn::ReLU(),
                                                    nn::Conv2d(nn::Conv2dOptions(width, width, 3).padding(1)),
                                                    nn::ReLU()))),
        head(register_module("head", nn::Linear(width, 3))) {}
  torch::Tensor forward(torch::Tensor x) { return head->forward(body->forward(x).mean({2, 3})); }
  nn::Sequential body;
  nn::Linear head;
};
TORCH_MODULE(TwoStage);

// The modules in the forward lists of every Sequential of `m`, to see that taps came out.
std::vector<std::shared_ptr<nn::Module>> forward_lists(nn::Module& m) {
  std::vector<std::shared_ptr<nn::Module>> out;
  for (const auto& s : m.modules())
    if (auto* seq = s->as<nn::SequentialImpl>())
      for (const auto& entry : *seq) out.push_back(entry.ptr());
  return out;
}

// The part of a training batch between before_batch and the backward, as the Learner runs it.
template <class Model>
void forward_and_loss(CallbackList& callbacks, TrainingState& s, Model& model, const torch::Tensor& x,
                      const torch::Tensor& y) {
  s.x = x;
  s.y = y;
  s.pred = model->forward(x);
  s.loss = F::cross_entropy(s.pred, y);
  callbacks.after_pred(s);
  callbacks.after_loss(s);
}

std::vector<bool> modes(nn::Module& m) {
  std::vector<bool> out;
  for (const auto& s : m.modules()) out.push_back(s->is_training());
  return out;
}

}  // namespace

TEST_CASE("fitnet_loss is the mean squared difference", "[feature_distillation]") {
  const auto s = torch::tensor({{1.0f, 2.0f}, {3.0f, 4.0f}});
  const auto t = torch::tensor({{0.0f, 2.0f}, {5.0f, 1.0f}});
  // Differences 1, 0, −2, 3: squares 1, 0, 4, 9, mean 14/4.
  CHECK(fitnet_loss(s, t).item<float>() == 3.5f);
  CHECK(fitnet_loss(t, t).item<float>() == 0.0f);
  CHECK_THROWS_AS(fitnet_loss(s, t.t().reshape({1, 4})), argument_error);
  CHECK_THROWS_WITH(fitnet_loss(s, torch::zeros({2, 3})), Contains("adapter"));
}

TEST_CASE("attention_transfer_loss compares normalized maps of mean squared activations",
          "[feature_distillation]") {
  // Student: 1 example, 2 channels, 1×2 positions; channel 0 = [1, 2], channel 1 = [3, 0].
  // mean_c A² = [(1 + 9)/2, (4 + 0)/2] = [5, 2], norm √29.
  const auto s = torch::tensor({1.0, 2.0, 3.0, 0.0}, torch::kDouble).reshape({1, 2, 1, 2});
  // Teacher: 1 channel [2, −1]: A² = [4, 1], norm √17 (the sign does not matter).
  const auto t = torch::tensor({2.0, -1.0}, torch::kDouble).reshape({1, 1, 1, 2});
  const double qs0 = 5 / std::sqrt(29.0), qs1 = 2 / std::sqrt(29.0);
  const double qt0 = 4 / std::sqrt(17.0), qt1 = 1 / std::sqrt(17.0);
  const auto map = attention_map(s);
  REQUIRE(map.sizes() == c10::IntArrayRef({1, 2}));
  CHECK(map[0][0].item<double>() == Approx(qs0).epsilon(1e-15));
  CHECK(map[0][1].item<double>() == Approx(qs1).epsilon(1e-15));
  const double expected = ((qs0 - qt0) * (qs0 - qt0) + (qs1 - qt1) * (qs1 - qt1)) / 2;
  CHECK(attention_transfer_loss(s, t).item<double>() == Approx(expected).epsilon(1e-14));
  // Scaling a map changes nothing: the maps are normalized.
  CHECK(attention_transfer_loss(3.0 * s, t).item<double>() == Approx(expected).epsilon(1e-14));
  CHECK(attention_transfer_loss(s, s).item<double>() == 0.0);
  // An all-zero map stays zero instead of dividing by zero.
  CHECK(attention_map(torch::zeros({1, 2, 2, 2})).abs().sum().item<double>() == 0.0);
  CHECK_THROWS_WITH(attention_transfer_loss(s, torch::zeros({1, 1, 2, 1}, torch::kDouble)),
                    Contains("N, H and W"));
  CHECK_THROWS_WITH(attention_map(torch::zeros({2, 3})), Contains("N×C×H×W"));
}

TEST_CASE("forward_with_features returns the forward's output and the named layers' outputs",
          "[feature_distillation]") {
  torch::manual_seed(0);
  auto teacher = small_teacher();
  const auto x = torch::randn({2, 1, 8, 8});
  CHECK(feature_layer_names(teacher) ==
        std::vector<std::string>{"stem", "relu", "stage", "stage.conv", "stage.relu", "pool",
                                 "flatten", "fc"});
  const auto out = forward_with_features(teacher, x, {"stage.conv", "stage", "relu"});
  CHECK(torch::equal(out.output, teacher->forward(x)));
  REQUIRE(out.features.size() == 3);
  const auto stem = torch::relu(teacher[0]->as<nn::Conv2dImpl>()->forward(x));
  CHECK(torch::equal(out.features.at("relu"), stem));
  const auto conv = teacher[2]->as<NamedSequentialImpl>()->named_children()[0].value()->as<nn::Conv2dImpl>();
  CHECK(torch::equal(out.features.at("stage.conv"), conv->forward(stem)));
  CHECK(torch::equal(out.features.at("stage"), torch::relu(conv->forward(stem))));
  CHECK_THROWS_AS(forward_with_features(teacher, x, {"stage.1"}), argument_error);
  CHECK_THROWS_WITH(forward_with_features(teacher, x, {"stage.1"}),
                    Contains("'stage.1'") && Contains("'stage.conv'") && Contains("'fc'"));
}

TEST_CASE("FeatureDistillation: FitNet through a 1×1 adapter, attention without one",
          "[feature_distillation]") {
  torch::manual_seed(1);
  auto student = small_student();
  auto teacher = small_teacher();
  const auto x = torch::randn({4, 1, 8, 8});
  FeatureDistillation fd(student, teacher, x,
                         {fitnet_hint("1", "stage", 0.5), attention_hint("3", "relu")});
  // Student width 4, teacher width 8: a 1×1 convolution 4 → 8 for the FitNet hint only.
  const auto adapter = fd.adapter(0);
  REQUIRE(adapter);
  const auto* conv = adapter->as<nn::Conv2dImpl>();
  REQUIRE(conv);
  CHECK(conv->weight.sizes() == c10::IntArrayRef({8, 4, 1, 1}));
  CHECK(fd.adapter(1) == nullptr);
  CHECK(fd.parameters().size() == 2);
  CHECK(fd.student_layers() == std::vector<std::string>{"1", "3"});

  const auto s = forward_with_features(student, x, fd.student_layers());
  const auto t = forward_with_features(teacher, x, {"stage", "relu"});
  const auto loss = fd.loss(x, s.features);
  const auto expected =
      0.5 * fitnet_loss(const_cast<nn::Conv2dImpl*>(conv)->forward(s.features.at("1")), t.features.at("stage")) +
      500.0 * attention_transfer_loss(s.features.at("3"), t.features.at("relu"));
  CHECK(loss.item<double>() == Approx(expected.item<double>()).epsilon(1e-6));

  SECTION("the gradient reaches the student and the adapter, never the teacher") {
    loss.backward();
    // The convolutions before the hinted layers; the classifier after them gets none.
    for (const auto& p : student[6]->parameters()) CHECK_FALSE(p.grad().defined());
    for (const std::size_t i : {std::size_t{0}, std::size_t{2}})
      for (const auto& p : student[i]->parameters()) {
        REQUIRE(p.grad().defined());
        CHECK(p.grad().abs().sum().item<double>() > 0);
      }
    for (const auto& p : fd.parameters()) {
      REQUIRE(p.grad().defined());
      CHECK(p.grad().abs().sum().item<double>() > 0);
    }
    for (const auto& p : teacher->parameters()) CHECK_FALSE(p.grad().defined());
  }
}

TEST_CASE("FeatureDistillation rejects bad names, weights and shapes, changing nothing",
          "[feature_distillation]") {
  torch::manual_seed(2);
  auto student = small_student();
  auto teacher = small_teacher();
  student->train();
  teacher->eval();
  teacher[0]->train();  // mixed modes must come back as they were
  const auto s_before = fixtures::snapshot(*student), t_before = fixtures::snapshot(*teacher);
  const auto s_modes = modes(*student), t_modes = modes(*teacher);
  const auto x = torch::randn({2, 1, 8, 8});

  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {fitnet_hint("9", "stage")}),
                    Contains("student_layer") && Contains("'9'") && Contains("'0'") && Contains("'6'"));
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {fitnet_hint("1", "stage.2")}),
                    Contains("teacher_layer") && Contains("'stage.conv'"));
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {fitnet_hint("1", "stage", -1.0)}),
                    Contains("weight"));
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {}), Contains("hints"));
  // Spatial 8×8 against 1×1 (after pooling): an adapter maps channels only.
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {fitnet_hint("1", "pool")}),
                    Contains("FitNet hint") && Contains("spatial"));
  // Attention needs maps; the flattened features are not.
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {attention_hint("5", "flatten")}),
                    Contains("attention hint") && Contains("N×C×H×W"));
  // Checked before anything is built: a good hint beside a bad one leaves no adapter behind.
  CHECK_THROWS_AS(FeatureDistillation(student, teacher, x,
                                      {fitnet_hint("1", "stage"), attention_hint("5", "stage")}),
                  argument_error);

  CHECK(fixtures::same(fixtures::snapshot(*student), s_before));
  CHECK(fixtures::same(fixtures::snapshot(*teacher), t_before));
  CHECK(modes(*student) == s_modes);
  CHECK(modes(*teacher) == t_modes);
  for (const auto& p : student->parameters()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("FeatureDistillation as a callback adds the same loss a hand-written loop computes",
          "[feature_distillation]") {
  torch::manual_seed(3);
  auto student = small_student();
  auto teacher = small_teacher();
  student->eval();  // no randomness: the two computations must agree exactly
  const auto x = torch::randn({4, 1, 8, 8});
  const auto y = torch::tensor({0, 1, 2, 0}, torch::kLong);
  FeatureDistillation fd(student, teacher, x, {fitnet_hint("3", "stage.relu"), attention_hint("1", "relu")});
  const auto original = student->begin()[3].ptr();

  TrainingState s;
  s.model = student.ptr().get();
  CallbackList callbacks{fd};
  callbacks.before_fit(s);
  callbacks.before_batch(s);
  // The tap stands in the forward list; the registered children and parameters are the same.
  CHECK(student->begin()[3].ptr() != original);
  CHECK(student->named_children()[3].value() == original);
  CHECK(student->named_parameters().size() == 6);
  forward_and_loss(callbacks, s, student, x, y);
  callbacks.after_fit(s);
  CHECK(student->begin()[3].ptr() == original);

  const auto hand = forward_with_features(student, x, fd.student_layers());
  const auto expected = F::cross_entropy(hand.output, y) + fd.loss(x, hand.features);
  CHECK(s.loss.item<float>() == expected.item<float>());

  // A callback made for this student refuses another model.
  auto other = small_student();
  TrainingState wrong;
  wrong.model = other.ptr().get();
  CHECK_THROWS_WITH(callbacks.before_fit(wrong), Contains("student this callback was made for"));
}

TEST_CASE("FeatureDistillation trains the adapter with the Learner's optimizer and leaves it as it was",
          "[feature_distillation]") {
  torch::manual_seed(4);
  auto teacher = small_teacher();
  const auto train = squares(96, 16, 5), valid = squares(48, 16, 6);
  std::ostringstream out;
  Learner teach(teacher, train, valid, LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU));
  teach.fit_one_cycle(4, 1e-2);

  auto student = small_student();
  FeatureDistillation fd(student, teacher, train.front().data, {fitnet_hint("3", "stage")});
  const auto adapter_before = fixtures::snapshot(*fd.adapter(0));
  const auto teacher_before = fixtures::snapshot(*teacher);
  Learner learn(student, train, valid, LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU));
  const auto groups = learn.optimizer().param_groups().size();

  // The hint loss of the untrained student, then after fitting with the callback.
  const auto hint_loss = [&] {
    torch::NoGradGuard no_grad;
    student->eval();
    const auto feats = forward_with_features(student, valid.front().data, fd.student_layers());
    return fd.loss(valid.front().data, feats.features).item<double>();
  };
  const double before = hint_loss();
  learn.fit(3, 1e-2, {fd});
  const double after = hint_loss();
  CHECK(after < before);
  CHECK_FALSE(fixtures::same(fixtures::snapshot(*fd.adapter(0)), adapter_before));
  CHECK(fixtures::same(fixtures::snapshot(*teacher), teacher_before));
  CHECK(learn.optimizer().param_groups().size() == groups);
  // The taps are gone: the student's forward list holds its own children again.
  for (std::size_t i = 0; i < student->size(); ++i)
    CHECK(student->begin()[static_cast<std::ptrdiff_t>(i)].ptr() == student->named_children()[i].value());
}

TEST_CASE("forward_with_features on a module with a hand-written forward: the zoo's ResNet",
          "[feature_distillation]") {
  torch::manual_seed(5);
  auto resnet = models::resnet18(/*num_classes=*/10);
  resnet->eval();
  const auto x = torch::randn({2, 3, 32, 32});
  const auto names = feature_layer_names(resnet);
  for (const char* n : {"layer1", "layer1.0", "layer2.0.downsample", "layer2.0.downsample.0", "layer4.1"})
    CHECK(std::find(names.begin(), names.end(), n) != names.end());
  // The stem is called by the forward itself, not from a Sequential's list.
  CHECK(std::find(names.begin(), names.end(), "conv1") == names.end());

  const auto before = forward_lists(*resnet);
  const auto out = forward_with_features(resnet, x, {"layer1.0", "layer1", "layer3"});
  CHECK(forward_lists(*resnet) == before);  // the taps are out again
  CHECK(torch::equal(out.output, resnet->forward(x)));
  REQUIRE(out.features.size() == 3);
  const auto stem = resnet->maxpool->forward(resnet->relu->forward(resnet->bn1->forward(resnet->conv1->forward(x))));
  const auto block = resnet->layer1->ptr(0)->as<models::BasicBlockImpl>()->forward(stem);
  CHECK(torch::equal(out.features.at("layer1.0"), block));
  const auto layer1 = resnet->layer1->forward(stem);
  CHECK(torch::equal(out.features.at("layer1"), layer1));
  CHECK(torch::equal(out.features.at("layer3"), resnet->layer3->forward(resnet->layer2->forward(layer1))));

  CHECK_THROWS_WITH(forward_with_features(resnet, x, {"conv1"}),
                    Contains("layers") && Contains("'conv1'") && Contains("'layer1.0'"));
  CHECK(forward_lists(*resnet) == before);
  // A forward that throws (one channel where the stem wants three) leaves no tap behind.
  CHECK_THROWS(forward_with_features(resnet, torch::randn({2, 1, 32, 32}), {"layer1", "layer2.0"}));
  CHECK(forward_lists(*resnet) == before);
}

TEST_CASE("FeatureDistillation between modules with a hand-written forward, in a Learner",
          "[feature_distillation]") {
  torch::manual_seed(6);
  TwoStage student(4), teacher(8);
  student->eval();
  const auto x = torch::randn({4, 1, 8, 8});
  const auto y = torch::tensor({0, 1, 2, 0}, torch::kLong);
  // "body" and "body.3" are the same output (a Sequential's is its last entry's): two taps on
  // one entry, the second around the first.
  FeatureDistillation fd(student, teacher, x,
                         {fitnet_hint("body", "body.3"), attention_hint("body.1", "body", 100.0)});
  REQUIRE(fd.adapter(0));
  CHECK(fd.adapter(0)->as<nn::Conv2dImpl>()->weight.sizes() == c10::IntArrayRef({8, 4, 1, 1}));

  const auto before = forward_lists(*student);
  TrainingState s;
  s.model = student.ptr().get();
  CallbackList callbacks{fd};
  callbacks.before_fit(s);
  callbacks.before_batch(s);
  CHECK(forward_lists(*student) != before);
  forward_and_loss(callbacks, s, student, x, y);
  callbacks.after_fit(s);
  CHECK(forward_lists(*student) == before);

  // By hand: the student's features from its Sequential member, the teacher's likewise.
  const auto s1 = student->body->ptr(1)->as<nn::ReLUImpl>()->forward(
      student->body->ptr(0)->as<nn::Conv2dImpl>()->forward(x));
  const auto s_body = student->body->forward(x);
  torch::Tensor t_body;
  {
    torch::NoGradGuard no_grad;
    t_body = teacher->body->forward(x);
  }
  auto* adapter = fd.adapter(0)->as<nn::Conv2dImpl>();
  const auto expected = F::cross_entropy(student->forward(x), y) +
                        fitnet_loss(adapter->forward(s_body), t_body) +
                        100.0 * attention_transfer_loss(s1, t_body);
  CHECK(s.loss.item<float>() == Approx(expected.item<float>()).epsilon(1e-6));

  // A layer the forward does not reach through a Sequential's list is refused, naming those it can.
  CHECK_THROWS_WITH(FeatureDistillation(student, teacher, x, {fitnet_hint("head", "body")}),
                    Contains("student_layer") && Contains("'head'") && Contains("'body.0'"));

  // And it trains: the Learner fits the student with the hint, and the hint loss falls.
  const auto train = squares(64, 16, 7), valid = squares(32, 16, 8);
  std::ostringstream log;
  TwoStage fresh(4);
  FeatureDistillation hint(fresh, teacher, train.front().data, {fitnet_hint("body", "body")});
  const auto hint_loss = [&] {
    torch::NoGradGuard no_grad;
    const auto f = forward_with_features(fresh, valid.front().data, {"body"});
    return hint.loss(valid.front().data, f.features).item<double>();
  };
  const double first = hint_loss();
  Learner learn(fresh, train, valid, LearnerOptions().out(&log).progress(Progress::None).device(torch::kCPU));
  learn.fit_one_cycle(3, 1e-2, {hint});
  CHECK(hint_loss() < first);
}
