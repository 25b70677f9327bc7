#pragma once
// Method policies: where the threshold is taken.
//
//   Local   each layer reaches the target on its own: a layer of n groups loses
//           floor(n * s / 100) of them. Predictable per-layer cost; the choice of
//           the fasterai article (2020).
//   Global  one threshold over the groups of all selected layers: floor(N * s / 100) of all N
//           groups go, wherever they are least important. Layers end up with different
//           sparsities; each keeps at least one group.

#include <string_view>

namespace fasterai::method {

struct Local {
  static constexpr std::string_view name() { return "Local"; }
  static constexpr bool global = false;
};

struct Global {
  static constexpr std::string_view name() { return "Global"; }
  static constexpr bool global = true;
};

}  // namespace fasterai::method
