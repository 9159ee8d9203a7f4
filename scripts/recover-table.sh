#!/usr/bin/env bash
# The recovery quality table (METHODS.md §10) on SmolLM2-135M-Instruct at
# 40%: the masks of scripts/refit-table.sh (RKU and Wanda-Struct, zeroed,
# and RKU refitted with target `layer`), each recovered by LoRA-KD from the
# dense model with the issue's settings: 8 × 128-token Wikipedia windows
# per step in file order, rank 8, α 16, lr 2e-4, 10 warm-up steps, no
# gradient clipping. One run per cell, exported at each step count of
# STEPS (resumed from its checkpoint, so 150 continues the run that
# exported 50), held-out perplexity on 64 × 128 OpenWebText windows.
# Prints a markdown table: perplexity against steps, and each run's time.
#
# Knobs (environment): STEPS ("50 100 150"), CELLS ("rku-0.4-zeroed
# wanda-struct-0.4-zeroed rku-0.4-layer"), PPL_WINDOWS (64), BACKEND (cpu),
# LR (2e-4) and RANK (8; α stays 16): another learning rate or rank writes
# to out/recover-table-lrLR-rRANK, beside the issue's table.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-50 100 150}
CELLS=${CELLS:-rku-0.4-zeroed wanda-struct-0.4-zeroed rku-0.4-layer}
PPL_WINDOWS=${PPL_WINDOWS:-64}
BACKEND=${BACKEND:-cpu}
LR=${LR:-2e-4}
RANK=${RANK:-8}

[ -d out/refit-table/rku-0.4-layer ] || bash scripts/refit-table.sh
cargo build --release --bin rku-engine
BIN=target/release/rku-engine
MODEL=assets/models/smollm2
OUT=out/recover-table
[ "$LR-$RANK" = 2e-4-8 ] || OUT="$OUT-lr$LR-r$RANK"
mkdir -p "$OUT"
ppl() {
  "$BIN" eval ppl --model "$1" --text assets/text/owt.jsonl --field 0 --seq-len 128 \
    --max-windows "$PPL_WINDOWS" --backend "$BACKEND" --json | tail -n 1 |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["ppl"])'
}
echo "dense $(ppl "$MODEL")" > "$OUT/ppl.txt"
for cell in $CELLS; do
  echo "$cell 0 $(ppl "out/refit-table/$cell")" >> "$OUT/ppl.txt"
  for steps in $STEPS; do
    dir="$OUT/$cell-lora$steps"
    if [ ! -d "$dir" ]; then
      "$BIN" recover --model "out/refit-table/$cell" --teacher "$MODEL" \
        --data assets/text/wikipedia.jsonl --field 0 --seq-len 128 --batch 8 \
        --steps "$steps" --lora-rank "$RANK" --lora-alpha 16 --lr "$LR" --warmup 10 \
        --max-grad-norm 0 --checkpoint "$OUT/$cell.checkpoint.safetensors" --resume \
        --backend "$BACKEND" --out "$dir"
    fi
    echo "$cell $steps $(ppl "$dir")" >> "$OUT/ppl.txt"
  done
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [l.split() for l in open(f"{out}/ppl.txt")]
dense = float(rows[0][1])
cells, steps = {}, []
for cell, s, p in rows[1:]:
    cells.setdefault(cell, {})[int(s)] = float(p)
    if int(s) not in steps:
        steps.append(int(s))
print(f"\nSmolLM2-135M-Instruct, 40% of FFN channels ({out}); dense perplexity {dense:.1f}")
print("| cell | " + " | ".join("pruned" if s == 0 else f"LoRA-KD {s} steps" for s in steps) + " |")
print("|---" * (len(steps) + 1) + "|")
for cell, by in cells.items():
    print(f"| {cell} | " + " | ".join(f"{by[s]:.1f} ({by[s] / dense:.2f}x)" for s in steps) + " |")
print()
for cell in cells:
    for s in steps[1:]:
        r = json.load(open(f"{out}/{cell}-lora{s}/pruning.json"))["recovery"]
        trained = s - (r["resumed_from_step"] or 0)
        print(f"{cell} to step {s}: {trained} steps in {r['train_s']:.0f} s "
              f"({r['train_s'] / trained:.2f} s/step), last loss {r['losses'][-1]:.4f}")
PY
