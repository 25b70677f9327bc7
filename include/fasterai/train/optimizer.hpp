#pragma once
// The Learner's optimizers: the kinds fastai defaults to (Adam with fastai's β and ε, AdamW,
// SGD) or any optimizer a factory makes, and the momentum that one-cycle cycles and puts back.

#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace fasterai {

enum class OptimizerKind {
  Adam,   // β = (momentum, 0.99), ε = 1e-5, as fastai
  AdamW,  // Adam with decoupled weight decay
  SGD,    // with `momentum`
};

using OptimizerFactory =
    std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor> parameters)>;

namespace detail {

// What make_optimizer reads of LearnerOptions.
struct OptimizerSettings {
  OptimizerKind kind = OptimizerKind::Adam;
  OptimizerFactory factory;  // replaces `kind` when set
  double momentum = 0.9;
  double weight_decay = 0.0;
};

// The optimizer over `params`, at a placeholder learning rate (the Learner sets the rate of
// every fit).
inline std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSettings& o,
                                                               std::vector<torch::Tensor> params) {
  namespace optim = torch::optim;
  if (o.factory) return o.factory(std::move(params));
  switch (o.kind) {
    case OptimizerKind::AdamW:
      return std::make_unique<optim::AdamW>(
          std::move(params), optim::AdamWOptions(1e-3)
                                 .betas(std::make_tuple(o.momentum, 0.99))
                                 .eps(1e-5)
                                 .weight_decay(o.weight_decay));
    case OptimizerKind::SGD:
      return std::make_unique<optim::SGD>(
          std::move(params),
          optim::SGDOptions(1e-3).momentum(o.momentum).weight_decay(o.weight_decay));
    case OptimizerKind::Adam:
    default:
      return std::make_unique<optim::Adam>(std::move(params),
                                           optim::AdamOptions(1e-3)
                                               .betas(std::make_tuple(o.momentum, 0.99))
                                               .eps(1e-5)
                                               .weight_decay(o.weight_decay));
  }
}

// Momentum of each parameter group (nullopt where the optimizer has none), to put back after
// one-cycle has cycled it.
inline std::vector<std::optional<double>> momenta(torch::optim::Optimizer& optimizer) {
  std::vector<std::optional<double>> out;
  for (auto& group : optimizer.param_groups()) {
    auto& o = group.options();
    if (auto* a = dynamic_cast<torch::optim::AdamOptions*>(&o)) out.emplace_back(std::get<0>(a->betas()));
    else if (auto* w = dynamic_cast<torch::optim::AdamWOptions*>(&o)) out.emplace_back(std::get<0>(w->betas()));
    else if (auto* s = dynamic_cast<torch::optim::SGDOptions*>(&o)) out.emplace_back(s->momentum());
    else if (auto* r = dynamic_cast<torch::optim::RMSpropOptions*>(&o)) out.emplace_back(r->momentum());
    else out.emplace_back();
  }
  return out;
}

inline void restore_momenta(torch::optim::Optimizer& optimizer,
                            const std::vector<std::optional<double>>& saved) {
  auto& groups = optimizer.param_groups();
  for (size_t i = 0; i < groups.size() && i < saved.size(); ++i) {
    if (!saved[i]) continue;
    auto& o = groups[i].options();
    if (auto* a = dynamic_cast<torch::optim::AdamOptions*>(&o)) a->betas(std::make_tuple(*saved[i], std::get<1>(a->betas())));
    else if (auto* w = dynamic_cast<torch::optim::AdamWOptions*>(&o)) w->betas(std::make_tuple(*saved[i], std::get<1>(w->betas())));
    else if (auto* s = dynamic_cast<torch::optim::SGDOptions*>(&o)) s->momentum(*saved[i]);
    else if (auto* r = dynamic_cast<torch::optim::RMSpropOptions*>(&o)) r->momentum(*saved[i]);
  }
}

}  // namespace detail
}  // namespace fasterai
