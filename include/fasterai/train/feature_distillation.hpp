#pragma once
// Feature distillation: the student learns the teacher's intermediate representations, not only
// its outputs, through losses between NAMED layers of the two models.
//
//   FitNet hints (Romero et al., 2015): the mean squared error between the teacher's features
//   and the student's, the student's mapped to the teacher's width by a learned adapter (a 1×1
//   convolution for N×C×H×W maps, a Linear for N×C features) when the widths differ:
//       L_hint = mean((r(S) − T)²)
//   Attention transfer (Zagoruyko & Komodakis, 2017): each example's spatial attention map
//   Q = vec(mean_c |A_c|^p), p = 2, scaled to unit L2 norm, compared between the two models:
//       L_at = mean over examples and positions of (Q_S − Q_T)²
//   as in the authors' code (`at(x) = F.normalize(x.pow(p).mean(1).view(N, -1))`,
//   `(at(s) − at(t)).pow(2).mean()`); the mean over channels equals the paper's sum up to a
//   factor that the normalization removes, so the widths may differ without an adapter. They
//   weight it by β/2 with β = 1000, the default weight of attention_hint.
//
// How the intermediate outputs are taken. LibTorch modules have no forward hooks, but a
// Sequential's forward walks a list of its entries, and that list can hold a stand-in: a tap
// that runs the entry and keeps its output. So a layer can be named when it is an entry of a
// Sequential anywhere in the model — a Sequential model's children ("features.3"), the blocks of
// the zoo's ResNet stages ("layer2.1"), the layers of a user's module that keeps them in a
// Sequential member — or when it is a non-empty Sequential itself ("layer2": its output is its
// last entry's). Names are those of named_modules(); feature_layer_names(model) lists them. The
// model's own forward runs unchanged, so any module with a tensor forward works, and a layer
// its forward calls directly (the ResNet's stem "conv1") cannot be named.
//  - forward_with_features(model, x, names) puts the taps in, runs the model's forward and takes
//    them out (also when the forward throws): one forward giving the output and the features,
//    for a hand-written loop.
//  - The callback cannot change how the Learner calls the student, so it keeps the student's
//    taps in place while it trains (from the first batch to after_fit, or until the callback is
//    destroyed). Parameters, names, state_dict and the registered children are untouched (the
//    tap is in the list `forward` walks, not registered), so the optimizer and saving see the
//    same model.
//  - The teacher runs its whole forward without autograd in eval mode (modes restored
//    afterwards).
//  - As with PyTorch's forward hooks, a kept output is the tensor the layer returned: an
//    in-place operation after it (an in-place ReLU as the next entry) changes it.
// With a Learner:
//   fasterai::FeatureDistillation fd(student, teacher, example_batch,
//       {fasterai::fitnet_hint("features.6", "features.10"),
//        fasterai::attention_hint("features.3", "features.5")});
//   learn.fit_one_cycle(5, 1e-3, {kd, fd});   // after KnowledgeDistillation: KD rescales the loss
//                                             // it finds, fd adds its terms to it
// The callback adds Σ weight·L to the loss in after_loss (training and validation). Adapters
// are built by the constructor (from the example batch's shapes, on the student's device); in
// before_fit the callback adds their parameters to the Learner's optimizer as a parameter group
// with the options of its first group (one-cycle schedules it like the others) and takes the
// group out in after_fit. Data-parallel Learners average only the model's gradients: train the
// adapters on one process, or use equal widths (no adapter).
//
// In a hand-written loop:
//   torch::optim::Adam opt(student->parameters(), 1e-3);
//   opt.add_param_group(torch::optim::OptimizerParamGroup(fd.parameters()));   // the adapters
//   auto out = fasterai::forward_with_features(student, x, fd.student_layers());
//   auto loss = F::cross_entropy(out.output, y) + fd.loss(x, out.features);
//   loss.backward(); opt.step(); opt.zero_grad();
// or the plain losses on tensors you hold: fitnet_loss(s, t), attention_transfer_loss(s, t).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/core/sequential.hpp>
#include <fasterai/layers/layer_walk.hpp>
#include <fasterai/train/callback.hpp>

namespace fasterai {

enum class HintKind {
  fitnet,     // MSE through an adapter (Romero et al.)
  attention,  // distance of normalized spatial attention maps (Zagoruyko & Komodakis)
};

// One loss term between a student layer and a teacher layer.
struct FeatureHint {
  std::string student_layer;
  std::string teacher_layer;
  HintKind kind = HintKind::fitnet;
  double weight = 1.0;
};

inline FeatureHint fitnet_hint(std::string student_layer, std::string teacher_layer,
                               double weight = 1.0) {
  return {std::move(student_layer), std::move(teacher_layer), HintKind::fitnet, weight};
}
// β/2 = 500: the weight Zagoruyko & Komodakis give the mean-form loss (β = 1000).
inline FeatureHint attention_hint(std::string student_layer, std::string teacher_layer,
                                  double weight = 500.0) {
  return {std::move(student_layer), std::move(teacher_layer), HintKind::attention, weight};
}

// mean((student − teacher)²); both of the same shape (the student's already through its adapter).
inline torch::Tensor fitnet_loss(const torch::Tensor& student, const torch::Tensor& teacher);
// Per example, mean_c |A_c|^p over the channels of an N×C×H×W map, flattened to N×(H·W) and
// scaled to unit L2 norm per row.
inline torch::Tensor attention_map(const torch::Tensor& features, double p = 2.0);
// mean((attention_map(student) − attention_map(teacher))²) over examples and positions; the maps
// must have the same N, H and W (channels may differ).
inline torch::Tensor attention_transfer_loss(const torch::Tensor& student,
                                             const torch::Tensor& teacher, double p = 2.0);

// The output of a model and the outputs of its named layers, from one forward.
struct FeatureOutputs {
  torch::Tensor output;
  std::map<std::string, torch::Tensor> features;
};

// Every name forward_with_features accepts, in the order of a depth-first walk (forward order for
// a Sequential model): each entry of each Sequential in the model, and after its entries each
// non-empty Sequential that is not itself an entry.
template <module Model>
std::vector<std::string> feature_layer_names(const Model& model);

// Runs the forward of `model` on `x`, keeping the outputs of the layers named in `layers`.
// Throws argument_error, running nothing, for a name that is not a layer of the model (the
// message lists those that are), and after the forward for a named layer it did not run.
template <traceable Model>
FeatureOutputs forward_with_features(const Model& model, const torch::Tensor& x,
                                     const std::vector<std::string>& layers);

namespace detail {
class FeatureTaps;
}  // namespace detail

class FeatureDistillation : public Callback {
 public:
  // Checks every hint on one forward of each model on `example` (a batch like the training
  // ones; run in eval mode without autograd, modes restored) and builds the FitNet adapters.
  // Throws argument_error, changing neither model, for an unknown layer name, a weight that is
  // not finite and >= 0, features whose batch or spatial sizes differ, attention on features
  // that are not N×C×H×W, or an adapter needed for features that are neither N×C nor N×C×H×W.
  template <traceable Student, traceable Teacher>
  FeatureDistillation(Student student, Teacher teacher, const torch::Tensor& example,
                      std::vector<FeatureHint> hints);
  inline ~FeatureDistillation() override;
  FeatureDistillation(const FeatureDistillation&) = delete;
  FeatureDistillation& operator=(const FeatureDistillation&) = delete;

  // The adapters' parameters (empty when every FitNet pair has equal widths): give them to the
  // optimizer of a hand-written loop. The callback adds them to a Learner's optimizer itself.
  std::vector<torch::Tensor> parameters() const;
  // The adapter of hint `i`, or nullptr for a hint without one.
  std::shared_ptr<torch::nn::Module> adapter(std::size_t i) const {
    return adapters_.at(i).is_empty() ? nullptr : adapters_.at(i).ptr();
  }
  const std::vector<FeatureHint>& hints() const noexcept { return hints_; }
  // The student layers the hints read, for forward_with_features.
  std::vector<std::string> student_layers() const;

  // Σ weight·L over the hints, for the batch `x` whose student features are `student_features`
  // (keyed by student layer name, as forward_with_features returns them).
  torch::Tensor loss(const torch::Tensor& x,
                     const std::map<std::string, torch::Tensor>& student_features) const;
  // The teacher's features on `x` (no autograd, eval mode), keyed by teacher layer name.
  std::map<std::string, torch::Tensor> teacher_features(const torch::Tensor& x) const;

  std::string name() const override { return "FeatureDistillation"; }
  inline void before_fit(TrainingState& state) override;
  inline void before_batch(TrainingState& state) override;
  inline void after_loss(TrainingState& state) override;
  inline void after_fit(TrainingState& state) override;

 private:
  using Forward = std::function<torch::Tensor(const torch::Tensor&)>;
  std::shared_ptr<torch::nn::Module> student_;
  std::shared_ptr<torch::nn::Module> teacher_;
  Forward student_forward_;
  Forward teacher_forward_;
  std::vector<FeatureHint> hints_;
  std::vector<torch::nn::AnyModule> adapters_;  // empty AnyModule: no adapter
  std::unique_ptr<detail::FeatureTaps> taps_;     // the student's, while it trains
  torch::optim::Optimizer* optimizer_ = nullptr;  // the optimizer the adapters were added to

  void install_taps();
  torch::Tensor hint_loss(std::size_t i, const torch::Tensor& student,
                          const torch::Tensor& teacher) const;
};

// ---------------------------------------------------------------------------------------------

namespace detail {

inline constexpr const char* feature_distillation_where = "fasterai::FeatureDistillation";

inline std::string shape_string(const torch::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// Puts back the train/eval mode of every submodule, even when a forward throws.
class ModesGuard {
 public:
  explicit ModesGuard(torch::nn::Module& m) {
    for (const auto& s : m.modules(/*include_self=*/true)) modes_.emplace_back(s, s->is_training());
  }
  ~ModesGuard() {
    for (auto& [s, t] : modes_) s->train(t);
  }
  ModesGuard(const ModesGuard&) = delete;
  ModesGuard& operator=(const ModesGuard&) = delete;

 private:
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> modes_;
};

// Where a named layer's output can be taken: an entry of a Sequential's forward list.
struct ChildSite {
  torch::nn::SequentialImpl* parent = nullptr;
  std::size_t index = 0;
  std::string name;
};

// Depth-first from `m` (named `prefix`): the entries of every Sequential, and after its entries
// each non-empty Sequential that is not an entry, at its last entry.
inline void collect_sites(torch::nn::Module& m, const std::string& prefix, bool is_entry,
                          std::vector<ChildSite>& out) {
  if (auto* seq = m.as<torch::nn::SequentialImpl>()) {
    const auto children = seq->named_children();
    for (std::size_t i = 0; i < seq->size(); ++i) {
      const std::string name = join_name(prefix, children[i].key());
      out.push_back({seq, i, name});
      collect_sites(*seq->begin()[static_cast<std::ptrdiff_t>(i)].ptr(), name, /*is_entry=*/true, out);
    }
    if (!is_entry && !prefix.empty() && seq->size() > 0) out.push_back({seq, seq->size() - 1, prefix});
    return;
  }
  for (const auto& child : m.named_children())
    collect_sites(*child.value(), join_name(prefix, child.key()), /*is_entry=*/false, out);
}

inline std::vector<ChildSite> child_sites(torch::nn::Module& root) {
  std::vector<ChildSite> out;
  collect_sites(root, "", /*is_entry=*/false, out);
  return out;
}

// Stands in a Sequential's forward list for a named layer: runs it and keeps its output.
class FeatureTapImpl : public torch::nn::Module {
 public:
  FeatureTapImpl(torch::nn::AnyModule layer, std::shared_ptr<torch::Tensor> slot)
      : layer_(std::move(layer)), slot_(std::move(slot)) {}
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor y = layer_.forward(std::move(x));
    *slot_ = y;
    return y;
  }

 private:
  torch::nn::AnyModule layer_;
  std::shared_ptr<torch::Tensor> slot_;
};

// Taps on the named layers of `root` from construction to destruction. The constructor finds
// every site before it changes one, and throws argument_error (changing nothing) for a name the
// model does not have. Two names may share a site (a Sequential and its last entry): the second
// tap wraps the first, and the destructor takes them out in reverse order.
class FeatureTaps {
 public:
  FeatureTaps(torch::nn::Module& root, const std::vector<std::string>& names, const char* where,
              const char* argument) {
    const auto sites = child_sites(root);
    for (const auto& n : names) {
      const auto site = find(sites, n, where, argument);
      if (std::none_of(taps_.begin(), taps_.end(), [&](const Tap& t) { return t.site.name == n; }))
        taps_.push_back(Tap{site, {}, {}, std::make_shared<torch::Tensor>()});
    }
    for (auto& tap : taps_) {
      auto& entry = this->entry(tap);
      tap.original = entry;
      tap.tap = torch::nn::AnyModule(std::make_shared<FeatureTapImpl>(entry, tap.slot));
      entry = tap.tap;
    }
  }
  ~FeatureTaps() {
    for (auto it = taps_.rbegin(); it != taps_.rend(); ++it)
      // An entry replaced since (by the user) stays as it was left.
      if (auto& entry = this->entry(*it); entry.ptr() == it->tap.ptr()) entry = it->original;
  }
  FeatureTaps(const FeatureTaps&) = delete;
  FeatureTaps& operator=(const FeatureTaps&) = delete;

  // Throws as the constructor does for a name `root` does not have; changes nothing.
  static void check_names(torch::nn::Module& root, const std::vector<std::string>& names,
                          const char* where, const char* argument) {
    const auto sites = child_sites(root);
    for (const auto& n : names) find(sites, n, where, argument);
  }

  // The outputs kept since the last take, by layer name; throws argument_error naming a layer
  // the forward did not run. The taps keep nothing after it.
  std::map<std::string, torch::Tensor> take(const char* where) {
    std::map<std::string, torch::Tensor> out;
    for (auto& tap : taps_) {
      const bool ran = tap.slot->defined();
      torch::Tensor t = std::move(*tap.slot);
      *tap.slot = torch::Tensor();
      check_argument(ran, where, "layer", "'" + tap.site.name + "'",
                     "a layer the model's forward ran in this batch");
      out[tap.site.name] = std::move(t);
    }
    return out;
  }

 private:
  struct Tap {
    ChildSite site;
    torch::nn::AnyModule original;
    torch::nn::AnyModule tap;
    std::shared_ptr<torch::Tensor> slot;
  };
  std::vector<Tap> taps_;

  static const ChildSite& find(const std::vector<ChildSite>& sites, const std::string& name,
                               const char* where, const char* argument) {
    const auto site = std::find_if(sites.begin(), sites.end(), [&](const ChildSite& s) { return s.name == name; });
    if (site == sites.end()) {
      std::string allowed = "a layer of the model (an entry of one of its Sequentials, or a Sequential): ";
      for (std::size_t i = 0; i < sites.size(); ++i) allowed += (i ? ", '" : "'") + sites[i].name + "'";
      if (sites.empty()) allowed += "(it has none)";
      throw_argument_error(where, argument, "'" + name + "'", allowed);
    }
    return *site;
  }
  static torch::nn::AnyModule& entry(const Tap& t) {
    return t.site.parent->begin()[static_cast<std::ptrdiff_t>(t.site.index)];
  }
};

// Runs `forward` on `x` with taps on `names` of `root`; the taps are out again when it returns
// or throws.
inline FeatureOutputs run_with_taps(torch::nn::Module& root,
                                    const std::function<torch::Tensor(const torch::Tensor&)>& forward,
                                    const torch::Tensor& x, const std::vector<std::string>& names,
                                    const char* where, const char* argument) {
  FeatureTaps taps(root, names, where, argument);
  FeatureOutputs out;
  out.output = forward(x);
  out.features = taps.take(where);
  return out;
}

inline void check_hint_weight(const char* where, const FeatureHint& h) {
  check_argument(std::isfinite(h.weight) && h.weight >= 0, where, "hint weight", h.weight,
                 "a finite weight >= 0");
}

// Student and teacher features of one hint fit together: same batch, same spatial sizes, and
// for attention N×C×H×W maps.
inline void check_feature_pair(const char* where, const FeatureHint& h, const torch::Tensor& s,
                               const torch::Tensor& t) {
  const std::string pair = "'" + h.student_layer + "' -> '" + h.teacher_layer + "'";
  const auto value = pair + " with student " + shape_string(s) + " and teacher " + shape_string(t);
  check_argument(s.defined() && t.defined() && s.is_floating_point() && t.is_floating_point(),
                 where, "hint", value, "layers whose outputs are floating-point tensors");
  if (h.kind == HintKind::attention) {
    check_argument(s.dim() == 4 && t.dim() == 4 && s.size(0) == t.size(0) &&
                       s.size(2) == t.size(2) && s.size(3) == t.size(3),
                   where, "attention hint", value,
                   "N×C×H×W maps of equal N, H and W (channels may differ)");
    return;
  }
  bool fits = s.dim() == t.dim() && s.dim() >= 2 && s.size(0) == t.size(0);
  for (std::int64_t d = 2; fits && d < s.dim(); ++d) fits = s.size(d) == t.size(d);
  check_argument(fits, where, "FitNet hint", value,
                 "features of equal rank, batch and spatial sizes (an adapter maps only the "
                 "channel dimension)");
  check_argument(s.size(1) == t.size(1) || s.dim() == 2 || s.dim() == 4, where, "FitNet hint",
                 value, "N×C or N×C×H×W features when the widths differ (the adapter is a Linear "
                        "or a 1×1 convolution)");
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------

inline torch::Tensor fitnet_loss(const torch::Tensor& student, const torch::Tensor& teacher) {
  constexpr auto where = "fasterai::fitnet_loss";
  detail::check_argument(student.defined() && teacher.defined() && student.sizes() == teacher.sizes(),
                         where, "student", detail::shape_string(student),
                         "the teacher's shape " + detail::shape_string(teacher) +
                             " (map the student's width with an adapter first)");
  return (student - teacher).pow(2).mean();
}

inline torch::Tensor attention_map(const torch::Tensor& features, double p) {
  constexpr auto where = "fasterai::attention_map";
  detail::check_argument(features.defined() && features.dim() == 4, where, "features",
                         detail::shape_string(features), "an N×C×H×W map");
  detail::check_argument(std::isfinite(p) && p > 0, where, "p", p, "a positive exponent");
  const auto q = features.abs().pow(p).mean(1).flatten(1);
  // F.normalize: divide by max(‖q‖₂, 1e-12), so an all-zero map stays zero.
  return q / q.norm(2, 1, /*keepdim=*/true).clamp_min(1e-12);
}

inline torch::Tensor attention_transfer_loss(const torch::Tensor& student,
                                             const torch::Tensor& teacher, double p) {
  constexpr auto where = "fasterai::attention_transfer_loss";
  detail::check_argument(student.defined() && teacher.defined() && student.dim() == 4 &&
                             teacher.dim() == 4 && student.size(0) == teacher.size(0) &&
                             student.size(2) == teacher.size(2) && student.size(3) == teacher.size(3),
                         where, "student", detail::shape_string(student),
                         "an N×C×H×W map with the N, H and W of the teacher's " +
                             detail::shape_string(teacher));
  return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean();
}

template <module Model>
std::vector<std::string> feature_layer_names(const Model& model) {
  auto& m = const_cast<torch::nn::Module&>(static_cast<const torch::nn::Module&>(detail::impl(model)));
  std::vector<std::string> out;
  for (const auto& s : detail::child_sites(m)) out.push_back(s.name);
  return out;
}

template <traceable Model>
FeatureOutputs forward_with_features(const Model& model, const torch::Tensor& x,
                                     const std::vector<std::string>& layers) {
  // A forward needs the module mutable; the model's holder shares its layers, as calling
  // `model->forward(x)` on a const holder does.
  auto& m = const_cast<impl_of_t<Model>&>(static_cast<const impl_of_t<Model>&>(detail::impl(model)));
  return detail::run_with_taps(
      m, [&m](const torch::Tensor& in) -> torch::Tensor { return m.forward(in); }, x, layers,
      "fasterai::forward_with_features", "layers");
}

// ---------------------------------------------------------------------------------------------

template <traceable Student, traceable Teacher>
FeatureDistillation::FeatureDistillation(Student student, Teacher teacher,
                                         const torch::Tensor& example,
                                         std::vector<FeatureHint> hints)
    : hints_(std::move(hints)) {
  constexpr auto where = detail::feature_distillation_where;
  static_assert(requires { typename std::remove_cvref_t<Student>::ContainedType; } &&
                    requires { typename std::remove_cvref_t<Teacher>::ContainedType; },
                "fasterai::FeatureDistillation takes student and teacher as module holders "
                "(torch::nn::Sequential, fasterai::models::ResNet, a TORCH_MODULE of your own)");
  student_ = student.ptr();
  teacher_ = teacher.ptr();
  student_forward_ = [student](const torch::Tensor& x) mutable -> torch::Tensor { return student->forward(x); };
  teacher_forward_ = [teacher](const torch::Tensor& x) mutable -> torch::Tensor { return teacher->forward(x); };
  detail::check_argument(!hints_.empty(), where, "hints", "an empty list", "at least one hint");
  detail::check_argument(example.defined() && example.dim() >= 1 && example.size(0) > 0, where,
                         "example", detail::shape_string(example), "a non-empty batch of inputs");
  std::vector<std::string> s_names, t_names;
  for (const auto& h : hints_) {
    detail::check_hint_weight(where, h);
    s_names.push_back(h.student_layer);
    t_names.push_back(h.teacher_layer);
  }
  detail::FeatureTaps::check_names(*student_, s_names, where, "hint student_layer");
  detail::FeatureTaps::check_names(*teacher_, t_names, where, "hint teacher_layer");

  std::map<std::string, torch::Tensor> s_features;
  {
    torch::NoGradGuard no_grad;
    detail::ModesGuard modes(*student_);
    student_->eval();
    const auto params = student_->parameters();
    const auto x = params.empty() ? example : example.to(params.front().device());
    s_features = detail::run_with_taps(*student_, student_forward_, x, s_names, where,
                                       "hint student_layer").features;
  }
  const auto t_features = teacher_features(example);
  const auto params = student_->parameters();
  const auto device = params.empty() ? example.device() : params.front().device();
  // Every check before the first adapter exists: a failure leaves nothing half-built.
  for (const auto& h : hints_)
    detail::check_feature_pair(where, h, s_features.at(h.student_layer), t_features.at(h.teacher_layer));
  for (const auto& h : hints_) {
    const auto& s = s_features.at(h.student_layer);
    const auto& t = t_features.at(h.teacher_layer);
    torch::nn::AnyModule adapter;
    if (h.kind == HintKind::fitnet && s.size(1) != t.size(1)) {
      if (s.dim() == 4) {
        torch::nn::Conv2d conv(torch::nn::Conv2dOptions(s.size(1), t.size(1), 1));
        conv->to(device, s.scalar_type());
        adapter = torch::nn::AnyModule(conv);
      } else {
        torch::nn::Linear linear(s.size(1), t.size(1));
        linear->to(device, s.scalar_type());
        adapter = torch::nn::AnyModule(linear);
      }
    }
    adapters_.push_back(std::move(adapter));
  }
}

inline std::vector<torch::Tensor> FeatureDistillation::parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& a : adapters_)
    if (!a.is_empty())
      for (const auto& p : a.ptr()->parameters()) out.push_back(p);
  return out;
}

inline std::vector<std::string> FeatureDistillation::student_layers() const {
  std::vector<std::string> out;
  for (const auto& h : hints_)
    if (std::find(out.begin(), out.end(), h.student_layer) == out.end()) out.push_back(h.student_layer);
  return out;
}

inline std::map<std::string, torch::Tensor> FeatureDistillation::teacher_features(
    const torch::Tensor& x) const {
  torch::NoGradGuard no_grad;
  detail::ModesGuard modes(*teacher_);
  teacher_->eval();
  std::vector<std::string> wanted;
  for (const auto& h : hints_) wanted.push_back(h.teacher_layer);
  const auto params = teacher_->parameters();
  const bool move = !params.empty() && params.front().device() != x.device();
  auto out = detail::run_with_taps(*teacher_, teacher_forward_, move ? x.to(params.front().device()) : x,
                                   wanted, detail::feature_distillation_where, "hint teacher_layer")
                 .features;
  if (move)
    for (auto& [_, t] : out) t = t.to(x.device());
  return out;
}

inline torch::Tensor FeatureDistillation::hint_loss(std::size_t i, const torch::Tensor& student,
                                                    const torch::Tensor& teacher) const {
  const FeatureHint& h = hints_[i];
  detail::check_feature_pair(detail::feature_distillation_where, h, student, teacher);
  if (h.kind == HintKind::attention) return attention_transfer_loss(student, teacher);
  torch::nn::AnyModule adapter = adapters_[i];  // a second handle: forward is non-const
  return fitnet_loss(adapter.is_empty() ? student : adapter.forward(student), teacher);
}

inline torch::Tensor FeatureDistillation::loss(
    const torch::Tensor& x, const std::map<std::string, torch::Tensor>& student_features) const {
  constexpr auto where = "fasterai::FeatureDistillation::loss";
  for (const auto& h : hints_)
    detail::check_argument(student_features.count(h.student_layer) != 0, where, "student_features",
                           "a map without '" + h.student_layer + "'",
                           "the outputs of every layer in student_layers() "
                           "(forward_with_features(student, x, fd.student_layers()))");
  const auto teacher = teacher_features(x);
  torch::Tensor total;
  for (std::size_t i = 0; i < hints_.size(); ++i) {
    const auto term = hints_[i].weight *
                      hint_loss(i, student_features.at(hints_[i].student_layer),
                                teacher.at(hints_[i].teacher_layer));
    total = total.defined() ? total + term : term;
  }
  return total;
}

inline FeatureDistillation::~FeatureDistillation() = default;

inline void FeatureDistillation::install_taps() {
  if (!taps_)
    taps_ = std::make_unique<detail::FeatureTaps>(*student_, student_layers(),
                                                  detail::feature_distillation_where, "student layer");
}

inline void FeatureDistillation::before_fit(TrainingState& state) {
  detail::check_argument(state.model == student_.get(), detail::feature_distillation_where,
                         "the trained model", "another module",
                         "the student this callback was made for");
  install_taps();
  const auto adapter_params = parameters();
  if (!state.optimizer || adapter_params.empty()) return;
  for (const auto& group : state.optimizer->param_groups())
    for (const auto& p : group.params())
      if (p.unsafeGetTensorImpl() == adapter_params.front().unsafeGetTensorImpl()) {
        optimizer_ = state.optimizer;
        return;
      }
  auto& groups = state.optimizer->param_groups();
  TORCH_CHECK(!groups.empty(), "fasterai::FeatureDistillation: the optimizer has no parameter group");
  state.optimizer->add_param_group(
      torch::optim::OptimizerParamGroup(adapter_params, groups.front().options().clone()));
  optimizer_ = state.optimizer;
}

inline void FeatureDistillation::before_batch(TrainingState&) {
  // Validation on its own (Learner::validate) runs no before_fit.
  install_taps();
}

inline void FeatureDistillation::after_loss(TrainingState& state) {
  constexpr auto where = detail::feature_distillation_where;
  // Without before_batch the forward ran without taps: take() then names the layer it misses.
  install_taps();
  state.loss = state.loss + loss(state.x, taps_->take(where));
}

inline void FeatureDistillation::after_fit(TrainingState&) {
  taps_.reset();
  if (!optimizer_) return;
  const auto adapter_params = parameters();
  auto& groups = optimizer_->param_groups();
  // Parameter groups cannot be assigned (erase would move them): keep copies of the others.
  std::vector<torch::optim::OptimizerParamGroup> kept;
  for (const auto& group : groups)
    if (adapter_params.empty() || group.params().empty() ||
        group.params().front().unsafeGetTensorImpl() != adapter_params.front().unsafeGetTensorImpl())
      kept.push_back(group);
  groups.swap(kept);
  optimizer_ = nullptr;
}

}  // namespace fasterai
