#!/usr/bin/env bash
# The Fashion-MNIST ShiftAddViT experiments recorded in bench/RESULTS.md (2-core CPU machine).
# Starts from the shipped dense teacher; every run writes under runs/exp/. Takes about 40 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./build/shiftaddvit}
T=models/fmnist_teacher.safetensors
E=runs/exp
mkdir -p $E
common="--batch 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.1 --pad-crop 2 --distill --no-progress --resume"
# 1. full ShiftAddViT: stage 1 Hamming attention everywhere, stage 2 + MoE(mult, shift) in every MLP linear
/usr/bin/time -f "%e s" $BIN finetune --weights $T --attn hamming --mlp moe --stage1-epochs 1 --stage2-epochs 1 \
  $common --out $E/full 2>&1 | tee $E/full.log
# 2. all-shift MLPs, from the same stage-1 model
mkdir -p $E/shift && cp -r $E/full/stage1 $E/shift/
/usr/bin/time -f "%e s" $BIN finetune --weights $T --attn hamming --mlp shift --stage1-epochs 1 --stage2-epochs 1 \
  $common --out $E/shift 2>&1 | tee $E/shift.log
# 3. the router follows the latency factors: two settings, short stage-2 runs from the same stage-1 model
for a in 1,4 4,1; do
  d=$E/alpha_${a/,/_}; mkdir -p $d && cp -r $E/full/stage1 $d/
  $BIN finetune --weights $T --attn hamming --mlp moe --alpha $a --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 \
    --train-limit 12800 $common --out $d 2>&1 | tail -4 | tee $d.log
  $BIN energy --weights $d/model.safetensors --limit 2000 | grep -E "shift expert" | tee -a $d.log
done
# 4. energy of the full model with measured shares
$BIN energy --weights $E/full/model.safetensors --limit 10000 --json $E/energy_full.json | tee $E/energy_full.txt
