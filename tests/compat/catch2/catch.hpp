#pragma once
// Only on the include path with Catch2 3, which has no <catch2/catch.hpp>: for test files that
// still include Catch2 2's header instead of tests/catch.hpp. Remove once none does.
#include "../../catch.hpp"
