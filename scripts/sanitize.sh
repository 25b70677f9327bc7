#!/usr/bin/env bash
# Build the tests with AddressSanitizer + UndefinedBehaviorSanitizer and run them.
# LibTorch itself is not instrumented; its allocator's intentional leaks at exit are not
# fasterai's, so leak detection is off (ASan still reports overflows and use-after-free).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build-sanitize}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTERAI_SANITIZE=ON \
      -DFASTERAI_BUILD_EXAMPLES=OFF -DFASTERAI_BUILD_BENCHMARKS=OFF "$@"
cmake --build "$build" -j "$(nproc)"
cd "$build"
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ctest --output-on-failure -j "$(nproc)" -LE consumers
