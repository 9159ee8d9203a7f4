#!/usr/bin/env bash
# Stands up a single-node Slurm on this machine from Debian's packages
# (slurm-wlm and munge; needs root and apt) and runs the cluster pipeline of
# scripts/slurm/ end to end on SmolLM2-135M: an array job of SHARDS score
# tasks, then a job that waits for them (afterok), merges them with
# --expect-complete, prunes and evaluates. It then scores the same windows
# in one process and prints how far the merged statistics are from that
# single pass and the IoU of the two pruning masks. Not part of CI.
#
# Knobs (environment): SHARDS (4), SAMPLES (32), SEQ_LEN (128), BATCH (4),
# SPARSITY (0.4), PPL_WINDOWS (50), OUT (out/slurm-check).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${SHARDS:-4}
SAMPLES=${SAMPLES:-32}
SEQ_LEN=${SEQ_LEN:-128}
BATCH=${BATCH:-4}
SPARSITY=${SPARSITY:-0.4}
PPL_WINDOWS=${PPL_WINDOWS:-50}
OUT=${OUT:-out/slurm-check}

# 1. Slurm and munge, configured as one node holding every CPU.
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge > /dev/null
fi
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
chown -R munge: /etc/munge /var/log/munge /var/lib/munge /run/munge 2> /dev/null || true
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged > /dev/null || runuser -u munge -- munged
host=$(hostname -s)
cpus=$(nproc)
mem=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=rku-check
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
for _ in $(seq 30); do sinfo -h -o %T 2> /dev/null | grep -q idle && break; sleep 1; done
sinfo

# 2. The binary, the model and the text.
cargo build --release --bin rku-engine
BIN=target/release/rku-engine
bash scripts/fetch-assets.sh --import "$BIN"
MODEL=assets/models/smollm2
rm -rf "$OUT" && mkdir -p "$OUT"
score_args="--field 0 --samples $SAMPLES --seq-len $SEQ_LEN --batch $BATCH --objective both"

# 3. The pipeline under Slurm; each task takes one CPU's share of the threads.
export RAYON_NUM_THREADS=1
ids=$(bash scripts/slurm/submit.sh --shards "$SHARDS" --bin "$BIN" --model "$MODEL" \
  --calib assets/text/wikipedia.jsonl --heldout assets/text/owt.jsonl --out "$OUT/cluster" \
  --score-args "$score_args" --prune-args "--method rku --sparsity $SPARSITY" \
  --ppl-args "--field 0 --max-windows $PPL_WINDOWS" --sbatch-args "--cpus-per-task=1")
echo "$ids"
merge_job=$(echo "$ids" | awk '{print $NF}')
t0=$(date +%s)
while squeue -h -j "$merge_job" 2> /dev/null | grep -q .; do sleep 5; done
echo "pipeline finished in $(($(date +%s) - t0)) s after submission"
sacct -n -X -o JobID,JobName,State,Elapsed 2> /dev/null | tail -n $((SHARDS + 1)) || true
for i in $(seq 0 $((SHARDS - 1))); do grep -h "^shard" "$OUT/cluster/score-$i.log"; done
cat "$OUT/cluster/merge-prune.log"
[ -f "$OUT/cluster/pruned/pruning.json" ] || { echo "the merge-prune job did not produce a model" >&2; exit 1; }

# 4. The same windows in one process, and the distance to the merged shards.
"$BIN" score --model "$MODEL" --calib assets/text/wikipedia.jsonl $score_args \
  --out "$OUT/single.stats.safetensors"
"$BIN" prune --model "$MODEL" --stats "$OUT/single.stats.safetensors" --method rku \
  --sparsity "$SPARSITY" --out "$OUT/single-pruned"
python3 - "$OUT/cluster/stats.safetensors" "$OUT/single.stats.safetensors" <<'PY'
import json, struct, sys
def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__")
    out = {}
    for name, t in header.items():
        if t["dtype"] == "F64":
            a, b = t["data_offsets"]
            out[name] = struct.unpack(f"<{(b - a) // 8}d", data[a:b])
    return meta, out
(ma, a), (mb, b) = read(sys.argv[1]), read(sys.argv[2])
assert a.keys() == b.keys(), "different tensors"
worst = 0.0
for k in a:
    scale = max(abs(x) for x in b[k]) or 1.0
    worst = max(worst, max(abs(x - y) for x, y in zip(a[k], b[k])) / scale)
same = {k: ma[k] == mb[k] for k in ("calib_digest", "samples", "tokens", "energy_norm", "ce_norm")}
print(f"merged shards vs one pass: worst |diff| / tensor max = {worst:.3e}; metadata equal: {same}")
PY
"$BIN" iou "$OUT/cluster/pruned" "$OUT/single-pruned" | tail -n 3
