//! Row-wise and elementwise ops of the CPU backend (rayon over rows).
use super::mem::written_slots;
use super::simd::{self, Isa};
use crate::backend::{ChannelPartial, GluAct};
use rayon::prelude::*;

/// Rows per rayon task for cheap elementwise work.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm forward: `y = x·rstd·w`, `rstd = 1/sqrt(mean(x²)+eps)`; `x` is `[rows, d]`.
pub fn rmsnorm_fwd(x: &[f32], w: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let isa = Isa::get();
    let mut rstd = vec![0f32; rows];
    // SAFETY: each row of y is written whole.
    let y = unsafe {
        written_slots(x.len(), |y| {
            y.par_chunks_mut(d)
                .zip(rstd.par_iter_mut())
                .zip(x.par_chunks(d))
                .for_each(|((yr, r), xr)| {
                    let ms = simd::dot(isa, xr, xr) / d as f32;
                    *r = 1.0 / (ms + eps).sqrt();
                    for ((yo, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                        yo.write(xi * *r * wi);
                    }
                })
        })
    };
    (y, rstd)
}

/// RMSNorm backward w.r.t. x: `dx = rstd·(w⊙dy) − x·rstd³·(Σ x⊙w⊙dy)/d`.
pub fn rmsnorm_bwd(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], d: usize) -> Vec<f32> {
    let isa = Isa::get();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d))
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, dyr), xr), &r)| {
            // dx first holds w⊙dy, then the result.
            dxr.iter_mut()
                .zip(w.iter().zip(dyr))
                .for_each(|(o, (w, g))| *o = w * g);
            let c = r * r * r * simd::dot(isa, xr, dxr) / d as f32;
            dxr.iter_mut()
                .zip(xr)
                .for_each(|(o, x)| *o = r * *o - x * c);
        });
    dx
}

/// Rotates each head of each token in place (see `Backend::rope`).
pub fn rope(
    x: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    t: usize,
    heads: usize,
    hd: usize,
    inverse: bool,
) {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(r, row)| {
            let pos = r % t;
            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            for head in row.chunks_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    let sn = sign * s[i];
                    head[i] = a * c[i] - b * sn;
                    head[i + half] = b * c[i] + a * sn;
                }
            }
        });
}

/// Values per rayon task of the elementwise GLU kernels.
const SWIGLU_CHUNK: usize = 8192;

/// The SIMD gate of `act` ([`simd::Gate`]).
fn gate(act: GluAct) -> simd::Gate {
    match act {
        GluAct::Silu => simd::Gate::SILU,
        GluAct::GeluTanh => simd::Gate::GELU_TANH,
    }
}

/// `h = act(a)·b`, act(a) = a·σ(z(a)) (`simd::gated_mul`; for gelu this is
/// kernels/swiglu.cu's 0.5·a·(1 + tanh(u)) written as a·σ(2u)).
pub fn glu_fwd(act: GluAct, a: &[f32], b: &[f32]) -> Vec<f32> {
    let (isa, gate) = (Isa::get(), gate(act));
    // SAFETY: gated_mul writes every slot of its chunk, the chunks cover h.
    unsafe {
        written_slots(a.len(), |h| {
            h.par_chunks_mut(SWIGLU_CHUNK)
                .zip(a.par_chunks(SWIGLU_CHUNK).zip(b.par_chunks(SWIGLU_CHUNK)))
                .for_each(|(hc, (ac, bc))| simd::gated_mul(isa, gate, hc, ac, bc))
        })
    }
}

/// `da = dh·b·act'(a)`, `db = dh·act(a)` (`simd::gated_mul_bwd`).
pub fn glu_bwd(act: GluAct, dh: &[f32], a: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (isa, gate) = (Isa::get(), gate(act));
    let mut da = vec![0f32; a.len()];
    let mut db = vec![0f32; a.len()];
    da.par_chunks_mut(SWIGLU_CHUNK)
        .zip(db.par_chunks_mut(SWIGLU_CHUNK))
        .zip(dh.par_chunks(SWIGLU_CHUNK))
        .zip(a.par_chunks(SWIGLU_CHUNK).zip(b.par_chunks(SWIGLU_CHUNK)))
        .for_each(|(((dac, dbc), dhc), (ac, bc))| {
            simd::gated_mul_bwd(isa, gate, dac, dbc, dhc, ac, bc)
        });
    (da, db)
}

/// Per-channel sums of METHODS.md section 4 over `h`, `g` (`[seqs·t, m]`).
/// Parallel over channel blocks; each sequence's sums are formed in f64.
pub fn channel_stats(h: &[f32], g: &[f32], seqs: usize, t: usize, m: usize) -> ChannelPartial {
    const BLOCK: usize = 64;
    let blocks: Vec<ChannelPartial> = (0..m.div_ceil(BLOCK))
        .into_par_iter()
        .map(|bi| {
            let c0 = bi * BLOCK;
            let w = BLOCK.min(m - c0);
            let mut p = ChannelPartial {
                s1: vec![0.0; w],
                s2: vec![0.0; w],
                f2: vec![0.0; w],
                k1: vec![0.0; w],
                hg_seq: vec![0.0; seqs * w],
            };
            for s in 0..seqs {
                for tok in 0..t {
                    let r = (s * t + tok) * m + c0;
                    for j in 0..w {
                        let (hv, gv) = (h[r + j] as f64, g[r + j] as f64);
                        p.s1[j] += hv;
                        p.s2[j] += hv * hv;
                        p.f2[j] += gv * gv;
                        p.k1[j] += (hv * gv).abs();
                        p.hg_seq[s * w + j] += hv * gv;
                    }
                }
            }
            p
        })
        .collect();
    let mut out = ChannelPartial {
        s1: Vec::with_capacity(m),
        s2: Vec::with_capacity(m),
        f2: Vec::with_capacity(m),
        k1: Vec::with_capacity(m),
        hg_seq: vec![0.0; seqs * m],
    };
    for (bi, p) in blocks.into_iter().enumerate() {
        let w = p.s1.len();
        out.s1.extend(p.s1);
        out.s2.extend(p.s2);
        out.f2.extend(p.f2);
        out.k1.extend(p.k1);
        for s in 0..seqs {
            out.hg_seq[s * m + bi * BLOCK..][..w].copy_from_slice(&p.hg_seq[s * w..][..w]);
        }
    }
    out
}

/// `J = scale·Σ ½‖z_r‖²`, `dz = scale·z`.
pub fn energy(z: &[f32], scale: f32) -> (f64, Vec<f32>) {
    let j: f64 = z
        .par_chunks(4096)
        .map(|c| {
            c.iter()
                .map(|&v| 0.5 * (v as f64) * (v as f64))
                .sum::<f64>()
        })
        .sum();
    let dz = z.par_iter().map(|v| v * scale).collect();
    (j * scale as f64, dz)
}

/// Zeroes row `r` of `x` `[keep.len(), width]` wherever `!keep[r]`.
pub fn zero_rows(x: &mut [f32], width: usize, keep: &[bool]) {
    if width == 0 {
        return;
    }
    x.par_chunks_mut(width)
        .zip(keep)
        .filter(|(_, &k)| !k)
        .for_each(|(row, _)| row.fill(0.0));
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(ROWS_PER_TASK * 256)
        .zip(y.par_chunks(ROWS_PER_TASK * 256))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}
