#pragma once
// Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin 2019, "The
// lottery ticket hypothesis"; Frankle et al. 2019, "Stabilizing the lottery ticket hypothesis"
// for rewinding to iteration k instead of initialization).
//
//   fasterai::LotteryTicket<> ticket(model, fasterai::SparsifierOptions(90).include_linear(true),
//                                    /*rounds=*/3);     // saves the weights now (initialization)
//   for (int round = 0; round <= ticket.rounds(); ++round) {
//     if (round > 0) ticket.next_round();  // prune by magnitude, rewind the survivors
//     train(model, ticket.sparsifier());   // fresh optimizer; after each optimizer step
//   }                                      // sparsifier.apply() (or a SparsifyCallback)
//
// or, the same loop: fasterai::lottery_ticket(model, options, rounds, train) with
// train(LotteryTicket&, int round). To rewind to iteration k (Frankle et al.: k of a few hundred
// iterations makes tickets work on larger networks), call save_rewind_point() at iteration k of
// round 0.
//
// Round r (1..rounds) prunes to 100·(1 − (1 − S/100)^(r/rounds)) percent, S the options' target:
// each round removes the same fraction of the weights left. Masks nest from round to round: the
// sparsifier's masks are applied before each prune, so the weights pruned earlier are zero and a
// magnitude criterion (L1, L2, LAMP) selects them again first. After pruning, every parameter
// (weights, biases, norms) goes back to its saved value and the masks are re-applied. Buffers
// (BatchNorm statistics) are not rewound: training re-estimates them.
//
// The sparsifier uses schedule::Constant, so a SparsifyCallback over it (or step()) keeps the
// round's masks in force while training and never prunes further on its own.

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/sparse/criteria.hpp>
#include <fasterai/sparse/sparsifier.hpp>

namespace fasterai {

template <granularity_policy Granularity = granularity::Weight, method_policy Method = method::Global,
          criteria_policy Criteria = criteria::L1>
class LotteryTicket {
 public:
  using sparsifier_type = Sparsifier<Granularity, Method, Criteria, schedule::Constant>;

  // Saves `model`'s parameters as the rewind point.
  template <module Model>
    requires structure_known_statically<Model, Granularity>
  LotteryTicket(Model& model, SparsifierOptions options, int rounds)
      : rounds_(checked_rounds(rounds)), sparsifier_(model, std::move(options)) {
    bind(detail::impl(model));
  }

  // Any module with a tensor forward, traced on `example` when the granularity needs it.
  template <traceable Model>
  LotteryTicket(Model& model, const torch::Tensor& example, SparsifierOptions options, int rounds)
      : rounds_(checked_rounds(rounds)), sparsifier_(model, example, std::move(options)) {
    bind(detail::impl(model));
  }

  // Replace the rewind point by the parameters now (iteration k of the first training).
  void save_rewind_point() {
    detail::check_argument(round_ == 0, where("save_rewind_point"), "round", round_,
                           "0: the rewind point is taken while the dense network trains");
    torch::NoGradGuard no_grad;
    for (std::size_t i = 0; i < parameters_.size(); ++i) saved_[i] = parameters_[i].detach().clone();
  }

  // Prune to the next round's sparsity by the criteria on the trained weights, then rewind.
  void next_round() {
    detail::check_argument(round_ < rounds_, where("next_round"), "round", round_ + 1,
                           detail::concat("at most rounds = ", std::to_string(rounds_)));
    sparsifier_.apply();  // the weights pruned before are zero: selected again first
    sparsifier_.prune(round_sparsity(round_ + 1));
    rewind();
    ++round_;
  }

  // Every parameter back to its saved value, the masks in force.
  void rewind() {
    {
      torch::NoGradGuard no_grad;
      for (std::size_t i = 0; i < parameters_.size(); ++i) parameters_[i].copy_(saved_[i]);
    }
    sparsifier_.apply();
  }

  // The sparsity (percent) round r prunes to; 0 for round 0.
  double round_sparsity(int r) const {
    detail::check_argument(r >= 0 && r <= rounds_, where("round_sparsity"), "round", r,
                           detail::concat("a round in [0, ", std::to_string(rounds_), "]"));
    const double kept = 1.0 - sparsifier_.target_sparsity() / 100.0;
    return 100.0 * (1.0 - std::pow(kept, double(r) / double(rounds_)));
  }

  int rounds() const { return rounds_; }
  int round() const { return round_; }  // rounds of pruning done
  sparsifier_type& sparsifier() { return sparsifier_; }
  const sparsifier_type& sparsifier() const { return sparsifier_; }
  // The saved value of a parameter, by its name in named_parameters().
  const torch::Tensor& rewind_point(const std::string& parameter) const {
    for (std::size_t i = 0; i < names_.size(); ++i)
      if (names_[i] == parameter) return saved_[i];
    detail::throw_argument_error(where("rewind_point"), "parameter", parameter,
                                 "the name of one of the model's parameters");
  }

 private:
  static std::string where(const char* fn) { return detail::concat("fasterai::LotteryTicket::", fn); }
  static int checked_rounds(int rounds) {
    detail::check_argument(rounds >= 1, where("LotteryTicket"), "rounds", rounds, "a count >= 1");
    return rounds;
  }
  void bind(torch::nn::Module& m) {
    torch::NoGradGuard no_grad;
    for (const auto& p : m.named_parameters()) {
      names_.push_back(p.key());
      parameters_.push_back(p.value());
      saved_.push_back(p.value().detach().clone());
    }
  }

  int rounds_;
  int round_ = 0;
  sparsifier_type sparsifier_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> parameters_, saved_;
};

// The whole procedure: train(ticket, 0) on the dense network, then for each round r in
// 1..rounds ticket.next_round() and train(ticket, r). Weights are saved at the start (call
// ticket.save_rewind_point() inside the first train to rewind to iteration k instead).
template <granularity_policy Granularity = granularity::Weight, method_policy Method = method::Global,
          criteria_policy Criteria = criteria::L1, module Model, class Train>
  requires std::invocable<Train&, LotteryTicket<Granularity, Method, Criteria>&, int>
void lottery_ticket(Model& model, SparsifierOptions options, int rounds, Train&& train) {
  LotteryTicket<Granularity, Method, Criteria> ticket(model, std::move(options), rounds);
  train(ticket, 0);
  for (int r = 1; r <= rounds; ++r) {
    ticket.next_round();
    train(ticket, r);
  }
}

}  // namespace fasterai
