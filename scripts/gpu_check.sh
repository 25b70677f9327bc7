#!/usr/bin/env bash
# The GPU check: builds fasterai against the LibTorch bundled with the machine's PyTorch (a CUDA
# build), runs the CUDA tests (tests/cuda/), the VGG16-BN seed table on the GPU, and then as
# much of the CPU suite as the time left allows. Made for a machine lent for a few minutes, with
# no network and a cold build (no ccache): it prints what it finds first, says clearly what is
# missing, and stops each phase before its time is up so that the logs always come back.
#
#   scripts/gpu_check.sh            # on the GPU machine, from anywhere in the checkout
#   scripts/gpu_check.sh --bundle   # on a Debian 12 development machine: copy the header-only
#                                   # dependencies into build-gpu-deps/ (see below)
#
# Logs go under $OUT when it is set (the device tool returns what is there), else ./gpu-check/:
# summary.txt (what was found, each phase's result), configure.log, build-*.log,
# ctest-cuda.log, vgg16_seed_table-cuda.log, ctest-cpu.log, nccl-compile.log.
#
# Phases, in order of what matters most, within GPU_CHECK_BUDGET_S seconds (default 560, for a
# command limit of 600 s):
#   A. configure; build test_cuda and vgg16_seed_table; compile dist/process_group.hpp and
#      dist/data_parallel.hpp with the build's flags (the NCCL branch where LibTorch has it);
#      ctest -L cuda; vgg16_seed_table --device cuda.
#   B. build the test executables of GPU_CHECK_AREAS (default: core graph layers sparse
#      transform train dist; a cold build of all areas does not fit with the runs) and run their
#      CTest labels, one process per core, each test limited to GPU_CHECK_TEST_TIMEOUT_S (120),
#      the whole run stopped before the budget ends.
#
# Warnings do not stop the build here (FASTERAI_WERROR=OFF: a newer LibTorch than CI's may warn
# where 1.13 and 2.6 do not); the summary lists those in fasterai's own files.
#
# Dependencies: python3 with a CUDA torch; cmake >= 3.21 and a C++20 g++; the CUDA toolkit
# (nvcc): PyTorch's TorchConfig.cmake refuses to configure a CUDA LibTorch without it ("uses
# CUDA but I cannot find the CUDA libraries"); Catch2 (2 or 3), range-v3 and zlib headers.
# Ninja is used when present, make otherwise; Google Benchmark only turns the benchmarks on
# (never built here). Missing Catch2 / range-v3 / zlib headers can come from build-gpu-deps/,
# made by `--bundle` on a Debian 12 machine (about 6 MB: Catch2 2's single header and CMake
# files, range-v3's headers and CMake files, zlib.h) and carried to the GPU machine with the
# checkout (it is git-ignored, as /build*/). Without the CUDA toolkit or CMake the script falls
# back to plain g++ for phase A (test_cuda and vgg16_seed_table only, linked against torch/lib),
# which needs no toolkit: fasterai includes no CUDA header.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
deps=$root/build-gpu-deps

if [[ ${1:-} == --bundle ]]; then
  set -e
  rm -rf "$deps"
  mkdir -p "$deps/include" "$deps/lib/cmake"
  cp -r /usr/include/catch2 /usr/include/range /usr/include/meta /usr/include/concepts \
        /usr/include/std "$deps/include/"
  cp /usr/include/zlib.h /usr/include/zconf.h "$deps/include/"
  cp -r /usr/lib/cmake/Catch2 /usr/lib/cmake/range-v3 "$deps/lib/cmake/"
  # Catch2's CMake package checks that the library it names exists; the tests never link it.
  cp /usr/lib/libCatch2WithMain.a "$deps/lib/"
  echo "bundled into $deps ($(du -sh "$deps" | cut -f1)); carry build-gpu-deps with the checkout"
  exit 0
fi

start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-560}
deadline=$((start + budget))
logs=${OUT:-$root/gpu-check}
mkdir -p "$logs"
summary=$logs/summary.txt
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
left() { echo $((deadline - $(date +%s))); }
# run_for SECONDS LOG COMMAND...: the command under `timeout`, output to LOG; its status.
run_for() {
  local seconds=$1 log=$2
  shift 2
  if ((seconds <= 0)); then
    echo "not run: no time left" >"$log"
    return 124
  fi
  timeout --kill-after=10 "$seconds" "$@" >"$log" 2>&1
}
tail_of() { tail -n "${2:-25}" "$1" | sed 's/^/    /' | tee -a "$summary" >/dev/null; }

say "== fasterai GPU check, $(date -u '+%Y-%m-%d %H:%M:%S') UTC, budget ${budget} s, $(nproc) cores"
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain 2>/dev/null | wc -l) changed paths)"

# ---- What this machine has ---------------------------------------------------------------
python=""
for p in python3 /usr/bin/python3 /usr/local/bin/python3 /opt/conda/bin/python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' >/dev/null 2>&1; then
    python=$(command -v "$p")
    break
  fi
done
if [[ -z $python ]]; then
  say "MISSING: no python3 that imports torch (tried python3, /usr/bin, /usr/local/bin, /opt/conda)"
  exit 2
fi
info=$("$python" - <<'EOF' 2>&1
import os, torch
print("python", os.path.realpath(__import__("sys").executable))
print("torch", torch.__version__)
print("cuda_build", torch.version.cuda)
print("cuda_available", torch.cuda.is_available())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else "none")
print("cxx11_abi", int(torch._C._GLIBCXX_USE_CXX11_ABI))
print("cmake_prefix", torch.utils.cmake_prefix_path)
print("torch_dir", os.path.dirname(torch.__file__))
EOF
)
say "$info"
get() { echo "$info" | awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print }'; }
prefix=$(get cmake_prefix)
torch_dir=$(get torch_dir)
abi=$(get cxx11_abi)
if [[ $(get cuda_build) == None || $(get cuda_available) != True ]]; then
  say "MISSING: torch $(get torch) has CUDA '$(get cuda_build)', device available: $(get cuda_available)."
  say "         This check needs a CUDA build of PyTorch and a visible GPU."
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/nvidia-smi: /' | tee -a "$summary"

version_of() { "$@" 2>/dev/null | head -n1; }
cxx=${CXX:-g++}
say "compiler: $(version_of "$cxx" --version || echo "MISSING ($cxx)")"
cmake_ok=0
if command -v cmake >/dev/null; then
  cmake_version=$(cmake --version | head -n1 | awk '{print $3}')
  if printf '3.21\n%s\n' "$cmake_version" | sort -V -C; then cmake_ok=1; fi
  say "cmake: $cmake_version$( ((cmake_ok)) || echo ' (TOO OLD: 3.21 needed; falling back to g++)')"
else
  say "cmake: MISSING (falling back to plain g++ for phase A)"
fi
generator="Unix Makefiles"
keep_going=(-k)
if command -v ninja >/dev/null; then
  generator=Ninja
  keep_going=(-k 0)
fi
say "generator: $generator"
nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
say "CUDA toolkit (nvcc): ${nvcc:-MISSING (TorchConfig.cmake of a CUDA LibTorch needs it; the g++ fallback does not)}"

# Header-only dependencies: the system's, else the bundle's.
have_header() {
  local h=$1
  for d in /usr/include /usr/local/include $(tr : " " <<<"${CPATH:-}"); do [[ -e $d/$h ]] && return 0; done
  return 1
}
prefix_path=$prefix
extra_includes=()
for h in catch2/catch.hpp:Catch2-2 catch2/catch_all.hpp:Catch2-3 range/v3/all.hpp:range-v3 zlib.h:zlib; do
  file=${h%%:*}
  name=${h##*:}
  if have_header "$file"; then
    say "$name: system ($file)"
  elif [[ -e $deps/include/$file ]]; then
    say "$name: from build-gpu-deps ($file)"
  else
    say "$name: not found ($file)"
  fi
done
if [[ -d $deps ]]; then
  prefix_path="$prefix;$deps"
  extra_includes=(-isystem "$deps/include")
fi
catch_major=""
if have_header catch2/catch.hpp || [[ -e $deps/include/catch2/catch.hpp ]]; then catch_major=2; fi
if ! have_header range/v3/all.hpp && [[ ! -e $deps/include/range/v3/all.hpp ]]; then
  say "MISSING: range-v3 headers (apt: librange-v3-dev), and no build-gpu-deps/: nothing can be built."
  say "         Run 'scripts/gpu_check.sh --bundle' on the Debian 12 machine and carry build-gpu-deps."
  exit 2
fi
zlib_args=()
if ! have_header zlib.h && [[ -e $deps/include/zlib.h ]]; then
  libz=$(ldconfig -p 2>/dev/null | awk '/libz\.so\.1 .*x86-64/ { print $NF; exit }')
  zlib_args=(-DZLIB_INCLUDE_DIR="$deps/include" -DZLIB_LIBRARY="${libz:-/lib/x86_64-linux-gnu/libz.so.1}")
fi
benchmarks=OFF
if find /usr/lib /usr/local/lib /usr/lib64 "$prefix" -name 'benchmarkConfig.cmake' 2>/dev/null | grep -q .; then
  benchmarks=ON
fi
say "Google Benchmark: $([[ $benchmarks == ON ]] && echo found || echo 'not found (FASTERAI_BUILD_BENCHMARKS=OFF)')"
say "LibTorch: $prefix/Torch (C++11 ABI: $abi)"
if [[ $abi == 0 ]] && have_header catch2/catch_all.hpp; then
  say "WARNING: this LibTorch uses the old C++ ABI; the system's Catch2 3 library does not, and the"
  say "         tests may not link. Catch2 2 (header-only, build-gpu-deps) works with either."
fi

build=$root/build-gpu
export OPENBLAS_NUM_THREADS=1  # see docs/libtorch2.md: OpenBLAS threads on a loaded machine
status=0

# ---- Phase A with CMake --------------------------------------------------------------------
configured=0
cuda_target=0
if ((cmake_ok)); then
  say "-- configure (${build#"$root"/})"
  run_for $(($(left) - 60)) "$logs/configure.log" cmake -S . -B "$build" -G "$generator" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
    -DCMAKE_CXX_COMPILER="$(command -v "$cxx")" \
    -DTorch_DIR="$prefix/Torch" -DCMAKE_PREFIX_PATH="$prefix_path" "${zlib_args[@]}" \
    ${nvcc:+-DCUDAToolkit_ROOT="$(dirname "$(dirname "$nvcc")")"} \
    -DFASTERAI_BUILD_TESTS=ON -DFASTERAI_BUILD_EXAMPLES=ON -DFASTERAI_BUILD_BENCHMARKS=$benchmarks \
    -DFASTERAI_WERROR=OFF
  if [[ $? == 0 ]]; then
    configured=1
    grep -E "fasterai tests|Catch2|CUDA|cuDNN" "$logs/configure.log" | head -n 12 | sed 's/^/    /' | tee -a "$summary" >/dev/null
    if grep -q 'test_cuda:' "$build"/build.ninja "$build"/Makefile 2>/dev/null; then
      cuda_target=1
    else
      say "FAILED: configured, but no test_cuda target: tests/CMakeLists.txt did not see a CUDA LibTorch"
      status=1
    fi
  else
    say "FAILED: configure; its end:"
    tail_of "$logs/configure.log" 30
    grep -q "uses CUDA but I cannot find the CUDA" "$logs/configure.log" &&
      say "  => PyTorch's CMake package needs the CUDA toolkit (nvcc) to configure; falling back to g++"
  fi
fi

ran_cuda=0
if ((cuda_target)); then
  # NCCL: the data-parallel headers compiled with test_cuda's own command line (its flags and
  # LibTorch's compile definitions), beside the build: which c10d backends were compiled in.
  "$python" - "$build" "$root" >"$logs/nccl-command.sh" <<'EOF'
import json, shlex, sys
build, root = sys.argv[1:3]
for entry in json.load(open(f"{build}/compile_commands.json")):
    if entry["file"].endswith("tests/cuda/device.cpp"):
        args = shlex.split(entry["command"])
        out = []
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a in ("-o", "-c", "-MD", "-MF", "-MT", "-include"):
                skip = a not in ("-c", "-MD")
                continue
            if a.endswith("device.cpp") or a.startswith("-Winvalid-pch") or a.endswith(".gch"):
                continue
            out.append(a)
        print("cd " + shlex.quote(entry["directory"]) + " && printf '#include <fasterai/dist/process_group.hpp>\\n"
              "#include <fasterai/dist/data_parallel.hpp>\\n#ifdef FASTERAI_C10D_NCCL\\n#pragma message(\"NCCL branch compiled\")\\n"
              "#else\\n#pragma message(\"NCCL branch left out (no USE_C10D_NCCL or no nccl.h)\")\\n#endif\\n"
              "#ifdef FASTERAI_C10D_GLOO\\n#pragma message(\"Gloo branch compiled\")\\n"
              "#else\\n#pragma message(\"Gloo branch left out (no Gloo headers)\")\\n#endif\\n' | "
              + " ".join(shlex.quote(a) for a in out) + " -fsyntax-only -x c++ -")
        break
EOF
  nccl_pid=""
  if [[ -s $logs/nccl-command.sh ]]; then
    run_for $(($(left) - 120)) "$logs/nccl-compile.log" bash "$logs/nccl-command.sh" &
    nccl_pid=$!
  fi
  say "-- build test_cuda vgg16_seed_table (-j$(nproc))"
  run_for $(($(left) - 120)) "$logs/build-phase-a.log" cmake --build "$build" -j "$(nproc)" \
    --target test_cuda vgg16_seed_table
  build_a=$?
  if [[ $build_a != 0 ]]; then
    say "FAILED: build of test_cuda / vgg16_seed_table (status $build_a); its errors:"
    grep -m 20 -E "error|Error" "$logs/build-phase-a.log" | sed 's/^/    /' | tee -a "$summary" >/dev/null
    status=1
  fi
  warned=$(grep -E "^/.*(include/fasterai|tests|examples)/.*warning:" "$logs/build-phase-a.log" | sort -u)
  say "warnings in fasterai's code (-Werror is off here): $(grep -c . <<<"$warned" || true)"
  head -n 8 <<<"$warned" | sed 's/^/    /' | tee -a "$summary" >/dev/null
  if [[ -n $nccl_pid ]]; then
    wait "$nccl_pid"
    nccl=$?
    say "dist headers (process_group, data_parallel) with this LibTorch: $([[ $nccl == 0 ]] && echo compiled || echo "FAILED ($nccl)")"
    grep -m 4 -E "pragma message|error" "$logs/nccl-compile.log" | sed 's/^/    /' | tee -a "$summary" >/dev/null
  fi
  if [[ $build_a == 0 ]]; then
    say "-- ctest -L cuda"
    (cd "$build" && run_for $(($(left) - 60)) "$logs/ctest-cuda.log" \
      ctest -L cuda --no-tests=error --output-on-failure --timeout 180 -j 2)
    cuda_status=$?
    ran_cuda=1
    tail_of "$logs/ctest-cuda.log" 12
    # A skipped CUDA test means the GPU was not seen: a failure of this check.
    if [[ $cuda_status != 0 ]] || grep -q "Not Run\|Skipped" "$logs/ctest-cuda.log"; then status=1; fi
    if ! grep -q "tests passed" "$logs/ctest-cuda.log"; then status=1; fi
    say "-- vgg16_seed_table --device cuda"
    run_for $(($(left) - 30)) "$logs/vgg16_seed_table-cuda.log" \
      "$build/examples/vgg16_seed_table" --device cuda --runs 20
    vgg=$?
    say "vgg16_seed_table --device cuda: exit $vgg"
    tail_of "$logs/vgg16_seed_table-cuda.log" 14
    [[ $vgg == 0 ]] || status=1
  fi
fi

# ---- Phase A without CMake: plain g++ against torch/lib --------------------------------------
if ((!configured)); then
  say "-- g++ fallback: test_cuda and vgg16_seed_table"
  flags=(-std=gnu++20 -O2 -DNDEBUG -D_GLIBCXX_USE_CXX11_ABI="$abi" -Iinclude -Itests
         -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
         "${extra_includes[@]}" -DFASTERAI_PYTHON='""' -DFASTERAI_TEST_DATA_DIR="\"$root/tests/data/files\"")
  libz=$(ldconfig -p 2>/dev/null | awk '/libz\.so\.1 .*x86-64/ { print $NF; exit }')
  libs=(-L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -Wl,--no-as-needed -ltorch -ltorch_cuda
        -lc10_cuda -ltorch_cpu -lc10 -Wl,--as-needed "${libz:-/lib/x86_64-linux-gnu/libz.so.1}" -lpthread -ldl)
  mkdir -p "$build-gxx"
  pids=()
  if [[ -n $catch_major ]]; then
    run_for $(($(left) - 120)) "$logs/build-gxx-test_cuda.log" bash -c '
      "$0" "${@:3}" -DFASTERAI_CATCH2_MAJOR=2 -c tests/catch_main.cpp -o "$1/catch_main.o" &&
      "$0" "${@:3}" -DFASTERAI_CATCH2_MAJOR=2 -c tests/cuda/device.cpp -o "$1/device.o" &&
      "$0" "$1/device.o" "$1/catch_main.o" -o "$1/test_cuda" $2' \
      "$cxx" "$build-gxx" "${libs[*]}" "${flags[@]}" &
    pids+=($!)
  else
    say "MISSING: Catch2 2 header (catch2/catch.hpp) for the g++ fallback: no CUDA tests"
    status=1
  fi
  run_for $(($(left) - 120)) "$logs/build-gxx-vgg16_seed_table.log" \
    "$cxx" "${flags[@]}" examples/vgg16_seed_table.cpp -o "$build-gxx/vgg16_seed_table" "${libs[@]}" &
  pids+=($!)
  for p in "${pids[@]}"; do wait "$p" || status=1; done
  if [[ -x $build-gxx/test_cuda ]]; then
    say "-- test_cuda (all its test cases, one process)"
    run_for $(($(left) - 60)) "$logs/ctest-cuda.log" "$build-gxx/test_cuda" --durations yes
    [[ $? == 0 ]] || status=1
    # Run by hand, a test that skips itself only warns: here that means the GPU was not seen.
    grep -q "SKIPPED" "$logs/ctest-cuda.log" && status=1
    ran_cuda=1
    tail_of "$logs/ctest-cuda.log" 12
  else
    say "FAILED: g++ build of test_cuda (see build-gxx-test_cuda.log)"
    tail_of "$logs/build-gxx-test_cuda.log" 15
    status=1
  fi
  if [[ -x $build-gxx/vgg16_seed_table ]]; then
    run_for $(($(left) - 30)) "$logs/vgg16_seed_table-cuda.log" \
      "$build-gxx/vgg16_seed_table" --device cuda --runs 20
    vgg=$?
    say "vgg16_seed_table --device cuda: exit $vgg"
    tail_of "$logs/vgg16_seed_table-cuda.log" 14
    [[ $vgg == 0 ]] || status=1
  else
    say "FAILED: g++ build of vgg16_seed_table (see build-gxx-vgg16_seed_table.log)"
    tail_of "$logs/build-gxx-vgg16_seed_table.log" 15
    status=1
  fi
fi
((ran_cuda)) || status=1

# ---- Phase B: the CPU suite's areas, as far as time allows ----------------------------------
if ((configured)); then
  read -r -a areas <<<"${GPU_CHECK_AREAS:-core graph layers sparse transform train dist}"
  targets=()
  for a in "${areas[@]}"; do targets+=("test_$a"); done
  say "-- build ${targets[*]} ($(left) s left)"
  # Keep going past a target that fails (dist's NCCL branch, say), so the others still run.
  run_for $(($(left) - 150)) "$logs/build-phase-b.log" cmake --build "$build" -j "$(nproc)" \
    --target "${targets[@]}" -- "${keep_going[@]}"
  build_b=$?
  built=()
  for a in "${areas[@]}"; do
    if [[ -x $build/tests/test_$a ]]; then built+=("$a"); else say "not built: test_$a"; fi
  done
  if [[ $build_b != 0 ]]; then
    status=1
    say "build phase B: status $build_b; first errors:"
    grep -m 10 -E "error:" "$logs/build-phase-b.log" | sed 's/^/    /' | tee -a "$summary" >/dev/null
  fi
  if ((${#built[@]})); then
    labels=$(IFS='|'; echo "^(${built[*]})\$")
    stop=$(date -d "@$((deadline - 20))" +%H:%M:%S)
    say "-- ctest -L '$labels' (stops at $stop)"
    (cd "$build" && run_for $(($(left) - 15)) "$logs/ctest-cpu.log" \
      ctest -L "$labels" --no-tests=error --output-on-failure --timeout "${GPU_CHECK_TEST_TIMEOUT_S:-120}" \
            -j "$(nproc)" --stop-time "$stop")
    [[ $? == 0 ]] || status=1
    grep -E "tests passed|tests failed|\*\*\*|Failed|Timeout|Not Run" "$logs/ctest-cpu.log" | tail -n 40 |
      sed 's/^/    /' | tee -a "$summary" >/dev/null
  fi
fi

say "== done in $(($(date +%s) - start)) s, status $status; logs in $logs"
exit $status
