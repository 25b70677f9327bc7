#include "catch.hpp"

#include <fasterai/train/callback.hpp>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "fixtures.hpp"

using namespace fasterai;
using Catch::Contains;

namespace {

struct Named : Callback {
  std::string id;
  std::vector<std::string>* log;
  Named(std::string i, std::vector<std::string>* l) : id(std::move(i)), log(l) {}
  std::string name() const override { return id; }
  void before_batch(TrainingState&) override { log->push_back(id); }
};

struct Thrower : Callback {
  void after_loss(TrainingState&) override { throw std::runtime_error("boom"); }
};

struct IntThrower : Callback {
  void after_pred(TrainingState&) override { throw 42; }
};

}  // namespace

TEST_CASE("CallbackList calls callbacks in order, objects or shared_ptrs", "[callback]") {
  std::vector<std::string> log;
  Named a("a", &log);
  auto b = std::make_shared<Named>("b", &log);
  CallbackList list{a, b};
  list.add(a);
  TrainingState s;
  list.before_batch(s);
  CHECK(log == std::vector<std::string>{"a", "b", "a"});
  CHECK(list.size() == 3);
  CHECK(list.remove(*b));
  CHECK_FALSE(list.remove(*b));
  CHECK(list.size() == 2);
  // Hooks a callback does not override do nothing.
  list.after_fit(s);
  CHECK(log.size() == 3);
}

TEST_CASE("a failing hook is reported with the callback, the hook and the batch", "[callback]") {
  Thrower t;
  CallbackList list{t};
  TrainingState s;
  s.epoch = 2;
  s.iter = 7;
  try {
    list.after_loss(s);
    FAIL("no exception");
  } catch (const callback_error& e) {
    CHECK(e.hook() == "after_loss");
    CHECK(e.callback() == "(anonymous namespace)::Thrower");
    CHECK_THAT(e.what(), Contains("Thrower") && Contains("after_loss") && Contains("epoch 2") &&
                             Contains("batch 7") && Contains("training") && Contains("boom"));
    // The original exception is nested.
    CHECK_THROWS_WITH(std::rethrow_if_nested(e), "boom");
  }
  IntThrower i;
  CallbackList other{i};
  s.training = false;
  CHECK_THROWS_WITH(other.after_pred(s), Contains("after_pred") && Contains("validation") &&
                                             Contains("unknown exception"));
}

TEST_CASE("TrainingState tells how far training is", "[callback]") {
  TrainingState s;
  CHECK(s.pct_train() == 0);
  s.n_epochs = 4;
  s.n_iter = 5;
  s.train_iter = 10;
  CHECK(s.total_iter() == 20);
  CHECK(s.pct_train() == 0.5);
}

TEST_CASE("CallbackRef refuses a null shared_ptr", "[callback]") {
  std::shared_ptr<Thrower> none;
  CHECK_THROWS_WITH(CallbackRef(none), Contains("null callback"));
}
