//! Causal grouped-query attention on the CPU, gemm for the products.
//!
//! Shapes: q `[seqs·t, heads·hd]`, k/v `[seqs·t, kv_heads·hd]`; query head h
//! reads kv head g = h / (heads/kv_heads). Both passes work in blocks of
//! `QUERY_BLOCK` queries i0..i1, which attend to keys 0..L with L = i1, so
//! the blocks above the diagonal are never computed (about half of every
//! product at long t). For one (sequence, head, block):
//!   S = scale·Q_{i0..i1} K_{0..L}ᵀ  `[i1−i0, L]`, row i masked past column i,
//!   lse_i = log Σ_{j≤i} exp S_ij,  P = exp(S − lse),  O_{i0..i1} = P V_{0..L}.
//! With a sliding window W (`forward_window`, `backward_window`; only when
//! W < t, a wider window being plain causal attention), query i attends to
//! keys i−W < j ≤ i, and the block's keys start at k0 = max(0, i0+1−W): S is
//! `[i1−i0, i1−k0]`, row i also masked before column i+1−W, so memory and
//! work are O(t·(W + QUERY_BLOCK)) rather than O(t²).
use super::matmul::{gemm_into, Mat};
use super::mem::written_by;
use super::simd::{self, Isa};
use crate::backend::AttnShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per block (see the module doc).
const QUERY_BLOCK: usize = 64;

/// A raw pointer that may be shared across rayon tasks writing disjoint parts.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer plus `offset` elements (a method, so closures capture the
    /// whole Sync wrapper rather than its raw-pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// One block of queries i0..i1 of head h (kv head g) in sequence seq.
#[derive(Clone, Copy)]
struct Block {
    seq: usize,
    h: usize,
    g: usize,
    i0: usize,
    i1: usize,
    /// First key of the block (0 without a window).
    k0: usize,
    window: Option<usize>,
}

impl Block {
    /// The `b`-th query block of (sequence, head) `sh_job` = seq·heads + h.
    fn new(sh: AttnShape, sh_job: usize, b: usize, window: Option<usize>) -> Block {
        let (seq, h) = (sh_job / sh.heads, sh_job % sh.heads);
        let i0 = b * QUERY_BLOCK;
        Block {
            seq,
            h,
            g: h / (sh.heads / sh.kv_heads),
            i0,
            i1: ((b + 1) * QUERY_BLOCK).min(sh.t),
            k0: window.map_or(0, |w| (i0 + 1).saturating_sub(w)),
            window,
        }
    }

    /// Keys of the block, k0..i1.
    fn keys(self) -> usize {
        self.i1 - self.k0
    }

    /// Columns `lo..hi` of the block's score row r (query i0 + r) that it
    /// attends to: keys max(0, i+1−W)..=i, relative to k0.
    fn valid(self, r: usize) -> (usize, usize) {
        let i = self.i0 + r;
        let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
        (lo - self.k0, i + 1 - self.k0)
    }

    /// Offset of (row i0, head h) in a `[seqs·t, heads·hd]` buffer.
    fn q_off(self, sh: AttnShape) -> usize {
        (self.seq * sh.t + self.i0) * sh.heads * sh.head_dim + self.h * sh.head_dim
    }

    /// Offset of (row 0 of the sequence, kv head g) in a `[seqs·t, kv_heads·hd]` buffer.
    fn kv_off(self, sh: AttnShape) -> usize {
        self.seq * sh.t * sh.kv_heads * sh.head_dim + self.g * sh.head_dim
    }

    /// Offset of (row k0 of the sequence, kv head g) in a `[seqs·t, kv_heads·hd]` buffer.
    fn k0_off(self, sh: AttnShape) -> usize {
        self.kv_off(sh) + self.k0 * sh.kv_heads * sh.head_dim
    }
}

/// Rows of `[seqs·t, heads·hd]` from `off`, head_dim columns: `rows` rows of it as lhs.
fn view(data: &[f32], off: usize, row_stride: usize) -> Mat {
    Mat {
        ptr: data[off..].as_ptr(),
        rs: row_stride as isize,
        cs: 1,
    }
}

/// The transpose of `view`.
fn view_t(data: &[f32], off: usize, row_stride: usize) -> Mat {
    Mat {
        ptr: data[off..].as_ptr(),
        rs: 1,
        cs: row_stride as isize,
    }
}

/// `S = scale·Q_{i0..i1} K_{k0..i1}ᵀ` of block `b`, `[i1−i0, i1−k0]`.
fn block_scores(q: &[f32], k: &[f32], sh: AttnShape, b: Block) -> Vec<f32> {
    let (m, l, hd) = (b.i1 - b.i0, b.keys(), sh.head_dim);
    let scale = 1.0 / (hd as f32).sqrt();
    // SAFETY: q holds rows i0..i1 of the sequence from q_off, k its rows
    // k0..i1 from k0_off (row strides heads·hd, kv_heads·hd); gemm writes
    // all m×l values.
    unsafe {
        written_by(m * l, |s| {
            gemm_into(
                m,
                l,
                hd,
                s,
                l,
                view(q, b.q_off(sh), sh.heads * hd),
                view_t(k, b.k0_off(sh), sh.kv_heads * hd),
                scale,
                false,
                Parallelism::None,
            )
        })
    }
}

/// Causal attention (see the module doc): returns `(out, lse)`, one task
/// per (sequence, head, query block).
#[cfg(test)]
pub fn forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> (Vec<f32>, Vec<f32>) {
    forward_window(q, k, v, sh, None)
}

/// A window that cuts: `Some(w)` with w < t (a wider one changes nothing).
fn cutting(window: Option<usize>, t: usize) -> Option<usize> {
    window.filter(|&w| w < t)
}

/// [`forward`] with a sliding window (see the module doc).
pub fn forward_window(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: AttnShape,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let window = cutting(window, sh.t);
    let (t, hd) = (sh.t, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    let blocks = t.div_ceil(QUERY_BLOCK);
    let isa = Isa::get();
    let mut lse = vec![0f32; sh.seqs * sh.heads * t];
    let lptr = SendPtr(lse.as_mut_ptr());
    let job = |optr: SendPtr, job: usize| {
        let b = Block::new(sh, job / blocks, job % blocks, window);
        let (m, l) = (b.i1 - b.i0, b.keys());
        let mut s = block_scores(q, k, sh, b);
        // SAFETY: lse rows (seq, h, i0..i1) belong to this job alone.
        let lse_rows = unsafe {
            std::slice::from_raw_parts_mut(lptr.at((b.seq * sh.heads + b.h) * t + b.i0), m)
        };
        for (r, (row, lse_r)) in s.chunks_mut(l).zip(lse_rows).enumerate() {
            let (lo, hi) = b.valid(r);
            let (p, masked) = row.split_at_mut(hi);
            let (before, p) = p.split_at_mut(lo);
            before.fill(0.0);
            let max = simd::max(isa, p);
            let sum = simd::exp_sum(isa, p, max);
            let inv = 1.0 / sum;
            p.iter_mut().for_each(|x| *x *= inv);
            masked.fill(0.0);
            *lse_r = max + sum.ln();
        }
        // SAFETY: P is m×l; v holds rows k0..i1 of the sequence from k0_off;
        // the job writes the disjoint block (rows i0..i1, head h) of out.
        unsafe {
            gemm_into(
                m,
                hd,
                l,
                optr.at(b.q_off(sh)),
                qd,
                Mat::rows(&s, l),
                view(v, b.k0_off(sh), kd),
                1.0,
                false,
                Parallelism::None,
            )
        };
    };
    // SAFETY: the jobs together write every (row, head) block of out once.
    let out = unsafe {
        written_by(sh.seqs * t * qd, |o| {
            let optr = SendPtr(o);
            (0..sh.seqs * sh.heads * blocks)
                .into_par_iter()
                .for_each(|j| job(optr, j))
        })
    };
    (out, lse)
}

/// Backward of `forward`. Per query block, with P recomputed from lse:
///   dV_h += Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),
///   dQ = scale·dS K,  dK_h += scale·dSᵀ Q,
/// all over keys 0..i1. Jobs are (sequence, head): each writes its own
/// columns of dQ and returns its head's dK_h, dV_h (`[t, hd]`), which are
/// then summed over the heads sharing a kv head (heads never race, and
/// there are `heads`, not `kv_heads`, tasks per sequence to share out).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    sh: AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    backward_window(dout, q, k, v, out, lse, sh, None)
}

/// [`backward`] of [`forward_window`]: the same products over each block's
/// keys k0..i1, scores outside the window masked to 0.
#[allow(clippy::too_many_arguments)]
pub fn backward_window(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    sh: AttnShape,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let window = cutting(window, sh.t);
    let (t, hd) = (sh.t, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let isa = Isa::get();
    let job = |dqp: SendPtr, sh_job: usize| -> (Vec<f32>, Vec<f32>) {
        let (mut dk_h, mut dv_h) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        for blk in 0..t.div_ceil(QUERY_BLOCK) {
            let b = Block::new(sh, sh_job, blk, window);
            let (m, l) = (b.i1 - b.i0, b.keys());
            let (q_off, kv_off) = (b.q_off(sh), b.k0_off(sh));
            let lse_rows = &lse[(b.seq * sh.heads + b.h) * t + b.i0..][..m];
            let mut p = block_scores(q, k, sh, b);
            for (r, row) in p.chunks_mut(l).enumerate() {
                let (lo, hi) = b.valid(r);
                let (valid, masked) = row.split_at_mut(hi);
                let (before, valid) = valid.split_at_mut(lo);
                before.fill(0.0);
                simd::exp_sum(isa, valid, lse_rows[r]);
                masked.fill(0.0);
            }
            // SAFETY (all products): views cover the rows i0..i1 (q, dout,
            // dq) or k0..i1 (k, v) of the sequence at the documented strides;
            // p and ds are m×l, dk_h and dv_h t×hd (rows k0..i1 written);
            // this job alone writes head h's columns of dq.
            let mut ds = unsafe {
                // dV_h[k0..i1] += Pᵀ dO
                gemm_into(
                    l,
                    hd,
                    m,
                    dv_h.as_mut_ptr().add(b.k0 * hd),
                    hd,
                    Mat::rows_t(&p, l),
                    view(dout, q_off, qd),
                    1.0,
                    true,
                    Parallelism::None,
                );
                // dP = dO Vᵀ
                written_by(m * l, |dp| {
                    gemm_into(
                        m,
                        l,
                        hd,
                        dp,
                        l,
                        view(dout, q_off, qd),
                        view_t(v, kv_off, kd),
                        1.0,
                        false,
                        Parallelism::None,
                    )
                })
            };
            for (r, (ds_row, p_row)) in ds.chunks_mut(l).zip(p.chunks(l)).enumerate() {
                let o = &out[q_off + r * qd..][..hd];
                let d = &dout[q_off + r * qd..][..hd];
                let delta = simd::dot(isa, o, d);
                let (lo, hi) = b.valid(r);
                ds_row[..lo].fill(0.0);
                for (x, &pv) in ds_row[lo..hi].iter_mut().zip(&p_row[lo..hi]) {
                    *x = pv * (*x - delta);
                }
                ds_row[hi..].fill(0.0);
            }
            unsafe {
                // dQ_h = scale·dS K
                gemm_into(
                    m,
                    hd,
                    l,
                    dqp.at(q_off),
                    qd,
                    Mat::rows(&ds, l),
                    view(k, kv_off, kd),
                    scale,
                    false,
                    Parallelism::None,
                );
                // dK_h[k0..i1] += scale·dSᵀ Q
                gemm_into(
                    l,
                    hd,
                    m,
                    dk_h.as_mut_ptr().add(b.k0 * hd),
                    hd,
                    Mat::rows_t(&ds, l),
                    view(q, q_off, qd),
                    scale,
                    true,
                    Parallelism::None,
                );
            }
        }
        (dk_h, dv_h)
    };
    let mut per_head = Vec::new();
    // SAFETY: every (sequence, head) job writes all t rows of its columns of dq.
    let dq = unsafe {
        written_by(q.len(), |p| {
            let dqp = SendPtr(p);
            per_head = (0..sh.seqs * sh.heads)
                .into_par_iter()
                .map(|j| job(dqp, j))
                .collect();
        })
    };
    let (mut dk, mut dv) = (vec![0f32; k.len()], vec![0f32; v.len()]);
    for (sh_job, (dk_h, dv_h)) in per_head.iter().enumerate() {
        let b = Block::new(sh, sh_job, 0, None);
        for i in 0..t {
            let at = b.kv_off(sh) + i * kd;
            simd::axpy(isa, &mut dk[at..at + hd], 1.0, &dk_h[i * hd..][..hd]);
            simd::axpy(isa, &mut dv[at..at + hd], 1.0, &dv_h[i * hd..][..hd]);
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rnd(len: usize, seed: u64) -> Vec<f32> {
        super::super::test_values(len, -2.0, 2.0, seed)
    }

    /// Two sequences spanning several query blocks, the last one partial.
    const SHAPE: AttnShape = AttnShape {
        seqs: 2,
        t: 2 * QUERY_BLOCK + 21,
        heads: 4,
        kv_heads: 2,
        head_dim: 12,
    };

    /// Probabilities P (`[t, t]`, zero above the diagonal) and lse (`[t]`)
    /// of one (sequence, head), in f64.
    fn naive_p(q: &[f32], k: &[f32], sh: AttnShape, s: usize, h: usize) -> (Vec<f64>, Vec<f64>) {
        let (t, hd) = (sh.t, sh.head_dim);
        let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
        let g = h / (sh.heads / sh.kv_heads);
        let (mut p, mut lse) = (vec![0f64; t * t], vec![0f64; t]);
        for i in 0..t {
            let sc: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..hd)
                        .map(|c| {
                            q[(s * t + i) * qd + h * hd + c] as f64
                                * k[(s * t + j) * kd + g * hd + c] as f64
                        })
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            lse[i] = mx + z.ln();
            for (j, x) in sc.iter().enumerate() {
                p[i * t + j] = (x - mx).exp() / z;
            }
        }
        (p, lse)
    }

    #[test]
    fn blocked_backward_matches_a_plain_loop() {
        let sh = SHAPE;
        let (t, hd) = (sh.t, sh.head_dim);
        let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
        let rows = sh.seqs * t;
        let (q, k, v) = (rnd(rows * qd, 1), rnd(rows * kd, 2), rnd(rows * kd, 3));
        let dout = rnd(rows * qd, 4);
        let (out, lse) = forward(&q, &k, &v, sh);
        let (dq, dk, dv) = backward(&dout, &q, &k, &v, &out, &lse, sh);
        let scale = 1.0 / (hd as f64).sqrt();
        let (mut wq, mut wk, mut wv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; v.len()],
        );
        for s in 0..sh.seqs {
            for h in 0..sh.heads {
                let g = h / (sh.heads / sh.kv_heads);
                let (p, _) = naive_p(&q, &k, sh, s, h);
                let (qa, ka) = (
                    |i: usize| (s * t + i) * qd + h * hd,
                    |j: usize| (s * t + j) * kd + g * hd,
                );
                for i in 0..t {
                    // dP_ij = dO_i·V_j, delta_i = Σ_j P_ij dP_ij, dS = P (dP − delta)
                    let dp: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|c| dout[qa(i) + c] as f64 * v[ka(j) + c] as f64)
                                .sum()
                        })
                        .collect();
                    let delta: f64 = (0..=i).map(|j| p[i * t + j] * dp[j]).sum();
                    for j in 0..=i {
                        let pij = p[i * t + j];
                        let ds = pij * (dp[j] - delta) * scale;
                        for c in 0..hd {
                            wv[ka(j) + c] += pij * dout[qa(i) + c] as f64;
                            wq[qa(i) + c] += ds * k[ka(j) + c] as f64;
                            wk[ka(j) + c] += ds * q[qa(i) + c] as f64;
                        }
                    }
                }
            }
        }
        for (name, got, want) in [("dq", &dq, &wq), ("dk", &dk, &wk), ("dv", &dv, &wv)] {
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{name}[{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn blocked_forward_matches_a_plain_loop() {
        let sh = SHAPE;
        let (t, hd) = (sh.t, sh.head_dim);
        let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
        let rows = sh.seqs * t;
        let (q, k, v) = (rnd(rows * qd, 5), rnd(rows * kd, 6), rnd(rows * kd, 7));
        let (out, lse) = forward(&q, &k, &v, sh);
        for s in 0..sh.seqs {
            for h in 0..sh.heads {
                let g = h / (sh.heads / sh.kv_heads);
                let (p, want_lse) = naive_p(&q, &k, sh, s, h);
                for i in 0..t {
                    let got_lse = lse[(s * sh.heads + h) * t + i] as f64;
                    assert!((got_lse - want_lse[i]).abs() < 1e-4, "lse ({s},{h},{i})");
                    for c in 0..hd {
                        let want: f64 = (0..=i)
                            .map(|j| p[i * t + j] * v[(s * t + j) * kd + g * hd + c] as f64)
                            .sum();
                        let got = out[(s * t + i) * qd + h * hd + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "out ({s},{h},{i},{c}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
