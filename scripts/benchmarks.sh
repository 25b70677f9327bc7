#!/usr/bin/env bash
# Build and run every benchmark; results go to benchmarks.json (and the console).
# Extra arguments go to Google Benchmark, e.g. --benchmark_filter=Global
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)" --target fasterai_benchmarks
"$build/benchmarks/fasterai_benchmarks" --benchmark_out=benchmarks.json \
  --benchmark_out_format=json "$@"
