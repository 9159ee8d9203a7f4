//! Throughput of the model's passes on synthetic token ids (`bench forward`,
//! `bench decode`; `bench score` is `prune::calibrate::bench_score`): what a
//! user compares against another engine on the same machine.
use crate::backend::Backend;
use crate::eval::prefill::{timed_forward, Timing};
use crate::model::decode::{argmax, Decoder};
use crate::model::forward::synthetic_ids;
use crate::model::{Geometry, Model, ModelConfig};
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;

/// `bench forward`: forward passes with logits.
#[derive(Clone, Debug, Serialize)]
pub struct ForwardBench {
    pub seq_len: usize,
    pub batch: usize,
    pub repeats: usize,
    pub timing: Timing,
    /// Time until the host had issued the pass's last launch (`PassTime`):
    /// near `timing`, the pass is bound by the host side.
    pub queued: Timing,
    /// Tokens per second at the median time.
    pub tokens_per_s: f64,
    /// Multiply-add FLOPs per second at the median time (`forward_flops`).
    pub gflops: f64,
    pub backend: String,
}

/// FLOPs of one forward pass over `seqs` sequences of `t` tokens:
/// 2·(q, k, v, o, gate, up, down and lm_head weights) per token, plus the
/// causal attention products QKᵀ and PV, 2·2·q_dim·(t+1)/2 per token and layer.
pub fn forward_flops(cfg: &ModelConfig, seqs: usize, t: usize) -> f64 {
    let d = cfg.hidden as f64;
    let per_layer: f64 = cfg
        .ffn_widths
        .iter()
        .map(|&m| d * (2.0 * cfg.q_dim() as f64 + 2.0 * cfg.kv_dim() as f64) + 3.0 * d * m as f64)
        .sum();
    let weights = per_layer + d * cfg.vocab as f64;
    let attn = cfg.layers as f64 * 2.0 * cfg.q_dim() as f64 * (t as f64 + 1.0);
    seqs as f64 * t as f64 * (2.0 * weights + attn)
}

/// Times `repeats` forward passes of `batch` × `seq_len` tokens after one warm-up.
pub fn bench_forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    seq_len: usize,
    batch: usize,
    repeats: usize,
) -> Result<ForwardBench> {
    if seq_len == 0 || batch == 0 || repeats == 0 {
        return Err(Error::Invalid(
            "--seq-len, --batch and --repeats must be at least 1".into(),
        ));
    }
    let geo = Geometry {
        seqs: batch,
        t: seq_len,
    };
    let ids = synthetic_ids(geo.rows(), model.cfg.vocab);
    timed_forward(be, model, &ids, geo)?;
    let passes = (0..repeats)
        .map(|_| timed_forward(be, model, &ids, geo))
        .collect::<Result<Vec<_>>>()?;
    let timing = Timing::of(passes.iter().map(|p| p.seconds).collect());
    let queued = Timing::of(passes.iter().map(|p| p.queued_s).collect());
    Ok(ForwardBench {
        seq_len,
        batch,
        repeats,
        tokens_per_s: geo.rows() as f64 / timing.median_s,
        gflops: forward_flops(&model.cfg, batch, seq_len) / timing.median_s / 1e9,
        timing,
        queued,
        backend: be.name().into(),
    })
}

/// `bench decode`: greedy decoding steps with the KV cache.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeBench {
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub batch: usize,
    pub seconds: f64,
    /// Generated tokens per second, all sequences counted.
    pub tokens_per_s: f64,
    pub backend: String,
}

/// Prefills `batch` copies of a `prompt_len`-token prompt (not timed), then
/// times `new_tokens` greedy decoding steps.
pub fn bench_decode<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompt_len: usize,
    new_tokens: usize,
    batch: usize,
) -> Result<DecodeBench> {
    if prompt_len == 0 || new_tokens == 0 || batch == 0 {
        return Err(Error::Invalid(
            "--prompt-len, --new-tokens and --batch must be at least 1".into(),
        ));
    }
    let prompt = synthetic_ids(prompt_len, model.cfg.vocab);
    let mut dec = Decoder::new(be, model, batch, prompt_len + new_tokens)?;
    let vocab = model.cfg.vocab;
    let next_ids = |logits: &[f32]| -> Vec<u32> { logits.chunks(vocab).map(argmax).collect() };
    let mut next = next_ids(&dec.extend(&vec![prompt; batch])?);
    let start = Instant::now();
    for _ in 0..new_tokens {
        next = next_ids(&dec.step(&next)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(DecodeBench {
        prompt_len,
        new_tokens,
        batch,
        seconds,
        tokens_per_s: (batch * new_tokens) as f64 / seconds,
        backend: be.name().into(),
    })
}
