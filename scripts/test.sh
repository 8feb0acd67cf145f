#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs packages, builds (Release + tests), runs ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cd build
ctest --output-on-failure -j"$(nproc)" --timeout 900
