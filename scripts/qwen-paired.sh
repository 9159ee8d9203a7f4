#!/usr/bin/env bash
# Pruned models against the dense one on the same GSM-symbolic problems,
# problem by problem (`eval paired`, METHODS.md section 8): per-problem
# records of the dense model and of each NAME=DIR on evaluation problems
# [SKIP, SKIP + N) (chat, 0-shot, 256 new tokens, batch 8, as the trace
# grid and scripts/qwen-recovery.sh evaluate), then each against the dense
# model: the 2x2 table, McNemar's exact p and paired bootstrap intervals of
# the accuracy ratio and difference. A table goes to stdout.
#   bash scripts/qwen-paired.sh taylor-0.4-kd=out/qwen-recovery/taylor-0.4-traces-kd128-new256-150
# Knobs (environment): N (200), SKIP (0), OUT (out/paired), DENSE
# (assets/models/qwen-coder), BIN (target/release/rku-engine).
# Resumable: a record file already there is kept (slices made apart with
# --skip can be joined by concatenating them into OUT/NAME.jsonl first).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
SKIP=${SKIP:-0}
OUT=${OUT:-out/paired}
DENSE=${DENSE:-assets/models/qwen-coder}
BIN=${BIN:-target/release/rku-engine}
[ $# -ge 1 ] || { echo "usage: $0 NAME=MODEL_DIR ..." >&2; exit 2; }
for v in "$N" "$SKIP"; do
  [[ "$v" =~ ^[0-9]+$ ]] || { echo "N and SKIP must be whole numbers (got $v)" >&2; exit 2; }
done
[ -x "$BIN" ] || cargo build --release --bin rku-engine
mkdir -p "$OUT"
records() { # name model_dir (an `if`, not `||`, so that set -e stops on a failed run)
  if [ ! -f "$OUT/$1.jsonl" ]; then
    "$BIN" eval gen --model "$2" --data assets/eval/gsm_symbolic.jsonl \
      --chat --shots 0 --max-new-tokens 256 --skip "$SKIP" --limit "$N" --batch 8 \
      --out "$OUT/$1.jsonl" --json > "$OUT/$1.summary"
  fi
}
records dense "$DENSE"
echo "| model | solved | dense solved | only pruned / only dense | McNemar p | ratio to dense [paired 95%] |"
echo "|---|---|---|---|---|---|"
for arg in "$@"; do
  name=${arg%%=*} dir=${arg#*=}
  [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] && [ "$name" != dense ] && [ "$name" != "$arg" ] && [ -d "$dir" ] || {
    echo "$arg: give NAME=MODEL_DIR (NAME of letters, digits, . _ -, not dense) with an existing directory" >&2; exit 2; }
  records "$name" "$dir"
  "$BIN" eval paired --candidate "$OUT/$name.jsonl" --baseline "$OUT/dense.jsonl" --json \
    | tail -n 1 > "$OUT/$name-vs-dense.json"
  python3 - "$name" "$OUT/$name-vs-dense.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
ci = r["ratio_ci95"]
ratio = "undefined" if r["ratio"] is None else f"{r['ratio']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
print(f"| {sys.argv[1]} | {r['candidate']['correct']} of {r['n']} | {r['baseline']['correct']} "
      f"| {r['only_candidate']} / {r['only_baseline']} | {r['mcnemar_p']:.3f} | {ratio} |")
PY
done
