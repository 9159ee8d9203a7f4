#!/usr/bin/env python3
"""Independent PyTorch reference for one recovery step over traces with
`--tokens generated` (METHODS.md §10, §11):
tests/fixtures/lora/tiny-llama3-traces.safetensors.

Three sequences of their own lengths (9, 6 and 9 tokens; prompts of 3, 2
and 5), each run alone (no padding). Position p of a sequence predicts
p + 1 and counts when p + 1 is a generated position (p + 1 >= prompt
length); count = sum over sequences of (length - prompt). The step's loss
is the mean over the counted predictions of all three sequences:

  kd.loss = (1/count) sum_counted KL(p_teacher || p_student)
  ce.loss = (1/count) sum_counted -log p_student(next id)

Tensors (l = layer, p = projection as in make_lora_fixtures.py):

  seq.<i>.ids          [L_i] int64   the sequence
  seq.<i>.prompt       [1] int64     its prompt length
  rank, alpha          as in make_lora_fixtures.py (r = 4, alpha = 8)
  lora_a.<l>.<p>       [r, in] f32   A ~ N(0, 1/in)
  lora_b.<l>.<p>       [out, r] f32  B ~ N(0, 0.02^2)
  kd.loss, ce.loss     [1] f64
  kd.grad_a.<l>.<p>, kd.grad_b.<l>.<p>, ce.grad_a..., ce.grad_b...  f32

The model, adapters (forward hooks on transformers' own nn.Linear) and the
float64 computation are make_lora_fixtures.py's; the gradients come from
torch.autograd.grad of the step's loss. Checks: every gradient nonzero;
the kd loss of the step equals the hand formula.

    /work/venv-torch/bin/python scripts/make_lora_trace_fixtures.py   # a few seconds
"""

import math
import os

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from make_lora_fixtures import (ALPHA, B_STD, FIXTURES, OUT, RANK, add_adapters, float64_copy, kl_hand,
                                projections, save)

LENGTHS = [9, 6, 9]
PROMPTS = [3, 2, 5]
SEED = 4048


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    name = "tiny-llama3"
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    seqs = [torch.randint(0, V, (1, n), generator=gen) for n in LENGTHS]
    adapters32 = {}
    for l in range(L):
        for p, mod in projections(model, l).items():
            a = torch.randn(RANK, mod.in_features, generator=gen) * (1.0 / math.sqrt(mod.in_features))
            b = torch.randn(mod.out_features, RANK, generator=gen) * B_STD
            adapters32[(l, p)] = (a, b)
    m64 = float64_copy(model)
    count = sum(n - p for n, p in zip(LENGTHS, PROMPTS))
    leaves = {k: (a.double().requires_grad_(), b.double().requires_grad_()) for k, (a, b) in adapters32.items()}
    kd, ce, kd_hand = 0.0, 0.0, 0.0
    for ids, p in zip(seqs, PROMPTS):
        with torch.no_grad():
            teacher = m64(input_ids=ids).logits[0]
        handles = add_adapters(m64, leaves)
        student = m64(input_ids=ids).logits[0]
        for h in handles:
            h.remove()
        # Rows p-1 .. n-2 predict the generated positions p .. n-1.
        rows = slice(p - 1, ids.shape[1] - 1)
        log_ps = F.log_softmax(student[rows], dim=-1)
        log_pt = F.log_softmax(teacher[rows], dim=-1)
        kd = kd + F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / count
        kd_hand += kl_hand(log_ps, log_pt).item() / count
        ce = ce + F.cross_entropy(student[rows], ids[0, p:], reduction="sum") / count
    assert abs(kd.item() - kd_hand) <= 1e-12 * kd_hand, (kd.item(), kd_hand)
    keys = list(leaves)
    flat = [t for k in keys for t in leaves[k]]
    tensors = {
        "rank": torch.tensor([RANK], dtype=torch.int64),
        "alpha": torch.tensor([ALPHA], dtype=torch.float64),
        "kd.loss": kd.detach().reshape(1),
        "ce.loss": ce.detach().reshape(1),
    }
    for tag, loss in [("kd", kd), ("ce", ce)]:
        gs = torch.autograd.grad(loss, flat, retain_graph=True)
        for i, (l, p) in enumerate(keys):
            for ab, g in (("a", gs[2 * i]), ("b", gs[2 * i + 1])):
                assert g.abs().max() > 0, f"zero gradient {tag} {ab} {l} {p}"
                tensors[f"{tag}.grad_{ab}.{l}.{p}"] = g.float()
    for (l, p), (a, b) in adapters32.items():
        tensors[f"lora_a.{l}.{p}"] = a
        tensors[f"lora_b.{l}.{p}"] = b
    for i, (ids, p) in enumerate(zip(seqs, PROMPTS)):
        tensors[f"seq.{i}.ids"] = ids[0].to(torch.int64)
        tensors[f"seq.{i}.prompt"] = torch.tensor([p], dtype=torch.int64)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save(tensors, OUT / f"{name}-traces.safetensors",
         {"model": name, "seed": SEED, "lengths": LENGTHS, "prompts": PROMPTS, "b_std": B_STD})
    print(f"{name} traces: kd.loss = {kd.item():.6e}, ce.loss = {ce.item():.6f}, count = {count}")


if __name__ == "__main__":
    main()
