//! The op-level `Backend` trait that the model code is written against.
//!
//! The trait is model-shaped rather than a general tensor library: every
//! op the forward and backward passes need, with shapes passed explicitly.
//! Activations are f32 buffers (`Buf`); weights are whatever the backend
//! keeps resident (`Weight`: f32 on the CPU, bf16 on CUDA).
//!
//! Layout conventions (row-major everywhere):
//! - a token-major activation is `[rows, width]`, rows = seqs·t;
//! - a linear weight is `[out, inp]` (HF `nn.Linear`), so `y = x·Wᵀ`;
//! - q/k/v are `[rows, heads·head_dim]`, head h of token r at
//!   `r·heads·head_dim + h·head_dim`.
pub mod cpu;
pub mod cuda;

use crate::Result;

/// Shape of one causal grouped-query attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Independent sequences in the batch.
    pub seqs: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads % kv_heads == 0`.
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Per-channel sums over the tokens of one batch, for one layer
/// (METHODS.md section 4). Host f64, added into the run's totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChannelPartial {
    /// Σ_t h, `[m]`.
    pub s1: Vec<f64>,
    /// Σ_t h², `[m]`.
    pub s2: Vec<f64>,
    /// Σ_t g², `[m]`.
    pub f2: Vec<f64>,
    /// Σ_t |h·g|, `[m]`.
    pub k1: Vec<f64>,
    /// Σ_{t in sequence} h·g, `[seqs, m]` (signed; |·| is taken by the caller for tk).
    pub hg_seq: Vec<f64>,
}

/// The ops the transformer runtime needs. One implementation per device.
pub trait Backend: Send + Sync {
    type Buf: Send + Sync;
    type Weight: Send + Sync;

    /// Short name for logs ("cpu", "cuda", "cuda-emu").
    fn name(&self) -> &'static str;

    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Makes a host f32 tensor resident as a weight.
    fn upload_weight(&self, data: &[f32]) -> Result<Self::Weight>;

    /// `y[rows,out] = x[rows,inp] · W[out,inp]ᵀ + bias[out]`.
    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf>;
    /// Gradient of `linear` w.r.t. its input: `dx[rows,inp] = dy[rows,out] · W[out,inp]`.
    fn linear_bwd_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf>;

    /// `out[r,:] = table[ids[r],:]`, table `[vocab, d]`.
    fn embedding(&self, ids: &[u32], table: &Self::Weight, d: usize) -> Result<Self::Buf>;

    /// `y = x · rstd · w`, `rstd = 1/sqrt(mean(x²) + eps)` per row. Returns `(y, rstd[rows])`.
    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// `dx = rstd·(w⊙dy) − x·rstd³·mean(x⊙w⊙dy)` per row.
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rstd: &Self::Buf,
        rows: usize,
        d: usize,
    ) -> Result<Self::Buf>;

    /// Rotary embedding in place, HF "rotate_half" layout: for each head and
    /// i < head_dim/2, `(x_i, x_{i+h/2}) ← (x_i·cos − x_{i+h/2}·sin, x_{i+h/2}·cos + x_i·sin)`.
    /// `cos`/`sin` are `[t, head_dim/2]` (position = token index within its sequence).
    /// `inverse` rotates by −θ, which is the backward pass of the rotation.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        seqs: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;

    /// Causal GQA attention with scale 1/sqrt(head_dim); returns
    /// `(out[rows, heads·head_dim], lse[seqs, heads, t])` where lse is the
    /// log-sum-exp of each query's scaled scores (kept for the backward pass).
    fn attention_fwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Gradients `(dq, dk, dv)` of `attention_fwd` given `dout`, recomputing
    /// probabilities from `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        shape: AttnShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;

    /// `h = silu(a) ⊙ b`, elementwise over `n` values.
    fn swiglu_fwd(&self, a: &Self::Buf, b: &Self::Buf, n: usize) -> Result<Self::Buf>;
    /// `(da, db)` from `dh`: `da = dh·b·σ(a)·(1 + a·(1−σ(a)))`, `db = dh·silu(a)`.
    fn swiglu_bwd(
        &self,
        dh: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        n: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// `x += y`, elementwise over `n` values.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()>;

    /// One fused pass over `h` and `g` (`[seqs·t, m]`) giving the per-channel
    /// sums of METHODS.md section 4 for this batch.
    fn channel_stats(
        &self,
        h: &Self::Buf,
        g: &Self::Buf,
        seqs: usize,
        t: usize,
        m: usize,
    ) -> Result<ChannelPartial>;

    /// Energy objective over `rows` tokens: `J = scale · Σ_r ½‖z_r‖²`,
    /// `dz = scale · z`. Returns `(J, dz)`.
    fn energy(&self, z: &Self::Buf, rows: usize, d: usize, scale: f32) -> Result<(f64, Self::Buf)>;

    /// Cross-entropy of `logits = z · Wᵀ` (`W = lm_head [vocab, d]`) against
    /// `targets` (`u32::MAX` = not predicted), computed over vocabulary chunks
    /// so full logits are never held. Returns `(Σ NLL, count, dz)` where
    /// `dz = scale · ∂(Σ NLL)/∂z` when `want_grad`.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        z: &Self::Buf,
        lm_head: &Self::Weight,
        targets: &[u32],
        rows: usize,
        d: usize,
        vocab: usize,
        scale: f32,
        want_grad: bool,
    ) -> Result<(f64, usize, Option<Self::Buf>)>;
}
