#!/usr/bin/env bash
# Build the tests with AddressSanitizer + UndefinedBehaviorSanitizer and run them, with
# LeakSanitizer on. LibTorch itself is not instrumented, and some of its allocations are meant
# to live until exit (registries, thread pools, the CPU allocator's caches); scripts/lsan.supp
# suppresses those by the library they come from, so every leak of fasterai's own code (or of
# a LibTorch object that fasterai forgot to free, which LSan reports through fasterai's frames)
# still fails the run.
#
# FASTERAI_SANITIZE_AREA=io builds and runs one area's tests only (test_io), e.g.
#   FASTERAI_BUILD_DIR=build-sanitize-io FASTERAI_SANITIZE_AREA=io scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build-sanitize}
area=${FASTERAI_SANITIZE_AREA:-}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTERAI_SANITIZE=ON \
      -DFASTERAI_BUILD_EXAMPLES=OFF -DFASTERAI_BUILD_BENCHMARKS=OFF "$@"
if [[ -n "$area" ]]; then
  cmake --build "$build" --target "test_$area" -j "${FASTERAI_JOBS:-$(nproc)}"
  labels=(-L "^$area\$")
else
  cmake --build "$build" -j "${FASTERAI_JOBS:-$(nproc)}"
  labels=(-LE consumers)
fi
cd "$build"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export LSAN_OPTIONS=suppressions=$root/scripts/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1
ctest --output-on-failure -j "$(nproc)" "${labels[@]}"
