#pragma once
// Loading a pruned model's weights into a freshly constructed ORIGINAL architecture: with
// `resize`, every layer first takes the shapes the file holds, then the values are loaded.
//
//   auto model = fasterai::models::vgg16_bn(10);                  // the original architecture
//   fasterai::load_state_dict(model, "pruned.pt", fasterai::LoadOptions().resize(true));
//
// Why: a pruned model's state_dict has smaller shapes than the architecture a user constructs.
// Without resizing, the mismatch is an error that lists the keys (LibTorch's own `torch::load`
// would copy the smaller tensors into the modules and leave their options disagreeing with
// their weights, to fail at the next forward). With it, a layer's weights, buffers AND options
// agree afterwards — `in_channels`, `out_channels`, `groups`, `num_features`, `in_features`,
// `out_features`, `normalized_shape`, `embed_dim` and `num_heads` — so `forward`, `clone()` and
// printing work. Parameters keep their identity (`set_data`): holders the user kept stay valid;
// an optimizer built before must be rebuilt.
//
// What can be resized is what the layer rules (layers/) describe, as the Pruner shrinks it: a
// layer's output count from its tensors' output dimension, its input count from their input
// dimension, every other dimension kept (a convolution's kernel size must be the model's); a
// grouped or depthwise conv, or a GroupNorm, loses whole groups (its per-group input count
// stays); a MultiheadAttention keeps its head dimension (num_heads follows). A parameter of no
// layer (a ViT's class token, a position embedding, a layer scale) takes the file's shape when
// its rank is the same. Anything else whose shapes differ (a bias of the wrong length, a kernel
// size that changed, another rank) is an error naming the module and both shapes. Errors leave
// the model exactly as it was: everything is planned and checked against the file before the
// first tensor changes.

#include <cstdint>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/io/read_limits.hpp>
#include <fasterai/io/state_dict.hpp>
#include <fasterai/transform/layer_resize.hpp>

namespace fasterai {

struct LoadOptions {
  LoadOptions() = default;
  // Reshape the layers (every kind with a layer rule) and free tensors to the file's shapes
  // before loading.
  TORCH_ARG(bool, resize) = false;
  // What reading the file may cost (see io/read_limits.hpp).
  TORCH_ARG(ReadLimits, limits) = ReadLimits();
};

// Copies the state_dict at `path` into `model`, resizing layers first when options.resize()
// (see the banner). Throws fasterai::state_dict_error (an argument_error) naming the keys,
// modules and shapes that do not fit; the model is then unchanged.
template <module M>
void load_state_dict(M&& model, const std::filesystem::path& path, const LoadOptions& options);

// The same for a state_dict already read (read_state_dict), perhaps edited.
template <module M>
void load_state_dict(M&& model, const StateDict& state, const LoadOptions& options);

namespace detail {

inline constexpr std::string_view resize_where = "fasterai::load_state_dict";

// One module to be reshaped: its new tensors (uninitialized, the loaded values fill them) and,
// for a layer, its options.
struct LayerResize {
  torch::nn::Module* module = nullptr;  // a layer (its rule sets its options); nullptr: free tensors
  std::vector<std::pair<torch::Tensor, std::vector<std::int64_t>>> tensors;
  std::int64_t out = 0, in = 0, groups = 1;
};

inline std::string shape_text(c10::IntArrayRef shape) {
  std::ostringstream os;
  os << shape;
  return os.str();
}

// The file's shape for `key`, or none when the file lacks it (check_fits reports that later).
inline const torch::Tensor* file_tensor(const StateDict& file, const std::string& key) {
  return file.find(key);
}

// Adds `tensor` (named prefix + field) to the resize when the file's shape is `expected`;
// otherwise notes the problem.
inline void plan_tensor(LayerResize& resize, std::ostringstream& problems, const StateDict& file,
                        const std::string& prefix, const std::string& field, const torch::Tensor& tensor,
                        const std::vector<std::int64_t>& expected) {
  if (!tensor.defined()) return;
  const torch::Tensor* found = file_tensor(file, prefix + field);
  if (found == nullptr) return;  // reported as a missing key
  if (found->sizes() != c10::IntArrayRef(expected)) {
    problems << "\n  " << prefix << field << ": model " << tensor.sizes() << ", file "
             << found->sizes() << ", expected " << shape_text(expected) << " for the resized layer";
    return;
  }
  resize.tensors.emplace_back(tensor, expected);
}

inline void unresizable(std::ostringstream& problems, const std::string& name, const std::string& kind,
                        const torch::Tensor& model_weight, const torch::Tensor& file_weight,
                        std::string_view why) {
  problems << "\n  " << kind << " '" << name << "' cannot take the file's shape: weight model "
           << model_weight.sizes() << ", file " << file_weight.sizes() << " (" << why << ")";
}

// A layer's resize, read from the file through its rule: the new output count from a tensor's
// output dimension, the new input count from a tensor's input dimension; every other dimension
// stays (a convolution's kernel size). A grouped layer loses whole groups, as the Pruner removes
// them: its per-group input count stays.
inline void plan_layer(std::vector<LayerResize>& plan, std::ostringstream& problems, const StateDict& file,
                       const std::string& name, torch::nn::Module& m, const LayerRule& rule) {
  const std::string prefix = name.empty() ? "" : name + ".";
  struct Found {
    const TensorChannels* channels;
    torch::Tensor model;
    const torch::Tensor* file;
  };
  std::vector<Found> found;
  bool differs = false;
  for (const auto& t : rule.tensors) {
    torch::Tensor x = layer_tensor(m, t.name);
    const torch::Tensor* f = x.defined() ? file_tensor(file, prefix + t.name) : nullptr;
    if (f == nullptr) continue;
    found.push_back({&t, x, f});
    differs |= f->sizes() != x.sizes();
  }
  if (!differs) return;
  const Found& first = found.front();
  const auto groups = groups_of(rule, m);
  std::int64_t out = -1, in_per_group = -1, out_before = -1;
  for (const auto& f : found) {
    if (f.file->dim() != f.model.dim())
      return unresizable(problems, name, rule.kind, f.model, *f.file, "a resize keeps each tensor's rank");
    for (std::int64_t d = 0; d < f.model.dim(); ++d)
      if (d != f.channels->out_dim && d != f.channels->in_dim && f.file->size(d) != f.model.size(d))
        return unresizable(problems, name, rule.kind, f.model, *f.file,
                           "a resize changes only the channel dimensions: it keeps the kernel size");
    if (out < 0 && f.channels->out_dim >= 0)
      out = f.file->size(f.channels->out_dim), out_before = f.model.size(f.channels->out_dim);
    if (in_per_group < 0 && f.channels->in_dim >= 0) in_per_group = f.file->size(f.channels->in_dim);
  }
  if (out < 1 || (in_per_group == 0))
    return unresizable(problems, name, rule.kind, first.model, *first.file, "a layer keeps at least one channel");
  LayerResize r{&m, {}, out, in_per_group, groups};
  if (groups > 1) {
    const std::int64_t out_per_group = out_before / groups;
    const bool per_group_input_stays = std::all_of(found.begin(), found.end(), [](const Found& f) {
      return f.channels->in_dim < 0 || f.file->size(f.channels->in_dim) == f.model.size(f.channels->in_dim);
    });
    if (!per_group_input_stays || out % out_per_group != 0)
      return unresizable(problems, name, rule.kind, first.model, *first.file,
                         "a grouped layer is resized by whole groups: the per-group input count must stay and "
                         "the output count be a multiple of " + std::to_string(out_per_group));
    r.groups = out / out_per_group;
    r.in = in_per_group < 0 ? out : r.groups * in_per_group;
  }
  if (rule.role != LayerRole::Producer) r.in = out;  // a norm reads what it writes
  if (r.in < 0) r.in = 0;                             // an Embedding reads indices
  for (const auto& f : found) {
    std::vector<std::int64_t> expected = f.model.sizes().vec();
    if (f.channels->out_dim >= 0) expected[static_cast<std::size_t>(f.channels->out_dim)] = out;
    if (f.channels->in_dim >= 0 && in_per_group > 0)
      expected[static_cast<std::size_t>(f.channels->in_dim)] = in_per_group;
    plan_tensor(r, problems, file, prefix, f.channels->name, f.model, expected);
  }
  plan.push_back(std::move(r));
}

// A module's own parameters and buffers that no rule describes (a ViT's class token and
// position embedding, a layer scale): each takes the file's shape when it has the same rank —
// a free tensor has no options to follow.
inline void plan_free_tensors(std::vector<LayerResize>& plan, std::ostringstream& problems, const StateDict& file,
                              const std::string& name, torch::nn::Module& m, const LayerRule* rule) {
  const std::string prefix = name.empty() ? "" : name + ".";
  LayerResize r;
  auto consider = [&](const std::string& key, const torch::Tensor& x) {
    if (!x.defined()) return;
    if (rule)
      for (const auto& t : rule->tensors)
        if (t.name == key) return;
    const torch::Tensor* f = file_tensor(file, prefix + key);
    if (f == nullptr || f->sizes() == x.sizes()) return;
    if (f->dim() != x.dim()) {
      problems << "\n  " << prefix << key << ": model " << x.sizes() << ", file " << f->sizes()
               << " (a resize keeps a tensor's rank)";
      return;
    }
    r.tensors.emplace_back(x, f->sizes().vec());
  };
  for (const auto& p : m.named_parameters(/*recurse=*/false)) consider(p.key(), p.value());
  for (const auto& b : m.named_buffers(/*recurse=*/false)) consider(b.key(), b.value());
  if (!r.tensors.empty()) plan.push_back(std::move(r));
}

inline void apply_resize(const LayerResize& r) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> fresh;
  for (const auto& [tensor, shape] : r.tensors) fresh.emplace_back(tensor, torch::empty(shape, tensor.options()));
  set_tensor_data(fresh);  // the file's values are copied in next
  if (r.module) set_layer_widths(*r.module, r.out, r.in, r.groups);
}

// Plans the resize of every layer of `model` whose shapes differ from `file`, then checks the
// whole file against the model as it would be: on any problem, throws before changing anything.
inline std::vector<LayerResize> plan_resize(torch::nn::Module& model, const StateDict& file,
                                            std::string_view source) {
  std::vector<LayerResize> plan;
  std::ostringstream problems;
  std::vector<std::pair<std::string, torch::nn::Module*>> modules{{"", &model}};
  for (const auto& item : model.named_modules("", /*include_self=*/false))
    modules.emplace_back(item.key(), item.value().get());
  for (const auto& [name, m] : modules) {
    const LayerRule* rule = rule_of(*m);
    if (rule) plan_layer(plan, problems, file, name, *m, *rule);
    plan_free_tensors(plan, problems, file, name, *m, rule);
  }
  if (!problems.str().empty()) {
    std::ostringstream os;
    os << resize_where << ": " << source << " cannot be loaded with resize; nothing was changed:"
       << problems.str();
    throw state_dict_error(os.str());
  }
  // The model's state as it will be after the resize (shapes only, on the meta device), checked
  // against the file by the loader's own rules: keys, shapes of every other tensor, dtypes.
  std::map<const c10::TensorImpl*, std::vector<std::int64_t>> new_shapes;
  for (const auto& r : plan)
    for (const auto& [tensor, shape] : r.tensors) new_shapes[tensor.unsafeGetTensorImpl()] = shape;
  std::vector<std::pair<std::string, torch::Tensor>> future_state;
  for (auto& [name, tensor] : state_of(model)) {
    const auto resized = new_shapes.find(tensor.unsafeGetTensorImpl());
    future_state.emplace_back(name, resized == new_shapes.end()
                                        ? tensor
                                        : torch::empty(resized->second,
                                                       tensor.options().device(torch::kMeta)));
  }
  check_fits(resize_where, source, future_state, file);
  return plan;
}

template <module M>
void load_with_options(M& model, const StateDict& state, std::string_view source,
                       const LoadOptions& options) {
  torch::nn::Module& m = impl(model);
  if (options.resize())
    for (const auto& r : plan_resize(m, state, source)) apply_resize(r);
  const auto model_state = state_of(m);
  check_fits(resize_where, source, model_state, state);
  copy_state(model_state, state);
}

}  // namespace detail

template <module M>
void load_state_dict(M&& model, const std::filesystem::path& path, const LoadOptions& options) {
  const StateDict state = detail::read_state_dict(detail::resize_where, path, options.limits());
  detail::load_with_options(model, state, detail::describe(path), options);
}

template <module M>
void load_state_dict(M&& model, const StateDict& state, const LoadOptions& options) {
  detail::load_with_options(model, state, "the given state_dict", options);
}

}  // namespace fasterai
