//! Device memory plan of a scoring run (and, in `refit`, of a refit) on the
//! CUDA backend: every buffer
//! `CudaBackend` holds while `prune::calibrate::collect_stats` runs one batch
//! (forward keeping the residual stream, then one activation-only backward
//! pass per objective), with its bytes, and the peak.
//!
//! The plan replays the allocation sequence of `model::forward`,
//! `model::backward` and the `CudaBackend` ops (each op's outputs and its
//! temporaries, e.g. the bf16 copy of a matrix product's activation operand)
//! on a counter, in program order, freeing each buffer where Rust drops it.
//! So the peak is the allocator's high-water mark (`MemStats::high_water` on
//! the emulated device; tests/plan.rs checks it), not an estimate. Not
//! counted: the CUDA context, cuBLAS's workspace, and a FLAP `down_proj.bias`
//! (d bf16 values per layer) that the config does not announce.
//!
//! Shapes, rows = seqs·T, f32 activations, bf16 weights:
//! - weights: Σ_tensors numel·2 over the final norm and the layers
//!   (resident), with `--stream` (`Residency::Streamed`) the final norm and
//!   per pass the layers `Model::for_each_layer` holds: the one computing
//!   and the next one uploading; plus, for `ce`, the output projection
//!   `[vocab, d]` (`Model::lm_head`). The embedding is never loaded: each
//!   batch's rows are read from the file into a `[rows, d]` bf16 table;
//! - residual stream x_0..x_L: (L+1)·rows·d·4 for the whole run;
//! - one layer's recomputed activations (q, k, v, attention out, lse, x', a,
//!   b, h, two rstd; Qwen3 also q and k before their norms and those norms'
//!   rstd) plus the backward's gradients of that layer;
//! - `ce`: the bf16 z, the `[rows, chunk]` f32 logits chunk and its bf16 copy.
use std::fmt;

use serde::Serialize;

use crate::backend::cuda::backend::CE_CHUNK;
use crate::model::keep::{describe, kept_layers};
use crate::model::objective::{EnergyAt, Objectives};
use crate::model::Geometry;
use crate::model::ModelConfig;
use crate::{Error, Result};

mod refit;
pub use refit::{plan_refit, RefitPlanSpec};

/// What is planned: one batch of `seqs` sequences of `t` tokens.
#[derive(Clone, Copy, Debug)]
pub struct PlanSpec {
    pub t: usize,
    pub seqs: usize,
    pub objectives: Objectives,
    pub energy_at: EnergyAt,
    /// Two layers' weights on the device instead of all of them.
    pub stream: bool,
    /// Vocabulary entries per cross-entropy chunk (`CudaBackend::with_ce_chunk`).
    pub ce_chunk: usize,
    /// The activation-memory budget in bytes (`model::keep`): the top layers
    /// whose activations fit are kept from the forward pass to the first
    /// backward pass.
    pub activation_memory: u64,
    /// Layer-major (`prune::layer_major`) over chunks of this many batches
    /// (the budget is then not used: every layer is recomputed).
    pub layer_major: Option<usize>,
}

impl PlanSpec {
    /// Defaults: energy at the final norm, the backend's default CE chunk.
    pub fn new(t: usize, seqs: usize, objectives: Objectives, stream: bool) -> Self {
        PlanSpec {
            t,
            seqs,
            objectives,
            energy_at: EnergyAt::FinalNorm,
            stream,
            ce_chunk: CE_CHUNK,
            activation_memory: 0,
            layer_major: None,
        }
    }
}

/// Buffers of one name and shape live at the peak.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanBuffer {
    pub name: String,
    pub dtype: &'static str,
    /// Shape of one buffer.
    pub shape: Vec<usize>,
    pub count: usize,
    /// Bytes of all `count` buffers.
    pub bytes: usize,
}

/// What the activation-memory budget (`model::keep`) keeps in a scoring plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeptActivations {
    /// The budget in bytes.
    pub budget: u64,
    /// Layers whose activations are kept (the top ones).
    pub layers: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// A layer-major chunk (`prune::layer_major`): its batches, the host memory
/// its residual streams and gradients take (f32), and the layer uploads per
/// chunk when the weights are streamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LayerMajorPlan {
    pub batches: usize,
    pub host_bytes: u64,
    pub uploads: usize,
}

/// Highest bytes reached during one phase of the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PhasePeak {
    pub phase: &'static str,
    pub bytes: usize,
}

/// The device memory plan of one scoring batch.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub arch: &'static str,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub vocab: usize,
    pub t: usize,
    pub seqs: usize,
    pub objectives: Vec<&'static str>,
    pub stream: bool,
    /// A scoring plan's activation-memory budget and what it keeps.
    pub activations: Option<KeptActivations>,
    /// A layer-major scoring plan's chunk.
    pub layer_major: Option<LayerMajorPlan>,
    /// Bytes of the weights on the device: all of them, or when streaming
    /// the resident ones plus the two largest layers.
    pub weight_bytes: usize,
    /// The allocator's high-water mark.
    pub peak_bytes: usize,
    /// Phase during which the peak is reached.
    pub peak_phase: &'static str,
    /// Every buffer live at the peak.
    pub buffers: Vec<PlanBuffer>,
    pub phases: Vec<PhasePeak>,
}

const F32: (&str, usize) = ("f32", 4);
const BF16: (&str, usize) = ("bf16", 2);
const U32: (&str, usize) = ("u32", 4);
const F64: (&str, usize) = ("f64", 8);

struct Live {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: usize,
}

/// Replays allocations and frees, remembering the live set at the peak.
#[derive(Default)]
struct Sim {
    live: Vec<Option<Live>>,
    current: usize,
    peak: usize,
    at_peak: Vec<(&'static str, &'static str, Vec<usize>, usize)>,
    peak_phase: &'static str,
    phase: &'static str,
    phases: Vec<PhasePeak>,
    /// Weight bytes of each layer when the layers are streamed.
    streamed_layers: Option<Vec<usize>>,
    /// Whether lookups read the loaded head (the tied embedding) rather
    /// than rows gathered from the file (`Model::embed_tokens`).
    embed_from_head: bool,
}

type Id = usize;

impl Sim {
    /// `Model::embed_tokens` of `rows` tokens: the table of the gathered rows
    /// (none when the tied head is loaded), the output `name`, then the ids
    /// for the launch (`CudaBackend::embedding`).
    fn embed(&mut self, rows: usize, d: usize, name: &'static str) -> Id {
        let table = match self.embed_from_head {
            false => Some(self.alloc("embedding rows of the batch", BF16, &[rows, d])),
            true => None,
        };
        let x = self.alloc(name, F32, &[rows, d]);
        let ids = self.alloc("token ids", U32, &[rows]);
        self.free(ids);
        if let Some(t) = table {
            self.free(t);
        }
        x
    }

    fn begin(&mut self, phase: &'static str) {
        self.phase = phase;
        self.phases.push(PhasePeak {
            phase,
            bytes: self.current,
        });
    }

    /// One allocation; the emulated device counts `max(bytes, 1)`.
    fn alloc(
        &mut self,
        name: &'static str,
        (dtype, elem): (&'static str, usize),
        shape: &[usize],
    ) -> Id {
        let bytes = (shape.iter().product::<usize>() * elem).max(1);
        self.current += bytes;
        let p = self.phases.last_mut().expect("a phase is open");
        p.bytes = p.bytes.max(self.current);
        self.live.push(Some(Live {
            name,
            dtype,
            shape: shape.to_vec(),
            bytes,
        }));
        if self.current > self.peak {
            self.peak = self.current;
            self.peak_phase = self.phase;
            self.at_peak = self
                .live
                .iter()
                .flatten()
                .map(|l| (l.name, l.dtype, l.shape.clone(), l.bytes))
                .collect();
        }
        self.live.len() - 1
    }

    fn free(&mut self, id: Id) {
        let l = self.live[id].take().expect("freed once");
        self.current -= l.bytes;
    }

    fn free_all(&mut self, ids: &[Id]) {
        ids.iter().for_each(|&i| self.free(i));
    }

    /// `Model::for_each_layer` running `f` for each layer of `order`. When
    /// streaming, `order[0]`'s weights are uploaded before the loop, each
    /// next layer's before the current one computes, and the current one's
    /// freed after it.
    fn each_layer(
        &mut self,
        order: impl IntoIterator<Item = usize>,
        mut f: impl FnMut(&mut Sim, usize),
    ) {
        let Some(bytes) = self.streamed_layers.clone() else {
            order.into_iter().for_each(|l| f(self, l));
            return;
        };
        let upload =
            |s: &mut Sim, l: usize| s.alloc("weights: streamed layer", BF16, &[bytes[l] / 2]);
        let mut order = order.into_iter().peekable();
        let mut current = order.peek().map(|&l| upload(self, l));
        while let Some(l) = order.next() {
            let next = order.peek().map(|&n| upload(self, n));
            f(self, l);
            self.free(current.take().expect("uploaded before its compute"));
            current = next;
        }
    }

    /// `CudaBackend::linear`: bf16 copy of x (`x_len` values), then y `[rows, out]`.
    fn linear(&mut self, name: &'static str, x_len: usize, rows: usize, out: usize) -> Id {
        let xb = self.alloc("bf16 copy of a product's operand", BF16, &[x_len]);
        let y = self.alloc(name, F32, &[rows, out]);
        self.free(xb);
        y
    }
}

/// Shapes of one run.
struct Dims {
    rows: usize,
    seqs: usize,
    t: usize,
    d: usize,
    qd: usize,
    kvd: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    vocab: usize,
    layers: usize,
    /// Qwen3's per-head q/k RMSNorm.
    qk_norm: bool,
    /// Gemma 3's norms of the attention and FFN outputs.
    sandwich: bool,
    /// Gemma 3's second RoPE table (`ModelConfig::two_rope_bases`).
    two_rope_bases: bool,
}

/// The intermediates `layer_acts` returns (`LayerActs`): rstd_attn, q, k,
/// v, att, lse, mid, rstd_ffn, a, b, h, then with a q/k norm its inputs
/// and rstd (`QkNormActs`), then with Gemma's post-attention norm its
/// input and rstd (`LayerActs::post_attn`).
struct Acts(Vec<Id>);

/// `model::forward::layer_acts` for a layer of FFN width m.
fn layer_acts(s: &mut Sim, g: &Dims, m: usize) -> Acts {
    let (rows, d) = (g.rows, g.d);
    let u = s.alloc("norm output u", F32, &[rows, d]);
    let rstd_attn = s.alloc("rstd (attention norm)", F32, &[rows]);
    let q = s.linear("q", rows * d, rows, g.qd);
    let k = s.linear("k", rows * d, rows, g.kvd);
    let v = s.linear("v", rows * d, rows, g.kvd);
    s.free(u);
    // `forward::qk_norm_fwd`: q and k are replaced by their norms.
    let (q, k, qk) = if g.qk_norm {
        let qn = s.alloc("q after q_norm", F32, &[rows, g.qd]);
        let rq = s.alloc("rstd (q_norm)", F32, &[rows * g.heads]);
        let kn = s.alloc("k after k_norm", F32, &[rows, g.kvd]);
        let rk = s.alloc("rstd (k_norm)", F32, &[rows * g.kv_heads]);
        (qn, kn, vec![q, k, rq, rk])
    } else {
        (q, k, Vec::new())
    };
    let att = s.alloc("attention output", F32, &[rows, g.qd]);
    let lse = s.alloc("attention lse", F32, &[g.seqs, g.heads, g.t]);
    let o = s.linear("o_proj output", rows * g.qd, rows, d);
    let mid = s.alloc("residual after attention x'", F32, &[rows, d]);
    let post_attn = if g.sandwich {
        let on = s.alloc("post-attention norm output", F32, &[rows, d]);
        let rstd = s.alloc("rstd (post-attention norm)", F32, &[rows]);
        s.free(on);
        vec![o, rstd]
    } else {
        s.free(o);
        Vec::new()
    };
    let u2 = s.alloc("norm output u", F32, &[rows, d]);
    let rstd_ffn = s.alloc("rstd (FFN norm)", F32, &[rows]);
    let a = s.linear("gate pre-activation a", rows * d, rows, m);
    let b = s.linear("up projection b", rows * d, rows, m);
    s.free(u2);
    let h = s.alloc("channels h", F32, &[rows, m]);
    let mut acts = vec![rstd_attn, q, k, v, att, lse, mid, rstd_ffn, a, b, h];
    acts.extend(qk);
    acts.extend(post_attn);
    Acts(acts)
}

/// One layer's activations kept by the forward pass: `Acts`, and Gemma's
/// down projection output before its post-FFN norm (`LayerActs::ffn_out`).
struct Kept(Acts, Option<Id>);

/// `model::forward::layer_forward_keeping`: returns the next residual
/// (named `next`) and, when `keep`, the layer's activations.
fn layer_forward(
    s: &mut Sim,
    g: &Dims,
    m: usize,
    next: &'static str,
    keep: bool,
) -> (Id, Option<Kept>) {
    let acts = layer_acts(s, g, m);
    let mut y = s.linear("down_proj output", g.rows * m, g.rows, g.d);
    let mut ffn_out = None;
    if g.sandwich {
        let yn = s.alloc("post-FFN norm output", F32, &[g.rows, g.d]);
        let rstd = s.alloc("rstd (post-FFN norm)", F32, &[g.rows]);
        s.free(rstd);
        match keep {
            true => ffn_out = Some(y),
            false => s.free(y),
        }
        y = yn;
    }
    let nx = s.alloc(next, F32, &[g.rows, g.d]);
    s.free(y);
    if keep {
        return (nx, Some(Kept(acts, ffn_out)));
    }
    s.free_all(&acts.0);
    (nx, None)
}

/// `model::forward::RopeTables::new` for t positions: cos and sin, and
/// the local layers' pair when they have their own base (Gemma 3).
fn rope_tables(s: &mut Sim, two_bases: bool, t: usize, hd: usize) -> Vec<Id> {
    let mut ids = vec![
        s.alloc("RoPE cos", F32, &[t, hd / 2]),
        s.alloc("RoPE sin", F32, &[t, hd / 2]),
    ];
    if two_bases {
        ids.push(s.alloc("RoPE cos (local layers)", F32, &[t, hd / 2]));
        ids.push(s.alloc("RoPE sin (local layers)", F32, &[t, hd / 2]));
    }
    ids
}

/// `model::forward::forward` with the residual stream kept and the
/// activations of the top `acts_layers` layers: returns the ids of
/// x_0..x_L, z and the final rstd, and per layer its kept activations.
fn forward(
    s: &mut Sim,
    g: &Dims,
    widths: &[usize],
    acts_layers: usize,
) -> (Vec<Id>, Vec<Option<Kept>>) {
    let rope = rope_tables(s, g.two_rope_bases, g.t, g.hd);
    let mut x = s.embed(g.rows, g.d, "residual stream x_0..x_L");
    let mut kept = Vec::new();
    let mut acts = Vec::new();
    let first_kept = g.layers - acts_layers.min(g.layers);
    s.each_layer(0..g.layers, |s, l| {
        let (next, a) = layer_forward(s, g, widths[l], "residual stream x_0..x_L", l >= first_kept);
        acts.push(a);
        kept.push(std::mem::replace(&mut x, next));
    });
    kept.push(s.alloc("final norm output z", F32, &[g.rows, g.d]));
    kept.push(s.alloc("rstd (final norm)", F32, &[g.rows]));
    kept.push(x);
    s.free_all(&rope);
    (kept, acts)
}

/// The gradient ∂J/∂x_L that starts `model::backward::backward_channel_stats`.
fn objective_grad(s: &mut Sim, g: &Dims, ce: bool, pre_norm: bool, ce_chunk: usize) -> Id {
    let (rows, d) = (g.rows, g.d);
    let dz = if ce {
        // CudaBackend::cross_entropy: chunked logits, never [rows, vocab].
        let chunk = ce_chunk.max(1).min(g.vocab.max(1));
        let zb = s.alloc("bf16 copy of a product's operand", BF16, &[rows * d]);
        let small = [
            s.alloc("CE targets", U32, &[rows]),
            s.alloc("CE running max", F32, &[rows]),
            s.alloc("CE running sum", F32, &[rows]),
            s.alloc("CE target logit", F32, &[rows]),
        ];
        let logits = s.alloc("CE logits chunk", F32, &[rows, chunk]);
        let dz = s.alloc("dz (final norm output)", F32, &[rows, d]);
        // Pass 2, per chunk: dlogits rounded to bf16 (the whole chunk buffer).
        let dl = s.alloc("CE dlogits chunk, bf16", BF16, &[rows * chunk]);
        s.free(dl);
        s.free_all(&[zb, logits]);
        s.free_all(&small);
        dz
    } else {
        // CudaBackend::energy: per-row partials, then dz = scale·z (at x_L
        // with pre_norm, where dz is already ∂J/∂x_L).
        let part = s.alloc("energy per-row partials", F32, &[rows]);
        let dz = s.alloc("dz (final norm output)", F32, &[rows, d]);
        s.free(part);
        if pre_norm {
            return dz;
        }
        dz
    };
    let dx = s.alloc("dx, gradient of the residual", F32, &[rows, d]);
    s.free(dz);
    dx
}

/// `model::backward::backward_channel_stats`: one objective's pass, taking
/// the layers' activations the forward pass kept (recomputing the others).
fn backward(
    s: &mut Sim,
    g: &Dims,
    widths: &[usize],
    (ce, pre_norm, ce_chunk): (bool, bool, usize),
    kept: &mut [Option<Kept>],
) {
    let dx = objective_grad(s, g, ce, pre_norm, ce_chunk);
    let rope = rope_tables(s, g.two_rope_bases, g.t, g.hd);
    s.each_layer((0..g.layers).rev(), |s, l| {
        let acts = kept.get_mut(l).and_then(Option::take);
        layer_backward(s, g, widths[l], l, acts);
    });
    s.free(dx);
    s.free_all(&rope);
}

/// `prune::layer_major::score_chunk` over a chunk of `batches` batches of
/// this geometry: the device holds one batch's residual (uploaded from the
/// host) and the layer's buffers at a time, plus every batch's RoPE tables.
fn layer_major_chunk(
    s: &mut Sim,
    g: &Dims,
    widths: &[usize],
    batches: usize,
    passes: &[(&'static str, bool, bool)],
    ce_chunk: usize,
) {
    let (rows, d) = (g.rows, g.d);
    s.begin("forward");
    let ropes: Vec<Vec<Id>> = (0..batches)
        .map(|_| rope_tables(s, g.two_rope_bases, g.t, g.hd))
        .collect();
    for _ in 0..batches {
        let x = s.embed(rows, d, "residual x (one batch)");
        s.free(x); // x goes to the host
    }
    s.each_layer(0..g.layers, |s, l| {
        for _ in 0..batches {
            let x = s.alloc("residual x (one batch)", F32, &[rows, d]); // from the host
            let (next, _) = layer_forward(s, g, widths[l], "next residual (one batch)", false);
            s.free_all(&[x, next]); // next goes to the host
        }
    });
    for &(phase, ce, pre_norm) in passes {
        s.begin(phase);
        for _ in 0..batches {
            let x = s.alloc("residual x (one batch)", F32, &[rows, d]);
            let z = s.alloc("final norm output z", F32, &[rows, d]);
            let rstd = s.alloc("rstd (final norm)", F32, &[rows]);
            let dx = objective_grad(s, g, ce, pre_norm, ce_chunk);
            s.free_all(&[dx, rstd, z, x]); // dx goes to the host
        }
        s.each_layer((0..g.layers).rev(), |s, l| {
            for _ in 0..batches {
                let dx = s.alloc("dx, gradient of the residual", F32, &[rows, d]);
                let x = s.alloc("residual x (one batch)", F32, &[rows, d]);
                layer_backward(s, g, widths[l], l, None);
                s.free_all(&[x, dx]); // dx back to the host
            }
        });
    }
    ropes.iter().for_each(|r| s.free_all(r));
}

/// `model::backward::layer_backward` of layer `l` (FFN width `m`), from the
/// activations the forward pass kept or recomputed; `dx` is updated in place.
fn layer_backward(s: &mut Sim, g: &Dims, m: usize, l: usize, kept: Option<Kept>) {
    let (rows, d) = (g.rows, g.d);
    let (Acts(acts), ffn_out) = match kept {
        Some(Kept(acts, ffn_out)) => (acts, ffn_out),
        None => (layer_acts(s, g, m), None),
    };
    // Gemma: y kept or recomputed, the gradient through the post-FFN norm.
    let dy = g.sandwich.then(|| {
        let y = ffn_out.unwrap_or_else(|| s.linear("down_proj output", rows * m, rows, d));
        let yn = s.alloc("post-FFN norm output", F32, &[rows, d]);
        let rstd = s.alloc("rstd (post-FFN norm)", F32, &[rows]);
        s.free(yn);
        let dy = s.alloc("dy (post-FFN norm input)", F32, &[rows, d]);
        s.free_all(&[rstd, y]);
        dy
    });
    let dh = s.linear("g = dJ/dh", rows * d, rows, m);
    if let Some(dy) = dy {
        s.free(dy);
    }
    let part = s.alloc("channel_stats partials", F32, &[5, g.seqs, m]);
    s.free(part);
    let (a, b, h) = (acts[8], acts[9], acts[10]);
    s.free(h);
    if l == 0 {
        s.free_all(&acts[..10]);
        s.free_all(&acts[11..]);
        s.free(dh);
        return;
    }
    let da = s.alloc("da", F32, &[rows, m]);
    let db = s.alloc("db", F32, &[rows, m]);
    s.free_all(&[dh, a, b]);
    let du2 = s.linear("du (FFN norm output)", rows * m, rows, d);
    s.free(da);
    let tmp = s.linear("du (FFN norm output) term", rows * m, rows, d);
    s.free_all(&[tmp, db]);
    let dnorm1 = s.alloc("dnorm (FFN norm)", F32, &[rows, d]);
    s.free_all(&[du2, dnorm1]);
    let d_o = g
        .sandwich
        .then(|| s.alloc("d o_proj output (post-attention norm)", F32, &[rows, d]));
    let datt = s.linear("d attention output", rows * d, rows, g.qd);
    if let Some(d_o) = d_o {
        s.free(d_o);
    }
    let dq = s.alloc("dq", F32, &[rows, g.qd]);
    let dk = s.alloc("dk", F32, &[rows, g.kvd]);
    let dv = s.alloc("dv", F32, &[rows, g.kvd]);
    let delta = s.alloc("attention delta", F32, &[g.seqs, g.heads, g.t]);
    s.free(delta);
    // `forward::qk_norm_bwd`: the gradients of the norms' inputs.
    let (dq, dk) = if g.qk_norm {
        let dq_in = s.alloc("dq (q projection output)", F32, &[rows, g.qd]);
        s.free(dq);
        let dk_in = s.alloc("dk (k projection output)", F32, &[rows, g.kvd]);
        s.free(dk);
        (dq_in, dk_in)
    } else {
        (dq, dk)
    };
    let du = s.linear("du (attention norm output)", rows * g.qd, rows, d);
    for _ in 0..2 {
        let tmp = s.linear("du (attention norm output) term", rows * g.kvd, rows, d);
        s.free(tmp);
    }
    let dnorm2 = s.alloc("dnorm (attention norm)", F32, &[rows, d]);
    s.free_all(&acts[..8]);
    s.free_all(&acts[11..]);
    s.free_all(&[datt, dq, dk, dv, du, dnorm2]);
}

/// Refuses a run whose byte counts could overflow the plan's arithmetic.
fn check_size(cfg: &ModelConfig, seqs: usize, t: usize) -> Result<()> {
    // An upper bound of every byte count below, in u128: all weights, plus
    // (L + 64) buffers of rows × (the widest dimension + a T×heads score
    // row) in f32. Below 2^62,
    // the plan's usize arithmetic cannot wrap.
    let widest = [cfg.vocab, cfg.hidden, cfg.q_dim(), cfg.kv_dim()]
        .into_iter()
        .chain(cfg.ffn_widths.iter().copied())
        .max()
        .unwrap_or(0) as u128;
    let weights = 4 * (cfg.param_count() as u128);
    let rows = seqs as u128 * t as u128;
    let attn = t as u128 * cfg.heads as u128;
    let bound = weights + 4 * rows * (widest + attn) * (cfg.layers as u128 + 64);
    if bound >= 1 << 62 {
        return Err(Error::Invalid(format!(
            "plan: {} sequences of {} tokens on this model would need more than 2^62 bytes",
            seqs, t
        )));
    }
    Ok(())
}

impl Dims {
    fn new(cfg: &ModelConfig, seqs: usize, t: usize) -> Self {
        Dims {
            rows: seqs * t,
            seqs,
            t,
            d: cfg.hidden,
            qd: cfg.q_dim(),
            kvd: cfg.kv_dim(),
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            hd: cfg.head_dim,
            vocab: cfg.vocab,
            layers: cfg.layers,
            qk_norm: cfg.qk_norm,
            sandwich: cfg.sandwich_norms,
            two_rope_bases: cfg.two_rope_bases(),
        }
    }
}

/// Weight bytes (bf16) of layer l: norms (two, Gemma's four; + the q/k
/// norms), q/k/v (+ biases), o, gate, up, down.
fn layer_weight_bytes(cfg: &ModelConfig, m: usize) -> usize {
    let (d, qd, kvd) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
    let bias = if cfg.qkv_bias { qd + 2 * kvd } else { 0 };
    let qk_norm = if cfg.qk_norm { 2 * cfg.head_dim } else { 0 };
    let norms = if cfg.sandwich_norms { 4 * d } else { 2 * d };
    2 * (norms + qk_norm + qd * d + 2 * kvd * d + d * qd + bias + 3 * m * d)
}

/// The plan of one scoring batch of `spec` on `cfg`.
pub fn plan(cfg: &ModelConfig, spec: &PlanSpec) -> Result<Plan> {
    let o = spec.objectives;
    if spec.t < 2 || spec.seqs == 0 || o.is_empty() {
        return Err(Error::Invalid(format!(
            "plan: need T ≥ 2, at least one sequence and one objective (T = {}, seqs = {})",
            spec.t, spec.seqs
        )));
    }
    check_size(cfg, spec.seqs, spec.t)?;
    let g = Dims::new(cfg, spec.seqs, spec.t);
    let widths = &cfg.ffn_widths;
    let mut s = Sim::default();
    let weight_bytes = load_weights(&mut s, cfg, spec.stream, o.ce);

    let geo = Geometry {
        seqs: spec.seqs,
        t: spec.t,
    };
    let pre_norm = spec.energy_at == EnergyAt::PreNorm;
    let passes: Vec<(&'static str, bool, bool)> = [
        ("energy backward", false, pre_norm, o.energy),
        ("ce backward", true, false, o.ce),
    ]
    .into_iter()
    .filter_map(|(phase, ce, pre, on)| on.then_some((phase, ce, pre)))
    .collect();
    let (kept_layers, kept_bytes) = match spec.layer_major {
        Some(_) => (0, 0), // every layer recomputed
        None => kept_layers(cfg, geo, false, spec.activation_memory),
    };
    let layer_major = spec.layer_major.map(|batches| {
        layer_major_chunk(&mut s, &g, widths, batches, &passes, spec.ce_chunk);
        LayerMajorPlan {
            batches,
            host_bytes: ((cfg.layers + 2) * g.rows * g.d * 4 * batches) as u64,
            uploads: (1 + passes.len()) * cfg.layers,
        }
    });
    if layer_major.is_none() {
        s.begin("forward");
        let (kept, mut acts) = forward(&mut s, &g, widths, kept_layers);
        for &(phase, ce, pre) in &passes {
            s.begin(phase);
            backward(&mut s, &g, widths, (ce, pre, spec.ce_chunk), &mut acts);
        }
        s.free_all(&kept);
    }
    let objectives = [("energy", o.energy), ("ce", o.ce)]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
    let run = (spec.t, spec.seqs, objectives, spec.stream);
    Ok(Plan {
        layer_major,
        activations: Some(KeptActivations {
            budget: spec.activation_memory,
            layers: kept_layers,
            bytes: kept_bytes,
        }),
        ..finish(s, cfg, run, weight_bytes)
    })
}

/// `Model::load`: the final norm and every layer (or, streamed, none:
/// `Sim::each_layer` uploads them), and with `head` (the ce objective:
/// `Model::lm_head` before the first batch) the output projection, which is
/// the embedding when tied. Returns the weights' bytes on the device
/// (streamed: the resident ones plus the two largest layers).
fn load_weights(s: &mut Sim, cfg: &ModelConfig, stream: bool, head: bool) -> usize {
    s.begin("weights");
    s.alloc("weights: final norm", BF16, &[cfg.hidden]);
    let per_layer: Vec<usize> = cfg
        .ffn_widths
        .iter()
        .map(|&m| layer_weight_bytes(cfg, m))
        .collect();
    let mut largest = per_layer.clone();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let largest_two = largest.iter().take(2).sum::<usize>();
    if stream {
        s.streamed_layers = Some(per_layer);
    } else {
        s.alloc(
            "weights: all layers",
            BF16,
            &[per_layer.iter().sum::<usize>() / 2],
        );
    }
    if head {
        s.alloc(
            "weights: lm_head (tied: the embedding)",
            BF16,
            &[cfg.vocab, cfg.hidden],
        );
        s.embed_from_head = cfg.tie_embeddings;
    }
    match stream {
        true => s.current + largest_two,
        false => s.current,
    }
}

/// The `Plan` of a finished replay: `(t, seqs, objectives, stream)` of the run.
fn finish(
    mut s: Sim,
    cfg: &ModelConfig,
    (t, seqs, objectives, stream): (usize, usize, Vec<&'static str>, bool),
    weight_bytes: usize,
) -> Plan {
    let mut buffers: Vec<PlanBuffer> = Vec::new();
    for (name, dtype, shape, bytes) in std::mem::take(&mut s.at_peak) {
        match buffers
            .iter_mut()
            .find(|b| b.name == name && b.shape == shape && b.dtype == dtype)
        {
            Some(b) => {
                b.count += 1;
                b.bytes += bytes;
            }
            None => buffers.push(PlanBuffer {
                name: name.to_string(),
                dtype,
                shape,
                count: 1,
                bytes,
            }),
        }
    }
    Plan {
        arch: cfg.arch.hf_name(),
        hidden: cfg.hidden,
        ffn: cfg.ffn_widths.iter().copied().max().unwrap_or(0),
        layers: cfg.layers,
        vocab: cfg.vocab,
        t,
        seqs,
        objectives,
        stream,
        activations: None,
        layer_major: None,
        weight_bytes,
        peak_bytes: s.peak,
        peak_phase: s.peak_phase,
        buffers,
        phases: s.phases,
    }
}

/// Bytes as GiB with three decimals, or MiB/KiB/B when smaller.
fn human(b: usize) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.3} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.2} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{b} B")
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} d={} m={} L={} vocab={}; T={} x {} sequence(s); objectives {}; weights {}",
            self.arch,
            self.hidden,
            self.ffn,
            self.layers,
            self.vocab,
            self.t,
            self.seqs,
            self.objectives.join("+"),
            if self.stream {
                "streamed (two layers)"
            } else {
                "resident"
            }
        )?;
        if let Some(lm) = self.layer_major {
            writeln!(
                f,
                "layer-major: chunks of {} batches; host memory per chunk {} (f32); \
                 {} layer uploads per chunk when streamed",
                lm.batches,
                human(lm.host_bytes as usize),
                lm.uploads
            )?;
        } else if let Some(a) = self.activations {
            let geo = Geometry {
                seqs: self.seqs,
                t: self.t,
            };
            let kept = describe(self.layers, geo, a.budget, (a.layers, a.bytes));
            writeln!(f, "{kept}")?;
        }
        writeln!(f, "buffers live at the peak (during {}):", self.peak_phase)?;
        writeln!(
            f,
            "{:<40} {:<5} {:>18} {:>5} {:>12}",
            "buffer", "dtype", "shape", "count", "bytes"
        )?;
        for b in &self.buffers {
            let shape = b
                .shape
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join("x");
            writeln!(
                f,
                "{:<40} {:<5} {:>18} {:>5} {:>12}",
                b.name,
                b.dtype,
                shape,
                b.count,
                human(b.bytes)
            )?;
        }
        writeln!(f, "{:<40} {:>43}", "peak", human(self.peak_bytes))?;
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {}", p.phase, human(p.bytes)))
            .collect();
        write!(f, "phase peaks: {}", phases.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_sizes_are_refused_instead_of_wrapping() {
        let cfg = ModelConfig::from_json(
            serde_json::json!({
                "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
                "intermediate_size": 128
            }),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let energy = Objectives {
            energy: true,
            ce: false,
        };
        let ok = plan(&cfg, &PlanSpec::new(128, 2, energy, false)).unwrap();
        assert!(ok.peak_bytes > ok.weight_bytes);
        let e = plan(&cfg, &PlanSpec::new(1 << 20, 1 << 24, energy, false)).unwrap_err();
        assert!(e.to_string().contains("2^62"), "{e}");
    }
}
