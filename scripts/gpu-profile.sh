#!/usr/bin/env bash
# Where a CUDA forward pass spends its time (DESIGN.md's kernels): the GPU's
# clocks and power while `bench forward` runs (is the chip throttled?), then
# one profiled pass kernel by kernel with nsys or, where only Nsight Compute
# is installed, ncu (one metric, gpu__time_duration, per launch), summed by
# kernel name: the cuBLAS kernels' names tell tensor-core GEMMs from others.
#   bash scripts/gpu-profile.sh RKU_BINARY MODEL_DIR OUT_DIR [SEQ_LEN]
# gpu-check.sh calls it on the 7B-shaped model; it also runs alone.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 RKU_BINARY MODEL_DIR OUT_DIR [SEQ_LEN]" >&2; exit 2; }
rku=$1 model=$2 out=$3 t=${4:-2048}
[[ "$t" =~ ^[0-9]+$ ]] || { echo "SEQ_LEN $t: give a whole number" >&2; exit 2; }
mkdir -p "$out"
forward() { "$rku" bench forward --model "$model" --seq-len "$t" --backend cuda "$@"; }
echo "-- clocks under load (nvidia-smi every 100 ms during 20 forward passes)"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
    --format=csv,noheader,nounits -lms 100 > "$out/smi.csv" 2>/dev/null &
smi=$!
forward --repeats 20 --json 2>&1 | tail -1
kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
python3 - "$out/smi.csv" <<'PY'
import sys
def number(c):
    try:
        return float(c)
    except ValueError:  # "[N/A]"
        return 0.0
rows = [[c.strip() for c in l.split(",")] for l in open(sys.argv[1]) if l.count(",") == 4]
rows = [[number(r[0]), number(r[1]), number(r[2]), r[3], r[4]] for r in rows]
if not rows:
    sys.exit("  (no nvidia-smi samples)")
busy = [r for r in rows if r[2] > 150.0] or rows  # samples above 150 W: the passes
sm = [r[0] for r in busy]
print(f"  {len(rows)} samples, {len(busy)} under load: SM clock {min(sm):.0f}-{max(sm):.0f} MHz, "
      f"power up to {max(r[2] for r in busy):.0f} W, throttle reasons {sorted({r[4] for r in busy})}")
PY
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "-- kernels of one forward pass at T = $t (warm-up and one timed pass)"
if [ -n "$nsys" ]; then
    "$nsys" profile --force-overwrite true -o "$out/forward" "$rku" bench forward --model "$model" \
        --seq-len "$t" --backend cuda --repeats 1 >/dev/null 2>&1 &&
        "$nsys" stats --report cuda_gpu_kern_sum "$out/forward.nsys-rep" 2>/dev/null | sed -n 1,30p
elif [ -n "$ncu" ]; then
    "$ncu" --csv --metrics gpu__time_duration.sum "$rku" bench forward --model "$model" \
        --seq-len "$t" --backend cuda --repeats 1 > "$out/ncu.csv" 2> "$out/ncu.err"
    python3 - "$out/ncu.csv" <<'PY'
import csv, collections, sys
scale = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1.0, "s": 1.0}
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
total, count = collections.Counter(), collections.Counter()
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        s = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], float("nan"))
        total[r["Kernel Name"][:90]] += s
        count[r["Kernel Name"][:90]] += 1
whole = sum(total.values())
print(f"  {sum(count.values())} launches, {whole * 1e3:.1f} ms of kernel time (two passes)")
for name, s in total.most_common(15):
    print(f"  {s * 1e3:9.2f} ms {100 * s / whole:5.1f}% x{count[name]:<4} {name}")
PY
    [ -s "$out/ncu.csv" ] || tail -5 "$out/ncu.err"
else
    echo "  (neither nsys nor ncu here: no kernel profile)"
fi
