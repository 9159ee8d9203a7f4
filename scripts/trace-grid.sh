#!/usr/bin/env bash
# The trace-calibration grid of METHODS.md §11 as one resumable `report`:
# RKU, Wanda-Struct and Taylor at 20/30/40% of FFN channels, each masked
# from Wikipedia windows and from the model's own GSM-symbolic traces on
# calibration prompts (--tokens generated, --select "length-band 25,75"),
# evaluated by trace perplexity on the dense model's greedy traces for
# held-out evaluation problems (generated tokens only) and by held-out
# OpenWebText perplexity; with GEN=1 also GSM-symbolic accuracy (chat,
# 0-shot, 256 new tokens, the first GEN_LIMIT problems). Then progressive
# RKU (`prune --progressive` over the same sparsities, each step's model
# answering the same calibration prompts) with the same evaluations.
# With REFIT=1 (default) every mask is also refitted (target `layer`,
# METHODS.md §9) on the data of its calibration: rows `+refit`.
#
# SmolLM2 (the default; 0% GSM accuracy dense) is measured by trace
# perplexity; the reasoning model is MODEL=assets/models/qwen-coder GEN=1
# (bash scripts/fetch-assets.sh --qwen --import BIN first; hours on 2 cores).
# Everything lands in $OUT (report.md, report.json, plots/); a rerun skips
# what is done. The calibration prompts (generator seeds 1000000+) never
# equal an evaluation problem (scripts/make-eval-data.py, tests/traces.rs).
#
# Knobs (environment): MODEL (assets/models/smollm2), OUT
# (out/trace-grid-<model>), CALIB_PROMPTS (64), HELD_OUT (32),
# MAX_NEW (128), METHODS (rku,wanda-struct,taylor), SPARSITIES
# (0.2,0.3,0.4), REFIT (1), GEN (0), GEN_LIMIT (100), PROGRESSIVE (1; 0
# stops after the report), BIN (target/release/rku-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-assets/models/smollm2}
OUT=${OUT:-out/trace-grid-$(basename "$MODEL")}
CALIB_PROMPTS=${CALIB_PROMPTS:-64}
HELD_OUT=${HELD_OUT:-32}
MAX_NEW=${MAX_NEW:-128}
METHODS=${METHODS:-rku,wanda-struct,taylor}
SPARSITIES=${SPARSITIES:-0.2,0.3,0.4}
REFIT=${REFIT:-1}
GEN=${GEN:-0}
GEN_LIMIT=${GEN_LIMIT:-100}
BIN=${BIN:-target/release/rku-engine}
[ -x "$BIN" ] || cargo build --release --bin rku-engine
mkdir -p "$OUT"
# The dense model's greedy traces: calibration prompts and held-out problems
# (resumable: a rerun appends only missing records).
"$BIN" traces --model "$MODEL" --prompts assets/eval/gsm_symbolic_calibration.jsonl --chat \
  --limit "$CALIB_PROMPTS" --max-new-tokens "$MAX_NEW" --batch 8 --out "$OUT/calib-traces.jsonl"
"$BIN" traces --model "$MODEL" --prompts assets/eval/gsm_symbolic.jsonl --chat \
  --limit "$HELD_OUT" --max-new-tokens "$MAX_NEW" --batch 8 --out "$OUT/heldout-traces.jsonl"
gen=()
refit=()
[ "$REFIT" = 1 ] && refit=(--refit layer)
[ "$GEN" = 1 ] && gen=(--gen-data assets/eval/gsm_symbolic.jsonl --gen-chat --gen-shots 0
  --gen-max-new-tokens 256 --limit "$GEN_LIMIT")
"$BIN" report --model "$MODEL" \
  --calib assets/text/wikipedia.jsonl --field 0 --samples 32 --seq-len 128 \
  --traces "$OUT/calib-traces.jsonl" --traces-tokens generated --traces-select "length-band 25,75" \
  --trace-ppl "$OUT/heldout-traces.jsonl" --trace-ppl-tokens generated \
  --ppl-text assets/text/owt.jsonl --ppl-field 0 --ppl-seq-len 128 --ppl-max-windows 64 \
  "${gen[@]}" "${refit[@]}" --methods "$METHODS" --sparsity "$SPARSITIES" --no-prefill --out "$OUT/report"
[ "${PROGRESSIVE:-1}" = 1 ] || { sed -n '/^## Quality/,/^## Size/p' "$OUT/report/report.md" | sed '$d'; exit 0; }
# Progressive RKU: one model per step, each evaluated as the report's rows.
PROG="$OUT/progressive-rku"
"$BIN" prune --model "$MODEL" --progressive "$SPARSITIES" \
  --trace-prompts assets/eval/gsm_symbolic_calibration.jsonl --chat --limit "$CALIB_PROMPTS" \
  --max-new-tokens "$MAX_NEW" --tokens generated --select "length-band 25,75" \
  --method rku --out "$PROG"
sed -n '/^## Quality/,/^## Size/p' "$OUT/report/report.md" | sed '$d'
echo "Progressive RKU (trace-calibrated, traces regenerated at every step):"
mkdir -p "$OUT/progressive-eval"
echo "| step | ppl | trace ppl | gen acc |"
echo "|---|---|---|---|"
for dir in "$PROG"/step-*-s*/; do
  dir=${dir%/}
  res="$OUT/progressive-eval/$(basename "$dir").txt"
  BIN=$BIN GEN=$GEN GEN_LIMIT=$GEN_LIMIT bash scripts/eval-row.sh "$dir" "$OUT/heldout-traces.jsonl" "$res"
  read -r p t g < "$res"
  printf '| %s | %.2f | %.3f | %s |\n' "$(basename "$dir")" "$p" "$t" "$g"
done
