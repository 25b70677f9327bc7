#!/usr/bin/env bash
# The main job: build and run the walkthrough of the article on Fashion-MNIST
# (arguments are passed to it: --quick for a smoke run, --help for the flags).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FASTERAI_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)" --target walkthrough
"$build/examples/walkthrough" "$@"
