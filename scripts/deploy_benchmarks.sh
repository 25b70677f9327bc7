#!/usr/bin/env bash
# Deployment latency side by side: the C++ Deploy benchmarks (original and compressed, eager
# and optimized, with the cost model's estimate), then the same architectures in Python
# (scripts/python_baseline.py) in the same run, and one table with the C++/Python ratio.
#   scripts/deploy_benchmarks.sh [--filter vgg16_bn] [--repetitions 5]
set -euo pipefail
cd "$(dirname "$0")/.."
filter=""
repetitions=5
while [[ $# -gt 0 ]]; do
  case "$1" in
    --filter) filter="$2"; shift 2 ;;
    --repetitions) repetitions="$2"; shift 2 ;;
    *) echo "usage: $0 [--filter NETWORK] [--repetitions N]" >&2; exit 2 ;;
  esac
done
build=${FASTERAI_BUILD_DIR:-build}
if [[ ! -x "$build/benchmarks/fasterai_benchmarks" ]]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" --target fasterai_benchmarks
fi
lscpu | grep "Model name" || true
date -u
"$build/benchmarks/fasterai_benchmarks" --benchmark_filter="Deploy_(PeakRates|Latency/${filter})" \
  --benchmark_enable_random_interleaving=true --benchmark_repetitions="$repetitions" \
  --benchmark_out="$build/deploy_benchmarks.json" --benchmark_out_format=json
# One thread for Python too: OpenBLAS sizes its own pool, which torch.set_num_threads(1) does not.
OPENBLAS_NUM_THREADS=1 /usr/bin/python3 scripts/python_baseline.py --filter "$filter" --repetitions "$repetitions" \
  --cpp "$build/deploy_benchmarks.json"
