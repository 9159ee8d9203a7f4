//! Incremental decoding with a KV cache, written over `Backend`.
//!
//! A `Decoder` holds, for every layer, key and value caches
//! `[seqs, cap, kv_heads·hd]` (keys after RoPE) and each sequence's cached
//! length. `extend` feeds new tokens to every sequence at once:
//!
//! - Sequences may receive different numbers of tokens (prompts of
//!   different lengths). The batch is right-padded to the longest, n rows per
//!   sequence, the padding being copies of the sequence's last real token.
//!   Padding never changes a result: every op but attention is row-wise, and
//!   attention is causal, so a real row (before the padding) never reads a
//!   padded one. Padded keys land in the cache past the sequence's length,
//!   which then advances only by its real count; they are overwritten by the
//!   next call and never attended to.
//! - Row (s, i) sits at position len[s] + i; RoPE tables are gathered per
//!   row on the host (f32, `angle = position · inv_freq` exactly as
//!   `RopeTables`) and applied with `Backend::rope` as one sequence of
//!   seqs·n rows.
//! - Only each sequence's last real row goes through the final norm and
//!   `lm_head`, so logits are `[seqs, vocab]` whatever the prompt lengths.
//!
//! `retain` drops finished sequences from the batch. `generate` is greedy
//! decoding on top: argmax of the logits (lowest id on ties), stopping at
//! EOS ids, stop strings or a token budget.
use super::forward::check_ids;
use super::weights::{LayerWeights, Model};
use crate::backend::{Backend, CacheShape};
use crate::io::text::Tokenizer;
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;

/// Per-layer key/value caches of a batch of sequences.
struct KvCache<B: Backend> {
    k: Vec<B::Buf>, // per layer [seqs, cap, kv]
    v: Vec<B::Buf>, // per layer [seqs, cap, kv]
    len: Vec<usize>,
}

/// A batch of sequences being decoded with a KV cache.
pub struct Decoder<'m, B: Backend> {
    be: &'m B,
    model: &'m Model<B>,
    cache: KvCache<B>,
    cap: usize,
    /// Host RoPE tables for positions 0..cap, `[cap, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// Empty caches for `seqs` sequences of up to `cap` tokens each.
    pub fn new(be: &'m B, model: &'m Model<B>, seqs: usize, cap: usize) -> Result<Self> {
        if seqs == 0 || cap == 0 {
            return Err(Error::Invalid(format!(
                "a decoder needs at least one sequence and one position ({seqs} × {cap})"
            )));
        }
        let c = &model.cfg;
        let size = seqs * cap * c.kv_dim();
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            k.push(be.zeros(size)?);
            v.push(be.zeros(size)?);
        }
        let inv: Vec<f32> = c.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let (mut cos, mut sin) = (
            Vec::with_capacity(cap * inv.len()),
            Vec::with_capacity(cap * inv.len()),
        );
        for p in 0..cap {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            be,
            model,
            cache: KvCache {
                k,
                v,
                len: vec![0; seqs],
            },
            cap,
            cos,
            sin,
        })
    }

    /// Tokens cached per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.cache.len
    }

    /// Appends `tokens[s]` (at least one token each) to sequence s and
    /// returns the logits after each sequence's last new token, `[seqs, vocab]`.
    pub fn extend(&mut self, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        let seqs = self.cache.len.len();
        if tokens.len() != seqs {
            return Err(Error::Invalid(format!(
                "{} token lists for a decoder of {seqs} sequences",
                tokens.len()
            )));
        }
        if let Some(s) = tokens.iter().position(|t| t.is_empty()) {
            return Err(Error::Invalid(format!("sequence {s} was given no tokens")));
        }
        let n = tokens.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs * n); // [seqs, n], right-padded
        for t in tokens {
            ids.extend_from_slice(t);
            ids.extend(std::iter::repeat_n(t[t.len() - 1], n - t.len()));
        }
        check_ids(&ids, self.model.cfg.vocab)?;
        if let Some(s) = (0..seqs).find(|&s| self.cache.len[s] + n > self.cap) {
            return Err(Error::Invalid(format!(
                "sequence {s}: {} cached + {n} new tokens exceed the decoder's {} positions",
                self.cache.len[s], self.cap
            )));
        }
        let x = self.run(&ids, n)?; // [seqs·n, d]
        for (len, t) in self.cache.len.iter_mut().zip(tokens) {
            *len += t.len();
        }
        let (be, c) = (self.be, &self.model.cfg);
        let d = c.hidden;
        let last = if n == 1 {
            x
        } else {
            let host = be.download(&x)?;
            let mut rows = Vec::with_capacity(seqs * d);
            for (s, t) in tokens.iter().enumerate() {
                rows.extend_from_slice(&host[(s * n + t.len() - 1) * d..][..d]);
            }
            be.upload(&rows)?
        };
        let (z, _) = be.rmsnorm_fwd(&last, &self.model.norm, seqs, d, c.rms_eps as f32)?;
        let logits = be.linear(&z, self.model.lm_head(), None, seqs, d, c.vocab)?;
        be.download(&logits)
    }

    /// Keeps only the sequences s with `keep[s]`, in order, and frees the
    /// others' slots. The caches are compacted through the host (one
    /// download and upload of each layer's caches), which pays off when the
    /// dropped sequences would otherwise keep computing for many steps.
    pub fn retain(&mut self, keep: &[bool]) -> Result<()> {
        let seqs = self.cache.len.len();
        if keep.len() != seqs || !keep.contains(&true) {
            return Err(Error::Invalid(format!(
                "retain: {} flags for {seqs} sequences, at least one kept",
                keep.len()
            )));
        }
        if !keep.contains(&false) {
            return Ok(());
        }
        let per = self.cap * self.model.cfg.kv_dim(); // one sequence's cache
        for buf in self.cache.k.iter_mut().chain(self.cache.v.iter_mut()) {
            let host = self.be.download(buf)?;
            let kept: Vec<f32> = host
                .chunks(per)
                .zip(keep)
                .filter(|(_, &k)| k)
                .flat_map(|(c, _)| c.iter().copied())
                .collect();
            *buf = self.be.upload(&kept)?;
        }
        let mut flags = keep.iter();
        self.cache.len.retain(|_| *flags.next().unwrap_or(&false));
        Ok(())
    }

    /// Appends one token to every sequence; logits `[seqs, vocab]`.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let t: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
        self.extend(&t)
    }

    /// All layers over `ids` (`[seqs, n]`, row (s, i) at position len[s]+i);
    /// returns the final residual `[seqs·n, d]`. Lengths are not advanced.
    fn run(&mut self, ids: &[u32], n: usize) -> Result<B::Buf> {
        let (be, c) = (self.be, &self.model.cfg);
        let half = c.head_dim / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for &len in &self.cache.len {
            for p in len..len + n {
                cos.extend_from_slice(&self.cos[p * half..][..half]);
                sin.extend_from_slice(&self.sin[p * half..][..half]);
            }
        }
        let (cos, sin) = (be.upload(&cos)?, be.upload(&sin)?); // [seqs·n, hd/2]
        let shape = CacheShape {
            seqs: self.cache.len.len(),
            n,
            cap: self.cap,
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        };
        let mut x = be.embedding(ids, &self.model.embed, c.hidden)?; // [rows, d]
        let model = self.model;
        model.for_each_layer(be, 0..c.layers, |l, lw| {
            self.layer(l, lw, &mut x, &cos, &sin, shape)
        })?;
        Ok(x)
    }

    /// One decoder layer in place on `x` (`[rows, d]`, rows = seqs·n), the
    /// attention reading and extending layer `l`'s cache; otherwise exactly
    /// `forward::layer_forward`.
    fn layer(
        &mut self,
        l: usize,
        lw: &LayerWeights<B::Weight>,
        x: &mut B::Buf,
        cos: &B::Buf,
        sin: &B::Buf,
        shape: CacheShape,
    ) -> Result<()> {
        let (be, c) = (self.be, &self.model.cfg);
        let (rows, d, m) = (shape.seqs * shape.n, c.hidden, lw.ffn);
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let eps = c.rms_eps as f32;

        let (u, _) = be.rmsnorm_fwd(x, &lw.attn_norm, rows, d, eps)?; // [rows, d]
        let [mut q, mut k, v] = be.linear_many(
            &u,
            [
                (&lw.wq, lw.bq.as_ref(), qd),  // [rows, q]
                (&lw.wk, lw.bk.as_ref(), kvd), // [rows, kv]
                (&lw.wv, lw.bv.as_ref(), kvd), // [rows, kv]
            ],
            rows,
            d,
        )?;
        drop(u);
        be.rope(&mut q, cos, sin, 1, rows, c.heads, c.head_dim, false)?;
        be.rope(&mut k, cos, sin, 1, rows, c.kv_heads, c.head_dim, false)?;
        let (kc, vc) = (&mut self.cache.k[l], &mut self.cache.v[l]);
        let att = be.attention_cached(&q, &k, &v, kc, vc, &self.cache.len, shape)?; // [rows, q]
        let o = be.linear(&att, &lw.wo, None, rows, qd, d)?; // [rows, d]
        be.add_assign(x, &o, rows * d)?; // x' = x + Attn

        let (u2, _) = be.rmsnorm_fwd(x, &lw.ffn_norm, rows, d, eps)?; // [rows, d]
        let gate_up = [(&lw.w_gate, None, m), (&lw.w_up, None, m)];
        let [a, b] = be.linear_many(&u2, gate_up, rows, d)?; // [rows, m] each
        drop(u2);
        let h = be.swiglu_fwd(&a, &b, rows * m)?; // [rows, m]
        let y = be.linear(&h, &lw.w_down, lw.b_down.as_ref(), rows, m, d)?; // [rows, d]
        be.add_assign(x, &y, rows * d) // x_next = x' + W_d h
    }
}

/// The greedy choice: index of the largest logit, the lowest on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// When greedy decoding stops.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// Token budget per sequence.
    pub max_new_tokens: usize,
    /// Ids that end a sequence (not included in its output).
    pub eos_ids: Vec<u32>,
    /// Strings that end a sequence once they appear in its decoded text
    /// (the text is cut before the earliest one).
    pub stop: Vec<String>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    StopString,
    MaxTokens,
}

/// One sequence's greedy continuation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// Generated ids, EOS excluded; with a stop string, every id up to and
    /// including the one that completed it.
    pub ids: Vec<u32>,
    /// Decoded text of `ids`, cut before the stop string.
    pub text: String,
    pub finish: Finish,
}

/// Timings of one `generate` call.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DecodeStats {
    /// Prompt tokens prefilled (padding excluded).
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    /// Tokens chosen from the logits of decode steps (after the first,
    /// which comes from the prefill), EOS included.
    pub decode_tokens: usize,
    pub decode_s: f64,
}

impl DecodeStats {
    /// Decode throughput: `decode_tokens / decode_s`.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.decode_tokens as f64 / self.decode_s
        } else {
            0.0
        }
    }

    pub fn add(&mut self, o: &DecodeStats) {
        self.prompt_tokens += o.prompt_tokens;
        self.prefill_s += o.prefill_s;
        self.decode_tokens += o.decode_tokens;
        self.decode_s += o.decode_s;
    }
}

/// Greedy continuation of each prompt, all decoded together as one batch
/// (one KV cache of `max prompt + max_new_tokens` positions per sequence).
/// After a step in which sequences stopped, they are dropped from the
/// batch (`Decoder::retain`), so the rest decode at the smaller width.
pub fn generate<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<(Vec<Generation>, DecodeStats)> {
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            ids: Vec::new(),
            text: String::new(),
            finish: Finish::MaxTokens,
        })
        .collect();
    let mut stats = DecodeStats {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        ..Default::default()
    };
    if prompts.is_empty() || opts.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut dec = Decoder::new(be, model, prompts.len(), longest + opts.max_new_tokens)?;
    let vocab = model.cfg.vocab;
    let t0 = Instant::now();
    let mut logits = dec.extend(prompts)?;
    stats.prefill_s = t0.elapsed().as_secs_f64();
    let mut active = vec![true; prompts.len()];
    let mut next = vec![0u32; prompts.len()];
    // Decoder slot → prompt index; stopped sequences are dropped from the batch.
    let mut slots: Vec<usize> = (0..prompts.len()).collect();
    let t1 = Instant::now();
    for step in 0.. {
        for (row, &s) in slots.iter().enumerate() {
            let g = &mut out[s];
            let id = argmax(&logits[row * vocab..(row + 1) * vocab]);
            next[s] = id;
            if step > 0 {
                stats.decode_tokens += 1;
            }
            if opts.eos_ids.contains(&id) {
                g.finish = Finish::Eos;
                active[s] = false;
                continue;
            }
            g.ids.push(id);
            g.text = tok.decode(&g.ids)?;
            if let Some(cut) = opts
                .stop
                .iter()
                .filter_map(|st| g.text.find(st.as_str()))
                .min()
            {
                g.text.truncate(cut);
                g.finish = Finish::StopString;
                active[s] = false;
            } else if g.ids.len() == opts.max_new_tokens {
                active[s] = false;
            }
        }
        if !slots.iter().any(|&s| active[s]) {
            break;
        }
        if slots.iter().any(|&s| !active[s]) {
            let keep: Vec<bool> = slots.iter().map(|&s| active[s]).collect();
            dec.retain(&keep)?;
            slots.retain(|&s| active[s]);
        }
        let tokens: Vec<u32> = slots.iter().map(|&s| next[s]).collect();
        logits = dec.step(&tokens)?;
    }
    stats.decode_s = t1.elapsed().as_secs_f64();
    Ok((out, stats))
}
