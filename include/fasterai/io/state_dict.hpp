#pragma once
// State-dict I/O: load the weights Python saved with `torch.save(model.state_dict(), path)`
// into a LibTorch model, and save a model's weights in that same format, so one file moves
// between a torchvision model in Python and its fasterai twin in C++ in both directions.
//
// Why a hand-written reader: LibTorch 1.13's `torch::pickle_load` cannot read such a file. It
// turns the pickled `collections.OrderedDict` into None and rejects SETITEM (the opcode of a
// dict with one entry). The file is a zip archive (`<archive>/data.pkl` plus one record
// `<archive>/data/<key>` per storage). Three pieces read it, each usable and testable alone:
// zip_reader.hpp (the archive, every CRC-32, size and offset checked), unpickler.hpp (exactly
// the subset of pickle a state_dict uses; it names anything else instead of guessing, and
// calls nothing outside a fixed list), and the assembly below (a dict of str -> tensor).
// A weight file may come from anywhere: ReadLimits bound what reading one may cost.
//
// Why a hand-written writer: `torch::pickle_save` tags its dict with a global that Python's
// `torch.load(..., weights_only=True)` refuses, and that is PyTorch's default since 2.6. Files
// written here carry the same opcodes and globals as Python's own `torch.save(state_dict)`.
//
// Loading is all-or-nothing. Every key, shape and dtype is checked before the first value is
// copied, and a mismatch raises ONE `state_dict_error` that lists every offending key. Values
// are copied into the model's existing parameters and buffers, which keep their device and
// dtype. A file dtype differing from the model's is accepted only when the conversion is
// lossless: same kind (integral, floating, complex) and the model's dtype holds every value of
// the file's (int32 -> int64, float16 -> float32, float32 -> float64). Anything else, such as
// float64 -> float32, is reported as a dtype mismatch.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <fasterai/core/concepts.hpp>
#include <fasterai/core/error.hpp>
#include <fasterai/io/pickle.hpp>
#include <fasterai/io/read_limits.hpp>
#include <fasterai/io/unpickler.hpp>
#include <fasterai/io/zip_reader.hpp>

namespace fasterai {

// A file that cannot be read as a state_dict, or a state_dict that does not fit the model. The
// message names the function, the path and every offending key.
class state_dict_error : public argument_error {
 public:
  using argument_error::argument_error;
};

// Keys in the file's order (for files we write: Python's order, module by module).
using StateDict = torch::OrderedDict<std::string, torch::Tensor>;

namespace detail {
inline StateDict read_state_dict(std::string_view where, const std::filesystem::path& path,
                                 const ReadLimits& limits);
inline std::vector<std::pair<std::string, torch::Tensor>> state_of(const torch::nn::Module& model);
inline void check_fits(std::string_view where, std::string_view source,
                       const std::vector<std::pair<std::string, torch::Tensor>>& model_state,
                       const StateDict& file_state);
inline void copy_state(const std::vector<std::pair<std::string, torch::Tensor>>& model_state,
                       const StateDict& file_state);
inline std::string describe(const std::filesystem::path& path);
inline void write_state_dict(std::string_view where, const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, torch::Tensor>>& state);
}  // namespace detail

// Copies the state_dict saved at `path` into `model`'s parameters and buffers (names as in
// Python: `features.0.weight`, `features.1.running_mean`, `features.1.num_batches_tracked`).
// On any error the model is left exactly as it was. `limits` bound what reading the file may
// cost (see read_limits.hpp).
template <module M>
void load_state_dict(M&& model, const std::filesystem::path& path,
                     const ReadLimits& limits = ReadLimits()) {
  constexpr std::string_view where = "fasterai::load_state_dict";
  const torch::nn::Module& m = detail::impl(model);
  const StateDict file_state = detail::read_state_dict(where, path, limits);
  const auto model_state = detail::state_of(m);
  detail::check_fits(where, detail::describe(path), model_state, file_state);
  detail::copy_state(model_state, file_state);
}

// Copies an already read state_dict (from read_state_dict, perhaps edited) into `model` with
// the same checks: every key, shape and dtype must fit, or nothing changes.
template <module M>
void load_state_dict(M&& model, const StateDict& state) {
  constexpr std::string_view where = "fasterai::load_state_dict";
  const auto model_state = detail::state_of(detail::impl(model));
  detail::check_fits(where, "the given state_dict", model_state, state);
  detail::copy_state(model_state, state);
}

// Writes `model`'s parameters and buffers to `path` in the format of Python's
// `torch.save(model.state_dict(), path)`: `torch.load` returns an OrderedDict of CPU tensors (also
// with weights_only=True, the default since PyTorch 2.6) that `model.load_state_dict` accepts,
// and `load_state_dict` above reads the file back bit for bit. An existing file is replaced only
// once the new one is complete.
template <module M>
void save_state_dict(const M& model, const std::filesystem::path& path) {
  detail::write_state_dict("fasterai::save_state_dict", path,
                           detail::state_of(detail::impl(model)));
}

// The state_dict saved at `path` as CPU tensors, without a model: to inspect a file, or to
// load only part of it by hand.
inline StateDict read_state_dict(const std::filesystem::path& path,
                                 const ReadLimits& limits = ReadLimits()) {
  return detail::read_state_dict("fasterai::read_state_dict", path, limits);
}

namespace detail {

// ---------------------------------------------------------------------------------------------
// The model's side: its state in Python's order, and whether a file's state fits it.

// Each module's own parameters, then its own buffers, then its children, depth first: the order
// of Python's `Module.state_dict()`. Undefined tensors (a Linear without bias) are not state.
inline std::vector<std::pair<std::string, torch::Tensor>> state_of(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> state;
  auto add_own = [&](const std::string& prefix, const torch::nn::Module& m) {
    for (const auto& p : m.named_parameters(/*recurse=*/false))
      if (p.value().defined()) state.emplace_back(prefix + p.key(), p.value());
    for (const auto& b : m.named_buffers(/*recurse=*/false))
      if (b.value().defined()) state.emplace_back(prefix + b.key(), b.value());
  };
  add_own("", model);
  // include_self = false: the model itself need not be owned by a shared_ptr.
  for (const auto& child : model.named_modules("", /*include_self=*/false))
    add_own(child.key() + ".", *child.value());
  return state;
}

// True when every value of dtype `from` is exactly representable in dtype `to`.
inline bool converts_exactly(c10::ScalarType from, c10::ScalarType to) {
  if (from == to) return true;
  auto kind = [](c10::ScalarType t) {
    if (c10::isComplexType(t)) return 2;
    if (c10::isFloatingType(t)) return 1;
    if (c10::isIntegralType(t, /*includeBool=*/true)) return 0;
    return -1;  // quantized and other exotic types: never converted
  };
  if (kind(from) < 0 || kind(from) != kind(to)) return false;
  try {
    return c10::promoteTypes(from, to) == to;
  } catch (const c10::Error&) {
    return false;  // a pair of types with no promotion rule
  }
}

inline std::string describe(const std::filesystem::path& path) {
  std::ostringstream os;
  os << "the state_dict in " << path;
  return os.str();
}

// copy_ keeps the target's device and dtype; check_fits allowed only lossless conversions.
inline void copy_state(const std::vector<std::pair<std::string, torch::Tensor>>& model_state,
                       const StateDict& file_state) {
  torch::NoGradGuard no_grad;
  for (const auto& [name, target] : model_state) {
    torch::Tensor destination = target;
    destination.copy_(file_state[name]);
  }
}

inline void check_fits(std::string_view where, std::string_view source,
                       const std::vector<std::pair<std::string, torch::Tensor>>& model_state,
                       const StateDict& file_state) {
  std::ostringstream problems;
  std::unordered_set<std::string> model_keys;
  for (const auto& [name, target] : model_state) {
    model_keys.insert(name);
    const torch::Tensor* found = file_state.find(name);
    if (found == nullptr) {
      problems << "\n  missing key " << name << ": model " << target.sizes();
    } else if (found->sizes() != target.sizes()) {
      problems << "\n  shape mismatch " << name << ": model " << target.sizes() << ", file "
               << found->sizes();
    } else if (!converts_exactly(found->scalar_type(), target.scalar_type())) {
      problems << "\n  dtype mismatch " << name << ": model " << target.scalar_type() << ", file "
               << found->scalar_type() << " (only lossless conversions are made)";
    }
  }
  for (const auto& item : file_state)
    if (!model_keys.contains(item.key()))
      problems << "\n  unexpected key " << item.key() << ": file " << item.value().sizes();
  if (!problems.str().empty()) {
    std::ostringstream os;
    os << where << ": " << source
       << " does not fit the model; nothing was loaded:" << problems.str();
    throw state_dict_error(os.str());
  }
}

// ---------------------------------------------------------------------------------------------
// Reading: the zip archive (zip_reader.hpp), then data.pkl (unpickler.hpp), then the dict of
// tensors it must hold.

// The archive's records are named "<archive>/data.pkl", "<archive>/data/<key>", ...: all
// under the directory of its first record.
class TorchArchive {
 public:
  explicit TorchArchive(std::unique_ptr<ByteSource> source) : zip_(std::move(source)) {
    if (zip_.records().empty()) throw std::runtime_error("the zip archive is empty");
    const std::string& first = zip_.records().front().name;
    const auto slash = first.find('/');
    if (slash == std::string::npos)
      throw std::runtime_error("the zip archive's records are not in one directory: not a "
                               "file written by torch.save");
    prefix_ = first.substr(0, slash + 1);
  }
  const ZipRecord* find(std::string_view name) const {
    return zip_.find(prefix_ + std::string(name));
  }
  ZipReader& zip() { return zip_; }

 private:
  ZipReader zip_;
  std::string prefix_;
};

// The archive's format version ("3\n" from torch.save); LibTorch reads versions 1 to 10.
inline void check_version(TorchArchive& archive) {
  const ZipRecord* record = archive.find(".data/version");
  if (record == nullptr) record = archive.find("version");
  if (record == nullptr) return;
  if (record->size > 32)
    throw std::runtime_error("the version record holds " + std::to_string(record->size) +
                             " bytes, not a version number");
  std::string text = archive.zip().read_string(*record);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  const bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
  if (!digits)
    throw std::runtime_error("the version record holds '" + text.substr(0, 32) +
                             "', not a version number");
  constexpr std::uint64_t oldest = 1, newest = 10;
  // Beyond 19 digits the number does not fit in 64 bits, and is beyond `newest` anyway.
  const std::uint64_t version = text.size() > 19 ? UINT64_MAX : std::stoull(text);
  if (version < oldest || version > newest)
    throw std::runtime_error("the archive has format version " + text +
                             "; this reader reads versions " + std::to_string(oldest) + " to " +
                             std::to_string(newest) + ", as LibTorch 1.13");
}

// Storage records are read straight into the tensors they back, after their declared size
// is checked against the pickle's element count and the limit on tensor bytes.
inline pickle::Unpickled unpickle_archive(TorchArchive& archive, const ReadLimits& limits) {
  if (const ZipRecord* order = archive.find("byteorder")) {
    if (order->size > 16) throw std::runtime_error("the byteorder record is not a byte order");
    const std::string text = archive.zip().read_string(*order);
    if (text != "little")
      throw std::runtime_error("byte order '" + text + "' is not supported (only little)");
  }
  const ZipRecord* pkl = archive.find("data.pkl");
  if (pkl == nullptr)
    throw std::runtime_error("the zip archive has no data.pkl record: not a file written by "
                             "torch.save");
  if (pkl->size > static_cast<std::uint64_t>(limits.max_pickle_bytes()))
    throw std::runtime_error(limit_exceeded("data.pkl's " + std::to_string(pkl->size) +
                                                " bytes",
                                            "max_pickle_bytes", limits.max_pickle_bytes()));
  check_version(archive);
  std::int64_t tensor_bytes = 0;
  const pickle::StorageLoader load = [&](const std::string& key, c10::ScalarType dtype,
                                         std::int64_t numel) {
    const std::string name = "data/" + key;
    const ZipRecord* record = archive.find(name);
    if (record == nullptr) throw std::runtime_error("the zip archive has no record " + name);
    const auto element_size = static_cast<std::uint64_t>(c10::elementSize(dtype));
    if (record->size % element_size != 0 ||
        static_cast<std::uint64_t>(numel) != record->size / element_size)
      throw std::runtime_error("record " + name + " has " + std::to_string(record->size) +
                               " bytes, not " + std::to_string(numel) + " elements of " +
                               std::string(c10::toString(dtype)));
    if (record->size > static_cast<std::uint64_t>(limits.max_tensor_bytes() - tensor_bytes))
      throw std::runtime_error(limit_exceeded(
          "the storages' " + std::to_string(static_cast<std::uint64_t>(tensor_bytes) +
                                            record->size) + " bytes",
          "max_tensor_bytes", limits.max_tensor_bytes()));
    tensor_bytes += static_cast<std::int64_t>(record->size);
    torch::Tensor flat = torch::empty({numel}, torch::TensorOptions().dtype(dtype));
    archive.zip().read(*record, flat.data_ptr());
    return flat;
  };
  return pickle::unpickle(archive.zip().read_string(*pkl), load, limits);
}

// The root must be a dict of str -> tensor.
inline StateDict assemble(const pickle::Unpickled& unpickled,
                          const std::function<void(std::string_view)>& fail) {
  const auto* dict = std::get_if<pickle::Dict>(&unpickled.root);
  if (dict == nullptr)
    fail("the file holds no dict of tensors (save model.state_dict(), not the model)");
  const auto& items = unpickled.objects.at(dict->id).items;
  StateDict state;
  state.reserve(items.size() / 2);
  for (std::size_t i = 0; i + 1 < items.size(); i += 2) {
    const std::string key(unpickled.objects.str(std::get<pickle::Str>(items[i])));
    const auto* tensor = std::get_if<pickle::Tensor>(&items[i + 1]);
    if (tensor == nullptr)
      fail("entry '" + key + "' is not a tensor: the file is not a flat state_dict");
    state.insert(key, unpickled.objects.tensor(tensor->id));
  }
  return state;
}

inline StateDict read_state_dict(std::string_view where, std::unique_ptr<ByteSource> source,
                                 std::string_view name, const ReadLimits& limits) {
  auto fail = [&](std::string_view problem) {
    std::string s(where);
    s.append(": cannot read ").append(name).append(": ").append(problem);
    throw state_dict_error(s);
  };
  pickle::Unpickled unpickled;
  try {
    TorchArchive archive(std::move(source));
    unpickled = unpickle_archive(archive, limits);
  } catch (const state_dict_error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const c10::Error& e) {
    fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return assemble(unpickled, fail);
}

inline StateDict read_state_dict(std::string_view where, const std::filesystem::path& path,
                                 const ReadLimits& limits) {
  std::ostringstream name;
  name << path;
  auto fail = [&](std::string_view problem) {
    std::string s(where);
    s.append(": cannot read ").append(name.str()).append(": ").append(problem);
    throw state_dict_error(s);
  };
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail("no such file");
  if (!std::filesystem::is_regular_file(path, ec)) fail("not a regular file");
  std::unique_ptr<ByteSource> source;
  try {
    source = std::make_unique<FileSource>(path);
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return read_state_dict(where, std::move(source), name.str(), limits);
}

// ---------------------------------------------------------------------------------------------
// Writing: the zip archive, with data.pkl from the pickler below (not torch::pickle_save's,
// whose `torch.jit._pickle.restore_type_tag` torch.load refuses under weights_only=True).

namespace pickle {
inline std::string pickle_state_dict(
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const std::vector<std::string>& storage_keys);
}  // namespace pickle

// A detached CPU tensor that is exactly its storage (contiguous, offset 0, no spare elements):
// a view into a larger buffer would otherwise drag that whole buffer into the file. A conjugate
// or negative view (`z.conj()`) is resolved first: the file holds the values, not the bits.
inline torch::Tensor for_saving(const torch::Tensor& t) {
  torch::Tensor c = t.detach().cpu().resolve_conj().resolve_neg();
  if (!c.is_contiguous() || c.storage_offset() != 0 || c.storage().nbytes() != c.nbytes())
    c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

inline void write_state_dict(std::string_view where, const std::filesystem::path& path,
                             const std::vector<std::pair<std::string, torch::Tensor>>& state) {
  auto fail = [&](std::string_view problem) {
    std::ostringstream os;
    os << where << ": cannot write " << path << ": " << problem;
    throw state_dict_error(os.str());
  };
  // One record per distinct storage, so tensors that share memory (tied weights) still share it
  // when Python loads them.
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> storage_keys;
  std::vector<std::pair<std::string, torch::Tensor>> records;
  std::unordered_map<const void*, std::string> key_of_storage;
  for (const auto& [name, t] : state) {
    torch::Tensor c = for_saving(t);
    const auto [it, fresh] = key_of_storage.try_emplace(c.storage().unsafeGetStorageImpl(),
                                                        std::to_string(key_of_storage.size()));
    if (fresh) records.emplace_back(it->second, c);
    tensors.emplace_back(name, c);
    storage_keys.push_back(it->second);
  }
  std::string data_pkl;
  try {
    data_pkl = pickle::pickle_state_dict(tensors, storage_keys);
  } catch (const std::exception& e) {
    fail(e.what());
  }

  // Written beside the target and renamed, so a failed save never leaves a truncated file at
  // `path`. The writer function never reports a failure to PyTorchStreamWriter (whose
  // destructor would then throw); the stream's state says whether everything was written.
  std::filesystem::path partial = path;
  partial += ".partial";
  auto give_up = [&](std::string_view problem) {
    std::error_code ignored;
    std::filesystem::remove(partial, ignored);
    fail(problem);
  };
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot open the file for writing (does its directory exist?)");
    try {
      caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, std::size_t n) {
        out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
        return n;
      });
      writer.writeRecord("data.pkl", data_pkl.data(), data_pkl.size());
      for (const auto& [key, t] : records)
        writer.writeRecord("data/" + key, t.data_ptr(), static_cast<std::size_t>(t.nbytes()));
      writer.writeEndOfFile();
    } catch (const c10::Error& e) {
      out.close();
      give_up(e.what_without_backtrace());
    }
    out.close();
    if (!out) give_up("writing failed (disk full?)");
  }
  std::error_code ec;
  std::filesystem::rename(partial, path, ec);
  if (ec) give_up(ec.message());
}

}  // namespace detail
}  // namespace fasterai
