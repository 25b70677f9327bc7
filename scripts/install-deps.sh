#!/usr/bin/env bash
# Install what fasterai needs from Debian 12 packages, and only what is missing: when every
# package is present this makes no apt call at all.
set -euo pipefail
packages=(cmake g++ ninja-build ccache libtorch-dev librange-v3-dev catch2 libbenchmark-dev
          zlib1g-dev dataset-fashion-mnist
          # Gloo's headers, which LibTorch's c10d process group includes (data-parallel training).
          libgloo-dev
          # Debian's libtorch calls BLAS/LAPACK through the system alternative, which is the
          # unoptimized reference implementation unless OpenBLAS is installed: with it, the SVD
          # of VGG16's first Linear layer takes seconds instead of many minutes.
          libopenblas0-pthread)
# Optional oracle for tests (torchvision's models, state_dicts written by Python).
optional=(python3-torch python3-torchvision)
missing=()
for p in "${packages[@]}" "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "fasterai: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
