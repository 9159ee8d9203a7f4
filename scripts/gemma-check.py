#!/usr/bin/env python3
"""Held-out perplexity of Gemma 3 270M: rku-engine against transformers.

transformers loads the GGUF itself (its own dequantisation and conventions,
f32, eager attention); rku-engine runs its own import of the same file.
Both score the same windows of the OpenWebText passages (the text joined as
rku-engine's `read_text` joins jsonl rows, tokenised without special
tokens; windows of T tokens, or BOS + T-1 tokens with BOS), and the script
prints both perplexities and their ratio, without and with BOS.

    /work/venv-torch/bin/python scripts/gemma-check.py \
        --gguf assets/llm_gemma/gemma-3-270m-q4_k_m.gguf \
        --model assets/models/gemma3-270m --bin target/release/rku-engine

Needs torch, transformers (with gguf and accelerate). Not part of CI.
"""

import argparse
import json
import math
import subprocess
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def engine_ppl(args, bos):
    cmd = [
        args.bin, "eval", "ppl", "--backend", "cpu", "--model", str(args.model),
        "--text", str(args.text), "--field", "0", "--seq-len", str(args.seq_len),
        "--max-windows", str(args.windows), "--bos", "true" if bos else "false", "--json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def torch_ppl(model, ids, args, bos_id):
    per = args.seq_len - 1 if bos_id is not None else args.seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(args.windows):
            w = ids[i * per:(i + 1) * per]
            if bos_id is not None:
                w = [bos_id] + w
            x = torch.tensor([w])
            logits = model(x).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll = -logp.gather(1, x[0, 1:, None]).sum().item()
            total += nll
            count += len(w) - 1
    return math.exp(total / count), total / count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="rku-engine's import of the GGUF")
    p.add_argument("--bin", default="target/release/rku-engine")
    p.add_argument("--text", type=Path, default=Path("assets/text/owt.jsonl"))
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()

    rows = [json.loads(l)["0"].strip() for l in args.text.read_text().splitlines() if l.strip()]
    text = "\n\n".join(rows)
    gguf = args.gguf.resolve()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    torch.set_num_threads(2)
    for bos in (False, True):
        bos_id = tok.bos_token_id if bos else None
        t_ppl, t_nll = torch_ppl(model, ids, args, bos_id)
        e = engine_ppl(args, bos)
        print(
            f"BOS {'on ' if bos else 'off'}: {args.windows} windows x {args.seq_len}: "
            f"transformers ppl {t_ppl:.4f}, rku-engine ppl {e['ppl']:.4f}, "
            f"ratio {e['ppl'] / t_ppl:.5f} ({(e['ppl'] / t_ppl - 1) * 100:+.3f}%)"
        )


if __name__ == "__main__":
    main()
