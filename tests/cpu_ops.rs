//! Each fast CPU-backend op against a naive single-loop oracle (llm.c style),
//! on random inputs whose sizes are not multiples of any block size.
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{AttnShape, Backend};

/// Deterministic pseudo-random values in [-1, 1) (64-bit LCG).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// |got − want| ≤ atol + rtol·|want| elementwise.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn linear_and_its_input_gradient() {
    // 7 rows take the gemm path, 1 and 3 rows the skinny (decode) path.
    for rows in [7, 1, 3] {
        linear_case(rows, 37, 131);
    }
}

fn linear_case(rows: usize, inp: usize, out: usize) {
    let be = CpuBackend::new();
    let x = rand_vec(rows * inp, 1);
    let w = be.upload_weight(&rand_vec(out * inp, 2)).unwrap();
    let bias = be.upload_weight(&rand_vec(out, 3)).unwrap();
    let got = be.linear(&x, &w, Some(&bias), rows, inp, out).unwrap();
    let mut want = vec![0f32; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut acc = bias[o];
            for i in 0..inp {
                acc += x[r * inp + i] * w[o * inp + i];
            }
            want[r * out + o] = acc;
        }
    }
    assert_close("linear", &got, &want, 1e-5, 1e-4);
    let dy = rand_vec(rows * out, 4);
    let got = be.linear_bwd_input(&dy, &w, rows, inp, out).unwrap();
    let mut want = vec![0f32; rows * inp];
    for r in 0..rows {
        for i in 0..inp {
            for o in 0..out {
                want[r * inp + i] += dy[r * out + o] * w[o * inp + i];
            }
        }
    }
    assert_close("linear_bwd_input", &got, &want, 1e-5, 1e-4);
}

#[test]
fn rmsnorm_forward_and_backward() {
    let be = CpuBackend::new();
    let (rows, d, eps) = (5, 23, 1e-5);
    let x = rand_vec(rows * d, 5);
    let w = be.upload_weight(&rand_vec(d, 6)).unwrap();
    let dy = rand_vec(rows * d, 7);
    let (y, rstd) = be.rmsnorm_fwd(&x, &w, rows, d, eps).unwrap();
    let dx = be.rmsnorm_bwd(&dy, &x, &w, &rstd, rows, d).unwrap();
    for r in 0..rows {
        let xr = &x[r * d..(r + 1) * d];
        let ms: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..d {
            let want = xr[i] as f64 * rs * w[i] as f64;
            assert!((y[r * d + i] as f64 - want).abs() < 1e-5, "y[{r},{i}]");
        }
        // Gradient by central differences of L = Σ dy ⊙ y.
        for i in 0..d {
            let f = |delta: f64| -> f64 {
                let mut xp: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
                xp[i] += delta;
                let ms: f64 = xp.iter().map(|v| v * v).sum::<f64>() / d as f64;
                let rs = 1.0 / (ms + eps as f64).sqrt();
                (0..d)
                    .map(|j| dy[r * d + j] as f64 * xp[j] * rs * w[j] as f64)
                    .sum()
            };
            let num = (f(1e-4) - f(-1e-4)) / 2e-4;
            assert!(
                (dx[r * d + i] as f64 - num).abs() < 1e-3,
                "dx[{r},{i}]: {} vs {num}",
                dx[r * d + i]
            );
        }
    }
}

#[test]
fn rope_rotates_and_inverse_undoes() {
    let be = CpuBackend::new();
    let (seqs, t, heads, hd) = (2, 5, 3, 8);
    let half = hd / 2;
    let x = rand_vec(seqs * t * heads * hd, 8);
    let ang: Vec<f32> = (0..t * half)
        .map(|i| (i / half) as f32 * 0.3 / (1 + i % half) as f32)
        .collect();
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let mut y = x.clone();
    be.rope(&mut y, &cos, &sin, seqs, t, heads, hd, false)
        .unwrap();
    let mut want = x.clone();
    for r in 0..seqs * t {
        let p = r % t;
        for h in 0..heads {
            let o = r * heads * hd + h * hd;
            for i in 0..half {
                let (a, b) = (x[o + i], x[o + i + half]);
                let (c, s) = (cos[p * half + i], sin[p * half + i]);
                want[o + i] = a * c - b * s;
                want[o + i + half] = b * c + a * s;
            }
        }
    }
    assert_close("rope", &y, &want, 1e-6, 1e-5);
    be.rope(&mut y, &cos, &sin, seqs, t, heads, hd, true)
        .unwrap();
    assert_close("rope inverse", &y, &x, 1e-5, 1e-5);
}

/// Naive causal GQA attention for one batch: returns (out, lse).
fn naive_attention(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> (Vec<f64>, Vec<f64>) {
    let (t, hd) = (sh.t, sh.head_dim);
    let (qd, kd) = (sh.heads * hd, sh.kv_heads * hd);
    let mut out = vec![0f64; sh.seqs * t * qd];
    let mut lse = vec![0f64; sh.seqs * sh.heads * t];
    for s in 0..sh.seqs {
        for h in 0..sh.heads {
            let g = h / (sh.heads / sh.kv_heads);
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
                lse[(s * sh.heads + h) * t + i] = mx + z.ln();
                for (j, x) in sc.iter().enumerate() {
                    let p = (x - mx).exp() / z;
                    for c in 0..hd {
                        out[(s * t + i) * qd + h * hd + c] +=
                            p * v[(s * t + j) * kd + g * hd + c] as f64;
                    }
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_and_backward() {
    let be = CpuBackend::new();
    let sh = AttnShape {
        seqs: 2,
        t: 7,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
    };
    let (qd, kd) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let rows = sh.seqs * sh.t;
    let q = rand_vec(rows * qd, 9);
    let k = rand_vec(rows * kd, 10);
    let v = rand_vec(rows * kd, 11);
    let (out, lse) = be.attention_fwd(&q, &k, &v, sh).unwrap();
    let (want_out, want_lse) = naive_attention(&q, &k, &v, sh);
    let to32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<_>>();
    assert_close("attention out", &out, &to32(&want_out), 1e-5, 1e-4);
    assert_close("attention lse", &lse, &to32(&want_lse), 1e-5, 1e-4);

    // Backward against central differences of L = Σ dout ⊙ out.
    let dout = rand_vec(rows * qd, 12);
    let (dq, dk, dv) = be.attention_bwd(&dout, &q, &k, &v, &out, &lse, sh).unwrap();
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let (o, _) = naive_attention(q, k, v, sh);
        o.iter().zip(&dout).map(|(a, b)| a * *b as f64).sum()
    };
    let eps = 1e-3f32;
    for (name, grad, which) in [("dq", &dq, 0), ("dk", &dk, 1), ("dv", &dv, 2)] {
        for idx in (0..grad.len()).step_by(7) {
            let bump = |delta: f32| {
                let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                match which {
                    0 => q2[idx] += delta,
                    1 => k2[idx] += delta,
                    _ => v2[idx] += delta,
                }
                loss(&q2, &k2, &v2)
            };
            let num = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            assert!(
                (grad[idx] as f64 - num).abs() < 1e-3,
                "{name}[{idx}]: {} vs {num}",
                grad[idx]
            );
        }
    }
}

#[test]
fn swiglu_forward_and_backward() {
    let be = CpuBackend::new();
    let n = 4099;
    let a: Vec<f32> = rand_vec(n, 13).iter().map(|x| x * 6.0).collect();
    let b = rand_vec(n, 14);
    let dh = rand_vec(n, 15);
    let h = be.swiglu_fwd(&a, &b, n).unwrap();
    let (da, db) = be.swiglu_bwd(&dh, &a, &b, n).unwrap();
    for i in 0..n {
        let (av, bv) = (a[i] as f64, b[i] as f64);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        assert!((h[i] as f64 - silu(av) * bv).abs() < 1e-5, "h[{i}]");
        let num = (silu(av + 1e-5) - silu(av - 1e-5)) / 2e-5 * bv * dh[i] as f64;
        assert!(
            (da[i] as f64 - num).abs() < 1e-4,
            "da[{i}]: {} vs {num}",
            da[i]
        );
        assert!(
            (db[i] as f64 - silu(av) * dh[i] as f64).abs() < 1e-5,
            "db[{i}]"
        );
    }
}

#[test]
fn channel_stats_sums() {
    let be = CpuBackend::new();
    let (seqs, t, m) = (3, 5, 131);
    let h = rand_vec(seqs * t * m, 16);
    let g = rand_vec(seqs * t * m, 17);
    let p = be.channel_stats(&h, &g, seqs, t, m).unwrap();
    for c in 0..m {
        let (mut s1, mut s2, mut f2, mut k1) = (0f64, 0f64, 0f64, 0f64);
        for s in 0..seqs {
            let mut hg = 0f64;
            for i in 0..t {
                let (hv, gv) = (h[(s * t + i) * m + c] as f64, g[(s * t + i) * m + c] as f64);
                s1 += hv;
                s2 += hv * hv;
                f2 += gv * gv;
                k1 += (hv * gv).abs();
                hg += hv * gv;
            }
            assert!((p.hg_seq[s * m + c] - hg).abs() < 1e-12, "hg_seq[{s},{c}]");
        }
        for (name, got, want) in [
            ("s1", p.s1[c], s1),
            ("s2", p.s2[c], s2),
            ("f2", p.f2[c], f2),
            ("k1", p.k1[c], k1),
        ] {
            assert!((got - want).abs() < 1e-12, "{name}[{c}]: {got} vs {want}");
        }
    }
}

#[test]
fn energy_and_chunked_cross_entropy() {
    let be = CpuBackend::new();
    let (rows, d, vocab) = (70, 9, 53); // rows > the 64-row chunk
    let z = rand_vec(rows * d, 18);
    let (j, dz) = be.energy(&z, rows, d, 0.25).unwrap();
    let want: f64 = z.iter().map(|&v| 0.5 * v as f64 * v as f64).sum::<f64>() * 0.25;
    assert!((j - want).abs() < 1e-9 * want.abs());
    assert_close(
        "energy dz",
        &dz,
        &z.iter().map(|v| v * 0.25).collect::<Vec<_>>(),
        1e-7,
        1e-6,
    );

    let w = be.upload_weight(&rand_vec(vocab * d, 19)).unwrap();
    let targets: Vec<u32> = (0..rows)
        .map(|r| {
            if r % 11 == 10 {
                u32::MAX
            } else {
                (r * 7 % vocab) as u32
            }
        })
        .collect();
    let (sum, count, dz) = be
        .cross_entropy(&z, &w, &targets, rows, d, vocab, 0.5, true)
        .unwrap();
    let dz = dz.unwrap();
    let mut want_sum = 0f64;
    let mut want_dz = vec![0f64; rows * d];
    for r in 0..rows {
        if targets[r] == u32::MAX {
            continue;
        }
        let logits: Vec<f64> = (0..vocab)
            .map(|v| {
                (0..d)
                    .map(|i| z[r * d + i] as f64 * w[v * d + i] as f64)
                    .sum()
            })
            .collect();
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        want_sum += lse - logits[targets[r] as usize];
        for v in 0..vocab {
            let p = (logits[v] - lse).exp() - if v == targets[r] as usize { 1.0 } else { 0.0 };
            for i in 0..d {
                want_dz[r * d + i] += 0.5 * p * w[v * d + i] as f64;
            }
        }
    }
    assert_eq!(count, targets.iter().filter(|&&t| t != u32::MAX).count());
    assert!(
        (sum - want_sum).abs() < 1e-4 * want_sum.abs(),
        "{sum} vs {want_sum}"
    );
    let want_dz: Vec<f32> = want_dz.iter().map(|&x| x as f32).collect();
    assert_close("ce dz", &dz, &want_dz, 1e-5, 1e-4);
}
