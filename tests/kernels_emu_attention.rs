//! Attention on the emulated device (and on a GPU when one answers):
//! attention.cu forward and backward against tests/common/naive.rs at
//! head_dim 8, 32, 40 and 64 with grouped heads, attention_decode.cu (the
//! KV-cache append, split keys and their combination) against the CPU
//! backend's `attention_cached`, the CUDA backend's run of decoding calls
//! on the same caches, and the split policy; the sliding-window variants
//! (attention_fwd/bwd_window, ring caches) against the CPU backend's ops,
//! themselves checked against the naive windowed attention.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{kernels as k, CudaBackend, Device};
use rku_engine::backend::{AttnShape, Backend, CacheShape};

on_devices! {
    attention_fwd_bwd_gqa => check_attention,
    attention_head_dim_8 => check_attention_hd8,
    attention_head_dim_40 => check_attention_hd40,
    attention_cached_splits => check_attention_cached,
    attention_window_fwd_bwd => check_attention_window,
    attention_cached_window_ring => check_attention_cached_window,
}

on_backends! {
    backend_attention_cached_calls => check_backend_attention_cached,
    backend_attention_cached_window_calls => check_backend_attention_cached_window,
}

fn check_attention<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[
            AttnShape {
                seqs: 2,
                t: 37,
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
            },
            AttnShape {
                seqs: 1,
                t: 45,
                heads: 3,
                kv_heads: 1,
                head_dim: 64,
            },
        ],
    );
}

/// head_dim 8, the tiny fixtures' (one live accumulator slot on lanes 0..7).
fn check_attention_hd8<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[AttnShape {
            seqs: 2,
            t: 33,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        }],
    );
}

/// head_dim 40, not a multiple of 32 (slot 1 live on lanes 0..7 only).
fn check_attention_hd40<D: Device>(dev: &D) {
    check_attention_at(
        dev,
        &[AttnShape {
            seqs: 1,
            t: 40,
            heads: 2,
            kv_heads: 1,
            head_dim: 40,
        }],
    );
}

fn check_attention_at<D: Device>(dev: &D, shapes: &[AttnShape]) {
    for &s in shapes {
        let rows = s.seqs * s.t;
        let seed = 13 + 4 * s.head_dim as u64;
        let q = uniform(rows * s.heads * s.head_dim, seed);
        let kk = uniform(rows * s.kv_heads * s.head_dim, seed + 1);
        let v = uniform(rows * s.kv_heads * s.head_dim, seed + 2);
        let dout = uniform(rows * s.heads * s.head_dim, seed + 3);
        let (q64, k64, v64) = (f64s(&q), f64s(&kk), f64s(&v));
        let (out_r, lse_r) = naive::attention_fwd(&q64, &k64, &v64, s, None);
        let (dq_r, dk_r, dv_r) = naive::attention_bwd(&q64, &k64, &v64, &f64s(&dout), s, None);
        let (gq, gk, gv) = (up(dev, &q), up(dev, &kk), up(dev, &v));
        let (out, lse) = (poisoned(dev, q.len()), poisoned(dev, rows * s.heads));
        k::attention_fwd(dev, &gq, &gk, &gv, &out, &lse, s, None).unwrap();
        assert_close(&down(dev, &out), &f32s(&out_r), F32_TOL, "attention out");
        assert_close(&down(dev, &lse), &f32s(&lse_r), F32_TOL, "attention lse");
        let (dq, dk, dv) = (
            poisoned(dev, q.len()),
            poisoned(dev, kk.len()),
            poisoned(dev, v.len()),
        );
        k::attention_bwd(
            dev,
            &up(dev, &dout),
            &gq,
            &gk,
            &gv,
            &out,
            &lse,
            &dq,
            &dk,
            &dv,
            s,
            None,
        )
        .unwrap();
        assert_close(&down(dev, &dq), &f32s(&dq_r), F32_TOL, "attention dq");
        assert_close(&down(dev, &dk), &f32s(&dk_r), F32_TOL, "attention dk");
        assert_close(&down(dev, &dv), &f32s(&dv_r), F32_TOL, "attention dv");
    }
}

/// Inputs of one `attention_cached` call. The caches hold random rows below
/// pos[s] and NaN from pos[s] on: the new rows must land at pos[s]..pos[s]+n,
/// and a row past that read (NaN in the output) or written shows.
struct CacheCase {
    sh: CacheShape,
    pos: Vec<usize>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

impl CacheCase {
    fn new(sh: CacheShape, pos: &[usize], seed: u64) -> Self {
        let (rows, kvd) = (sh.seqs * sh.n, sh.kv_heads * sh.head_dim);
        let cache = |seed| {
            let mut c = uniform(sh.seqs * sh.cap * kvd, seed);
            for (s, &p) in pos.iter().enumerate() {
                c[(s * sh.cap + p) * kvd..(s + 1) * sh.cap * kvd].fill(f32::NAN);
            }
            c
        };
        let (k_cache, v_cache) = (cache(seed), cache(seed + 1));
        CacheCase {
            sh,
            pos: pos.to_vec(),
            q: uniform(rows * sh.heads * sh.head_dim, seed + 2),
            k: uniform(rows * kvd, seed + 3),
            v: uniform(rows * kvd, seed + 4),
            k_cache,
            v_cache,
        }
    }

    /// The caches after the call: rows pos[s]..pos[s]+n replaced by the new ones.
    fn appended(&self) -> (Vec<f32>, Vec<f32>) {
        let (n, kvd) = (self.sh.n, self.sh.kv_heads * self.sh.head_dim);
        let (mut kc, mut vc) = (self.k_cache.clone(), self.v_cache.clone());
        for (s, &p) in self.pos.iter().enumerate() {
            let at = (s * self.sh.cap + p) * kvd;
            kc[at..at + n * kvd].copy_from_slice(&self.k[s * n * kvd..(s + 1) * n * kvd]);
            vc[at..at + n * kvd].copy_from_slice(&self.v[s * n * kvd..(s + 1) * n * kvd]);
        }
        (kc, vc)
    }

    /// The CPU backend's output.
    fn cpu_out(&self) -> Vec<f32> {
        let (mut kc, mut vc) = (self.k_cache.clone(), self.v_cache.clone());
        CpuBackend::new()
            .attention_cached(
                &self.q, &self.k, &self.v, &mut kc, &mut vc, &self.pos, self.sh, None,
            )
            .unwrap()
    }
}

/// attention_decode.cu against the CPU backend's `attention_cached`, each
/// case with one split (direct output) and several (combine), splits that
/// some sequences never reach, and query tiles of 4 rows left partial.
fn check_attention_cached<D: Device>(dev: &D) {
    let shape = |seqs, n, cap, heads, kv_heads, head_dim| CacheShape {
        seqs,
        n,
        cap,
        heads,
        kv_heads,
        head_dim,
    };
    let cases: [(CacheShape, &[usize], &[usize]); 3] = [
        // Decoding one token at three depths (an empty cache, the last free
        // position of a 71-row prefix); hd 40 is not a multiple of 32.
        (shape(3, 1, 80, 4, 2, 40), &[0, 37, 70], &[32, 64, 96]),
        // A prefill chunk of 5 into non-empty caches, group 3: 15 query rows
        // per kv head, the last block holding 3; hd 8, the tiny fixtures'.
        (shape(2, 5, 60, 6, 2, 8), &[3, 41], &[32, 64]),
        // hd 128 (four accumulator slots per lane), no grouping, n = 2.
        (shape(2, 2, 48, 2, 2, 128), &[33, 5], &[32, 64]),
    ];
    for (sh, pos, splits) in cases {
        let c = CacheCase::new(sh, pos, 40 + sh.head_dim as u64);
        let want = c.cpu_out();
        let (kc_want, vc_want) = c.appended();
        for &split in splits {
            let what = format!("attention_cached {sh:?} split {split}");
            let (kc, vc) = (up(dev, &c.k_cache), up(dev, &c.v_cache));
            let out = poisoned(dev, c.q.len());
            k::attention_cached(
                dev,
                &up(dev, &c.q),
                &up(dev, &c.k),
                &up(dev, &c.v),
                &kc,
                &vc,
                pos,
                &out,
                sh,
                split,
                None,
            )
            .unwrap();
            assert_close(&down(dev, &out), &want, F32_TOL, &format!("{what} out"));
            assert_same_bits(&down(dev, &kc), &kc_want, &format!("{what} k_cache"));
            assert_same_bits(&down(dev, &vc), &vc_want, &format!("{what} v_cache"));
        }
    }
}

/// `CudaBackend::attention_cached` (its own choice of split) against the
/// CPU backend over a run of calls on the same caches, as a decoder makes
/// them: a prefill chunk, single tokens, another chunk, then lengths past
/// 64 (two splits) up to the last position; and its argument checks.
fn check_backend_attention_cached<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let (seqs, cap, heads, kv_heads, head_dim) = (3, 100, 4, 2, 16);
    let kvd = kv_heads * head_dim;
    let (mut kc_want, mut vc_want) = (uniform(seqs * cap * kvd, 77), uniform(seqs * cap * kvd, 78));
    let (mut kc, mut vc) = (be.upload(&kc_want).unwrap(), be.upload(&vc_want).unwrap());
    let calls: [(usize, [usize; 3]); 5] = [
        (7, [0, 2, 0]),
        (1, [7, 5, 3]),
        (3, [8, 40, 4]),
        (1, [70, 43, 99]),
        (1, [71, 0, 12]),
    ];
    for (call, (n, pos)) in calls.into_iter().enumerate() {
        let seed = 80 + 3 * call as u64;
        let sh = CacheShape {
            seqs,
            n,
            cap,
            heads,
            kv_heads,
            head_dim,
        };
        let (q, kk, v) = (
            uniform(seqs * n * heads * head_dim, seed),
            uniform(seqs * n * kvd, seed + 1),
            uniform(seqs * n * kvd, seed + 2),
        );
        let want = cpu
            .attention_cached(&q, &kk, &v, &mut kc_want, &mut vc_want, &pos, sh, None)
            .unwrap();
        let (gq, gk, gv) = (
            be.upload(&q).unwrap(),
            be.upload(&kk).unwrap(),
            be.upload(&v).unwrap(),
        );
        let got = be
            .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &pos, sh, None)
            .unwrap();
        let what = format!("{} attention_cached n {n} pos {pos:?}", be.name());
        assert_close(&be.download(&got).unwrap(), &want, F32_TOL, &what);
        assert_same_bits(&be.download(&kc).unwrap(), &kc_want, &what);
        assert_same_bits(&be.download(&vc).unwrap(), &vc_want, &what);
        if n == 1 {
            let err = be
                .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &pos[..2], sh, None)
                .err()
                .unwrap();
            assert!(err.to_string().contains("2 positions for 3"), "{err}");
            let full = [pos[0], pos[1], cap];
            let err = be
                .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &full, sh, None)
                .err()
                .unwrap();
            assert!(err.to_string().contains("KV cache full"), "{err}");
        }
    }
}

/// The split policy: one sequence of Qwen2.5-7B decoding at 2048 cached
/// positions is cut into 32 splits of 64 keys (256 blocks); a 512-token
/// prefill chunk already fills the GPU and gets one split.
#[test]
fn decode_split_policy() {
    let sh = CacheShape {
        seqs: 1,
        n: 1,
        cap: 4096,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
    };
    assert_eq!(k::decode_split(sh, &[2047]), 64);
    assert_eq!(k::decode_split(sh, &[0]), 64);
    assert_eq!(k::decode_split(CacheShape { n: 512, ..sh }, &[1024]), 1536);
    assert_eq!(
        k::decode_split(CacheShape { seqs: 64, ..sh }, &[2047; 64]),
        2048
    );
}

/// Windows of 1 key, shorter than a tile, one key past a tile, and wider
/// than t (plain causal, bit for bit), at odd sizes (t 37 and 35, hd 8 and 40):
/// attention.cu with a window against the CPU backend's
/// `attention_fwd`/`attention_bwd`, which are checked against
/// the naive windowed attention; outputs NaN-poisoned before the launches.
fn check_attention_window<D: Device>(dev: &D) {
    let cpu = CpuBackend::new();
    let shapes: [(AttnShape, &[usize]); 2] = [
        (
            AttnShape {
                seqs: 2,
                t: 37,
                heads: 4,
                kv_heads: 2,
                head_dim: 8,
            },
            &[1, 33, 46],
        ),
        (
            AttnShape {
                seqs: 1,
                t: 35,
                heads: 2,
                kv_heads: 1,
                head_dim: 40,
            },
            &[5],
        ),
    ];
    for (s, windows) in shapes {
        let rows = s.seqs * s.t;
        let seed = 300 + s.head_dim as u64;
        let q = uniform(rows * s.heads * s.head_dim, seed);
        let kk = uniform(rows * s.kv_heads * s.head_dim, seed + 1);
        let v = uniform(rows * s.kv_heads * s.head_dim, seed + 2);
        let dout = uniform(rows * s.heads * s.head_dim, seed + 3);
        let (q64, k64, v64) = (f64s(&q), f64s(&kk), f64s(&v));
        let (plain_out, plain_lse) = cpu.attention_fwd(&q, &kk, &v, s, None).unwrap();
        for &w in windows {
            let what = format!("{s:?} window {w}");
            let win = Some(w);
            // The CPU op against the naive loop.
            let (out_c, lse_c) = cpu.attention_fwd(&q, &kk, &v, s, win).unwrap();
            let (out_r, lse_r) = naive::attention_fwd(&q64, &k64, &v64, s, win);
            assert_close(&out_c, &f32s(&out_r), F32_TOL, &format!("cpu {what} out"));
            assert_close(&lse_c, &f32s(&lse_r), F32_TOL, &format!("cpu {what} lse"));
            let (dq_c, dk_c, dv_c) = cpu
                .attention_bwd(&dout, &q, &kk, &v, &out_c, &lse_c, s, win)
                .unwrap();
            let (dq_r, dk_r, dv_r) = naive::attention_bwd(&q64, &k64, &v64, &f64s(&dout), s, win);
            assert_close(&dq_c, &f32s(&dq_r), F32_TOL, &format!("cpu {what} dq"));
            assert_close(&dk_c, &f32s(&dk_r), F32_TOL, &format!("cpu {what} dk"));
            assert_close(&dv_c, &f32s(&dv_r), F32_TOL, &format!("cpu {what} dv"));
            if w >= s.t {
                assert_same_bits(&out_c, &plain_out, &format!("cpu {what} = causal"));
                assert_same_bits(&lse_c, &plain_lse, &format!("cpu {what} = causal lse"));
            }
            // The kernels against the CPU op.
            let (gq, gk, gv) = (up(dev, &q), up(dev, &kk), up(dev, &v));
            let (out, lse) = (poisoned(dev, q.len()), poisoned(dev, rows * s.heads));
            k::attention_fwd(dev, &gq, &gk, &gv, &out, &lse, s, win).unwrap();
            assert_close(&down(dev, &out), &out_c, F32_TOL, &format!("{what} out"));
            assert_close(&down(dev, &lse), &lse_c, F32_TOL, &format!("{what} lse"));
            if w >= s.t {
                let (o2, l2) = (poisoned(dev, q.len()), poisoned(dev, rows * s.heads));
                k::attention_fwd(dev, &gq, &gk, &gv, &o2, &l2, s, None).unwrap();
                assert_same_bits(
                    &down(dev, &out),
                    &down(dev, &o2),
                    &format!("{what} = causal"),
                );
            }
            let (dq, dk, dv) = (
                poisoned(dev, q.len()),
                poisoned(dev, kk.len()),
                poisoned(dev, v.len()),
            );
            k::attention_bwd(
                dev,
                &up(dev, &dout),
                &gq,
                &gk,
                &gv,
                &out,
                &lse,
                &dq,
                &dk,
                &dv,
                s,
                win,
            )
            .unwrap();
            assert_close(&down(dev, &dq), &dq_c, F32_TOL, &format!("{what} dq"));
            assert_close(&down(dev, &dk), &dk_c, F32_TOL, &format!("{what} dk"));
            assert_close(&down(dev, &dv), &dv_c, F32_TOL, &format!("{what} dv"));
        }
        let (o, l) = (poisoned(dev, q.len()), poisoned(dev, rows * s.heads));
        let (gq, gk, gv) = (up(dev, &q), up(dev, &kk), up(dev, &v));
        assert!(k::attention_fwd(dev, &gq, &gk, &gv, &o, &l, s, Some(0)).is_err());
    }
}

/// Ring caches `[seqs, cap, kvd]` for a call at `pos` under window `w`:
/// random in the slots whose latest position before pos[s] is a key of the
/// call's first query (≥ pos[s] + 1 − w), NaN elsewhere, so a read outside
/// the window shows.
fn ring_cache(sh: CacheShape, pos: &[usize], w: usize, seed: u64) -> Vec<f32> {
    let kvd = sh.kv_heads * sh.head_dim;
    let mut c = uniform(sh.seqs * sh.cap * kvd, seed);
    for (s, &p) in pos.iter().enumerate() {
        let lo = (p + 1).saturating_sub(w);
        for x in 0..sh.cap {
            // the latest position p' < p with p' ≡ x (mod cap)
            let latest = (p > x).then(|| x + (p - 1 - x) / sh.cap * sh.cap);
            if latest.is_none_or(|q| q < lo) {
                c[(s * sh.cap + x) * kvd..][..kvd].fill(f32::NAN);
            }
        }
    }
    c
}

/// attention_decode.cu with a window on ring caches against the CPU
/// backend's `attention_cached` (itself against the naive windowed
/// attention over the positions' keys), one and several splits, rings that
/// wrap, queries whose window starts mid-split; caches bit for bit.
fn check_attention_cached_window<D: Device>(dev: &D) {
    let cpu = CpuBackend::new();
    let shape = |seqs, n, cap, heads, kv_heads, head_dim| CacheShape {
        seqs,
        n,
        cap,
        heads,
        kv_heads,
        head_dim,
    };
    // (shape, window, positions, splits)
    let cases: [(CacheShape, usize, &[usize], &[usize]); 4] = [
        // Steps at three depths, window 37 in a ring of 37: wraps twice.
        (shape(3, 1, 37, 4, 2, 40), 37, &[0, 36, 90], &[32, 64]),
        // A chunk of 5 under window 6 (ring 10), group 3, hd 8.
        (shape(2, 5, 10, 6, 2, 8), 6, &[3, 41], &[32]),
        // Window 70 > 64-key splits, no wrap yet for one sequence.
        (shape(2, 2, 80, 2, 2, 16), 70, &[20, 150], &[32, 64]),
        // Window 1: each query reads only its own key.
        (shape(2, 3, 3, 4, 1, 8), 1, &[0, 9], &[32]),
    ];
    for (sh, w, pos, splits) in cases {
        let (rows, kvd, qd) = (
            sh.seqs * sh.n,
            sh.kv_heads * sh.head_dim,
            sh.heads * sh.head_dim,
        );
        let seed = 500 + w as u64;
        let (q, kn, vn) = (
            uniform(rows * qd, seed),
            uniform(rows * kvd, seed + 1),
            uniform(rows * kvd, seed + 2),
        );
        let (kc0, vc0) = (
            ring_cache(sh, pos, w, seed + 3),
            ring_cache(sh, pos, w, seed + 4),
        );
        let (mut kc_want, mut vc_want) = (kc0.clone(), vc0.clone());
        let win = Some(w);
        let want = cpu
            .attention_cached(&q, &kn, &vn, &mut kc_want, &mut vc_want, pos, sh, win)
            .unwrap();
        // The CPU op against naive attention over the keys of positions lo..p+n.
        for (s, &p) in pos.iter().enumerate() {
            let lo = (p + 1).saturating_sub(w);
            let t = p + sh.n - lo;
            let row = |c: &[f32], j: usize| c[(s * sh.cap + j % sh.cap) * kvd..][..kvd].to_vec();
            let ks: Vec<f32> = (lo..p + sh.n).flat_map(|j| row(&kc_want, j)).collect();
            let vs: Vec<f32> = (lo..p + sh.n).flat_map(|j| row(&vc_want, j)).collect();
            let mut qs = vec![0f32; t * qd];
            qs[(p - lo) * qd..].copy_from_slice(&q[s * sh.n * qd..(s + 1) * sh.n * qd]);
            let ash = AttnShape {
                seqs: 1,
                t,
                heads: sh.heads,
                kv_heads: sh.kv_heads,
                head_dim: sh.head_dim,
            };
            let (o, _) = naive::attention_fwd(&f64s(&qs), &f64s(&ks), &f64s(&vs), ash, win);
            let got = &want[s * sh.n * qd..(s + 1) * sh.n * qd];
            let what = format!("cpu window {w} {sh:?} seq {s}");
            assert_close(got, &f32s(&o[(p - lo) * qd..]), F32_TOL, &what);
        }
        for &split in splits {
            let what = format!("attention_cached window {w} {sh:?} split {split}");
            let (kc, vc) = (up(dev, &kc0), up(dev, &vc0));
            let out = poisoned(dev, q.len());
            k::attention_cached(
                dev,
                &up(dev, &q),
                &up(dev, &kn),
                &up(dev, &vn),
                &kc,
                &vc,
                pos,
                &out,
                sh,
                split,
                win,
            )
            .unwrap();
            assert_close(&down(dev, &out), &want, F32_TOL, &format!("{what} out"));
            assert_same_bits(&down(dev, &kc), &kc_want, &format!("{what} k_cache"));
            assert_same_bits(&down(dev, &vc), &vc_want, &format!("{what} v_cache"));
        }
    }
}

/// `CudaBackend::attention_cached` (its own split) against the CPU
/// backend over a decoder's run of calls on ring caches of n_max + W − 1
/// slots: a chunk, steps, another chunk, past several turns of the ring.
fn check_backend_attention_cached_window<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let (seqs, w, heads, kv_heads, head_dim) = (2, 9, 4, 2, 16);
    let cap = 4 + w - 1; // chunks of at most 4
    let kvd = kv_heads * head_dim;
    let (mut kc_want, mut vc_want) = (vec![0f32; seqs * cap * kvd], vec![0f32; seqs * cap * kvd]);
    let (mut kc, mut vc) = (be.upload(&kc_want).unwrap(), be.upload(&vc_want).unwrap());
    let mut pos = [0usize, 0];
    for (call, n) in [4usize, 1, 1, 3, 4, 1, 1, 1, 4, 2, 1, 1]
        .into_iter()
        .enumerate()
    {
        let seed = 700 + 3 * call as u64;
        let sh = CacheShape {
            seqs,
            n,
            cap,
            heads,
            kv_heads,
            head_dim,
        };
        let (q, kk, v) = (
            uniform(seqs * n * heads * head_dim, seed),
            uniform(seqs * n * kvd, seed + 1),
            uniform(seqs * n * kvd, seed + 2),
        );
        let win = Some(w);
        let want = cpu
            .attention_cached(&q, &kk, &v, &mut kc_want, &mut vc_want, &pos, sh, win)
            .unwrap();
        let (gq, gk, gv) = (
            be.upload(&q).unwrap(),
            be.upload(&kk).unwrap(),
            be.upload(&v).unwrap(),
        );
        let got = be
            .attention_cached(&gq, &gk, &gv, &mut kc, &mut vc, &pos, sh, win)
            .unwrap();
        let what = format!("{} attention_cached n {n} pos {pos:?}", be.name());
        assert_close(&be.download(&got).unwrap(), &want, F32_TOL, &what);
        assert_same_bits(&be.download(&kc).unwrap(), &kc_want, &what);
        assert_same_bits(&be.download(&vc).unwrap(), &vc_want, &what);
        pos[0] += n;
        pos[1] += 1; // sequence 1 keeps overwriting ahead of its length
    }
}
