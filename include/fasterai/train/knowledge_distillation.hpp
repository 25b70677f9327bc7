#pragma once
// Knowledge distillation (Hinton, Vinyals & Dean, 2015): a small student learns from the
// labels and from a trained teacher's softened outputs, whose small probabilities carry the
// similarities between classes that hard labels throw away ("dark knowledge"):
//
//   loss = (1 − α)·CE(student, y) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T))
//
// with the KL divergence summed over classes and averaged over the batch. The T² keeps the
// soft term's gradients at the scale of the hard term's as T changes.
//
// With a Learner (the fasterai article's `KnowledgeDistillation(student, teacher)`, 2020):
//   fasterai::KnowledgeDistillation kd(teacher, /*temperature=*/3.0, /*alpha=*/0.5);
//   student.fit_one_cycle(10, 1e-3, {kd});
// The callback replaces the loss in after_loss, in training and validation alike (so the
// table's two losses compare), taking the Learner's loss as the hard-label term.
//
// In a hand-written loop:
//   auto logits = student->forward(x);
//   auto loss = kd.loss(x, logits, y);   // or distillation_loss(logits, teacher_logits, y, T, α)
//   loss.backward();
//
// The teacher runs in eval mode (restored afterwards) without autograd; it is never trained.

#include <cmath>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/train/callback.hpp>

namespace fasterai {

// The distillation loss of a batch: student and teacher logits [batch, classes], targets the
// class indices [batch] (or class probabilities [batch, classes]).
inline torch::Tensor distillation_loss(const torch::Tensor& student_logits,
                                       const torch::Tensor& teacher_logits,
                                       const torch::Tensor& targets, double temperature,
                                       double alpha);

class KnowledgeDistillation : public Callback {
 public:
  template <class Teacher>
    requires module<Teacher> && requires(impl_of_t<Teacher>& m, torch::Tensor x) {
      { m.forward(x) } -> std::convertible_to<torch::Tensor>;
    }
  explicit KnowledgeDistillation(Teacher teacher, double temperature = 3.0, double alpha = 0.5);

  // The teacher's logits for `x`, without autograd, in eval mode.
  torch::Tensor teacher_logits(const torch::Tensor& x) const;
  // The distillation loss for a batch the student predicted `student_logits` on.
  torch::Tensor loss(const torch::Tensor& x, const torch::Tensor& student_logits,
                     const torch::Tensor& targets) const {
    return distillation_loss(student_logits, teacher_logits(x), targets, temperature_, alpha_);
  }

  double temperature() const noexcept { return temperature_; }
  double alpha() const noexcept { return alpha_; }
  torch::nn::Module& teacher() const noexcept { return *teacher_; }

  std::string name() const override { return "KnowledgeDistillation"; }
  // Replace the loss: (1 − α)·(the loss so far) + α·T²·KL(teacher ‖ student).
  inline void after_loss(TrainingState& state) override;

 private:
  std::shared_ptr<torch::nn::Module> teacher_;
  std::function<torch::Tensor(const torch::Tensor&)> forward_;
  double temperature_;
  double alpha_;
};

namespace detail {

inline void check_distillation(const char* where, double temperature, double alpha) {
  check_argument(std::isfinite(temperature) && temperature > 0, where, "temperature", temperature,
                 "a positive, finite temperature");
  check_argument(alpha >= 0 && alpha <= 1, where, "alpha", alpha, "a weight in [0, 1]");
}

inline void check_logits(const char* where, const torch::Tensor& student,
                         const torch::Tensor& teacher) {
  check_argument(student.defined() && student.dim() == 2, where, "student_logits",
                 student.defined() ? student.sizes() : c10::IntArrayRef{},
                 "logits of shape [batch, classes]");
  if (!teacher.defined() || teacher.sizes() != student.sizes()) {
    std::ostringstream os;
    os << "the student's shape " << student.sizes()
       << " (teacher and student must predict the same classes for the same batch)";
    throw_argument_error(where, "teacher_logits",
                         teacher.defined() ? teacher.sizes() : c10::IntArrayRef{}, os.str());
  }
}

// Σ_classes p_t·(log p_t − log p_s), averaged over the batch: KL(teacher ‖ student).
inline torch::Tensor soft_kl(const torch::Tensor& student_logits, const torch::Tensor& teacher_logits,
                             double temperature) {
  const auto log_p_s = torch::log_softmax(student_logits / temperature, 1);
  const auto log_p_t = torch::log_softmax(teacher_logits / temperature, 1);
  const auto p_t = log_p_t.exp();
  // 0·log 0 is 0: a teacher probability that underflowed contributes nothing.
  const auto terms = (p_t * (log_p_t - log_p_s)).masked_fill(p_t == 0, 0.0);
  return terms.sum(1).mean();
}

}  // namespace detail

inline torch::Tensor distillation_loss(const torch::Tensor& student_logits,
                                       const torch::Tensor& teacher_logits,
                                       const torch::Tensor& targets, double temperature,
                                       double alpha) {
  constexpr auto where = "fasterai::distillation_loss";
  detail::check_distillation(where, temperature, alpha);
  detail::check_logits(where, student_logits, teacher_logits);
  const auto hard = torch::nn::functional::cross_entropy(student_logits, targets);
  const auto soft = detail::soft_kl(student_logits, teacher_logits, temperature);
  return (1.0 - alpha) * hard + alpha * temperature * temperature * soft;
}

template <class Teacher>
  requires module<Teacher> && requires(impl_of_t<Teacher>& m, torch::Tensor x) {
    { m.forward(x) } -> std::convertible_to<torch::Tensor>;
  }
KnowledgeDistillation::KnowledgeDistillation(Teacher teacher, double temperature, double alpha)
    : temperature_(temperature), alpha_(alpha) {
  detail::check_distillation("fasterai::KnowledgeDistillation", temperature, alpha);
  static_assert(requires { typename std::remove_cvref_t<Teacher>::ContainedType; },
                "fasterai::KnowledgeDistillation takes the teacher as a module holder "
                "(torch::nn::Sequential, a TORCH_MODULE type)");
  auto impl = teacher.ptr();
  teacher_ = impl;
  forward_ = [impl](const torch::Tensor& x) -> torch::Tensor { return impl->forward(x); };
}

inline torch::Tensor KnowledgeDistillation::teacher_logits(const torch::Tensor& x) const {
  torch::NoGradGuard no_grad;
  // Eval mode for the teacher's forward only (dropout off, BatchNorm on running statistics),
  // put back even when the forward throws.
  struct ModeGuard {
    torch::nn::Module& m;
    bool was_training;
    ~ModeGuard() {
      if (was_training) m.train(true);
    }
  } guard{*teacher_, teacher_->is_training()};
  if (guard.was_training) teacher_->eval();
  const auto params = teacher_->parameters();
  if (!params.empty() && params.front().device() != x.device())
    return forward_(x.to(params.front().device())).to(x.device());
  return forward_(x);
}

inline void KnowledgeDistillation::after_loss(TrainingState& state) {
  constexpr auto where = "fasterai::KnowledgeDistillation";
  const auto teacher = teacher_logits(state.x);
  detail::check_logits(where, state.pred, teacher);
  state.loss = (1.0 - alpha_) * state.loss +
               alpha_ * temperature_ * temperature_ * detail::soft_kl(state.pred, teacher, temperature_);
}

}  // namespace fasterai
