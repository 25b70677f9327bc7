#pragma once
// SparsifyCallback: sparsify a network while it trains (the fasterai article's SparsifyCallback,
// and the Automated Gradual Pruning of Zhu & Gupta when the sparsifier's schedule is Gradual).
// At each training batch the sparsifier's schedule is advanced to the fraction of the span done,
// the pruned weights' gradients are zeroed before the optimizer step and the masks re-applied
// after it, so that momentum, Adam's running averages and weight decay cannot revive a pruned
// weight. Reports go where the fasterai article (2020) shows them:
//
//   Pruning of Weight/Local/L1/Gradual until a sparsity of 50%
//   epoch  train_loss  valid_loss  accuracy  time
//   0      ...
//   Sparsity at epoch 0: 35.94%
//   ...
//   Final Sparsity: 50.00%
//
// With a Learner:
//   fasterai::Sparsifier<granularity::Weight, method::Local, criteria::L1, schedule::Gradual>
//       sparsifier(model, fasterai::SparsifierOptions(50).include_linear(true));
//   fasterai::SparsifyCallback sparsify(sparsifier);         // or a shared_ptr
//   learn.fit(10, 1e-4, {sparsify});
//
// In a hand-written loop call the sparsifier directly, with progress the fraction of training
// done after this batch (this is what the callback does between start and end):
//   loss.backward();
//   sparsifier.step(progress);  sparsifier.mask_gradients();
//   optimizer.step();
//   sparsifier.apply();
//   ...after the last epoch: sparsifier.step(1.0);
// or drive the callback's hooks from a TrainingState (see train/callback.hpp).
//
// `start` and `end` (fractions of the fit) limit the span the schedule is spread over: before
// `start` nothing is pruned; after `end` the target holds and the masks stay in force. After
// the fit the sparsifier takes one last step(1.0), so the run ends exactly at the target.

#include <algorithm>
#include <iomanip>
#include <memory>
#include <ostream>
#include <string>
#include <utility>

#include <fasterai/core/error.hpp>
#include <fasterai/sparse/sparsifier_interface.hpp>
#include <fasterai/train/callback.hpp>

namespace fasterai {

struct SparsifyCallbackOptions {
  SparsifyCallbackOptions() = default;
  TORCH_ARG(double, start) = 0.0;           // fraction of the fit where pruning begins
  TORCH_ARG(double, end) = 1.0;             // fraction of the fit where the target is reached
  TORCH_ARG(detail::ostream_ptr, out) = nullptr;  // reports; nullptr: the loop's (TrainingState::out)
  TORCH_ARG(bool, verbose) = true;          // print the per-epoch and final sparsity
};

class SparsifyCallback : public Callback {
 public:
  // Borrow a sparsifier the caller keeps alive.
  explicit SparsifyCallback(SparsifierInterface& sparsifier, SparsifyCallbackOptions options = {});
  // Share ownership of a sparsifier.
  explicit SparsifyCallback(std::shared_ptr<SparsifierInterface> sparsifier,
                            SparsifyCallbackOptions options = {});

  // The schedule's progress at `pct` of the fit: 0 up to start, 1 from end on.
  double progress(double pct) const {
    const double span = options_.end() - options_.start();
    return std::clamp((pct - options_.start()) / span, 0.0, 1.0);
  }

  SparsifierInterface& sparsifier() const noexcept { return *sparsifier_; }
  const SparsifyCallbackOptions& options() const noexcept { return options_; }

  std::string name() const override { return "SparsifyCallback"; }
  inline void before_fit(TrainingState& state) override;
  inline void before_step(TrainingState& state) override;
  inline void after_step(TrainingState& state) override;
  inline void after_epoch(TrainingState& state) override;
  inline void after_fit(TrainingState& state) override;

 private:
  std::shared_ptr<SparsifierInterface> sparsifier_;
  SparsifyCallbackOptions options_;
  bool masking_ = false;        // pruning has begun in this fit: masks are kept in force
  double last_progress_ = -1;   // the schedule's progress at the last step()

  std::ostream* out(const TrainingState& state) const {
    if (!options_.verbose()) return nullptr;
    return options_.out() ? options_.out() : state.out;
  }
  void report(const TrainingState& state, const std::string& label, double sparsity) const;
};

inline SparsifyCallback::SparsifyCallback(SparsifierInterface& sparsifier,
                                          SparsifyCallbackOptions options)
    : SparsifyCallback(std::shared_ptr<SparsifierInterface>(std::shared_ptr<SparsifierInterface>(),
                                                            &sparsifier),
                       std::move(options)) {}

inline SparsifyCallback::SparsifyCallback(std::shared_ptr<SparsifierInterface> sparsifier,
                                          SparsifyCallbackOptions options)
    : sparsifier_(std::move(sparsifier)), options_(std::move(options)) {
  constexpr auto where = "fasterai::SparsifyCallback";
  detail::check_argument(sparsifier_ != nullptr, where, "sparsifier", "nullptr", "a sparsifier");
  detail::check_argument(options_.start() >= 0 && options_.start() < 1, where, "start",
                         options_.start(), "a fraction of training in [0, 1)");
  detail::check_argument(options_.end() > options_.start() && options_.end() <= 1, where, "end",
                         options_.end(), "a fraction of training in (start, 1]");
}

inline void SparsifyCallback::before_fit(TrainingState& state) {
  detail::check_argument(state.total_iter() > 0, "fasterai::SparsifyCallback", "n_epochs * n_iter",
                         state.total_iter(),
                         "a positive number of training batches in the TrainingState");
  masking_ = false;
  last_progress_ = -1;
  if (auto* os = out(state)) {
    *os << "Pruning of " << sparsifier_->name() << " until a sparsity of "
        << sparsifier_->target_sparsity() << "%\n";
  }
}

inline void SparsifyCallback::before_step(TrainingState& state) {
  if (!state.training) return;
  // The fraction of the fit done once this batch's step is taken: the last batch reaches 1.
  const double pct = static_cast<double>(state.train_iter + 1) /
                     static_cast<double>(std::max<std::int64_t>(state.total_iter(), 1));
  if (pct <= options_.start()) return;
  const double p = progress(pct);
  if (p != last_progress_) {
    sparsifier_->step(p);
    last_progress_ = p;
  }
  masking_ = true;
  sparsifier_->mask_gradients();
}

inline void SparsifyCallback::after_step(TrainingState& state) {
  if (state.training && masking_) sparsifier_->apply();
}

inline void SparsifyCallback::after_epoch(TrainingState& state) {
  report(state, "Sparsity at epoch " + std::to_string(state.epoch), sparsifier_->sparsity());
}

inline void SparsifyCallback::after_fit(TrainingState& state) {
  // Whatever the span covered, the fit ends at the target. When the last batch got there, the
  // masks are final: stepping again would score once more, and a criterion that reads
  // gradients finds none (LibTorch 2.x's zero_grad() sets them to none after the last step).
  if (last_progress_ != 1.0) sparsifier_->step(1.0);
  last_progress_ = 1.0;
  sparsifier_->apply();
  report(state, "Final Sparsity", sparsifier_->sparsity());
}

inline void SparsifyCallback::report(const TrainingState& state, const std::string& label,
                                     double sparsity) const {
  auto* os = out(state);
  if (!os) return;
  const auto flags = os->flags();
  const auto precision = os->precision();
  *os << label << ": " << std::fixed << std::setprecision(2) << sparsity << "%\n";
  os->flags(flags);
  os->precision(precision);
  os->flush();
}

}  // namespace fasterai
