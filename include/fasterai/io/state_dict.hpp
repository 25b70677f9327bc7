#pragma once
// State-dict I/O: load the weights Python saved with `torch.save(model.state_dict(), path)`
// into a LibTorch model, and save a model's weights in that same format, so one file moves
// between a torchvision model in Python and its fasterai twin in C++ in both directions.
//
// Why a hand-written reader: LibTorch 1.13's `torch::pickle_load` cannot read such a file. It
// turns the pickled `collections.OrderedDict` into None and rejects SETITEM (the opcode of a
// dict with one entry). The file is a zip archive (`<archive>/data.pkl` plus one record
// `<archive>/data/<key>` per storage), which LibTorch's own `PyTorchStreamReader` reads; what
// is missing is an unpickler for `data.pkl`. The one below knows exactly the small subset of
// pickle that a state_dict uses, as Python's `torch.save` and LibTorch's `torch::pickle_save`
// write it, and names any opcode or global outside that subset instead of guessing.
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

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <new>
#include <sstream>
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
#include <fasterai/io/read_limits.hpp>

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
// Reading: the zip archive, then data.pkl through the unpickler below.

namespace pickle {

// Values of the pickle machine. Containers are shared, never copied: pickle's memo refers to the
// same dict that later SETITEMs fill, and a memoized tuple fetched again costs nothing.
struct Value;
struct None {};
struct Global {
  std::string module, name;
};
struct Storage {
  torch::Tensor flat;  // 1-D, the storage's dtype, all of its elements
};
using Items = std::vector<Value>;
using Tuple = std::shared_ptr<const Items>;
using List = std::shared_ptr<std::vector<Value>>;
using Dict = std::shared_ptr<std::vector<std::pair<std::string, Value>>>;  // insertion order

struct Value {
  std::variant<None, bool, std::int64_t, double, std::string, Tuple, List, Dict, Global, Storage,
               torch::Tensor>
      v;
};

}  // namespace pickle

inline pickle::Value unpickle(caffe2::serialize::PyTorchStreamReader& archive,
                             const ReadLimits& limits);

inline std::unique_ptr<caffe2::serialize::PyTorchStreamReader> open_archive(
    const std::filesystem::path& path);

inline StateDict read_state_dict(std::string_view where, const std::filesystem::path& path,
                                 const ReadLimits& limits) {
  auto fail = [&](std::string_view problem) {
    std::ostringstream os;
    os << where << ": cannot read " << path << ": " << problem;
    throw state_dict_error(os.str());
  };
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail("no such file");
  if (!std::filesystem::is_regular_file(path, ec)) fail("not a regular file");
  if (!std::ifstream(path, std::ios::binary)) fail("the file cannot be opened");

  pickle::Value root;
  try {
    auto archive = open_archive(path);
    if (archive->hasRecord("byteorder")) {
      auto [data, size] = archive->getRecord("byteorder");
      const std::string order(static_cast<const char*>(data.get()), size);
      if (order != "little") fail("byte order '" + order + "' is not supported (only little)");
    }
    if (!archive->hasRecord("data.pkl"))
      fail("the zip archive has no data.pkl record: not a file written by torch.save");
    root = unpickle(*archive, limits);
  } catch (const state_dict_error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const c10::Error& e) {
    fail(e.what_without_backtrace());
  } catch (const std::exception& e) {
    fail(e.what());
  }

  auto* dict = std::get_if<pickle::Dict>(&root.v);
  if (dict == nullptr)
    fail("the file holds no dict of tensors (save model.state_dict(), not the model)");
  StateDict state;
  state.reserve((*dict)->size());
  for (auto& [key, value] : **dict) {
    auto* tensor = std::get_if<torch::Tensor>(&value.v);
    if (tensor == nullptr)
      fail("entry '" + key + "' is not a tensor: the file is not a flat state_dict");
    state.insert(key, *tensor);
  }
  return state;
}

// miniz's messages ("failed finding central directory") do not say what the user did wrong.
inline std::unique_ptr<caffe2::serialize::PyTorchStreamReader> open_archive(
    const std::filesystem::path& path) {
  try {
    return std::make_unique<caffe2::serialize::PyTorchStreamReader>(path.string());
  } catch (const c10::Error& e) {
    throw std::runtime_error(
        std::string("not a zip archive written by torch.save, or a truncated one (files saved "
                    "with _use_new_zipfile_serialization=False are not supported): ") +
        e.what_without_backtrace());
  }
}

namespace pickle {

[[noreturn]] inline void fail(const std::string& problem) { throw std::runtime_error(problem); }

inline std::string kind_of(const Value& x) {
  struct Visitor {
    std::string operator()(const None&) const { return "None"; }
    std::string operator()(bool) const { return "bool"; }
    std::string operator()(std::int64_t) const { return "int"; }
    std::string operator()(double) const { return "float"; }
    std::string operator()(const std::string&) const { return "str"; }
    std::string operator()(const Tuple&) const { return "tuple"; }
    std::string operator()(const List&) const { return "list"; }
    std::string operator()(const Dict&) const { return "dict"; }
    std::string operator()(const Global& g) const { return "global " + g.module + "." + g.name; }
    std::string operator()(const Storage&) const { return "storage"; }
    std::string operator()(const torch::Tensor&) const { return "tensor"; }
  };
  return std::visit(Visitor{}, x.v);
}

template <class T>
const T& as(const Value& x, std::string_view what) {
  if (const T* p = std::get_if<T>(&x.v)) return *p;
  fail(std::string(what) + " is a " + kind_of(x) + ", which a state_dict never has there");
}

inline std::vector<std::int64_t> as_ints(const Value& x, std::string_view what) {
  std::vector<std::int64_t> ints;
  for (const Value& item : *as<Tuple>(x, what)) ints.push_back(as<std::int64_t>(item, what));
  return ints;
}

// `torch.FloatStorage` and friends: Python's names for the dtype of a storage record.
inline const std::vector<std::pair<std::string, c10::ScalarType>>& storage_types() {
  static const std::vector<std::pair<std::string, c10::ScalarType>> types{
      {"DoubleStorage", torch::kDouble},
      {"FloatStorage", torch::kFloat},
      {"HalfStorage", torch::kHalf},
      {"BFloat16Storage", torch::kBFloat16},
      {"LongStorage", torch::kLong},
      {"IntStorage", torch::kInt},
      {"ShortStorage", torch::kShort},
      {"CharStorage", torch::kChar},
      {"ByteStorage", torch::kByte},
      {"BoolStorage", torch::kBool},
      {"ComplexFloatStorage", torch::kComplexFloat},
      {"ComplexDoubleStorage", torch::kComplexDouble}};
  return types;
}

inline c10::optional<c10::ScalarType> storage_dtype(const Global& g) {
  if (g.module != "torch") return c10::nullopt;
  for (const auto& [name, dtype] : storage_types())
    if (name == g.name) return dtype;
  return c10::nullopt;
}

// The globals a state_dict refers to; any other callable in a pickle is refused, never run.
inline bool is_known_global(const Global& g) {
  return (g.module == "collections" && g.name == "OrderedDict") ||
         (g.module == "torch._utils" &&
          (g.name == "_rebuild_tensor_v2" || g.name == "_rebuild_parameter")) ||
         (g.module == "torch.jit._pickle" && g.name == "restore_type_tag") ||
         storage_dtype(g).has_value();
}

// Opcodes of pickle protocols 2 to 4 that state_dicts use (Python's Lib/pickletools.py
// documents each one).
enum class Op : std::uint8_t {
  MARK = '(',
  STOP = '.',
  BININT = 'J',
  BININT1 = 'K',
  BININT2 = 'M',
  NONE = 'N',
  BINPERSID = 'Q',
  REDUCE = 'R',
  BINUNICODE = 'X',
  EMPTY_LIST = ']',
  APPEND = 'a',
  BUILD = 'b',
  GLOBAL = 'c',
  APPENDS = 'e',
  BINGET = 'h',
  LONG_BINGET = 'j',
  BINPUT = 'q',
  LONG_BINPUT = 'r',
  SETITEM = 's',
  TUPLE = 't',
  SETITEMS = 'u',
  EMPTY_DICT = '}',
  EMPTY_TUPLE = ')',
  BINFLOAT = 'G',
  PROTO = 0x80,
  TUPLE1 = 0x85,
  TUPLE2 = 0x86,
  TUPLE3 = 0x87,
  NEWTRUE = 0x88,
  NEWFALSE = 0x89,
  LONG1 = 0x8a,
  SHORT_BINUNICODE = 0x8c,
  BINUNICODE8 = 0x8d,
  STACK_GLOBAL = 0x93,
  MEMOIZE = 0x94,
  FRAME = 0x95,
};

class Unpickler {
 public:
  Unpickler(std::string_view bytes, caffe2::serialize::PyTorchStreamReader& archive,
            const ReadLimits& limits)
      : bytes_(bytes), archive_(archive), limits_(limits) {}

  Value run() {
    while (true) {
      const std::size_t at = pos_;
      const auto op = static_cast<Op>(read_byte());
      switch (op) {
        case Op::PROTO: read_byte(); break;
        case Op::FRAME: read_le<std::uint64_t>(); break;  // framing only groups opcodes
        case Op::STOP: {
          if (stack_.size() != 1 || !marks_.empty())
            fail("STOP with " + std::to_string(stack_.size()) + " values on the stack");
          return pop();
        }
        case Op::MARK: marks_.push_back(stack_.size()); break;
        case Op::NONE: push(None{}); break;
        case Op::NEWTRUE: push(true); break;
        case Op::NEWFALSE: push(false); break;
        case Op::BININT1: push(std::int64_t{read_byte()}); break;
        case Op::BININT2: push(std::int64_t{read_le<std::uint16_t>()}); break;
        case Op::BININT:
          push(std::int64_t{static_cast<std::int32_t>(read_le<std::uint32_t>())});
          break;
        case Op::LONG1: push(read_long(read_byte())); break;
        case Op::BINFLOAT: push(std::bit_cast<double>(read_be_u64())); break;
        case Op::SHORT_BINUNICODE: push(read_string(read_byte())); break;
        case Op::BINUNICODE: push(read_string(read_le<std::uint32_t>())); break;
        case Op::BINUNICODE8: push(read_string(read_le<std::uint64_t>())); break;
        case Op::EMPTY_TUPLE: push(std::make_shared<const Items>()); break;
        case Op::TUPLE1: push_tuple(1); break;
        case Op::TUPLE2: push_tuple(2); break;
        case Op::TUPLE3: push_tuple(3); break;
        case Op::TUPLE: push_tuple(stack_.size() - pop_mark()); break;
        case Op::EMPTY_LIST: push(std::make_shared<std::vector<Value>>()); break;
        case Op::APPEND: {
          Value item = pop();
          list_at_top("APPEND")->push_back(std::move(item));
          break;
        }
        case Op::APPENDS: {
          std::vector<Value> items = pop_to_mark();
          auto& list = *list_at_top("APPENDS");
          for (auto& item : items) list.push_back(std::move(item));
          break;
        }
        case Op::EMPTY_DICT:
          push(std::make_shared<std::vector<std::pair<std::string, Value>>>());
          break;
        case Op::SETITEM: {
          Value value = pop();
          Value key = pop();
          set_item(key, std::move(value));
          break;
        }
        case Op::SETITEMS: {
          std::vector<Value> items = pop_to_mark();
          if (items.size() % 2 != 0) fail("SETITEMS with an odd number of values");
          for (std::size_t i = 0; i < items.size(); i += 2)
            set_item(items[i], std::move(items[i + 1]));
          break;
        }
        case Op::BINPUT: memo_[read_byte()] = top(); break;
        case Op::LONG_BINPUT: memo_[read_le<std::uint32_t>()] = top(); break;
        case Op::MEMOIZE: memo_[static_cast<std::uint32_t>(memo_.size())] = top(); break;
        case Op::BINGET: push(memo_get(read_byte())); break;
        case Op::LONG_BINGET: push(memo_get(read_le<std::uint32_t>())); break;
        case Op::GLOBAL: {
          std::string module = read_line();
          std::string name = read_line();
          push_global(Global{std::move(module), std::move(name)});
          break;
        }
        case Op::STACK_GLOBAL: {
          std::string name = as<std::string>(pop(), "STACK_GLOBAL's name");
          std::string module = as<std::string>(pop(), "STACK_GLOBAL's module");
          push_global(Global{std::move(module), std::move(name)});
          break;
        }
        case Op::BINPERSID: {
          Value pid = pop();
          push(persistent_load(*as<Tuple>(pid, "a persistent id")));
          break;
        }
        case Op::REDUCE: {
          Value args = pop();
          Value callable = pop();
          push(reduce(as<Global>(callable, "REDUCE's callable"),
                      *as<Tuple>(args, "REDUCE's arguments")));
          break;
        }
        case Op::BUILD: {
          // Python sets an OrderedDict's `_metadata` (per-module versions) this way; loading
          // needs none of it.
          pop();
          if (!std::holds_alternative<Dict>(top().v))
            fail("BUILD on a " + kind_of(top()) + " is not supported");
          break;
        }
        default: {
          std::ostringstream os;
          const auto code = static_cast<unsigned>(static_cast<std::uint8_t>(op));
          os << "unsupported pickle opcode 0x" << std::hex << code;
          if (code >= 0x20 && code < 0x7f) os << " ('" << static_cast<char>(code) << "')";
          os << std::dec << " at byte " << at << " of data.pkl";
          fail(os.str());
        }
      }
    }
  }

 private:
  // --- reading bytes; a short read means a damaged file, never undefined behaviour
  void need(std::uint64_t n) const {
    if (n > bytes_.size() - pos_) fail("data.pkl ends in the middle of an opcode (truncated)");
  }
  std::uint8_t read_byte() {
    need(1);
    return static_cast<std::uint8_t>(bytes_[pos_++]);
  }
  template <class U>
  U read_le() {
    need(sizeof(U));
    U value = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i)
      value |= static_cast<U>(static_cast<std::uint8_t>(bytes_[pos_ + i])) << (8 * i);
    pos_ += sizeof(U);
    return value;
  }
  std::uint64_t read_be_u64() {
    need(8);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < 8; ++i)
      value = (value << 8) | static_cast<std::uint8_t>(bytes_[pos_ + i]);
    pos_ += 8;
    return value;
  }
  std::string read_string(std::uint64_t n) {
    need(n);
    std::string s(bytes_.substr(pos_, static_cast<std::size_t>(n)));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }
  std::string read_line() {
    const auto end = bytes_.find('\n', pos_);
    if (end == std::string_view::npos) fail("data.pkl ends inside a GLOBAL name (truncated)");
    std::string s(bytes_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return s;
  }
  // LONG1: little-endian two's complement of n bytes; a state_dict's ints fit in 64 bits.
  std::int64_t read_long(std::size_t n) {
    if (n > 8) fail("an integer of " + std::to_string(n) + " bytes does not fit in 64 bits");
    need(n);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < n; ++i)
      value |= std::uint64_t{static_cast<std::uint8_t>(bytes_[pos_ + i])} << (8 * i);
    if (n > 0 && n < 8 && (static_cast<std::uint8_t>(bytes_[pos_ + n - 1]) & 0x80))
      value |= ~std::uint64_t{0} << (8 * n);  // sign extension
    pos_ += n;
    return static_cast<std::int64_t>(value);
  }

  // --- the stack, its marks and the memo
  // Any alternative of Value, or a Value itself (aggregate init from one Value copies it).
  template <class T>
  void push(T&& x) {
    stack_.push_back(Value{std::forward<T>(x)});
  }
  Value& top() {
    if (stack_.empty()) fail("the pickle stack is empty where a value was expected");
    return stack_.back();
  }
  Value pop() {
    Value x = std::move(top());
    stack_.pop_back();
    return x;
  }
  std::size_t pop_mark() {
    if (marks_.empty()) fail("an opcode needs a MARK that is not there");
    const std::size_t m = marks_.back();
    marks_.pop_back();
    if (m > stack_.size()) fail("a MARK lies above the top of the stack");
    return m;
  }
  std::vector<Value> pop_to_mark() {
    const std::size_t m = pop_mark();
    std::vector<Value> items(
        std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  void push_tuple(std::size_t n) {
    if (n > stack_.size()) fail("a TUPLE opcode needs more values than the stack holds");
    Items items(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
                std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    push(std::make_shared<const Items>(std::move(items)));
  }
  const Value& memo_get(std::uint32_t index) const {
    const auto it = memo_.find(index);
    if (it == memo_.end())
      fail("memo entry " + std::to_string(index) + " is read before it is written");
    return it->second;
  }
  List& list_at_top(std::string_view opcode) {
    auto* list = std::get_if<List>(&top().v);
    if (list == nullptr) fail(std::string(opcode) + " on a " + kind_of(top()));
    return *list;
  }
  // A repeated key replaces the value in place, as in a Python dict.
  void set_item(const Value& key, Value value) {
    const auto& k = as<std::string>(key, "a dict key");
    auto* dict = std::get_if<Dict>(&top().v);
    if (dict == nullptr) fail("SETITEM on a " + kind_of(top()));
    auto& entries = **dict;
    const auto it =
        std::find_if(entries.begin(), entries.end(), [&](const auto& e) { return e.first == k; });
    if (it != entries.end())
      it->second = std::move(value);
    else
      entries.emplace_back(k, std::move(value));
  }

  // --- the objects a state_dict builds
  void push_global(Global g) {
    if (!is_known_global(g))
      fail("unsupported global '" + g.module + "." + g.name +
           "': a state_dict holds only tensors (torch._utils._rebuild_tensor_v2) in an "
           "OrderedDict");
    push(std::move(g));
  }

  Value reduce(const Global& f, const Items& args) {
    if (f.module == "collections") {  // OrderedDict(): its items follow as SETITEMS
      if (!args.empty()) fail("collections.OrderedDict called with arguments");
      return Value{std::make_shared<std::vector<std::pair<std::string, Value>>>()};
    }
    if (f.name == "restore_type_tag") {  // torch::pickle_save's (dict, "Dict[str, Tensor]")
      if (args.size() != 2) fail("restore_type_tag expects 2 arguments");
      return args[0];
    }
    if (f.name == "_rebuild_tensor_v2") return Value{rebuild_tensor(args)};
    if (f.name == "_rebuild_parameter") {  // (data, requires_grad, backward_hooks)
      if (args.size() != 3) fail("_rebuild_parameter expects 3 arguments");
      torch::Tensor t = as<torch::Tensor>(args[0], "a parameter's data");
      t.set_requires_grad(as<bool>(args[1], "requires_grad"));
      return Value{t};
    }
    fail("'" + f.module + "." + f.name + "' cannot be called");
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
  // [, metadata]): a strided view of a storage. Hooks and metadata do not affect the values.
  torch::Tensor rebuild_tensor(const Items& args) {
    if (args.size() != 6 && args.size() != 7)
      fail("_rebuild_tensor_v2 expects 6 or 7 arguments, got " + std::to_string(args.size()));
    const torch::Tensor& flat = as<Storage>(args[0], "a tensor's storage").flat;
    const std::int64_t offset = as<std::int64_t>(args[1], "a tensor's storage offset");
    const auto size = as_ints(args[2], "a tensor's size");
    const auto stride = as_ints(args[3], "a tensor's stride");
    const bool requires_grad = as<bool>(args[4], "requires_grad");
    if (size.size() != stride.size()) fail("a tensor's size and stride differ in length");
    // The last element the view reaches must lie inside the storage (checked without
    // overflow: the numbers come from the file).
    const std::int64_t numel = flat.numel();
    if (offset < 0) fail("a tensor has a negative storage offset");
    bool empty = false;
    std::int64_t last = offset;
    for (std::size_t i = 0; i < size.size(); ++i) {
      if (size[i] < 0 || stride[i] < 0) fail("a tensor has a negative size or stride");
      if (size[i] == 0) empty = true;
      if (size[i] <= 1 || stride[i] == 0) continue;
      if (size[i] - 1 > (numel - 1 - std::min(last, numel - 1)) / stride[i])
        last = numel;
      else
        last += (size[i] - 1) * stride[i];
    }
    if (!empty && last >= numel)
      fail("a tensor reaches past the end of its storage of " + std::to_string(numel) +
           " elements");
    std::int64_t view_numel = 1;
    for (std::int64_t n : size)
      view_numel = n != 0 && view_numel > std::numeric_limits<std::int64_t>::max() / n
                       ? std::numeric_limits<std::int64_t>::max()
                       : view_numel * n;
    if (view_numel > numel && view_numel - numel > limits_.max_view_elements())
      fail(limit_exceeded("a tensor of " + std::to_string(view_numel) +
                              " elements over a storage of " + std::to_string(numel) +
                              " (a view that repeats values)",
                          "max_view_elements", limits_.max_view_elements()));
    torch::Tensor t = flat.as_strided(size, stride, offset);
    if (requires_grad) t.set_requires_grad(true);
    return t;
  }

  // ('storage', storage_type, key, location, numel): the raw little-endian bytes of record
  // data/<key>. The location (cpu, cuda:0) is ignored: tensors are read to the CPU and copied
  // to wherever the model's tensors live. Tensors naming the same key share one storage.
  Value persistent_load(const Items& pid) {
    if (pid.size() != 5 || as<std::string>(pid[0], "a persistent id's tag") != "storage")
      fail("a persistent id that is not ('storage', type, key, location, numel)");
    const Global& type = as<Global>(pid[1], "a storage type");
    const auto dtype = storage_dtype(type);
    if (!dtype) fail("'" + type.module + "." + type.name + "' is not a storage type");
    const std::string& key = as<std::string>(pid[2], "a storage key");
    const std::int64_t numel = as<std::int64_t>(pid[4], "a storage size");
    if (const auto it = storages_.find(key); it != storages_.end()) {
      if (it->second.flat.scalar_type() != *dtype)
        fail("storage " + key + " is read both as " + c10::toString(it->second.flat.scalar_type()) +
             " and as " + c10::toString(*dtype));
      return Value{it->second};
    }

    const std::string record = "data/" + key;
    if (!archive_.hasRecord(record)) fail("the zip archive has no record " + record);
    auto [data, nbytes] = archive_.getRecord(record);
    const auto element_size = static_cast<std::uint64_t>(c10::elementSize(*dtype));
    if (numel < 0 || nbytes % element_size != 0 ||
        static_cast<std::uint64_t>(numel) != nbytes / element_size)
      fail("record " + record + " has " + std::to_string(nbytes) + " bytes, not " +
           std::to_string(numel) + " elements of " + std::string(c10::toString(*dtype)));
    if (static_cast<std::uint64_t>(limits_.max_tensor_bytes() - tensor_bytes_) < nbytes)
      fail(limit_exceeded("the storages' " + std::to_string(tensor_bytes_ + nbytes) + " bytes",
                          "max_tensor_bytes", limits_.max_tensor_bytes()));
    tensor_bytes_ += static_cast<std::int64_t>(nbytes);
    Storage storage{torch::empty({numel}, torch::TensorOptions().dtype(*dtype))};
    if (nbytes > 0) std::memcpy(storage.flat.data_ptr(), data.get(), nbytes);
    storages_.emplace(key, storage);
    return Value{std::move(storage)};
  }

  std::string_view bytes_;
  std::size_t pos_ = 0;
  caffe2::serialize::PyTorchStreamReader& archive_;
  ReadLimits limits_;
  std::int64_t tensor_bytes_ = 0;
  std::vector<Value> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint32_t, Value> memo_;
  std::unordered_map<std::string, Storage> storages_;
};

}  // namespace pickle

inline pickle::Value unpickle(caffe2::serialize::PyTorchStreamReader& archive,
                             const ReadLimits& limits) {
  // Storage records hold raw bytes in the writer's order, little-endian by default.
  if constexpr (std::endian::native != std::endian::little)
    throw std::runtime_error("reading state_dicts needs a little-endian machine");
  auto [data, size] = archive.getRecord("data.pkl");
  return pickle::Unpickler(std::string_view(static_cast<const char*>(data.get()), size), archive,
                           limits)
      .run();
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
// a view into a larger buffer would otherwise drag that whole buffer into the file.
inline torch::Tensor for_saving(const torch::Tensor& t) {
  torch::Tensor c = t.detach().cpu();
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

namespace pickle {

// Python's own opcodes for a state_dict: an OrderedDict filled by SETITEMS, each tensor
// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` of a persistent
// ('storage', torch.XStorage, key, 'cpu', numel). Only globals on torch.load's weights_only
// allowlist appear. The memo holds OrderedDict (0) and _rebuild_tensor_v2 (1).
class Pickler {
 public:
  std::string bytes;

  Pickler& op(Op o) { return byte(static_cast<std::uint8_t>(o)); }
  Pickler& byte(std::uint8_t b) {
    bytes += static_cast<char>(b);
    return *this;
  }
  Pickler& little_endian(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) byte(static_cast<std::uint8_t>(v >> (8 * i)));
    return *this;
  }
  // The shortest of BININT1, BININT2, BININT and LONG1 (8 bytes, two's complement).
  Pickler& integer(std::int64_t v) {
    const auto u = static_cast<std::uint64_t>(v);
    if (v >= 0 && v < 0x100) return op(Op::BININT1).little_endian(u, 1);
    if (v >= 0 && v < 0x10000) return op(Op::BININT2).little_endian(u, 2);
    if (v >= std::numeric_limits<std::int32_t>::min() &&
        v <= std::numeric_limits<std::int32_t>::max())
      return op(Op::BININT).little_endian(u, 4);
    return op(Op::LONG1).byte(8).little_endian(u, 8);
  }
  Pickler& ints(c10::IntArrayRef values) {
    op(Op::MARK);
    for (std::int64_t v : values) integer(v);
    return op(Op::TUPLE);
  }
  Pickler& string(std::string_view s) {
    op(Op::BINUNICODE).little_endian(s.size(), 4);
    bytes += s;
    return *this;
  }
  Pickler& global(std::string_view module, std::string_view name) {
    op(Op::GLOBAL);
    ((bytes += module) += '\n') += name;
    bytes += '\n';
    return *this;
  }
  Pickler& memo_put(std::uint8_t index) { return op(Op::BINPUT).byte(index); }
  Pickler& memo_get(std::uint8_t index) { return op(Op::BINGET).byte(index); }
};

inline std::string storage_type_of(c10::ScalarType dtype) {
  for (const auto& [name, t] : storage_types())
    if (t == dtype) return name;
  throw std::runtime_error(std::string("tensors of dtype ") + c10::toString(dtype) +
                           " cannot be saved in a state_dict file");
}

inline std::string pickle_state_dict(
    const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
    const std::vector<std::string>& storage_keys) {
  Pickler p;
  p.op(Op::PROTO).byte(2);
  p.global("collections", "OrderedDict").memo_put(0).op(Op::EMPTY_TUPLE).op(Op::REDUCE);
  if (!tensors.empty()) p.op(Op::MARK);
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    p.string(name);
    if (i == 0)
      p.global("torch._utils", "_rebuild_tensor_v2").memo_put(1);
    else
      p.memo_get(1);
    p.op(Op::MARK);
    p.op(Op::MARK)  // the storage's persistent id
        .string("storage")
        .global("torch", storage_type_of(t.scalar_type()))
        .string(storage_keys[i])
        .string("cpu")
        .integer(static_cast<std::int64_t>(t.storage().nbytes()) / t.element_size())
        .op(Op::TUPLE)
        .op(Op::BINPERSID);
    p.integer(t.storage_offset()).ints(t.sizes()).ints(t.strides());
    p.op(Op::NEWFALSE);                                // requires_grad
    p.memo_get(0).op(Op::EMPTY_TUPLE).op(Op::REDUCE);  // backward_hooks: OrderedDict()
    p.op(Op::TUPLE).op(Op::REDUCE);
  }
  if (!tensors.empty()) p.op(Op::SETITEMS);
  p.op(Op::STOP);
  return p.bytes;
}

}  // namespace pickle
}  // namespace detail
}  // namespace fasterai
