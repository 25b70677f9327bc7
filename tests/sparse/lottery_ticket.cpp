#include "catch.hpp"

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <fasterai/sparse/lottery_ticket.hpp>

namespace nn = torch::nn;
using namespace fasterai;
namespace g = fasterai::granularity;
namespace m = fasterai::method;
namespace c = fasterai::criteria;

namespace {

nn::Sequential mlp() {
  torch::manual_seed(11);
  return nn::Sequential(nn::Linear(4, 16), nn::ReLU(), nn::Linear(16, 3));
}

// A few Adam steps on a fixed synthetic batch, the masks kept in force; `at_step(k)` runs after
// step k.
template <class Ticket, class AtStep>
void train(nn::Sequential& model, Ticket& ticket, int steps, AtStep&& at_step) {
  torch::manual_seed(12);
  const auto x = torch::randn({64, 4});
  const auto y = x.narrow(1, 0, 3).argmax(1);
  torch::optim::Adam opt(model->parameters(), 0.05);
  for (int k = 1; k <= steps; ++k) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    ticket.sparsifier().mask_gradients();
    opt.step();
    ticket.sparsifier().apply();
    at_step(k);
  }
}

std::map<std::string, torch::Tensor> parameters(const nn::Sequential& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model->named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

torch::Tensor param(const nn::Sequential& model, const std::string& name) {
  return model->named_parameters()[name].detach();
}

}  // namespace

TEST_CASE("lottery ticket: survivors rewound to their initial values, masks nested, sparsity per round",
          "[lottery_ticket]") {
  auto model = mlp();
  const auto init = parameters(model);
  LotteryTicket<> ticket(model, SparsifierOptions(87.5).include_linear(true), 3);
  // Each round keeps half of what was left: 50%, 75%, 87.5%.
  CHECK(ticket.round_sparsity(0) == 0.0);
  CHECK(ticket.round_sparsity(1) == Approx(50.0));
  CHECK(ticket.round_sparsity(2) == Approx(75.0));
  CHECK(ticket.round_sparsity(3) == Approx(87.5));

  std::map<std::string, torch::Tensor> previous_masks;
  for (int round = 0; round <= 3; ++round) {
    if (round > 0) {
      ticket.next_round();
      CHECK(ticket.round() == round);
      std::int64_t pruned = 0;
      for (const auto& layer : {std::string("0"), std::string("2")}) {
        const auto mask = ticket.sparsifier().mask(layer);
        const auto w = param(model, layer + ".weight");
        const auto saved = init.at(layer + ".weight");
        // Kept positions hold the initial weights exactly; pruned ones are zero.
        CHECK(w.masked_select(~mask).equal(saved.masked_select(~mask)));
        CHECK(w.masked_select(mask).eq(0).all().item<bool>());
        CHECK(ticket.rewind_point(layer + ".weight").equal(saved));
        // Biases (not pruned) are rewound too.
        CHECK(param(model, layer + ".bias").equal(init.at(layer + ".bias")));
        if (previous_masks.count(layer)) CHECK((previous_masks.at(layer) & ~mask).sum().item<std::int64_t>() == 0);
        previous_masks[layer] = mask.clone();
        pruned += mask.sum().item<std::int64_t>();
      }
      // Global over 64 + 48 weights: floor(112 * s / 100).
      CHECK(pruned == static_cast<std::int64_t>(std::floor(112 * ticket.round_sparsity(round) / 100)));
    }
    train(model, ticket, 30, [](int) {});
    for (const auto& [layer, mask] : previous_masks)  // training kept the masks in force
      CHECK(param(model, layer + ".weight").masked_select(mask).eq(0).all().item<bool>());
  }
}

TEST_CASE("lottery ticket with rewinding to iteration k", "[lottery_ticket]") {
  auto model = mlp();
  LotteryTicket<g::Weight, m::Local> ticket(model, SparsifierOptions(50).include_linear(true), 1);
  std::map<std::string, torch::Tensor> at_k;
  train(model, ticket, 20, [&](int k) {
    if (k == 5) {
      ticket.save_rewind_point();
      at_k = parameters(model);
    }
  });
  const auto trained = parameters(model);
  ticket.next_round();
  for (const auto& layer : {std::string("0"), std::string("2")}) {
    const auto mask = ticket.sparsifier().mask(layer);
    const auto w = param(model, layer + ".weight");
    CHECK(w.masked_select(~mask).equal(at_k.at(layer + ".weight").masked_select(~mask)));
    // Local L1 on the trained weights: the half of smallest trained magnitude went.
    const auto magnitude = trained.at(layer + ".weight").abs();
    CHECK(magnitude.masked_select(mask).max().item<float>() <= magnitude.masked_select(~mask).min().item<float>());
    CHECK(mask.sum().item<std::int64_t>() == mask.numel() / 2);
  }
  CHECK_THROWS_WITH(ticket.save_rewind_point(), Catch::Contains("'round' = 1"));
  CHECK_THROWS_WITH(ticket.next_round(), Catch::Contains("'round' = 2") && Catch::Contains("rounds = 1"));
}

TEST_CASE("lottery_ticket runs train once per round, and Filter tickets prune nested filters",
          "[lottery_ticket]") {
  auto model = mlp();
  std::vector<int> rounds;
  std::map<std::string, torch::Tensor> previous;
  lottery_ticket<g::Filter, m::Local>(model, SparsifierOptions(75).include_linear(true), 2,
                                      [&](LotteryTicket<g::Filter, m::Local>& t, int r) {
                                        CHECK(t.round() == r);
                                        rounds.push_back(r);
                                        if (r > 0) {
                                          // 16 hidden units: floor(16 * 50%) = 8, then floor(16 * 75%) = 12
                                          const auto mask = t.sparsifier().mask("0");
                                          const auto filters = mask.all(1);
                                          CHECK(filters.sum().item<std::int64_t>() == (r == 1 ? 8 : 12));
                                          CHECK(mask.any(1).equal(filters));  // whole rows
                                          if (previous.count("0")) CHECK((previous.at("0") & ~filters).sum().item<std::int64_t>() == 0);
                                          previous["0"] = filters.clone();
                                        }
                                        train(model, t, 10, [](int) {});
                                      });
  CHECK(rounds == std::vector<int>{0, 1, 2});
  CHECK_THROWS_WITH((LotteryTicket<>(model, SparsifierOptions(50).include_linear(true), 0)),
                    Catch::Contains("'rounds' = 0") && Catch::Contains(">= 1"));
}
