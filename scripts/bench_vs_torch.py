#!/usr/bin/env python3
"""Side-by-side speed and memory of rku-engine's CPU backend and PyTorch.

Measures, in one run on the same machine, model, tokens and thread count:
  forward  - one forward pass with logits over a T-token sequence (tokens/s)
  score    - forward + activation backward + per-channel statistics of the
             energy objective (tokens/s and peak RSS of the process)
  decode   - greedy decoding with a KV cache at batch --decode-batch (1;
             8 is the `traces` setting) after a 32-token prompt (tokens/s
             over all sequences; transformers' generate, prefill subtracted);
             rku-engine reads the ggml blocks the import kept
             (ggml_blocks.safetensors), which dequantise to exactly the f32
             weights transformers reads
  decode_f32 - the same with rku-engine reading the f32 weights (--no-ggml-blocks)
  recover  - one LoRA-KD training step (METHODS.md section 10) at batch
             --recover-batch x --seq-len tokens: rank-8 adapters on every
             projection, the model as its own teacher (adapters off for the
             teacher's forward), KL of the next-token distributions, backward
             to the adapters only, clipping, AdamW (tokens/s over
             --recover-steps steps after one warm-up step, and peak RSS);
             PyTorch runs the same adapters as forward hooks on
             transformers' own Linear modules
Each side runs in its own child process so peak RSS is measured per side
(os.wait4's ru_maxrss). torch/transformers are needed only here, never in CI.
With --backend cuda (forward only) both sides run on the GPU: rku-engine's
CUDA backend against transformers with the model's bf16 weights (both
multiply bf16 inputs with f32 accumulation), each pass timed to a device
synchronisation; it tells a slow GPU from slow kernels.

  python3 scripts/bench_vs_torch.py --model assets/models/smollm2 --bin target/release/rku-engine
"""
import argparse
import json
import os
import subprocess
import sys
import time


def run_child(cmd, env=None):
    """Runs cmd, returns (stdout, peak RSS in MiB)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"failed ({status}): {' '.join(cmd)}")
    return out, usage.ru_maxrss / 1024.0


def last_json(text):
    return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def torch_worker(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    cuda = args.backend == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.backend)
    model.eval()
    vocab = model.config.vocab_size
    T = args.seq_len
    ids = torch.tensor([[(i * 2654435761 + 12345) % vocab for i in range(T)]]).to(args.backend)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.torch_worker == "decode":
        prompt = ids[:, :32].repeat(args.decode_batch, 1)
        n = args.new_tokens

        def gen(k):
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
            return time.perf_counter() - t

        with torch.no_grad():
            gen(2)
            t1, tn = gen(1), gen(n + 1)
        print(json.dumps({"seconds": tn - t1, "tokens_per_s": args.decode_batch * n / (tn - t1)}))
        return
    if args.torch_worker == "recover":
        return torch_recover(args, model, torch)
    if args.torch_worker == "forward":
        with torch.no_grad():
            model(ids)
            sync()
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                model(ids)
                sync()
                times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        print(json.dumps({"median_s": med, "tokens_per_s": T / med}))
        return
    # score: energy objective J = (1/n) sum 1/2 |z|^2, retain_grad on down_proj inputs.
    for p in model.parameters():
        p.requires_grad_(False)
    acts = []

    def hook(mod, inp):
        h = inp[0]
        h.retain_grad()
        acts.append(h)

    layers = model.model.layers
    for layer in layers:
        layer.mlp.down_proj.register_forward_pre_hook(hook)
    m = model.config.intermediate_size
    stats = {k: torch.zeros(len(layers), m, dtype=torch.float64) for k in ("s1", "s2", "f2", "k1")}
    n = args.samples * T

    def one(seq_ids):
        acts.clear()
        emb = model.model.embed_tokens(seq_ids).detach().requires_grad_(True)
        out = model.model(inputs_embeds=emb)
        z = out.last_hidden_state
        j = 0.5 * (z.float() ** 2).sum() / n
        j.backward()
        for l, h in enumerate(acts):
            hv, g = h.detach()[0].double(), h.grad[0].double()
            stats["s1"][l] += hv.sum(0)
            stats["s2"][l] += (hv * hv).sum(0)
            stats["f2"][l] += (g * g).sum(0)
            stats["k1"][l] += (hv * g).abs().sum(0)

    one(ids)  # warm-up
    t = time.perf_counter()
    for _ in range(args.samples):
        one(ids)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "tokens_per_s": n / dt}))


def torch_recover(args, model, torch):
    import torch.nn.functional as F

    r, alpha = 8, 16.0
    scale = alpha / r
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    params, enabled = [], [True]

    def add_adapter(lin):
        a = torch.nn.Parameter(torch.randn(r, lin.in_features, generator=g) / lin.in_features ** 0.5)
        b = torch.nn.Parameter(torch.zeros(lin.out_features, r))
        params.extend([a, b])
        lin.register_forward_hook(lambda _m, inp, out: out + scale * (inp[0] @ a.t()) @ b.t() if enabled[0] else out)

    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        for lin in [at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]:
            add_adapter(lin)
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    B, T, vocab = args.recover_batch, args.seq_len, model.config.vocab_size
    ids = torch.tensor([[(i * 2654435761 + 12345) % vocab for i in range(B * T)]]).view(B, T)

    def step():
        enabled[0] = False
        with torch.no_grad():
            teacher = model(ids).logits[:, :-1].float()
        enabled[0] = True
        student = model(ids).logits[:, :-1].float()
        loss = F.kl_div(F.log_softmax(student, -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(args.recover_steps):
        step()
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "tokens_per_s": args.recover_steps * B * T / dt}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bin", default="target/release/rku-engine")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=4, help="sequences scored (score benchmark)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new-tokens", type=int, default=64, help="decoding steps timed (decode benchmark)")
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together (decode benchmark)")
    ap.add_argument("--recover-batch", type=int, default=8, help="sequences per step (recover benchmark)")
    ap.add_argument("--recover-steps", type=int, default=2, help="steps timed (recover benchmark)")
    ap.add_argument("--activation-memory", default="auto",
                    help="the engine's activation-memory budget for score and recover (auto, 0, 512M, ...)")
    ap.add_argument("--only", choices=["forward", "score", "decode", "decode_f32", "recover"])
    ap.add_argument("--backend", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: both sides on the GPU (forward only)")
    ap.add_argument("--torch-worker", choices=["forward", "score", "decode", "recover"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(args)
    if args.backend == "cuda" and args.only != "forward":
        ap.error("--backend cuda measures the forward pass only: add --only forward")

    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    me = [sys.executable, __file__, "--model", args.model, "--seq-len", str(args.seq_len),
          "--repeats", str(args.repeats), "--samples", str(args.samples), "--threads", str(args.threads),
          "--new-tokens", str(args.new_tokens), "--decode-batch", str(args.decode_batch), "--recover-batch", str(args.recover_batch),
          "--recover-steps", str(args.recover_steps), "--backend", args.backend]
    results = {}
    if not os.path.exists(os.path.join(args.model, "ggml_blocks.safetensors")):
        print(f"note: {args.model} has no ggml_blocks.safetensors: decode reads the f32 weights too")
    for kind in ["forward", "score", "decode", "decode_f32", "recover"]:
        if args.only and args.only != kind:
            continue
        if kind == "forward":
            ours_cmd = [args.bin, "bench", "forward", "--model", args.model, "--seq-len", str(args.seq_len),
                        "--repeats", str(args.repeats), "--backend", args.backend, "--json"]
        elif kind.startswith("decode"):
            ours_cmd = [args.bin, "bench", "decode", "--model", args.model, "--prompt-len", "32",
                        "--new-tokens", str(args.new_tokens), "--batch", str(args.decode_batch),
                        "--backend", "cpu", "--json"]
            if kind == "decode_f32":
                ours_cmd.append("--no-ggml-blocks")
        elif kind == "recover":
            ours_cmd = [args.bin, "bench", "recover", "--model", args.model, "--seq-len", str(args.seq_len),
                        "--batch", str(args.recover_batch), "--steps", str(args.recover_steps),
                        "--activation-memory", args.activation_memory, "--backend", "cpu", "--json"]
        else:
            ours_cmd = [args.bin, "bench", "score", "--model", args.model, "--seq-len", str(args.seq_len),
                        "--samples", str(args.samples), "--activation-memory", args.activation_memory,
                        "--backend", "cpu", "--json"]
        ours_out, ours_rss = run_child(ours_cmd, env)
        torch_kind = "decode" if kind == "decode_f32" else kind
        torch_out, torch_rss = run_child(me + ["--torch-worker", torch_kind], env)
        ours, theirs = last_json(ours_out), last_json(torch_out)
        r = {
            "rku_tokens_per_s": ours["tokens_per_s"],
            "torch_tokens_per_s": theirs["tokens_per_s"],
            "speed_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "rku_peak_rss_mib": ours_rss,
            "torch_peak_rss_mib": torch_rss,
            "memory_ratio": ours_rss / torch_rss,
        }
        results[kind] = r
        print(f"{kind:10s} T={args.seq_len} {args.backend} threads={args.threads}: rku {r['rku_tokens_per_s']:.0f} tok/s, "
              f"torch {r['torch_tokens_per_s']:.0f} tok/s, ratio {r['speed_ratio']:.2f}x; "
              f"peak RSS rku {ours_rss:.0f} MiB, torch {torch_rss:.0f} MiB (ratio {r['memory_ratio']:.2f})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
