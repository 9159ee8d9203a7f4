//! The LoRA recovery's ops (METHODS.md §10) of the CUDA backend on the
//! emulated device (and on a GPU when one answers) against the CPU backend:
//! the chunked distillation `kl_div` (kl_div.cu over vocabulary chunks),
//! the f32 `matmul` (cuBLAS), `sum_squares` and `adamw` (adamw.cu).
mod common;
use common::ops::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{CudaBackend, Device};
use rku_engine::backend::{AdamwStep, Backend, MatMul};

on_backends! {
    backend_kl_div_chunked => check_kl_div,
    backend_matmul_f32 => check_matmul,
    backend_sum_squares => check_sum_squares,
    backend_adamw_steps => check_adamw,
}

/// f32 results whose only difference from the CPU's is the order of a
/// short sum.
const TIGHT_TOL: (f32, f32) = (1e-6, 1e-6);

fn check_kl_div<D: Device>(be: &CudaBackend<D>) {
    // Vocabulary 30 in chunks of 7 (see on_backends!): four full chunks and
    // a short one. Rows 1 and 4 are not counted.
    let (rows, d, vocab, scale) = (6, 33, 30, 0.25);
    let counted = [true, false, true, true, false, true];
    let (z, w) = (uniform(rows * d, 31), uniform(vocab * d, 32));
    let (zt, wt) = (uniform(rows * d, 33), uniform(vocab * d, 34));
    // The CUDA backend rounds z, z_t and the bf16 lm_heads for the logits'
    // products; the CPU is given the rounded values, so that only the f32
    // sums and the bf16 rounding of dlogits (before the product with W) differ.
    let cpu = CpuBackend::new();
    let (want_kl, want_count, want_dz) = cpu
        .kl_div(
            &round_bf16(&z),
            &cpu.upload_weight(&round_bf16(&w)).unwrap(),
            &round_bf16(&zt),
            &cpu.upload_weight(&round_bf16(&wt)).unwrap(),
            &counted,
            rows,
            d,
            vocab,
            scale,
            true,
        )
        .unwrap();
    let want_dz = want_dz.unwrap();
    let (gz, gzt) = (be.upload(&z).unwrap(), be.upload(&zt).unwrap());
    let (gw, gwt) = (
        be.upload_weight(&w).unwrap(),
        be.upload_weight(&wt).unwrap(),
    );
    let (kl, count, dz) = be
        .kl_div(&gz, &gw, &gzt, &gwt, &counted, rows, d, vocab, scale, true)
        .unwrap();
    assert_eq!((count, want_count), (4, 4));
    assert!(want_kl > 0.1, "a KL worth comparing: {want_kl}");
    assert!(
        (kl - want_kl).abs() <= 1e-4 * want_kl,
        "kl {kl} vs {want_kl}"
    );
    let dz = be.download(&dz.unwrap()).unwrap();
    assert_close(&dz, &want_dz, BF16_TOL, "kl dz");
    for r in 0..rows {
        let row = &dz[r * d..(r + 1) * d];
        if counted[r] {
            assert!(row.iter().any(|&v| v.abs() > 1e-3), "dz row {r} is ~0");
        } else {
            assert!(row.iter().all(|&v| v == 0.0), "dz row {r} not counted");
        }
    }
    // Without the gradient: the same sum, no dz.
    let (kl2, count2, none) = be
        .kl_div(&gz, &gw, &gzt, &gwt, &counted, rows, d, vocab, scale, false)
        .unwrap();
    assert!(none.is_none() && kl2 == kl && count2 == count);
    // The teacher's own lm_head makes its logits: a teacher sharing the
    // student's changes the KL.
    let (kl_shared, _, _) = be
        .kl_div(&gz, &gw, &gzt, &gw, &counted, rows, d, vocab, scale, false)
        .unwrap();
    assert!((kl_shared - kl).abs() > 1e-3 * kl, "{kl_shared} vs {kl}");
    assert!(
        be.kl_div(
            &gz,
            &gw,
            &gzt,
            &gwt,
            &counted[1..],
            rows,
            d,
            vocab,
            scale,
            false
        )
        .is_err(),
        "a row mask of the wrong length is refused"
    );
}

/// `alpha·op(a)·op(b) + beta·c0`, row-major, in f64.
fn naive_matmul(a: &[f32], b: &[f32], c0: &[f32], mm: MatMul) -> Vec<f32> {
    let at = |i: usize, l: usize| {
        if mm.trans_a {
            a[l * mm.m + i]
        } else {
            a[i * mm.k + l]
        }
    };
    let bt = |l: usize, j: usize| {
        if mm.trans_b {
            b[j * mm.k + l]
        } else {
            b[l * mm.n + j]
        }
    };
    let mut c = Vec::with_capacity(mm.m * mm.n);
    for i in 0..mm.m {
        for j in 0..mm.n {
            let dot: f64 = (0..mm.k).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
            let prior = if mm.beta == 0.0 {
                0.0
            } else {
                mm.beta as f64 * c0[i * mm.n + j] as f64
            };
            c.push((mm.alpha as f64 * dot + prior) as f32);
        }
    }
    c
}

fn check_matmul<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let (m, n, kk) = (5, 7, 9);
    let mut case = 0u64;
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for (alpha, beta) in [(0.75, 0.0), (-1.5, 1.0)] {
                case += 1;
                let mm = MatMul {
                    m,
                    n,
                    k: kk,
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                };
                let a = uniform(m * kk, 40 + 3 * case);
                let b = uniform(kk * n, 41 + 3 * case);
                // beta = 0 must not read c: NaN there would show.
                let c0 = if beta == 0.0 {
                    vec![f32::NAN; m * n]
                } else {
                    uniform(m * n, 42 + 3 * case)
                };
                let what = format!("matmul ta={trans_a} tb={trans_b} alpha={alpha} beta={beta}");
                let mut want = c0.clone();
                cpu.matmul(&a, &b, &mut want, mm).unwrap();
                assert_close(&want, &naive_matmul(&a, &b, &c0, mm), TIGHT_TOL, &what);
                let mut gc = be.upload(&c0).unwrap();
                be.matmul(
                    &be.upload(&a).unwrap(),
                    &be.upload(&b).unwrap(),
                    &mut gc,
                    mm,
                )
                .unwrap();
                let got = be.download(&gc).unwrap();
                assert_close(&got, &want, TIGHT_TOL, &what);
                assert!(got.iter().all(|v| v.is_finite()), "{what}: c read");
            }
        }
    }
    let mm = MatMul {
        m,
        n,
        k: kk,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        beta: 0.0,
    };
    let mut gc = be.zeros(m * n).unwrap();
    assert!(
        be.matmul(
            &be.zeros(m * kk).unwrap(),
            &be.zeros(kk * n + 1).unwrap(),
            &mut gc,
            mm
        )
        .is_err(),
        "an operand of the wrong size is refused"
    );
}

fn check_sum_squares<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    // 300 000 values: more than 1024 blocks of 256, so the grid strides.
    for (len, n) in [(300_000, 300_000), (1000, 777), (5, 0)] {
        let x = uniform(len, 50 + n as u64);
        let exact: f64 = x[..n].iter().map(|&v| v as f64 * v as f64).sum();
        let want = cpu.sum_squares(&x, n).unwrap();
        let got = be.sum_squares(&be.upload(&x).unwrap(), n).unwrap();
        assert!(
            (want - exact).abs() <= 1e-12 * exact,
            "cpu {want} vs {exact}"
        );
        assert!(
            (got - exact).abs() <= 1e-12 * exact,
            "n={n}: {got} vs {exact}"
        );
        assert_eq!(n == 0, got == 0.0, "n={n}: {got}");
    }
    assert!(be.sum_squares(&be.zeros(10).unwrap(), 11).is_err());
}

fn check_adamw<D: Device>(be: &CudaBackend<D>) {
    let cpu = CpuBackend::new();
    let n = 1000;
    let p0 = uniform(n, 60);
    let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
    let (mut gp, mut gm, mut gv) = (
        be.upload(&p0).unwrap(),
        be.zeros(n).unwrap(),
        be.zeros(n).unwrap(),
    );
    for step in 1..=5 {
        let s = AdamwStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            grad_scale: 0.6,
        };
        let g = uniform(n, 60 + step);
        cpu.adamw(&mut p, &g, &mut m, &mut v, n, s).unwrap();
        be.adamw(&mut gp, &be.upload(&g).unwrap(), &mut gm, &mut gv, n, s)
            .unwrap();
        // The kernel performs the CPU's f32 operations one by one: the bits agree.
        let what = format!("adamw step {step}");
        assert_same_bits(&be.download(&gp).unwrap(), &p, &format!("{what} p"));
        assert_same_bits(&be.download(&gm).unwrap(), &m, &format!("{what} m"));
        assert_same_bits(&be.download(&gv).unwrap(), &v, &format!("{what} v"));
    }
    assert!(
        p.iter().zip(&p0).all(|(a, b)| a != b),
        "every parameter moved"
    );
    assert!(v.iter().all(|&x| x > 0.0) && m.iter().any(|&x| x != 0.0));
    let s = AdamwStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let short = be.zeros(n - 1).unwrap();
    assert!(
        be.adamw(&mut gp, &short, &mut gm, &mut gv, n, s).is_err(),
        "a gradient of the wrong length is refused"
    );
}
