//! The scoring statistics and objectives on the emulated device (and on a
//! GPU when one answers) against tests/common/naive.rs: channel_stats.cu
//! (f32, bf16), energy.cu, and the CUDA backend's `channel_stats`, `energy`
//! and chunked `cross_entropy` (cross_entropy.cu over vocabulary chunks);
//! add.cu's `zero_rows_f32` (the row mask of trace statistics) and the
//! CUDA backend's `zero_rows` against the CPU backend's.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::*;
use rku_engine::backend::cuda::{kernels as k, CudaBackend, Device};
use rku_engine::backend::Backend;

on_devices! {
    channel_stats_f32 => check_channel_stats_f32,
    channel_stats_bf16 => check_channel_stats_bf16,
    energy_fwd_bwd_f32 => check_energy,
    zero_rows_f32 => check_zero_rows,
}

on_backends! {
    backend_cross_entropy_chunked => check_cross_entropy,
    backend_channel_stats_energy => check_backend_channel_stats,
    backend_zero_rows_matches_cpu => check_backend_zero_rows,
}

/// Rows 0, 2, 3 and 6 of 7 dropped (first, a run, last), the rest kept.
const KEEP: [bool; 7] = [false, true, false, false, true, true, false];

fn check_zero_rows<D: Device>(dev: &D) {
    let width = 37;
    let x = uniform(KEEP.len() * width, 11);
    let gx = up(dev, &x);
    k::zero_rows(dev, &gx, width, &KEEP).unwrap();
    let want: Vec<f32> = x
        .chunks(width)
        .zip(KEEP)
        .flat_map(|(row, k)| row.iter().map(move |&v| if k { v } else { 0.0 }))
        .collect();
    assert_eq!(down(dev, &gx), want);
    // Every row kept: nothing launched, nothing changed.
    let gx = up(dev, &x);
    k::zero_rows(dev, &gx, width, &[true; 7]).unwrap();
    assert_eq!(down(dev, &gx), x);
    // A buffer shorter than the rows it is said to hold is an error.
    assert!(k::zero_rows(dev, &up(dev, &x[..width]), width, &KEEP).is_err());
}

fn check_backend_zero_rows<D: Device>(be: &CudaBackend<D>) {
    let (width, cpu) = (19, rku_engine::backend::cpu::CpuBackend::new());
    let x = uniform(KEEP.len() * width, 12);
    let mut want = x.clone();
    cpu.zero_rows(&mut want, width, &KEEP).unwrap();
    let mut gx = be.upload(&x).unwrap();
    be.zero_rows(&mut gx, width, &KEEP).unwrap();
    assert_eq!(be.download(&gx).unwrap(), want);
    let mut short = x[..width].to_vec();
    assert!(cpu.zero_rows(&mut short, width, &KEEP).is_err());
}

/// The naive `part [5][seqs][m]` of f32 inputs.
fn stats_ref(h: &[f32], g: &[f32], seqs: usize, t: usize, m: usize) -> Vec<f64> {
    naive::channel_stats(&f64s(h), &f64s(g), seqs, t, m)
}

fn check_channel_stats_f32<D: Device>(dev: &D) {
    let (seqs, t, m) = (3, 13, 45);
    let (h, g) = (uniform(seqs * t * m, 1), uniform(seqs * t * m, 2));
    let part = poisoned(dev, 5 * seqs * m);
    k::channel_stats(dev, &up(dev, &h), &up(dev, &g), &part, seqs, t, m).unwrap();
    let got = f64s(&down(dev, &part));
    assert_close64(&got, &stats_ref(&h, &g, seqs, t, m), (1e-5, 1e-4), "part");
}

fn check_channel_stats_bf16<D: Device>(dev: &D) {
    let (seqs, t, m) = (2, 21, 70);
    let (h, g) = (
        round_bf16(&uniform(seqs * t * m, 3)),
        round_bf16(&uniform(seqs * t * m, 4)),
    );
    let part = poisoned(dev, 5 * seqs * m);
    k::channel_stats(dev, &up_bf16(dev, &h), &up_bf16(dev, &g), &part, seqs, t, m).unwrap();
    let got = f64s(&down(dev, &part));
    // Inputs are exactly representable: only the f32 accumulation differs.
    assert_close64(&got, &stats_ref(&h, &g, seqs, t, m), (1e-5, 1e-4), "part");
}

fn check_energy<D: Device>(dev: &D) {
    let (rows, d, scale) = (7, 333, 0.37);
    let z = uniform(rows * d, 5);
    let (part_ref, dz_ref) = naive::energy(&f64s(&z), d, scale as f64);
    let gz = up(dev, &z);
    let (part, dz) = (poisoned(dev, rows), poisoned(dev, rows * d));
    k::energy_fwd(dev, &gz, &part, rows, d, scale).unwrap();
    k::energy_bwd(dev, &gz, &dz, scale).unwrap();
    assert_close(&down(dev, &part), &f32s(&part_ref), F32_TOL, "part");
    assert_close(&down(dev, &dz), &f32s(&dz_ref), F32_TOL, "dz");
}

fn check_cross_entropy<D: Device>(be: &CudaBackend<D>) {
    // Vocabulary 30 in chunks of 7 (see on_backends!): four full chunks and a short one.
    let (rows, d, vocab, scale) = (6, 33, 30, 0.25);
    let (z, w) = (uniform(rows * d, 6), uniform(vocab * d, 7));
    let mut targets: Vec<u32> = indices(rows, vocab, 8).iter().map(|&t| t as u32).collect();
    targets[2] = u32::MAX;
    // The backend rounds z and W to bf16 for the logits' product.
    let (zb, wb) = (f64s(&round_bf16(&z)), f64s(&round_bf16(&w)));
    let (nll, count, dz) = naive::cross_entropy(&zb, &wb, &targets, d, vocab, scale as f64);
    let gw = be.upload_weight(&w).unwrap();
    let (got_nll, got_count, got_dz) = be
        .cross_entropy(
            &be.upload(&z).unwrap(),
            &gw,
            &targets,
            rows,
            d,
            vocab,
            scale,
            true,
        )
        .unwrap();
    assert_eq!(got_count, count);
    assert!(
        (got_nll - nll).abs() <= 1e-4 * nll.abs(),
        "nll {got_nll} vs {nll}"
    );
    // dlogits is rounded to bf16 before the product with W.
    assert_close(
        &be.download(&got_dz.unwrap()).unwrap(),
        &f32s(&dz),
        BF16_TOL,
        "ce dz",
    );
    let (nll2, _, none) = be
        .cross_entropy(
            &be.upload(&z).unwrap(),
            &gw,
            &targets,
            rows,
            d,
            vocab,
            scale,
            false,
        )
        .unwrap();
    assert!(none.is_none() && nll2 == got_nll);
}

fn check_backend_channel_stats<D: Device>(be: &CudaBackend<D>) {
    let (seqs, t, m) = (2, 9, 40);
    let (h, g) = (uniform(seqs * t * m, 9), uniform(seqs * t * m, 10));
    let p = be
        .channel_stats(&be.upload(&h).unwrap(), &be.upload(&g).unwrap(), seqs, t, m)
        .unwrap();
    let want = stats_ref(&h, &g, seqs, t, m);
    let total = |k: usize| {
        (0..m)
            .map(|c| (0..seqs).map(|s| want[k * seqs * m + s * m + c]).sum())
            .collect::<Vec<f64>>()
    };
    let tol = (1e-5, 1e-4);
    assert_close64(&p.s1, &total(0), tol, "s1");
    assert_close64(&p.s2, &total(1), tol, "s2");
    assert_close64(&p.f2, &total(2), tol, "f2");
    assert_close64(&p.k1, &total(3), tol, "k1");
    assert_close64(&p.hg_seq, &want[4 * seqs * m..], tol, "hg_seq");
    let (j, dz) = be
        .energy(&be.upload(&h).unwrap(), seqs * t, m, 0.5)
        .unwrap();
    let j_ref: f64 = naive::energy(&f64s(&h), m, 0.5).0.iter().sum();
    assert!((j - j_ref).abs() <= 1e-5 * j_ref);
    assert_eq!(be.download(&dz).unwrap().len(), h.len());
}
