#!/usr/bin/env bash
# ThreadSanitizer run of the threaded kernels (OpenMP-parallel CPU ops, their fast paths against the
# references): clang 14 + libomp, with LLVM's Archer tool so that TSan understands OpenMP's barriers and
# tasks (libgomp, g++'s OpenMP runtime, is not instrumented and would report false races).
#   bash scripts/tsan.sh              # builds build-tsan/, runs the kernel tests with 2 and 4 threads
#   SAV_TSAN_FILTER='Ops*' bash scripts/tsan.sh
# Needs: clang-14, libomp-14-dev (Archer: /usr/lib/llvm-14/lib/libarcher.so).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHER=/usr/lib/llvm-14/lib/libarcher.so
if ! command -v clang++-14 >/dev/null || [ ! -f "$ARCHER" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq clang-14 libomp-14-dev >/dev/null
fi
# Self-check first: the same toolchain must report a planted race, or a clean run below would mean nothing.
cat >build-tsan-race.cpp <<'CPP'
#include <cstdio>
int main() {
  long sum = 0;
#pragma omp parallel for
  for (int i = 0; i < 100000; ++i) sum += i;  // racy on purpose
  std::printf("%ld\n", sum);
}
CPP
clang++-14 -fsanitize=thread -fopenmp=libomp -g build-tsan-race.cpp -o build-tsan-race -L/usr/lib/llvm-14/lib
if OMP_NUM_THREADS=2 OMP_TOOL_LIBRARIES=$ARCHER LD_LIBRARY_PATH=/usr/lib/llvm-14/lib ./build-tsan-race 2>&1 |
   grep -q "ThreadSanitizer: data race"; then
  echo "self-check: the planted race is reported"
else
  echo "self-check FAILED: ThreadSanitizer did not report the planted race"; exit 1
fi
rm -f build-tsan-race build-tsan-race.cpp
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_C_COMPILER=clang-14 -DSAV_TSAN=ON -DSAV_CUDA=OFF -DSAV_BUILD_BENCH=OFF \
  -DOpenMP_CXX_FLAGS="-fopenmp=libomp" -DOpenMP_CXX_LIB_NAMES=omp -DOpenMP_omp_LIBRARY=/usr/lib/llvm-14/lib/libomp.so >/dev/null
cmake --build build-tsan --target sav_tests
FILTER=${SAV_TSAN_FILTER:-'Ops*:Hamming*:Ksh*:Moe*:ShiftLinear*:Vit*:Image.Resize*'}
for t in 2 4; do
  echo "== ThreadSanitizer, OMP_NUM_THREADS=$t, filter $FILTER"
  OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=1 OMP_TOOL_LIBRARIES=$ARCHER \
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ignore_noninstrumented_modules=1" \
    LD_LIBRARY_PATH=/usr/lib/llvm-14/lib build-tsan/sav_tests --gtest_filter="$FILTER" --gtest_brief=1
done
echo "ThreadSanitizer: no data race reported"
