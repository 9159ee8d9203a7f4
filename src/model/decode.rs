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
//! - With a sliding window W (Mistral; Gemma 3's local layers, whose
//!   global layers keep `cap` positions), the caches are rings of
//!   `slots = min(cap, W + C − 1)` positions per sequence, C = min(W,
//!   `WINDOW_CHUNK`): position p in slot p mod slots
//!   (`Backend::attention_cached`), so a sequence's cache is bounded
//!   by its window whatever its length. A call with more than C new tokens
//!   (a long prompt) runs in chunks of at most C, each writing no slot a
//!   query of the chunk still reads; a sequence whose tokens ran out feeds
//!   its last token again as padding (length not advanced, as above), and
//!   its logits come from the chunk that held its last real token.
//!
//! `retain` drops finished sequences from the batch. `generate` is greedy
//! decoding on top: argmax of the logits (lowest id on ties), stopping at
//! EOS ids, stop strings or a token budget. `generate_sampled` is the same
//! loop drawing each token by temperature / top-p sampling instead
//! (METHODS.md §11): every draw's uniform number comes from a counter-based
//! hash of (seed, prompt, sample, position), never from a generator
//! advanced in batch order, so a sequence's tokens do not depend on which
//! sequences share its batch.
use super::forward::{check_ids, qk_norm_fwd, rope_host_tables};
use super::weights::{LayerWeights, Model};
use crate::backend::{Backend, CacheShape};
use crate::io::text::Tokenizer;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// Per-layer key/value caches of a batch of sequences.
struct KvCache<B: Backend> {
    k: Vec<B::Buf>, // per layer [seqs, slots, kv]
    v: Vec<B::Buf>, // per layer [seqs, slots, kv]
    len: Vec<usize>,
}

/// Most new tokens per run under a sliding window (the C of the module
/// doc, when the window is wider): the ring then holds W + C − 1 positions.
const WINDOW_CHUNK: usize = 512;

/// A batch of sequences being decoded with a KV cache.
pub struct Decoder<'m, B: Backend> {
    be: &'m B,
    model: &'m Model<B>,
    cache: KvCache<B>,
    cap: usize,
    /// Cache slots per sequence of each layer: `cap`, or the ring on a
    /// layer with a sliding window.
    slots: Vec<usize>,
    /// Most new tokens one run may take (unbounded unless the ring wraps).
    chunk: usize,
    /// Host RoPE tables `(cos, sin)` for positions 0..cap, `[cap,
    /// head_dim/2]` each: the global layers', then the local layers' when
    /// their base differs (Gemma 3).
    rope: Vec<(Vec<f32>, Vec<f32>)>,
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
        let (ring, chunk) = match c.sliding_window {
            Some(w) if w.saturating_add(w.min(WINDOW_CHUNK)) <= cap => {
                let chunk = w.min(WINDOW_CHUNK);
                (Some(w + chunk - 1), chunk)
            }
            _ => (None, usize::MAX),
        };
        let slots: Vec<usize> = (0..c.layers)
            .map(|l| ring.filter(|_| c.is_local(l)).unwrap_or(cap))
            .collect();
        let mut k = Vec::with_capacity(c.layers);
        let mut v = Vec::with_capacity(c.layers);
        for &s in &slots {
            k.push(be.zeros(seqs * s * c.kv_dim())?);
            v.push(be.zeros(seqs * s * c.kv_dim())?);
        }
        let mut rope = vec![rope_host_tables(c, false, cap)];
        if c.two_rope_bases() {
            rope.push(rope_host_tables(c, true, cap));
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
            slots,
            chunk,
            rope,
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
        if n > self.chunk {
            return self.extend_chunked(tokens, n);
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
        self.logits(&last)
    }

    /// `extend` of up to `n` tokens per sequence in runs of at most
    /// `self.chunk` (the ring case of the module doc); arguments checked.
    fn extend_chunked(&mut self, tokens: &[Vec<u32>], n: usize) -> Result<Vec<f32>> {
        let (seqs, d) = (tokens.len(), self.model.cfg.hidden);
        let mut last = vec![0f32; seqs * d];
        let mut start = 0;
        while start < n {
            let m = (n - start).min(self.chunk);
            let mut ids = Vec::with_capacity(seqs * m); // [seqs, m], right-padded
            let mut real = Vec::with_capacity(seqs);
            for t in tokens {
                let part = &t[start.min(t.len())..(start + m).min(t.len())];
                let pad = part.last().unwrap_or(&t[t.len() - 1]);
                ids.extend_from_slice(part);
                ids.extend(std::iter::repeat_n(*pad, m - part.len()));
                real.push(part.len());
            }
            let host = self.be.download(&self.run(&ids, m)?)?; // [seqs·m, d]
            for (s, t) in tokens.iter().enumerate() {
                if real[s] > 0 && start + real[s] == t.len() {
                    last[s * d..][..d].copy_from_slice(&host[(s * m + real[s] - 1) * d..][..d]);
                }
                self.cache.len[s] += real[s];
            }
            start += m;
        }
        let last = self.be.upload(&last)?;
        self.logits(&last)
    }

    /// Logits `[seqs, vocab]` of the final residual rows `x` `[seqs, d]`.
    fn logits(&self, last: &B::Buf) -> Result<Vec<f32>> {
        let (be, c) = (self.be, &self.model.cfg);
        let (seqs, d) = (self.cache.len.len(), c.hidden);
        let (z, _) = be.rmsnorm_fwd(last, &self.model.norm, seqs, d, c.rms_eps as f32)?;
        let logits = be.linear(&z, self.model.lm_head(be)?, None, seqs, d, c.vocab)?;
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
        let bufs = self.cache.k.iter_mut().zip(&self.slots);
        for (buf, slots) in bufs.chain(self.cache.v.iter_mut().zip(&self.slots)) {
            let per = slots * self.model.cfg.kv_dim(); // one sequence's cache
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
        // Each table's rows at the batch's positions, [seqs·n, hd/2].
        let mut rope = Vec::with_capacity(self.rope.len());
        for (all_cos, all_sin) in &self.rope {
            let mut cos = Vec::with_capacity(ids.len() * half);
            let mut sin = Vec::with_capacity(ids.len() * half);
            for &len in &self.cache.len {
                for p in len..len + n {
                    cos.extend_from_slice(&all_cos[p * half..][..half]);
                    sin.extend_from_slice(&all_sin[p * half..][..half]);
                }
            }
            rope.push((be.upload(&cos)?, be.upload(&sin)?));
        }
        let mut x = self.model.embed_tokens(be, ids)?; // [rows, d]
        let model = self.model;
        model.for_each_layer(be, 0..c.layers, |l, lw| {
            let shape = CacheShape {
                seqs: self.cache.len.len(),
                n,
                cap: self.slots[l],
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
            };
            let (cos, sin) = &rope[usize::from(c.is_local(l)).min(rope.len() - 1)];
            self.layer(l, lw, &mut x, cos, sin, shape)
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
        drop(qk_norm_fwd(be, c, lw, &mut q, &mut k, rows)?); // Qwen3, before RoPE
        be.rope(&mut q, cos, sin, 1, rows, c.heads, c.head_dim, false)?;
        be.rope(&mut k, cos, sin, 1, rows, c.kv_heads, c.head_dim, false)?;
        let (kc, vc) = (&mut self.cache.k[l], &mut self.cache.v[l]);
        let (len, window) = (&self.cache.len, c.window(l));
        let att = be.attention_cached(&q, &k, &v, kc, vc, len, shape, window)?; // [rows, q]
        let mut o = be.linear(&att, &lw.wo, None, rows, qd, d)?; // [rows, d]
        if let Some(w) = &lw.post_attn_norm {
            o = be.rmsnorm_fwd(&o, w, rows, d, eps)?.0; // Gemma 3
        }
        be.add_assign(x, &o, rows * d)?; // x' = x + Attn

        let (u2, _) = be.rmsnorm_fwd(x, &lw.ffn_norm, rows, d, eps)?; // [rows, d]
        let gate_up = [(&lw.w_gate, None, m), (&lw.w_up, None, m)];
        let [a, b] = be.linear_many(&u2, gate_up, rows, d)?; // [rows, m] each
        drop(u2);
        let h = be.glu_fwd(c.act, &a, &b, rows * m)?; // [rows, m]
        let mut y = be.linear(&h, &lw.w_down, lw.b_down.as_ref(), rows, m, d)?; // [rows, d]
        if let Some(w) = &lw.post_ffn_norm {
            y = be.rmsnorm_fwd(&y, w, rows, d, eps)?.0; // Gemma 3
        }
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

/// Temperature / top-p sampling (METHODS.md §11).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sampling {
    /// Logits are divided by it before the softmax; 0 is greedy (argmax).
    pub temperature: f64,
    /// Nucleus: the smallest set of most probable tokens whose mass is at
    /// least this, in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    pub seed: u64,
}

/// Which random stream a sequence draws from: its prompt and sample index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamKey {
    pub prompt: u64,
    pub sample: u64,
}

/// SplitMix64's output function of `x` (Steele, Lea & Flood 2014): add the
/// golden gamma, then two xor-shift-multiply rounds and a final xor-shift.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform number in [0, 1) of the draw at `position` (0 for a
/// sequence's first generated token) of stream `key` under `seed`:
/// h = sm(sm(sm(sm(seed) ^ prompt) ^ sample) ^ position) with sm =
/// [`splitmix64`], u = (h >> 11) / 2^53.
pub fn uniform(seed: u64, key: StreamKey, position: u64) -> f64 {
    let h = splitmix64(seed) ^ key.prompt;
    let h = splitmix64(splitmix64(splitmix64(h) ^ key.sample) ^ position);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl Sampling {
    /// Errs unless the temperature is finite and ≥ 0 and top-p in (0, 1].
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Invalid(format!(
                "temperature {} is not a finite number ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top-p {} is not in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }

    /// The token drawn from `logits` at `position` of stream `key`.
    /// Temperature 0 is [`argmax`]. Otherwise, in f64: weights
    /// w_i = exp((l_i − max l) / T), so the most probable token weighs
    /// exactly 1 and a tiny T leaves it alone; the tokens with w_i > 0
    /// sorted by weight descending, equal weights by id ascending; the kept
    /// prefix is the shortest whose running sum (in that order) reaches
    /// top_p · the sum of all; with u = [`uniform`] · the kept sum, the
    /// first kept token whose running sum exceeds u (the last kept one if
    /// rounding leaves none).
    pub fn choose(&self, logits: &[f32], key: StreamKey, position: u64) -> Result<u32> {
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() || logits.iter().any(|l| l.is_nan()) {
            return Err(Error::Invalid(format!(
                "sampling from non-finite logits (largest {max})"
            )));
        }
        let (max, t) = (max as f64, self.temperature);
        let mut w: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        w.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = w.iter().map(|x| x.1).sum();
        let (mut kept, mut mass) = (0, 0.0);
        for &(_, x) in &w {
            mass += x;
            kept += 1;
            if mass >= self.top_p * total {
                break;
            }
        }
        let u = uniform(self.seed, key, position) * mass;
        let mut run = 0.0;
        for &(id, x) in &w[..kept] {
            run += x;
            if u < run {
                return Ok(id);
            }
        }
        Ok(w[kept - 1].0)
    }
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
    decode(be, model, tok, prompts, opts, None)
}

/// [`generate`] with every token drawn by `sampling` ([`Sampling::choose`]):
/// prompt s draws from stream `keys[s]`, its t-th generated token at
/// position t, so its continuation is the same whatever shares its batch.
pub fn generate_sampled<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    sampling: &Sampling,
    keys: &[StreamKey],
) -> Result<(Vec<Generation>, DecodeStats)> {
    sampling.check()?;
    if keys.len() != prompts.len() {
        return Err(Error::Invalid(format!(
            "{} stream keys for {} prompts",
            keys.len(),
            prompts.len()
        )));
    }
    decode(be, model, tok, prompts, opts, Some((sampling, keys)))
}

/// The loop of [`generate`] (`sampler` `None`: greedy) and [`generate_sampled`].
fn decode<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    sampler: Option<(&Sampling, &[StreamKey])>,
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
        // Sampled draws, one per row, in parallel (each is a sort over the
        // vocabulary); every draw depends only on its own row and key.
        let drawn: Vec<u32> = match sampler {
            None => Vec::new(),
            Some((sm, keys)) => slots
                .par_iter()
                .enumerate()
                .map(|(row, &s)| {
                    let pos = out[s].ids.len() as u64;
                    sm.choose(&logits[row * vocab..(row + 1) * vocab], keys[s], pos)
                })
                .collect::<Result<_>>()?,
        };
        for (row, &s) in slots.iter().enumerate() {
            let g = &mut out[s];
            let id = match sampler {
                None => argmax(&logits[row * vocab..(row + 1) * vocab]),
                Some(_) => drawn[row],
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: StreamKey = StreamKey {
        prompt: 3,
        sample: 1,
    };

    fn sampling(temperature: f64, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_p,
            seed: 7,
        }
    }

    #[test]
    fn uniforms_are_in_range_and_depend_on_every_coordinate() {
        let u = uniform(7, KEY, 0);
        assert!((0.0..1.0).contains(&u));
        for other in [
            uniform(8, KEY, 0),
            uniform(7, StreamKey { prompt: 4, ..KEY }, 0),
            uniform(7, StreamKey { sample: 0, ..KEY }, 0),
            uniform(7, KEY, 1),
        ] {
            assert_ne!(u, other);
        }
        // The reference values of splitmix64 (seed 0 state sequence).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn zero_and_tiny_temperatures_are_greedy() {
        let logits = [0.5f32, 2.0, 2.0, -1.0, 1.9999];
        for pos in 0..50 {
            assert_eq!(sampling(0.0, 1.0).choose(&logits, KEY, pos).unwrap(), 1);
            // An exact tie is split; a gap of 1e-4 is not.
            let id = sampling(1e-6, 1.0).choose(&logits, KEY, pos).unwrap();
            assert!(id == 1 || id == 2, "{id}");
        }
        let logits = [0.5f32, 2.0, 1.5, -1.0];
        for pos in 0..50 {
            assert_eq!(sampling(1e-6, 1.0).choose(&logits, KEY, pos).unwrap(), 1);
            assert_eq!(sampling(1.0, 1e-9).choose(&logits, KEY, pos).unwrap(), 1);
        }
    }

    #[test]
    fn draws_follow_the_nucleus_distribution() {
        // Probabilities 0.5, 0.3, 0.2 (logits = ln p); top-p 0.75 keeps the
        // first two, renormalised to 0.625 / 0.375.
        let logits: Vec<f32> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln() as f32).collect();
        let n = 20_000;
        let mut count = [0usize; 3];
        for pos in 0..n {
            count[sampling(1.0, 0.75).choose(&logits, KEY, pos).unwrap() as usize] += 1;
        }
        assert_eq!(count[2], 0);
        let f0 = count[0] as f64 / n as f64;
        assert!((f0 - 0.625).abs() < 0.015, "{count:?}");
        let mut count = [0usize; 3];
        for pos in 0..n {
            count[sampling(1.0, 1.0).choose(&logits, KEY, pos).unwrap() as usize] += 1;
        }
        for (c, p) in count.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*c as f64 / n as f64 - p).abs() < 0.015, "{count:?}");
        }
    }

    #[test]
    fn bad_settings_and_logits_are_errors() {
        assert!(sampling(-1.0, 1.0).check().is_err());
        assert!(sampling(f64::NAN, 1.0).check().is_err());
        assert!(sampling(1.0, 0.0).check().is_err());
        assert!(sampling(1.0, 1.5).check().is_err());
        assert!(sampling(1.0, 1.0).choose(&[1.0, f32::NAN], KEY, 0).is_err());
        assert!(sampling(1.0, 1.0)
            .choose(&[f32::NEG_INFINITY; 2], KEY, 0)
            .is_err());
    }
}
