//! Each fast CPU-backend op against tests/common/naive.rs (llm.c style),
//! and each gradient also against central differences of the naive forward
//! pass, on random inputs whose sizes are not multiples of any block size.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::{assert_close, uniform};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{AttnShape, Backend, GluAct};

#[test]
fn linear_and_its_input_gradient() {
    // 7 rows take the gemm path, 1 and 3 rows the skinny (decode) path.
    for rows in [7, 1, 3] {
        linear_case(rows, 37, 131);
    }
}

fn linear_case(rows: usize, inp: usize, out: usize) {
    let be = CpuBackend::new();
    let x = uniform(rows * inp, 1);
    let w = be.upload_weight(&uniform(out * inp, 2)).unwrap();
    let bias = be.upload_weight(&uniform(out, 3)).unwrap();
    let got = be.linear(&x, &w, Some(&bias), rows, inp, out).unwrap();
    let (x64, w64) = (f64s(&x), f64s(&w));
    let want = naive::linear(&x64, &w64, Some(&f64s(&bias)), rows, inp, out);
    assert_close(&got, &f32s(&want), (1e-5, 1e-4), "linear");
    let dy = uniform(rows * out, 4);
    let got = be.linear_bwd_input(&dy, &w, rows, inp, out).unwrap();
    let want = naive::linear_bwd_input(&f64s(&dy), &w64, rows, inp, out);
    assert_close(&got, &f32s(&want), (1e-5, 1e-4), "linear_bwd_input");
}

#[test]
fn rmsnorm_forward_and_backward() {
    let be = CpuBackend::new();
    let (rows, d, eps) = (5, 23, 1e-5);
    let x = uniform(rows * d, 5);
    let w = be.upload_weight(&uniform(d, 6)).unwrap();
    let dy = uniform(rows * d, 7);
    let (y, rstd) = be.rmsnorm_fwd(&x, &w, rows, d, eps).unwrap();
    let dx = be.rmsnorm_bwd(&dy, &x, &w, &rstd, rows, d).unwrap();
    let w64 = f64s(&w);
    let (want, _) = naive::rmsnorm_fwd(&f64s(&x), &w64, rows, d, eps as f64);
    for r in 0..rows {
        for i in 0..d {
            let (got, want) = (y[r * d + i] as f64, want[r * d + i]);
            assert!((got - want).abs() < 1e-5, "y[{r},{i}]");
        }
        // Gradient by central differences of L = Σ dy ⊙ y.
        let xr = f64s(&x[r * d..(r + 1) * d]);
        for i in 0..d {
            let f = |delta: f64| -> f64 {
                let mut xp = xr.clone();
                xp[i] += delta;
                let (y, _) = naive::rmsnorm_fwd(&xp, &w64, 1, d, eps as f64);
                (0..d).map(|j| dy[r * d + j] as f64 * y[j]).sum()
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
    let x = uniform(seqs * t * heads * hd, 8);
    let ang: Vec<f32> = (0..t * half)
        .map(|i| (i / half) as f32 * 0.3 / (1 + i % half) as f32)
        .collect();
    let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
    let mut y = x.clone();
    be.rope(&mut y, &cos, &sin, seqs, t, heads, hd, false)
        .unwrap();
    let want = naive::rope(&f64s(&x), &f64s(&cos), &f64s(&sin), t, heads, hd, false);
    assert_close(&y, &f32s(&want), (1e-6, 1e-5), "rope");
    be.rope(&mut y, &cos, &sin, seqs, t, heads, hd, true)
        .unwrap();
    assert_close(&y, &x, (1e-5, 1e-5), "rope inverse");
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
    let q = uniform(rows * qd, 9);
    let k = uniform(rows * kd, 10);
    let v = uniform(rows * kd, 11);
    let (out, lse) = be.attention_fwd(&q, &k, &v, sh, None).unwrap();
    let (want_out, want_lse) = naive::attention_fwd(&f64s(&q), &f64s(&k), &f64s(&v), sh, None);
    assert_close(&out, &f32s(&want_out), (1e-5, 1e-4), "attention out");
    assert_close(&lse, &f32s(&want_lse), (1e-5, 1e-4), "attention lse");

    // Backward against central differences of L = Σ dout ⊙ out.
    let dout = uniform(rows * qd, 12);
    let (dq, dk, dv) = be
        .attention_bwd(&dout, &q, &k, &v, &out, &lse, sh, None)
        .unwrap();
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let (o, _) = naive::attention_fwd(&f64s(q), &f64s(k), &f64s(v), sh, None);
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
    let a: Vec<f32> = uniform(n, 13).iter().map(|x| x * 6.0).collect();
    let b = uniform(n, 14);
    let dh = uniform(n, 15);
    let h = be.glu_fwd(GluAct::Silu, &a, &b, n).unwrap();
    let (da, db) = be.glu_bwd(GluAct::Silu, &dh, &a, &b, n).unwrap();
    let (a64, b64, dh64) = (f64s(&a), f64s(&b), f64s(&dh));
    let h_want = naive::swiglu_fwd(&a64, &b64);
    let (_, db_want) = naive::swiglu_bwd(&dh64, &a64, &b64);
    for i in 0..n {
        assert!((h[i] as f64 - h_want[i]).abs() < 1e-5, "h[{i}]");
        // da against central differences of silu.
        let (av, bv) = (a64[i], b64[i]);
        let num = (naive::silu(av + 1e-5) - naive::silu(av - 1e-5)) / 2e-5 * bv * dh64[i];
        assert!(
            (da[i] as f64 - num).abs() < 1e-4,
            "da[{i}]: {} vs {num}",
            da[i]
        );
        assert!((db[i] as f64 - db_want[i]).abs() < 1e-5, "db[{i}]");
    }
}

/// Gemma 3's GeGLU: h and db against the f64 gelu_tanh, da against its
/// central differences, over a ∈ [−6, 6] (tanh saturates at both ends).
#[test]
fn geglu_forward_and_backward() {
    let be = CpuBackend::new();
    let n = 4097;
    let a: Vec<f32> = uniform(n, 23).iter().map(|x| x * 6.0).collect();
    let (b, dh) = (uniform(n, 24), uniform(n, 25));
    let h = be.glu_fwd(GluAct::GeluTanh, &a, &b, n).unwrap();
    let (da, db) = be.glu_bwd(GluAct::GeluTanh, &dh, &a, &b, n).unwrap();
    let (a64, b64, dh64) = (f64s(&a), f64s(&b), f64s(&dh));
    let h_want = naive::geglu_fwd(&a64, &b64);
    let (da_want, db_want) = naive::geglu_bwd(&dh64, &a64, &b64);
    for i in 0..n {
        assert!((h[i] as f64 - h_want[i]).abs() < 1e-5, "h[{i}]");
        assert!(
            (da[i] as f64 - da_want[i]).abs() < 1e-5,
            "da[{i}]: {} vs {}",
            da[i],
            da_want[i]
        );
        assert!((db[i] as f64 - db_want[i]).abs() < 1e-5, "db[{i}]");
    }
}

#[test]
fn channel_stats_sums() {
    let be = CpuBackend::new();
    let (seqs, t, m) = (3, 5, 131);
    let h = uniform(seqs * t * m, 16);
    let g = uniform(seqs * t * m, 17);
    let p = be.channel_stats(&h, &g, seqs, t, m).unwrap();
    // part [5][seqs][m]: s1, s2, f2, k1, hg per sequence.
    let part = naive::channel_stats(&f64s(&h), &f64s(&g), seqs, t, m);
    let at = |k: usize, s: usize, c: usize| part[(k * seqs + s) * m + c];
    for c in 0..m {
        for s in 0..seqs {
            let (got, want) = (p.hg_seq[s * m + c], at(4, s, c));
            assert!((got - want).abs() < 1e-12, "hg_seq[{s},{c}]");
        }
        for (k, name, got) in [
            (0, "s1", p.s1[c]),
            (1, "s2", p.s2[c]),
            (2, "f2", p.f2[c]),
            (3, "k1", p.k1[c]),
        ] {
            let want: f64 = (0..seqs).map(|s| at(k, s, c)).sum();
            assert!((got - want).abs() < 1e-12, "{name}[{c}]: {got} vs {want}");
        }
    }
}

#[test]
fn energy_and_chunked_cross_entropy() {
    let be = CpuBackend::new();
    let (rows, d, vocab) = (70, 9, 53); // rows > the 64-row chunk
    let z = uniform(rows * d, 18);
    let (j, dz) = be.energy(&z, rows, d, 0.25).unwrap();
    let (part, dz_want) = naive::energy(&f64s(&z), d, 0.25);
    let want: f64 = part.iter().sum();
    assert!((j - want).abs() < 1e-9 * want.abs());
    assert_close(&dz, &f32s(&dz_want), (1e-7, 1e-6), "energy dz");

    let w = be.upload_weight(&uniform(vocab * d, 19)).unwrap();
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
    let (want_sum, want_count, want_dz) =
        naive::cross_entropy(&f64s(&z), &f64s(&w), &targets, d, vocab, 0.5);
    assert_eq!(count, want_count);
    assert_eq!(count, targets.iter().filter(|&&t| t != u32::MAX).count());
    assert!(
        (sum - want_sum).abs() < 1e-4 * want_sum.abs(),
        "{sum} vs {want_sum}"
    );
    assert_close(&dz.unwrap(), &f32s(&want_dz), (1e-5, 1e-4), "ce dz");
}

/// A buffer no host can give (4 PiB, past a 47-bit address space; and one
/// whose byte size overflows) is an error, not an abort of the process.
#[test]
fn an_impossible_buffer_is_an_error_not_an_abort() {
    let be = CpuBackend::new();
    for len in [1usize << 50, usize::MAX / 2] {
        let e = be.zeros(len).unwrap_err();
        assert!(e.to_string().contains("cannot allocate"), "{e}");
    }
}
