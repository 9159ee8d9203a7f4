#!/usr/bin/env python3
"""Independent PyTorch reference for the LoRA distillation recovery (METHODS.md §10).

For each tiny fixture model (tests/fixtures/tiny-llama3, tiny-qwen2; and
tiny-gemma3, made alone by `--only tiny-gemma3`) writes
tests/fixtures/lora/<model>.safetensors, with l = 0..L−1 the layer and p one
of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj:

  ids                  [N, T] int64    seeded random ids in [0, V) (N = 3, T = 10)
  rank                 [1] int64       r = 4
  alpha                [1] f64         8.0 (scale s = alpha / r = 2)
  lora_a.<l>.<p>       [r, in] f32     A ~ N(0, 1/in)
  lora_b.<l>.<p>       [out, r] f32    B ~ N(0, 0.02²)
  kd.loss              [1] f64         (1/count)·Σ_counted KL(p_teacher ‖ p_student)
  kd.grad_a.<l>.<p>    [r, in] f32     ∂ kd.loss / ∂A
  kd.grad_b.<l>.<p>    [out, r] f32    ∂ kd.loss / ∂B
  ce.loss              [1] f64         mean next-token cross-entropy of the student
  ce.grad_a.<l>.<p>    [r, in] f32     ∂ ce.loss / ∂A
  ce.grad_b.<l>.<p>    [out, r] f32    ∂ ce.loss / ∂B
  logits.adapted       [N, T, V] f32   the student's logits (adapters unmerged)
  logits.merged        [N, T, V] f32   logits with W' = W + s·B·A merged in f32

and tests/fixtures/lora/optim.safetensors (no model):

  adamw.hyper          [5] f64         lr, beta1, beta2, eps, weight_decay
  adamw.p0             [257] f32       the parameter before the first step
  adamw.g.<i>          [257] f32       the gradient of step i = 1..3
  adamw.p.<i>          [257] f32       the parameter after step i
  adamw.m.<i>          [257] f32       exp_avg after step i
  adamw.v.<i>          [257] f32       exp_avg_sq after step i
  clip.g.0, .1, .2     [7], [5,3], [11] f32   gradients, global norm ≈ 3
  clip.norm            [1] f64         what clip_grad_norm_(max_norm=1) returns
  clip.out.0, .1, .2   same shapes f32 the clipped gradients
  kl.z, kl.z_t         [5, 16] f32     student / teacher hidden rows
  kl.w, kl.w_t         [50, 16] f32    student / teacher output matrices
  kl.counted           [5] int64       1 = row counted (1, 0, 1, 1, 1)
  kl.sum               [1] f64         Σ_counted KL(softmax(z_t·w_tᵀ) ‖ softmax(z·wᵀ))
  kl.dz                [5, 16] f32     ∂(kl.sum / count)/∂z (0 on uncounted rows)

Conventions (the engine's contract). An adapted nn.Linear with weight W
[out, in] and bias b computes y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ; adapters sit on
the seven projections of every layer, nowhere else (not on lm_head or the
embedding). Student = base model + adapters, teacher = the same base model
without them. Counted rows are positions 0..T−2 of each sequence (those
with a next token), count = N·(T−1). kd.loss =
F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True,
reduction="sum") / count over the counted rows; ce.loss =
F.cross_entropy over the same rows, target = the next id.

Random draws, all from one torch.Generator seeded with SEED (float32):
ids first, then for each layer l in order and each p in the order above,
A (randn·1/√in) then B (randn·0.02). optim.safetensors uses its own
generator seeded with OPTIM_SEED, drawn in the order of the list above.

The algorithm is written independently of the engine's: no hand-written
backward. The adapters are forward hooks on transformers' own nn.Linear
modules (output + s·(x·Aᵀ)·Bᵀ, the weights themselves untouched and
frozen), and every gradient comes from torch.autograd.grad. The reference
math runs in float64: the float32 model (weights, A, B exactly converted)
is `.double()`d, transformers' RMSNorm is given a dtype-preserving forward
(it upcasts to float32 only) and attention goes through SDPA (eager takes
the softmax in float32); the rotary cos/sin are transformers' own (formed
in float32, then converted). Results are stored in float32 except the
losses, `alpha`, `clip.norm`, `kl.sum` and `adamw.hyper`. The merged
model is a deepcopy of the float32 model whose projection weights get
W + s·(B·A) in float32, then run in float64 like the student.

Checks (the script stops if one fails): merged logits == adapted logits to
1e-5 relative (max |Δ| / max |logit|); F.kl_div == the hand formula
Σ p_t·(log p_t − log p_s) (both the model's KD and kl.sum); kl.dz == the
closed form (p_s − p_t)·w / count; ce.loss == transformers' own `labels=`
loss (to 1e-6: transformers takes the loss of float32 logits); every saved
gradient tensor nonzero; autograd == central finite differences (ε = 1e-6)
on five adapter entries for both losses, to 1e-5 relative; the AdamW and
clipping results == their update formulas written out by hand.

    python scripts/make_lora_fixtures.py   # a few seconds; needs torch, transformers, safetensors
"""

import copy
import json
import math
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "lora"
N, T = 3, 10
RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
B_STD = 0.02
SEED = 2024
OPTIM_SEED = 99
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def projections(model, l):
    layer = model.model.layers[l]
    mods = {p: getattr(layer.self_attn, p) for p in PROJ[:4]}
    mods.update({p: getattr(layer.mlp, p) for p in PROJ[4:]})
    return mods


def float64_copy(model):
    """A float64 copy that really computes in float64 (norms and attention)."""
    m64 = copy.deepcopy(model).double()

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def gemma_rms_forward(self, x):  # Gemma's norms scale by (1 + w)
        var = x.pow(2).mean(-1, keepdim=True)
        return (1.0 + self.weight) * (x * torch.rsqrt(var + self.eps))

    for mod in m64.modules():
        name = type(mod).__name__
        if name.startswith("Gemma") and name.endswith("RMSNorm"):
            mod.forward = types.MethodType(gemma_rms_forward, mod)
        elif name.endswith("RMSNorm"):
            mod.forward = types.MethodType(rms_forward, mod)
    m64.set_attn_implementation("sdpa")
    for prm in m64.parameters():
        prm.requires_grad_(False)
    return m64


def add_adapters(model, adapters):
    """Forward hooks adding s·(x·Aᵀ)·Bᵀ to each projection; returns the handles."""
    handles = []
    for l in range(model.config.num_hidden_layers):
        for p, mod in projections(model, l).items():
            a, b = adapters[(l, p)]

            def hook(_m, args, out, a=a, b=b):
                return out + SCALE * ((args[0] @ a.T) @ b.T)

            handles.append(mod.register_forward_hook(hook))
    return handles


def counted_rows(logits):
    """Logits of positions 0..T−2 as [count, V]."""
    return logits[:, :-1, :].reshape(-1, logits.shape[-1])


def kl_hand(log_ps, log_pt):
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def max_rel(x, ref):
    return ((x - ref).abs().max() / ref.abs().max()).item()


def make(name):
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    cfg = model.config
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, V, (N, T), generator=gen)
    adapters32 = {}
    for l in range(L):
        for p, mod in projections(model, l).items():
            a = torch.randn(RANK, mod.in_features, generator=gen) * (1.0 / math.sqrt(mod.in_features))
            b = torch.randn(mod.out_features, RANK, generator=gen) * B_STD
            adapters32[(l, p)] = (a, b)

    m64 = float64_copy(model)
    count = N * (T - 1)
    targets = ids[:, 1:].reshape(-1)

    # Teacher: the base model, no adapters.
    with torch.no_grad():
        teacher = m64(input_ids=ids).logits
    # Student: the same modules with the adapters hooked on.
    leaves = {k: (a.double().requires_grad_(), b.double().requires_grad_()) for k, (a, b) in adapters32.items()}
    handles = add_adapters(m64, leaves)
    student = m64(input_ids=ids).logits
    log_ps = F.log_softmax(counted_rows(student), dim=-1)
    log_pt = F.log_softmax(counted_rows(teacher), dim=-1)
    kd = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum") / count
    ce = F.cross_entropy(counted_rows(student), targets)
    with torch.no_grad():
        ce_hf = m64(input_ids=ids, labels=ids).loss
    for h in handles:
        h.remove()

    kd_hand = kl_hand(log_ps, log_pt) / count
    assert abs(kd.item() - kd_hand.item()) <= 1e-12 * abs(kd_hand.item()), (kd.item(), kd_hand.item())
    # transformers' loss upcasts the logits to float32 only, hence 1e-6.
    assert abs(ce.item() - ce_hf.item()) <= 1e-6 * ce_hf.item(), (ce.item(), ce_hf.item())
    assert kd.item() > 0

    keys = list(leaves)
    flat = [t for k in keys for t in leaves[k]]
    grads = {}
    for tag, loss in [("kd", kd), ("ce", ce)]:
        gs = torch.autograd.grad(loss, flat, retain_graph=True)
        for i, k in enumerate(keys):
            grads[(tag, "a", k)] = gs[2 * i]
            grads[(tag, "b", k)] = gs[2 * i + 1]
    for key, g in grads.items():
        assert g.abs().max() > 0, f"zero gradient {key}"

    # Central finite differences on a few adapter entries (float64, ε = 1e-6).
    def losses():
        hs = add_adapters(m64, leaves)
        with torch.no_grad():
            lg = m64(input_ids=ids).logits
        for h in hs:
            h.remove()
        lp = F.log_softmax(counted_rows(lg), dim=-1)
        k = F.kl_div(lp, log_pt, log_target=True, reduction="sum") / count
        return {"kd": k.item(), "ce": F.cross_entropy(counted_rows(lg), targets).item()}

    worst = 0.0
    for l, p, ab, idx in [(0, "q_proj", "a", (1, 2)), (0, "v_proj", "b", (3, 0)), (L - 1, "down_proj", "a", (0, 5)),
                          (L - 1, "gate_proj", "b", (7, 2)), (L // 2, "o_proj", "a", (2, 1))]:
        leaf = leaves[(l, p)][0 if ab == "a" else 1]
        eps = 1e-6
        with torch.no_grad():
            leaf[idx] += eps
            up = losses()
            leaf[idx] -= 2 * eps
            down = losses()
            leaf[idx] += eps
        for tag in ["kd", "ce"]:
            fd = (up[tag] - down[tag]) / (2 * eps)
            g = grads[(tag, ab, (l, p))][idx].item()
            err = abs(fd - g) / max(abs(g), 1e-3 * grads[(tag, ab, (l, p))].abs().max().item())
            worst = max(worst, err)
            assert err <= 1e-5, (tag, l, p, ab, idx, fd, g)

    # Merged: W' = W + s·B·A in float32, then the same float64 forward.
    merged32 = copy.deepcopy(model)
    with torch.no_grad():
        for l in range(L):
            for p, mod in projections(merged32, l).items():
                a, b = adapters32[(l, p)]
                mod.weight.copy_(mod.weight + SCALE * (b @ a))
        merged = float64_copy(merged32)(input_ids=ids).logits
    rel = max_rel(merged, student.detach())
    assert rel <= 1e-5, f"merged vs adapted logits: {rel:.3e} relative"
    moved = max_rel(student.detach(), teacher)
    assert moved > 1e-4, f"adapters barely change the logits ({moved:.3e})"

    tensors = {
        "ids": ids,
        "rank": torch.tensor([RANK], dtype=torch.int64),
        "alpha": torch.tensor([ALPHA], dtype=torch.float64),
        "kd.loss": kd.detach().reshape(1),
        "ce.loss": ce.detach().reshape(1),
        "logits.adapted": student.detach().float(),
        "logits.merged": merged.float(),
    }
    for (l, p), (a, b) in adapters32.items():
        tensors[f"lora_a.{l}.{p}"] = a
        tensors[f"lora_b.{l}.{p}"] = b
    for (tag, ab, (l, p)), g in grads.items():
        tensors[f"{tag}.grad_{ab}.{l}.{p}"] = g.float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save(tensors, OUT / f"{name}.safetensors", {"model": name, "seed": SEED, "N": N, "T": T, "b_std": B_STD})
    print(
        f"{name}: kd.loss = {kd.item():.6e}, ce.loss = {ce.item():.6f}, "
        f"merged vs adapted {rel:.2e} relative, student vs teacher {moved:.2e}, "
        f"finite differences {worst:.1e} relative"
    )


def make_optim():
    gen = torch.Generator().manual_seed(OPTIM_SEED)
    t = {}

    # AdamW, three steps in float32.
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1
    t["adamw.hyper"] = torch.tensor([lr, beta1, beta2, eps, wd], dtype=torch.float64)
    p0 = torch.randn(257, generator=gen)
    gs = [torch.randn(257, generator=gen) for _ in range(3)]
    t["adamw.p0"] = p0.clone()
    prm = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([prm], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    hp, hm, hv = p0.double(), torch.zeros(257, dtype=torch.float64), torch.zeros(257, dtype=torch.float64)
    for i, g in enumerate(gs, start=1):
        t[f"adamw.g.{i}"] = g.clone()
        prm.grad = g.clone()
        opt.step()
        st = opt.state[prm]
        t[f"adamw.p.{i}"] = prm.detach().clone()
        t[f"adamw.m.{i}"] = st["exp_avg"].clone()
        t[f"adamw.v.{i}"] = st["exp_avg_sq"].clone()
        # The update written out (float64), to check the optimizer's order of operations.
        g64 = g.double()
        hp = hp * (1 - lr * wd)
        hm = beta1 * hm + (1 - beta1) * g64
        hv = beta2 * hv + (1 - beta2) * g64 * g64
        hp = hp - lr / (1 - beta1**i) * hm / (hv.sqrt() / math.sqrt(1 - beta2**i) + eps)
        for key, ref in [("p", hp), ("m", hm), ("v", hv)]:
            r = max_rel(t[f"adamw.{key}.{i}"].double(), ref)
            assert r <= 1e-6, (key, i, r)

    # Gradient clipping to max_norm = 1 of three tensors of global norm ≈ 3.
    shapes = [(7,), (5, 3), (11,)]
    raw = [torch.randn(*s, generator=gen) for s in shapes]
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in raw))
    clip_g = [g * (3.0 / total) for g in raw]
    params = []
    for j, g in enumerate(clip_g):
        t[f"clip.g.{j}"] = g.clone()
        prm = torch.nn.Parameter(torch.zeros(g.shape))
        prm.grad = g.clone()
        params.append(prm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, foreach=False)
    t["clip.norm"] = norm.detach().double().reshape(1)
    norm64 = math.sqrt(sum(float((g.double() ** 2).sum()) for g in clip_g))
    assert abs(norm.item() - norm64) <= 1e-6 * norm64 and abs(norm64 - 3.0) < 1e-5, (norm.item(), norm64)
    coef = min(1.0, 1.0 / (norm64 + 1e-6))
    for j, prm in enumerate(params):
        t[f"clip.out.{j}"] = prm.grad.clone()
        assert max_rel(prm.grad.double(), clip_g[j].double() * coef) <= 1e-6, j

    # The KL alone: student logits z·wᵀ, teacher z_t·w_tᵀ, some rows not counted.
    R, D, VV = 5, 16, 50
    z = torch.randn(R, D, generator=gen)
    z_t = torch.randn(R, D, generator=gen)
    w = torch.randn(VV, D, generator=gen) * 0.25
    w_t = torch.randn(VV, D, generator=gen) * 0.25
    counted = torch.tensor([1, 0, 1, 1, 1], dtype=torch.int64)
    t.update({"kl.z": z, "kl.z_t": z_t, "kl.w": w, "kl.w_t": w_t, "kl.counted": counted})
    rows = counted.bool()
    cnt = int(rows.sum())
    z64 = z.double().requires_grad_()
    log_ps = F.log_softmax((z64 @ w.double().T)[rows], dim=-1)
    log_pt = F.log_softmax((z_t.double() @ w_t.double().T)[rows], dim=-1)
    kl_sum = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")
    hand = kl_hand(log_ps, log_pt)
    assert abs(kl_sum.item() - hand.item()) <= 1e-12 * hand.item(), (kl_sum.item(), hand.item())
    (dz,) = torch.autograd.grad(kl_sum / cnt, [z64])
    closed = torch.zeros(R, D, dtype=torch.float64)
    closed[rows] = (log_ps.exp() - log_pt.exp()).detach() @ w.double() / cnt
    assert max_rel(dz, closed) <= 1e-12 and dz[~rows].abs().max() == 0
    t["kl.sum"] = kl_sum.detach().reshape(1)
    t["kl.dz"] = dz.float()

    t = {k: v.contiguous() for k, v in t.items()}
    save(t, OUT / "optim.safetensors", {"seed": OPTIM_SEED})
    print(f"optim: clip.norm = {norm.item():.6f}, kl.sum = {kl_sum.item():.6f}")


def save(tensors, path, meta):
    import transformers

    meta = dict(meta, torch=torch.__version__, transformers=transformers.__version__)
    OUT.mkdir(exist_ok=True)
    save_file(tensors, str(path), metadata={"reference": json.dumps(meta, sort_keys=True)})
    print(f"wrote {path.relative_to(ROOT)} ({len(tensors)} tensors, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tiny-gemma3"],
                    help="make only this model's file (the others untouched)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.only:
        make(args.only)
    else:
        for name in ["tiny-llama3", "tiny-qwen2"]:
            make(name)
        make_optim()
