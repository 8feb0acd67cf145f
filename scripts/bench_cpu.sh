#!/usr/bin/env bash
# CPU benchmark, engine vs PyTorch (pip wheel) on the same models, in one run, same thread count.
# Prints a ratio table (PyTorch time / engine time: > 1 means the engine is faster).
#   scripts/bench_cpu.sh [threads] [archs]
# Needs: build/shiftaddvit, python3 with torch and timm (pip install torch timm).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-2}
ARCHS=${2:-vit_fmnist,deit_tiny_patch16_224}
ITERS=${ITERS:-10}
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
# Both sides run with their OpenMP runtimes' defaults (OMP_WAIT_POLICY=passive slows PyTorch's small ops 2x).
rm -f "$OUT/torch.jsonl" "$OUT/engine.txt"
for a in ${ARCHS//,/ }; do
  ./build/shiftaddvit --threads "$T" bench --arch "$a" --batch 1,64 --train --iters "$ITERS" | tee -a "$OUT/engine.txt"
  python3 python/bench_torch_cpu.py --archs "$a" --batches 1,64 --threads "$T" --train --iters "$ITERS" \
    --json "$OUT/torch.jsonl"
done
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
eng = {}
for line in open(f"{out}/engine.txt"):
    m = re.match(r"\|\s*(\S+)\s*\|\s*(\d+)\s*\|\s*([\d.]+)\s*\|\s*[\d.]+\s*\|\s*([\d.]+)\s*\|", line)
    if m:
        eng[(m[1], int(m[2]))] = (float(m[3]), float(m[4]))
print(f"{'model':24} {'batch':>5} {'engine fwd ms':>14} {'torch fwd ms':>13} {'fwd ratio':>9} "
      f"{'engine train img/s':>18} {'torch train img/s':>17} {'train ratio':>11}")
for line in open(f"{out}/torch.jsonl"):
    r = json.loads(line)
    e = eng.get((r["arch"], r["batch"]))
    if not e: continue
    ef, et = e
    tf, tt = r["forward_ms"], r["train_step_ms"]
    b = r["batch"]
    print(f"{r['arch']:24} {b:>5} {ef:>14.3f} {tf:>13.3f} {tf/ef:>9.2f} {1000*b/et:>18.1f} {1000*b/tt:>17.1f} {tt/et:>11.2f}")
PY
