#pragma once
// The run-time face of every `Sparsifier<Granularity, Method, Criteria, Schedule>`: what a
// training loop, a callback or a harness needs, without knowing the compile-time policies.
// The runtime factory (sparse/factory.hpp) returns this interface.
//
// In a training step the calls go, in this order:
//   loss.backward();
//   sparsifier.step(progress);     // schedule -> target; masks recomputed only if it changed
//   sparsifier.mask_gradients();   // pruned weights get no gradient (SGD, momentum, Adam)
//   optimizer.step();
//   sparsifier.apply();            // weight decay / momentum cannot revive a pruned weight

#include <string>

#include <fasterai/layers/sparsity_report.hpp>

namespace fasterai {

class SparsifierInterface {
 public:
  virtual ~SparsifierInterface() = default;

  // Sparsify one-shot to `sparsity` percent in [0, 100) and apply the masks.
  virtual void prune(double sparsity) = 0;
  // Set the target from the schedule at training progress in [0, 1], recompute the masks
  // when the target changed, and apply them.
  virtual void step(double progress) = 0;
  // Re-apply the current masks to the weights (and, for Filter granularity, to the biases and
  // the following BatchNorm).
  virtual void apply() = 0;
  // Zero the gradients of pruned weights; call between backward() and optimizer.step().
  virtual void mask_gradients() = 0;
  // The sparsity percentage currently in force (the last prune() or step() target).
  virtual double sparsity() const = 0;
  // The final target sparsity a schedule leads to.
  virtual double target_sparsity() const = 0;
  // Per-layer report of the selected layers' weights.
  virtual SparsityReport report() const = 0;
  // A readable name of the configuration, e.g. "Filter/Local/L1/Gradual".
  virtual std::string name() const = 0;
};

}  // namespace fasterai
