#!/usr/bin/env bash
# On the lent H200 machine: GPU training of the ViT models (issue 4). Builds shiftaddvit and the CUDA tests
# (scripts/h200_bench.sh's build step), runs the CUDA training tests, times one training step of the engine on
# the GPU against PyTorch eager on the same dense model (python/torch_train_bench.py) in the same run, and
# fine-tunes the Fashion-MNIST ShiftAddViT (and the PVTv2 one: step pvt_finetune) on the GPU with the recipes of
# the CPU runs (models/fmnist_shiftaddvit.log, bench/RESULTS.md). Logs go to $OUT.
#
#   SAV_H200_TRAIN_STEPS="build tests bench finetune pvt_finetune" bash scripts/h200_train.sh
#
# SAV_FT_FLAGS adds flags to the fine-tunes (e.g. --bf16 for mixed precision).
# Needs .devrun/debs (see h200_bench.sh) and the Fashion-MNIST files in SAV_DATA (default .devdata/fmnist:
# train-images-idx3-ubyte.gz ...): carry both.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sav_h200}
mkdir -p "$OUT"
STEPS=" ${SAV_H200_TRAIN_STEPS:-build tests bench finetune} "
BUILD=${SAV_BUILD_DIR:-build-h200}
DATA=${SAV_DATA:-.devdata/fmnist}
BIN=$BUILD/shiftaddvit
has() { [[ "$STEPS" == *" $1 "* ]]; }
status=0

if has build; then
  SAV_H200_STEPS=build SAV_H200_TARGETS="shiftaddvit sav_cuda_tests" bash scripts/h200_bench.sh || exit 1
fi

if has tests; then
  echo "[h200] sav_cuda_tests ${SAV_TEST_FILTER:-*}"
  "$BUILD/sav_cuda_tests" --gtest_filter="${SAV_TEST_FILTER:-*}" 2>&1 | tail -n 400 > "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|Expected|Which is|gradient of|actual" "$OUT/tests.log" | head -80
  tail -n 3 "$OUT/tests.log"
  echo "[h200] tests rc=$rc"
  [ $rc -eq 0 ] || status=1
fi

if has bench; then
  echo "[h200] training step: engine (GPU, f32 and tf32; host CPU) vs PyTorch eager"
  {
    for tf in "" "--tf32" "--bf16"; do
      "$BIN" bench --arch vit_fmnist,pvt_fmnist --device cuda --train $tf --batch 64,256 --iters 30 --warmup 5
      "$BIN" bench --weights models/fmnist_shiftaddvit.safetensors --device cuda --train $tf --batch 64,256 \
        --iters 30 --warmup 5
      "$BIN" bench --arch deit_tiny_patch16_224,pvt_v2_b0 --device cuda --train $tf --batch 64 --iters 10 --warmup 3
    done
    "$BIN" --threads "$(nproc)" bench --arch vit_fmnist --train --batch 64,256 --iters 10 --warmup 2
    python3 python/torch_train_bench.py --models vit_fmnist,pvt_fmnist --batches 64,256 --json "$OUT/torch_train.jsonl"
    python3 python/torch_train_bench.py --models deit_tiny_patch16_224,pvt_v2_b0 --batches 64 --iters 20 \
      --json "$OUT/torch_train_224.jsonl"
  } > "$OUT/train_bench.log" 2>&1
  [ $? -eq 0 ] || status=1
  grep -E "^\||rror" "$OUT/train_bench.log"
fi

if has profile; then  # kernel time of one training step by kernel (ncu), SAV_PROFILE_ARCH at batch 64
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout 400 "$NCU" --clock-control none --cache-control none --print-units base --metrics gpu__time_duration.sum \
    --csv "$BIN" bench --arch "${SAV_PROFILE_ARCH:-deit_tiny_patch16_224}" --device cuda --train --tf32 --batch 64 \
    --iters 1 --warmup 0 > /tmp/sav_ncu_train.csv 2>&1
  python3 - /tmp/sav_ncu_train.csv <<'PY' | tee "$OUT/train_profile.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]
ki, vi = h.index("Kernel Name"), h.index("Metric Value")
agg = {}
for r in rows[1:]:
    k = r[ki][:90]
    t, n = agg.get(k, (0.0, 0))
    agg[k] = (t + float(r[vi].replace(",", "")) / 1000.0, n + 1)
total = sum(t for t, _ in agg.values())
print(f"{len(rows) - 1} launches, {total:.0f} us of kernel time (one eval forward + one training step)")
for k, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:25]:
    print(f"{t:10.1f} us {100 * t / total:5.1f}% {n:5d}x  {k}")
PY
fi

if has finetune; then
  echo "[h200] Fashion-MNIST ShiftAddViT fine-tune on the GPU (the recipe of models/fmnist_shiftaddvit.log)"
  rm -rf runs/gpu_ham runs/gpu_full
  common="--hash-bits 32 --stage1-epochs 0 --batch 128 --min-lr 1e-5 --warmup-epochs 0.2 --pad-crop 1 --smoothing 0 \
    --distill --no-progress --device cuda --data $DATA ${SAV_FT_FLAGS:-}"
  t0=$SECONDS
  "$BIN" finetune --weights models/fmnist_teacher.safetensors --attn hamming --mlp dense \
    --stage2-epochs ${SAV_HAM_EPOCHS:-20} --lr 1e-3 $common --out runs/gpu_ham > "$OUT/finetune_ham.log" 2>&1 ||
    status=1
  echo "stage 1 (Hamming): $((SECONDS - t0)) s" | tee -a "$OUT/finetune_ham.log"
  t0=$SECONDS
  "$BIN" finetune --weights runs/gpu_ham/model.safetensors --attn hamming --mlp moe \
    --stage2-epochs 2 --lr 5e-4 $common --out runs/gpu_full > "$OUT/finetune_full.log" 2>&1 || status=1
  echo "stage 2 (MoE): $((SECONDS - t0)) s" | tee -a "$OUT/finetune_full.log"
  grep -E "epoch|stage2 |rror" "$OUT/finetune_ham.log" "$OUT/finetune_full.log"
  cp runs/gpu_full/model.safetensors "$OUT/fmnist_shiftaddvit_gpu.safetensors" 2>/dev/null
fi

if has pvt_finetune; then
  echo "[h200] Fashion-MNIST PVTv2 fine-tune on the GPU (the recipe of bench/RESULTS.md's CPU run: pvt_full)"
  rm -rf runs/gpu_pvt
  t0=$SECONDS
  "$BIN" finetune --weights models/fmnist_pvt_teacher.safetensors --attn hhhs --mlp moe --stage1-epochs 2 \
    --stage2-epochs 3 --batch 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.2 --pad-crop 1 --smoothing 0 --distill \
    --no-progress --device cuda --data "$DATA" --out runs/gpu_pvt > "$OUT/finetune_pvt.log" 2>&1 || status=1
  echo "PVT fine-tune: $((SECONDS - t0)) s" | tee -a "$OUT/finetune_pvt.log"
  grep -E "epoch|stage[12] |rror" "$OUT/finetune_pvt.log"
  cp runs/gpu_pvt/model.safetensors "$OUT/fmnist_pvt_shiftaddvit_gpu.safetensors" 2>/dev/null
fi
exit $status
