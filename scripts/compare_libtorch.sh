#!/usr/bin/env bash
# The same benchmarks on LibTorch 1.13 (this machine, Debian 12) and 2.6 (the Debian 13 root of
# scripts/compat.sh), interleaved: round r runs the 1.13 binary, then the 2.6 one, so that both
# see the same load. Prints, per benchmark and counter, the median over the rounds on each
# version and their ratio (2.6 / 1.13: below 1 means 2.6 is faster).
#
# Usage: scripts/compare_libtorch.sh [ROUNDS] [FILTER]
#   ROUNDS  default 3
#   FILTER  a Google Benchmark filter; default: the VGG16-BN seed table's latencies
#           (Transforms_Latency), the pruned ResNet-50 (Graph_PrunedResNet50) and the int8
#           rows (Quant_Latency on VGG16-BN, Quant_ResNet50_Interleaved)
# Environment:
#   FASTERAI_BUILD_DIR     the 1.13 build (default build)
#   FASTERAI_COMPAT_ROOT   the Debian 13 root (default /var/cache/fasterai/trixie-root)
#   FASTERAI_COMPAT_BUILD  the 2.6 build inside the root (default /work/build, where
#                          scripts/compat.sh leaves it)
# Both builds must have fasterai_benchmarks: scripts/benchmarks.sh and scripts/compat.sh make
# them. Needs root for chroot (runs itself through sudo otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then exec sudo --preserve-env=FASTERAI_BUILD_DIR,FASTERAI_COMPAT_ROOT,FASTERAI_COMPAT_BUILD "$0" "$@"; fi
rounds=${1:-3}
filter=${2:-'^(Transforms_Latency/vgg16_bn_|Graph_PrunedResNet50|Quant_Latency/vgg16_bn_|Quant_ResNet50_Interleaved)'}
root=${FASTERAI_COMPAT_ROOT:-/var/cache/fasterai/trixie-root}
host_bench=${FASTERAI_BUILD_DIR:-build}/benchmarks/fasterai_benchmarks
root_bench=${FASTERAI_COMPAT_BUILD:-/work/build}/benchmarks/fasterai_benchmarks
[ -x "$host_bench" ] || { echo "compare: no $host_bench (scripts/benchmarks.sh builds it)" >&2; exit 1; }
[ -x "$root$root_bench" ] || { echo "compare: no $root$root_bench (scripts/compat.sh builds it)" >&2; exit 1; }

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
  rm -rf "$out"
}
out=$(mktemp -d)
trap cleanup EXIT
mount_in() {  # mount_in TARGET mount-arguments... (left alone when already mounted)
  local target=$root$1
  shift
  if ! mountpoint -q "$target"; then mount "$@" "$target"; mounted+=("$target"); fi
}
mount_in /proc -t proc proc
mount_in /dev --bind /dev
mount_in /sys --bind /sys

args=(--benchmark_filter="$filter" --benchmark_format=json)
for ((r = 0; r < rounds; r++)); do
  echo "compare: round $((r + 1))/$rounds: LibTorch 1.13" >&2
  OPENBLAS_NUM_THREADS=1 "$host_bench" "${args[@]}" > "$out/113.$r.json"
  echo "compare: round $((r + 1))/$rounds: LibTorch 2.6" >&2
  chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 OPENBLAS_NUM_THREADS=1 \
    "$root_bench" "${args[@]}" > "$out/26.$r.json"
done

/usr/bin/python3 - "$out" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
# What is a time: real_time (in the benchmark's unit) and the counters named *_ms. A benchmark
# with repetitions reports only its aggregates: its median stands for it.
def values(path):
    result = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median": continue
        name = b["run_name"] if "run_name" in b else b["name"]
        result[(name, "real_time_" + b.get("time_unit", "ns"))] = b["real_time"]
        for k, v in b.items():
            if k.endswith("_ms") or k in ("speedup", "MAC_reduction", "params"):
                result[(name, k)] = v
    return result
runs = {v: [values(f"{out}/{v}.{r}.json") for r in range(rounds)] for v in ("113", "26")}
keys = [k for k in runs["113"][0] if all(k in r for rs in runs.values() for r in rs)]
print(f"| benchmark | value | 1.13 median | 2.6 median | 2.6 / 1.13 |")
print(f"|---|---|---:|---:|---:|")
for k in keys:
    a = statistics.median(r[k] for r in runs["113"])
    b = statistics.median(r[k] for r in runs["26"])
    print(f"| {k[0]} | {k[1]} | {a:.4g} | {b:.4g} | {b / a:.2f} |" if a else f"| {k[0]} | {k[1]} | {a} | {b} | - |")
EOF
