#pragma once
// Catch2 for fasterai's tests, version 3 (preferred) or 2, whichever tests/CMakeLists.txt found.
// Tests include this header, never Catch2's own, and use the v2 spellings that both serve:
// Approx(x), Catch::Contains("text").

#if FASTERAI_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>

using Catch::Approx;

namespace Catch {
// v3 renamed the substring matcher; v2's name is what the tests use.
inline auto Contains(const std::string& text,
                     CaseSensitive sensitivity = CaseSensitive::Yes) {
  return Matchers::ContainsSubstring(text, sensitivity);
}
}  // namespace Catch
#else
#include <catch2/catch.hpp>
#endif

#include <cstdlib>
#include <iostream>

// A test that cannot run here (no Python oracle, no dataset, no oneDNN) says why and reports
// SKIPPED, never passed: under CTest (which sets FASTERAI_UNDER_CTEST and treats exit code 77 as
// a skip, tests/CMakeLists.txt) the process exits with 77; run by hand, the binary warns and
// goes on with the next test case.
#define FASTERAI_SKIP(why)                                                  \
  do {                                                                      \
    if (std::getenv("FASTERAI_UNDER_CTEST")) {                              \
      std::cerr << "SKIPPED: " << why << std::endl;                         \
      std::exit(77);                                                        \
    }                                                                       \
    WARN("SKIPPED: " << why);                                               \
    return;                                                                 \
  } while (false)
