#!/usr/bin/env bash
# The main job, end to end on a fresh machine: fetch and import
# SmolLM2-135M-Instruct, score its FFN channels on the Wikipedia passages,
# prune 40% of them with RKU, and print dense vs pruned perplexity on the
# held-out OpenWebText passages with parameter counts.
#
# Knobs (environment): SAMPLES (128), SEQ_LEN (128), SPARSITY (0.4),
# METHOD (rku), PPL_WINDOWS (200 windows of 128 tokens; "all" for the whole text).
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${SAMPLES:-128}
SEQ_LEN=${SEQ_LEN:-128}
SPARSITY=${SPARSITY:-0.4}
METHOD=${METHOD:-rku}
PPL_WINDOWS=${PPL_WINDOWS:-200}

cargo build --release --bin rku-engine
BIN=target/release/rku-engine
bash scripts/fetch-assets.sh --import "$BIN"

MODEL=assets/models/smollm2
OUT=out/main-job
mkdir -p "$OUT"
STATS="$OUT/stats-n${SAMPLES}-t${SEQ_LEN}.safetensors"
if [ ! -f "$STATS" ]; then
  "$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl --field 0 \
    --samples "$SAMPLES" --seq-len "$SEQ_LEN" --objective both --out "$STATS"
fi
PRUNED="$OUT/smollm2-$METHOD-$SPARSITY"
"$BIN" prune --model "$MODEL" --stats "$STATS" --method "$METHOD" --sparsity "$SPARSITY" \
  --out "$PRUNED" --force

win=()
[ "$PPL_WINDOWS" = all ] || win=(--max-windows "$PPL_WINDOWS")
dense=$("$BIN" eval ppl --model "$MODEL" --text assets/text/owt.jsonl --field 0 "${win[@]}" --json | tail -n 1)
pruned=$("$BIN" eval ppl --model "$PRUNED" --text assets/text/owt.jsonl --field 0 "${win[@]}" --json | tail -n 1)

python3 - "$dense" "$pruned" "$PRUNED/pruning.json" "$METHOD" <<'PY'
import json, sys
dense, pruned, rec = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.load(open(sys.argv[3]))
print()
print(f"SmolLM2-135M-Instruct, held-out OpenWebText passages, {dense['windows']} windows of {dense['seq_len']} tokens")
print(f"{'model':<28}{'params':>14}{'perplexity':>12}")
print(f"{'dense':<28}{rec['params_before']:>14,}{dense['ppl']:>12.3f}")
name = f"{sys.argv[4]} {rec['sparsity']:.0%} FFN channels"
print(f"{name:<28}{rec['params_after']:>14,}{pruned['ppl']:>12.3f}")
print(f"parameters removed: {rec['params_removed_fraction']:.1%}")
PY
