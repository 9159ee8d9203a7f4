"""PyTorch/transformers reference for statistics over traces (METHODS.md
§11, `--tokens generated`): tests/fixtures/tiny-llama3/traces_reference.safetensors.

Three sequences of their own lengths (10, 13, 10 tokens; prompts of 4, 6
and 3 tokens), each run alone (no padding). Counted positions are the
generated ones (p >= prompt length):

  energy  J = (1/n) sum_counted 1/2 |z_t|^2, n = counted tokens
  ce      mean next-token CE over positions p whose target p+1 is generated
  s1, s2, f2, k1  summed over counted positions (g of the energy objective)
  tk      sum over sequences of |sum_{counted t} h g| (g of ce)

Statistics in float64 from float32 forward/backward on the CPU.

    /work/venv-torch/bin/python scripts/make_trace_fixtures.py
"""

import os

import torch
import torch.nn.functional as F

from make_fixtures import FIXTURES, load_hf, run_with_captures, save_tensors

LENGTHS = [10, 13, 10]
PROMPTS = [4, 6, 3]


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    d = FIXTURES / "tiny-llama3"
    model = load_hf(d)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, vocab, (1, L), generator=gen) for L in LENGTHS]
    n = sum(L - P for L, P in zip(LENGTHS, PROMPTS))
    n_pred = sum(L - max(P, 1) for L, P in zip(LENGTHS, PROMPTS))
    layers = model.config.num_hidden_layers
    t = {}
    for kind in ("energy", "ce"):
        J = 0.0
        acc = [None] * layers
        for ids, P in zip(seqs, PROMPTS):
            out, hs, cap = run_with_captures(model, ids)
            if kind == "energy":
                z = cap["z"][0, P:]
                j = 0.5 * z.pow(2).sum() / n
            else:
                logits = out.logits[0, P - 1:-1]
                j = F.cross_entropy(logits, ids[0, P:].long(), reduction="sum") / n_pred
            j.backward()
            J += j.detach().double().item()
            for l, h32 in enumerate(hs):
                h, g = h32.detach().double()[0, P:], h32.grad.double()[0, P:]
                s = {
                    "s1": h.sum(0),
                    "s2": (h * h).sum(0),
                    "f2": (g * g).sum(0),
                    "k1": (h * g).abs().sum(0),
                    "tk": (h * g).sum(0).abs(),
                }
                acc[l] = s if acc[l] is None else {k: acc[l][k] + s[k] for k in s}
        t[f"{kind}.J"] = torch.tensor([J], dtype=torch.float64)
        keep = ("s1", "s2", "f2", "k1") if kind == "energy" else ("tk",)
        for l in range(layers):
            for k in keep:
                t[f"{kind}.{l}.{k}"] = acc[l][k]
    for i, (ids, P) in enumerate(zip(seqs, PROMPTS)):
        t[f"seq.{i}.ids"] = ids[0].to(torch.int64)
        t[f"seq.{i}.prompt"] = torch.tensor([P], dtype=torch.int64)
    save_tensors(t, d / "traces_reference.safetensors",
                 {"lengths": LENGTHS, "prompts": PROMPTS, "counted": n, "predicted": n_pred})
    print(f"  energy.J={t['energy.J'].item():.6f} ce.J={t['ce.J'].item():.6f}")


if __name__ == "__main__":
    main()
