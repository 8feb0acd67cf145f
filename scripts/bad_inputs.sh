#!/usr/bin/env bash
# Feeds the command-line program the bad inputs a user can give and prints, as a Markdown table, what the
# user sees (exit status and the last line of stderr). The README's reliability table comes from this.
#   scripts/bad_inputs.sh [BIN]     # default build/shiftaddvit; needs models/fmnist_teacher.safetensors
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-build/shiftaddvit}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
W=models/fmnist_teacher.safetensors
head -c 100000 "$W" >"$T/truncated.safetensors"
cp "$W" "$T/corrupt.safetensors"
printf '{"x": nonsense' | dd of="$T/corrupt.safetensors" bs=1 seek=8 conv=notrunc status=none
printf 'not an image' >"$T/text.png"
chmod 000 "$T/text.png" 2>/dev/null
printf '\x89PNG\r\n\x1a\n' >"$T/cut.png"
mkdir -p "$T/empty_data"
python3 - "$T/huge.png" <<'PY'
import struct, sys, zlib
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(sys.argv[1], "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0))
                              + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
PY

row() {  # row "what the user did" args...
  local what=$1; shift
  local err rc
  err=$("$BIN" "$@" 2>&1 >/dev/null)
  rc=$?
  err=$(printf '%s\n' "$err" | grep -v '^shiftaddvit: [0-9]* threads' | tail -1)
  err=${err//$T/\$TMP}
  err=${err//|/\\|}
  printf '| %s | `%s` | %s | %s |\n' "$what" "shiftaddvit ${*//$T/\$TMP}" "$rc" "$err"
}

echo "| bad input | command | exit | what the user sees (last line of stderr) |"
echo "|---|---|---|---|"
row "truncated checkpoint" eval --weights "$T/truncated.safetensors"
row "corrupt checkpoint header" eval --weights "$T/corrupt.safetensors"
row "checkpoint that does not exist" eval --weights "$T/none.safetensors"
row "wrong --arch for a checkpoint" eval --arch deit_tiny_patch16_224 --weights "$W"
row "missing data set" eval --weights "$W" --data "$T/empty_data"
row "unknown flag" train --no-such-flag
row "unknown subcommand" trian
row "impossible size: batch 0" train --batch 0
row "impossible size: bad batch list" bench --batch 1,x
row "impossible size: hash bits" convert --weights "$W" --hash-bits 100 --out "$T/c.safetensors"
row "non-finite learning rate" train --lr nan
row "learning rate that is 0 as a float" train --lr 1e-60
row "label smoothing >= 1" train --smoothing 1.5
row "bad latency factors" convert --weights "$W" --alpha 1,inf --out "$T/c.safetensors"
row "image that is not an image" route --weights "$W" "$T/text.png"
row "truncated PNG" route --weights "$W" "$T/cut.png"
row "image that does not exist" route --weights "$W" "$T/none.png"
row "image whose header claims 65535 x 65535" route --weights "$W" "$T/huge.png"
row "routing picture of a model without MoE layers" route --weights "$W"
row "output folder that does not exist" convert --weights "$W" --calib 8 --out "$T/no/such/dir/c.safetensors"
row "unwritable output folder" train --epochs 1 --train-limit 64 --out /proc/sav
