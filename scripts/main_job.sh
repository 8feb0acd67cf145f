#!/usr/bin/env bash
# The main job on the embedded default data (Debian's dataset-fashion-mnist): set up, train a dense ViT
# briefly, evaluate it, and evaluate the shipped dense teacher. Everything goes to runs/main/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=./build/shiftaddvit
mkdir -p runs/main
echo "== 1. short training run of the dense vit_fmnist (1 epoch on 12,800 images)"
$BIN train --arch vit_fmnist --epochs 1 --train-limit 12800 --batch 64 --lr 1e-3 --warmup-epochs 0.2 \
  --pad-crop 2 --out runs/main/short --seed 1
echo "== 2. the shipped dense teacher (models/fmnist_teacher.safetensors) on the full test set"
$BIN eval --weights models/fmnist_teacher.safetensors
echo "== 3. engine speed on this machine"
$BIN bench --arch vit_fmnist --batch 1,64 --train --iters 5
