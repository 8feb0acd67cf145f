#!/usr/bin/env bash
# The Fashion-MNIST ShiftAddViT experiments of issues 3 and 5, recorded in bench/RESULTS.md. Every run starts
# from a shipped dense teacher, distils from it, and writes under runs/exp/ with resumable checkpoints: rerun
# the script (same arguments) to continue where a run stopped.
#   bash scripts/experiments_fmnist.sh                 # one run after the other, all threads each
#   SAV_PARALLEL=1 bash scripts/experiments_fmnist.sh  # all at once, threads split evenly (a many-core machine)
#   SAV_RUNS="ham full" ...                            # only these runs (default: ham full shift alpha_1_4 alpha_4_1)
#   SAV_TIMEOUT=480 ...                                # stop each run after so many seconds (resume later)
#   SAV_EXTRA="--hash-bits 32" ...                     # extra finetune flags for every run
#   BIN, SAV_TEACHER, SAV_PVT_TEACHER, SAV_EXP_DIR, SAV_THREADS, SAV_DATA override the binary, the ViT and PVT
#   teachers, output folder, threads, data
# Runs: ham       Hamming attention in every block, MLPs dense (the "within 0.5 points" run)
#       full      stage 1 Hamming attention, stage 2 + MoE (mult, shift) in every MLP linear (the shipped model)
#       shift     stage 1 Hamming attention, stage 2 + shift linears in every MLP
#       alpha_1_4, alpha_4_1: short full runs with opposite latency factors (the router's shares follow them)
#       pvt_full  PVTv2 (pvt_fmnist): stage 1 Hamming attention in stages 1-3, stage 2 + MoE in every MLP linear
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./build/shiftaddvit}
T=${SAV_TEACHER:-models/fmnist_teacher.safetensors}
TP=${SAV_PVT_TEACHER:-models/fmnist_pvt_teacher.safetensors}
E=${SAV_EXP_DIR:-runs/exp}
NT=${SAV_THREADS:-$(nproc)}
RUNS=${SAV_RUNS:-ham full shift alpha_1_4 alpha_4_1}
mkdir -p "$E"
common="--batch 128 --lr 5e-4 --min-lr 1e-5 --warmup-epochs 0.2 --pad-crop 1 --smoothing 0 --distill
        --save-every 100 --no-progress --resume ${SAV_DATA:+--data $SAV_DATA} ${SAV_EXTRA:-}"
args_of() {  # the teacher and finetune flags of run $1
  case $1 in
    ham) echo "--weights $T --attn hamming --mlp dense --stage1-epochs 0 --stage2-epochs 10" ;;
    full) echo "--weights $T --attn hamming --mlp moe --stage1-epochs 4 --stage2-epochs 6" ;;
    shift) echo "--weights $T --attn hamming --mlp shift --stage1-epochs 4 --stage2-epochs 6" ;;
    alpha_1_4) echo "--weights $T --attn hamming --mlp moe --alpha 1,4 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800" ;;
    alpha_4_1) echo "--weights $T --attn hamming --mlp moe --alpha 4,1 --lb-coef 0.1 --stage1-epochs 1 --stage2-epochs 1 --train-limit 12800" ;;
    pvt_full) echo "--weights $TP --attn hhhs --mlp moe --stage1-epochs 2 --stage2-epochs 3" ;;
    *) echo "unknown run '$1'" >&2; exit 2 ;;
  esac
}
run() {  # run NAME THREADS
  local name=$1 th=$2 a
  a=$(args_of "$name") || exit 2
  local to=""
  [ -n "${SAV_TIMEOUT:-}" ] && to="timeout ${SAV_TIMEOUT}"
  echo "[exp] $name: $BIN --threads $th finetune $a (log $E/$name.log)"
  # shellcheck disable=SC2086
  { date -u +"started %F %T"; /usr/bin/time -f "wall %e s" $to $BIN --threads "$th" finetune $common $a --out "$E/$name";
    date -u +"ended %F %T"; } >>"$E/$name.log" 2>&1
}
n=$(echo $RUNS | wc -w)
if [ -n "${SAV_PARALLEL:-}" ]; then
  th=$((NT / n > 0 ? NT / n : 1))
  for r in $RUNS; do run "$r" "$th" & done
  wait
else
  for r in $RUNS; do run "$r" "$NT"; done
fi
for a in alpha_1_4 alpha_4_1 full; do
  [ -f "$E/$a/model.safetensors" ] && $BIN energy --weights "$E/$a/model.safetensors" --limit 2000 ${SAV_DATA:+--data $SAV_DATA} \
    >"$E/energy_$a.txt" 2>&1
done
grep -h -A8 "| stage" "$E"/*.log 2>/dev/null | tail -40
