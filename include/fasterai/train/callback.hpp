#pragma once
// Callbacks: code that joins a training loop at fixed points, as in fastai — knowledge
// distillation replaces the loss, sparsification masks gradients and weights around the
// optimizer step — without the loop knowing about either.
//
// A callback sees the loop through a TrainingState (the batch, the prediction, the loss, where
// training stands), not through the Learner, so the same callback object also serves a
// hand-written LibTorch loop that fills a TrainingState and calls the hooks itself:
//
//   fasterai::TrainingState s;
//   s.model = model.ptr().get();  s.n_epochs = epochs;  s.n_iter = batches_per_epoch;
//   fasterai::CallbackList callbacks{kd, sparsify};   // objects or shared_ptrs
//   callbacks.before_fit(s);
//   for (s.epoch = 0; s.epoch < epochs; ++s.epoch) {
//     callbacks.before_epoch(s);
//     s.iter = 0;
//     for (auto& batch : *loader) {
//       s.x = batch.data;  s.y = batch.target;
//       callbacks.before_batch(s);
//       s.pred = model->forward(s.x);                          callbacks.after_pred(s);
//       s.loss = torch::nn::functional::cross_entropy(s.pred, s.y);
//       callbacks.after_loss(s);                               // KD replaces s.loss here
//       s.loss.backward();                                     callbacks.before_step(s);
//       optimizer.step();                                      callbacks.after_step(s);
//       optimizer.zero_grad();                                 callbacks.after_batch(s);
//       ++s.iter;  ++s.train_iter;
//     }
//     callbacks.after_epoch(s);
//   }
//   callbacks.after_fit(s);
//
// Validation batches go through before_batch, after_pred, after_loss and after_batch with
// `training == false`; the step hooks run only in training. A hook that throws is reported as
// a callback_error naming the callback, the hook and where training stood; the original
// exception is nested inside it (std::rethrow_if_nested).

#include <cstdint>
#include <concepts>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#if __has_include(<cxxabi.h>)
#include <cxxabi.h>
#endif

#include <torch/torch.h>

namespace fasterai {

namespace detail {
// TORCH_ARG pastes `const T&`; a pointer type needs a name to become `std::ostream* const&`.
using ostream_ptr = std::ostream*;
}  // namespace detail

// Where a training loop stands, and the tensors of the current batch. Callbacks read it and
// may replace `pred` (in after_pred) and `loss` (in after_loss).
struct TrainingState {
  torch::nn::Module* model = nullptr;              // the model being trained
  torch::optim::Optimizer* optimizer = nullptr;    // its optimizer (may be null in own loops)
  std::ostream* out = &std::cout;                  // where callbacks report; nullptr: silent

  torch::Tensor x;     // inputs of the batch, on the training device
  torch::Tensor y;     // targets of the batch
  torch::Tensor pred;  // the model's output
  torch::Tensor loss;  // the loss that backward() will run on

  bool training = true;           // false while validating
  int epoch = 0;                  // current epoch, from 0
  int n_epochs = 1;               // epochs in this fit
  std::int64_t iter = 0;          // batch within the current epoch (training or validation)
  std::int64_t n_iter = 0;        // training batches per epoch
  std::int64_t train_iter = 0;    // training batches finished in this fit

  // Fraction of this fit's training batches finished before the current one, in [0, 1].
  double pct_train() const {
    const auto total = total_iter();
    return total > 0 ? static_cast<double>(train_iter) / static_cast<double>(total) : 0.0;
  }
  std::int64_t total_iter() const { return static_cast<std::int64_t>(n_epochs) * n_iter; }
};

class Callback {
 public:
  virtual ~Callback() = default;

  // The name errors and reports use; by default the class name.
  inline virtual std::string name() const;

  virtual void before_fit(TrainingState&) {}
  virtual void before_epoch(TrainingState&) {}
  virtual void before_batch(TrainingState&) {}
  virtual void after_pred(TrainingState&) {}   // `pred` is set; a callback may replace it
  virtual void after_loss(TrainingState&) {}   // `loss` is set; a callback may replace it
  virtual void before_step(TrainingState&) {}  // gradients are computed, the step is next
  virtual void after_step(TrainingState&) {}   // parameters were updated
  virtual void after_batch(TrainingState&) {}
  virtual void after_epoch(TrainingState&) {}  // after the epoch's validation
  virtual void after_fit(TrainingState&) {}
};

// A hook that threw. what() names the callback, the hook and the batch; the exception the
// hook threw is nested (std::rethrow_if_nested, or nested() to inspect it).
class callback_error : public std::runtime_error {
 public:
  callback_error(std::string callback, std::string hook, const std::string& message)
      : std::runtime_error(message), callback_(std::move(callback)), hook_(std::move(hook)) {}
  const std::string& callback() const noexcept { return callback_; }
  const std::string& hook() const noexcept { return hook_; }

 private:
  std::string callback_;
  std::string hook_;
};

// A callback held by a Learner or a CallbackList: a shared_ptr it co-owns, or an object the
// caller keeps alive (a temporary does not bind, so it cannot dangle).
class CallbackRef {
 public:
  template <class C>
    requires std::derived_from<C, Callback>
  CallbackRef(C& callback)  // NOLINT: implicit by design
      : ptr_(std::shared_ptr<Callback>(), &callback) {}
  template <class C>
    requires std::derived_from<C, Callback>
  CallbackRef(std::shared_ptr<C> callback)  // NOLINT: implicit by design
      : ptr_(std::move(callback)) {
    if (!ptr_) throw std::invalid_argument("fasterai::CallbackRef: a null callback");
  }
  Callback& operator*() const noexcept { return *ptr_; }
  Callback* operator->() const noexcept { return ptr_.get(); }
  Callback* get() const noexcept { return ptr_.get(); }

 private:
  std::shared_ptr<Callback> ptr_;  // aliasing constructor with no owner for borrowed objects
};

// Callbacks called in order, each hook wrapped so that a failure names its callback.
class CallbackList {
 public:
  CallbackList() = default;
  CallbackList(std::initializer_list<CallbackRef> callbacks) : callbacks_(callbacks) {}
  explicit CallbackList(std::vector<CallbackRef> callbacks) : callbacks_(std::move(callbacks)) {}

  void add(CallbackRef callback) { callbacks_.push_back(std::move(callback)); }
  // Remove a callback (by identity); false when it was not in the list.
  bool remove(const Callback& callback);
  std::size_t size() const noexcept { return callbacks_.size(); }
  bool empty() const noexcept { return callbacks_.empty(); }
  const std::vector<CallbackRef>& callbacks() const noexcept { return callbacks_; }

  void before_fit(TrainingState& s) { run(&Callback::before_fit, "before_fit", s); }
  void before_epoch(TrainingState& s) { run(&Callback::before_epoch, "before_epoch", s); }
  void before_batch(TrainingState& s) { run(&Callback::before_batch, "before_batch", s); }
  void after_pred(TrainingState& s) { run(&Callback::after_pred, "after_pred", s); }
  void after_loss(TrainingState& s) { run(&Callback::after_loss, "after_loss", s); }
  void before_step(TrainingState& s) { run(&Callback::before_step, "before_step", s); }
  void after_step(TrainingState& s) { run(&Callback::after_step, "after_step", s); }
  void after_batch(TrainingState& s) { run(&Callback::after_batch, "after_batch", s); }
  void after_epoch(TrainingState& s) { run(&Callback::after_epoch, "after_epoch", s); }
  void after_fit(TrainingState& s) { run(&Callback::after_fit, "after_fit", s); }

 private:
  std::vector<CallbackRef> callbacks_;

  void run(void (Callback::*hook)(TrainingState&), const char* hook_name, TrainingState& s);
};

namespace detail {

inline std::string demangle(const char* name) {
#if __has_include(<cxxabi.h>)
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(name, nullptr, nullptr, &status),
                                             std::free);
  if (status == 0 && out) return out.get();
#endif
  return name;
}

inline std::string where_training_stands(const TrainingState& s) {
  std::ostringstream os;
  os << (s.training ? "training" : "validation") << ", epoch " << s.epoch << ", batch " << s.iter;
  return os.str();
}

}  // namespace detail

inline std::string Callback::name() const { return detail::demangle(typeid(*this).name()); }

inline bool CallbackList::remove(const Callback& callback) {
  for (auto it = callbacks_.begin(); it != callbacks_.end(); ++it)
    if (it->get() == &callback) {
      callbacks_.erase(it);
      return true;
    }
  return false;
}

inline void CallbackList::run(void (Callback::*hook)(TrainingState&), const char* hook_name,
                              TrainingState& s) {
  for (const auto& cb : callbacks_) {
    try {
      ((*cb).*hook)(s);
    } catch (const callback_error&) {
      throw;  // already named (a callback that runs callbacks of its own)
    } catch (...) {
      std::string what = "unknown exception";
      try {
        throw;
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      const std::string name = cb->name();
      std::throw_with_nested(callback_error(
          name, hook_name,
          "fasterai: callback " + name + " failed in " + hook_name + " (" +
              detail::where_training_stands(s) + "): " + what));
    }
  }
}

}  // namespace fasterai
