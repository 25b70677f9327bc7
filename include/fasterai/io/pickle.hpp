#pragma once
// The pickle format as state_dicts use it: the opcodes (protocols 2 to 4; Python's
// Lib/pickletools.py documents each one), Python's names for storage dtypes, and the writer
// of a state_dict's data.pkl. The reader is unpickler.hpp.

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torch/torch.h>

namespace fasterai::detail::pickle {

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

// `torch.FloatStorage` and friends: Python's names for the dtype of a storage record.
inline const std::vector<std::pair<std::string_view, c10::ScalarType>>& storage_types() {
  static const std::vector<std::pair<std::string_view, c10::ScalarType>> types{
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
    if (t == dtype) return std::string(name);
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

}  // namespace fasterai::detail::pickle
