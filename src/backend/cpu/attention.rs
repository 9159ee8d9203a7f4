//! Causal grouped-query attention on the CPU, one (sequence, head) at a
//! time with gemm for the two products, parallel across heads.
//!
//! Shapes: q `[seqs·t, heads·hd]`, k/v `[seqs·t, kv_heads·hd]`; query head h
//! reads kv head h / (heads/kv_heads). For one (sequence, head):
//!   S = scale·Q Kᵀ  `[t,t]`, masked above the diagonal,
//!   lse_i = log Σ_j≤i exp S_ij,  P = exp(S − lse),  O = P V.
use super::matmul::{gemm_into, Mat};
use crate::backend::AttnShape;
use gemm::Parallelism;
use rayon::prelude::*;

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

/// Fills `s` (`[t,t]`) with scaled, causally masked scores and returns it
/// turned into probabilities, writing each row's log-sum-exp to `lse`.
fn softmax_causal(s: &mut [f32], t: usize, lse: &mut [f32]) {
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        let max = row[..=i].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row[..=i].iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row[..=i].iter_mut() {
            *x *= inv;
        }
        row[i + 1..].fill(0.0);
        lse[i] = max + sum.ln();
    }
}

/// Scores `S = scale·Q_h K_gᵀ` for one (sequence, head) into `s` (`[t,t]`).
fn scores(q: &[f32], k: &[f32], s: &mut [f32], sh: AttnShape, seq: usize, h: usize) {
    let (t, hd) = (sh.t, sh.head_dim);
    let qd = sh.heads * hd;
    let kd = sh.kv_heads * hd;
    let g = h / (sh.heads / sh.kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let qp = Mat {
        ptr: q[seq * t * qd + h * hd..].as_ptr(),
        rs: qd as isize,
        cs: 1,
    };
    let kt = Mat {
        ptr: k[seq * t * kd + g * hd..].as_ptr(),
        rs: 1,
        cs: kd as isize,
    };
    // SAFETY: q/k hold seqs·t rows of qd/kd values; s is t×t.
    unsafe {
        gemm_into(
            t,
            t,
            hd,
            s.as_mut_ptr(),
            t,
            qp,
            kt,
            scale,
            false,
            Parallelism::None,
        )
    };
}

pub fn forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, hd) = (sh.t, sh.head_dim);
    let qd = sh.heads * hd;
    let kd = sh.kv_heads * hd;
    let mut out = vec![0f32; sh.seqs * t * qd];
    let mut lse = vec![0f32; sh.seqs * sh.heads * t];
    let optr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t)
        .enumerate()
        .for_each(|(job, lse_row)| {
            let (seq, h) = (job / sh.heads, job % sh.heads);
            let g = h / (sh.heads / sh.kv_heads);
            let mut s = vec![0f32; t * t];
            scores(q, k, &mut s, sh, seq, h);
            softmax_causal(&mut s, t, lse_row);
            let vp = Mat {
                ptr: v[seq * t * kd + g * hd..].as_ptr(),
                rs: kd as isize,
                cs: 1,
            };
            // SAFETY: each job writes the disjoint column block h of sequence seq.
            unsafe {
                gemm_into(
                    t,
                    hd,
                    t,
                    optr.at(seq * t * qd + h * hd),
                    qd,
                    Mat::rows(&s, t),
                    vp,
                    1.0,
                    false,
                    Parallelism::None,
                )
            };
        });
    (out, lse)
}

/// Backward of `forward`. Per (sequence, head), with P recomputed from lse:
///   dV_g += Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),
///   dQ = scale·dS K,  dK_g += scale·dSᵀ Q.
/// Jobs are (sequence, kv head) so accumulation into dK/dV never races.
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
    let (t, hd) = (sh.t, sh.head_dim);
    let qd = sh.heads * hd;
    let kd = sh.kv_heads * hd;
    let group = sh.heads / sh.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..sh.seqs * sh.kv_heads).into_par_iter().for_each(|job| {
        let (seq, g) = (job / sh.kv_heads, job % sh.kv_heads);
        let mut s = vec![0f32; t * t];
        let mut dp = vec![0f32; t * t];
        let kv_off = seq * t * kd + g * hd;
        let kp = Mat {
            ptr: k[kv_off..].as_ptr(),
            rs: kd as isize,
            cs: 1,
        };
        let vt = Mat {
            ptr: v[kv_off..].as_ptr(),
            rs: 1,
            cs: kd as isize,
        };
        for h in g * group..(g + 1) * group {
            let q_off = seq * t * qd + h * hd;
            scores(q, k, &mut s, sh, seq, h);
            let lse_row = &lse[(seq * sh.heads + h) * t..][..t];
            for i in 0..t {
                for j in 0..t {
                    let x = &mut s[i * t + j];
                    *x = if j <= i { (*x - lse_row[i]).exp() } else { 0.0 };
                }
            }
            let dop = Mat {
                ptr: dout[q_off..].as_ptr(),
                rs: qd as isize,
                cs: 1,
            };
            // SAFETY (all products below): views cover t rows of hd values at
            // the documented strides; each job owns kv head g of sequence seq
            // and the query heads of its group, so writes are disjoint.
            unsafe {
                // dV_g += Pᵀ dO
                gemm_into(
                    t,
                    hd,
                    t,
                    dvp.at(kv_off),
                    kd,
                    Mat::rows_t(&s, t),
                    dop,
                    1.0,
                    true,
                    Parallelism::None,
                );
                // dP = dO Vᵀ
                gemm_into(
                    t,
                    t,
                    hd,
                    dp.as_mut_ptr(),
                    t,
                    dop,
                    vt,
                    1.0,
                    false,
                    Parallelism::None,
                );
            }
            for i in 0..t {
                let o = &out[q_off + i * qd..][..hd];
                let d = &dout[q_off + i * qd..][..hd];
                let delta: f32 = o.iter().zip(d).map(|(a, b)| a * b).sum();
                for j in 0..=i {
                    dp[i * t + j] = s[i * t + j] * (dp[i * t + j] - delta);
                }
                dp[i * t + i + 1..(i + 1) * t].fill(0.0);
            }
            let qp = Mat {
                ptr: q[q_off..].as_ptr(),
                rs: qd as isize,
                cs: 1,
            };
            unsafe {
                // dQ_h = scale·dS K_g
                gemm_into(
                    t,
                    hd,
                    t,
                    dqp.at(q_off),
                    qd,
                    Mat::rows(&dp, t),
                    kp,
                    scale,
                    false,
                    Parallelism::None,
                );
                // dK_g += scale·dSᵀ Q_h
                gemm_into(
                    t,
                    hd,
                    t,
                    dkp.at(kv_off),
                    kd,
                    Mat::rows_t(&dp, t),
                    qp,
                    scale,
                    true,
                    Parallelism::None,
                );
            }
        }
    });
    (dq, dk, dv)
}
