#!/usr/bin/env bash
# Build fasterai's tests, examples and benchmarks and run the whole test suite.
# Usage: scripts/test.sh [extra cmake arguments, e.g. -DTorch_DIR=...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" -j "$(nproc)"
cd "$build"
ctest --output-on-failure -j "$(nproc)"
