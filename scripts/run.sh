#!/usr/bin/env bash
# The main job: build the examples and run the demo (arguments are passed to it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)" --target vgg_stats
"$build/examples/vgg_stats" "$@"
