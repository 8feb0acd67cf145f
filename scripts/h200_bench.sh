#!/usr/bin/env bash
# On the lent H200 machine (one device run): builds shiftaddvit (Release, CUDA on, tests on), runs the CUDA
# tests, times the engine on the DeiT presets (dense and converted to ShiftAddViT: SAV_VARIANTS, default
# dense,shiftadd) and the timm/PyTorch baseline in the same run, and prints the ratio table (each engine
# variant against dense timm, and shiftadd against the engine's dense). Logs go to $OUT (the device run's output folder; /tmp/sav_h200 elsewhere).
#
#   bash scripts/h200_bench.sh                                  # everything
#   SAV_H200_STEPS="build tests sanitize" bash scripts/h200_bench.sh
#
# SAV_PATHS (ViT forward paths, default both), SAV_ROW_FUSION (the rows-fused kernels' modes, default auto,off) and
# SAV_DEPENDENT (dependent-launch modes, default auto) pick the bench rows. SAV_H200_TARGETS overrides what the build step builds (default: sav_cuda_tests sav_cuda_bench); SAV_CUDA_FLAGS adds
# nvcc flags (e.g. -lineinfo for ncu's source view), SAV_BUILD_DIR picks the build folder (default build-h200).
# Steps: build tests bench bench_f32 release timm table profile sanitize (default: build tests bench timm
# table). bench_f32 times the PVT models of SAV_MODELS again with IEEE f32 products; release times the
# release's checkpoint (SAV_RELEASE_REF or .devrun/reference). profile
# runs ncu on one eager forward (SAV_PROFILE_MODELS): per kernel its time, DRAM bandwidth against the measured
# 4.3 TB/s and tensor-pipe use; sanitize runs compute-sanitizer on the tests.
# That machine has no network and lacks OpenBLAS, GTest, libjpeg/libpng headers (and maybe the CMake files of CLI11 and
# nlohmann-json): the Debian packages are carried in .devrun/debs (git-ignored; fetch them here with
#   mkdir -p .devrun/debs && cd .devrun/debs && apt-get download libopenblas0-openmp libopenblas-openmp-dev \
#     libopenblas-dev libgfortran5 libquadmath0 libgtest-dev libcli11-dev nlohmann-json3-dev \
#     zlib1g-dev zlib1g libjpeg62-turbo-dev libjpeg62-turbo libpng-dev libpng16-16
# ) and unpacked under /tmp/deps; the timm baseline script is carried as .devrun/timm_baseline.py (a copy of
# shared/bench/timm_baseline.py). Name ".devrun" in the run tool's carry.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sav_h200}
mkdir -p "$OUT"
STEPS=" ${SAV_H200_STEPS:-build tests bench timm table} "
DEPS=${SAV_DEPS:-/tmp/deps}
BUILD=${SAV_BUILD_DIR:-build-h200}
MODELS=${SAV_MODELS:-deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224}
BATCHES=${SAV_BATCHES:-1,64}
VARIANTS=${SAV_VARIANTS:-dense,shiftadd}  # engine variants: dense, shiftadd (the converted DeiT; sav_cuda_bench)
PATHS=${SAV_PATHS:-both}  # ViT forward paths: auto, layered, fused, both (sav_cuda_bench --path)
ROWS=${SAV_ROW_FUSION:-auto,off}  # the rows-fused kernels' modes: auto, on, off (sav_cuda_bench --row-fusion)
DEP=${SAV_DEPENDENT:-auto}        # dependent-launch modes: auto, on, off (sav_cuda_bench --dependent-launch)
has() { [[ "$STEPS" == *" $1 "* ]]; }
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>&1

if has build; then
  mkdir -p "$DEPS"
  if compgen -G ".devrun/debs/*.deb" >/dev/null; then
    for f in .devrun/debs/*.deb; do dpkg -x "$f" "$DEPS"; done
  fi
  ML=$DEPS/usr/lib/x86_64-linux-gnu
  ZLIB_LIB=""
  for z in /usr/lib/x86_64-linux-gnu/libz.so /usr/lib/x86_64-linux-gnu/libz.so.1 /lib/x86_64-linux-gnu/libz.so.1 \
           "$DEPS/lib/x86_64-linux-gnu/libz.so.1"; do
    if [ -e "$z" ]; then ZLIB_LIB=$z; break; fi
  done
  ZLIB_INC=/usr/include
  [ -f /usr/include/zlib.h ] || ZLIB_INC=$DEPS/usr/include
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  GEN=""
  command -v ninja >/dev/null && GEN="-G Ninja"
  {
    echo "== configure"
    cmake -S . -B "$BUILD" $GEN -DCMAKE_BUILD_TYPE=Release -DSAV_CUDA=ON -DSAV_BUILD_TESTS=ON \
      -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_FLAGS="${SAV_CUDA_FLAGS:-}" \
      -DCMAKE_PREFIX_PATH="$DEPS/usr" -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
      -DOPENBLAS_INCLUDE="$DEPS/usr/include/x86_64-linux-gnu/openblas-openmp" \
      -DOPENBLAS_LIB="$ML/openblas-openmp/libopenblas.so" \
      -DJPEG_INCLUDE_DIR="$DEPS/usr/include" -DJPEG_LIBRARY="$ML/libjpeg.so" \
      -DPNG_PNG_INCLUDE_DIR="$DEPS/usr/include/libpng16" -DPNG_LIBRARY="$ML/libpng16.so" \
      -DCMAKE_CXX_FLAGS="-isystem $DEPS/usr/include/x86_64-linux-gnu" \
      -DZLIB_LIBRARY="$ZLIB_LIB" -DZLIB_INCLUDE_DIR="$ZLIB_INC" \
      -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$ML -Wl,-rpath,$ML/openblas-openmp:$ML" &&
    echo "== build" &&
    cmake --build "$BUILD" -j"$(nproc)" --target ${SAV_H200_TARGETS:-sav_cuda_tests sav_cuda_bench}
  } >"$OUT/build.log" 2>&1
  rc=$?
  echo "[h200] build rc=$rc (log: build.log)"
  if [ $rc -ne 0 ]; then
    grep -E "error|Error|ERROR" "$OUT/build.log" | head -40
    tail -30 "$OUT/build.log"
    exit 1
  fi
fi

# The public release's reference files (tests/cuda/test_pvt_cuda.cpp and the release step), carried as
# .devrun/reference (a copy of shared/reference).
[ -z "${SAV_RELEASE_REF:-}" ] && [ -d .devrun/reference ] && export SAV_RELEASE_REF=$PWD/.devrun/reference

if has tests; then
  echo "[h200] sav_cuda_tests"
  "$BUILD/sav_cuda_tests" 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  echo "[h200] tests rc=$rc"
  [ $rc -eq 0 ] || status=1
fi

if has bench; then
  echo "[h200] sav_cuda_bench"
  rm -f "$OUT/engine.jsonl"
  "$BUILD/sav_cuda_bench" --models "$MODELS" --batches "$BATCHES" --variants "$VARIANTS" --iters 100 \
    --path "$PATHS" --row-fusion "$ROWS" --dependent-launch "$DEP" --json "$OUT/engine.jsonl" 2>&1 |
    tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# PVT models again with IEEE f32 products (the bench step runs them with TF32)
PVT_MODELS=$(echo "$MODELS" | tr ',' '\n' | grep '^pvt' | paste -sd, -)
if has bench_f32 && [ -n "$PVT_MODELS" ]; then
  echo "[h200] sav_cuda_bench, PVT models with f32 math"
  "$BUILD/sav_cuda_bench" --models "$PVT_MODELS" --batches "$BATCHES" --variants "$VARIANTS" --iters 100 \
    --math f32 --json "$OUT/engine.jsonl" 2>&1 | tee -a "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# The release's checkpoint (issue 7), f32 and tf32 math, reported as model pvt_v2_b0, variant checkpoint
if has release && [ -n "${SAV_RELEASE_REF:-}" ]; then
  for m in tf32 f32; do
    echo "[h200] sav_cuda_bench, the release's PVTv2-B0 checkpoint, $m math"
    "$BUILD/sav_cuda_bench" --weights "$SAV_RELEASE_REF/official_pvt_v2_b0_moe_seed1.safetensors" --math $m \
      --batches "$BATCHES" --iters 100 --json "$OUT/engine.jsonl" 2>&1 | tee -a "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi

if has timm; then
  echo "[h200] timm baseline"
  TB=.devrun/timm_baseline.py
  [ -f "$TB" ] || TB=shared/bench/timm_baseline.py
  rm -f "$OUT/timm.jsonl"
  PYTHONUNBUFFERED=1 python3 "$TB" --models "$MODELS" --batches "$BATCHES" --json "$OUT/timm.jsonl" 2>&1 |
    grep -v Warning
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has table && [ -f "$OUT/engine.jsonl" ] && [ -f "$OUT/timm.jsonl" ]; then
  python3 - "$OUT/engine.jsonl" "$OUT/timm.jsonl" <<'EOF' | tee "$OUT/table.txt"
import json, sys
# engine rows: (model, variant, batch); rows without a variant (older runs) are dense; rows of the fused
# single-kernel forward get the variant "<variant>+fused", layered rows with the rows-fused kernels forced on / off
# "+rows" / "+norows"
def variant(r):
    return r.get("variant", "dense") + {"fused": "+fused", "layered-norows": "+norows", "layered-rows": "+rows"}.get(
        r.get("path"), "")
eng = {(r["model"], variant(r), r["batch"]): r for r in map(json.loads, open(sys.argv[1]))}
base = {(r["model"], r["batch"]): r for r in map(json.loads, open(sys.argv[2]))}
print(f"{'model':26} {'variant':14} {'batch':>5} {'engine_ms':>10} {'timm_graph16':>12} {'timm_best16':>11} "
      f"{'speedup':>8} {'vs_dense':>8}")
order = {"dense": 0, "dense-f32": 1, "shiftadd": 2, "shiftadd+rows": 3, "shiftadd+norows": 4, "shiftadd+fused": 5,
         "shiftadd-f32": 6, "checkpoint": 7, "checkpoint-f32": 8}
for key in sorted(eng, key=lambda k: (k[0], k[2], order.get(k[1], 9), k[1])):
    model, variant, batch = key
    e, b = eng[key]["engine_ms"], base.get((model, batch))
    d = eng.get((model, "dense-f32" if variant.endswith("-f32") else "dense", batch))
    vs_dense = f"{d['engine_ms'] / e:7.2f}x" if d is not None and variant != "dense" else f"{'-':>8}"
    if b is None:
        print(f"{model:26} {variant:14} {batch:>5} {e:10.4f} {'-':>12} {'-':>11} {'-':>8} {vs_dense}")
        continue
    print(f"{model:26} {variant:14} {batch:>5} {e:10.4f} {b['graph_fp16_ms']:12.4f} {b['best_fp16_ms']:11.4f} "
          f"{b['best_fp16_ms'] / e:7.2f}x {vs_dense}")
print("speedup = timm best fp16 ms (the dense model) / engine ms (same run; > 1: the engine is faster);")
print("vs_dense = the engine's dense ms / this variant's ms. shiftadd = Hamming attention + MoE(mult, shift) MLPs;")
print("+fused = the whole forward as one kernel launch of thread-block clusters (ops/cuda/vit_fused.h), else the layered kernels;")
print("+rows / +norows = the layered kernels with the rows-fused kernels forced on / off (ViTCuda::set_row_fusion);")
print("shiftadd rows choose per shape by timing (ViTCudaRowFusion::automatic)")
EOF
fi
if has profile; then
  # Per kernel of one eager forward: time, DRAM bytes and bandwidth against the H200's measured copy bandwidth
  # (4.3 TB/s, ../shared/docs/ANCHORS.md), and the tensor pipe's and SM throughput's share of their peaks.
  echo "[h200] ncu: kernels of one eager forward (${SAV_PROFILE_MODELS:-deit_tiny_patch16_224} at $BATCHES, $VARIANTS)"
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  M="gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum"
  M="$M,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed"
  timeout 400 "$NCU" --profile-from-start off --clock-control none --cache-control none --print-units base \
    --metrics "$M" --csv "$BUILD/sav_cuda_bench" --profile \
    --models "${SAV_PROFILE_MODELS:-deit_tiny_patch16_224}" --batches "$BATCHES" --variants "$VARIANTS" \
    --row-fusion "$ROWS" >/tmp/sav_ncu.csv 2>&1
  python3 - /tmp/sav_ncu.csv <<'EOF' | tee "$OUT/profile.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    print("no ncu rows"); sys.exit()
h = rows[0]
ii, ki, gi, mi, vi = (h.index(c) for c in ("ID", "Kernel Name", "Grid Size", "Metric Name", "Metric Value"))
launch = {}  # launch id -> [name, grid, {metric: value}]
for r in rows[1:]:
    e = launch.setdefault(r[ii], [r[ki], r[gi], {}])
    e[2][r[mi]] = float(r[vi].replace(",", "") or 0)
runs = []
for i in sorted(launch, key=int):  # each forward starts with the im2col kernel
    name, grid, m = launch[i]
    if "im2col" in name:
        runs.append([])
    if runs:
        runs[-1].append((name, grid, m))
COPY_BW = 4.3e12
for n, run in enumerate(runs):
    tot = sum(m["gpu__time_duration.sum"] for _, _, m in run) / 1000.0
    print(f"== forward {n}: {len(run)} kernels, {tot:.1f} us of kernel time")
    print(f"  {'us':>9} {'n':>4} {'us/launch':>9} {'DRAM GB/s':>10} {'of 4.3TB/s':>10} {'tensor':>7} {'SM':>6}  kernel")
    agg = {}
    for name, grid, m in run:
        key = name[:70] + "  grid" + grid
        a = agg.setdefault(key, [0, 0.0, 0.0, 0.0, 0.0])
        t = m["gpu__time_duration.sum"] * 1e-9
        a[0] += 1
        a[1] += t
        a[2] += m.get("dram__bytes_read.sum", 0) + m.get("dram__bytes_write.sum", 0)
        a[3] += t * m.get("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", 0)
        a[4] += t * m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0)
    for key, (c, t, by, tp, sm) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:16]:
        bw = by / t if t > 0 else 0
        print(f"  {t * 1e6:9.1f} {c:4d} {t * 1e6 / c:9.2f} {bw / 1e9:10.0f} {100 * bw / COPY_BW:9.1f}% "
              f"{tp / t:6.1f}% {sm / t:5.1f}%  {key}")
EOF
fi
if has sanitize; then
  echo "[h200] compute-sanitizer memcheck + racecheck on the op tests and the tiny model"
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  {
    timeout 150 "$CS" --tool memcheck --leak-check no "$BUILD/sav_cuda_tests" \
      --gtest_filter='CudaOps.*:VitCuda.GoldenTiny*' 2>&1 | tail -40
    timeout 120 "$CS" --tool racecheck "$BUILD/sav_cuda_tests" --gtest_filter='CudaOps.Attention*:CudaOps.Hamming*' \
      2>&1 | tail -20
  } | tee "$OUT/sanitize.log"
fi

exit $status
