//! One plain-loop reference per op, the oracle of the kernel tests
//! (tests/kernels_emu_*.rs), of the CPU backend's (tests/cpu_ops.rs) and
//! of the compaction checks: every loop written out, accumulating in f64,
//! shapes passed explicitly (row-major, as in `rku_engine::backend`).
//! Inputs and outputs are f64; callers convert with `f64s`/`f32s`.
use rku_engine::backend::cuda::Gemm;
use rku_engine::backend::AttnShape;

pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `y[rows, out] = x[rows, inp] · W[out, inp]ᵀ + bias[out]`.
pub fn linear(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for i in 0..inp {
                acc += x[r * inp + i] * w[o * inp + i];
            }
            y[r * out + o] = acc;
        }
    }
    y
}

/// The input gradient of `linear`: `dx[rows, inp] = dy[rows, out] · W[out, inp]`.
pub fn linear_bwd_input(dy: &[f64], w: &[f64], rows: usize, inp: usize, out: usize) -> Vec<f64> {
    let mut dx = vec![0.0; rows * inp];
    for r in 0..rows {
        for i in 0..inp {
            for o in 0..out {
                dx[r * inp + i] += dy[r * out + o] * w[o * inp + i];
            }
        }
    }
    dx
}

/// cuBLAS's strided batched product, column-major: for each batch b,
/// `C_b = alpha·op(A_b)·op(B_b) + beta·C_b` (C not read when beta = 0);
/// returns C after the call.
pub fn gemm(g: &Gemm, a: &[f64], b: &[f64], c: &[f64]) -> Vec<f64> {
    let mut c = c.to_vec();
    for bi in 0..g.batch {
        for j in 0..g.n {
            for i in 0..g.m {
                let mut s = 0.0;
                for l in 0..g.k {
                    let av = if g.trans_a {
                        a[bi * g.stride_a + l + i * g.lda]
                    } else {
                        a[bi * g.stride_a + i + l * g.lda]
                    };
                    let bv = if g.trans_b {
                        b[bi * g.stride_b + j + l * g.ldb]
                    } else {
                        b[bi * g.stride_b + l + j * g.ldb]
                    };
                    s += av * bv;
                }
                let ci = bi * g.stride_c + i + j * g.ldc;
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * c[ci]
                };
                c[ci] = g.alpha as f64 * s + old;
            }
        }
    }
    c
}

/// `out[r, :] = table[ids[r], :]`, table `[vocab, d]`.
pub fn embedding(ids: &[u32], table: &[f64], d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        for j in 0..d {
            out.push(table[id as usize * d + j]);
        }
    }
    out
}

/// `y = x·rstd·w` per row of `[rows, d]`, `rstd = 1/sqrt(mean(x²) + eps)`:
/// `(y, rstd [rows])`.
pub fn rmsnorm_fwd(x: &[f64], w: &[f64], rows: usize, d: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows]);
    for r in 0..rows {
        let mut ms = 0.0;
        for j in 0..d {
            ms += x[r * d + j] * x[r * d + j];
        }
        rstd[r] = 1.0 / (ms / d as f64 + eps).sqrt();
        for j in 0..d {
            y[r * d + j] = x[r * d + j] * rstd[r] * w[j];
        }
    }
    (y, rstd)
}

/// The gradient of `rmsnorm_fwd` w.r.t. x:
/// `dx = rstd·(w⊙dy) − x·rstd³·mean(x⊙w⊙dy)` per row.
pub fn rmsnorm_bwd(dy: &[f64], x: &[f64], w: &[f64], rows: usize, d: usize, eps: f64) -> Vec<f64> {
    let (_, rstd) = rmsnorm_fwd(x, w, rows, d, eps);
    let mut dx = vec![0.0; rows * d];
    for r in 0..rows {
        let mut dot = 0.0;
        for j in 0..d {
            dot += x[r * d + j] * w[j] * dy[r * d + j];
        }
        dot /= d as f64;
        let rs = rstd[r];
        for j in 0..d {
            dx[r * d + j] = rs * w[j] * dy[r * d + j] - x[r * d + j] * rs * rs * rs * dot;
        }
    }
    dx
}

/// Rotary embedding, HF rotate_half layout, of x `[rows, heads·hd]` (the
/// position of row r is r mod t), cos/sin `[t, hd/2]`: for each head and
/// i < hd/2, `(a, b) = (x_i, x_{i+hd/2}) → (a·cos − b·sin, b·cos + a·sin)`,
/// with sin negated when `inverse`.
pub fn rope(
    x: &[f64],
    cos: &[f64],
    sin: &[f64],
    t: usize,
    heads: usize,
    hd: usize,
    inverse: bool,
) -> Vec<f64> {
    let half = hd / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = x.to_vec();
    for r in 0..x.len() / (heads * hd) {
        let p = r % t;
        for h in 0..heads {
            let o = (r * heads + h) * hd;
            for i in 0..half {
                let (c, s) = (cos[p * half + i], sign * sin[p * half + i]);
                let (a, b) = (x[o + i], x[o + i + half]);
                y[o + i] = a * c - b * s;
                y[o + i + half] = b * c + a * s;
            }
        }
    }
    y
}

/// First key of query i under a sliding window W (keys i−W < j ≤ i), 0 without one.
pub fn window_start(window: Option<usize>, i: usize) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Softmax probabilities and log-sum-exp of query i of head h, sequence sq
/// (the causal rows lo ≤ j ≤ i, scale 1/sqrt(hd), kv head h / (heads/kv_heads)),
/// entry j − lo for key j.
#[allow(clippy::too_many_arguments)]
fn attention_probs(
    q: &[f64],
    k: &[f64],
    s: AttnShape,
    sq: usize,
    h: usize,
    i: usize,
    lo: usize,
) -> (Vec<f64>, f64) {
    let (t, hd) = (s.t, s.head_dim);
    let g = h / (s.heads / s.kv_heads);
    let qa = ((sq * t + i) * s.heads + h) * hd;
    let scores: Vec<f64> = (lo..=i)
        .map(|j| {
            let ka = ((sq * t + j) * s.kv_heads + g) * hd;
            (0..hd).map(|e| q[qa + e] * k[ka + e]).sum::<f64>() / (hd as f64).sqrt()
        })
        .collect();
    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
    (
        scores.iter().map(|x| (x - mx).exp() / z).collect(),
        mx + z.ln(),
    )
}

/// Causal GQA attention (q `[rows, heads·hd]`, k/v `[rows, kv_heads·hd]`,
/// rows = seqs·t): `(out [rows, heads·hd], lse [seqs, heads, t])`; with a
/// sliding window W, query i attends to keys i−W < j ≤ i.
pub fn attention_fwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: AttnShape,
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let (t, hd) = (s.t, s.head_dim);
    let mut out = vec![0.0; s.seqs * t * s.heads * hd];
    let mut lse = vec![0.0; s.seqs * s.heads * t];
    for sq in 0..s.seqs {
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            for i in 0..t {
                let lo = window_start(window, i);
                let (p, l) = attention_probs(q, k, s, sq, h, i, lo);
                lse[(sq * s.heads + h) * t + i] = l;
                let qa = ((sq * t + i) * s.heads + h) * hd;
                for (j, pj) in (lo..).zip(&p) {
                    let va = ((sq * t + j) * s.kv_heads + g) * hd;
                    for e in 0..hd {
                        out[qa + e] += pj * v[va + e];
                    }
                }
            }
        }
    }
    (out, lse)
}

/// Gradients `(dq, dk, dv)` of `attention_fwd` given `dout` (the same window):
/// dv_j += p_j·dout_i, ds_j = p_j·(dout_i·v_j − Σ_j' p_j'·dout_i·v_j'),
/// dq_i += ds_j·k_j/sqrt(hd), dk_j += ds_j·q_i/sqrt(hd).
pub fn attention_bwd(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: AttnShape,
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (t, hd) = (s.t, s.head_dim);
    let scale = 1.0 / (hd as f64).sqrt();
    let rows = s.seqs * t;
    let mut dq = vec![0.0; rows * s.heads * hd];
    let (mut dk, mut dv) = (
        vec![0.0; rows * s.kv_heads * hd],
        vec![0.0; rows * s.kv_heads * hd],
    );
    for sq in 0..s.seqs {
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            for i in 0..t {
                let lo = window_start(window, i);
                let (p, _) = attention_probs(q, k, s, sq, h, i, lo);
                let qa = ((sq * t + i) * s.heads + h) * hd;
                let ka = |j: usize| ((sq * t + j) * s.kv_heads + g) * hd;
                let dp: Vec<f64> = (lo..=i)
                    .map(|j| (0..hd).map(|e| dout[qa + e] * v[ka(j) + e]).sum())
                    .collect();
                let di: f64 = (0..p.len()).map(|x| p[x] * dp[x]).sum();
                for (x, j) in (lo..=i).enumerate() {
                    let ds = p[x] * (dp[x] - di);
                    for e in 0..hd {
                        dq[qa + e] += scale * ds * k[ka(j) + e];
                        dk[ka(j) + e] += scale * ds * q[qa + e];
                        dv[ka(j) + e] += p[x] * dout[qa + e];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

pub fn silu(a: f64) -> f64 {
    a / (1.0 + (-a).exp())
}

/// `h = silu(a) ⊙ b`.
pub fn swiglu_fwd(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| silu(a) * b).collect()
}

/// `(da, db)` from `dh`: `da = dh·b·σ(a)·(1 + a·(1−σ(a)))`, `db = dh·silu(a)`.
pub fn swiglu_bwd(dh: &[f64], a: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; a.len()]);
    for i in 0..a.len() {
        let s = 1.0 / (1.0 + (-a[i]).exp());
        da[i] = dh[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
        db[i] = dh[i] * silu(a[i]);
    }
    (da, db)
}

/// gelu with the tanh approximation (PyTorch's `gelu(approximate="tanh")`).
pub fn gelu_tanh(a: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * a * (1.0 + (k * (a + 0.044715 * a.powi(3))).tanh())
}

/// `h = gelu_tanh(a) ⊙ b` (Gemma 3's GeGLU).
pub fn geglu_fwd(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| gelu_tanh(a) * b).collect()
}

/// `(da, db)` from `dh`: `da = dh·b·gelu_tanh'(a)` (the derivative by
/// central differences of `gelu_tanh` in f64, independent of the kernels'
/// closed form), `db = dh·gelu_tanh(a)`.
pub fn geglu_bwd(dh: &[f64], a: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let e = 1e-6;
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; a.len()]);
    for i in 0..a.len() {
        let grad = (gelu_tanh(a[i] + e) - gelu_tanh(a[i] - e)) / (2.0 * e);
        da[i] = dh[i] * b[i] * grad;
        db[i] = dh[i] * gelu_tanh(a[i]);
    }
    (da, db)
}

/// Per-sequence channel sums of h, g `[seqs·t, m]` (METHODS.md section 4):
/// `part [5][seqs][m]` = Σ_t h, Σ_t h², Σ_t g², Σ_t |h·g|, Σ_t h·g.
pub fn channel_stats(h: &[f64], g: &[f64], seqs: usize, t: usize, m: usize) -> Vec<f64> {
    let mut p = vec![0.0; 5 * seqs * m];
    for s in 0..seqs {
        for r in 0..t {
            for c in 0..m {
                let (hv, gv) = (h[(s * t + r) * m + c], g[(s * t + r) * m + c]);
                let at = |k: usize| (k * seqs + s) * m + c;
                p[at(0)] += hv;
                p[at(1)] += hv * hv;
                p[at(2)] += gv * gv;
                p[at(3)] += (hv * gv).abs();
                p[at(4)] += hv * gv;
            }
        }
    }
    p
}

/// The energy objective over z `[rows, d]`: `(scale·½‖z_r‖² per row, dz = scale·z)`;
/// J is the sum of the first.
pub fn energy(z: &[f64], d: usize, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let part = z
        .chunks(d)
        .map(|row| 0.5 * scale * row.iter().map(|v| v * v).sum::<f64>())
        .collect();
    (part, z.iter().map(|v| scale * v).collect())
}

/// Cross-entropy of `logits = z · Wᵀ` (z `[rows, d]`, W `[vocab, d]`)
/// against `targets` (`u32::MAX`: not predicted): `(Σ NLL, count,
/// dz = scale·∂(Σ NLL)/∂z [rows, d])`.
pub fn cross_entropy(
    z: &[f64],
    w: &[f64],
    targets: &[u32],
    d: usize,
    vocab: usize,
    scale: f64,
) -> (f64, usize, Vec<f64>) {
    let (mut nll, mut count, mut dz) = (0.0, 0, vec![0.0; z.len()]);
    for (r, &tgt) in targets.iter().enumerate() {
        if tgt == u32::MAX {
            continue;
        }
        let logits = linear(&z[r * d..(r + 1) * d], w, None, 1, d, vocab);
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        nll += lse - logits[tgt as usize];
        count += 1;
        for v in 0..vocab {
            let g = (logits[v] - lse).exp() - if v == tgt as usize { 1.0 } else { 0.0 };
            for e in 0..d {
                dz[r * d + e] += scale * g * w[v * d + e];
            }
        }
    }
    (nll, count, dz)
}

/// Rows `keep` of a row-major `[rows, cols]` matrix of `elem`-byte values
/// given as raw bytes.
pub fn gather_rows(bytes: &[u8], elem: usize, cols: usize, keep: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for &r in keep {
        for b in 0..cols * elem {
            out.push(bytes[r * cols * elem + b]);
        }
    }
    out
}

/// Columns `keep` of the same matrix.
pub fn gather_cols(bytes: &[u8], elem: usize, cols: usize, keep: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in 0..bytes.len() / (cols * elem) {
        for &c in keep {
            for b in 0..elem {
                out.push(bytes[(r * cols + c) * elem + b]);
            }
        }
    }
    out
}

/// The refit's normal equations (METHODS.md §9), by definition: h_K =
/// columns `keep` of h `[rows, m]` (plus a column of ones with `ones`),
/// r = y − y_sub; returns (G = h_Kᵀh_K, C = h_Kᵀr, Σ r²), row-major.
#[allow(clippy::too_many_arguments)]
pub fn normal_equations(
    h: &[f64],
    keep: &[usize],
    ones: bool,
    y: &[f64],
    y_sub: Option<&[f64]>,
    rows: usize,
    m: usize,
    d: usize,
) -> (Vec<f64>, Vec<f64>, f64) {
    let w = keep.len() + ones as usize;
    let hk = |t: usize, j: usize| match keep.get(j) {
        Some(&c) => h[t * m + c],
        None => 1.0,
    };
    let r = |t: usize, o: usize| y[t * d + o] - y_sub.map_or(0.0, |s| s[t * d + o]);
    let mut g = vec![0.0; w * w];
    let mut c = vec![0.0; w * d];
    let mut rr = 0.0;
    for t in 0..rows {
        for i in 0..w {
            for j in 0..w {
                g[i * w + j] += hk(t, i) * hk(t, j);
            }
            for o in 0..d {
                c[i * d + o] += hk(t, i) * r(t, o);
            }
        }
        for o in 0..d {
            rr += r(t, o) * r(t, o);
        }
    }
    (g, c, rr)
}
