//! `attention_cached` on the CPU: new queries against a KV cache, one
//! (sequence, head) per rayon task with gemm for both products.
//!
//! Caches `[seqs, cap, kv_heads·hd]`. For sequence s with p = pos[s]
//! cached positions and n new tokens (L = p + n after the write), head h
//! reading kv head g = h / (heads/kv_heads):
//!   S = scale·Q_new K_{0..L}ᵀ  `[n, L]`, row i masked beyond column p+i,
//!   P = softmax(S) per row,  O = P V_{0..L}  `[n, hd]`.
use super::matmul::{gemm_into, Mat};
use crate::backend::CacheShape;
use gemm::Parallelism;
use rayon::prelude::*;

/// A raw pointer that may be shared across rayon tasks writing disjoint parts.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole Send wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Writes the new rows into the caches, then attends (see the module doc).
/// Arguments are checked by the caller (`check_cache_call`).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    pos: &[usize],
    sh: CacheShape,
) -> Vec<f32> {
    let (n, hd) = (sh.n, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    for (s, &p) in pos.iter().enumerate() {
        let at = (s * sh.cap + p) * kd;
        k_cache[at..at + n * kd].copy_from_slice(&k[s * n * kd..(s + 1) * n * kd]);
        v_cache[at..at + n * kd].copy_from_slice(&v[s * n * kd..(s + 1) * n * kd]);
    }
    let (kc, vc) = (&*k_cache, &*v_cache);
    let scale = 1.0 / (hd as f32).sqrt();
    let group = sh.heads / sh.kv_heads;
    let mut out = vec![0f32; sh.seqs * n * qd];
    let optr = SendPtr(out.as_mut_ptr());
    (0..sh.seqs * sh.heads).into_par_iter().for_each(|job| {
        let (s, h) = (job / sh.heads, job % sh.heads);
        let (p, g) = (pos[s], h / group);
        let l = p + n;
        let kv_off = s * sh.cap * kd + g * hd;
        let q_off = s * n * qd + h * hd;
        let mut sc = vec![0f32; n * l];
        let qp = Mat {
            ptr: q[q_off..].as_ptr(),
            rs: qd as isize,
            cs: 1,
        };
        let kt = Mat {
            ptr: kc[kv_off..].as_ptr(),
            rs: 1,
            cs: kd as isize,
        };
        // SAFETY: q holds n rows of qd values from q_off, the cache l ≤ cap
        // rows of kd values from kv_off; sc is n×l.
        unsafe {
            gemm_into(
                n,
                l,
                hd,
                sc.as_mut_ptr(),
                l,
                qp,
                kt,
                scale,
                false,
                Parallelism::None,
            )
        };
        for (i, row) in sc.chunks_mut(l).enumerate() {
            let valid = p + i + 1;
            let max = row[..valid]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in row[..valid].iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            row[..valid].iter_mut().for_each(|x| *x *= inv);
            row[valid..].fill(0.0);
        }
        let vp = Mat {
            ptr: vc[kv_off..].as_ptr(),
            rs: kd as isize,
            cs: 1,
        };
        // SAFETY: each job writes the disjoint column block h of the n rows
        // of sequence s; v views l rows of kd values from kv_off.
        unsafe {
            gemm_into(
                n,
                hd,
                l,
                optr.get().add(q_off),
                qd,
                Mat::rows(&sc, l),
                vp,
                1.0,
                false,
                Parallelism::None,
            )
        };
    });
    out
}
