#pragma once
// Loading a pruned model's weights into a freshly constructed ORIGINAL architecture: with
// `resize`, every Conv2d, BatchNorm and Linear first takes the shapes the file holds, then the
// values are loaded.
//
//   auto model = fasterai::models::vgg16_bn(10);                  // the original architecture
//   fasterai::load_state_dict(model, "pruned.pt", fasterai::LoadOptions().resize(true));
//
// Why: a pruned model's state_dict has smaller shapes than the architecture a user constructs.
// Without resizing, the mismatch is an error that lists the keys (LibTorch's own `torch::load`
// would copy the smaller tensors into the modules and leave their options disagreeing with
// their weights, to fail at the next forward). With it, a layer's weights, buffers AND options
// agree afterwards — `in_channels`, `out_channels`, `groups`, `num_features`, `in_features`,
// `out_features` — so `forward`, `clone()` and printing work. Parameters keep their identity
// (`set_data`): holders the user kept stay valid; an optimizer built before must be rebuilt.
//
// What can be resized, from the file's weight shape:
//   Conv2d [out', in'/groups', kh, kw]: the kernel size must be the model's. With groups = 1,
//     in' = the file's second dimension. A grouped or depthwise conv loses whole groups (as the
//     Pruner removes them): its per-group input count must stay, and groups' = out'/(out/groups).
//   BatchNorm1d/2d [n']: weight, bias and running statistics all of length n'.
//   Linear [out', in'].
// Anything else whose shapes differ (another layer kind, a bias of the wrong length, a kernel
// size that changed) is an error naming the module and both shapes. Errors leave the model
// exactly as it was: everything is planned and checked against the file before the first
// tensor changes.

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
  // Reshape Conv2d/BatchNorm/Linear layers to the file's shapes before loading.
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

// One layer to be reshaped: its new tensors (uninitialized, the loaded values fill them) and
// options.
struct LayerResize {
  torch::nn::Module* module = nullptr;
  std::vector<std::pair<torch::Tensor*, std::vector<std::int64_t>>> tensors;
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
                        const std::string& prefix, const char* field, torch::Tensor& tensor,
                        const std::vector<std::int64_t>& expected) {
  if (!tensor.defined()) return;
  const torch::Tensor* found = file_tensor(file, prefix + field);
  if (found == nullptr) return;  // reported as a missing key
  if (found->sizes() != c10::IntArrayRef(expected)) {
    problems << "\n  " << prefix << field << ": model " << tensor.sizes() << ", file "
             << found->sizes() << ", expected " << shape_text(expected) << " for the resized layer";
    return;
  }
  resize.tensors.emplace_back(&tensor, expected);
}

inline void unresizable(std::ostringstream& problems, const std::string& name, const std::string& kind,
                        const torch::Tensor& model_weight, const torch::Tensor& file_weight,
                        std::string_view why) {
  problems << "\n  " << kind << " '" << name << "' cannot take the file's shape: weight model "
           << model_weight.sizes() << ", file " << file_weight.sizes() << " (" << why << ")";
}

inline void plan_conv(std::vector<LayerResize>& plan, std::ostringstream& problems,
                      const StateDict& file, const std::string& name, torch::nn::Conv2dImpl& conv) {
  const std::string prefix = name.empty() ? "" : name + ".";
  const torch::Tensor* w = file_tensor(file, prefix + "weight");
  if (w == nullptr || w->sizes() == conv.weight.sizes()) return;
  if (w->dim() != 4 || w->size(2) != conv.weight.size(2) || w->size(3) != conv.weight.size(3))
    return unresizable(problems, name, "Conv2d", conv.weight, *w, "a resize keeps the kernel size");
  LayerResize r{&conv, {}, w->size(0), 0, conv.options.groups()};
  if (r.groups == 1) {
    r.in = w->size(1);
  } else {
    const std::int64_t out_per_group = conv.options.out_channels() / r.groups;
    if (w->size(1) != conv.weight.size(1) || w->size(0) % out_per_group != 0)
      return unresizable(problems, name, "Conv2d", conv.weight, *w,
                         "a grouped convolution is resized by whole groups: the per-group input "
                         "count must stay and the output count be a multiple of " +
                             std::to_string(out_per_group));
    r.groups = w->size(0) / out_per_group;
    r.in = r.groups * w->size(1);
  }
  if (r.out < 1 || r.in < 1)
    return unresizable(problems, name, "Conv2d", conv.weight, *w, "a layer keeps at least one channel");
  plan_tensor(r, problems, file, prefix, "weight", conv.weight, w->sizes().vec());
  plan_tensor(r, problems, file, prefix, "bias", conv.bias, {r.out});
  plan.push_back(std::move(r));
}

inline void plan_linear(std::vector<LayerResize>& plan, std::ostringstream& problems,
                        const StateDict& file, const std::string& name, torch::nn::LinearImpl& linear) {
  const std::string prefix = name.empty() ? "" : name + ".";
  const torch::Tensor* w = file_tensor(file, prefix + "weight");
  if (w == nullptr || w->sizes() == linear.weight.sizes()) return;
  if (w->dim() != 2 || w->size(0) < 1 || w->size(1) < 1)
    return unresizable(problems, name, "Linear", linear.weight, *w, "a Linear weight is [out, in]");
  LayerResize r{&linear, {}, w->size(0), w->size(1), 1};
  plan_tensor(r, problems, file, prefix, "weight", linear.weight, w->sizes().vec());
  plan_tensor(r, problems, file, prefix, "bias", linear.bias, {r.out});
  plan.push_back(std::move(r));
}

template <class BatchNormImpl>
void plan_batch_norm(std::vector<LayerResize>& plan, std::ostringstream& problems,
                     const StateDict& file, const std::string& name, BatchNormImpl& bn) {
  const std::string prefix = name.empty() ? "" : name + ".";
  // The affine weight, or without it the running mean, says the file's channel count.
  const char* field = bn.weight.defined() ? "weight" : "running_mean";
  const torch::Tensor& model_tensor = bn.weight.defined() ? bn.weight : bn.running_mean;
  if (!model_tensor.defined()) return;  // no affine parameters, no statistics: nothing to size
  const torch::Tensor* t = file_tensor(file, prefix + field);
  if (t == nullptr || t->sizes() == model_tensor.sizes()) return;
  if (t->dim() != 1 || t->size(0) < 1)
    return unresizable(problems, name, "BatchNorm", model_tensor, *t, "its tensors are [num_features]");
  LayerResize r{&bn, {}, t->size(0), t->size(0), 1};
  for (auto [f, tensor] : {std::pair<const char*, torch::Tensor*>{"weight", &bn.weight},
                           {"bias", &bn.bias},
                           {"running_mean", &bn.running_mean},
                           {"running_var", &bn.running_var}})
    plan_tensor(r, problems, file, prefix, f, *tensor, {r.out});
  plan.push_back(std::move(r));
}

inline void apply_resize(const LayerResize& r) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> fresh;
  for (const auto& [tensor, shape] : r.tensors) fresh.emplace_back(*tensor, torch::empty(shape, tensor->options()));
  set_tensor_data(fresh);  // the file's values are copied in next
  set_layer_widths(*r.module, r.out, r.in, r.groups);
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
    if (auto* conv = m->as<torch::nn::Conv2dImpl>())
      plan_conv(plan, problems, file, name, *conv);
    else if (auto* linear = m->as<torch::nn::LinearImpl>())
      plan_linear(plan, problems, file, name, *linear);
    else if (auto* bn2 = m->as<torch::nn::BatchNorm2dImpl>())
      plan_batch_norm(plan, problems, file, name, *bn2);
    else if (auto* bn1 = m->as<torch::nn::BatchNorm1dImpl>())
      plan_batch_norm(plan, problems, file, name, *bn1);
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
    for (const auto& [tensor, shape] : r.tensors) new_shapes[tensor->unsafeGetTensorImpl()] = shape;
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
