#pragma once
// The unpickler of a state_dict's data.pkl: exactly the subset of pickle that Python's
// `torch.save(state_dict)` and LibTorch's `torch::pickle_save` write. Any opcode or global
// outside it is named and refused, never guessed at, and no callable outside a fixed list is
// ever called: a pickle cannot run code here.
//
// Built for hostile input, with ReadLimits bounding what one pickle may cost:
// - Values are 16-byte handles. Strings stay in the pickle's bytes; containers and tensors live
//   in one arena (`Objects`) and refer to each other by index. Fetching a memoized value
//   copies a handle, never the value, so no file is larger in memory than in bytes by more
//   than a constant factor, and freeing the arena is flat: no recursion however deep the
//   nesting.
// - A container is sealed once it is placed inside another one; changing a sealed container
//   is refused. Python writes every container completely before using it, so only a
//   self-referencing pickle is refused, and no reference cycle can exist.
// - Nesting depth, values held and the pickle's length are bounded (ReadLimits); a dict's keys
//   are found through a hash index, so n keys cost O(n).
// - A memoized value costs its price once, however often it is fetched: strings are interned
//   (a string's bytes are hashed once, where the pickle holds them; a dict key or storage key
//   fetched again costs O(1)), a persistent id is resolved once, and a tensor is charged by its
//   dimension count (ReadLimits::max_dims), so that sizes and strides shared through the memo
//   cannot buy memory or time beyond the limits.
//
// Storage records are not read here: a persistent id ('storage', type, key, location, numel)
// is handed to a loader, which the state_dict assembly connects to the zip archive (and a fuzz
// target to anything it likes).

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include <torch/torch.h>

#include <fasterai/io/pickle.hpp>
#include <fasterai/io/read_limits.hpp>

namespace fasterai::detail::pickle {

// --- values: handles into the pickle's bytes and the arena

struct None {};
struct Str {  // bytes [pos, pos + size) of the pickle
  std::uint32_t pos, size;
};
struct Tuple {
  std::uint32_t id;
};
struct List {
  std::uint32_t id;
};
struct Dict {
  std::uint32_t id;
};
// The callables and types a state_dict refers to; any other global is refused when read.
enum class Known : std::uint8_t {
  OrderedDict,
  rebuild_tensor_v2,
  rebuild_parameter,
  restore_type_tag,
  storage_type,  // with the dtype in Global::dtype
};
struct Global {
  Known what;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
};
struct Storage {
  std::uint32_t id;  // into Objects::tensors: 1-D, all of the storage's elements
};
struct Tensor {
  std::uint32_t id;  // into Objects::tensors
};

using Value = std::variant<None, bool, std::int64_t, double, Str, Tuple, List, Dict, Global,
                           Storage, Tensor>;

// A tuple, list or dict (items key, value, key, value, ...).
struct Container {
  std::vector<Value> items;
  // A dict's keys (interned: see Unpickler::intern) -> position of their value in `items`.
  std::unique_ptr<std::unordered_map<std::uint32_t, std::size_t>> index;
  std::int64_t depth = 1;  // 1 + the depth of the deepest container inside
  bool sealed = false;     // inside another container: never changed again
};

struct Objects {
  std::string bytes;                // data.pkl: Str values point into it
  std::deque<Container> containers;  // deques: elements never move
  std::deque<torch::Tensor> tensors;

  std::string_view str(Str s) const { return std::string_view(bytes).substr(s.pos, s.size); }
  const Container& at(std::uint32_t id) const { return containers[id]; }
  const torch::Tensor& tensor(std::uint32_t id) const { return tensors[id]; }
};

// What unpickling yields: the root value and everything it refers to.
struct Unpickled {
  Objects objects;
  Value root;
};

// Returns the storage's elements as a 1-D tensor of `dtype` with `numel` elements, or throws.
using StorageLoader =
    std::function<torch::Tensor(const std::string& key, c10::ScalarType dtype, std::int64_t numel)>;

inline Unpickled unpickle(std::string bytes, const StorageLoader& load_storage,
                          const ReadLimits& limits = ReadLimits());

// ---------------------------------------------------------------------------------------------

[[noreturn]] inline void fail(const std::string& problem) { throw std::runtime_error(problem); }

inline std::string kind_of(const Value& x) {
  struct Visitor {
    std::string operator()(const None&) const { return "None"; }
    std::string operator()(bool) const { return "bool"; }
    std::string operator()(std::int64_t) const { return "int"; }
    std::string operator()(double) const { return "float"; }
    std::string operator()(const Str&) const { return "str"; }
    std::string operator()(const Tuple&) const { return "tuple"; }
    std::string operator()(const List&) const { return "list"; }
    std::string operator()(const Dict&) const { return "dict"; }
    std::string operator()(const Global&) const { return "global"; }
    std::string operator()(const Storage&) const { return "storage"; }
    std::string operator()(const Tensor&) const { return "tensor"; }
  };
  return std::visit(Visitor{}, x);
}

template <class T>
T as(const Value& x, std::string_view what) {
  if (const T* p = std::get_if<T>(&x)) return *p;
  fail(std::string(what) + " is a " + kind_of(x) + ", which a state_dict never has there");
}

inline std::optional<Global> known_global(std::string_view module, std::string_view name) {
  if (module == "collections" && name == "OrderedDict") return Global{Known::OrderedDict};
  if (module == "torch._utils" && name == "_rebuild_tensor_v2")
    return Global{Known::rebuild_tensor_v2};
  if (module == "torch._utils" && name == "_rebuild_parameter")
    return Global{Known::rebuild_parameter};
  if (module == "torch.jit._pickle" && name == "restore_type_tag")
    return Global{Known::restore_type_tag};
  if (module == "torch")
    for (const auto& [storage, dtype] : storage_types())
      if (storage == name) return Global{Known::storage_type, dtype};
  return std::nullopt;
}

class Unpickler {
 public:
  Unpickler(std::string bytes, const StorageLoader& load_storage, const ReadLimits& limits)
      : load_storage_(load_storage), limits_(limits) {
    if (static_cast<std::int64_t>(bytes.size()) > limits.max_pickle_bytes())
      fail(limit_exceeded("data.pkl's " + std::to_string(bytes.size()) + " bytes",
                          "max_pickle_bytes", limits.max_pickle_bytes()));
    if (bytes.size() > std::numeric_limits<std::uint32_t>::max())
      fail("data.pkl is larger than 4 GiB, which no state_dict needs");
    objects_.bytes = std::move(bytes);
  }

  Unpickled run() && {
    Value root = loop();
    return Unpickled{std::move(objects_), root};
  }

 private:
  Value loop() {
    const std::string_view bytes = objects_.bytes;
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
        case Op::MARK:
          charge(1);
          marks_.push_back(stack_.size());
          break;
        case Op::NONE: push(None{}); break;
        case Op::NEWTRUE: push(true); break;
        case Op::NEWFALSE: push(false); break;
        case Op::BININT1: push(std::int64_t{read_byte()}); break;
        case Op::BININT2: push(std::int64_t{read_le<std::uint16_t>()}); break;
        case Op::BININT:
          push(std::int64_t{static_cast<std::int32_t>(read_le<std::uint32_t>())});
          break;
        case Op::LONG1: push(read_long(read_byte())); break;
        case Op::BINFLOAT: push(read_double()); break;
        case Op::SHORT_BINUNICODE: push(read_string(read_byte())); break;
        case Op::BINUNICODE: push(read_string(read_le<std::uint32_t>())); break;
        case Op::BINUNICODE8: push(read_string(read_le<std::uint64_t>())); break;
        case Op::EMPTY_TUPLE: push(Tuple{new_container({})}); break;
        case Op::TUPLE1: push_tuple(1); break;
        case Op::TUPLE2: push_tuple(2); break;
        case Op::TUPLE3: push_tuple(3); break;
        case Op::TUPLE: push_tuple(stack_.size() - pop_mark()); break;
        case Op::EMPTY_LIST: push(List{new_container({})}); break;
        case Op::APPEND: {
          Value item = pop();
          append(list_at_top("APPEND"), item);
          break;
        }
        case Op::APPENDS: {
          const std::size_t m = pop_mark();
          if (m == 0) fail("APPENDS without a list below its MARK");
          const std::uint32_t list = list_below(m, "APPENDS");
          for (std::size_t i = m; i < stack_.size(); ++i) append(list, stack_[i]);
          drop_from(m);
          break;
        }
        case Op::EMPTY_DICT: push(Dict{new_container({})}); break;
        case Op::SETITEM: {
          Value value = pop();
          Value key = pop();
          set_item(dict_at_top("SETITEM"), key, value);
          break;
        }
        case Op::SETITEMS: {
          const std::size_t m = pop_mark();
          if ((stack_.size() - m) % 2 != 0) fail("SETITEMS with an odd number of values");
          if (m == 0) fail("SETITEMS without a dict below its MARK");
          const std::uint32_t dict = dict_of(stack_[m - 1], "SETITEMS");
          for (std::size_t i = m; i < stack_.size(); i += 2)
            set_item(dict, stack_[i], stack_[i + 1]);
          drop_from(m);
          break;
        }
        case Op::BINPUT: memo_put(read_byte()); break;
        case Op::LONG_BINPUT: memo_put(read_le<std::uint32_t>()); break;
        case Op::MEMOIZE: memo_put(static_cast<std::uint32_t>(memo_.size())); break;
        case Op::BINGET: push(memo_get(read_byte())); break;
        case Op::LONG_BINGET: push(memo_get(read_le<std::uint32_t>())); break;
        case Op::GLOBAL: {
          const std::string_view module = read_line(bytes);
          const std::string_view name = read_line(bytes);
          push_global(module, name);
          break;
        }
        case Op::STACK_GLOBAL: {
          const Str name = as<Str>(pop(), "STACK_GLOBAL's name");
          const Str module = as<Str>(pop(), "STACK_GLOBAL's module");
          push_global(objects_.str(module), objects_.str(name));
          break;
        }
        case Op::BINPERSID: {
          const Value pid = pop();
          push(persistent_load(as<Tuple>(pid, "a persistent id")));
          break;
        }
        case Op::REDUCE: {
          const Value args = pop();
          const Value callable = pop();
          push(reduce(as<Global>(callable, "REDUCE's callable"),
                      as<Tuple>(args, "REDUCE's arguments")));
          break;
        }
        case Op::BUILD: {
          // Python sets an OrderedDict's `_metadata` (per-module versions) this way; loading
          // needs none of it.
          pop();
          if (!std::holds_alternative<Dict>(top()))
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

  // --- reading bytes; a short read means a damaged file, never undefined behaviour
  void need(std::uint64_t n) const {
    if (n > objects_.bytes.size() - pos_)
      fail("data.pkl ends in the middle of an opcode (truncated)");
  }
  std::uint8_t read_byte() {
    need(1);
    return static_cast<std::uint8_t>(objects_.bytes[pos_++]);
  }
  template <class U>
  U read_le() {
    need(sizeof(U));
    U value = 0;
    for (std::size_t i = 0; i < sizeof(U); ++i)
      value |= static_cast<U>(static_cast<std::uint8_t>(objects_.bytes[pos_ + i])) << (8 * i);
    pos_ += sizeof(U);
    return value;
  }
  std::uint64_t read_be_u64() {
    need(8);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < 8; ++i)
      value = (value << 8) | static_cast<std::uint8_t>(objects_.bytes[pos_ + i]);
    pos_ += 8;
    return value;
  }
  Str read_string(std::uint64_t n) {
    need(n);
    const Str s{static_cast<std::uint32_t>(pos_), static_cast<std::uint32_t>(n)};
    pos_ += static_cast<std::size_t>(n);
    return s;
  }
  double read_double() {  // BINFLOAT: a big-endian IEEE 754 double
    const std::uint64_t bits = read_be_u64();
    double value = 0;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  std::string_view read_line(std::string_view bytes) {
    const auto end = bytes.find('\n', pos_);
    if (end == std::string_view::npos) fail("data.pkl ends inside a GLOBAL name (truncated)");
    const std::string_view s = bytes.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  // LONG1: little-endian two's complement of n bytes; a state_dict's ints fit in 64 bits.
  std::int64_t read_long(std::size_t n) {
    if (n > 8) fail("an integer of " + std::to_string(n) + " bytes does not fit in 64 bits");
    need(n);
    std::uint64_t value = 0;
    for (std::size_t i = 0; i < n; ++i)
      value |= std::uint64_t{static_cast<std::uint8_t>(objects_.bytes[pos_ + i])} << (8 * i);
    if (n > 0 && n < 8 && (static_cast<std::uint8_t>(objects_.bytes[pos_ + n - 1]) & 0x80))
      value |= ~std::uint64_t{0} << (8 * n);  // sign extension
    pos_ += n;
    return static_cast<std::int64_t>(value);
  }

  // --- what the pickle holds at once, bounded by ReadLimits::max_entries. One entry is one
  // 16-byte value; a container, a dict key's index slot and a tensor cost more, by their size.
  static constexpr std::int64_t container_cost = 4, index_cost = 2, tensor_cost = 8;
  void charge(std::int64_t n) {
    entries_ += n;
    if (entries_ > limits_.max_entries())
      fail(limit_exceeded("the values data.pkl holds at once", "max_entries",
                          limits_.max_entries()));
  }

  // --- the stack and its marks
  void push(Value x) {
    charge(1);
    stack_.push_back(x);
  }
  const Value& top() const {
    if (stack_.empty()) fail("the pickle stack is empty where a value was expected");
    return stack_.back();
  }
  Value pop() {
    Value x = top();
    stack_.pop_back();
    entries_ -= 1;
    return x;
  }
  void drop_from(std::size_t m) {
    entries_ -= static_cast<std::int64_t>(stack_.size() - m);
    stack_.resize(m);
  }
  std::size_t pop_mark() {
    if (marks_.empty()) fail("an opcode needs a MARK that is not there");
    const std::size_t m = marks_.back();
    marks_.pop_back();
    entries_ -= 1;
    if (m > stack_.size()) fail("a MARK lies above the top of the stack");
    return m;
  }

  // --- containers
  std::uint32_t new_container(std::vector<Value> items) {
    if (objects_.containers.size() >= std::numeric_limits<std::uint32_t>::max())
      fail("data.pkl builds more than 4 billion containers");
    charge(container_cost);
    objects_.containers.push_back(Container{std::move(items), nullptr, 1, false});
    return static_cast<std::uint32_t>(objects_.containers.size() - 1);
  }
  static std::optional<std::uint32_t> container_of(const Value& x) {
    if (const auto* t = std::get_if<Tuple>(&x)) return t->id;
    if (const auto* l = std::get_if<List>(&x)) return l->id;
    if (const auto* d = std::get_if<Dict>(&x)) return d->id;
    return std::nullopt;
  }
  // `item` goes inside container `parent`: it is sealed, and the parent's depth grows.
  void adopt(std::uint32_t parent_id, const Value& item) {
    Container& parent = objects_.containers[parent_id];
    if (const auto child = container_of(item)) {
      if (*child == parent_id)
        fail("a container is placed inside itself: a self-referencing pickle, which a "
             "state_dict never is");
      Container& c = objects_.containers[*child];
      c.sealed = true;
      if (c.depth + 1 > parent.depth) {
        parent.depth = c.depth + 1;
        if (parent.depth > limits_.max_depth())
          fail(limit_exceeded("the nesting depth of data.pkl's containers", "max_depth",
                              limits_.max_depth()));
      }
    }
  }
  Container& changeable(std::uint32_t id, std::string_view opcode) {
    Container& c = objects_.containers[id];
    if (c.sealed)
      fail(std::string(opcode) +
           " changes a container that already lies inside another one: a self-referencing "
           "pickle, which a state_dict never is");
    return c;
  }
  void push_tuple(std::size_t n) {
    if (n > stack_.size()) fail("a TUPLE opcode needs more values than the stack holds");
    const std::size_t m = stack_.size() - n;
    std::vector<Value> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    drop_from(m);
    charge(static_cast<std::int64_t>(items.size()));
    const std::uint32_t id = new_container(std::move(items));
    Container& tuple = objects_.containers[id];
    for (const Value& item : tuple.items) adopt(id, item);
    tuple.sealed = true;  // tuples never change
    push(Tuple{id});
  }
  std::uint32_t list_at_top(std::string_view opcode) const {
    const auto* list = std::get_if<List>(&top());
    if (list == nullptr) fail(std::string(opcode) + " on a " + kind_of(top()));
    return list->id;
  }
  std::uint32_t list_below(std::size_t m, std::string_view opcode) const {
    const auto* list = std::get_if<List>(&stack_[m - 1]);
    if (list == nullptr) fail(std::string(opcode) + " on a " + kind_of(stack_[m - 1]));
    return list->id;
  }
  void append(std::uint32_t list, const Value& item) {
    Container& c = changeable(list, "APPEND");
    adopt(list, item);
    charge(1);
    c.items.push_back(item);
  }
  std::uint32_t dict_of(const Value& x, std::string_view opcode) const {
    const auto* dict = std::get_if<Dict>(&x);
    if (dict == nullptr) fail(std::string(opcode) + " on a " + kind_of(x));
    return dict->id;
  }
  std::uint32_t dict_at_top(std::string_view opcode) const { return dict_of(top(), opcode); }
  // A repeated key replaces the value in place, as in a Python dict.
  void set_item(std::uint32_t dict, const Value& key, const Value& value) {
    const std::uint32_t k = intern(as<Str>(key, "a dict key"));
    Container& c = changeable(dict, "SETITEM");
    if (!c.index) c.index = std::make_unique<std::unordered_map<std::uint32_t, std::size_t>>();
    adopt(dict, value);
    const auto [it, fresh] = c.index->try_emplace(k, c.items.size() + 1);
    if (!fresh) {
      c.items[it->second] = value;
      return;
    }
    charge(2 + index_cost);
    c.items.push_back(key);
    c.items.push_back(value);
  }

  // --- strings, interned: equal strings get one id. Each string the pickle holds (one Str per
  // place in data.pkl) is hashed once, when it is first used as a key; fetched again from the
  // memo, it is found by its place in O(1). So a key of n bytes costs O(n) once, not per use.
  std::uint32_t intern(Str s) {
    if (const auto it = string_ids_.find(s.pos); it != string_ids_.end()) return it->second;
    charge(index_cost);
    const auto [it, fresh] =
        interned_.try_emplace(objects_.str(s), static_cast<std::uint32_t>(interned_.size()));
    if (fresh) charge(index_cost);
    string_ids_.emplace(s.pos, it->second);
    return it->second;
  }

  // --- the memo: handles, never copies of values
  void memo_put(std::uint32_t index) {
    const Value& x = top();
    const auto [it, fresh] = memo_.try_emplace(index, x);
    if (fresh)
      charge(2);  // a hash node: about two values
    else
      it->second = x;
  }
  Value memo_get(std::uint32_t index) const {
    const auto it = memo_.find(index);
    if (it == memo_.end())
      fail("memo entry " + std::to_string(index) + " is read before it is written");
    return it->second;
  }

  // --- the objects a state_dict builds
  void push_global(std::string_view module, std::string_view name) {
    const auto g = known_global(module, name);
    if (!g)
      fail("unsupported global '" + std::string(module) + "." + std::string(name) +
           "': a state_dict holds only tensors (torch._utils._rebuild_tensor_v2) in an "
           "OrderedDict");
    push(*g);
  }

  // A tensor costs its TensorImpl, and 16 bytes (one entry) per dimension for its sizes and
  // strides.
  std::uint32_t new_tensor(torch::Tensor t) {
    if (objects_.tensors.size() >= std::numeric_limits<std::uint32_t>::max())
      fail("data.pkl builds more than 4 billion tensors");
    charge(tensor_cost + t.dim());
    objects_.tensors.push_back(std::move(t));
    return static_cast<std::uint32_t>(objects_.tensors.size() - 1);
  }

  Value reduce(Global f, Tuple args_handle) {
    const std::vector<Value>& args = objects_.at(args_handle.id).items;
    switch (f.what) {
      case Known::OrderedDict:  // OrderedDict(): its items follow as SETITEMS
        if (!args.empty()) fail("collections.OrderedDict called with arguments");
        return Dict{new_container({})};
      case Known::restore_type_tag:  // torch::pickle_save's (dict, "Dict[str, Tensor]")
        if (args.size() != 2) fail("restore_type_tag expects 2 arguments");
        return args[0];
      case Known::rebuild_tensor_v2: return Tensor{new_tensor(rebuild_tensor(args))};
      case Known::rebuild_parameter: {  // (data, requires_grad, backward_hooks)
        if (args.size() != 3) fail("_rebuild_parameter expects 3 arguments");
        torch::Tensor t = objects_.tensor(as<Tensor>(args[0], "a parameter's data").id);
        const bool requires_grad = as<bool>(args[1], "requires_grad");
        if (requires_grad && !t.is_floating_point() && !t.is_complex())
          fail("a parameter of dtype " + std::string(c10::toString(t.scalar_type())) +
               " cannot require gradients");
        t = t.detach();
        t.set_requires_grad(requires_grad);
        return Tensor{new_tensor(std::move(t))};
      }
      case Known::storage_type: break;
    }
    fail("a storage type cannot be called");
  }

  // A tensor's size or stride: at most max_dims ints, checked before any is read.
  std::vector<std::int64_t> dims(const Value& x, std::string_view what) const {
    const std::vector<Value>& items = objects_.at(as<Tuple>(x, what).id).items;
    if (static_cast<std::int64_t>(items.size()) > limits_.max_dims())
      fail(limit_exceeded(std::string(what) + " of " + std::to_string(items.size()) +
                              " dimensions",
                          "max_dims", limits_.max_dims()));
    std::vector<std::int64_t> values;
    values.reserve(items.size());
    for (const Value& item : items) values.push_back(as<std::int64_t>(item, what));
    return values;
  }

  // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks
  // [, metadata]): a strided view of a storage, or a copy that resolves the metadata's flags.
  // Hooks do not affect the values.
  torch::Tensor rebuild_tensor(const std::vector<Value>& args) {
    if (args.size() != 6 && args.size() != 7)
      fail("_rebuild_tensor_v2 expects 6 or 7 arguments, got " + std::to_string(args.size()));
    const std::uint32_t storage = as<Storage>(args[0], "a tensor's storage").id;
    const torch::Tensor& flat = objects_.tensor(storage);
    const std::int64_t offset = as<std::int64_t>(args[1], "a tensor's storage offset");
    const auto size = dims(args[2], "a tensor's size");
    const auto stride = dims(args[3], "a tensor's stride");
    const bool requires_grad = as<bool>(args[4], "requires_grad");
    if (size.size() != stride.size()) fail("a tensor's size and stride differ in length");
    // The last element the view reaches must lie inside the storage (checked without
    // overflow: the numbers come from the file).
    const std::int64_t numel = flat.numel();
    if (offset < 0) fail("a tensor has a negative storage offset");
    bool empty = false;
    std::int64_t last = offset;
    std::int64_t elements = 1;  // saturates at the int64 maximum
    for (std::size_t i = 0; i < size.size(); ++i) {
      if (size[i] < 0 || stride[i] < 0) fail("a tensor has a negative size or stride");
      if (size[i] == 0) empty = true;
      elements = size[i] != 0 && elements > std::numeric_limits<std::int64_t>::max() / size[i]
                     ? std::numeric_limits<std::int64_t>::max()
                     : elements * size[i];
      if (size[i] <= 1 || stride[i] == 0) continue;
      if (size[i] - 1 > (numel - 1 - std::min(last, numel - 1)) / stride[i])
        last = numel;
      else
        last += (size[i] - 1) * stride[i];
    }
    if (empty) elements = 0;
    if (!empty && last >= numel)
      fail("a tensor reaches past the end of its storage of " + std::to_string(numel) +
           " elements");
    if (elements > numel && elements - numel > limits_.max_view_elements())
      fail(limit_exceeded("a tensor of " + std::to_string(elements) +
                              " elements over a storage of " + std::to_string(numel) +
                              " (a view that repeats values)",
                          "max_view_elements", limits_.max_view_elements()));
    if (requires_grad && !flat.is_floating_point() && !flat.is_complex())
      fail("a tensor of dtype " + std::string(c10::toString(flat.scalar_type())) +
           " cannot require gradients");
    const torch::Tensor& values = args.size() == 7 ? with_metadata(storage, args[6]) : flat;
    torch::Tensor t = values.as_strided(size, stride, offset);
    if (requires_grad) t.set_requires_grad(true);
    return t;
  }

  // PyTorch 2.x's seventh argument of _rebuild_tensor_v2: None, or a dict of flags that change
  // what the storage's values mean (torch._utils.set_tensor_metadata, i.e.
  // torch::jit::setTensorMetadata). torch.save writes {'conj': True} for a conjugate view
  // (`z.conj()`: the values are the conjugates of the stored ones), {'neg': True} for a
  // negative view (`z.conj().imag`: the negatives), or both. PyTorch 2.6 sets the tensor's
  // conj/neg bit. Here the tensor is the same view (size, stride, offset) of a copy of its
  // storage with the flags resolved: no bit is set, so every LibTorch function and data_ptr()
  // see the values Python sees. One copy per storage and flags, its bytes counted against
  // max_tensor_bytes: a small file cannot buy more copies than it has storages.
  // Whatever else a file puts there is refused, never ignored: an unknown key (PyTorch 2.6
  // ignores those), a flag that is not True (2.6 sets the bit for any value, even False),
  // 'conj' on a real tensor (2.6 fails) and 'neg' on a bool tensor (whose negative 2.6 cannot
  // compute either).
  const torch::Tensor& with_metadata(std::uint32_t storage, const Value& metadata) {
    const torch::Tensor& flat = objects_.tensor(storage);
    if (std::holds_alternative<None>(metadata)) return flat;
    const Dict dict = as<Dict>(metadata, "_rebuild_tensor_v2's metadata (its 7th argument)");
    bool conj = false, neg = false;
    const std::vector<Value>& items = objects_.at(dict.id).items;
    for (std::size_t i = 0; i + 1 < items.size(); i += 2) {
      const std::string_view key = objects_.str(std::get<Str>(items[i]));
      if (key != "conj" && key != "neg")
        fail("a tensor's metadata has the key '" + std::string(key.substr(0, 64)) +
             "', which this reader does not know (it knows 'conj' and 'neg'); refused rather "
             "than loading values that may be wrong");
      const bool* flag = std::get_if<bool>(&items[i + 1]);
      if (flag == nullptr || !*flag)
        fail("a tensor's metadata '" + std::string(key) + "' is " +
             (flag != nullptr ? std::string("False") : "a " + kind_of(items[i + 1])) +
             "; torch.save writes only True there (and PyTorch 2.6 would set the flag anyway)");
      (key == "conj" ? conj : neg) = true;
    }
    const std::string dtype = c10::toString(flat.scalar_type());
    if (conj && !flat.is_complex())
      fail("a tensor's metadata 'conj' is set on a tensor of dtype " + dtype +
           ": only complex tensors have conjugate views");
    if (neg && flat.scalar_type() == c10::ScalarType::Bool)
      fail("a tensor's metadata 'neg' is set on a tensor of dtype Bool, which has no negative");
    if (!conj && !neg) return flat;
    const auto [it, fresh] = resolved_.try_emplace({storage, int{conj} + 2 * int{neg}});
    if (fresh) {
      charge(index_cost);
      charge_tensor_bytes(flat.numel(), flat.scalar_type(),
                          "a copy that resolves a conjugate or negative view");
      torch::Tensor values = conj ? torch::conj_physical(flat) : flat;
      it->second = neg ? torch::neg(values) : values;
    }
    return it->second;
  }

  // The bytes of the tensors the file yields (storages, and the copies above), bounded by
  // max_tensor_bytes before they are allocated.
  void charge_tensor_bytes(std::int64_t numel, c10::ScalarType dtype, std::string_view what) {
    const auto element = static_cast<std::int64_t>(c10::elementSize(dtype));
    const std::int64_t room = limits_.max_tensor_bytes() - tensor_bytes_;
    if (numel > room / element)
      fail(limit_exceeded("the tensors' bytes, with " + std::string(what) + " of " +
                              std::to_string(numel) + " elements of " + c10::toString(dtype) +
                              ",",
                          "max_tensor_bytes", limits_.max_tensor_bytes()));
    tensor_bytes_ += numel * element;
  }

  // ('storage', storage_type, key, location, numel): the raw little-endian bytes of record
  // data/<key>. The location (cpu, cuda:0) is ignored: tensors are read to the CPU and copied
  // to wherever the model's tensors live. Tensors naming the same key share one storage. A
  // persistent id fetched again from the memo is resolved once (tuples never change), and
  // its key is interned: neither costs more than O(1) when used again.
  Value persistent_load(Tuple pid_handle) {
    if (const auto it = resolved_pids_.find(pid_handle.id); it != resolved_pids_.end())
      return it->second;
    const Value storage = resolve_pid(pid_handle);
    charge(index_cost);
    resolved_pids_.emplace(pid_handle.id, storage);
    return storage;
  }
  Value resolve_pid(Tuple pid_handle) {
    const std::vector<Value>& pid = objects_.at(pid_handle.id).items;
    if (pid.size() != 5 || objects_.str(as<Str>(pid[0], "a persistent id's tag")) != "storage")
      fail("a persistent id that is not ('storage', type, key, location, numel)");
    const Global type = as<Global>(pid[1], "a storage type");
    if (type.what != Known::storage_type) fail("a persistent id whose type is not a storage");
    const Str key_str = as<Str>(pid[2], "a storage key");
    const std::uint32_t key_id = intern(key_str);
    // The key's bytes are copied only for the loader (once per distinct storage) and for
    // messages (at most 256 bytes of it).
    auto shown = [&] { return std::string(objects_.str(key_str).substr(0, 256)); };
    const std::int64_t numel = as<std::int64_t>(pid[4], "a storage size");
    if (numel < 0) fail("storage " + shown() + " has a negative size");
    if (const auto it = storages_.find(key_id); it != storages_.end()) {
      const torch::Tensor& known = objects_.tensor(it->second);
      if (known.scalar_type() != type.dtype || known.numel() != numel)
        fail("storage " + shown() + " is read both as " + std::to_string(known.numel()) + " " +
             c10::toString(known.scalar_type()) + " and as " + std::to_string(numel) + " " +
             c10::toString(type.dtype));
      return Storage{it->second};
    }
    charge_tensor_bytes(numel, type.dtype, "storage " + shown());
    torch::Tensor flat = load_storage_(std::string(objects_.str(key_str)), type.dtype, numel);
    if (!flat.defined() || flat.dim() != 1 || flat.numel() != numel ||
        flat.scalar_type() != type.dtype)
      fail("storage " + shown() + " was not loaded as " + std::to_string(numel) + " elements");
    const std::uint32_t id = new_tensor(std::move(flat));
    storages_.emplace(key_id, id);
    return Storage{id};
  }

  Objects objects_;
  std::size_t pos_ = 0;
  const StorageLoader& load_storage_;
  ReadLimits limits_;
  std::int64_t entries_ = 0;
  std::int64_t tensor_bytes_ = 0;
  std::vector<Value> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint32_t, Value> memo_;
  std::unordered_map<std::uint32_t, std::uint32_t> storages_;       // interned key -> tensor
  std::unordered_map<std::uint32_t, Value> resolved_pids_;          // pid tuple -> Storage
  std::map<std::pair<std::uint32_t, int>, torch::Tensor> resolved_;  // (storage, flags) -> copy
  std::unordered_map<std::uint32_t, std::uint32_t> string_ids_;     // Str::pos -> interned id
  std::unordered_map<std::string_view, std::uint32_t> interned_;    // bytes -> interned id
};

inline Unpickled unpickle(std::string bytes, const StorageLoader& load_storage,
                          const ReadLimits& limits) {
  // Storage records hold raw bytes in the writer's order, little-endian by default. (No
  // std::endian: this header and zip_reader.hpp also build as C++17, for clang's libFuzzer,
  // which cannot compile LibTorch 1.13's headers as C++20 against libstdc++ 12.)
  const std::uint16_t probe = 1;
  if (*reinterpret_cast<const unsigned char*>(&probe) != 1)
    throw std::runtime_error("reading state_dicts needs a little-endian machine");
  return Unpickler(std::move(bytes), load_storage, limits).run();
}

}  // namespace fasterai::detail::pickle
