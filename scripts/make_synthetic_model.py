#!/usr/bin/env python3
"""A random-weight model with a real model's layer shapes, for GPU checks.

The default shapes are Qwen2.5-7B's layers (hidden 3584, FFN 18944, 28
heads, 4 KV heads, head_dim 128, q/k/v bias) with fewer layers and a
smaller vocabulary, so that the CUDA backend runs at the sizes users run
and the CPU backend can still score it as a reference. Weights are
transformers' own initialisation (seeded; norm weights and biases drawn at
random, see below), saved in bf16 by save_pretrained; the tokenizer is copied from a fixture (its ids are below
any --vocab used here).

  python3 scripts/make_synthetic_model.py --out /tmp/qwen7b-4l
"""
import argparse
import os
import shutil

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--ffn", type=int, default=18944)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    # Initialising 7B parameters takes minutes on the CPU, seconds on a GPU
    # (other random numbers, the same distributions).
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if os.path.exists(a.out):
        raise SystemExit(f"{a.out} exists")
    torch.manual_seed(a.seed)
    cfg = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.device(a.device):
        model = Qwen2ForCausalLM(cfg)
    # transformers initialises RMSNorm weights to 1 and biases to 0. With a
    # unit final-norm weight the energy ½‖z‖² is (up to eps) the same for
    # every input, so its gradient is rounding noise; trained models have
    # varied norm weights. Draw them, and the q/k/v biases, at random.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    tmp = a.out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    fixture = os.path.join(HERE, "..", "tests", "fixtures", "tiny-qwen2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(fixture, f), os.path.join(tmp, f))
    os.rename(tmp, a.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.out}: {n / 1e9:.2f}B parameters, {a.layers} layers")


if __name__ == "__main__":
    main()
