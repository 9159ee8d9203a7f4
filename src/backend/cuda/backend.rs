//! `CudaBackend<D>`: the `Backend` ops as kernel launches and cuBLAS calls
//! on a [`Device`]. Activations (`Buf`) are f32, weights (`Weight`) bf16;
//! matrix products round their activation operand to bf16 and accumulate in
//! f32 (cuBLAS `CUBLAS_COMPUTE_32F`).
use half::bf16;
use rayon::prelude::*;

use super::buf::DevBuf;
use super::device::{Device, Gemm, GemmType};
use super::kernels as k;
use crate::backend::{
    check_cache_window, check_gather, AdamwStep, AttnShape, Backend, CacheShape, ChannelPartial,
    GatherAxis, GluAct, MatMul, NormalEquations, WeightSource,
};
use crate::{Error, Result};

/// Vocabulary entries per chunk of the losses (cross-entropy, distillation
/// KL) by default: at 2048 rows the chunk's f32 logits take 64 MiB (the KL
/// holds the teacher's too).
pub const CE_CHUNK: usize = 8192;

/// The CUDA backend over device `D`.
pub struct CudaBackend<D: Device> {
    dev: D,
    ce_chunk: usize,
}

impl<D: Device> CudaBackend<D> {
    pub fn new(dev: D) -> Self {
        CudaBackend {
            dev,
            ce_chunk: CE_CHUNK,
        }
    }
    /// Sets the losses' vocabulary chunk (at least 1): cross-entropy and KL.
    pub fn with_ce_chunk(mut self, chunk: usize) -> Self {
        self.ce_chunk = chunk.max(1);
        self
    }
    pub fn device(&self) -> &D {
        &self.dev
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Backend {
            backend: self.dev.backend_name(),
            msg: msg.into(),
        }
    }

    /// Rounds `x[..n]` (f32) to a bf16 copy, the activation operand of a product.
    fn to_bf16(&self, x: &DevBuf<D, f32>, n: usize) -> Result<DevBuf<D, bf16>> {
        if x.len() < n {
            return Err(self.err(format!("matrix operand: {} elements, need {n}", x.len())));
        }
        let out = DevBuf::alloc(&self.dev, x.len())?;
        k::cast(&self.dev, x, &out)?;
        Ok(out)
    }

    /// `y[rows, out] = x[rows, inp] · W[out, inp]ᵀ` with `x` bf16: in cuBLAS's
    /// column-major terms `yᵀ[out, rows] = op_T(W as [inp, out]) · xᵀ[inp, rows]`.
    /// W starts `w_offset` elements into `w` (a vocabulary chunk); y rows are `ldy` apart.
    #[allow(clippy::too_many_arguments)]
    fn matmul_wt(
        &self,
        x: &DevBuf<D, bf16>,
        w: &DevBuf<D, bf16>,
        w_offset: usize,
        y: &DevBuf<D, f32>,
        rows: usize,
        inp: usize,
        out: usize,
        ldy: usize,
    ) -> Result<()> {
        if w.len() < w_offset + out * inp
            || x.len() < rows * inp
            || y.len() < (rows.max(1) - 1) * ldy + out
        {
            return Err(self.err("linear: operand sizes do not match the shape"));
        }
        let g = Gemm {
            trans_a: true,
            trans_b: false,
            m: out,
            n: rows,
            k: inp,
            alpha: 1.0,
            a: w.addr(&self.dev) + 2 * w_offset as u64,
            lda: inp,
            stride_a: 0,
            b: x.addr(&self.dev),
            ldb: inp,
            stride_b: 0,
            beta: 0.0,
            c: y.addr(&self.dev),
            ldc: ldy,
            stride_c: 0,
            batch: 1,
            ab: GemmType::Bf16,
        };
        // SAFETY: operand extents checked above.
        unsafe { self.dev.gemm(&g) }
    }

    /// `dz[rows, d] += dl[rows, vc] · W[v0..v0+vc, d]`, the gradient of a
    /// vocabulary chunk's logits carried back to z (cross-entropy, KL): `dl`
    /// (f32) rounded to bf16, then in cuBLAS's column-major terms
    /// `dzᵀ[d, rows] += (W_chunk as [d, vc]) · dlᵀ[vc, rows]`.
    #[allow(clippy::too_many_arguments)]
    fn add_dlogits_w(
        &self,
        dl: &DevBuf<D, f32>,
        w: &DevBuf<D, bf16>,
        v0: usize,
        dz: &DevBuf<D, f32>,
        rows: usize,
        d: usize,
        vc: usize,
    ) -> Result<()> {
        if w.len() < (v0 + vc) * d || dz.len() < rows * d {
            return Err(self.err("logits gradient: operand sizes do not match the shape"));
        }
        let dev = &self.dev;
        let dlb = self.to_bf16(dl, rows * vc)?;
        let g = Gemm {
            trans_a: false,
            trans_b: false,
            m: d,
            n: rows,
            k: vc,
            alpha: 1.0,
            a: w.addr(dev) + 2 * (v0 * d) as u64,
            lda: d,
            stride_a: 0,
            b: dlb.addr(dev),
            ldb: vc,
            stride_b: 0,
            beta: 1.0,
            c: dz.addr(dev),
            ldc: d,
            stride_c: 0,
            batch: 1,
            ab: GemmType::Bf16,
        };
        // SAFETY: the chunk lies inside w (checked above); dlb holds rows·vc
        // (`to_bf16` checked dl), dz rows·d.
        unsafe { dev.gemm(&g) }?;
        dev.synchronize() // `dlb` is freed on return
    }

    /// `gather_rows`/`gather_cols` (by `axis`): the arguments checked,
    /// then the matrix moved as u16 words (2-byte elements) or u32 words
    /// (4-byte ones, the only other width `check_gather` lets through).
    fn gather(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
        axis: GatherAxis,
    ) -> Result<Vec<u8>> {
        let rows = check_gather(bytes, elem, cols, keep, axis)?;
        if elem == 2 {
            self.gather_words::<u16>(bytes, (rows, cols), keep, axis)
        } else {
            self.gather_words::<u32>(bytes, (rows, cols), keep, axis)
        }
    }

    /// `gather` of a checked `[rows, cols]` matrix of `W` words on the
    /// device: the bytes uploaded as words, `keep` as u32, compact.cu's
    /// `compact_rows_<W>` or `compact_cols_<W>`, the result downloaded.
    fn gather_words<W: k::Word>(
        &self,
        bytes: &[u8],
        (rows, cols): (usize, usize),
        keep: &[usize],
        axis: GatherAxis,
    ) -> Result<Vec<u8>> {
        let out_words = keep.len()
            * match axis {
                GatherAxis::Rows => cols,
                GatherAxis::Cols => rows,
            };
        if out_words == 0 {
            return Ok(Vec::new());
        }
        let keep = keep
            .iter()
            .map(|&i| {
                u32::try_from(i).map_err(|_| self.err(format!("gather: index {i} > u32::MAX")))
            })
            .collect::<Result<Vec<u32>>>()?;
        let dev = &self.dev;
        let src = DevBuf::<D, W>::upload_bytes(dev, bytes)?;
        let dst = DevBuf::<D, W>::alloc(dev, out_words)?;
        match axis {
            GatherAxis::Rows => k::compact_rows(dev, &src, &keep, &dst, rows, cols)?,
            GatherAxis::Cols => k::compact_cols(dev, &src, &keep, &dst, rows, cols)?,
        }
        dst.download_bytes(dev)
    }
}

/// A weight rounded to bf16 on the host (to nearest even, as
/// cast_f32_to_bf16 would), in parallel.
fn to_bf16_host(data: &[f32]) -> Vec<bf16> {
    data.par_iter().map(|&v| bf16::from_f32(v)).collect()
}

impl<D: Device> Backend for CudaBackend<D> {
    type Buf = DevBuf<D, f32>;
    type Weight = DevBuf<D, bf16>;

    fn name(&self) -> &'static str {
        self.dev.backend_name()
    }

    fn available_memory(&self) -> Result<u64> {
        self.dev.available_memory()
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        DevBuf::upload(&self.dev, data)
    }

    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        buf.download(&self.dev)
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        DevBuf::zeros(&self.dev, len)
    }

    fn upload_weight(&self, data: &[f32]) -> Result<Self::Weight> {
        DevBuf::upload(&self.dev, &to_bf16_host(data))
    }

    fn upload_weight_async(&self, data: &[f32]) -> Result<Self::Weight> {
        DevBuf::upload_async(&self.dev, &to_bf16_host(data))
    }

    /// Straight from the mapped file to bf16: into the upload's staging
    /// buffer when in flight (page-locked on the GPU), else into one host
    /// vector. Either way no f32 copy of the tensor is made.
    fn upload_weight_source(&self, t: &dyn WeightSource, in_flight: bool) -> Result<Self::Weight> {
        let fill = |dst: &mut [u8]| t.write_bf16(dst);
        if in_flight {
            DevBuf::upload_async_with(&self.dev, t.numel(), &fill)
        } else {
            let mut host = vec![0u8; 2 * t.numel()];
            fill(&mut host)?;
            DevBuf::upload_bytes(&self.dev, &host)
        }
    }

    fn weights_fence(&self) -> Result<()> {
        self.dev.upload_fence()
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn linear(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf> {
        let xb = self.to_bf16(x, rows * inp)?;
        let y = DevBuf::alloc(&self.dev, rows * out)?;
        self.matmul_wt(&xb, w, 0, &y, rows, inp, out, out)?;
        if let Some(b) = bias {
            k::add_bias(&self.dev, &y, b, rows, out)?;
        }
        Ok(y)
    }

    fn linear_bwd_input(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self::Buf> {
        let dyb = self.to_bf16(dy, rows * out)?;
        if w.len() < out * inp {
            return Err(self.err("linear_bwd_input: weight smaller than [out, inp]"));
        }
        let dx = DevBuf::alloc(&self.dev, rows * inp)?;
        // dxᵀ[inp, rows] = (W as [inp, out]) · dyᵀ[out, rows], column-major.
        let g = Gemm {
            trans_a: false,
            trans_b: false,
            m: inp,
            n: rows,
            k: out,
            alpha: 1.0,
            a: w.addr(&self.dev),
            lda: inp,
            stride_a: 0,
            b: dyb.addr(&self.dev),
            ldb: out,
            stride_b: 0,
            beta: 0.0,
            c: dx.addr(&self.dev),
            ldc: inp,
            stride_c: 0,
            batch: 1,
            ab: GemmType::Bf16,
        };
        // SAFETY: extents checked above and by `to_bf16`.
        unsafe { self.dev.gemm(&g) }?;
        Ok(dx)
    }

    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Weight,
        d: usize,
        scale: f32,
    ) -> Result<Self::Buf> {
        let out = DevBuf::alloc(&self.dev, ids.len() * d)?;
        k::embedding(&self.dev, ids, table, &out, d, scale)?;
        Ok(out)
    }

    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let y = DevBuf::alloc(&self.dev, rows * d)?;
        let rstd = DevBuf::alloc(&self.dev, rows)?;
        k::rmsnorm_fwd(&self.dev, x, w, &y, &rstd, rows, d, eps)?;
        Ok((y, rstd))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        rstd: &Self::Buf,
        rows: usize,
        d: usize,
    ) -> Result<Self::Buf> {
        let dx = DevBuf::alloc(&self.dev, rows * d)?;
        k::rmsnorm_bwd(&self.dev, dy, x, w, rstd, &dx, rows, d)?;
        Ok(dx)
    }

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
    ) -> Result<()> {
        k::rope(
            &self.dev,
            x,
            cos,
            sin,
            seqs * t,
            t,
            heads,
            head_dim,
            inverse,
        )
    }

    fn attention_fwd(
        &self,
        q: &Self::Buf,
        k_: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        window: Option<usize>,
    ) -> Result<(Self::Buf, Self::Buf)> {
        let (out, lse) = (
            DevBuf::alloc(
                &self.dev,
                shape.seqs * shape.t * shape.heads * shape.head_dim,
            )?,
            DevBuf::alloc(&self.dev, shape.seqs * shape.heads * shape.t)?,
        );
        k::attention_fwd(&self.dev, q, k_, v, &out, &lse, shape, window)?;
        Ok((out, lse))
    }

    fn attention_bwd(
        &self,
        dout: &Self::Buf,
        q: &Self::Buf,
        k_: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        shape: AttnShape,
        window: Option<usize>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        let rows = shape.seqs * shape.t;
        let dq = DevBuf::alloc(&self.dev, rows * shape.heads * shape.head_dim)?;
        let dk = DevBuf::alloc(&self.dev, rows * shape.kv_heads * shape.head_dim)?;
        let dv = DevBuf::alloc(&self.dev, rows * shape.kv_heads * shape.head_dim)?;
        k::attention_bwd(
            &self.dev, dout, q, k_, v, out, lse, &dq, &dk, &dv, shape, window,
        )?;
        Ok((dq, dk, dv))
    }

    /// Native: the new rows are appended on the device and each new query
    /// reads only its sequence's live cache rows (attention_decode.cu).
    fn attention_cached(
        &self,
        q: &Self::Buf,
        k_: &Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        pos: &[usize],
        shape: CacheShape,
        window: Option<usize>,
    ) -> Result<Self::Buf> {
        check_cache_window(pos, shape, window)?;
        let out = DevBuf::alloc(
            &self.dev,
            shape.seqs * shape.n * shape.heads * shape.head_dim,
        )?;
        let split = k::decode_split_window(shape, pos, window);
        k::attention_cached(
            &self.dev, q, k_, v, k_cache, v_cache, pos, &out, shape, split, window,
        )?;
        Ok(out)
    }

    fn glu_fwd(&self, act: GluAct, a: &Self::Buf, b: &Self::Buf, n: usize) -> Result<Self::Buf> {
        if a.len() != n {
            return Err(self.err(format!("glu_fwd: a has {} elements, n = {n}", a.len())));
        }
        let h = DevBuf::alloc(&self.dev, n)?;
        k::swiglu_fwd(&self.dev, act, a, b, &h)?;
        Ok(h)
    }

    fn glu_bwd(
        &self,
        act: GluAct,
        dh: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        n: usize,
    ) -> Result<(Self::Buf, Self::Buf)> {
        if dh.len() != n {
            return Err(self.err(format!("glu_bwd: dh has {} elements, n = {n}", dh.len())));
        }
        let da = DevBuf::alloc(&self.dev, n)?;
        let db = DevBuf::alloc(&self.dev, n)?;
        k::swiglu_bwd(&self.dev, act, dh, a, b, &da, &db)?;
        Ok((da, db))
    }

    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, n: usize) -> Result<()> {
        k::add(&self.dev, x, y, n)
    }

    fn zero_rows(&self, x: &mut Self::Buf, width: usize, keep: &[bool]) -> Result<()> {
        k::zero_rows(&self.dev, x, width, keep)
    }

    fn channel_stats(
        &self,
        h: &Self::Buf,
        g: &Self::Buf,
        seqs: usize,
        t: usize,
        m: usize,
    ) -> Result<ChannelPartial> {
        let part = DevBuf::alloc(&self.dev, 5 * seqs * m)?;
        k::channel_stats(&self.dev, h, g, &part, seqs, t, m)?;
        let p = part.download(&self.dev)?;
        // part [5][seqs][m]: sum the sequences of s1, s2, f2, k1 in f64.
        let total = |stat: usize| -> Vec<f64> {
            let mut s = vec![0f64; m];
            for q in 0..seqs {
                let row = &p[(stat * seqs + q) * m..][..m];
                s.iter_mut().zip(row).for_each(|(a, &v)| *a += v as f64);
            }
            s
        };
        Ok(ChannelPartial {
            s1: total(0),
            s2: total(1),
            f2: total(2),
            k1: total(3),
            hg_seq: p[4 * seqs * m..5 * seqs * m]
                .iter()
                .map(|&v| v as f64)
                .collect(),
        })
    }

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
    ) -> Result<NormalEquations> {
        let keep: Vec<u32> = keep
            .iter()
            .map(|&c| u32::try_from(c).map_err(|_| self.err(format!("kept channel {c}"))))
            .collect::<Result<_>>()?;
        let k = keep.len() + usize::from(ones);
        // h_K [rows, k] and r = y − y_sub [rows, d] in f64 (compact.cu, cast.cu).
        let hk = DevBuf::<D, f64>::alloc(&self.dev, rows * k)?;
        k::compact_cols_widen(&self.dev, h, &keep, ones, &hk, rows, m)?;
        let r = DevBuf::<D, f64>::alloc(&self.dev, rows * d)?;
        k::diff_f64(&self.dev, y, y_sub, &r, rows * d)?;
        let g = DevBuf::<D, f64>::zeros(&self.dev, k * k)?;
        let c = DevBuf::<D, f64>::zeros(&self.dev, k * d)?;
        let rr = DevBuf::<D, f64>::zeros(&self.dev, rows)?;
        if rows > 0 && k > 0 {
            // Column-major, as cuBLAS sees the row-major buffers: h_K is
            // [k, rows] (ld k), r is [d, rows] (ld d). G = h_K·h_Kᵀ [k, k]
            // (symmetric, so also row-major); Cᵀ = r·h_Kᵀ [d, k] (ld d) is the
            // row-major C [k, d].
            let f64_product = |trans_b, (m, n, kk), (a, lda), (b, ldb), (c, ldc)| Gemm {
                trans_a: false,
                trans_b,
                m,
                n,
                k: kk,
                alpha: 1.0,
                a,
                lda,
                stride_a: 0,
                b,
                ldb,
                stride_b: 0,
                beta: 0.0,
                c,
                ldc,
                stride_c: 0,
                batch: 1,
                ab: GemmType::F64,
            };
            let (hk_a, r_a) = (hk.addr(&self.dev), r.addr(&self.dev));
            let gram = f64_product(
                true,
                (k, k, rows),
                (hk_a, k),
                (hk_a, k),
                (g.addr(&self.dev), k),
            );
            let cross = f64_product(
                true,
                (d, k, rows),
                (r_a, d),
                (hk_a, k),
                (c.addr(&self.dev), d),
            );
            // ‖r_t‖² per row t: `rows` 1×1 products r_tᵀ·r_t (strided batch), summed on the host.
            let energy = Gemm {
                trans_a: true,
                stride_a: d,
                stride_b: d,
                stride_c: 1,
                batch: rows,
                ..f64_product(
                    false,
                    (1, 1, d),
                    (r_a, d),
                    (r_a, d),
                    (rr.addr(&self.dev), 1),
                )
            };
            for p in [gram, cross, energy] {
                // SAFETY: hk holds rows·k values, r rows·d, g k·k, c k·d, rr rows.
                unsafe { self.dev.gemm(&p) }?;
            }
        }
        Ok(NormalEquations {
            width: k,
            d,
            g: g.download(&self.dev)?,
            c: c.download(&self.dev)?,
            rr: rr.download(&self.dev)?.iter().sum(),
        })
    }

    fn energy(&self, z: &Self::Buf, rows: usize, d: usize, scale: f32) -> Result<(f64, Self::Buf)> {
        if z.len() != rows * d {
            return Err(self.err(format!(
                "energy: z has {} elements, rows·d = {}",
                z.len(),
                rows * d
            )));
        }
        let part = DevBuf::alloc(&self.dev, rows)?;
        k::energy_fwd(&self.dev, z, &part, rows, d, scale)?;
        let dz = DevBuf::alloc(&self.dev, rows * d)?;
        k::energy_bwd(&self.dev, z, &dz, scale)?;
        let j = part.download(&self.dev)?.iter().map(|&v| v as f64).sum();
        Ok((j, dz))
    }

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
    ) -> Result<(f64, usize, Option<Self::Buf>)> {
        if targets.len() != rows || z.len() != rows * d || lm_head.len() != vocab * d {
            return Err(
                self.err("cross_entropy: z, lm_head or targets do not match rows, d, vocab")
            );
        }
        if let Some(&t) = targets
            .iter()
            .find(|&&t| t != u32::MAX && t as usize >= vocab)
        {
            return Err(self.err(format!(
                "cross_entropy: target {t} out of range (vocab {vocab})"
            )));
        }
        let dev = &self.dev;
        let zb = self.to_bf16(z, rows * d)?;
        let tg = DevBuf::upload(dev, targets)?;
        let m = DevBuf::upload(dev, &vec![f32::NEG_INFINITY; rows])?;
        let s = DevBuf::zeros(dev, rows)?;
        let tgt = DevBuf::zeros(dev, rows)?;
        let chunk = self.ce_chunk.min(vocab.max(1));
        let logits = DevBuf::alloc(dev, rows * chunk)?;
        // Pass 1: running log-sum-exp and target logits, chunk by chunk.
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            self.matmul_wt(&zb, lm_head, v0 * d, &logits, rows, d, vc, vc)?;
            k::ce_stats(dev, &logits, &tg, &m, &s, &tgt, rows, vc, v0)?;
        }
        let (mh, sh, th) = (m.download(dev)?, s.download(dev)?, tgt.download(dev)?);
        let (mut nll, mut count) = (0f64, 0usize);
        for r in (0..rows).filter(|&r| targets[r] != u32::MAX) {
            nll += (sh[r] as f64).ln() + mh[r] as f64 - th[r] as f64;
            count += 1;
        }
        if !want_grad {
            return Ok((nll, count, None));
        }
        // Pass 2: dz = Σ_chunks dlogits · W_chunk, dlogits = scale·(softmax − onehot).
        let dz = DevBuf::zeros(dev, rows * d)?;
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            self.matmul_wt(&zb, lm_head, v0 * d, &logits, rows, d, vc, vc)?;
            k::ce_grad(dev, &logits, &tg, &m, &s, rows, vc, v0, scale)?;
            self.add_dlogits_w(&logits, lm_head, v0, &dz, rows, d, vc)?;
        }
        Ok((nll, count, Some(dz)))
    }

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
    ) -> Result<(f64, usize, Option<Self::Buf>)> {
        let n = rows * d;
        if counted.len() != rows
            || z.len() != n
            || z_teacher.len() != n
            || lm_head.len() != vocab * d
            || lm_head_teacher.len() != vocab * d
        {
            return Err(
                self.err("kl_div: z, the lm_heads or the row mask do not match rows, d, vocab")
            );
        }
        let dev = &self.dev;
        let (zb, ztb) = (self.to_bf16(z, n)?, self.to_bf16(z_teacher, n)?);
        let flags: Vec<u32> = counted.iter().map(|&c| c as u32).collect();
        let flags = DevBuf::upload(dev, &flags)?;
        let neg_inf = vec![f32::NEG_INFINITY; rows];
        let (m_s, m_t) = (
            DevBuf::upload(dev, &neg_inf)?,
            DevBuf::upload(dev, &neg_inf)?,
        );
        let (s_s, s_t, a) = (
            DevBuf::zeros(dev, rows)?,
            DevBuf::zeros(dev, rows)?,
            DevBuf::zeros(dev, rows)?,
        );
        let st = k::KlStats {
            m_s: &m_s,
            s_s: &s_s,
            m_t: &m_t,
            s_t: &s_t,
            a: &a,
        };
        let chunk = self.ce_chunk.min(vocab.max(1));
        let (logits, teacher) = (
            DevBuf::alloc(dev, rows * chunk)?,
            DevBuf::alloc(dev, rows * chunk)?,
        );
        // Both chunks' logits: ls = z·W_chunkᵀ, lt = z_t·W_t,chunkᵀ.
        let both = |v0: usize, vc: usize| -> Result<()> {
            self.matmul_wt(&zb, lm_head, v0 * d, &logits, rows, d, vc, vc)?;
            self.matmul_wt(&ztb, lm_head_teacher, v0 * d, &teacher, rows, d, vc, vc)
        };
        // Pass 1: running log-sum-exps of both and a, chunk by chunk.
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            both(v0, vc)?;
            k::kl_stats(dev, &logits, &teacher, &flags, &st, rows, vc)?;
        }
        let (msh, ssh) = (m_s.download(dev)?, s_s.download(dev)?);
        let (mth, sth, ah) = (m_t.download(dev)?, s_t.download(dev)?, a.download(dev)?);
        // KL_r = a/s_t − (m_t + log s_t) + (m_s + log s_s) (kernels/kl_div.cu).
        let (mut kl, mut count) = (0f64, 0usize);
        for r in (0..rows).filter(|&r| counted[r]) {
            let lse_t = mth[r] as f64 + (sth[r] as f64).ln();
            let lse_s = msh[r] as f64 + (ssh[r] as f64).ln();
            kl += ah[r] as f64 / sth[r] as f64 - lse_t + lse_s;
            count += 1;
        }
        if !want_grad {
            return Ok((kl, count, None));
        }
        // Pass 2: dz = Σ_chunks dlogits · W_chunk, dlogits = scale·(p_s − p_t).
        let dz = DevBuf::zeros(dev, n)?;
        for v0 in (0..vocab).step_by(chunk) {
            let vc = chunk.min(vocab - v0);
            both(v0, vc)?;
            k::kl_grad(dev, &logits, &teacher, &flags, &st, rows, vc, scale)?;
            self.add_dlogits_w(&logits, lm_head, v0, &dz, rows, d, vc)?;
        }
        Ok((kl, count, Some(dz)))
    }

    fn matmul(&self, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf, mm: MatMul) -> Result<()> {
        mm.check(a.len(), b.len(), c.len())?;
        // Row-major c[m, n] is column-major cᵀ[n, m] = op(b)ᵀ·op(a)ᵀ: b is
        // cuBLAS's A (b [k, n] row-major is [n, k] column-major, ld n; with
        // trans_b it is [k, n], ld k, transposed) and a its B likewise.
        let g = Gemm {
            trans_a: mm.trans_b,
            trans_b: mm.trans_a,
            m: mm.n,
            n: mm.m,
            k: mm.k,
            alpha: mm.alpha,
            a: b.addr(&self.dev),
            lda: if mm.trans_b { mm.k } else { mm.n }.max(1),
            stride_a: 0,
            b: a.addr(&self.dev),
            ldb: if mm.trans_a { mm.m } else { mm.k }.max(1),
            stride_b: 0,
            beta: mm.beta,
            c: c.addr(&self.dev),
            ldc: mm.n.max(1),
            stride_c: 0,
            batch: 1,
            ab: GemmType::F32,
        };
        // SAFETY: `mm.check` matched a, b and c against the shape.
        unsafe { self.dev.gemm(&g) }
    }

    fn sum_squares(&self, x: &Self::Buf, n: usize) -> Result<f64> {
        if x.len() < n {
            return Err(self.err(format!("sum_squares: {n} values of {}", x.len())));
        }
        let part = DevBuf::alloc(&self.dev, k::sum_squares_blocks(n))?;
        k::sum_squares(&self.dev, x, &part, n)?;
        Ok(part.download(&self.dev)?.iter().sum())
    }

    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        n: usize,
        step: AdamwStep,
    ) -> Result<()> {
        if [p.len(), g.len(), m.len(), v.len()].iter().any(|&l| l != n) {
            return Err(self.err(format!(
                "adamw: parameter, gradient and moments must all hold {n} values"
            )));
        }
        k::adamw(&self.dev, p, g, m, v, n, step)
    }

    fn gather_rows(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>> {
        self.gather(bytes, elem, cols, keep, GatherAxis::Rows)
    }

    fn gather_cols(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>> {
        self.gather(bytes, elem, cols, keep, GatherAxis::Cols)
    }
}
