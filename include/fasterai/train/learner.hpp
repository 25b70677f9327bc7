#pragma once
// fasterai::Learner: fastai's Learner for LibTorch — a model, its training and validation
// batches, a loss, an optimizer and metrics, trained by `fit` (constant learning rate) or
// `fit_one_cycle`, with callbacks joining the loop at fastai's points. After each epoch it
// prints a row of the table the fasterai article (2020) shows:
//
//   epoch  train_loss  valid_loss  accuracy  time
//   0      0.412108    0.348871    0.873100  00:52
//
//   auto model = fasterai::models::compact_vgg();
//   fasterai::Learner learn(model,
//       data::make_batches(data::FashionMNIST(data::Split::Train), data::LoaderOptions(128).shuffle(true)),
//       data::make_batches(data::FashionMNIST(data::Split::Test), 512),
//       fasterai::LearnerOptions().seed(42).csv_log("train.csv"));
//   learn.fit_one_cycle(3, 3e-3);
//   learn.fit(2, 1e-4, {kd, sparsify});        // callbacks for this fit only
//   auto result = learn.validate();            // result.loss, result.metric("accuracy")
//
// The loop is the plain LibTorch loop (forward, loss, backward, step, zero_grad) with the
// hooks in between, so its cost per batch is that of a hand-written loop; the per-batch
// extras are a loss.item() for the smoothed loss and a clock read for the progress display.
// `train_loss` is fastai's smoothed loss (an exponential moving average, β = 0.98, debiased);
// `valid_loss` and the metrics are means over the validation examples.
//
// During an epoch a progress bar is drawn when the output is a terminal, and a few plain lines
// are written otherwise (logs, pipes); LearnerOptions::progress overrides the choice. If a
// callback, the model or the loss throws, the Learner zeroes the gradients, puts the model
// back in the mode it had before fit and rethrows — a callback's failure as a callback_error
// naming the callback and the hook — so the model can be trained or evaluated again.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/data/batches.hpp>
#include <fasterai/train/callback.hpp>
#include <fasterai/train/one_cycle.hpp>
#include <fasterai/train/optimizer.hpp>
#include <fasterai/train/parallel.hpp>
#include <fasterai/train/reporter.hpp>

namespace fasterai {

// Loss of a batch: prediction and targets in, a scalar tensor out.
using LossFunction = std::function<torch::Tensor(const torch::Tensor& pred, const torch::Tensor& target)>;

// A metric: the mean of a per-example quantity over a batch, averaged over the validation set
// weighted by batch size.
struct Metric {
  std::string name;
  std::function<torch::Tensor(const torch::Tensor& pred, const torch::Tensor& target)> fn;
};

// Fraction of examples whose highest-scoring class is the target.
inline Metric accuracy();

struct LearnerOptions {
  LearnerOptions() = default;
  TORCH_ARG(LossFunction, loss) = [](const torch::Tensor& pred, const torch::Tensor& target) {
    return torch::nn::functional::cross_entropy(pred, target);
  };
  TORCH_ARG(std::vector<Metric>, metrics) = std::vector<Metric>{accuracy()};
  TORCH_ARG(OptimizerKind, optimizer) = OptimizerKind::Adam;
  // Any other optimizer; it replaces `optimizer`. One-cycle sets the learning rate of its
  // groups and the momentum of SGD, RMSprop, Adam and AdamW.
  TORCH_ARG(OptimizerFactory, optimizer_factory) = nullptr;
  TORCH_ARG(double, momentum) = 0.9;      // SGD momentum, Adam β1, outside one-cycle
  TORCH_ARG(double, weight_decay) = 0.0;
  TORCH_ARG(torch::Device, device) = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  // Seeds LibTorch's generators at the start of every fit (shuffling, dropout) so that a fit
  // repeats exactly; seed before creating the model too for identical initial weights.
  TORCH_ARG(std::optional<std::uint64_t>, seed);
  // Also write each epoch's row to this CSV file: created by the first fit, appended by later
  // ones. Empty: no log.
  TORCH_ARG(std::string, csv_log);
  TORCH_ARG(detail::ostream_ptr, out) = &std::cout;  // table, progress and callback reports; nullptr: silent
  TORCH_ARG(Progress, progress) = Progress::Auto;
  // Stop the fit with an error at the first training batch whose loss is NaN or ±Inf, before
  // its backward pass: the weights stay those of the last finite step (which a NaN step would
  // overwrite everywhere), and the error names the epoch and batch. false: train on, as fastai
  // does without its TerminateOnNaN callback.
  TORCH_ARG(bool, stop_on_nan) = true;
  // Train data-parallel: the model is broadcast from rank 0 at construction and at each fit,
  // gradients are averaged after every backward (before any callback's before_step, so
  // sparsification sees the averaged gradients), validation sums are reduced so every rank
  // reports the same numbers, and only rank 0 prints and writes the CSV log (on the others
  // `out` and `csv_log` are cleared). Every rank must give the same number of training
  // batches per epoch (dist::shard does). nullptr: default_parallel_context(), which is
  // nullptr (one process) unless a launched job installed one.
  TORCH_ARG(std::shared_ptr<ParallelContext>, parallel) = nullptr;
};

struct ValidationResult {
  double loss = std::numeric_limits<double>::quiet_NaN();
  std::vector<std::pair<std::string, double>> metrics;
  std::int64_t examples = 0;
  // The value of the metric called `name`.
  double metric(const std::string& name) const;
};

class Learner {
 public:
  template <traceable Model>
  Learner(Model model, data::Batches train, data::Batches valid = {}, LearnerOptions options = {});

  // Train for `epochs` at a constant learning rate. `callbacks` join this fit only, after the
  // Learner's own (add_callback). Returns this fit's rows.
  std::vector<EpochRecord> fit(int epochs, double lr, std::vector<CallbackRef> callbacks = {});
  // Train for `epochs` under the one-cycle policy peaking at `max_lr`.
  std::vector<EpochRecord> fit_one_cycle(int epochs, double max_lr,
                                         std::vector<CallbackRef> callbacks = {},
                                         const OneCycleOptions& one_cycle = {});
  // Loss and metrics over the validation batches (or `data`), in eval mode without autograd.
  // The Learner's callbacks see these batches as in a fit's validation phase. Data-parallel,
  // every rank must call it (each validates its shard; the sums are reduced).
  ValidationResult validate();
  ValidationResult validate(const data::Batches& data);

  // A callback for every later fit and validate.
  void add_callback(CallbackRef callback) { callbacks_.add(std::move(callback)); }
  bool remove_callback(const Callback& callback) { return callbacks_.remove(callback); }

  torch::nn::Module& model() noexcept { return *module_; }
  torch::Tensor forward(const torch::Tensor& x) { return forward_(x); }
  torch::optim::Optimizer& optimizer() noexcept { return *optimizer_; }
  // Build a fresh optimizer from the options over the model's current parameters, dropping
  // the old one's state (momenta, Adam's averages) and gradients whose shape no longer fits
  // their parameter. fit and fit_one_cycle do this themselves
  // when a parameter was replaced or changed shape since the optimizer was built (an in-place
  // Pruner::prune_ shrinks weights with set_data): state of the old shapes cannot be stepped.
  void rebuild_optimizer();
  // True when the optimizer no longer matches the model's parameters (a parameter added,
  // removed, replaced or reshaped since it was built).
  bool optimizer_is_stale() const;
  const LearnerOptions& options() const noexcept { return options_; }
  const data::Batches& train_data() const noexcept { return train_; }
  const data::Batches& valid_data() const noexcept { return valid_; }
  // Every epoch of every fit so far.
  const std::vector<EpochRecord>& history() const noexcept { return history_; }
  // Where training stands (what callbacks see).
  const TrainingState& state() const noexcept { return state_; }
  // Make the next fit (or fit_one_cycle) start at `epoch` of its epochs, as if the earlier
  // ones had run: schedules (one-cycle, a SparsifyCallback's progress) pick up where a
  // checkpointed run left off, and does not reseed the generator. Used once; 0 is a normal
  // fit.
  void resume_at_epoch(int epoch);

 private:
  std::shared_ptr<torch::nn::Module> module_;
  std::function<torch::Tensor(const torch::Tensor&)> forward_;
  data::Batches train_;
  data::Batches valid_;
  LearnerOptions options_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  // The parameters the optimizer was built over (identity and shape), to notice a stale one.
  std::vector<std::pair<const void*, std::vector<std::int64_t>>> optimized_;
  CallbackList callbacks_;
  TrainingState state_;
  std::vector<EpochRecord> history_;
  bool csv_started_ = false;
  int resume_epoch_ = 0;

  // Training batches this rank takes per epoch.
  std::int64_t batches_per_epoch() const {
    const auto n = static_cast<std::int64_t>(train_.size());
    return options_.parallel() ? options_.parallel()->batches_per_epoch(n) : n;
  }

  using Hyper = std::function<void(double pct_train)>;
  void check_fit(const char* where, int epochs, double lr, const char* lr_name) const;
  std::vector<EpochRecord> run_fit(int epochs, const Hyper& schedule, std::vector<CallbackRef> extra);
  void predict(const torch::data::Example<>& batch, CallbackList& callbacks);
  void train_batch(const torch::data::Example<>& batch, CallbackList& callbacks, const Hyper& schedule);
  ValidationResult run_validation(const data::Batches& data, CallbackList& callbacks,
                                  const std::function<void()>& tick);
  void recover(bool was_training) noexcept;
  void clear_batch() noexcept;
};

inline Metric accuracy() {
  return {"accuracy", [](const torch::Tensor& pred, const torch::Tensor& target) {
            return pred.argmax(-1).eq(target).to(torch::kFloat).mean();
          }};
}

inline double ValidationResult::metric(const std::string& name) const {
  for (const auto& [n, v] : metrics)
    if (n == name) return v;
  std::string known;
  for (const auto& m : metrics) known += (known.empty() ? "" : ", ") + m.first;
  detail::throw_argument_error("fasterai::ValidationResult::metric", "name", name,
                               "one of the Learner's metrics: " + (known.empty() ? "(none)" : known));
}

template <traceable Model>
Learner::Learner(Model model, data::Batches train, data::Batches valid, LearnerOptions options)
    : train_(std::move(train)), valid_(std::move(valid)), options_(std::move(options)) {
  constexpr auto where = "fasterai::Learner";
  using detail::check_argument;
  check_argument(static_cast<bool>(options_.loss()), where, "loss", "an empty function",
                 "a loss function (pred, target) -> scalar tensor");
  for (const auto& m : options_.metrics())
    check_argument(!m.name.empty() && static_cast<bool>(m.fn), where, "metrics",
                   m.name.empty() ? "a metric without a name" : m.name,
                   "metrics with a name and a function");
  check_argument(options_.momentum() >= 0 && options_.momentum() < 1, where, "momentum",
                 options_.momentum(), "a momentum in [0, 1)");
  check_argument(std::isfinite(options_.weight_decay()) && options_.weight_decay() >= 0, where,
                 "weight_decay", options_.weight_decay(), "a finite value >= 0");
  if (options_.device().is_cuda())
    check_argument(torch::cuda::is_available(), where, "device", options_.device(),
                   "a device LibTorch can use (CUDA is not available)");

  if constexpr (requires { typename std::remove_cvref_t<Model>::ContainedType; }) {
    auto impl = model.ptr();
    module_ = impl;
    forward_ = [impl](const torch::Tensor& x) -> torch::Tensor { return impl->forward(x); };
  } else {
    static_assert(sizeof(Model) == 0,
                  "fasterai::Learner takes a module holder (torch::nn::Sequential, a "
                  "TORCH_MODULE type); wrap an implementation with std::make_shared and its holder");
  }
  module_->to(options_.device());
  if (!options_.parallel()) options_.parallel(default_parallel_context());
  if (auto& parallel = options_.parallel()) {
    check_argument(parallel->world_size() >= 1 && parallel->rank() >= 0 &&
                       parallel->rank() < parallel->world_size(),
                   where, "parallel", parallel->rank(), "a rank in [0, world_size)");
    if (parallel->rank() != 0) {
      options_.out(nullptr);
      options_.csv_log("");
    }
    parallel->broadcast_model(*module_);
  }
  rebuild_optimizer();
  state_.model = module_.get();
  state_.out = options_.out();
  state_.n_iter = batches_per_epoch();
}

namespace detail {

inline std::vector<std::pair<const void*, std::vector<std::int64_t>>> parameter_signature(
    const torch::nn::Module& module) {
  std::vector<std::pair<const void*, std::vector<std::int64_t>>> out;
  for (const auto& p : module.parameters())
    out.emplace_back(p.unsafeGetTensorImpl(), p.sizes().vec());
  return out;
}

}  // namespace detail

inline void Learner::rebuild_optimizer() {
  // Gradients of the old shapes would be added to the new ones by the next backward.
  for (auto& p : module_->parameters())
    if (p.grad().defined() && p.grad().sizes() != p.sizes()) p.mutable_grad() = torch::Tensor();
  auto fresh = detail::make_optimizer(
      {options_.optimizer(), options_.optimizer_factory(), options_.momentum(), options_.weight_decay()},
      module_->parameters());
  optimized_ = detail::parameter_signature(*module_);
  optimizer_ = std::move(fresh);
  state_.optimizer = optimizer_.get();
}

inline bool Learner::optimizer_is_stale() const {
  // Identity and sizes only: a few pointer and shape compares per parameter, no tensor data.
  const auto params = module_->parameters();
  if (params.size() != optimized_.size()) return true;
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].unsafeGetTensorImpl() != optimized_[i].first ||
        params[i].sizes() != c10::IntArrayRef(optimized_[i].second))
      return true;
  return false;
}

inline void Learner::resume_at_epoch(int epoch) {
  detail::check_argument(epoch >= 0, "fasterai::Learner::resume_at_epoch", "epoch", epoch,
                         "an epoch >= 0");
  resume_epoch_ = epoch;
}

inline void Learner::check_fit(const char* where, int epochs, double lr, const char* lr_name) const {
  using detail::check_argument;
  check_argument(epochs >= 1, where, "epochs", epochs, "a count >= 1");
  check_argument(resume_epoch_ < epochs, where, "epochs", epochs,
                 detail::concat("more epochs than the epoch to resume at (",
                                std::to_string(resume_epoch_), ")"));
  check_argument(std::isfinite(lr) && lr > 0, where, lr_name, lr, "a positive, finite learning rate");
  check_argument(!train_.empty(), where, "train", "no batches", "training data with at least one batch");
  check_argument(batches_per_epoch() >= 1, where, "train", train_.size(),
                 "at least one training batch per rank (batches are dealt out to the ranks)");
}

inline std::vector<EpochRecord> Learner::fit(int epochs, double lr, std::vector<CallbackRef> callbacks) {
  check_fit("fasterai::Learner::fit", epochs, lr, "lr");
  if (optimizer_is_stale()) rebuild_optimizer();
  set_learning_rate(*optimizer_, lr);
  return run_fit(epochs, nullptr, std::move(callbacks));
}

inline std::vector<EpochRecord> Learner::fit_one_cycle(int epochs, double max_lr,
                                                       std::vector<CallbackRef> callbacks,
                                                       const OneCycleOptions& one_cycle) {
  check_fit("fasterai::Learner::fit_one_cycle", epochs, max_lr, "max_lr");
  if (optimizer_is_stale()) rebuild_optimizer();
  const OneCycle schedule(max_lr, one_cycle);
  const auto saved = detail::momenta(*optimizer_);
  const bool cycle = one_cycle.cycle_momentum();
  auto apply = [this, schedule, cycle](double pct) {
    set_learning_rate(*optimizer_, schedule.lr(pct));
    if (cycle) set_momentum(*optimizer_, schedule.momentum(pct));
  };
  try {
    auto records = run_fit(epochs, apply, std::move(callbacks));
    detail::restore_momenta(*optimizer_, saved);
    return records;
  } catch (...) {
    detail::restore_momenta(*optimizer_, saved);
    throw;
  }
}

inline std::vector<EpochRecord> Learner::run_fit(int epochs, const Hyper& schedule,
                                                 std::vector<CallbackRef> extra) {
  CallbackList callbacks(callbacks_.callbacks());
  for (auto& cb : extra) callbacks.add(std::move(cb));
  std::vector<std::string> metric_names;
  for (const auto& m : options_.metrics()) metric_names.push_back(m.name);
  detail::Reporter report(options_.out(), options_.progress(), metric_names, options_.csv_log(),
                          !csv_started_);
  csv_started_ = true;
  // A resumed fit keeps the generator where the checkpoint put it.
  if (options_.seed() && resume_epoch_ == 0) torch::manual_seed(*options_.seed());

  auto& s = state_;
  s = TrainingState{};
  s.model = module_.get();
  s.optimizer = optimizer_.get();
  s.out = options_.out();
  s.n_epochs = epochs;
  s.n_iter = batches_per_epoch();
  const int first_epoch = std::exchange(resume_epoch_, 0);
  s.epoch = first_epoch;
  s.train_iter = static_cast<std::int64_t>(first_epoch) * s.n_iter;

  const bool was_training = module_->is_training();
  std::vector<EpochRecord> records;
  try {
    const auto& parallel = options_.parallel();
    if (parallel) parallel->begin_fit(*module_, s.n_iter);
    callbacks.before_fit(s);
    report.header();
    detail::SmoothLoss smooth;
    for (int epoch = first_epoch; epoch < epochs; ++epoch) {
      const auto start = std::chrono::steady_clock::now();
      s.epoch = epoch;
      s.iter = 0;
      s.training = true;
      module_->train();
      report.new_epoch();
      callbacks.before_epoch(s);
      if (parallel) parallel->begin_epoch(epoch);
      std::int64_t index = 0;
      train_.for_each([&](const torch::data::Example<>& batch) {
        if (index == 0 && parallel) parallel->order_drawn(epoch);
        if (parallel && !parallel->takes(index++, s.n_iter)) return;
        train_batch(batch, callbacks, schedule);
        smooth.add(s.loss.item<double>());
        callbacks.after_batch(s);
        clear_batch();
        ++s.iter;
        ++s.train_iter;
        report.progress("train", epoch, epochs, s.iter, s.n_iter, smooth.value(),
                        detail::seconds_since(start));
      });

      EpochRecord record;
      record.epoch = epoch;
      record.train_loss = smooth.value();
      // The smoothed loss is linear in the per-batch losses, so the mean of the ranks' values
      // is the smoothed loss of the global batches' mean losses.
      if (parallel) record.train_loss = parallel->mean(record.train_loss);
      if (!valid_.empty()) {
        const auto valid_start = std::chrono::steady_clock::now();
        const auto total = static_cast<std::int64_t>(valid_.size());
        auto result = run_validation(valid_, callbacks, [&] {
          report.progress("valid", epoch, epochs, s.iter, total,
                          std::numeric_limits<double>::quiet_NaN(),
                          detail::seconds_since(valid_start));
        });
        record.valid_loss = result.loss;
        for (const auto& m : result.metrics) record.metrics.push_back(m.second);
      } else {
        record.metrics.assign(options_.metrics().size(), std::numeric_limits<double>::quiet_NaN());
      }
      s.training = true;
      record.seconds = detail::seconds_since(start);
      report.row(record);
      records.push_back(record);
      history_.push_back(record);
      callbacks.after_epoch(s);
    }
    callbacks.after_fit(s);
  } catch (...) {
    report.end_bar();
    recover(was_training);
    throw;
  }
  module_->train(was_training);
  return records;
}

// The part of a batch that training and validation share: inputs to the device, prediction
// and loss, with the callbacks' hooks in between.
inline void Learner::predict(const torch::data::Example<>& batch, CallbackList& callbacks) {
  auto& s = state_;
  s.x = batch.data.to(options_.device());
  s.y = batch.target.to(options_.device());
  callbacks.before_batch(s);
  s.pred = forward_(s.x);
  callbacks.after_pred(s);
  s.loss = options_.loss()(s.pred, s.y);
  callbacks.after_loss(s);
}

inline void Learner::train_batch(const torch::data::Example<>& batch, CallbackList& callbacks,
                                 const Hyper& schedule) {
  auto& s = state_;
  if (schedule) schedule(s.pct_train());
  predict(batch, callbacks);
  if (!s.loss.defined() || s.loss.numel() != 1)
    detail::throw_argument_error("fasterai::Learner", "loss",
                                 s.loss.defined() ? s.loss.sizes() : c10::IntArrayRef{},
                                 "a loss function (or callback) that returns a scalar");
  if (options_.stop_on_nan())
    if (const double loss = s.loss.item<double>(); !std::isfinite(loss))
      throw std::runtime_error(detail::concat(
          "fasterai::Learner::fit: the training loss is ", std::to_string(loss), " at epoch ",
          std::to_string(s.epoch), ", batch ", std::to_string(s.iter), "; the weights are those of the step before (LearnerOptions::stop_on_nan)"));
  s.loss.backward();
  if (auto& parallel = options_.parallel()) parallel->average_gradients(module_->parameters());
  callbacks.before_step(s);
  optimizer_->step();
  callbacks.after_step(s);
  optimizer_->zero_grad();
}

inline ValidationResult Learner::validate() { return validate(valid_); }

inline ValidationResult Learner::validate(const data::Batches& data) {
  const bool was_training = module_->is_training();
  const bool was_in_training_phase = state_.training;
  try {
    auto result = run_validation(data, callbacks_, nullptr);
    module_->train(was_training);
    state_.training = was_in_training_phase;
    return result;
  } catch (...) {
    recover(was_training);
    throw;
  }
}

inline ValidationResult Learner::run_validation(const data::Batches& data, CallbackList& callbacks,
                                                const std::function<void()>& tick) {
  torch::NoGradGuard no_grad;
  auto& parallel = options_.parallel();
  if (parallel) parallel->broadcast_buffers(*module_);
  module_->eval();
  auto& s = state_;
  s.training = false;
  s.iter = 0;
  const auto& metrics = options_.metrics();
  double loss_sum = 0;
  std::vector<double> metric_sums(metrics.size(), 0.0);
  std::int64_t count = 0, index = 0;
  data.for_each([&](const torch::data::Example<>& batch) {
    if (parallel && !parallel->takes(index++, -1)) return;
    predict(batch, callbacks);
    const std::int64_t n = s.x.dim() > 0 ? s.x.size(0) : 1;
    loss_sum += s.loss.item<double>() * double(n);
    for (size_t i = 0; i < metrics.size(); ++i)
      metric_sums[i] += metrics[i].fn(s.pred, s.y).item<double>() * double(n);
    count += n;
    callbacks.after_batch(s);
    clear_batch();
    ++s.iter;
    if (tick) tick();
  });
  if (parallel) {  // each rank saw its shard: sums and counts add up to the whole set
    std::vector<double> sums{loss_sum, static_cast<double>(count)};
    sums.insert(sums.end(), metric_sums.begin(), metric_sums.end());
    sums = parallel->sum(std::move(sums));
    loss_sum = sums[0];
    count = static_cast<std::int64_t>(sums[1]);
    std::copy(sums.begin() + 2, sums.end(), metric_sums.begin());
  }
  ValidationResult result;
  result.examples = count;
  if (count > 0) result.loss = loss_sum / double(count);
  for (size_t i = 0; i < metrics.size(); ++i)
    result.metrics.emplace_back(metrics[i].name, count > 0 ? metric_sums[i] / double(count)
                                                           : std::numeric_limits<double>::quiet_NaN());
  return result;
}

inline void Learner::clear_batch() noexcept {
  // Drop the batch and the autograd graph hanging off the prediction and the loss.
  state_.x = torch::Tensor();
  state_.y = torch::Tensor();
  state_.pred = torch::Tensor();
  state_.loss = torch::Tensor();
}

inline void Learner::recover(bool was_training) noexcept {
  clear_batch();
  state_.training = true;
  try {
    optimizer_->zero_grad();
  } catch (...) {
  }
  try {
    module_->train(was_training);
  } catch (...) {
  }
}

}  // namespace fasterai
