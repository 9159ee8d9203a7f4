#!/usr/bin/env python3
"""Independent PyTorch reference for the refit over traces with
`--tokens generated` (METHODS.md §9, §11):
tests/fixtures/refit/tiny-llama3-traces.safetensors.

Four sequences of their own lengths (10, 13, 10, 7 tokens; prompts of 4,
6, 3 and 7 tokens: the last one has no generated token), each run alone
(no padding). Only generated positions (p >= prompt length) give rows of
the least-squares system; the prompt is context (it passes through
attention). Per case (target `layer` or `residual`, with or without the
bias column) and layer l:

  seq.<i>.ids         [L_i] int64     the sequence
  seq.<i>.prompt      [1] int64       its prompt length
  kept.<l>            [k_l] int64     kept channels of layer l (ascending)
  <case>.g.<l>        [k', k'] f64    G = Σ_counted h_K h_Kᵀ
  <case>.c.<l>        [k', d] f64     C = Σ_counted h_K yᵀ
  <case>.w_down.<l>   [d, k_l] f64    the refitted down_proj columns
  <case>.bias.<l>     [d] f64         the fitted bias (bias cases)
  <case>.err.<l>      [2] f64         ‖y − ŷ‖² zeroed, refitted (counted rows)
  <case>.refitted.<l> [1] int64       1 when the solution was kept

As in make_refit_fixtures.py, the model is re-run from the embedding for
every layer and sequence (transformers' own modules, hooks), with the
layers below l replaced by their refitted down_proj; G and C are formed in
float64 from the float32 activations of the counted rows only.

    /work/venv-torch/bin/python scripts/make_refit_trace_fixtures.py   # a few seconds
"""

import copy
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_refit_fixtures import DAMP, FIXTURES, capture, dense_residuals

LENGTHS = [10, 13, 10, 7]
PROMPTS = [4, 6, 3, 7]
KEEP_FRACTION = 0.6


def refit_case(dense, seqs, kept, target, bias):
    model = copy.deepcopy(dense)
    xds = [dense_residuals(dense, ids) for ids, _ in seqs] if target == "residual" else None
    out = []
    for l, keep in enumerate(kept):
        w_d = dense.model.layers[l].mlp.down_proj.weight.detach().double()  # [d, m]
        d, m = w_d.shape
        hs, ys = [], []
        for i, (ids, p) in enumerate(seqs):
            h, mid = capture(model, ids, l)
            h = h[0, p:].double()  # counted rows only
            if target == "layer":
                y = h @ w_d.T
            else:
                y = (xds[i][l][0, p:].double() - mid[0, p:].double())
            hs.append(h)
            ys.append(y)
        h, y = torch.cat(hs), torch.cat(ys)
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
        w_new = chosen[:k].T
        b_new = chosen[k] if bias else None
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
                w_down=w_new.contiguous(),
                bias=b_new,
                err=torch.stack([err0, err1 if refitted else err0]),
                refitted=torch.tensor([int(refitted)]),
            )
        )
    return out


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    name = "tiny-llama3"
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(13)
    seqs = [(torch.randint(0, cfg.vocab_size, (1, n), generator=gen), p) for n, p in zip(LENGTHS, PROMPTS)]
    m = cfg.intermediate_size
    kept = [
        torch.sort(torch.randperm(m, generator=gen)[: round(KEEP_FRACTION * m)]).values
        for _ in range(cfg.num_hidden_layers)
    ]
    tensors = {}
    for i, (ids, p) in enumerate(seqs):
        tensors[f"seq.{i}.ids"] = ids[0].to(torch.int64)
        tensors[f"seq.{i}.prompt"] = torch.tensor([p], dtype=torch.int64)
    for l, k in enumerate(kept):
        tensors[f"kept.{l}"] = k
    for target in ["layer", "residual"]:
        for bias in [False, True]:
            case = f"{target}{'-bias' if bias else ''}"
            for l, r in enumerate(refit_case(model, seqs, kept, target, bias)):
                for key, v in r.items():
                    if v is not None:
                        tensors[f"{case}.{key}.{l}"] = v.contiguous()
    import transformers

    meta = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lengths": str(LENGTHS),
        "prompts": str(PROMPTS),
        "damp": str(DAMP),
    }
    out = FIXTURES / "refit" / f"{name}-traces.safetensors"
    save_file(tensors, str(out), metadata=meta)
    print(f"wrote {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
