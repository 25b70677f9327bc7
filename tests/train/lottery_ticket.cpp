#include "catch.hpp"

#include <sstream>
#include <string>
#include <vector>

#include <fasterai/sparse/lottery_ticket.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/sparsify_callback.hpp>

#include "fixtures.hpp"

using namespace fasterai;

// docs/toolbox.md's loop: a Learner per round, a SparsifyCallback over the ticket's sparsifier.
TEST_CASE("a lottery ticket trained by a Learner: masks in force through Adam, survivors rewound",
          "[lottery_ticket][learner]") {
  torch::manual_seed(0);
  auto model = fixtures::mlp(32);
  std::vector<torch::Tensor> init;
  for (const auto& p : model->parameters()) init.push_back(p.detach().clone());
  LotteryTicket<> ticket(model, SparsifierOptions(75).include_linear(true), 2);
  std::ostringstream out;
  // On the CPU, where the saved initial weights are (the Learner on CUDA is tests/cuda's).
  Learner learn(model, fixtures::blobs(128, 16, 1), fixtures::blobs(64, 32, 2),
                LearnerOptions().out(&out).progress(Progress::None).device(torch::kCPU));
  torch::Tensor previous;
  for (int round = 0; round <= ticket.rounds(); ++round) {
    if (round > 0) {
      ticket.next_round();
      const auto mask = ticket.sparsifier().mask("0");
      const auto w = model->named_parameters()["0.weight"].detach();
      CHECK(w.masked_select(~mask).equal(init[0].masked_select(~mask)));
      if (previous.defined()) CHECK((previous & ~mask).sum().item<std::int64_t>() == 0);
      previous = mask.clone();
    }
    SparsifyCallback keep(ticket.sparsifier());
    learn.fit(2, 1e-2, {keep});
    if (previous.defined()) {
      const auto w = model->named_parameters()["0.weight"].detach();
      CHECK(w.masked_select(previous).eq(0).all().item<bool>());  // Adam did not revive them
      CHECK(w.masked_select(~previous).ne(0).all().item<bool>());
    }
  }
  // Global over 2*32 + 32*3 = 160 weights at 75%: 120 pruned.
  CHECK(ticket.sparsifier().report().global_percent() == Approx(75.0));
  CHECK(learn.validate().metric("accuracy") > 0.6);
}
