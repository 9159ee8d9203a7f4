#!/usr/bin/env bash
# One pruned model's row as the trace grid evaluates it (scripts/trace-grid.sh,
# scripts/qwen-recovery.sh): held-out OpenWebText perplexity (64 windows of
# 128), trace perplexity of the dense model's held-out answers HELDOUT
# (generated tokens only) and, with GEN=1, GSM-symbolic accuracy on the first
# GEN_LIMIT evaluation problems (chat, 0-shot, 256 new tokens, batch 8).
# Writes "ppl trace_ppl accuracy" (accuracy "—" without GEN) to RESULT through
# a temporary name; a RESULT already there is kept (reruns resume).
#   BIN=target/release/rku-engine GEN=0 GEN_LIMIT=100 \
#     bash scripts/eval-row.sh MODEL_DIR HELDOUT RESULT
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 3 ] || { echo "usage: $0 MODEL_DIR HELDOUT_TRACES RESULT" >&2; exit 2; }
dir=$1 heldout=$2 res=$3
BIN=${BIN:-target/release/rku-engine}
[ -f "$res" ] && exit 0
value() { # key command...: that field of the command's JSON line
  local key=$1; shift
  "$@" --json | tail -n 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$key"
}
p=$(value ppl "$BIN" eval ppl --model "$dir" --text assets/text/owt.jsonl --field 0 \
  --seq-len 128 --max-windows 64)
t=$(value ppl "$BIN" eval ppl --model "$dir" --traces "$heldout" --tokens generated)
g="—"
[ "${GEN:-0}" = 1 ] && g=$(value accuracy "$BIN" eval gen --model "$dir" \
  --data assets/eval/gsm_symbolic.jsonl --chat --shots 0 --max-new-tokens 256 \
  --limit "${GEN_LIMIT:-100}" --batch 8)
echo "$p $t $g" > "$res.tmp" && mv "$res.tmp" "$res"
