#pragma once
// Errors: every bad argument raises fasterai::argument_error whose message names the function,
// the argument, the offending value and what is allowed. Nothing is silently clamped.

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace fasterai {

class argument_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

// Concatenate message parts by appending. (GCC 12 at -O3 reports false -Warray-bounds and
// -Wstringop-overflow on `"literal" + std::string` chains once inlined; appends avoid them.)
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::string s;
  (s.append(std::string_view(parts)), ...);
  return s;
}

template <class Value>
[[noreturn]] void throw_argument_error(std::string_view where, std::string_view argument,
                                       const Value& value, std::string_view allowed) {
  std::ostringstream os;
  os << where << ": argument '" << argument << "' = " << value << " is not allowed; expected "
     << allowed;
  throw argument_error(os.str());
}

template <class Value>
void check_argument(bool ok, std::string_view where, std::string_view argument,
                    const Value& value, std::string_view allowed) {
  if (!ok) throw_argument_error(where, argument, value, allowed);
}

// A sparsity is a percentage in [0, 100): 100 would remove every group of a layer.
inline void check_sparsity(std::string_view where, double sparsity) {
  check_argument(sparsity >= 0.0 && sparsity < 100.0, where, "sparsity", sparsity,
                 "a percentage in [0, 100)");
}

}  // namespace detail
}  // namespace fasterai
