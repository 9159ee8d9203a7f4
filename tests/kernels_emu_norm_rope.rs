//! rmsnorm.cu (forward and backward) and rope.cu (forward and its inverse)
//! on the emulated device (and on a GPU when one answers) against
//! tests/common/naive.rs, outputs poisoned with NaN before the launch.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::*;
use rku_engine::backend::cuda::{kernels as k, Device};

on_devices! {
    rmsnorm_fwd_bwd_f32 => check_rmsnorm,
    rope_fwd_inverse => check_rope,
}

/// Rows wider than the block (300 > 256 threads), and Qwen3's q/k norm
/// shape: q of 3 tokens × 5 heads viewed as `[15, head_dim]` rows of 22,
/// fewer elements than threads (model::forward::qk_norm_fwd).
fn check_rmsnorm<D: Device>(dev: &D) {
    for (rows, d) in [(5, 300), (3 * 5, 22)] {
        check_rmsnorm_shape(dev, rows, d);
    }
}

fn check_rmsnorm_shape<D: Device>(dev: &D, rows: usize, d: usize) {
    let eps = 1e-6;
    let (x, w, dy) = (
        uniform(rows * d, 1),
        round_bf16(&uniform(d, 2)),
        uniform(rows * d, 3),
    );
    let (x64, w64) = (f64s(&x), f64s(&w));
    let (y_ref, rstd_ref) = naive::rmsnorm_fwd(&x64, &w64, rows, d, eps as f64);
    let dx_ref = naive::rmsnorm_bwd(&f64s(&dy), &x64, &w64, rows, d, eps as f64);
    let (gx, gw) = (up(dev, &x), up_bf16(dev, &w));
    let (y, rstd, dx) = (
        poisoned(dev, rows * d),
        poisoned(dev, rows),
        poisoned(dev, rows * d),
    );
    k::rmsnorm_fwd(dev, &gx, &gw, &y, &rstd, rows, d, eps).unwrap();
    k::rmsnorm_bwd(dev, &up(dev, &dy), &gx, &gw, &rstd, &dx, rows, d).unwrap();
    assert_close(
        &down(dev, &y),
        &f32s(&y_ref),
        F32_TOL,
        &format!("y [{rows}, {d}]"),
    );
    assert_close(
        &down(dev, &rstd),
        &f32s(&rstd_ref),
        F32_TOL,
        &format!("rstd [{rows}, {d}]"),
    );
    assert_close(
        &down(dev, &dx),
        &f32s(&dx_ref),
        F32_TOL,
        &format!("dx [{rows}, {d}]"),
    );
}

fn check_rope<D: Device>(dev: &D) {
    let (seqs, t, heads, hd) = (2, 7, 3, 10);
    let half = hd / 2;
    let rows = seqs * t;
    let x = uniform(rows * heads * hd, 4);
    let (mut cos, mut sin) = (vec![0.0; t * half], vec![0.0; t * half]);
    for p in 0..t {
        for i in 0..half {
            let th = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
            cos[p * half + i] = th.cos();
            sin[p * half + i] = th.sin();
        }
    }
    let want = naive::rope(&f64s(&x), &f64s(&cos), &f64s(&sin), t, heads, hd, false);
    let gx = up(dev, &x);
    let (gc, gs) = (up(dev, &cos), up(dev, &sin));
    k::rope(dev, &gx, &gc, &gs, rows, t, heads, hd, false).unwrap();
    assert_close(&down(dev, &gx), &f32s(&want), F32_TOL, "rope");
    k::rope(dev, &gx, &gc, &gs, rows, t, heads, hd, true).unwrap();
    assert_close(&down(dev, &gx), &x, F32_TOL, "rope inverse");
}
