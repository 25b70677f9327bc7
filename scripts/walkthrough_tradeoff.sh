#!/usr/bin/env bash
# The walkthrough's trade-off: the same run (same training and test subsets, same seed, so the
# baseline is the same model every time) under several settings, one after the other, and a
# Markdown table of what each gives against the baseline: the final fp32 model and the int8
# model, latency ratios at batch 1 and at batch 32, accuracy difference.
#
#   scripts/walkthrough_tradeoff.sh [--train N] [--test N] [--seed S] [--out DIR]
#       [--config "--sparsity 40"] [--config "--sparsity 50 --finetune-epochs 4"] ...
#
# Without --config it runs sparsities 30, 40, 50 and 60 at the default epochs. Every run's whole
# output is kept in DIR (default tradeoff/) as run_<n>.log; the table goes to DIR/tradeoff.md
# and to standard output. The walkthrough is built in FASTERAI_BUILD_DIR (default build).
set -euo pipefail
cd "$(dirname "$0")/.."

train=22740
test=10000
seed=42
out=tradeoff
configs=()
usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --train) train=${2:?}; shift 2 ;;
    --test) test=${2:?}; shift 2 ;;
    --seed) seed=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    --config) configs+=("${2:?}"); shift 2 ;;
    *) echo "walkthrough_tradeoff.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
[[ ${#configs[@]} -gt 0 ]] || configs=("--sparsity 30" "--sparsity 40" "--sparsity 50" "--sparsity 60")

build=${FASTERAI_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target walkthrough >/dev/null
mkdir -p "$out"

# "... 1.83x lower latency (eager), ..." -> 1.83: the number before a phrase of a summary line.
ratio_before() { grep -o "[-+0-9.]*x $2" <<<"$1" | head -1 | sed 's/x .*//'; }
points() { grep -o 'accuracy [-+0-9.]* points' <<<"$1" | head -1 | awk '{print $2}'; }

table="| settings | MACs | fp32 batch 1 | fp32 batch 32 | fp32 accuracy | int8 batch 1 | int8 batch 32 | int8 accuracy | time (s) |
|---|---:|---:|---:|---:|---:|---:|---:|---:|"
n=0
for config in "${configs[@]}"; do
  n=$((n + 1))
  log="$out/run_$n.log"
  echo "run $n: walkthrough --train $train --test $test --seed $seed $config" >&2
  # shellcheck disable=SC2086  # a config is a list of flags
  "$build/examples/walkthrough" --train "$train" --test "$test" --seed "$seed" --export "" $config >"$log" 2>&1 ||
    { echo "run $n failed, see $log" >&2; exit 1; }
  fp32=$(grep '^Final fp32 vs baseline:' "$log")
  int8=$(grep '^int8 (static) vs baseline:' "$log")
  seconds=$(sed -n 's/^Total time: \([0-9]*\) s$/\1/p' "$log")
  table+="
| \`$config\` | $(ratio_before "$fp32" "fewer MACs")× fewer | $(ratio_before "$fp32" "lower latency (eager)")× | \
$(ratio_before "$fp32" "at batch")× | $(points "$fp32") | $(ratio_before "$int8" "lower latency at batch 1")× | \
$(ratio_before "$int8" "at batch")× | $(points "$int8") | $seconds |"
done
{
  echo "Against the eager baseline of the same run (\`--train $train --test $test --seed $seed\`); accuracy in points."
  echo
  echo "$table"
} | tee "$out/tradeoff.md"
