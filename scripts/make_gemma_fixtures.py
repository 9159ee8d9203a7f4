#!/usr/bin/env python3
"""Reference values of Gemma 3 270M as transformers loads it from its GGUF,
for tests/gemma_import.rs (rku-engine's importer must give the same).

    /work/venv-torch/bin/python scripts/make_gemma_fixtures.py \
        [--gguf assets/llm_gemma/gemma-3-270m-q4_k_m.gguf] [--owt assets/text/owt.jsonl]

transformers (`AutoModelForCausalLM` / `AutoTokenizer` with `gguf_file=`,
float32, CPU) is the reference; gguf-py's `dequantize` cross-checks the
conventions transformers applies (asserted here, so a change in either
fails this script rather than passing silently):

  - every `*norm.weight` is stored as 1 + w (llama.cpp's converter adds 1 for
    Gemma's (1 + w) RMSNorm); transformers subtracts 1 in float32;
  - Q and K rows are stored in HF order (no rotary permutation for gemma3).

Writes tests/fixtures/gemma3-270m/ (about 150 KB):

  tensors.safetensors  per HF tensor NAME: NAME.sample (float32, SAMPLES
                       values of the flattened tensor at indices
                       k * (n - 1) // (SAMPLES - 1), k = 0..SAMPLES-1) and
                       NAME.stats (float64 [sum, sum of |x|, sum of x^2]);
                       metadata "shape.NAME" = "d0,d1"
  config.json          the config transformers derives from the GGUF, as its
                       save_pretrained writes it
  ids.json             [{text, ids, ids_bos, decoded}]: transformers' token ids
                       without and with special tokens, and its decode of `ids`
  logits.safetensors   the logits of LOGIT_PROMPTS, each tokenized with special
                       tokens (so after Gemma's BOS), at every position:
                       `prompt{i}.input_ids` (int32 [T]), `prompt{i}.cols`
                       (float32 [T, C], the vocabulary columns `columns`, int32
                       [C] = 0, COL_STRIDE, 2*COL_STRIDE, ...), `prompt{i}.topk_ids`
                       (int32 [T, TOPK]) and `prompt{i}.topk` (float32 [T, TOPK]),
                       transformers' largest logits, and `prompt{i}.scale`
                       (float64 [], max |logit| over every position and the whole
                       vocabulary); metadata "prompt{i}" = the prompt's text
"""

import argparse
import json
import os
import tempfile

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "gemma3-270m")
SAMPLES = 24

TEXTS = [
    # Mixed Unicode, digits, code, runs of spaces/tabs/newlines, HTML-ish
    # user-defined tokens and control tokens.
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский. "
    "Digits 1234567890 and 3.14159e-5; x = [1,2,3]\n\n\tdef f(a, b):\n        return a  +  b   # done\n"
    "<start_of_turn>user\nHi<end_of_turn>\n<b>bold</b>\t\t\u2581raw mark \x00\x7f\U0001f9ea",
    # docs/DATA.md's reference sentence.
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
    "   leading spaces and trailing   \n\n\n",
]
OWT_PASSAGES = 3

# Prompts whose logits tests/gemma_import.rs compares: plain English, a
# Gemma chat turn (control tokens), and code with digits and Unicode.
LOGIT_PROMPTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
    "<start_of_turn>user\nWhat is 12 + 30?<end_of_turn>\n<start_of_turn>model\n",
    "def area(r):\n    return 3.14159 * r ** 2  # café, 日本語\n",
]
COL_STRIDE = 1021  # a prime: the columns fall at every residue mod small powers of 2
TOPK = 8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join(ROOT, "assets/llm_gemma/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--owt", default=os.path.join(ROOT, "assets/text/owt.jsonl"))
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(OUT, exist_ok=True)
    d, f = os.path.dirname(args.gguf), os.path.basename(args.gguf)

    with open(args.owt) as fh:
        owt = [json.loads(line)["0"] for _, line in zip(range(OWT_PASSAGES), fh)]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids = []
    for text in TEXTS + owt:
        plain = tok(text, add_special_tokens=False)["input_ids"]
        ids.append({
            "text": text,
            "ids": plain,
            "ids_bos": tok(text)["input_ids"],
            "decoded": tok.decode(plain),
        })
    with open(os.path.join(OUT, "ids.json"), "w") as fh:
        json.dump(ids, fh, ensure_ascii=False, indent=0)

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager")
    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as fh:
            config = json.load(fh)
    with open(os.path.join(OUT, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)

    # The conventions, checked against gguf-py on the raw file.
    raw = {t.name: t for t in GGUFReader(args.gguf).tensors}

    def deq(name):
        t = raw[name]
        return np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)

    for l in (0, 5, 17):
        q = deq(f"blk.{l}.attn_q.weight")
        assert np.array_equal(q, sd[f"model.layers.{l}.self_attn.q_proj.weight"]), "Q is not stored in HF order"
        k = deq(f"blk.{l}.attn_k.weight")
        assert np.array_equal(k, sd[f"model.layers.{l}.self_attn.k_proj.weight"]), "K is not stored in HF order"
        for g, h in [("attn_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                     ("ffn_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"),
                     ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm")]:
            stored = deq(f"blk.{l}.{g}.weight")
            assert np.array_equal(stored - np.float32(1), sd[f"model.layers.{l}.{h}.weight"]), f"{g} is not 1 + w"
    assert np.array_equal(deq("output_norm.weight") - np.float32(1), sd["model.norm.weight"])

    tensors, meta = {}, {}
    for name, w in sorted(sd.items()):
        flat = w.reshape(-1)
        n = flat.size
        at = [k * (n - 1) // (SAMPLES - 1) for k in range(SAMPLES)]
        x = flat.astype(np.float64)
        tensors[name + ".sample"] = np.ascontiguousarray(flat[at])
        tensors[name + ".stats"] = np.array([x.sum(), np.abs(x).sum(), (x * x).sum()])
        meta["shape." + name] = ",".join(str(s) for s in w.shape)
    save_file(tensors, os.path.join(OUT, "tensors.safetensors"), metadata=meta)
    write_logits(tok, model, config["vocab_size"])
    print(f"{len(sd)} tensors, {len(ids)} texts, {len(LOGIT_PROMPTS)} prompts' logits written to {OUT}")


def write_logits(tok, model, vocab):
    """logits.safetensors (see the module doc): transformers' float32 logits,
    eager attention, no cache, each prompt alone."""
    columns = np.arange(0, vocab, COL_STRIDE, dtype=np.int32)
    out, meta = {"columns": columns}, {}
    for i, text in enumerate(LOGIT_PROMPTS):
        ids = tok(text)["input_ids"]
        assert ids[0] == model.config.bos_token_id, "Gemma's tokenizer puts BOS first"
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOPK].astype(np.int32)
        out[f"prompt{i}.input_ids"] = np.array(ids, dtype=np.int32)
        out[f"prompt{i}.cols"] = np.ascontiguousarray(logits[:, columns])
        out[f"prompt{i}.topk_ids"] = np.ascontiguousarray(top)
        out[f"prompt{i}.topk"] = np.ascontiguousarray(np.take_along_axis(logits, top, axis=1))
        out[f"prompt{i}.scale"] = np.array(np.abs(logits).max(), dtype=np.float64)
        meta[f"prompt{i}"] = text
        print(f"  prompt {i}: {len(ids)} tokens, max |logit| {np.abs(logits).max():.4f}")
    save_file(out, os.path.join(OUT, "logits.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
