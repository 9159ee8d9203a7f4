#!/usr/bin/env bash
# Scores a model's FFN channels as a Slurm array of N shards, then merges,
# prunes and evaluates in one job that waits for all of them (afterok).
#
#   bash scripts/slurm/submit.sh --shards N --bin BIN --model DIR --calib FILE \
#     --heldout FILE --out DIR [--score-args "..."] [--prune-args "..."] \
#     [--ppl-args "..."] [--sbatch-args "..."]
#
# --score-args go to every `score` (e.g. "--field 0 --samples 128 --seq-len 128"),
# --prune-args to `prune` (default "--method rku --sparsity 0.4"), --ppl-args
# to `eval ppl` (e.g. "--field 0 --max-windows 200"), --sbatch-args to both
# sbatch calls (partition, account, time, GPUs). Prints the two job ids.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shards= bin= model= calib= heldout= out= score_args= prune_args= ppl_args= sbatch_args=
while [ $# -gt 0 ]; do
  case $1 in
    --shards) shards=$2 ;; --bin) bin=$2 ;; --model) model=$2 ;; --calib) calib=$2 ;;
    --heldout) heldout=$2 ;; --out) out=$2 ;; --score-args) score_args=$2 ;;
    --prune-args) prune_args=$2 ;; --ppl-args) ppl_args=$2 ;; --sbatch-args) sbatch_args=$2 ;;
    *) echo "unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
for v in shards bin model calib heldout out; do
  [ -n "${!v}" ] || { echo "--$v is required (see the header of $0)" >&2; exit 2; }
done
case $shards in ''|*[!0-9]*|0) echo "--shards must be a positive integer" >&2; exit 2 ;; esac
mkdir -p "$out"
abs() { (cd "$(dirname "$1")" && echo "$PWD/$(basename "$1")"); }
export RKU_BIN=$(abs "$bin") RKU_MODEL=$(abs "$model") RKU_CALIB=$(abs "$calib") \
  RKU_HELDOUT=$(abs "$heldout") RKU_OUT=$(abs "$out") RKU_SCORE_ARGS=$score_args \
  RKU_PRUNE_ARGS=${prune_args:---method rku --sparsity 0.4} RKU_PPL_ARGS=$ppl_args
read -r -a extra <<< "$sbatch_args"
score=$(sbatch --parsable --export=ALL "${extra[@]}" --array="0-$((shards - 1))" \
  --output="$RKU_OUT/score-%a.log" "$here/score-shard.sbatch")
merge=$(sbatch --parsable --export=ALL "${extra[@]}" --dependency="afterok:${score%%;*}" \
  --output="$RKU_OUT/merge-prune.log" "$here/merge-prune.sbatch")
echo "score array job ${score%%;*} ($shards shards), merge-prune job ${merge%%;*}"
