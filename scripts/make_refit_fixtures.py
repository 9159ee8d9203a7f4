#!/usr/bin/env python3
"""Independent PyTorch reference for the least-squares refit (METHODS.md §9).

For each tiny fixture model (tests/fixtures/tiny-llama3, tiny-qwen2) and
each case (target `layer` or `residual`, with or without the bias column),
writes to tests/fixtures/refit/<model>.safetensors:

  ids                 [N, T] int64 calibration windows (seeded random ids)
  kept.<l>            [k_l] int64 kept channels of layer l (ascending)
  <case>.g.<l>        [k', k'] f64   G = h_Kᵀ h_K   (k' = k_l, + 1 with bias)
  <case>.c.<l>        [k', d] f64    C = h_Kᵀ y
  <case>.rr.<l>       [1] f64        Σ ‖y‖²
  <case>.w_down.<l>   [d, k_l] f64   the refitted down_proj columns
  <case>.bias.<l>     [d] f64        the fitted bias (bias cases)
  <case>.err.<l>      [2] f64        ‖y − ŷ‖² zeroed, refitted
  <case>.refitted.<l> [1] int64      1 when the solution was kept

The algorithm is written differently from the engine's on purpose: the
model is re-run from the embedding for every layer (O(L²), transformers'
own modules with hooks), with layers below l already replaced by their
refitted down_proj (an nn.Linear with zeros at the removed channels), h
and x' + Attn captured by hooks on layer l; the dense residual for the
`residual` target is the input of layer l+1 (of the final norm for the
last layer) in the dense model. G and C are formed in float64 from the
float32 activations; the damped system is solved by torch.linalg.cholesky
/ cholesky_solve; the errors are computed directly as ‖y − h_K·X‖².

    python scripts/make_refit_fixtures.py   # about 20 s; needs torch, transformers, safetensors
"""

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
N, T = 6, 16
KEEP_FRACTION = 0.6
DAMP = 0.01


def capture(model, ids, l):
    """h (down_proj input) and x' + Attn (post-attention norm input) of layer l."""
    got = {}
    layer = model.model.layers[l]
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a: got.__setitem__("h", a[0].detach())),
        layer.post_attention_layernorm.register_forward_pre_hook(
            lambda _m, a: got.__setitem__("mid", a[0].detach())
        ),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return got["h"], got["mid"]


def dense_residuals(model, ids):
    """x_1 .. x_L of the dense model: inputs of layers 1..L-1 and of the final norm."""
    xs = {}
    mods = list(model.model.layers[1:]) + [model.model.norm]
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, i=i: xs.__setitem__(i, a[0].detach()))
        for i, m in enumerate(mods)
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [xs[i] for i in range(len(mods))]


def refit_case(dense, ids, kept, target, bias):
    model = copy.deepcopy(dense)
    xd = dense_residuals(dense, ids) if target == "residual" else None
    out = []
    for l, keep in enumerate(kept):
        h, mid = capture(model, ids, l)
        m = h.shape[-1]
        w_d = dense.model.layers[l].mlp.down_proj.weight.detach().double()  # [d, m]
        d = w_d.shape[0]
        h = h.reshape(-1, m).double()
        if target == "layer":
            y = h @ w_d.T
        else:
            y = (xd[l].double() - mid.double()).reshape(-1, d)
        k = len(keep)
        hk = h[:, keep]
        if bias:
            hk = torch.cat([hk, torch.ones(hk.shape[0], 1, dtype=torch.float64)], dim=1)
        g = hk.T @ hk
        c = hk.T @ y
        lam = DAMP * torch.diagonal(g)[:k].mean()
        a = g.clone()
        a[range(k), range(k)] += lam
        x = torch.cholesky_solve(c, torch.linalg.cholesky(a))
        x0 = torch.zeros_like(x)
        x0[:k] = w_d[:, keep].T
        err0 = ((y - hk @ x0) ** 2).sum()
        err1 = ((y - hk @ x) ** 2).sum()
        refitted = bool(err1 <= err0)
        chosen = x if refitted else x0
        w_new = chosen[:k].T  # [d, k]
        b_new = chosen[k] if bias else None
        # The refitted layer, as the next layers' inputs see it.
        full = torch.zeros(d, m, dtype=torch.float32)
        full[:, keep] = w_new.float()
        lin = torch.nn.Linear(m, d, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(full)
            if bias:
                lin.bias.copy_(b_new.float())
        model.model.layers[l].mlp.down_proj = lin
        out.append(
            dict(
                g=g,
                c=c,
                rr=(y**2).sum().reshape(1),
                w_down=w_new.contiguous(),
                bias=b_new,
                err=torch.stack([err0, err1 if refitted else err0]),
                refitted=torch.tensor([int(refitted)]),
            )
        )
    return out


def make(name):
    path = FIXTURES / name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (N, T), generator=gen)
    m = cfg.intermediate_size
    kept = [
        torch.sort(torch.randperm(m, generator=gen)[: round(KEEP_FRACTION * m)]).values
        for _ in range(cfg.num_hidden_layers)
    ]
    tensors = {"ids": ids}
    for l, k in enumerate(kept):
        tensors[f"kept.{l}"] = k
    for target in ["layer", "residual"]:
        for bias in [False, True]:
            case = f"{target}{'-bias' if bias else ''}"
            for l, r in enumerate(refit_case(model, ids, kept, target, bias)):
                for key, v in r.items():
                    if v is not None:
                        tensors[f"{case}.{key}.{l}"] = v.contiguous()
    out = FIXTURES / "refit"
    out.mkdir(exist_ok=True)
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "n": str(N), "t": str(T), "damp": str(DAMP)}
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)
    print(f"wrote {out / name}.safetensors ({len(tensors)} tensors)")


if __name__ == "__main__":
    for name in ["tiny-llama3", "tiny-qwen2"]:
        make(name)
