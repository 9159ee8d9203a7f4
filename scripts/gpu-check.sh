#!/usr/bin/env bash
# The CUDA backend on a real GPU: what CI (no GPU) cannot run.
#
#   bash scripts/gpu-check.sh BINDIR [OUTDIR]
#
# BINDIR holds binaries built elsewhere with nvcc (RKU_REQUIRE_NVCC=1):
# `rku-engine` and the test binaries `kernels_emu_*-*` (each kernel on the
# emulated device and then on the GPU, against the CPU backend). On the GPU
# machine only python3 with torch/transformers/safetensors is needed (to
# make a model with Qwen2.5-7B's layer shapes, scripts/make_synthetic_model.py).
# Steps:
#   1. the kernel tests on the GPU;
#   2. score (energy + ce) with --backend cuda, resident and --stream, against
#      --backend cpu, on the tiny fixture and on the synthetic 7B-shaped model:
#      statistics compared with the tolerance rule of tests/cuda_emu_model.rs;
#   3. perplexity (cuda vs cpu), greedy decoding speed (cpu, cuda) and the
#      CUDA backend's throughput at T = 2048 (bench forward/score, resident
#      and streamed); on the 7B-shaped model also transformers' bf16 forward
#      pass on the same GPU (scripts/bench_vs_torch.py --backend cuda): the
#      ratio tells a slow chip from slow kernels; then the SM clocks under
#      load and the forward pass's GPU time kernel by kernel
#      (scripts/gpu-profile.sh: nsys or ncu, where installed);
#   4. the refit (METHODS.md §9) with --backend cuda, resident and --stream,
#      from the cpu statistics: its time split (layer passes, normal
#      equations, solves) and the per-layer reconstruction errors against
#      the cpu refit's (the cpu refits run at the very end: on the
#      7B-shaped model they take minutes);
#   5. LoRA-KD recovery (METHODS.md §10): `bench recover` (one training step
#      at batch 8 × 256, cpu and cuda) and 4 steps of `recover` of the 40%
#      model from the dense one, cuda against cpu (each step's loss).
#   6. traces (METHODS.md §11): greedy traces cpu against cuda and seeded
#      sampled traces at batch 1 against 8 on tiny-qwen2 (how many are
#      identical), and batched decoding (batch 8) on the 7B-shaped model;
#   7. scale (METHODS.md §4): on the 4-layer 7B-shaped model, N=8 × T=2048,
#      resident scoring with --activation-memory 0 and auto, and streamed
#      scoring sequence-major and --layer-major (time, layer uploads,
#      statistics equal); then (BIG=1, default) a 28-layer 7B-shaped model
#      (made on the GPU): streamed layer-major scoring of BIG_N=128 × T=2048
#      (time, uploads), and
#      `bench prefill` at T=2048, dense against 50% RKU, uniform and global;
#      BIG_AFTER=S skips that part when the steps before took over S seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "$1")
OUT=${2:-/tmp/gpu-check}
mkdir -p "$OUT"
RKU="$BIN/rku-engine"
BIG_AFTER=${BIG_AFTER:-100000} BIG_N=${BIG_N:-128}
for knob in "BIG_AFTER=$BIG_AFTER" "BIG_N=$BIG_N"; do
    [[ "${knob#*=}" =~ ^[1-9][0-9]*$|^0$ ]] || { echo "gpu-check: $knob is not a whole number" >&2; exit 2; }
done

# A step's header, with the seconds since the start (what a lease has left).
step() {
    echo "== $* [${SECONDS} s]"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,mig.mode.current,clocks.sm,clocks.max.sm,power.limit --format=csv
# cuBLAS comes with the pip packages torch depends on; cudarc loads it at run time.
CUBLAS=$(dirname "$(find / -name 'libcublas.so.1[0-9]*' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH="$CUBLAS:${LD_LIBRARY_PATH:-}"
echo "cuBLAS from $CUBLAS"

step "1. kernel tests (emulated device, then the GPU)"
for t in "$BIN"/kernels_emu_*-*; do
    "$t" --test-threads 8 2>&1 | grep -Ev "^test .* ok$" || true
done

calib="$OUT/calib.txt"
python3 - "$calib" <<'EOF'
import sys
words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) + f" {i}." for i in range(600)]
open(sys.argv[1], "w").write("\n".join(lines))
EOF

# Compares two stats files: |got − want| ≤ rtol·(max|want| + |want|) per element.
compare() {
    python3 - "$1" "$2" "$3" <<'EOF'
import sys
from safetensors.numpy import load_file
want, got, rtol = load_file(sys.argv[1]), load_file(sys.argv[2]), float(sys.argv[3])
worst = 0.0
for k in sorted(want):
    w, g = want[k].astype("f8"), got[k].astype("f8")
    tol = rtol * (abs(w).max() + abs(w))
    r = (abs(g - w) / tol).max()
    worst = max(worst, r)
    if r > 1:
        print(f"  {k}: {r:.2f} of the tolerance")
print(f"  worst: {worst:.3f} of the tolerance (rtol {rtol})")
sys.exit(0 if worst <= 1 else 1)
EOF
}

score() { # model T backend out [extra...]
    local m=$1 t=$2 b=$3 o=$4
    shift 4
    /usr/bin/time -f "  $b $*: %e s, %M KiB peak RSS" \
        "$RKU" score --model "$m" --calib "$calib" --samples 4 --seq-len "$t" --batch 2 \
        --objective both --backend "$b" --out "$o" "$@" 2>&1 | grep -Ev "scoring:" || true
}

# The refit at 40% (METHODS.md §9) on one backend: its time split.
refit() { # model label T backend...
    local m=$1 l=$2 t=$3
    shift 3
    local run="$*"
    "$RKU" prune --model "$m" --stats "$OUT/$l-cpu.safetensors" --method rku --sparsity 0.4 \
        --refit --refit-calib "$calib" --samples 4 --seq-len "$t" --batch 2 --backend "$@" \
        --out "$OUT/$l-refit-${run// /}" --force 2>&1 | grep -E "^refit \(" || { echo "  (failed)"; return 1; }
}

# The cpu refit, then each layer's refitted error cuda against cpu (relative
# to the zeroed error) and cuda --stream against cuda (equal). On the
# 7B-shaped model the cpu solves take minutes, so these checks run last.
refit_against_cpu() { # model label T
    refit "$1" "$2" "$3" cpu || return 1
    python3 - "$OUT/$2-refit-cpu" "$OUT/$2-refit-cuda" "$OUT/$2-refit-cuda--stream" <<'PY'
import json, sys
recs = [json.load(open(f"{d}/pruning.json"))["refit"]["layers"] for d in sys.argv[1:]]
worst = max(abs(g["err_refit"] - c["err_refit"]) / c["err_zeroed"] for r in recs[1:] for g, c in zip(r, recs[0]))
print(f"  refitted error, cuda vs cpu: worst {worst:.2e} of the zeroed error")
print(f"  cuda --stream equals cuda: {recs[1] == recs[2]}")
sys.exit(0 if worst <= 2e-2 and recs[1] == recs[2] else 1)
PY
}

check_model() { # model label T
    local m=$1 l=$2 t=$3
    step "2. score $l (T = $t): cpu, cuda, cuda --stream"
    score "$m" "$t" cpu "$OUT/$l-cpu.safetensors"
    score "$m" "$t" cuda "$OUT/$l-cuda.safetensors"
    score "$m" "$t" cuda "$OUT/$l-cuda-stream.safetensors" --stream
    local ok=0
    echo " cuda vs cpu:" && compare "$OUT/$l-cpu.safetensors" "$OUT/$l-cuda.safetensors" 2e-2 || ok=1
    echo " cuda --stream vs cuda (same kernels: equal):"
    compare "$OUT/$l-cuda.safetensors" "$OUT/$l-cuda-stream.safetensors" 1e-7 || ok=1
    step "3. $l: perplexity (cpu, cuda) and cuda throughput"
    for b in cpu cuda; do
        "$RKU" eval ppl --model "$m" --text "$calib" --seq-len "$t" --max-windows 8 --backend "$b" --json 2>&1 | tail -1 || echo "  (failed)"
    done
    for b in cpu cuda; do
        "$RKU" bench decode --model "$m" --prompt-len 32 --new-tokens 64 --backend "$b" --json 2>&1 | tail -1 || echo "  (failed)"
    done
    for s in "" --stream; do
        "$RKU" bench forward --model "$m" --seq-len 2048 --backend cuda $s --json 2>&1 | tail -1 || echo "  (failed)"
        "$RKU" bench score --model "$m" --seq-len 2048 --samples 2 --backend cuda $s --json 2>&1 | tail -1 || echo "  (failed)"
    done
    step "4. $l: refit at 40% (cuda, cuda --stream; the cpu reference at the end)"
    refit "$m" "$l" "$t" cuda || ok=1
    refit "$m" "$l" "$t" cuda --stream || ok=1
    step "5. $l: LoRA-KD recovery (bench recover, then 4 steps cpu vs cuda)"
    for b in cpu cuda; do
        "$RKU" bench recover --model "$m" --batch 8 --seq-len 256 --steps 2 --backend "$b" --json 2>&1 | tail -1 || echo "  (failed)"
    done
    for b in cpu cuda; do
        "$RKU" recover --model "$OUT/$l-refit-cuda" --teacher "$m" --data "$calib" --steps 4 --batch 2 \
            --seq-len "$t" --backend "$b" --out "$OUT/$l-lora-$b" --force 2>&1 | tail -1 || { echo "  (failed)"; ok=1; }
    done
    python3 - "$OUT/$l-lora-cpu" "$OUT/$l-lora-cuda" <<'PY' || ok=1
import json, sys
cpu, cuda = (json.load(open(f"{d}/pruning.json"))["recovery"]["losses"] for d in sys.argv[1:])
# Each step's loss (a mean KL in nats) within 2% of the cpu's, or within
# 1e-3 nats: the GPU's bf16 weights alone move a KL between near-equal
# distributions by ~5e-5 nats (the 7B-shaped model's refitted student on
# an H200, 2026-12-04: cpu 1.45e-4 and 1.39e-4, cuda 9.9e-5 and 9.1e-5 at
# steps 1-2, where a relative rule fails; 2e-4 relative at steps 3-4).
worst = max(abs(g - c) / abs(c) for g, c in zip(cuda, cpu))
worst_abs = max(abs(g - c) for g, c in zip(cuda, cpu))
print(f"  kd loss per step, cuda vs cpu: worst {worst:.2e} relative, {worst_abs:.2e} nats ({cpu} / {cuda})")
sys.exit(0 if all(abs(g - c) <= max(2e-2 * abs(c), 1e-3) for g, c in zip(cuda, cpu)) else 1)
PY
    return $ok
}

status=0
check_model tests/fixtures/tiny-qwen2 tiny-qwen2 64 || status=1
big="$OUT/qwen7b-shapes"
[ -d "$big" ] || python3 scripts/make_synthetic_model.py --out "$big"
check_model "$big" qwen7b-shapes 256 || status=1
step "3 (7B shapes). forward at T = 2048 against transformers (bf16) on this GPU"
python3 scripts/bench_vs_torch.py --model "$big" --bin "$RKU" --backend cuda --only forward \
    --seq-len 2048 --repeats 5 2>&1 | grep -E "^forward" || echo "  (failed)"
# Where the resident forward pass spends its time: clocks under load and
# the GPU time kernel by kernel (nsys, or ncu where only it is installed).
bash scripts/gpu-profile.sh "$RKU" "$big" "$OUT/profile" || echo "  (profile failed)"

step "6. traces (METHODS.md §11): greedy cpu vs cuda, seeded sampling at batch 1 vs 8 (tiny-qwen2), batched decoding (7B shapes)"
prompts="$OUT/prompts.jsonl"
python3 - "$prompts" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        q = f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many apples does he have?"
        f.write(json.dumps({"question": q, "answer": f"#### {3 * i + 4}"}) + "\n")
PY
traces() { # model out backend [extra...]
    local m=$1 o=$2 b=$3
    shift 3
    "$RKU" traces --model "$m" --prompts "$prompts" --backend "$b" --out "$o" --force --json "$@" 2>&1 \
        | tail -1 || echo "  (failed)"
}
sampled=(--temperature 0.8 --top-p 0.9 --seed 7)
traces tests/fixtures/tiny-qwen2 "$OUT/tr-cpu.jsonl" cpu --max-new-tokens 48
traces tests/fixtures/tiny-qwen2 "$OUT/tr-cuda.jsonl" cuda --max-new-tokens 48
traces tests/fixtures/tiny-qwen2 "$OUT/tr-s1.jsonl" cuda --max-new-tokens 48 "${sampled[@]}" --batch 1
traces tests/fixtures/tiny-qwen2 "$OUT/tr-s8.jsonl" cuda --max-new-tokens 48 "${sampled[@]}" --batch 8
# Reported, not asserted: a greedy step whose top two logits are within
# rounding of each other may pick differently on cuBLAS than on the CPU.
python3 - "$OUT" <<'PY'
import json, sys
def ids(name):
    return [json.loads(line)["generated_ids"] for line in open(f"{sys.argv[1]}/{name}")]
for a, b, what in (("tr-cpu", "tr-cuda", "greedy, cpu vs cuda"), ("tr-s1", "tr-s8", "sampled on cuda, batch 1 vs 8")):
    x, y = ids(a + ".jsonl"), ids(b + ".jsonl")
    print(f"  {what}: {sum(p == q for p, q in zip(x, y))} of {len(x)} traces identical")
PY
for b in cpu cuda; do
    traces "$big" "$OUT/tr-big-$b.jsonl" "$b" --max-new-tokens 64 --batch 8 --limit 8
done

step "7. scale: activation budget, layer-major streaming (4-layer 7B shapes, N=8, T=2048)"
timed() { # label command...: wall time, peak RSS, the budget/chunk/upload lines
    local label=$1
    shift
    /usr/bin/time -f "  $label: %e s, %M KiB peak RSS" "$@" 2>&1 \
        | grep -E "activation memory|layer-major|layer uploads|scored|peak RSS" || echo "  $label: (failed)"
}
big8=(--model "$big" --calib "$calib" --samples 8 --seq-len 2048 --batch 1 --objective energy --backend cuda --force)
timed "resident, recompute" "$RKU" score "${big8[@]}" --activation-memory 0 --out "$OUT/s8-res0.safetensors"
timed "resident, auto budget" "$RKU" score "${big8[@]}" --out "$OUT/s8-res.safetensors"
timed "streamed, sequence-major" "$RKU" score "${big8[@]}" --stream --out "$OUT/s8-seq.safetensors"
timed "streamed, layer-major" "$RKU" score "${big8[@]}" --stream --layer-major --out "$OUT/s8-lm.safetensors"
echo " budget vs recompute (equal):" && compare "$OUT/s8-res0.safetensors" "$OUT/s8-res.safetensors" 1e-7 || status=1
echo " layer-major vs sequence-major, streamed (equal):" && compare "$OUT/s8-seq.safetensors" "$OUT/s8-lm.safetensors" 1e-7 || status=1
# BIG=1 (default) runs the 28-layer part, on BIG_N sequences (default 128);
# BIG_AFTER=S skips it when the steps before took more than S seconds.
if [ "${BIG:-1}" = 1 ] && [ "$SECONDS" -le "$BIG_AFTER" ]; then
    big28="$OUT/qwen7b-28"
    [ -d "$big28" ] || python3 scripts/make_synthetic_model.py --layers 28 --device cuda --out "$big28"
    timed "28 layers, N=$BIG_N, T=2048, streamed layer-major" "$RKU" score --model "$big28" --calib "$calib" \
        --samples "$BIG_N" --seq-len 2048 --batch 1 --objective energy --backend cuda --stream --layer-major \
        --out "$OUT/s128.safetensors" --force
    for alloc in uniform global; do
        "$RKU" prune --model "$big28" --stats "$OUT/s128.safetensors" --method rku --sparsity 0.5 \
            --allocation "$alloc" --backend cpu --out "$OUT/p50-$alloc" --force 2>&1 | tail -1
        "$RKU" bench prefill --model "$big28" --pruned "$OUT/p50-$alloc" --seq-len 2048 --repeats 3 \
            --backend cuda --json 2>&1 | tail -1 || echo "  (failed)"
    done
fi
step "4 (end). the cpu refit references"
refit_against_cpu tests/fixtures/tiny-qwen2 tiny-qwen2 64 || status=1
refit_against_cpu "$big" qwen7b-shapes 256 || status=1
[ "${BIG:-1}" = 1 ] && [ -z "${big28:-}" ] && echo "== 7. the 28-layer part skipped: $SECONDS s had passed"
echo "gpu-check: $([ $status = 0 ] && echo PASSED || echo FAILED)"
exit $status
