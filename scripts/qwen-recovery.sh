#!/usr/bin/env bash
# The recovery levers (METHODS.md §9–10) on Qwen2.5-Coder-0.5B-Instruct at
# SPARSITY (default 20%), from the trace grid's statistics and traces (run first:
# MODEL=assets/models/qwen-coder GEN=1 bash scripts/trace-grid.sh):
#   - the refit (target `layer`) on REFIT_SAMPLES Wikipedia windows of 128
#     (default 128: 16,384 rows, more than three per kept channel of the
#     widest layer), of the text- and of the trace-calibrated METHOD mask;
#   - LoRA-KD of the trace-calibrated METHOD model from the dense one on the
#     grid's calibration traces (every position, at most 256 tokens), STEPS
#     steps at batch BATCH, the issue's rank 8, lr 2e-4, alpha 16; with
#     KD_PROMPTS=N (more than the grid's CALIB_PROMPTS) on the dense model's
#     greedy traces for the first N calibration prompts instead, the grid's
#     (or the largest smaller $OUT/kd-traces-M.jsonl) extended by the same
#     `traces` settings (chat, MAX_NEW new tokens) into $OUT/kd-traces-N.jsonl,
#     rows `-kdN-<steps>`; with MAX_NEW other than the grid's 128 as well,
#     fresh traces (nothing to extend) in $OUT/kd-traces-N-newMAX_NEW.jsonl,
#     rows `-kdN-newMAX_NEW-<steps>`, trained on at most KD_SEQ tokens;
# each row evaluated as the grid's: held-out OpenWebText perplexity (64 ×
# 128), trace perplexity of the dense model's held-out answers (generated
# tokens) and, with GEN=1 (default), GSM-symbolic accuracy on the first 100
# evaluation problems (chat, 0-shot, 256 new tokens, batch 8).
# Resumable: a model directory or a result line already there is kept, and
# an interrupted `recover` resumes from its checkpoint, and a larger STEPS
# continues the same training from it (STEPS=50, then STEPS=100).
# Knobs (environment): METHOD (rku; taylor needs the grid's ce pass,
# METHODS=rku,wanda-struct,taylor), SPARSITY (0.2), GRID (out/trace-grid-qwen-coder),
# OUT (out/qwen-recovery), REFIT (1; 0 skips both refit rows),
# REFIT_SAMPLES (128), STEPS (50), BATCH (4), KD_PROMPTS (the grid's traces),
# MAX_NEW (128, the grid's), KD_SEQ (256: prompt and trace tokens per KD
# sequence; the prompts have up to 181), GEN (1), BIN (target/release/rku-engine).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=assets/models/qwen-coder
METHOD=${METHOD:-rku}
SPARSITY=${SPARSITY:-0.2}
REFIT=${REFIT:-1}
GRID=${GRID:-out/trace-grid-qwen-coder}
OUT=${OUT:-out/qwen-recovery}
REFIT_SAMPLES=${REFIT_SAMPLES:-128}
STEPS=${STEPS:-50}
BATCH=${BATCH:-4}
KD_PROMPTS=${KD_PROMPTS:-}
MAX_NEW=${MAX_NEW:-128}
KD_SEQ=${KD_SEQ:-256}
GEN=${GEN:-1}
BIN=${BIN:-target/release/rku-engine}
[ -x "$BIN" ] || cargo build --release --bin rku-engine
for f in "$GRID/report/stats.safetensors" "$GRID/report/stats@traces.safetensors" \
  "$GRID/calib-traces.jsonl" "$GRID/heldout-traces.jsonl"; do
  [ -f "$f" ] || { echo "missing $f: run scripts/trace-grid.sh on $MODEL first" >&2; exit 1; }
done
mkdir -p "$OUT"
refit=(--refit layer --refit-calib assets/text/wikipedia.jsonl --field 0
  --samples "$REFIT_SAMPLES" --seq-len 128)
prune() { # name stats [args...]
  local name=$1 stats=$2; shift 2
  [ -d "$OUT/$name" ] || "$BIN" prune --model "$MODEL" --stats "$stats" --method "$METHOD" \
    --sparsity "$SPARSITY" "$@" --out "$OUT/$name"
}
cut="$METHOD-$SPARSITY"
kd_traces="$GRID/calib-traces.jsonl"
kd="$cut-traces-kd"
ckpt="$OUT/$cut-traces-kd.ckpt.safetensors"
if [ -n "$KD_PROMPTS" ]; then
  grid_traces=$(wc -l < "$GRID/calib-traces.jsonl")
  [[ "$KD_PROMPTS" =~ ^[0-9]+$ ]] && [ "$KD_PROMPTS" -gt "$grid_traces" ] || {
    echo "KD_PROMPTS=$KD_PROMPTS: give a count above the grid's $grid_traces traces" >&2; exit 2; }
  # Resuming a copy of the grid's traces, or of the largest smaller
  # $OUT/kd-traces-M<tag>.jsonl (the same prompts' first M, the same MAX_NEW),
  # with a larger --limit generates only the prompts it lacks (`traces`
  # refuses a file written with other settings).
  tag=""
  [ "$MAX_NEW" = 128 ] || tag="-new$MAX_NEW"
  kd_traces="$OUT/kd-traces-$KD_PROMPTS$tag.jsonl"
  kd="$cut-traces-kd$KD_PROMPTS$tag-"
  ckpt="$OUT/$cut-traces-kd$KD_PROMPTS$tag.ckpt.safetensors"
  if [ ! -f "$kd_traces" ]; then
    seed="" seed_n=0
    [ -n "$tag" ] || seed="$GRID/calib-traces.jsonl"
    for f in "$OUT"/kd-traces-*"$tag".jsonl; do
      m=${f##*/kd-traces-} m=${m%"$tag".jsonl}
      if [[ "$m" =~ ^[0-9]+$ ]] && [ "$m" -lt "$KD_PROMPTS" ] && [ "$m" -gt "$seed_n" ]; then
        seed=$f seed_n=$m
      fi
    done
    if [ -n "$seed" ]; then # an exclusive temporary name, renamed
      tmp=$(mktemp "$kd_traces.XXXXXX") && cp "$seed" "$tmp" && mv "$tmp" "$kd_traces"
    fi
  fi
  "$BIN" traces --model "$MODEL" --prompts assets/eval/gsm_symbolic_calibration.jsonl --chat \
    --limit "$KD_PROMPTS" --max-new-tokens "$MAX_NEW" --batch 8 --out "$kd_traces"
fi
rows=("$kd$STEPS")
prune "$cut-traces" "$GRID/report/stats@traces.safetensors"
if [ "$REFIT" = 1 ]; then
  rows+=("$cut-text-refit$REFIT_SAMPLES" "$cut-traces-refit$REFIT_SAMPLES")
  prune "$cut-text-refit$REFIT_SAMPLES" "$GRID/report/stats.safetensors" "${refit[@]}"
  prune "$cut-traces-refit$REFIT_SAMPLES" "$GRID/report/stats@traces.safetensors" "${refit[@]}"
fi
[ -d "$OUT/${rows[0]}" ] || "$BIN" recover --model "$OUT/$cut-traces" --teacher "$MODEL" \
  --traces "$kd_traces" --tokens all --max-seq-len "$KD_SEQ" --steps "$STEPS" \
  --batch "$BATCH" --save-every 5 --checkpoint "$ckpt" --resume --out "$OUT/${rows[0]}"
echo "| model | ppl | trace ppl | GSM-symbolic accuracy |"
echo "|---|---|---|---|"
# The masks as cut (e.g. rku-s0.2, rku-s0.2@traces) are rows of the grid's report.md.
for name in "${rows[@]}"; do
  res="$OUT/$name.txt"
  BIN=$BIN GEN=$GEN GEN_LIMIT=100 bash scripts/eval-row.sh "$OUT/$name" "$GRID/heldout-traces.jsonl" "$res"
  read -r p t g < "$res"
  printf '| %s | %.2f | %.3f | %s |\n' "$name" "$p" "$t" "$g"
done
