#!/usr/bin/env bash
# On the lent H200 machine: GPU training of the ViT models (issue 4). Builds shiftaddvit and the CUDA tests
# (scripts/h200_bench.sh's build step), runs the CUDA training tests, times one training step of the engine on
# the GPU against PyTorch eager on the same dense model (python/torch_train_bench.py) in the same run, and
# fine-tunes the Fashion-MNIST ShiftAddViT on the GPU with the recipe of the shipped CPU run
# (models/fmnist_shiftaddvit.log). Logs go to $OUT.
#
#   SAV_H200_TRAIN_STEPS="build tests bench finetune" bash scripts/h200_train.sh
#
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
    for tf in "" "--tf32"; do
      "$BIN" bench --arch vit_fmnist --device cuda --train $tf --batch 64,256 --iters 30 --warmup 5
      "$BIN" bench --weights models/fmnist_shiftaddvit.safetensors --device cuda --train $tf --batch 64,256 \
        --iters 30 --warmup 5
    done
    "$BIN" --threads "$(nproc)" bench --arch vit_fmnist --train --batch 64,256 --iters 10 --warmup 2
    python3 python/torch_train_bench.py --batches 64,256 --json "$OUT/torch_train.jsonl"
  } > "$OUT/train_bench.log" 2>&1
  [ $? -eq 0 ] || status=1
  grep -E "^\||rror" "$OUT/train_bench.log"
fi

if has finetune; then
  echo "[h200] Fashion-MNIST ShiftAddViT fine-tune on the GPU (the recipe of models/fmnist_shiftaddvit.log)"
  rm -rf runs/gpu_ham runs/gpu_full
  common="--hash-bits 32 --stage1-epochs 0 --batch 128 --min-lr 1e-5 --warmup-epochs 0.2 --pad-crop 1 --smoothing 0 \
    --distill --no-progress --device cuda --data $DATA"
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
exit $status
