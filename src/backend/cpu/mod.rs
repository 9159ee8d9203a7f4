//! The CPU backend: the reference every other backend is tested against,
//! and a fast fallback (rayon over rows, `gemm` for matrix products, f32).
mod attention;
mod blocks;
mod decode;
mod gather;
mod loss;
pub mod matmul;
pub mod mem;
mod normal;
mod ops;
mod optim;
mod simd;

use super::{
    check_cache_window, check_window, AdamwStep, AttnShape, Backend, CacheShape, ChannelPartial,
    GluAct, LinearPart, MatMul, NormalEquations,
};
use crate::quant::BlockMatrix;
use crate::Result;
use blocks::PackedBlocks;
use matmul::FewRowWeight;

/// f32 host buffers for activations and weights.
pub struct CpuBackend {
    threads: usize,
}

impl CpuBackend {
    /// Uses rayon's global pool (RAYON_NUM_THREADS, default: all cores),
    /// and tunes the process's allocator for big activation buffers
    /// (`mem::tune_allocator`).
    pub fn new() -> Self {
        mem::tune_allocator();
        Self {
            threads: rayon::current_num_threads(),
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// A weight as the CPU backend holds it: its f32 values and, for a matrix
/// given with its ggml blocks (`Backend::upload_weight_blocks`), the
/// blocks too, which the few-row products (decoding steps) read instead.
pub struct CpuWeight {
    values: Vec<f32>,
    blocks: Option<PackedBlocks>,
}

impl std::ops::Deref for CpuWeight {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values
    }
}

impl From<Vec<f32>> for CpuWeight {
    fn from(values: Vec<f32>) -> Self {
        Self {
            values,
            blocks: None,
        }
    }
}

impl CpuWeight {
    /// What the few-row products read: the blocks when there are some.
    fn few_rows(&self) -> FewRowWeight<'_> {
        match &self.blocks {
            Some(b) => FewRowWeight::Blocks(b),
            None => FewRowWeight::F32(&self.values),
        }
    }

    /// Up to how many rows `y = x·Wᵀ` takes the few-row path.
    fn few_rows_max(&self) -> usize {
        match self.blocks {
            Some(_) => blocks::BLOCK_ROWS,
            None => matmul::SKINNY_ROWS,
        }
    }

    /// Whether the few-row products read ggml blocks.
    pub fn has_blocks(&self) -> bool {
        self.blocks.is_some()
    }
}

/// `y[r,:] += bias` for each row r of `y` (`[rows, bias.len()]`).
fn add_bias(y: &mut [f32], bias: Option<&CpuWeight>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            row.iter_mut().zip(b.iter()).for_each(|(y, b)| *y += b);
        }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn available_memory(&self) -> Result<u64> {
        mem::host_available_memory()
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        // Probe first (mapped, not touched, then freed), so that a size no
        // host can give is an error rather than an abort; `vec!` then gets
        // zeroed pages lazily.
        Vec::<f32>::new().try_reserve_exact(len).map_err(|_| {
            crate::Error::Invalid(format!(
                "cannot allocate a buffer of {len} f32 values ({} GiB) on the host",
                len as f64 * 4.0 / (1u64 << 30) as f64
            ))
        })?;
        Ok(vec![0.0; len])
    }

    fn upload_weight(&self, data: &[f32]) -> Result<CpuWeight> {
        Ok(mem::huge_page_copy(data).into())
    }

    fn uses_ggml_blocks(&self) -> bool {
        true
    }

    fn upload_weight_blocks(
        &self,
        data: &[f32],
        blocks: &BlockMatrix<'_>,
        _in_flight: bool,
    ) -> Result<CpuWeight> {
        Ok(CpuWeight {
            values: mem::huge_page_copy(data),
            blocks: Some(PackedBlocks::pack(blocks)),
        })
    }

    fn linear(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Vec<f32>> {
        let mut y = if rows <= w.few_rows_max() {
            matmul::matvec_wt(x, w.few_rows(), rows, inp, out, self.threads)
        } else {
            matmul::matmul_wt(x, w, rows, inp, out, self.threads)
        };
        add_bias(&mut y, bias);
        Ok(y)
    }

    fn linear_many<const N: usize>(
        &self,
        x: &Vec<f32>,
        parts: [LinearPart<'_, CpuWeight>; N],
        rows: usize,
        inp: usize,
    ) -> Result<[Vec<f32>; N]> {
        let few_rows_max = parts.iter().map(|p| p.0.few_rows_max()).min();
        let mut ys = if rows <= few_rows_max.unwrap_or(0) {
            let ws = parts.map(|(w, _, out)| (w.few_rows(), out));
            matmul::matvec_many(x, ws, rows, inp, self.threads)
        } else {
            parts.map(|(w, _, out)| matmul::matmul_wt(x, w, rows, inp, out, self.threads))
        };
        for (y, (_, bias, _)) in ys.iter_mut().zip(parts) {
            add_bias(y, bias);
        }
        Ok(ys)
    }

    fn linear_bwd_input(
        &self,
        dy: &Vec<f32>,
        w: &CpuWeight,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<Vec<f32>> {
        Ok(matmul::matmul_w(dy, w, rows, inp, out, self.threads))
    }

    fn embedding(&self, ids: &[u32], table: &CpuWeight, d: usize, scale: f32) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            out.extend(table[id as usize * d..][..d].iter().map(|&x| x * scale));
        }
        Ok(out)
    }

    fn rmsnorm_fwd(
        &self,
        x: &Vec<f32>,
        w: &CpuWeight,
        _rows: usize,
        d: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(ops::rmsnorm_fwd(x, w, d, eps))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &CpuWeight,
        rstd: &Vec<f32>,
        _rows: usize,
        d: usize,
    ) -> Result<Vec<f32>> {
        Ok(ops::rmsnorm_bwd(dy, x, w, rstd, d))
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        _seqs: usize,
        t: usize,
        heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(x, cos, sin, t, heads, head_dim, inverse);
        Ok(())
    }

    fn attention_fwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        shape: AttnShape,
        window: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_window(window)?;
        Ok(attention::forward_window(q, k, v, shape, window))
    }

    fn attention_bwd(
        &self,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        shape: AttnShape,
        window: Option<usize>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        check_window(window)?;
        Ok(attention::backward_window(
            dout, q, k, v, out, lse, shape, window,
        ))
    }

    fn attention_cached(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        pos: &[usize],
        shape: CacheShape,
        window: Option<usize>,
    ) -> Result<Vec<f32>> {
        check_cache_window(pos, shape, window)?;
        Ok(decode::attention_cached(
            q, k, v, k_cache, v_cache, pos, shape, window,
        ))
    }

    fn glu_fwd(&self, act: GluAct, a: &Vec<f32>, b: &Vec<f32>, _n: usize) -> Result<Vec<f32>> {
        Ok(ops::glu_fwd(act, a, b))
    }

    fn glu_bwd(
        &self,
        act: GluAct,
        dh: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        _n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(ops::glu_bwd(act, dh, a, b))
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, _n: usize) -> Result<()> {
        ops::add_assign(x, y);
        Ok(())
    }

    fn zero_rows(&self, x: &mut Vec<f32>, width: usize, keep: &[bool]) -> Result<()> {
        if x.len() < keep.len() * width {
            return Err(crate::Error::Invalid(format!(
                "zero_rows: {} values for {} rows of {width}",
                x.len(),
                keep.len()
            )));
        }
        ops::zero_rows(x, width, keep);
        Ok(())
    }

    fn channel_stats(
        &self,
        h: &Vec<f32>,
        g: &Vec<f32>,
        seqs: usize,
        t: usize,
        m: usize,
    ) -> Result<ChannelPartial> {
        Ok(ops::channel_stats(h, g, seqs, t, m))
    }

    fn normal_equations(
        &self,
        h: &Vec<f32>,
        keep: &[usize],
        ones: bool,
        y: &Vec<f32>,
        y_sub: Option<&Vec<f32>>,
        rows: usize,
        m: usize,
        d: usize,
    ) -> Result<NormalEquations> {
        let y_sub = y_sub.map(|v| v.as_slice());
        normal::normal_equations(h, keep, ones, y, y_sub, rows, m, d, self.threads)
    }

    fn energy(&self, z: &Vec<f32>, _rows: usize, _d: usize, scale: f32) -> Result<(f64, Vec<f32>)> {
        Ok(ops::energy(z, scale))
    }

    fn cross_entropy(
        &self,
        z: &Vec<f32>,
        lm_head: &CpuWeight,
        targets: &[u32],
        _rows: usize,
        d: usize,
        vocab: usize,
        scale: f32,
        want_grad: bool,
    ) -> Result<(f64, usize, Option<Vec<f32>>)> {
        Ok(loss::cross_entropy(
            z,
            lm_head,
            targets,
            d,
            vocab,
            scale,
            want_grad,
            self.threads,
        ))
    }

    fn kl_div(
        &self,
        z: &Vec<f32>,
        lm_head: &CpuWeight,
        z_teacher: &Vec<f32>,
        lm_head_teacher: &CpuWeight,
        counted: &[bool],
        rows: usize,
        d: usize,
        vocab: usize,
        scale: f32,
        want_grad: bool,
    ) -> Result<(f64, usize, Option<Vec<f32>>)> {
        let n = rows * d;
        if counted.len() != rows
            || z.len() != n
            || z_teacher.len() != n
            || lm_head.len() != vocab * d
            || lm_head_teacher.len() != vocab * d
        {
            return Err(crate::Error::Invalid(
                "kl_div: z, the lm_heads or the row mask do not match rows, d, vocab".into(),
            ));
        }
        Ok(loss::kl_div(
            z,
            lm_head,
            z_teacher,
            lm_head_teacher,
            counted,
            d,
            vocab,
            scale,
            want_grad,
            self.threads,
        ))
    }

    fn matmul(&self, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>, mm: MatMul) -> Result<()> {
        mm.check(a.len(), b.len(), c.len())?;
        matmul::matmul_f32(a, b, c, mm, self.threads);
        Ok(())
    }

    fn sum_squares(&self, x: &Vec<f32>, n: usize) -> Result<f64> {
        let x = x.get(..n).ok_or_else(|| {
            crate::Error::Invalid(format!("sum_squares: {n} values of {}", x.len()))
        })?;
        Ok(optim::sum_squares(x))
    }

    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        n: usize,
        step: AdamwStep,
    ) -> Result<()> {
        if [p.len(), g.len(), m.len(), v.len()].iter().any(|&l| l != n) {
            return Err(crate::Error::Invalid(format!(
                "adamw: parameter, gradient and moments must all hold {n} values"
            )));
        }
        optim::adamw(p, g, m, v, step);
        Ok(())
    }

    fn gather_rows(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>> {
        gather::gather_rows(bytes, elem, cols, keep)
    }

    fn gather_cols(
        &self,
        bytes: &[u8],
        elem: usize,
        cols: usize,
        keep: &[usize],
    ) -> Result<Vec<u8>> {
        gather::gather_cols(bytes, elem, cols, keep)
    }
}

/// Deterministic values in [lo, hi) for the unit tests (a 64-bit LCG seeded by `seed`).
#[cfg(test)]
pub(crate) fn test_values(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}
