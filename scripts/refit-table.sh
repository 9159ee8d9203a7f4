#!/usr/bin/env bash
# The refit quality table (METHODS.md §9) on SmolLM2-135M-Instruct: the 40%
# masks of RKU and Wanda-Struct (statistics: 128 Wikipedia windows of 128
# tokens, both objectives, as scripts/main-job.sh), each exported zeroed,
# refitted with target `layer` and with target `residual` (refit windows:
# 32 Wikipedia passages of 128 tokens), held-out perplexity on 64 windows
# of 128 tokens of the OpenWebText passages. Prints a markdown table and
# each refit's time split (layer passes vs solves, from pruning.json).
#
# Knobs (environment): SPARSITY (0.4), METHODS ("rku wanda-struct"),
# REFIT_SAMPLES (32), PPL_WINDOWS (64), BACKEND (cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
SPARSITY=${SPARSITY:-0.4}
METHODS=${METHODS:-rku wanda-struct}
REFIT_SAMPLES=${REFIT_SAMPLES:-32}
PPL_WINDOWS=${PPL_WINDOWS:-64}
BACKEND=${BACKEND:-cpu}

cargo build --release --bin rku-engine
BIN=target/release/rku-engine
bash scripts/fetch-assets.sh --import "$BIN"
MODEL=assets/models/smollm2
OUT=out/refit-table
mkdir -p "$OUT"
STATS="$OUT/stats-n128-t128.safetensors"
if [ ! -f "$STATS" ]; then
  "$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl --field 0 \
    --samples 128 --seq-len 128 --objective both --backend "$BACKEND" --out "$STATS"
fi
ppl() {
  "$BIN" eval ppl --model "$1" --text assets/text/owt.jsonl --field 0 --seq-len 128 \
    --max-windows "$PPL_WINDOWS" --backend "$BACKEND" --json | tail -n 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["ppl"])'
}
REFIT=(--refit-calib assets/text/wikipedia.jsonl --field 0 --samples "$REFIT_SAMPLES" --seq-len 128)
rows=()
dense=$(ppl "$MODEL")
for method in $METHODS; do
  row="$method"
  for variant in zeroed layer residual; do
    dir="$OUT/$method-$SPARSITY-$variant"
    extra=()
    [ "$variant" = zeroed ] || extra=(--refit "$variant" "${REFIT[@]}")
    "$BIN" prune --model "$MODEL" --stats "$STATS" --method "$method" --sparsity "$SPARSITY" \
      --backend "$BACKEND" "${extra[@]}" --out "$dir" --force
    row="$row $(ppl "$dir")"
  done
  rows+=("$row")
done

python3 - "$dense" "$OUT" "$SPARSITY" "${rows[@]}" <<'PY'
import json, sys
dense, out, sparsity, rows = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
print(f"\nSmolLM2-135M-Instruct, {float(sparsity):.0%} of FFN channels; dense perplexity {dense:.1f}")
print("| mask | zeroed | refit, target `layer` | refit, target `residual` |")
print("|---|---|---|---|")
for r in rows:
    method, *ppls = r.split()
    cells = " | ".join(f"{float(p):.1f} ({float(p) / dense:.2f}x dense)" for p in ppls)
    print(f"| {method} | {cells} |")
print()
for r in rows:
    method = r.split()[0]
    for variant in ["layer", "residual"]:
        rec = json.load(open(f"{out}/{method}-{sparsity}-{variant}/pruning.json"))["refit"]
        t = rec["time_s"]
        kept = sum(1 for l in rec["layers"] if l["refitted"])
        print(f"{method} refit {variant}: layer passes {t['passes_s']:.1f} s, normal equations "
              f"{t['products_s']:.1f} s, solves {t['solves_s']:.1f} s, "
              f"{kept}/{len(rec['layers'])} layers refitted")
PY
