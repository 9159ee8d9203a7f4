#!/usr/bin/env bash
# GSM-symbolic accuracy of Qwen2.5-Coder-0.5B-Instruct (docs/DATA.md), dense
# and pruned with RKU at 20% and 40% of FFN channels, each zeroed and
# refitted (METHODS.md §9, target `layer`): chat template, 0-shot, 256 new
# tokens, the first LIMIT problems of assets/eval/gsm_symbolic.jsonl. Each
# result is kept under out/qwen-refit-gsm/ (a rerun skips it; delete the
# directory after changing LIMIT).
# Statistics and refit on 32 Wikipedia windows of 128 tokens (never the
# evaluation problems). Prints a markdown table.
#
# Knobs (environment): LIMIT (24), SPARSITIES ("0.2 0.4"), BIN (target/release/rku-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-24}
SPARSITIES=${SPARSITIES:-0.2 0.4}
BIN=${BIN:-target/release/rku-engine}
[ -x "$BIN" ] || cargo build --release --bin rku-engine
bash scripts/fetch-assets.sh --qwen --import "$BIN"
MODEL=assets/models/qwen-coder
OUT=out/qwen-refit-gsm
mkdir -p "$OUT"
CALIB=(--field 0 --samples 32 --seq-len 128)
STATS="$OUT/stats-n32-t128.safetensors"
[ -f "$STATS" ] || "$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl "${CALIB[@]}" \
  --objective energy --out "$STATS"
gsm() { # model dir, name: the result is kept as $OUT/<name>.gsm.json
  local res="$OUT/$2.gsm.json"
  [ -f "$res" ] || "$BIN" eval gen --model "$1" --data assets/eval/gsm_symbolic.jsonl --shots 0 \
    --chat --max-new-tokens 256 --limit "$LIMIT" --batch 8 --json | tail -n 1 > "$res"
  python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(str(r["correct"]) + "/" + str(r["n"]))' "$res"
}
rows=("dense $(gsm "$MODEL" dense)")
for s in $SPARSITIES; do
  row="$s"
  for variant in zeroed refit; do
    dir="$OUT/rku-$s-$variant"
    extra=()
    [ "$variant" = zeroed ] || extra=(--refit --refit-calib assets/text/wikipedia.jsonl "${CALIB[@]}")
    "$BIN" prune --model "$MODEL" --stats "$STATS" --method rku --sparsity "$s" "${extra[@]}" \
      --out "$dir" --force
    row="$row $(gsm "$dir" "rku-$s-$variant")"
  done
  rows+=("$row")
done
echo
echo "Qwen2.5-Coder-0.5B-Instruct, GSM-symbolic (chat, 0-shot, 256 new tokens, first $LIMIT problems)"
echo "| model | zeroed | refit (\`layer\`) |"
echo "|---|---|---|"
for r in "${rows[@]}"; do
  set -- $r
  if [ "$1" = dense ]; then echo "| dense | $2 | |"; else echo "| RKU $1 | $2 | $3 |"; fi
done
