//! The forward pass, written once over `Backend`. One layer reads top to
//! bottom (llama2.c style); shapes in comments, rows = seqs·t.
use super::config::ModelConfig;
use super::lora::{Adapters, LayerLora, Proj};
use super::weights::{LayerWeights, Model};
use crate::backend::{AttnShape, Backend};
use crate::{Error, Result};

/// Host RoPE tables `(cos, sin)` `[t, head_dim/2]` for positions 0..t of
/// the global or `local` layers (`ModelConfig::rope_inv_freq`), computed in
/// f32 as transformers does (`freqs = position · inv_freq`).
pub fn rope_host_tables(c: &ModelConfig, local: bool, t: usize) -> (Vec<f32>, Vec<f32>) {
    let inv: Vec<f32> = c.rope_inv_freq(local).iter().map(|&f| f as f32).collect();
    let mut cos = Vec::with_capacity(t * inv.len());
    let mut sin = Vec::with_capacity(t * inv.len());
    for p in 0..t {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// RoPE tables for positions 0..t: `cos`, `sin` `[t, head_dim/2]`
/// ([`rope_host_tables`]) of the global layers, and of the local ones when
/// their base differs (Gemma 3).
pub struct RopeTables<B: Backend> {
    pub cos: B::Buf,
    pub sin: B::Buf,
    local: Option<(B::Buf, B::Buf)>,
}

impl<B: Backend> RopeTables<B> {
    pub fn new(backend: &B, model: &Model<B>, t: usize) -> Result<Self> {
        let c = &model.cfg;
        let upload = |local| -> Result<(B::Buf, B::Buf)> {
            let (cos, sin) = rope_host_tables(c, local, t);
            Ok((backend.upload(&cos)?, backend.upload(&sin)?))
        };
        let (cos, sin) = upload(false)?;
        let local = c.two_rope_bases().then(|| upload(true)).transpose()?;
        Ok(Self { cos, sin, local })
    }

    /// `(cos, sin)` of layer `l`.
    pub fn layer(&self, c: &ModelConfig, l: usize) -> (&B::Buf, &B::Buf) {
        match &self.local {
            Some((cos, sin)) if c.is_local(l) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }
}

/// Everything one layer's forward computed that its backward pass reads.
pub struct LayerActs<B: Backend> {
    pub rstd_attn: B::Buf, // [rows]
    /// Gemma 3's norm of the attention output: its input (the o
    /// projection, `[rows, d]`) and rstd `[rows]`.
    pub post_attn: Option<(B::Buf, B::Buf)>,
    pub q: B::Buf, // [rows, q] after RoPE
    pub k: B::Buf, // [rows, kv] after RoPE
    /// The q/k norm's inputs and rstd, when the layer has one (Qwen3).
    pub qk: Option<QkNormActs<B>>,
    pub v: B::Buf,        // [rows, kv]
    pub att: B::Buf,      // [rows, q] attention output (o_proj input)
    pub lse: B::Buf,      // [seqs, heads, t]
    pub mid: B::Buf,      // [rows, d] residual after attention, x'
    pub rstd_ffn: B::Buf, // [rows]
    pub a: B::Buf,        // [rows, m] gate pre-activation
    pub b: B::Buf,        // [rows, m] up projection
    pub h: B::Buf,        // [rows, m] act(a)·b, the channels
    /// The inputs of the adapted projections, kept only when the layer has
    /// LoRA adapters (their backward pass reads them): `u = norm(x)` and
    /// `u2 = norm(x')`, `[rows, d]` each.
    pub u: Option<B::Buf>,
    pub u2: Option<B::Buf>,
    /// Gemma 3: the down projection's output before the post-FFN norm
    /// `[rows, d]`, kept only by a forward pass that keeps the layer's
    /// activations ([`Keep`]); the backward pass recomputes it otherwise.
    pub ffn_out: Option<B::Buf>,
}

/// What Qwen3's per-head q/k RMSNorm read, for its backward pass.
pub struct QkNormActs<B: Backend> {
    pub q_in: B::Buf,   // [rows, q] the q projection, before the norm
    pub k_in: B::Buf,   // [rows, kv] the k projection, before the norm
    pub rstd_q: B::Buf, // [rows·heads]
    pub rstd_k: B::Buf, // [rows·kv_heads]
}

/// Qwen3's `q_norm`/`k_norm`: an RMSNorm over each head's vector of q
/// `[rows, heads·hd]` and k `[rows, kv_heads·hd]`, i.e. `rmsnorm_fwd` over
/// the rows of `[rows·heads, hd]` (and `[rows·kv_heads, hd]`) with the
/// `[hd]` weight and the model's eps; applied after the projections (and
/// their adapters), before RoPE. Replaces q and k by their norms and
/// returns the inputs and rstd; `None` (q, k untouched) on a layer without.
pub fn qk_norm_fwd<B: Backend>(
    be: &B,
    c: &ModelConfig,
    lw: &LayerWeights<B::Weight>,
    q: &mut B::Buf,
    k: &mut B::Buf,
    rows: usize,
) -> Result<Option<QkNormActs<B>>> {
    let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) else {
        return Ok(None);
    };
    let (hd, eps) = (c.head_dim, c.rms_eps as f32);
    let (q_out, rstd_q) = be.rmsnorm_fwd(q, qn, rows * c.heads, hd, eps)?;
    let (k_out, rstd_k) = be.rmsnorm_fwd(k, kn, rows * c.kv_heads, hd, eps)?;
    Ok(Some(QkNormActs {
        q_in: std::mem::replace(q, q_out),
        k_in: std::mem::replace(k, k_out),
        rstd_q,
        rstd_k,
    }))
}

/// The backward pass of [`qk_norm_fwd`]: `dq`, `dk` (gradients of the
/// norms' outputs) become the gradients of the projections' outputs, per
/// head row through `rmsnorm_bwd`. Nothing to do without a q/k norm.
pub fn qk_norm_bwd<B: Backend>(
    be: &B,
    c: &ModelConfig,
    lw: &LayerWeights<B::Weight>,
    acts: Option<&QkNormActs<B>>,
    dq: &mut B::Buf,
    dk: &mut B::Buf,
    rows: usize,
) -> Result<()> {
    let (Some(a), Some(qn), Some(kn)) = (acts, &lw.q_norm, &lw.k_norm) else {
        return Ok(());
    };
    let hd = c.head_dim;
    *dq = be.rmsnorm_bwd(dq, &a.q_in, qn, &a.rstd_q, rows * c.heads, hd)?;
    *dk = be.rmsnorm_bwd(dk, &a.k_in, kn, &a.rstd_k, rows * c.kv_heads, hd)?;
    Ok(())
}

/// Batch geometry: `seqs` sequences of `t` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub seqs: usize,
    pub t: usize,
}

impl Geometry {
    pub fn rows(&self) -> usize {
        self.seqs * self.t
    }
}

/// The attention shape of `c`'s layers over a batch of geometry `geo`.
pub fn attn_shape(c: &ModelConfig, geo: Geometry) -> AttnShape {
    AttnShape {
        seqs: geo.seqs,
        t: geo.t,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
    }
}

/// One decoder layer: `x → x' = x + Attn(norm(x))` (with Qwen3's q/k
/// norms inside Attn, [`qk_norm_fwd`]), then
/// `x_next = x' + W_d h` with `h = act(W_g u)·W_u u`, `u = norm(x')`;
/// Gemma 3 normalises each branch's output before its add
/// (`x' = x + norm(Attn(..))`, `x_next = x' + norm(W_d h)`).
/// With `lora`, each projection adds its adapter's term (`LayerLora::apply`).
pub fn layer_forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    lw: &LayerWeights<B::Weight>,
    lora: Option<&LayerLora<B>>,
    rope: &RopeTables<B>,
    x: &B::Buf,
    geo: Geometry,
) -> Result<B::Buf> {
    Ok(layer_forward_keeping(be, model, lw, lora, rope, x, geo, false)?.0)
}

/// [`layer_forward`], returning with the next residual the layer's
/// activations when `keep_acts` (the backward pass then reads them instead
/// of recomputing the layer), with Gemma 3's pre-norm FFN output in
/// `ffn_out`; `None` otherwise, every buffer freed as soon as it is used.
#[allow(clippy::too_many_arguments)]
pub fn layer_forward_keeping<B: Backend>(
    be: &B,
    model: &Model<B>,
    lw: &LayerWeights<B::Weight>,
    lora: Option<&LayerLora<B>>,
    rope: &RopeTables<B>,
    x: &B::Buf,
    geo: Geometry,
    keep_acts: bool,
) -> Result<(B::Buf, Option<LayerActs<B>>)> {
    let (rows, d) = (geo.rows(), model.cfg.hidden);
    let mut acts = layer_acts(be, model, lw, lora, rope, x, geo)?;
    let mut y = ffn_down(be, lw, lora, &acts.h, rows, d)?; // [rows, d]
    if let Some(w) = &lw.post_ffn_norm {
        let yn = be.rmsnorm_fwd(&y, w, rows, d, model.cfg.rms_eps as f32)?.0; // Gemma 3
        let y_in = std::mem::replace(&mut y, yn);
        if keep_acts {
            acts.ffn_out = Some(y_in);
        }
    }
    let mut next = be.zeros(rows * d)?;
    be.add_assign(&mut next, &acts.mid, rows * d)?;
    be.add_assign(&mut next, &y, rows * d)?; // x_next = x' + W_d h
    Ok((next, keep_acts.then_some(acts)))
}

/// The down projection `W_d h` (with its bias and adapter) `[rows, d]`.
pub fn ffn_down<B: Backend>(
    be: &B,
    lw: &LayerWeights<B::Weight>,
    lora: Option<&LayerLora<B>>,
    h: &B::Buf,
    rows: usize,
    d: usize,
) -> Result<B::Buf> {
    let m = lw.ffn;
    let mut y = be.linear(h, &lw.w_down, lw.b_down.as_ref(), rows, m, d)?;
    if let Some(ll) = lora {
        ll.apply(be, Proj::Down, h, &mut y, rows)?;
    }
    Ok(y)
}

/// The part of `layer_forward` up to the channels h: every intermediate the
/// backward pass reads. (The backward pass recomputes a layer with this;
/// it never needs the layer's output, so the down projection is skipped.)
pub fn layer_acts<B: Backend>(
    be: &B,
    model: &Model<B>,
    lw: &LayerWeights<B::Weight>,
    lora: Option<&LayerLora<B>>,
    rope: &RopeTables<B>,
    x: &B::Buf,
    geo: Geometry,
) -> Result<LayerActs<B>> {
    let c = &model.cfg;
    let (rows, d, m) = (geo.rows(), c.hidden, lw.ffn);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let eps = c.rms_eps as f32;
    let shape = attn_shape(c, geo);

    let (u, rstd_attn) = be.rmsnorm_fwd(x, &lw.attn_norm, rows, d, eps)?; // [rows, d]
    let mut q = be.linear(&u, &lw.wq, lw.bq.as_ref(), rows, d, qd)?; // [rows, q]
    let mut k = be.linear(&u, &lw.wk, lw.bk.as_ref(), rows, d, kvd)?; // [rows, kv]
    let mut v = be.linear(&u, &lw.wv, lw.bv.as_ref(), rows, d, kvd)?; // [rows, kv]
    if let Some(ll) = lora {
        ll.apply(be, Proj::Q, &u, &mut q, rows)?;
        ll.apply(be, Proj::K, &u, &mut k, rows)?;
        ll.apply(be, Proj::V, &u, &mut v, rows)?;
    }
    let u = lora.map(|_| u); // kept for the adapters' backward pass
    let qk = qk_norm_fwd(be, c, lw, &mut q, &mut k, rows)?; // Qwen3, Gemma 3: before RoPE
    let (cos, sin) = rope.layer(c, lw.index);
    be.rope(
        &mut q, cos, sin, geo.seqs, geo.t, c.heads, c.head_dim, false,
    )?;
    be.rope(
        &mut k, cos, sin, geo.seqs, geo.t, c.kv_heads, c.head_dim, false,
    )?;
    // Mistral's window, Gemma's on its local layers (ModelConfig::window).
    let (att, lse) = be.attention_fwd(&q, &k, &v, shape, c.window(lw.index))?; // [rows, q]
    let mut o = be.linear(&att, &lw.wo, None, rows, qd, d)?; // [rows, d]
    if let Some(ll) = lora {
        ll.apply(be, Proj::O, &att, &mut o, rows)?;
    }
    let mut mid = be.zeros(rows * d)?;
    be.add_assign(&mut mid, x, rows * d)?;
    let post_attn = match &lw.post_attn_norm {
        Some(w) => {
            let (on, rstd) = be.rmsnorm_fwd(&o, w, rows, d, eps)?;
            be.add_assign(&mut mid, &on, rows * d)?; // x' = x + norm(Attn)
            Some((o, rstd))
        }
        None => {
            be.add_assign(&mut mid, &o, rows * d)?; // x' = x + Attn
            drop(o);
            None
        }
    };

    let (u2, rstd_ffn) = be.rmsnorm_fwd(&mid, &lw.ffn_norm, rows, d, eps)?; // [rows, d]
    let mut a = be.linear(&u2, &lw.w_gate, None, rows, d, m)?; // [rows, m]
    let mut b = be.linear(&u2, &lw.w_up, None, rows, d, m)?; // [rows, m]
    if let Some(ll) = lora {
        ll.apply(be, Proj::Gate, &u2, &mut a, rows)?;
        ll.apply(be, Proj::Up, &u2, &mut b, rows)?;
    }
    let u2 = lora.map(|_| u2);
    let h = be.glu_fwd(c.act, &a, &b, rows * m)?; // [rows, m]
    Ok(LayerActs {
        rstd_attn,
        post_attn,
        q,
        k,
        qk,
        v,
        att,
        lse,
        mid,
        rstd_ffn,
        a,
        b,
        h,
        u,
        u2,
        ffn_out: None,
    })
}

/// What a forward pass keeps for a backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// The residual stream x_0..x_L.
    pub residuals: bool,
    /// The activations ([`LayerActs`]) of the top `acts_layers` layers
    /// (l ≥ L − acts_layers; with `residuals`), which the backward pass
    /// reads instead of recomputing those layers (METHODS.md §4,
    /// the activation-memory budget; `model::keep` picks the count).
    pub acts_layers: usize,
}

impl Keep {
    /// Only z: evaluation.
    pub const OUTPUT: Keep = Keep {
        residuals: false,
        acts_layers: 0,
    };
    /// The residual stream; the backward pass recomputes every layer.
    pub const RESIDUALS: Keep = Keep {
        residuals: true,
        acts_layers: 0,
    };
    /// The residual stream and the top `acts_layers` layers' activations.
    pub fn acts(acts_layers: usize) -> Keep {
        Keep {
            residuals: true,
            acts_layers,
        }
    }
}

/// Output of a forward pass over a batch.
pub struct ForwardOut<B: Backend> {
    /// Final-norm output z `[rows, d]` (what lm_head reads).
    pub z: B::Buf,
    /// Residual stream at each layer boundary, x_0..x_L (`[rows, d]` each),
    /// when requested; x_L is the pre-norm final residual.
    pub residuals: Vec<B::Buf>,
    /// rstd of the final norm `[rows]`.
    pub rstd_final: B::Buf,
    /// Per layer, its activations when kept ([`Keep::acts_layers`]); empty
    /// when none are. The first backward pass takes them.
    pub acts: Vec<Option<LayerActs<B>>>,
}

/// Checks token ids against the vocabulary.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(Error::Invalid(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// Runs the model over `ids` (`[seqs, t]`, row-major), keeping what `keep`
/// asks for the backward pass.
pub fn forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    geo: Geometry,
    keep: Keep,
) -> Result<ForwardOut<B>> {
    forward_with(be, model, None, ids, geo, keep)
}

/// `forward` with LoRA adapters `(adapters, s = α / r)` on every layer.
pub fn forward_with<B: Backend>(
    be: &B,
    model: &Model<B>,
    lora: Option<(&Adapters<B>, f32)>,
    ids: &[u32],
    geo: Geometry,
    keep: Keep,
) -> Result<ForwardOut<B>> {
    let c = &model.cfg;
    if ids.len() != geo.rows() {
        return Err(Error::Invalid(format!(
            "{} token ids for {} sequences of {} tokens",
            ids.len(),
            geo.seqs,
            geo.t
        )));
    }
    check_ids(ids, c.vocab)?;
    let rope = RopeTables::new(be, model, geo.t)?;
    let mut x = model.embed_tokens(be, ids)?; // [rows, d]
    if keep.acts_layers > 0 && !keep.residuals {
        return Err(Error::Invalid(
            "kept activations need the residual stream".into(),
        ));
    }
    let first_kept = c.layers - keep.acts_layers.min(c.layers);
    let mut residuals = Vec::new();
    let mut acts = Vec::new();
    model.for_each_layer(be, 0..c.layers, |l, lw| {
        let ll = lora.map(|(ad, s)| ad.layer(l, s)).transpose()?;
        let keep_acts = l >= first_kept;
        let (next, kept) =
            layer_forward_keeping(be, model, lw, ll.as_ref(), &rope, &x, geo, keep_acts)?;
        if keep.acts_layers > 0 {
            acts.push(kept);
        }
        if keep.residuals {
            residuals.push(std::mem::replace(&mut x, next));
        } else {
            x = next;
        }
        Ok(())
    })?;
    let (z, rstd_final) =
        be.rmsnorm_fwd(&x, &model.norm, geo.rows(), c.hidden, c.rms_eps as f32)?;
    if keep.residuals {
        residuals.push(x);
    }
    Ok(ForwardOut {
        z,
        residuals,
        rstd_final,
        acts,
    })
}

/// `n` deterministic token ids below `vocab` (a multiplicative hash of the
/// position), for benchmarks whose timing must not depend on real text.
pub fn synthetic_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab as u64) as u32)
        .collect()
}

/// Next-token targets for `[seqs, t]` ids: `ids[s, i+1]`, none at the last position.
pub fn next_token_targets(ids: &[u32], geo: Geometry) -> Vec<u32> {
    let mut tg = vec![u32::MAX; ids.len()];
    for s in 0..geo.seqs {
        for i in 0..geo.t - 1 {
            tg[s * geo.t + i] = ids[s * geo.t + i + 1];
        }
    }
    tg
}

/// Full logits `[rows, vocab]` of a batch, on the backend (a prefill).
pub fn logits_on<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    geo: Geometry,
) -> Result<B::Buf> {
    let out = forward(be, model, ids, geo, Keep::OUTPUT)?;
    let c = &model.cfg;
    be.linear(
        &out.z,
        model.lm_head(be)?,
        None,
        geo.rows(),
        c.hidden,
        c.vocab,
    )
}

/// Full logits `[rows, vocab]` of a batch (for tests and small evaluations).
pub fn logits<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    geo: Geometry,
) -> Result<Vec<f32>> {
    be.download(&logits_on(be, model, ids, geo)?)
}

/// Σ NLL and count of next-token predictions over a batch.
pub fn nll<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    geo: Geometry,
) -> Result<(f64, usize)> {
    let out = forward(be, model, ids, geo, Keep::OUTPUT)?;
    nll_of_final(be, model, &out.z, ids, geo)
}

/// Σ NLL and count of next-token predictions over a batch whose final-norm
/// output `z` `[rows, d]` is given.
pub fn nll_of_final<B: Backend>(
    be: &B,
    model: &Model<B>,
    z: &B::Buf,
    ids: &[u32],
    geo: Geometry,
) -> Result<(f64, usize)> {
    let c = &model.cfg;
    let tg = next_token_targets(ids, geo);
    let (sum, n, _) = be.cross_entropy(
        z,
        model.lm_head(be)?,
        &tg,
        geo.rows(),
        c.hidden,
        c.vocab,
        1.0,
        false,
    )?;
    Ok((sum, n))
}
