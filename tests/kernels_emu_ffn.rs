//! The FFN's kernels and products on the emulated device (and on a GPU when
//! one answers) against tests/common/naive.rs: swiglu.cu (SwiGLU and
//! GeGLU, f32, bf16),
//! add.cu, the cuBLAS-shaped gemm contract both devices implement, and the
//! CUDA backend's `linear`. Sizes are not multiples of the block size,
//! outputs are poisoned with NaN before the launch, and results are held to
//! |got − want| ≤ atol + rtol·|want|.
mod common;
use common::naive::{self, f32s, f64s};
use common::ops::*;
use half::bf16;
use rku_engine::backend::cuda::{kernels as k, CudaBackend, DevBuf, Device, Gemm, GemmType};
use rku_engine::backend::{Backend, GluAct};

on_devices! {
    swiglu_f32 => check_swiglu_f32,
    swiglu_bf16 => check_swiglu_bf16,
    geglu_f32 => check_geglu_f32,
    geglu_bf16 => check_geglu_bf16,
    add_and_bias => check_add,
    gemm_cublas_contract => check_gemm,
}

on_backends! {
    backend_linear => check_backend_linear,
}

/// `(h, da, db)` of the naive swiglu or geglu, as f32.
fn glu_ref(act: GluAct, a: &[f32], b: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (a, b, dh) = (f64s(a), f64s(b), f64s(dh));
    let (h, (da, db)) = match act {
        GluAct::Silu => (naive::swiglu_fwd(&a, &b), naive::swiglu_bwd(&dh, &a, &b)),
        GluAct::GeluTanh => (naive::geglu_fwd(&a, &b), naive::geglu_bwd(&dh, &a, &b)),
    };
    (f32s(&h), f32s(&da), f32s(&db))
}

fn check_swiglu_f32<D: Device>(dev: &D) {
    check_glu_f32(dev, GluAct::Silu, 1000);
}

fn check_swiglu_bf16<D: Device>(dev: &D) {
    check_glu_bf16(dev, GluAct::Silu, 777);
}

/// Gemma 3's GeGLU over a = ±3 (uniform·3), through tanh's saturation.
fn check_geglu_f32<D: Device>(dev: &D) {
    check_glu_f32(dev, GluAct::GeluTanh, 1001);
}

fn check_geglu_bf16<D: Device>(dev: &D) {
    check_glu_bf16(dev, GluAct::GeluTanh, 779);
}

fn check_glu_f32<D: Device>(dev: &D, act: GluAct, n: usize) {
    let a: Vec<f32> = uniform(n, 1).iter().map(|x| 3.0 * x).collect();
    let (b, dh) = (uniform(n, 2), uniform(n, 3));
    let (h_ref, da_ref, db_ref) = glu_ref(act, &a, &b, &dh);
    let (ga, gb, gdh) = (up(dev, &a), up(dev, &b), up(dev, &dh));
    let (h, da, db) = (poisoned(dev, n), poisoned(dev, n), poisoned(dev, n));
    k::swiglu_fwd(dev, act, &ga, &gb, &h).unwrap();
    k::swiglu_bwd(dev, act, &gdh, &ga, &gb, &da, &db).unwrap();
    assert_close(&down(dev, &h), &h_ref, F32_TOL, "h");
    assert_close(&down(dev, &da), &da_ref, F32_TOL, "da");
    assert_close(&down(dev, &db), &db_ref, F32_TOL, "db");
}

fn check_glu_bf16<D: Device>(dev: &D, act: GluAct, n: usize) {
    let (a, b, dh) = (
        round_bf16(&uniform(n, 4).iter().map(|x| 3.0 * x).collect::<Vec<f32>>()),
        round_bf16(&uniform(n, 5)),
        round_bf16(&uniform(n, 6)),
    );
    let (h_ref, da_ref, db_ref) = glu_ref(act, &a, &b, &dh);
    let (ga, gb, gdh) = (up_bf16(dev, &a), up_bf16(dev, &b), up_bf16(dev, &dh));
    let (h, da, db) = (
        poisoned_bf16(dev, n),
        poisoned_bf16(dev, n),
        poisoned_bf16(dev, n),
    );
    k::swiglu_fwd(dev, act, &ga, &gb, &h).unwrap();
    k::swiglu_bwd(dev, act, &gdh, &ga, &gb, &da, &db).unwrap();
    assert_close(&down_bf16(dev, &h), &h_ref, BF16_TOL, "h");
    assert_close(&down_bf16(dev, &da), &da_ref, BF16_TOL, "da");
    assert_close(&down_bf16(dev, &db), &db_ref, BF16_TOL, "db");
}

fn check_add<D: Device>(dev: &D) {
    let n = 1111;
    let (x, y) = (uniform(n, 7), uniform(n, 8));
    let gx = up(dev, &x);
    k::add(dev, &gx, &up(dev, &y), n).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    assert_close(&down(dev, &gx), &want, F32_TOL, "add_f32");
    let (xb, yb) = (round_bf16(&x), round_bf16(&y));
    let gxb = up_bf16(dev, &xb);
    k::add(dev, &gxb, &up_bf16(dev, &yb), n).unwrap();
    let want: Vec<f32> = xb.iter().zip(&yb).map(|(a, b)| a + b).collect();
    assert_close(&down_bf16(dev, &gxb), &want, BF16_TOL, "add_bf16");
    let (rows, out) = (11, 101);
    let (ym, bias) = (uniform(rows * out, 9), round_bf16(&uniform(out, 10)));
    let gy = up(dev, &ym);
    k::add_bias(dev, &gy, &up_bf16(dev, &bias), rows, out).unwrap();
    let want: Vec<f32> = ym
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % out])
        .collect();
    assert_close(&down(dev, &gy), &want, F32_TOL, "add_bias");
}

/// Keeps an uploaded operand alive whatever its dtype.
enum Operand<D: Device> {
    F(DevBuf<D, f32>),
    B(DevBuf<D, bf16>),
}
impl<D: Device> Operand<D> {
    fn addr(&self, dev: &D) -> u64 {
        match self {
            Operand::F(b) => b.addr(dev),
            Operand::B(b) => b.addr(dev),
        }
    }
}

/// Every transpose combination, both operand types, beta 0 (C not read) and
/// not, padded leading dimensions and batch strides.
fn check_gemm<D: Device>(dev: &D) {
    let (m, n, kk, batch) = (13, 7, 11, 3);
    for (case, (ta, tb, ab, beta)) in [
        (false, false, GemmType::F32, 0.0),
        (true, false, GemmType::F32, 0.5),
        (false, true, GemmType::F32, 0.0),
        (true, true, GemmType::F32, -1.0),
        (true, false, GemmType::Bf16, 0.0),
        (false, true, GemmType::Bf16, 1.0),
    ]
    .into_iter()
    .enumerate()
    {
        let (ra, ca) = if ta { (kk, m) } else { (m, kk) };
        let (rb, cb) = if tb { (n, kk) } else { (kk, n) };
        let (lda, ldb, ldc) = (ra + 3, rb + 1, m + 2);
        let (sa, sb, sc) = (lda * ca + 5, ldb * cb + 2, ldc * n + 1);
        let seed = 11 + 3 * case as u64;
        let mut a = uniform(sa * batch, seed);
        let mut b = uniform(sb * batch, seed + 1);
        if ab == GemmType::Bf16 {
            a = round_bf16(&a);
            b = round_bf16(&b);
        }
        let c0 = uniform(sc * batch, seed + 2);
        let (ga, gb) = match ab {
            GemmType::F32 => (Operand::F(up(dev, &a)), Operand::F(up(dev, &b))),
            GemmType::Bf16 => (Operand::B(up_bf16(dev, &a)), Operand::B(up_bf16(dev, &b))),
            GemmType::F64 => unreachable!("f64 products: tests/kernels_emu_refit.rs"),
        };
        let gc = up(dev, &c0);
        let g = Gemm {
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k: kk,
            alpha: 0.75,
            a: ga.addr(dev),
            lda,
            stride_a: sa,
            b: gb.addr(dev),
            ldb,
            stride_b: sb,
            beta,
            c: gc.addr(dev),
            ldc,
            stride_c: sc,
            batch,
            ab,
        };
        unsafe { dev.gemm(&g) }.unwrap();
        let want = f32s(&naive::gemm(&g, &f64s(&a), &f64s(&b), &f64s(&c0)));
        assert_close(
            &down(dev, &gc),
            &want,
            (1e-4, 1e-4),
            &format!("gemm {ta} {tb} {ab:?}"),
        );
    }
}

fn check_backend_linear<D: Device>(be: &CudaBackend<D>) {
    let (rows, inp, out) = (5, 19, 23);
    let (x, w, bias, dy) = (
        uniform(rows * inp, 30),
        uniform(out * inp, 31),
        uniform(out, 32),
        uniform(rows * out, 33),
    );
    // The backend rounds weights and the activation operand to bf16.
    let (xb, wb, bb) = (
        f64s(&round_bf16(&x)),
        f64s(&round_bf16(&w)),
        f64s(&round_bf16(&bias)),
    );
    let gw = be.upload_weight(&w).unwrap();
    let gb = be.upload_weight(&bias).unwrap();
    let y = be
        .linear(&be.upload(&x).unwrap(), &gw, Some(&gb), rows, inp, out)
        .unwrap();
    let want = f32s(&naive::linear(&xb, &wb, Some(&bb), rows, inp, out));
    assert_close(&be.download(&y).unwrap(), &want, F32_TOL, "linear");
    let dx = be
        .linear_bwd_input(&be.upload(&dy).unwrap(), &gw, rows, inp, out)
        .unwrap();
    let dyb = f64s(&round_bf16(&dy));
    let want = f32s(&naive::linear_bwd_input(&dyb, &wb, rows, inp, out));
    assert_close(
        &be.download(&dx).unwrap(),
        &want,
        F32_TOL,
        "linear_bwd_input",
    );
    // Every temporary is freed again.
    drop((y, dx, gw, gb));
    assert_eq!(be.device().mem_stats().current, 0);
    assert!(be.device().mem_stats().high_water > 0);
}
