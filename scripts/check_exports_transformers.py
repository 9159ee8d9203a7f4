#!/usr/bin/env python3
"""Loads the engine's committed exports (tests/fixtures/exports/*, written by
`RKU_WRITE_EXPORT_FIXTURES=1 cargo test --test prune_export stock`) in stock
transformers and records their logits on the tiny fixtures' input ids, so
the Rust test can check that what the engine exports is what transformers
computes. Needs torch, transformers, safetensors (never CI).

    python3 scripts/check_exports_transformers.py [--only NAME ...]

(`--only` rewrites only the named exports' logits, leaving the others'
committed bytes alone.)
"""
import argparse
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
SOURCES = {
    "qwen2-padded": "tiny-qwen2",
    "llama3-uniform": "tiny-llama3",
    "qwen3-padded": "tiny-qwen3",
    "qwen3-uniform": "tiny-qwen3",
    # `recover`'s merged export of llama3-uniform (RKU_WRITE_EXPORT_FIXTURES=1
    # cargo test --test recover stock)
    "llama3-uniform-recovered": "tiny-llama3",
    # tiny-mistral (sliding window 6 < 16 tokens): its keep sets padded,
    # and every layer keeping its even channels (stock config)
    "mistral-padded": "tiny-mistral",
    "mistral-uniform": "tiny-mistral",
    # tiny-gemma3 (local and global layers, (1 + w) norms, GeGLU): the same two
    "gemma3-padded": "tiny-gemma3",
    "gemma3-uniform": "tiny-gemma3",
}

ap = argparse.ArgumentParser()
ap.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="only these exports")
args = ap.parse_args()

for name, src in SOURCES.items():
    if args.only and name not in args.only:
        continue
    d = FIX / "exports" / name
    ids = load_file(str(FIX / src / "reference.safetensors"))["input_ids"].long()
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    save_file({"input_ids": ids.to(torch.int32), "logits": logits.contiguous()},
              str(d / "transformers_logits.safetensors"),
              metadata={"transformers": __import__("transformers").__version__, "torch": torch.__version__})
    print(f"{name}: {model.config.architectures[0]}, intermediate_size {model.config.intermediate_size}, "
          f"sliding_window {getattr(model.config, 'sliding_window', None)}, logits {tuple(logits.shape)}")
