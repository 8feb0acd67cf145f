#!/usr/bin/env bash
# The main job on the embedded default data (Debian's dataset-fashion-mnist), the whole ShiftAddViT
# pipeline: set up, evaluate the shipped dense teacher, convert it (Hamming attention in every block, a
# mult/shift MoE in every MLP linear), fine-tune briefly in two stages with distillation, evaluate, benchmark
# dense vs converted, print the energy table and draw the routing picture. Outputs go to runs/main/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=./build/shiftaddvit
TEACHER=models/fmnist_teacher.safetensors
OUT=runs/main
# A fresh run each time: stage checkpoints left by an earlier run (maybe of another teacher) are not reused.
rm -rf $OUT
mkdir -p $OUT
echo "== 1/6 the shipped dense teacher on the Fashion-MNIST test set"
$BIN eval --weights $TEACHER
echo "== 2/6 latency factors of the two experts on this machine"
$BIN profile --weights $TEACHER --out $OUT/alpha.json | tee $OUT/profile.txt
ALPHA=$(sed -n 's/.*--alpha \([0-9.,]*\).*/\1/p' $OUT/profile.txt)
echo "== 3/6 convert + fine-tune (stage 1: attention; stage 2: attention + MoE linears), distilling from the teacher"
$BIN finetune --weights $TEACHER --attn hamming --mlp moe --alpha "$ALPHA" --stage1-epochs 1 --stage2-epochs 1 \
  --batch 128 --lr 5e-4 --distill --pad-crop 1 --smoothing 0 --out $OUT/finetune
echo "== 4/6 speed: dense teacher vs converted model (engine, CPU)"
$BIN bench --weights $TEACHER --batch 1,64 --iters 10
$BIN bench --weights $OUT/finetune/model.safetensors --batch 1,64 --iters 10
echo "== 5/6 energy per image (45 nm model), MoE shares measured on 2000 test images"
$BIN energy --weights $OUT/finetune/model.safetensors --limit 2000
echo "== 6/6 which tokens went to which expert"
$BIN route --weights $OUT/finetune/model.safetensors --index 0 --out $OUT/route.png
