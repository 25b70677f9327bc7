#!/usr/bin/env bash
# Build and test fasterai against LibTorch 2.x: Debian 13's LibTorch 2.6 with its GCC 14 and
# Catch2 3, and PyTorch 2.6 / torchvision 0.21 as the Python oracles, in a Debian 13 root made
# with debootstrap (once; reused after). The checkout, as it is in the work tree, is copied in.
#
# Usage: scripts/compat.sh [--ci]
#   (default)  what scripts/test.sh does, in the root: build everything, every public header in
#              its own translation unit too, and run the whole CTest suite.
#   --ci       CI's LibTorch 2.x leg (it has to fit beside the 1.13 suite in CI's time): build
#              every public header in its own translation unit (each area's code compiles
#              against 2.6, and header_check/emits_no_code checks that none makes its includers
#              compile code) and the tests of core, graph, layers, dist, deploy and quant, the
#              transformer tests and the ViT and ConvNeXt zoo tests, and run them: the version
#              header, tracing on 2.6's autograd graph (permutes, token Linears, attention heads
#              through 2.6's matmul, layer rules; ViT-B/16 and ConvNeXt-Tiny against PyTorch 2.6 and
#              torchvision 0.21), the two-process data-parallel tests on 2.6's c10d,
#              TorchScript export and optimize_for_inference (2.6's oneDNN graphs and CPU
#              fuser), and int8 quantization, the traced path included (2.6's JIT passes).
# Environment:
#   FASTERAI_COMPAT_ROOT    the Debian 13 root (default /var/cache/fasterai/trixie-root)
#   FASTERAI_COMPAT_MIRROR  the Debian mirror (default: the first one in this machine's apt
#                           sources)
# Needs root (debootstrap, chroot and mounts); runs itself through sudo otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  "") ;;
  --ci) mode=ci ;;
  *) echo "usage: scripts/compat.sh [--ci]" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then exec sudo --preserve-env=FASTERAI_COMPAT_ROOT,FASTERAI_COMPAT_MIRROR "$0" "$@"; fi

root=${FASTERAI_COMPAT_ROOT:-/var/cache/fasterai/trixie-root}
jobs=$(nproc)
source_dir=/work/fasterai   # inside the root
build_dir=/work/build       # inside the root, outside the copy: kept between runs

# What --ci builds and runs.
ci_targets=(fasterai_header_check test_core test_graph test_layers test_dist test_deploy test_quant test_models
            test_transform)
ci_tests='^(core|graph|layers|dist|deploy|quant)/|^models/(ViT|ConvNeXt)|^transform/transformers|^header_check/'

step_start=$SECONDS
step() {  # step NAME: report the time the previous step took, then announce NAME
  if [ -n "${step_name:-}" ]; then
    echo "compat: ${step_name} took $((SECONDS - step_start)) s"
  fi
  step_name=$1
  step_start=$SECONDS
  [ -z "$1" ] || echo "compat: ${step_name}"
}

# The mirror this machine already uses (never a host written here).
mirror() {
  if [ -n "${FASTERAI_COMPAT_MIRROR:-}" ]; then echo "$FASTERAI_COMPAT_MIRROR"; return; fi
  local m
  m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
      awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}')
  if [ -z "$m" ]; then
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}')
  fi
  [ -n "$m" ] || { echo "compat: no Debian mirror in the apt sources; set FASTERAI_COMPAT_MIRROR" >&2; exit 1; }
  echo "$m"
}

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock -n 9 || { echo "compat: another run holds $root.lock" >&2; exit 1; }

if [ ! -e "$root/.fasterai-root" ]; then
  step "debootstrap trixie into $root"
  command -v debootstrap >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap
  rm -rf "$root.partial"
  debootstrap --variant=minbase trixie "$root.partial" "$(mirror)" > "$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log" >&2; exit 1; }
  touch "$root.partial/.fasterai-root"
  rm -rf "$root"
  mv "$root.partial" "$root"
fi

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true
  done
}
trap cleanup EXIT
mount_in() {  # mount_in TARGET mount-arguments...
  local target=$root$1
  shift
  if ! mountpoint -q "$target"; then
    mount "$@" "$target"
    mounted+=("$target")
  fi
}
mount_in /proc -t proc proc
mount_in /dev --bind /dev
mount_in /dev/pts --bind /dev/pts
mount_in /sys --bind /sys
cp /etc/resolv.conf "$root/etc/resolv.conf"

step "copy the checkout into $root$source_dir"
rm -rf "$root$source_dir"
mkdir -p "$root$source_dir"
# Tracked and untracked files that git does not ignore, as they are in the work tree.
git ls-files -z --cached --others --exclude-standard |
  tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$root$source_dir"

# OPENBLAS_NUM_THREADS=1: CTest already runs one test per core, and OpenBLAS's own threads on
# top of LibTorch 2.x's OpenMP pool made LAPACK's SVD (FCDecomposer) many times slower on a busy
# 2-core machine (see docs/libtorch2.md, "The slow SVD on 2.6").
# ONEDNN_MAX_CPU_ISA=AVX: Debian 13's oneDNN 3.7.2 computes wrong convolution input gradients
# with its AVX-512 and AVX2 kernels (tests/core/platform.cpp; docs/libtorch2.md,
# "Wrong convolution gradients from oneDNN 3.7.2"); capped at AVX (its SSE/AVX kernels) it is right.
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  CCACHE_DIR=/var/cache/ccache OPENBLAS_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX "$@"; }

step "install the Debian 13 packages (scripts/install-deps.sh)"
in_root "$source_dir/scripts/install-deps.sh"
in_root dpkg-query -W -f='compat: ${Package} ${Version}\n' libtorch-dev catch2 g++ python3-torch \
  python3-torchvision

# Said in both modes: the build directory is kept between runs, and its cache would keep
# whatever the previous run set (a --ci run before a full one left the benchmarks out).
cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTERAI_HEADER_CHECK=ON)
if [ "$mode" = full ]; then
  cmake_args+=(-DFASTERAI_BUILD_BENCHMARKS=ON)
else
  cmake_args+=(-DFASTERAI_BUILD_BENCHMARKS=OFF)
fi
step "configure and build ($mode)"
in_root cmake -S "$source_dir" -B "$build_dir" "${cmake_args[@]}" > /dev/null
# Every compile error at once; CTest runs what did build, so one report shows everything.
build_status=0
if [ "$mode" = full ]; then
  in_root cmake --build "$build_dir" -j "$jobs" -- -k 0 || build_status=$?
else
  in_root cmake --build "$build_dir" -j "$jobs" --target "${ci_targets[@]}" -- -k 0 || build_status=$?
fi

ctest_args=(--output-on-failure -j "$jobs")
[ "$mode" = full ] || ctest_args+=(-R "$ci_tests")
step "ctest ($mode)"
status=0
in_root bash -c "cd $build_dir && ctest ${ctest_args[*]@Q}" || status=$?
step ""
[ "$build_status" -eq 0 ] || echo "compat: the build failed (see the errors above)" >&2
[ "$build_status" -eq 0 ] && exit $status || exit 1
