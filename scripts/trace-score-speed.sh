#!/usr/bin/env bash
# Scoring speed over variable-length traces against fixed windows with the
# same number of tokens (issue #11's target: within 10%), measured in one
# run: `score --traces TRACES` (every trace its own length, only equal
# lengths batched, no padding), then `score --calib` over N windows of T
# tokens of Wikipedia, T = the traces' mean length and N·T = their total.
# Both runs print "scored X tokens ... Y tokens/s"; the script prints the
# ratio. REPEATS alternating pairs (2) smooth out a shared machine.
#
# Usage: bash scripts/trace-score-speed.sh [TRACES] (default: the SmolLM2
# calibration traces of scripts/trace-grid.sh). Knobs: MODEL
# (assets/models/smollm2), OBJECTIVE (energy), BIN (target/release/rku-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
TRACES=${1:-out/trace-grid-smollm2/calib-traces.jsonl}
MODEL=${MODEL:-assets/models/smollm2}
OBJECTIVE=${OBJECTIVE:-energy}
REPEATS=${REPEATS:-2}
BIN=${BIN:-target/release/rku-engine}
[ -x "$BIN" ] || cargo build --release --bin rku-engine
[ -f "$TRACES" ] || { echo "no traces file $TRACES (run scripts/trace-grid.sh)" >&2; exit 1; }
read -r N T TOTAL < <(python3 -c '
import json, sys
lens = [r["prompt_tokens"] + r["generated_tokens"] for r in map(json.loads, open(sys.argv[1]))]
t = round(sum(lens) / len(lens)); print(sum(lens) // t, t, sum(lens))' "$TRACES")
echo "traces: $TOTAL tokens in $(wc -l < "$TRACES") traces; windows: $N x $T"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rate() { sed -n 's/.* \([0-9.]*\) tokens\/s$/\1/p' | tail -n 1; }
for i in $(seq "$REPEATS"); do
  tr=$("$BIN" score --model "$MODEL" --traces "$TRACES" --objective "$OBJECTIVE" \
    --out "$tmp/t$i.safetensors" 2>&1 | rate)
  win=$("$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl --field 0 \
    --samples "$N" --seq-len "$T" --objective "$OBJECTIVE" --out "$tmp/w$i.safetensors" 2>&1 | rate)
  python3 -c 'import sys; t, w = float(sys.argv[1]), float(sys.argv[2]); print(f"pair {sys.argv[3]}: traces {t:.0f} tok/s, windows {w:.0f} tok/s, ratio {t / w:.3f}")' "$tr" "$win" "$i"
done
