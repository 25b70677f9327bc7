# Settings for fasterai's own tests, examples and benchmarks (not for consumers).

# Strict warnings for project code; LibTorch and range-v3 come in as system headers.
add_library(fasterai_strict INTERFACE)
target_compile_options(fasterai_strict INTERFACE -Wall -Wextra -Wpedantic $<$<BOOL:${FASTERAI_WERROR}>:-Werror>)
target_link_libraries(fasterai_strict INTERFACE fasterai::fasterai)
if(FASTERAI_SANITIZE)
  # The instrumentation changes GCC's inlining, which then reports -Wmaybe-uninitialized
  # inside LibTorch's c10::optional (a false positive in a system header, seen through our
  # inlined calls); the sanitizers themselves check the real thing at run time.
  target_compile_options(fasterai_strict INTERFACE
    -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
    -Wno-maybe-uninitialized)
  target_link_options(fasterai_strict INTERFACE -fsanitize=address,undefined)
endif()

# One precompiled header, built once and reused by every project target: LibTorch's headers
# cost ~30 s per translation unit without it.
add_library(fasterai_pch OBJECT ${PROJECT_SOURCE_DIR}/cmake/pch.cpp)
target_link_libraries(fasterai_pch PUBLIC fasterai_strict)
target_precompile_headers(fasterai_pch PUBLIC
  <torch/torch.h> <range/v3/all.hpp> <vector> <string> <memory> <algorithm> <stdexcept>)

# fasterai_target(name sources...): an executable with strict flags and the shared PCH.
function(fasterai_target name)
  add_executable(${name} ${ARGN})
  target_link_libraries(${name} PRIVATE fasterai_strict)
  target_precompile_headers(${name} REUSE_FROM fasterai_pch)
endfunction()

# FASTERAI_HEADER_CHECK: one translation unit per public header, each including it twice, built
# as the target fasterai_header_check (the LibTorch 2.x leg of scripts/compat.sh builds it, so
# that every header compiles against both LibTorch generations, not only those the tests use).
# The units share the precompiled header: this checks headers against LibTorch's API, not that
# each one names every standard header it uses.
option(FASTERAI_HEADER_CHECK "Compile every public header in its own translation unit" OFF)
if(FASTERAI_HEADER_CHECK)
  file(GLOB_RECURSE fasterai_headers CONFIGURE_DEPENDS RELATIVE ${PROJECT_SOURCE_DIR}/include
       ${PROJECT_SOURCE_DIR}/include/fasterai/*.hpp)
  set(fasterai_header_units)
  foreach(header IN LISTS fasterai_headers)
    string(MAKE_C_IDENTIFIER ${header} unit)
    set(unit ${PROJECT_BINARY_DIR}/header_check/${unit}.cpp)
    file(CONFIGURE OUTPUT ${unit} CONTENT "#include <${header}>\n#include <${header}>\n")
    list(APPEND fasterai_header_units ${unit})
  endforeach()
  add_library(fasterai_header_check OBJECT ${fasterai_header_units})
  target_link_libraries(fasterai_header_check PRIVATE fasterai_strict)
  target_precompile_headers(fasterai_header_check REUSE_FROM fasterai_pch)
endif()
