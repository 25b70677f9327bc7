#pragma once
// Checkpoints of a data-parallel fit, and resuming from one. At the end of every epoch the
// Checkpoint callback of rank 0 writes one file (the replicas are identical, so one copy is
// the job's state): the model's parameters and buffers, the optimizer's state, the epochs done
// and the fit's length, the masks of a tracked Sparsifier with its sparsity, and LibTorch's
// CPU generator. The file is written beside its final path and renamed over it, so a job
// killed while writing leaves the previous checkpoint whole.
//
//   const auto done = fasterai::dist::checkpoint_epoch(path);        // 0: no checkpoint yet
//   auto train = dist::shard(train_set, 64, *group, dist::ShardOptions().seed(0).first_epoch(done));
//   Learner learn(model, train, valid, LearnerOptions().parallel(data_parallel));
//   SparsifyCallback sparsify(sparsifier);
//   dist::Checkpoint checkpoint(path, group->is_main());
//   checkpoint.track(sparsifier);
//   if (done > 0) dist::resume(learn, path, sparsify, sparsifier);   // every rank
//   learn.fit(epochs, lr, {sparsify, checkpoint});                   // goes on at epoch `done`
//
// Resuming restores the model and the optimizer, makes the next fit start at the epoch after
// the checkpoint's (schedules where they were), restores the generator, and brings the
// sparsifier back to the schedule's position; the masks it then computes are compared bit for
// bit with the saved ones, and a difference is an error rather than a silently different run.
// They agree for criteria that score the weights themselves (L1, Random): the pruned weights
// are exactly zero in the checkpoint, so they are the lowest scores again. Criteria that need
// gradients or the initial weights (Taylor, Movement) cannot be rebuilt from a checkpoint this
// way and are refused by that comparison.
//
// Every rank reads the checkpoint, so its path must be readable by all (a shared file system
// on several machines); the Learner broadcasts rank 0's model at the start of the fit anyway.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/error.hpp>
#include <fasterai/dist/consistency.hpp>
#include <fasterai/dist/process_group.hpp>
#include <fasterai/train/callback.hpp>
#include <fasterai/train/learner.hpp>
#include <fasterai/train/sparsify_callback.hpp>

namespace fasterai::dist {

class Checkpoint : public Callback {
 public:
  // `write`: whether this process writes (rank 0's: group.is_main()).
  Checkpoint(std::filesystem::path path, bool write);

  // Save this sparsifier's masks and sparsity with every checkpoint.
  template <class S>
  void track(const S& sparsifier) {
    masks_ = [&sparsifier] { return masks_of(sparsifier); };
    sparsity_ = [&sparsifier] { return sparsifier.sparsity(); };
  }

  std::string name() const override { return "Checkpoint"; }
  inline void after_epoch(TrainingState& state) override;
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
  bool write_;
  std::function<std::vector<torch::Tensor>()> masks_;
  std::function<double()> sparsity_;
};

// Epochs done according to the checkpoint at `path`, 0 when there is none.
inline int checkpoint_epoch(const std::filesystem::path& path);

// Restore a Learner (and a sparsifier driven by `sparsify`) from a checkpoint; see above.
void resume(Learner& learn, const std::filesystem::path& path);
template <class S>
void resume(Learner& learn, const std::filesystem::path& path, const SparsifyCallback& sparsify,
            S& sparsifier);

namespace detail {

inline torch::Tensor scalar(double v) { return torch::tensor(v, torch::kDouble); }

inline double read_scalar(torch::serialize::InputArchive& in, const char* key) {
  torch::Tensor t;
  in.read(key, t, /*is_buffer=*/true);
  return t.item<double>();
}

inline torch::serialize::InputArchive open_checkpoint(const std::filesystem::path& path,
                                                      const char* where) {
  if (!std::filesystem::is_regular_file(path))
    fasterai::detail::throw_argument_error(where, "path", path.string(),
                                           "the path of a checkpoint written by dist::Checkpoint");
  torch::serialize::InputArchive in;
  try {
    in.load_from(path.string());
    torch::Tensor version;
    in.read("fasterai_checkpoint", version, /*is_buffer=*/true);
  } catch (const c10::Error& e) {
    fasterai::detail::throw_argument_error(where, "path", path.string(),
                                           fasterai::detail::concat(
                                               "a checkpoint written by dist::Checkpoint (",
                                               e.what_without_backtrace(), ")"));
  }
  return in;
}

inline std::vector<torch::Tensor> model_tensors(torch::nn::Module& model) {
  auto tensors = model.parameters();
  for (const auto& b : model.buffers()) tensors.push_back(b);
  return tensors;
}

// The number of masks and the masks, from a checkpoint.
inline std::vector<torch::Tensor> read_masks(torch::serialize::InputArchive& in) {
  std::vector<torch::Tensor> masks;
  const auto n = static_cast<int>(read_scalar(in, "mask_count"));
  for (int i = 0; i < n; ++i) {
    torch::Tensor m;
    in.read("mask_" + std::to_string(i), m, /*is_buffer=*/true);
    masks.push_back(m);
  }
  return masks;
}

}  // namespace detail

inline Checkpoint::Checkpoint(std::filesystem::path path, bool write)
    : path_(std::move(path)), write_(write) {
  fasterai::detail::check_argument(!path_.empty(), "fasterai::dist::Checkpoint", "path", "\"\"",
                                   "a file path");
}

inline void Checkpoint::after_epoch(TrainingState& state) {
  if (!write_) return;
  if (!state.model || !state.optimizer)
    fasterai::detail::throw_argument_error("fasterai::dist::Checkpoint", "state",
                                           "a TrainingState without model or optimizer",
                                           "the state of a Learner's fit");
  torch::serialize::OutputArchive out;
  out.write("fasterai_checkpoint", detail::scalar(1), /*is_buffer=*/true);
  out.write("epoch", detail::scalar(state.epoch + 1), true);
  out.write("n_epochs", detail::scalar(state.n_epochs), true);
  out.write("n_iter", detail::scalar(static_cast<double>(state.n_iter)), true);
  // The model as a flat list (parameters, then buffers), so that resuming can check every
  // shape before it changes anything.
  const auto tensors = detail::model_tensors(*state.model);
  out.write("tensor_count", detail::scalar(static_cast<double>(tensors.size())), true);
  for (size_t i = 0; i < tensors.size(); ++i)
    out.write("tensor_" + std::to_string(i), tensors[i].detach(), true);
  torch::serialize::OutputArchive optimizer;
  state.optimizer->save(optimizer);
  out.write("optimizer", optimizer);
  out.write("generator", at::detail::getDefaultCPUGenerator().get_state(), true);
  const auto masks = masks_ ? masks_() : std::vector<torch::Tensor>{};
  out.write("mask_count", detail::scalar(static_cast<double>(masks.size())), true);
  for (size_t i = 0; i < masks.size(); ++i)
    out.write("mask_" + std::to_string(i), masks[i].defined() ? masks[i] : torch::Tensor(), true);
  out.write("sparsity", detail::scalar(sparsity_ ? sparsity_() : 0.0), true);

  auto partial = path_;
  partial += ".partial";
  out.save_to(partial.string());
  std::filesystem::rename(partial, path_);
}

inline int checkpoint_epoch(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) return 0;
  auto in = detail::open_checkpoint(path, "fasterai::dist::checkpoint_epoch");
  return static_cast<int>(detail::read_scalar(in, "epoch"));
}

inline void resume(Learner& learn, const std::filesystem::path& path) {
  constexpr auto where = "fasterai::dist::resume";
  auto in = detail::open_checkpoint(path, where);
  const int epoch = static_cast<int>(detail::read_scalar(in, "epoch"));
  const auto n_iter = static_cast<std::int64_t>(detail::read_scalar(in, "n_iter"));
  if (n_iter != static_cast<std::int64_t>(learn.train_data().size()))
    fasterai::detail::throw_argument_error(where, "learn", learn.train_data().size(),
                                           fasterai::detail::concat(
                                               "a Learner with the checkpoint's ",
                                               std::to_string(n_iter),
                                               " training batches per epoch"));
  // Read and check everything before changing anything: a bad file leaves the Learner as it was.
  auto tensors = detail::model_tensors(learn.model());
  const auto count = static_cast<std::size_t>(detail::read_scalar(in, "tensor_count"));
  std::vector<torch::Tensor> loaded(count);
  for (std::size_t i = 0; i < count; ++i) in.read("tensor_" + std::to_string(i), loaded[i], true);
  bool same = count == tensors.size();
  for (std::size_t i = 0; same && i < count; ++i)
    same = loaded[i].sizes() == tensors[i].sizes() && loaded[i].dtype() == tensors[i].dtype();
  if (!same)
    fasterai::detail::throw_argument_error(where, "path", path.string(),
                                           "a checkpoint of this model (the parameters' and "
                                           "buffers' number or shapes differ)");
  torch::serialize::InputArchive optimizer;
  in.read("optimizer", optimizer);
  torch::Tensor generator;
  in.read("generator", generator, true);
  std::vector<torch::Tensor> saved;
  for (const auto& t : tensors) saved.push_back(t.detach().clone());
  torch::NoGradGuard no_grad;
  try {
    for (std::size_t i = 0; i < count; ++i) tensors[i].detach().copy_(loaded[i]);
    if (learn.optimizer_is_stale()) learn.rebuild_optimizer();
    learn.optimizer().load(optimizer);
  } catch (...) {
    for (size_t i = 0; i < tensors.size(); ++i) tensors[i].detach().copy_(saved[i]);
    throw;
  }
  auto cpu_generator = at::detail::getDefaultCPUGenerator();  // a handle on the global one
  cpu_generator.set_state(generator);
  learn.resume_at_epoch(epoch);
}

template <class S>
void resume(Learner& learn, const std::filesystem::path& path, const SparsifyCallback& sparsify,
            S& sparsifier) {
  constexpr auto where = "fasterai::dist::resume";
  auto in = detail::open_checkpoint(path, where);
  const auto masks = detail::read_masks(in);
  const double epoch = detail::read_scalar(in, "epoch");
  const double n_epochs = detail::read_scalar(in, "n_epochs");
  const double saved_sparsity = detail::read_scalar(in, "sparsity");
  resume(learn, path);
  // Where the SparsifyCallback's schedule stood after the checkpoint's last step.
  sparsifier.step(sparsify.progress(epoch / n_epochs));
  const auto now = masks_of(sparsifier);
  bool same = now.size() == masks.size() && sparsifier.sparsity() == saved_sparsity;
  for (size_t i = 0; same && i < now.size(); ++i)
    same = now[i].defined() == masks[i].defined() &&
           (!now[i].defined() || torch::equal(now[i].to(torch::kCPU), masks[i]));
  if (!same)
    throw error(fasterai::detail::concat(
        where, ": the masks recomputed at the checkpoint's schedule position differ from the "
               "saved ones (", sparsifier.name(), "; criteria that need gradients or initial "
               "weights cannot be resumed this way)"));
}

}  // namespace fasterai::dist
