#!/usr/bin/env bash
# The README's quality table: SmolLM2-135M-Instruct calibrated on N=128
# windows of T=128 tokens of the Wikipedia passages (one statistics pass),
# pruned by every method at 30/40/50% of FFN channels, held-out perplexity
# on the OpenWebText passages (seq-len 128, the first PPL_WINDOWS windows).
# Prints a markdown table; results land in out/quality/.
#
# MODEL=gemma3-270m runs the same table on Gemma 3 270M (fetched and
# imported with fetch-assets.sh --gemma; results in out/quality-gemma3-270m/);
# Gemma's calibration and perplexity windows start with BOS (its default).
set -euo pipefail
cd "$(dirname "$0")/.."
PPL_WINDOWS=${PPL_WINDOWS:-200}
NAME=${MODEL:-smollm2}
cargo build --release --bin rku-engine
BIN=target/release/rku-engine
case $NAME in
  smollm2) bash scripts/fetch-assets.sh --import "$BIN"; OUT=out/quality
    STATS=out/main-job/stats-n128-t128.safetensors ;;
  gemma3-270m) bash scripts/fetch-assets.sh --gemma --import "$BIN"; OUT=out/quality-$NAME
    STATS=$OUT/stats-n128-t128.safetensors ;;
  *) echo "MODEL must be smollm2 or gemma3-270m" >&2; exit 2 ;;
esac
MODEL=assets/models/$NAME
mkdir -p "$OUT"
if [ ! -f "$STATS" ]; then
  mkdir -p "$(dirname "$STATS")"
  "$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl --field 0 \
    --samples 128 --seq-len 128 --objective both --out "$STATS"
fi
ppl() { # model dir, result file: held-out perplexity as one JSON line (kept across reruns)
  if [ ! -f "$2" ]; then
    "$BIN" eval ppl --model "$1" --text assets/text/owt.jsonl --field 0 \
      --max-windows "$PPL_WINDOWS" --json | tail -n 1 > "$2.tmp"
    mv "$2.tmp" "$2"
  fi
}
mkdir -p "$OUT/dense"
ppl "$MODEL" "$OUT/dense/ppl-w$PPL_WINDOWS.json"
for m in rku agf wanda-struct flap taylor rku-fisher; do
  if [ ! -d "$OUT/$m/$m-s0.5" ]; then
    "$BIN" prune --model "$MODEL" --stats "$STATS" --method "$m" --sparsity 0.3,0.4,0.5 --out "$OUT/$m" --force
  fi
  for s in 0.3 0.4 0.5; do ppl "$OUT/$m/$m-s$s" "$OUT/$m/$m-s$s/ppl-w$PPL_WINDOWS.json"; done
done
python3 - "$OUT" "$PPL_WINDOWS" <<'PY'
import json, sys, pathlib
out, w = pathlib.Path(sys.argv[1]), sys.argv[2]
dense = json.loads((out / "dense" / f"ppl-w{w}.json").read_text())
bos = "with BOS" if dense.get("bos") else "without BOS"
print(f"Held-out perplexity (OpenWebText passages, {dense['windows']} windows of {dense['seq_len']} tokens, {bos}); dense {dense['ppl']:.2f}\n")
print("| method | allocation | 30% | 40% | 50% | params at 50% |")
print("|---|---|---|---|---|---|")
for m in ["rku", "agf", "wanda-struct", "flap", "taylor", "rku-fisher"]:
    cells, alloc, params = [], "", ""
    for s in ["0.3", "0.4", "0.5"]:
        d = out / m / f"{m}-s{s}"
        r = json.loads((d / f"ppl-w{w}.json").read_text())
        rec = json.loads((d / "pruning.json").read_text())
        cells.append(f"{r['ppl']:.2f}")
        alloc, params = rec["allocation"], f"{rec['params_after']/1e6:.1f}M of {rec['params_before']/1e6:.1f}M"
    print(f"| {m} | {alloc} | " + " | ".join(cells) + f" | {params} |")
PY
