#!/usr/bin/env bash
# The Fashion-MNIST ShiftAddViT experiments of issue 3, recorded in bench/RESULTS.md. Every run starts from
# the shipped dense teacher, distils from it, and writes under runs/exp/ with resumable checkpoints: rerun
# the script (same arguments) to continue where a run stopped.
#   bash scripts/experiments_fmnist.sh                 # one run after the other, all threads each
#   SAV_PARALLEL=1 bash scripts/experiments_fmnist.sh  # all at once, threads split (a many-core machine)
#   SAV_TIMEOUT=480 ...                                # stop each run after so many seconds (resume later)
#   BIN, SAV_TEACHER, SAV_EXP_DIR, SAV_THREADS, SAV_DATA override the binary, teacher, output folder, threads, data
# Runs: ham   Hamming attention in every block, MLPs dense (the "within 0.5 points" run)
#       full  stage 1 Hamming attention, stage 2 + MoE (mult, shift) in every MLP linear (the shipped model)
#       shift stage 1 Hamming attention, stage 2 + shift linears in every MLP
#       alpha_1_4, alpha_4_1: short full runs with opposite latency factors (the router's shares follow them)
# (ham_b32 in RESULTS is the ham run with --hash-bits 32 added, run by hand.)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./build/shiftaddvit}
T=${SAV_TEACHER:-models/fmnist_teacher.safetensors}
E=${SAV_EXP_DIR:-runs/exp}
NT=${SAV_THREADS:-$(nproc)}
mkdir -p "$E"
common="--weights $T --batch 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.2 --pad-crop 1 --smoothing 0 --distill
        --save-every 100 --no-progress --resume ${SAV_DATA:+--data $SAV_DATA}"
run() {  # run NAME THREADS ARGS...
  local name=$1 th=$2; shift 2
  local to=""
  [ -n "${SAV_TIMEOUT:-}" ] && to="timeout ${SAV_TIMEOUT}"
  echo "[exp] $name: $BIN --threads $th finetune $* (log $E/$name.log)"
  { date -u +"started %F %T"; /usr/bin/time -f "wall %e s" $to $BIN --threads "$th" finetune $common "$@" --out "$E/$name";
    date -u +"ended %F %T"; } >>"$E/$name.log" 2>&1
}
if [ -n "${SAV_PARALLEL:-}" ]; then
  q=$((NT / 4 > 0 ? NT / 4 : 1)); h=$((NT / 8 > 0 ? NT / 8 : 1))
  run ham "$q" --attn hamming --mlp dense --stage1-epochs 0 --stage2-epochs 10 &
  run full "$q" --attn hamming --mlp moe --stage1-epochs 4 --stage2-epochs 6 &
  run shift "$q" --attn hamming --mlp shift --stage1-epochs 4 --stage2-epochs 6 &
  run alpha_1_4 "$h" --attn hamming --mlp moe --alpha 1,4 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800 &
  run alpha_4_1 "$h" --attn hamming --mlp moe --alpha 4,1 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800 &
  wait
else
  run ham "$NT" --attn hamming --mlp dense --stage1-epochs 0 --stage2-epochs 10
  run full "$NT" --attn hamming --mlp moe --stage1-epochs 4 --stage2-epochs 6
  run shift "$NT" --attn hamming --mlp shift --stage1-epochs 4 --stage2-epochs 6
  run alpha_1_4 "$NT" --attn hamming --mlp moe --alpha 1,4 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800
  run alpha_4_1 "$NT" --attn hamming --mlp moe --alpha 4,1 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800
fi
for a in alpha_1_4 alpha_4_1 full; do
  [ -f "$E/$a/model.safetensors" ] && $BIN energy --weights "$E/$a/model.safetensors" --limit 2000 ${SAV_DATA:+--data $SAV_DATA} \
    >"$E/energy_$a.txt" 2>&1
done
grep -h -A8 "| stage" "$E"/*.log 2>/dev/null | tail -40
