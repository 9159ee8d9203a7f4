//! `attention_cached` on the CPU: new queries against a KV cache.
//!
//! Caches `[seqs, cap, kv_heads·hd]`. For sequence s with p = pos[s]
//! cached positions and n new tokens (L = p + n after the write), head h
//! reading kv head g = h / (heads/kv_heads):
//!   S = scale·Q_new K_{0..L}ᵀ  `[n, L]`, row i masked beyond column p+i,
//!   P = softmax(S) per row,  O = P V_{0..L}  `[n, hd]`.
//! With a sliding window W row i also masks the columns before p+i+1−W,
//! and the caches are rings (position j in slot j mod cap, the contract of
//! `Backend::attention_cached`): only the positions
//! max(0, p+1−W)..L are read, gathered into a contiguous copy when their
//! slots wrap.
//! Decoding steps (n ≤ `DIRECT_MAX_N`) compute each (query, head) directly
//! with vector dot products and axpys over the cached rows; longer calls
//! (prefill) run one (sequence, head) per rayon task with gemm for both
//! products.
use super::matmul::{gemm_into, Mat};
use super::simd::{self, Isa};
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
/// Arguments are checked by the caller (`check_cache_window`).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    pos: &[usize],
    sh: CacheShape,
    window: Option<usize>,
) -> Vec<f32> {
    let (n, kd) = (sh.n, sh.kv_heads * sh.head_dim);
    for (s, &p) in pos.iter().enumerate() {
        if p + n <= sh.cap {
            let at = (s * sh.cap + p) * kd;
            k_cache[at..at + n * kd].copy_from_slice(&k[s * n * kd..(s + 1) * n * kd]);
            v_cache[at..at + n * kd].copy_from_slice(&v[s * n * kd..(s + 1) * n * kd]);
        } else {
            for i in 0..n {
                let (at, from) = ((s * sh.cap + (p + i) % sh.cap) * kd, (s * n + i) * kd);
                k_cache[at..at + kd].copy_from_slice(&k[from..from + kd]);
                v_cache[at..at + kd].copy_from_slice(&v[from..from + kd]);
            }
        }
    }
    if n <= DIRECT_MAX_N {
        attend_direct(q, k_cache, v_cache, pos, sh, window)
    } else {
        attend_gemm(q, k_cache, v_cache, pos, sh, window)
    }
}

/// First position query position `lim` attends to under `window`.
fn first_key(window: Option<usize>, lim: usize) -> usize {
    window.map_or(0, |w| (lim + 1).saturating_sub(w))
}

/// Attention of the new queries, one (sequence, head) per rayon task with
/// gemm for both products (see the module doc).
fn attend_gemm(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: &[usize],
    sh: CacheShape,
    window: Option<usize>,
) -> Vec<f32> {
    let (n, hd) = (sh.n, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let group = sh.heads / sh.kv_heads;
    let mut out = vec![0f32; sh.seqs * n * qd];
    let optr = SendPtr(out.as_mut_ptr());
    (0..sh.seqs * sh.heads).into_par_iter().for_each(|job| {
        let (s, h) = (job / sh.heads, job % sh.heads);
        let (p, g) = (pos[s], h / group);
        // Positions lo..p+n, at slots lo mod cap onwards unless they wrap,
        // when they are gathered into contiguous rows of hd.
        let lo = first_key(window, p);
        let l = p + n - lo;
        let kv_head = s * sh.cap * kd + g * hd;
        let gathered = (lo % sh.cap + l > sh.cap).then(|| {
            let (mut ks, mut vs) = (Vec::with_capacity(l * hd), Vec::with_capacity(l * hd));
            for j in lo..p + n {
                let at = kv_head + (j % sh.cap) * kd;
                ks.extend_from_slice(&kc[at..at + hd]);
                vs.extend_from_slice(&vc[at..at + hd]);
            }
            (ks, vs)
        });
        let (kbuf, vbuf, kv_off, stride) = match &gathered {
            Some((ks, vs)) => (&ks[..], &vs[..], 0, hd),
            None => (kc, vc, kv_head + (lo % sh.cap) * kd, kd),
        };
        let q_off = s * n * qd + h * hd;
        let mut sc = vec![0f32; n * l];
        let qp = Mat {
            ptr: q[q_off..].as_ptr(),
            rs: qd as isize,
            cs: 1,
        };
        let kt = Mat {
            ptr: kbuf[kv_off..].as_ptr(),
            rs: 1,
            cs: stride as isize,
        };
        // SAFETY: q holds n rows of qd values from q_off, kbuf l rows of
        // `stride` values from kv_off (the cache's l ≤ cap rows, or their
        // gathered copy); sc is n×l.
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
            let (from, valid) = (first_key(window, p + i) - lo, p + i + 1 - lo);
            row[..from].fill(0.0);
            let row = &mut row[from..];
            let valid = valid - from;
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
            ptr: vbuf[kv_off..].as_ptr(),
            rs: stride as isize,
            cs: 1,
        };
        // SAFETY: each job writes the disjoint column block h of the n rows
        // of sequence s; v views l rows of `stride` values from kv_off.
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

/// New tokens per sequence up to which `attend_direct` is used.
const DIRECT_MAX_N: usize = 4;

/// Multiply-adds below which `attend_direct` runs on the calling thread
/// (a short context costs less than waking the pool).
const DIRECT_PAR_MIN: usize = 1 << 17;

/// Attention of each (new query, head) by vector kernels: scores
/// `s_j = scale·q·K_j` for j < L_i = pos[s] + i + 1, then
/// `o = Σ_j softmax(s)_j V_j`. One task per (row, head) writes the
/// disjoint `[hd]` block of the output.
fn attend_direct(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: &[usize],
    sh: CacheShape,
    window: Option<usize>,
) -> Vec<f32> {
    let (n, hd) = (sh.n, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let group = sh.heads / sh.kv_heads;
    let isa = Isa::get();
    let mut out = vec![0f32; sh.seqs * n * qd];
    let job = |(jh, o): (usize, &mut [f32])| {
        let (row, h) = (jh / sh.heads, jh % sh.heads);
        let (s, i) = (row / n, row % n);
        let l = pos[s] + i + 1;
        let lo = first_key(window, l - 1);
        let kv = s * sh.cap * kd + (h / group) * hd;
        let at = |j: usize| kv + (j % sh.cap) * kd; // ring slot of position j
        let qh = &q[row * qd + h * hd..][..hd];
        let mut sc: Vec<f32> = (lo..l)
            .map(|j| scale * simd::dot(isa, qh, &kc[at(j)..][..hd]))
            .collect();
        let max = simd::max(isa, &sc);
        let inv = 1.0 / simd::exp_sum(isa, &mut sc, max);
        for (j, &p) in (lo..).zip(&sc) {
            simd::axpy(isa, o, p * inv, &vc[at(j)..][..hd]);
        }
    };
    let longest = pos.iter().max().unwrap_or(&0) + n;
    if sh.seqs * n * sh.heads * longest * hd < DIRECT_PAR_MIN {
        out.chunks_mut(hd).enumerate().for_each(job);
    } else {
        out.par_chunks_mut(hd).enumerate().for_each(job);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct path equals the gemm path, on a context long enough to
    /// run in parallel, with several sequences at different positions.
    #[test]
    fn direct_attention_matches_gemm_attention() {
        let mut seed = 3u64;
        let mut rnd = |n: usize| {
            seed += 1;
            super::super::test_values(n, -1.0, 1.0, seed)
        };
        for (n, pos) in [(1, vec![1200, 3]), (3, vec![0, 997])] {
            let sh = CacheShape {
                seqs: 2,
                n,
                cap: 1300,
                heads: 6,
                kv_heads: 2,
                head_dim: 40,
            };
            assert!(sh.seqs * n * sh.heads * 1201 * sh.head_dim >= DIRECT_PAR_MIN);
            let (qd, kd) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
            let q = rnd(sh.seqs * n * qd);
            let (kc, vc) = (rnd(sh.seqs * sh.cap * kd), rnd(sh.seqs * sh.cap * kd));
            let a = attend_direct(&q, &kc, &vc, &pos, sh, None);
            let b = attend_gemm(&q, &kc, &vc, &pos, sh, None);
            let err = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "n={n} at {pos:?}: max |Δ| {err}");
        }
    }
}
