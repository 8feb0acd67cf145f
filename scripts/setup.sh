#!/usr/bin/env bash
# Installs what shiftaddvit needs from Debian's packages (idempotent) and builds it.
#   scripts/setup.sh            # packages + Release build in ./build
#   SAV_NO_APT=1 scripts/setup.sh   # skip the package step
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="build-essential cmake ninja-build libopenblas-openmp-dev nlohmann-json3-dev libcli11-dev zlib1g-dev \
libgtest-dev libbenchmark-dev libjpeg62-turbo-dev libpng-dev dataset-fashion-mnist"
if [ -z "${SAV_NO_APT:-}" ]; then
  missing=""
  for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi
GEN=""; command -v ninja >/dev/null && GEN="-G Ninja"
cmake -S . -B build $GEN -DCMAKE_BUILD_TYPE=Release ${SAV_CMAKE_ARGS:-} >/dev/null
cmake --build build -j"$(nproc)"
