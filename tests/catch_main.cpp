// Catch2's main, for version 2 (which compiles its implementation here) and 3 alike.
#define CATCH_CONFIG_RUNNER
#include "catch.hpp"

int main(int argc, char* argv[]) { return Catch::Session().run(argc, argv); }
