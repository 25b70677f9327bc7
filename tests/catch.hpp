#pragma once
// Catch2 for fasterai's tests, version 3 (preferred) or 2, whichever tests/CMakeLists.txt found.
// Tests include this header, never Catch2's own, and use the v2 spellings that both serve:
// Approx(x), Catch::Contains("text").

#if FASTERAI_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>

using Catch::Approx;

namespace Catch {
// v3 renamed the substring matcher; v2's name is what the tests use.
inline Matchers::ContainsSubstringMatcher Contains(const std::string& text,
                                                   CaseSensitive sensitivity = CaseSensitive::Yes) {
  return Matchers::ContainsSubstring(text, sensitivity);
}
}  // namespace Catch
#else
#include <catch2/catch.hpp>
#endif
