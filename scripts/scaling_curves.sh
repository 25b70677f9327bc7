#!/usr/bin/env bash
# Batch and thread scaling curves: latency and throughput of original, pruned (50%) and pruned
# int8 models at several batch sizes and thread counts, C++ (benchmarks/scaling.cpp) and Python
# eager (scripts/scaling_baseline.py) interleaved by rounds, with the MAC reduction beside them.
#
#   scripts/scaling_curves.sh [--models vgg16_bn,resnet50,mobilenet_v2,vit_ti_16]
#       [--variants original,pruned,pruned_int8] [--batches 1,8,32,64] [--threads 1,2]
#       [--rounds 3] [--min-seconds 0.5] [--warmup-seconds 0.3] [--out DIR] [--no-python]
#       [--budget-minutes M]   (no round is started that would end past M minutes, by the
#                              rounds so far; the tables say how many ran)
#       [--report-only]        (tables and plots again from the rounds already in DIR)
#       [--no-build]           (run the benchmark binary already built)
#   quick look:  scripts/scaling_curves.sh --models resnet50 --batches 1,8 --rounds 1
#
# Round r runs every C++ point, then every Python point (Python first in even rounds, so that
# neither side always meets the later part of a load drift); each process builds its models
# once. Per point: the median of the rounds' medians, and the min–max of the rounds; ratios to
# the original are taken within each round (neighbours in time) before the median. Writes
# DIR/scaling.csv, DIR/scaling.md (markdown tables) and DIR/scaling_<model>.png (gnuplot).
# The build: FASTERAI_BUILD_DIR (default build); FASTERAI_BUILD_JOBS limits its parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."

models=vgg16_bn,resnet50,mobilenet_v2,vit_ti_16
variants=original,pruned,pruned_int8
batches=1,8,32,64
threads=1,2
rounds=3
min_seconds=0.5
warmup_seconds=0.3
python=1
report_only=0
budget_minutes=0
build_it=1
build=${FASTERAI_BUILD_DIR:-build}
out=""
usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --models) models="$2"; shift 2 ;;
    --variants) variants="$2"; shift 2 ;;
    --batches) batches="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --min-seconds) min_seconds="$2"; shift 2 ;;
    --warmup-seconds) warmup_seconds="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-python) python=0; shift ;;
    --report-only) report_only=1; shift ;;
    --no-build) build_it=0; shift ;;
    --budget-minutes) budget_minutes="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "--rounds must be a positive count" >&2; exit 2; }
[[ "$budget_minutes" =~ ^[0-9]+$ ]] || { echo "--budget-minutes must be a whole number of minutes" >&2; exit 2; }
for list in "$models" "$variants" "$batches" "$threads"; do
  [[ "$list" =~ ^[a-z0-9_]+(,[a-z0-9_]+)*$ ]] || { echo "bad list '$list' (comma-separated, no spaces)" >&2; exit 2; }
done
[[ ",$variants," == *,original,* ]] || { echo "--variants must include original (ratios are to it)" >&2; exit 2; }
out=${out:-$build/scaling}
mkdir -p "$out/shapes"

machine=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
cores=$(nproc)
if [[ $report_only == 1 ]]; then
  started=$(cat "$out/started" 2>/dev/null || date -u '+%Y-%m-%d %H:%M UTC')
  rounds=$(find "$out" -maxdepth 1 -name 'cpp_*.json' | wc -l)
else
  if [[ $build_it == 1 ]]; then
    if [[ ! -f "$build/build.ninja" && ! -f "$build/Makefile" ]]; then
      cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
    fi
    cmake --build "$build" --target fasterai_benchmarks ${FASTERAI_BUILD_JOBS:+-j "$FASTERAI_BUILD_JOBS"}
  fi
  bench="$build/benchmarks/fasterai_benchmarks"

  if [[ $python == 1 ]] && ! /usr/bin/python3 -c 'import torch, torchvision' 2>/dev/null; then
    echo "no /usr/bin/python3 with torch and torchvision: C++ only" >&2
    python=0
  fi
  if ! command -v gnuplot >/dev/null; then
    echo "no gnuplot (apt-get install gnuplot-nox): tables only, no plots" >&2
  fi

  alt() { echo "($(echo "$1" | tr , '|'))"; }
  filter="^Scaling/$(alt "$models")/$(alt "$variants")/batch:$(alt "$batches")/threads:$(alt "$threads")/"
  started=$(date -u '+%Y-%m-%d %H:%M UTC')
  echo "$started" > "$out/started"
  echo "machine: $machine, $cores cores; $started; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "points: models $models, variants $variants, batches $batches, threads $threads; $rounds rounds"

  export FASTERAI_SCALING_SHAPES="$out/shapes" FASTERAI_SCALING_MIN_SECONDS="$min_seconds" \
    FASTERAI_SCALING_WARMUP_SECONDS="$warmup_seconds"
  rm -f "$out"/cpp_*.json "$out"/python_*.json
  run_cpp() {
    echo "round $1: C++ ($(date -u +%H:%M:%S))"
    "$bench" --benchmark_filter="$filter" --benchmark_out="$out/cpp_$1.json" --benchmark_out_format=json \
      > "$out/cpp_$1.log" 2>&1 || { tail -20 "$out/cpp_$1.log" >&2; echo "C++ round $1 failed: $out/cpp_$1.log" >&2; exit 1; }
  }
  run_python() {
    echo "round $1: Python ($(date -u +%H:%M:%S))"
    # OpenBLAS reads its pool size at load; the script resizes it per point through its C API.
    /usr/bin/python3 scripts/scaling_baseline.py --shapes "$out/shapes" --models "$models" --variants "$variants" \
      --batches "$batches" --threads "$threads" --min-seconds "$min_seconds" --warmup-seconds "$warmup_seconds" \
      --json "$out/python_$1.json" 2> "$out/python_$1.log" ||
      { tail -20 "$out/python_$1.log" >&2; echo "Python round $1 failed: $out/python_$1.log" >&2; exit 1; }
  }
  SECONDS=0
  for ((r = 1; r <= rounds; r++)); do
    if ((budget_minutes > 0 && r > 1 && SECONDS + SECONDS / (r - 1) > budget_minutes * 60)); then
      echo "round $r not started: it would end past the budget of $budget_minutes minutes"
      rounds=$((r - 1))
      break
    fi
    # Python needs the C++ side's pruned shapes: C++ goes first in round 1.
    if [[ $python == 1 && $((r % 2)) == 0 ]]; then run_python "$r"; run_cpp "$r"
    else run_cpp "$r"; [[ $python == 0 ]] || run_python "$r"; fi
  done
  echo "done: $(date -u '+%Y-%m-%d %H:%M UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

fi

/usr/bin/python3 - "$out" "$rounds" "$machine, $cores cores" "$started" <<'EOF'
import csv, glob, json, os, statistics, sys

out, rounds, machine, started = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
# times[(language, model, variant, batch, threads)] = {round: median ms}
times, macs = {}, {}
for path in glob.glob(os.path.join(out, "cpp_*.json")):
    r = int(path.rsplit("_", 1)[1].split(".")[0])
    for b in json.load(open(path))["benchmarks"]:
        if not b["name"].startswith("Scaling/") or b.get("error_occurred"):
            continue
        _, model, variant, batch, threads = b["name"].split("/")[:5]
        key = ("C++", model, variant, int(batch.split(":")[1]), int(threads.split(":")[1]))
        scale = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]
        times.setdefault(key, {})[r] = b["real_time"] * scale
        macs[(model, variant)] = b["MACs"]
for path in glob.glob(os.path.join(out, "python_*.json")):
    r = int(path.rsplit("_", 1)[1].split(".")[0])
    for p in json.load(open(path))["points"]:
        key = ("Python", p["model"], p["variant"], p["batch"], p["threads"])
        times.setdefault(key, {})[r] = p["median_ms"]
shapes = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(out, "shapes", "*.json"))}

def spread(values):
    return statistics.median(values), min(values), max(values)

rows = []
for key in sorted(times, key=lambda k: (k[1], k[0], k[4], k[3], ["original", "pruned", "pruned_int8"].index(k[2]))):
    lang, model, variant, batch, threads = key
    ms = times[key]
    base = times.get((lang, model, "original", batch, threads), {})
    ratios = [ms[r] / base[r] for r in ms if r in base]
    med, lo, hi = spread(list(ms.values()))
    rmed, rlo, rhi = spread(ratios) if ratios else (float("nan"),) * 3
    rows.append({"language": lang, "model": model, "variant": variant, "batch": batch, "threads": threads,
                 "rounds": len(ms), "median_ms": med, "min_ms": lo, "max_ms": hi,
                 "images_per_s": 1e3 * batch / med, "ratio_to_original": rmed, "ratio_min": rlo, "ratio_max": rhi,
                 "macs_per_image": int(macs.get((model, variant), 0)),
                 "mac_ratio": macs.get((model, variant), 0) / macs[(model, "original")]
                 if macs.get((model, "original")) else float("nan")})
with open(os.path.join(out, "scaling.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

at = {(r["language"], r["model"], r["variant"], r["batch"], r["threads"]): r for r in rows}
langs = [l for l in ("C++", "Python") if any(k[0] == l for k in at)]
variants = [v for v in ("pruned", "pruned_int8") if any(k[2] == v for k in at)]
md = [f"Machine: {machine}. Started {started}; {rounds} rounds, interleaved C++ / Python. Cells: median over "
      "rounds; ratios to the original (same language, same batch and threads) are per round, then the median, "
      "[min–max of the rounds].", ""]
for model in sorted({k[1] for k in at}):
    s = shapes.get(model, {})
    mo, mp = s.get("macs_original"), s.get("macs_pruned")
    md.append(f"**{model}**" + (f": {mo / 1e9:.3g} → {mp / 1e9:.3g} GMACs per image, MAC ratio {mp / mo:.3f}; "
                                f"parameters {s['parameters_original']:,} → {s['parameters_pruned']:,}" if mo else ""))
    md.append("")
    head = "| threads | batch |"
    rule = "|---:|---:|"
    for lang in langs:
        head += f" {lang} original ms (img/s) |" + "".join(f" {lang} {v} / original |" for v in variants)
        rule += "---:|" * (1 + len(variants))
    if len(langs) == 2:
        head += " C++ / Python, original |"
        rule += "---:|"
    md += [head, rule]
    for t in sorted({k[4] for k in at if k[1] == model}):
        for b in sorted({k[3] for k in at if k[1] == model}):
            line = f"| {t} | {b} |"
            for lang in langs:
                o = at.get((lang, model, "original", b, t))
                line += f" {o['median_ms']:.1f} ({o['images_per_s']:.1f}) |" if o else " – |"
                for v in variants:
                    p = at.get((lang, model, v, b, t))
                    line += (f" {p['ratio_to_original']:.2f} [{p['ratio_min']:.2f}–{p['ratio_max']:.2f}] |"
                             if p else " – |")
            if len(langs) == 2:
                c, p = at.get(("C++", model, "original", b, t)), at.get(("Python", model, "original", b, t))
                line += f" {c['median_ms'] / p['median_ms']:.2f} |" if c and p else " – |"
            md.append(line)
    md.append("")
open(os.path.join(out, "scaling.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))

# gnuplot data: one file per model, language and thread count; columns per batch.
for model in {k[1] for k in at}:
    for lang in langs:
        for t in {k[4] for k in at if k[1] == model}:
            with open(os.path.join(out, f"plot_{model}_{lang.replace('+', 'p')}_{t}.dat"), "w") as f:
                f.write("# batch  [ratio med min max, images/s] for pruned, pruned_int8; original images/s\n")
                for b in sorted({k[3] for k in at if k[1] == model}):
                    cols = [str(b)]
                    for v in ("pruned", "pruned_int8"):
                        p = at.get((lang, model, v, b, t))
                        cols += ([f"{p['ratio_to_original']:.5g}", f"{p['ratio_min']:.5g}", f"{p['ratio_max']:.5g}",
                                  f"{p['images_per_s']:.5g}"] if p else ["NaN"] * 4)
                    o = at.get((lang, model, "original", b, t))
                    cols.append(f"{o['images_per_s']:.5g}" if o else "NaN")
                    f.write(" ".join(cols) + "\n")
    s = shapes.get(model, {})
    ratio = s["macs_pruned"] / s["macs_original"] if s.get("macs_original") else float("nan")
    open(os.path.join(out, f"plot_{model}.mac"), "w").write(f"{ratio}\n")
EOF

command -v gnuplot >/dev/null || exit 0
terminal="pngcairo size 1000,660 font 'DejaVu Sans,8'"
gnuplot -e "set terminal pngcairo" 2>/dev/null || terminal="png size 1000,660"
for macfile in "$out"/plot_*.mac; do
  [[ -f "$macfile" ]] || continue
  model=$(basename "$macfile" .mac)
  model=${model#plot_}
  mac=$(cat "$macfile")
  mapfile -t thread_list < <(ls "$out"/plot_"${model}"_*_*.dat | sed 's/.*_\([0-9]*\)\.dat$/\1/' | sort -nu)
  {
    echo "set terminal $terminal noenhanced; set output '$out/scaling_$model.png'"
    echo "set multiplot layout 2,${#thread_list[@]} title '$model: pruned 50% and pruned + int8 against the original ($machine, $started)'"
    echo "set logscale x 2; set xtics ('1' 1, '8' 8, '32' 32, '64' 64); set xrange [0.8:80]; set grid; set key below horizontal Left reverse samplen 2 maxrows 2"
    for t in "${thread_list[@]}"; do
      tl=$([[ $t == 1 ]] && echo "1 thread" || echo "$t threads")
      echo "set title 'latency / original latency, $tl'; set ylabel 'ratio'; set xlabel 'batch'; set yrange [0:*]"
      plot="plot $mac with lines dt 2 lw 2 lc rgb 'black' title 'MACs / original MACs'"
      for lang in C++ Python; do
        file="$out/plot_${model}_${lang//+/p}_$t.dat"
        [[ -f "$file" ]] || continue
        dash=$([[ $lang == C++ ]] && echo 1 || echo 3)
        po=$((dash == 1 ? 9 : 8)) pp=$((dash == 1 ? 7 : 6)) pi=$((dash == 1 ? 5 : 4))
        [[ ",$variants," == *,pruned,* ]] && plot+=", '$file' using 1:2:3:4 with yerrorlines dt $dash lc rgb '#1f77b4' pt $pp title '$lang pruned'"
        [[ ",$variants," == *,pruned_int8,* ]] && plot+=", '$file' using 1:6:7:8 with yerrorlines dt $dash lc rgb '#d62728' pt $pi title '$lang pruned + int8'"
      done
      echo "$plot"
    done
    for t in "${thread_list[@]}"; do
      tl=$([[ $t == 1 ]] && echo "1 thread" || echo "$t threads")
      echo "set title 'throughput, $tl'; set ylabel 'images/s'; set xlabel 'batch'; set yrange [0:*]"
      plot="plot"
      sep=""
      for lang in C++ Python; do
        file="$out/plot_${model}_${lang//+/p}_$t.dat"
        [[ -f "$file" ]] || continue
        dash=$([[ $lang == C++ ]] && echo 1 || echo 3)
        po=$((dash == 1 ? 9 : 8)) pp=$((dash == 1 ? 7 : 6)) pi=$((dash == 1 ? 5 : 4))
        plot+="$sep '$file' using 1:10 with linespoints dt $dash lc rgb 'black' pt $po title '$lang original'"
        sep=","
        [[ ",$variants," == *,pruned,* ]] && plot+=", '$file' using 1:5 with linespoints dt $dash lc rgb '#1f77b4' pt $pp title '$lang pruned'"
        [[ ",$variants," == *,pruned_int8,* ]] && plot+=", '$file' using 1:9 with linespoints dt $dash lc rgb '#d62728' pt $pi title '$lang pruned + int8'"
      done
      echo "$plot"
    done
    echo "unset multiplot"
  } | gnuplot
  echo "plot: $out/scaling_$model.png ($(du -k "$out/scaling_$model.png" | cut -f1) KB)"
done
