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

use crate::quant::BlockMatrix;
use crate::Result;

/// The activation of a gated FFN, `h = act(a) ⊙ b` (the discriminant is
/// kernels/swiglu.cu's `act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluAct {
    /// SwiGLU: silu(a) = a·σ(a) (LLaMA, Qwen, Mistral).
    Silu = 0,
    /// GeGLU: gelu with the tanh approximation, ½·a·(1 + tanh(√(2/π)·(a + 0.044715·a³)))
    /// (Gemma 3's `gelu_pytorch_tanh`).
    GeluTanh = 1,
}

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

/// Shape of one `attention_cached` call: `seqs` sequences each adding `n`
/// new tokens to a KV cache that holds `cap` positions per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub seqs: usize,
    /// New tokens per sequence in this call.
    pub n: usize,
    /// Cache capacity (positions) per sequence.
    pub cap: usize,
    pub heads: usize,
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

/// One batch's share of the refit's least-squares system (METHODS.md
/// section 9), from `Backend::normal_equations`; batches add up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NormalEquations {
    /// k' = kept channels (+ 1 for the bias column).
    pub width: usize,
    /// Output width d.
    pub d: usize,
    /// G = Σ_t h_K h_Kᵀ, `[k', k']` row-major.
    pub g: Vec<f64>,
    /// C = Σ_t h_K rᵀ, `[k', d]` row-major.
    pub c: Vec<f64>,
    /// Σ_t ‖r‖², the target's energy (for reconstruction errors).
    pub rr: f64,
}

impl NormalEquations {
    /// Zeros for `width` kept columns and outputs of width `d`.
    pub fn zeros(width: usize, d: usize) -> Self {
        Self {
            width,
            d,
            g: vec![0.0; width * width],
            c: vec![0.0; width * d],
            rr: 0.0,
        }
    }

    /// Adds another batch's sums (same shape).
    pub fn add(&mut self, other: &Self) -> crate::Result<()> {
        if (self.width, self.d) != (other.width, other.d) {
            return Err(crate::Error::Invalid(format!(
                "normal equations of width {}×{} added to {}×{}",
                other.width, other.d, self.width, self.d
            )));
        }
        self.g.iter_mut().zip(&other.g).for_each(|(a, b)| *a += b);
        self.c.iter_mut().zip(&other.c).for_each(|(a, b)| *a += b);
        self.rr += other.rr;
        Ok(())
    }
}

/// Shape of a `Backend::matmul` on f32 buffers, row-major:
/// `c[m, n] = alpha · op(a) · op(b) + beta · c`, with `op(a)` `[m, k]` (`a`
/// is `[m, k]`, or `[k, m]` when `trans_a`) and `op(b)` `[k, n]` (`b` is
/// `[k, n]`, or `[n, k]` when `trans_b`). With `beta == 0` c is not read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatMul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl MatMul {
    /// Checks the buffers' lengths against the shape.
    pub fn check(&self, a: usize, b: usize, c: usize) -> Result<()> {
        let need = (self.m * self.k, self.k * self.n, self.m * self.n);
        if (a, b, c) != need {
            return Err(crate::Error::Invalid(format!(
                "matmul {}×{}×{}: operands of {a}, {b} and {c} elements, need {}, {} and {}",
                self.m, self.k, self.n, need.0, need.1, need.2
            )));
        }
        Ok(())
    }
}

/// One AdamW update (METHODS.md section 10), in torch.optim.AdamW's order:
/// `g ← grad_scale·g; p ← p·(1 − lr·wd); m ← m + (1−β1)(g − m);
/// v ← β2·v + (1−β2)·g²; p ← p − step_size · m / (√v / bc2_sqrt + ε)`,
/// with `step_size = lr / (1 − β1^t)` and `bc2_sqrt = √(1 − β2^t)`. Every
/// scalar is formed in f64 and then rounded to f32 (`scalars`), as PyTorch
/// forms them in Python floats before its f32 kernels see them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step number t.
    pub step: u64,
    /// The gradient clipping factor, min(1, max_norm / (‖g‖ + 1e-6)).
    pub grad_scale: f32,
}

/// The f32 scalars an AdamW update applies (`AdamwStep::scalars`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwScalars {
    /// 1 − lr·wd.
    pub decay: f32,
    /// 1 − β1.
    pub one_minus_beta1: f32,
    pub beta2: f32,
    /// 1 − β2.
    pub one_minus_beta2: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
    /// √(1 − β2^t).
    pub bc2_sqrt: f32,
    pub eps: f32,
    pub grad_scale: f32,
}

impl AdamwStep {
    pub fn scalars(&self) -> AdamwScalars {
        let t = self.step.min(i32::MAX as u64) as i32;
        AdamwScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            eps: self.eps as f32,
            grad_scale: self.grad_scale,
        }
    }
}

/// One product of a `Backend::linear_many` call: `(W [out, inp], bias [out], out)`.
pub type LinearPart<'a, W> = (&'a W, Option<&'a W>, usize);

/// Where a weight's values come from (a tensor of a mapped file,
/// `model::weights`): the forms backends take them in. Both refuse NaN or
/// infinite values, naming the weight.
pub trait WeightSource: Sync {
    /// Number of values.
    fn numel(&self) -> usize;
    /// The values as f32.
    fn to_f32(&self) -> Result<Vec<f32>>;
    /// The values as little-endian bf16 (nearest even from f32) into `dst`,
    /// 2 bytes each.
    fn write_bf16(&self, dst: &mut [u8]) -> Result<()>;
}

/// The ops the transformer runtime needs. One implementation per device.
pub trait Backend: Send + Sync {
    type Buf: Send + Sync;
    type Weight: Send + Sync;

    /// Short name for logs ("cpu", "cuda", "cuda-emu").
    fn name(&self) -> &'static str;

    /// Bytes this backend could still allocate for activations: the host's
    /// available memory, or the device's free memory.
    fn available_memory(&self) -> Result<u64>;

    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Makes a host f32 tensor resident as a weight.
    fn upload_weight(&self, data: &[f32]) -> Result<Self::Weight>;
    /// Like `upload_weight`, but the copy may still be in flight when this
    /// returns (the GPU copies on its own stream, overlapping the compute
    /// queued meanwhile): the weight may be used only after `weights_fence`.
    /// Layer streaming uploads the next layer this way.
    fn upload_weight_async(&self, data: &[f32]) -> Result<Self::Weight> {
        self.upload_weight(data)
    }
    /// `upload_weight` (or with `in_flight`, `upload_weight_async`) of a
    /// weight read from its source (a tensor of a mapped file), which
    /// refuses NaN or infinite values. The default converts it to f32
    /// first; a backend that holds bf16 weights has the source write bf16
    /// straight into its upload's staging buffer, with the same values.
    fn upload_weight_source(&self, t: &dyn WeightSource, in_flight: bool) -> Result<Self::Weight> {
        let values = t.to_f32()?;
        if in_flight {
            self.upload_weight_async(&values)
        } else {
            self.upload_weight(&values)
        }
    }
    /// `upload_weight` (or with `in_flight`, `upload_weight_async`) of a
    /// matrix `data` that is also given as the ggml blocks it was
    /// dequantised from (`blocks` dequantises to `data` bit for bit; the
    /// loader checked). The default keeps `data` only; the CPU backend also
    /// keeps the blocks and reads them in its few-row products (decoding).
    fn upload_weight_blocks(
        &self,
        data: &[f32],
        blocks: &BlockMatrix<'_>,
        in_flight: bool,
    ) -> Result<Self::Weight> {
        let _ = blocks;
        if in_flight {
            self.upload_weight_async(data)
        } else {
            self.upload_weight(data)
        }
    }
    /// Whether `upload_weight_blocks` keeps the blocks (else the loader
    /// does not read or check them for this backend).
    fn uses_ggml_blocks(&self) -> bool {
        false
    }
    /// Waits until every `upload_weight_async` issued so far has landed.
    fn weights_fence(&self) -> Result<()> {
        Ok(())
    }
    /// Waits until every operation issued so far has finished (a device
    /// backend queues its work and returns early): a timing that ends
    /// without downloading a result ends here.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

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
    /// `linear` of one input through several weights: `ys[i] = x·W_iᵀ + b_i`,
    /// `[rows, out_i]`. The default runs `linear` per weight; a backend may
    /// instead share one pass over the work of all the products (decoding
    /// steps, where a layer's k and v products alone are too small to keep
    /// every core busy).
    fn linear_many<const N: usize>(
        &self,
        x: &Self::Buf,
        parts: [LinearPart<'_, Self::Weight>; N],
        rows: usize,
        inp: usize,
    ) -> Result<[Self::Buf; N]> {
        let mut ys = Vec::with_capacity(N);
        for (w, bias, out) in parts {
            ys.push(self.linear(x, w, bias, rows, inp, out)?);
        }
        Ok(ys
            .try_into()
            .unwrap_or_else(|_| unreachable!("one output per part")))
    }
    /// Gradient of `linear` w.r.t. its input: `dx[rows,inp] = dy[rows,out] · W[out,inp]`.
    fn linear_bwd_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf>;

    /// `out[r,:] = table[ids[r],:] · scale`, table `[vocab, d]` (scale:
    /// `ModelConfig::embed_scale`, 1 but on Gemma 3).
    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Weight,
        d: usize,
        scale: f32,
    ) -> Result<Self::Buf>;

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
    /// With a sliding window W (Mistral's
    /// `sliding_window`): the query at position i attends to the keys at
    /// positions j with i − W < j ≤ i, itself and the W − 1 before it
    /// (transformers' `sliding_window_causal_mask_function`). `None`, or a
    /// window of at least t, is plain causal attention, bit for bit.
    fn attention_fwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        window: Option<usize>,
    ) -> Result<(Self::Buf, Self::Buf)>;
    /// Gradients `(dq, dk, dv)` of `attention_fwd` given `dout` (the same
    /// `window`), recomputing probabilities from `lse`.
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
        window: Option<usize>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;

    /// Attention of new queries against a KV cache (incremental decoding).
    ///
    /// Caches are `[seqs, cap, kv_heads·hd]`; `q` is `[seqs·n, heads·hd]`,
    /// `k`/`v` are `[seqs·n, kv_heads·hd]` (rows of sequence s at s·n..s·n+n,
    /// RoPE already applied). For each sequence s the new keys and values are
    /// first written at cache positions `pos[s]..pos[s]+n`; then new query i
    /// attends causally to positions `0..=pos[s]+i` (GQA as `attention_fwd`):
    ///   `out_i = Σ_{j ≤ pos[s]+i} softmax_j(q_i·K_j / sqrt(hd)) · V_j`.
    /// Cache positions past `pos[s]+n` are neither read nor written. Returns
    /// `out [seqs·n, heads·hd]`; without a window, requires `pos[s] + n ≤ cap`.
    ///
    /// With a sliding window W (as `attention_fwd`): new query i attends to
    /// positions `max(0, pos[s]+i+1−W) ..= pos[s]+i`. The caches are rings:
    /// position p lives in slot `p mod cap`, so with a window they need only
    /// `cap ≥ n + W − 1` slots (the new rows, written first, then overwrite
    /// no key a new query reads), whatever the positions; without one, or
    /// while `pos[s] + n ≤ cap`, slot p is position p (`check_cache_window`).
    ///
    /// The default is the portable fallback `attention_cached_portable`
    /// (existing ops plus host copies); backends override it natively.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        pos: &[usize],
        shape: CacheShape,
        window: Option<usize>,
    ) -> Result<Self::Buf> {
        attention_cached_portable(self, q, k, v, k_cache, v_cache, pos, shape, window)
    }

    /// `h = act(a) ⊙ b`, elementwise over `n` values (kernels/swiglu.cu).
    fn glu_fwd(&self, act: GluAct, a: &Self::Buf, b: &Self::Buf, n: usize) -> Result<Self::Buf>;
    /// `(da, db)` from `dh`: `da = dh·b·act'(a)`, `db = dh·act(a)`.
    fn glu_bwd(
        &self,
        act: GluAct,
        dh: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        n: usize,
    ) -> Result<(Self::Buf, Self::Buf)>;

    /// `x += y`, elementwise over `n` values.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()>;

    /// Zeroes every row `r` of `x` `[keep.len(), width]` with `!keep[r]`
    /// (the rows a statistic does not count, METHODS.md §11); errs when `x`
    /// holds fewer than `keep.len() · width` values.
    fn zero_rows(&self, x: &mut Self::Buf, width: usize, keep: &[bool]) -> Result<()>;

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

    /// The refit's normal equations over one batch (METHODS.md section 9).
    /// With `h_K` the columns `keep` of `h` `[rows, m]`, in that order,
    /// followed by a column of ones when `ones` (width k' = |keep| + ones),
    /// and `r = y − y_sub` (`[rows, d]`; `r = y` without `y_sub`):
    /// `G = h_Kᵀ h_K` `[k', k']`, `C = h_Kᵀ r` `[k', d]` and `‖r‖²`, every
    /// product formed in f64 from the f32 values. Errs when a kept index
    /// is not below `m`.
    #[allow(clippy::too_many_arguments)]
    fn normal_equations(
        &self,
        h: &Self::Buf,
        keep: &[usize],
        ones: bool,
        y: &Self::Buf,
        y_sub: Option<&Self::Buf>,
        rows: usize,
        m: usize,
        d: usize,
    ) -> Result<NormalEquations>;

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

    /// Knowledge-distillation loss of the student's `logits = z · Wᵀ`
    /// against the teacher's `z_t · W_tᵀ` (both `[vocab, d]`), computed over
    /// vocabulary chunks so full logits are never held. For each row r with
    /// `counted[r]`: `KL_r = Σ_v p_t(v)·(log p_t(v) − log p_s(v))`
    /// (KL(p_teacher ‖ p_student), `F.kl_div(log p_s, log p_t, log_target=True)`).
    /// Returns `(Σ KL_r, count, dz)` with `dz_r = scale·(p_s − p_t)·W` when
    /// `want_grad` (zero for rows not counted).
    #[allow(clippy::too_many_arguments)]
    fn kl_div(
        &self,
        z: &Self::Buf,
        lm_head: &Self::Weight,
        z_teacher: &Self::Buf,
        lm_head_teacher: &Self::Weight,
        counted: &[bool],
        rows: usize,
        d: usize,
        vocab: usize,
        scale: f32,
        want_grad: bool,
    ) -> Result<(f64, usize, Option<Self::Buf>)>;

    /// The f32 product of the LoRA adapters (METHODS.md section 10):
    /// `c = alpha·op(a)·op(b) + beta·c`, shapes as `MatMul` says.
    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, mm: MatMul) -> Result<()>;

    /// `Σ x²` over the first `n` values, accumulated in f64.
    fn sum_squares(&self, x: &Self::Buf, n: usize) -> Result<f64>;

    /// One AdamW update of `n` parameters `p` in place, from gradient `g`,
    /// with moments `m`, `v` updated in place (see `AdamwStep`).
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        step: AdamwStep,
    ) -> Result<()>;

    /// The compaction gather (METHODS.md section 7) over the raw
    /// little-endian bytes of a row-major `[rows, cols]` matrix of
    /// `elem`-byte values (`elem` 2 or 4; rows = `bytes.len() / (cols·elem)`):
    /// rows `keep`, in the order of `keep`, `out[i, :] = in[keep[i], :]`,
    /// `[keep.len(), cols]`. Pure data movement: the output is the input
    /// dtype bit for bit. Errs as `check_gather` says (kept rows < rows).
    fn gather_rows(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>>;
    /// Columns `keep` of the same matrix, in the order of `keep`:
    /// `out[r, j] = in[r, keep[j]]`, `[rows, keep.len()]` (kept columns < cols).
    fn gather_cols(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>>;
}

/// The axis `Backend::gather_rows` (`Rows`) or `gather_cols` (`Cols`) keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherAxis {
    Rows,
    Cols,
}

/// Checks the arguments of a gather along `axis` (`Backend::gather_rows`,
/// `gather_cols`) and returns the matrix's row count: `elem` is 2 or 4,
/// `bytes` whole rows of `cols > 0` elements, every kept index inside the
/// axis, and the output's byte count representable.
pub fn check_gather(
    bytes: &[u8],
    elem: usize,
    cols: usize,
    keep: &[usize],
    axis: GatherAxis,
) -> Result<usize> {
    let what = match axis {
        GatherAxis::Rows => "gather_rows",
        GatherAxis::Cols => "gather_cols",
    };
    let invalid = |msg: String| crate::Error::Invalid(format!("{what}: {msg}"));
    if elem != 2 && elem != 4 {
        return Err(invalid(format!("{elem}-byte elements (2 or 4)")));
    }
    let row = cols
        .checked_mul(elem)
        .filter(|&r| r > 0)
        .ok_or_else(|| invalid(format!("rows of {cols} elements")))?;
    if !bytes.len().is_multiple_of(row) {
        return Err(invalid(format!(
            "{} bytes are not whole rows of {cols} {elem}-byte elements",
            bytes.len()
        )));
    }
    let rows = bytes.len() / row;
    let (extent, out) = match axis {
        GatherAxis::Rows => (rows, keep.len().checked_mul(row)),
        GatherAxis::Cols => (cols, (rows * elem).checked_mul(keep.len())),
    };
    if let Some(&i) = keep.iter().find(|&&i| i >= extent) {
        return Err(invalid(format!("kept index {i} out of range (< {extent})")));
    }
    out.ok_or_else(|| invalid(format!("{} kept indices overflow the output", keep.len())))?;
    Ok(rows)
}

/// Refuses a sliding window of 0 keys (a query always attends to itself).
pub fn check_window(window: Option<usize>) -> Result<()> {
    if window == Some(0) {
        return Err(crate::Error::Invalid(
            "attention: a sliding window of 0 keys".into(),
        ));
    }
    Ok(())
}

/// Checks the arguments of `attention_cached` against its shape:
/// every sequence either fits without wrapping (`pos[s] + n ≤ cap`) or,
/// with a window W, the ring holds the new rows and the W − 1 keys before
/// the first of them (`n + W − 1 ≤ cap`). A window of 0 is refused.
pub fn check_cache_window(pos: &[usize], sh: CacheShape, window: Option<usize>) -> Result<()> {
    let ring = match window {
        None => false,
        Some(0) => return check_window(window),
        Some(w) => sh.n.saturating_add(w - 1) <= sh.cap,
    };
    if ring && pos.len() == sh.seqs {
        return Ok(());
    }
    check_cache_call(pos, sh)
}

/// Checks the arguments of `attention_cached` against its shape.
pub fn check_cache_call(pos: &[usize], sh: CacheShape) -> Result<()> {
    if pos.len() != sh.seqs {
        return Err(crate::Error::Invalid(format!(
            "attention_cached: {} positions for {} sequences",
            pos.len(),
            sh.seqs
        )));
    }
    if let Some(p) = pos.iter().find(|&&p| p + sh.n > sh.cap) {
        return Err(crate::Error::Invalid(format!(
            "KV cache full: {p} cached + {} new tokens exceed its {} positions",
            sh.n, sh.cap
        )));
    }
    Ok(())
}

/// The portable fallback of `Backend::attention_cached`, written with
/// `download`/`upload` and `attention_fwd` only: the caches make a round
/// trip through the host to receive the new rows, and sequence s is run as
/// one causal `attention_fwd` over its `pos[s]+n` cached positions with the
/// new queries placed at the last n rows (earlier query rows are zero and
/// their outputs dropped). Correct on any backend, but O(L²) per call and
/// copying whole caches: backends should override it.
/// With a sliding window, over ring caches (the
/// contract of `Backend::attention_cached`): sequence s runs as one
/// `attention_fwd` over the positions `lo = max(0, pos[s]+1−W) ..
/// pos[s]+n`, gathered from their slots.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_portable<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    k_cache: &mut B::Buf,
    v_cache: &mut B::Buf,
    pos: &[usize],
    sh: CacheShape,
    window: Option<usize>,
) -> Result<B::Buf> {
    check_cache_window(pos, sh, window)?;
    if window.is_some() {
        return portable_ring(be, q, k, v, k_cache, v_cache, pos, sh, window);
    }
    let (qd, kd, n) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim, sh.n);
    let (qh, kh, vh) = (be.download(q)?, be.download(k)?, be.download(v)?);
    let (mut kc, mut vc) = (be.download(k_cache)?, be.download(v_cache)?);
    for (s, &p) in pos.iter().enumerate() {
        let at = (s * sh.cap + p) * kd;
        kc[at..at + n * kd].copy_from_slice(&kh[s * n * kd..(s + 1) * n * kd]);
        vc[at..at + n * kd].copy_from_slice(&vh[s * n * kd..(s + 1) * n * kd]);
    }
    *k_cache = be.upload(&kc)?;
    *v_cache = be.upload(&vc)?;
    let mut out = vec![0f32; sh.seqs * n * qd];
    for (s, &p) in pos.iter().enumerate() {
        let t = p + n;
        let mut qs = vec![0f32; t * qd];
        qs[p * qd..].copy_from_slice(&qh[s * n * qd..(s + 1) * n * qd]);
        let base = s * sh.cap * kd;
        let shape = AttnShape {
            seqs: 1,
            t,
            heads: sh.heads,
            kv_heads: sh.kv_heads,
            head_dim: sh.head_dim,
        };
        let (o, _) = be.attention_fwd(
            &be.upload(&qs)?,
            &be.upload(&kc[base..base + t * kd])?,
            &be.upload(&vc[base..base + t * kd])?,
            shape,
            None,
        )?;
        out[s * n * qd..(s + 1) * n * qd].copy_from_slice(&be.download(&o)?[p * qd..]);
    }
    be.upload(&out)
}

/// The windowed, ring-cache branch of `attention_cached_portable`.
#[allow(clippy::too_many_arguments)]
fn portable_ring<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    k_cache: &mut B::Buf,
    v_cache: &mut B::Buf,
    pos: &[usize],
    sh: CacheShape,
    window: Option<usize>,
) -> Result<B::Buf> {
    let (qd, kd, n) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim, sh.n);
    let (qh, kh, vh) = (be.download(q)?, be.download(k)?, be.download(v)?);
    let (mut kc, mut vc) = (be.download(k_cache)?, be.download(v_cache)?);
    let slot = |s: usize, p: usize| (s * sh.cap + p % sh.cap) * kd;
    for (s, &p) in pos.iter().enumerate() {
        for i in 0..n {
            let (at, from) = (slot(s, p + i), (s * n + i) * kd);
            kc[at..at + kd].copy_from_slice(&kh[from..from + kd]);
            vc[at..at + kd].copy_from_slice(&vh[from..from + kd]);
        }
    }
    *k_cache = be.upload(&kc)?;
    *v_cache = be.upload(&vc)?;
    let mut out = vec![0f32; sh.seqs * n * qd];
    for (s, &p) in pos.iter().enumerate() {
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let t = p + n - lo;
        let mut qs = vec![0f32; t * qd];
        qs[(p - lo) * qd..].copy_from_slice(&qh[s * n * qd..(s + 1) * n * qd]);
        let (mut ks, mut vs) = (Vec::with_capacity(t * kd), Vec::with_capacity(t * kd));
        for j in lo..p + n {
            ks.extend_from_slice(&kc[slot(s, j)..slot(s, j) + kd]);
            vs.extend_from_slice(&vc[slot(s, j)..slot(s, j) + kd]);
        }
        let shape = AttnShape {
            seqs: 1,
            t,
            heads: sh.heads,
            kv_heads: sh.kv_heads,
            head_dim: sh.head_dim,
        };
        let (o, _) = be.attention_fwd(
            &be.upload(&qs)?,
            &be.upload(&ks)?,
            &be.upload(&vs)?,
            shape,
            window,
        )?;
        out[s * n * qd..(s + 1) * n * qd].copy_from_slice(&be.download(&o)?[(p - lo) * qd..]);
    }
    be.upload(&out)
}
