#!/usr/bin/env bash
# The test command: on a fresh machine it installs what the tests need
# (nvcc from the Python package index, the real test model and text, the
# evaluation sets), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# nvcc (no GPU needed): every landing proves the kernels compile for sm_80..sm_90.
NVCC_DIR=${NVCC_DIR:-$PWD/.cache/nvcc}
bash .ci/install-nvcc.sh "$NVCC_DIR"
export NVCC="$NVCC_DIR/nvidia/cu13/bin/nvcc"
export RKU_REQUIRE_NVCC=1

# Every asset a test reads (tests/common `asset`), each from its script; with
# CI set a test whose asset is missing fails instead of skipping.
export CI=${CI:-true}
# The default real model (SmolLM2-135M-Instruct GGUF) and text, imported once,
# and the Gemma 3 270M GGUF (253 MB, about a minute the first time, nothing
# once cached): tests/gemma_import.rs imports it itself into a temporary
# directory under target/, so it is not imported here (no second import, no
# extra build).
bash scripts/fetch-assets.sh --gemma
cargo build --bin rku-engine
bash scripts/fetch-assets.sh --import "${CARGO_TARGET_DIR:-target}/debug/rku-engine"
# The evaluation sets (assets/eval): GSM-symbolic from reasoning-gym and three
# BIG-bench tasks; about 2.5 minutes the first time (downloads reasoning-gym
# with its dependencies and bigbench's 358 MB source archive into
# assets/wheels), nothing once built.
python3 scripts/make-eval-data.py

# The disk this needs (measured on a clean checkout: about 9 GB at the peak,
# 5 GB of it the build), so that a machine short of space says so up front.
df -h . "${TMPDIR:-/tmp}"

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
