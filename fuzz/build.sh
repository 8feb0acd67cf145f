#!/usr/bin/env bash
# Builds the libFuzzer targets with clang 14 + AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   fuzz/build.sh [OUT_DIR]     # default: build-fuzz/ at the repository root (git-ignored)
#   OUT_DIR/fuzz_safetensors fuzz/corpus/safetensors -dict=fuzz/dict/safetensors.dict   # see fuzz/README.md
#
# Compiles the library sources the readers need (not the whole library, and not with the project's
# g++ build) with coverage instrumentation, then links one binary per target. Needs clang-14 and its
# runtime (Debian: apt-get install -y clang-14 libclang-rt-14-dev), zlib, nlohmann-json, CLI11, libjpeg and
# libpng headers. Single-threaded: OpenMP pragmas are ignored (no -fopenmp). CXX / JOBS override the defaults.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build-fuzz}"
CXX="${CXX:-clang++-14}"
JOBS="${JOBS:-2}"
mkdir -p "$OUT/obj"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
CXXFLAGS="-std=c++20 -O1 -g $SAN -Wno-unknown-pragmas -I$ROOT/src -I$ROOT/include"
LIB_SOURCES="src/core/error.cpp src/core/parse.cpp src/core/tensor.cpp src/io/safetensors.cpp src/io/atomic_file.cpp
             src/io/dataset.cpp src/io/image.cpp fuzz/targets.cpp"

# Library sources and the entry functions: instrumented for coverage, no libFuzzer main.
objs=()
pids=()
for src in $LIB_SOURCES; do
  obj="$OUT/obj/$(echo "$src" | tr '/' '_').o"
  objs+=("$obj")
  stale=0
  [[ ! -f "$obj" || "$ROOT/$src" -nt "$obj" ]] && stale=1
  [[ "$src" == fuzz/* && ( "$ROOT/fuzz/targets.h" -nt "$obj" || "$ROOT/tools/cli_checks.h" -nt "$obj" ) ]] && stale=1
  if (( stale )); then
    echo "compile $src"
    $CXX $CXXFLAGS -fsanitize=fuzzer-no-link -c "$ROOT/$src" -o "$obj.tmp" && mv "$obj.tmp" "$obj" &
    pids+=($!)
    if (( ${#pids[@]} >= JOBS )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed compile stops here

for t in safetensors checkpoint_index idx image cli_values; do
  echo "link fuzz_$t"
  $CXX $CXXFLAGS -fsanitize=fuzzer "$ROOT/fuzz/fuzz_$t.cpp" "${objs[@]}" -ljpeg -lpng -lz -o "$OUT/fuzz_$t"
done
echo "built into $OUT"
