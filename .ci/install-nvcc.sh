#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, nvvm, crt, runtime headers, cccl)
# from the Python package index into DIR; no GPU needed. Idempotent: a DIR whose
# nvcc already reports release 13.0 is left as it is.
#   usage: .ci/install-nvcc.sh DIR      then nvcc is DIR/nvidia/cu13/bin/nvcc
# All five packages are pinned: unpinned, pip pairs nvcc 13.0 with a newer nvvm
# whose PTX the 13.0 ptxas rejects (docs/DESIGN.md, "Kernels and build.rs").
set -euo pipefail
dir="${1:?usage: $0 DIR}"
nvcc="$dir/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version 2>/dev/null | grep -q 'release 13.0'; then
    echo "nvcc already installed: $nvcc"
    exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check --upgrade --target "$dir" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
"$nvcc" --version | tail -n 2
echo "nvcc installed: $nvcc"
