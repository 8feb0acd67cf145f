#!/usr/bin/env bash
# The whole test suite from a fresh machine: installs packages, builds (Release) and runs ctest; then the
# same suite built with AddressSanitizer + UndefinedBehaviorSanitizer (skip with SAV_SKIP_SANITIZE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
(cd build && ctest --output-on-failure -j"$(nproc)" --timeout 900)
if [ -z "${SAV_SKIP_SANITIZE:-}" ]; then
  echo "== sanitizer build (ASan + UBSan)"
  cmake -S . -B build-sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAV_SANITIZE=ON >/dev/null
  cmake --build build-sanitize -j"$(nproc)"
  (cd build-sanitize && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 ctest --output-on-failure -j"$(nproc)" --timeout 900)
fi
