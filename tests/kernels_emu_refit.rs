//! The refit's normal equations (METHODS.md §9) on the emulated device (and
//! on a GPU when one answers) against tests/common/naive.rs: the widening
//! gather (compact.cu `compact_cols_f32_to_f64`), the widening difference
//! (cast.cu `diff_f32_to_f64`), f64 products, and `Backend::normal_equations`
//! of the CUDA backend and of the CPU backend.
mod common;
use common::naive::{self, f64s};
use common::ops::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{kernels as k, CudaBackend, DevBuf, Device, Gemm, GemmType};
use rku_engine::backend::Backend;

on_devices! {
    compact_cols_widen => check_compact_cols_widen,
    diff_widen => check_diff_widen,
    gemm_f64 => check_gemm_f64,
}

on_backends! {
    backend_normal_equations => check_backend_normal_equations,
}

/// Products of f32 values are exact in f64; only the order of the sums differs.
const F64_TOL: (f64, f64) = (1e-12, 1e-12);

fn down64<D: Device>(dev: &D, b: &DevBuf<D, f64>) -> Vec<f64> {
    b.download(dev).unwrap()
}

fn check_compact_cols_widen<D: Device>(dev: &D) {
    let (rows, m) = (11, 37);
    let h = uniform(rows * m, 21);
    let keep: Vec<u32> = [0, 3, 4, 17, 36].into();
    for ones in [false, true] {
        let w = keep.len() + ones as usize;
        let dst = DevBuf::<D, f64>::alloc(dev, rows * w).unwrap();
        k::compact_cols_widen(dev, &up(dev, &h), &keep, ones, &dst, rows, m).unwrap();
        let mut want = Vec::new();
        for r in 0..rows {
            want.extend(keep.iter().map(|&c| h[r * m + c as usize] as f64));
            if ones {
                want.push(1.0);
            }
        }
        assert_eq!(down64(dev, &dst), want, "ones = {ones}");
    }
    // A kept index past the width is refused before any launch.
    let dst = DevBuf::<D, f64>::alloc(dev, rows).unwrap();
    assert!(k::compact_cols_widen(dev, &up(dev, &h), &[37], false, &dst, rows, m).is_err());
}

fn check_diff_widen<D: Device>(dev: &D) {
    let n = 1000;
    let (a, b) = (uniform(n, 22), uniform(n, 23));
    let dst = DevBuf::<D, f64>::alloc(dev, n).unwrap();
    k::diff_f64(dev, &up(dev, &a), Some(&up(dev, &b)), &dst, n).unwrap();
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| x as f64 - y as f64)
        .collect();
    assert_eq!(down64(dev, &dst), want, "a − b");
    k::diff_f64(dev, &up(dev, &a), None, &dst, n).unwrap();
    assert_eq!(down64(dev, &dst), f64s(&a), "a");
}

/// f64 products through cuBLAS's contract: op flags, leading dimensions
/// past the rows, batch strides, alpha and beta (the refit uses strided
/// batches for its row energies).
fn check_gemm_f64<D: Device>(dev: &D) {
    let (m, n, kk, batch) = (13, 9, 21, 3);
    for (case, (trans_a, trans_b, alpha, beta)) in [
        (false, false, 1.0, 0.0),
        (true, true, -1.0, 1.0),
        (true, false, 0.5, 0.25),
    ]
    .into_iter()
    .enumerate()
    {
        let (ra, ca) = if trans_a { (kk, m) } else { (m, kk) };
        let (rb, cb) = if trans_b { (n, kk) } else { (kk, n) };
        let (lda, ldb, ldc) = (ra + 2, rb + 1, m + 3);
        let (sa, sb, sc) = (lda * ca + 4, ldb * cb + 1, ldc * n + 2);
        let seed = 24 + 3 * case as u64;
        let a = f64s(&uniform(sa * batch, seed));
        let b = f64s(&uniform(sb * batch, seed + 1));
        let c0 = f64s(&uniform(sc * batch, seed + 2));
        let (ga, gb) = (
            DevBuf::upload(dev, &a).unwrap(),
            DevBuf::upload(dev, &b).unwrap(),
        );
        let gc = DevBuf::upload(dev, &c0).unwrap();
        let g = Gemm {
            trans_a,
            trans_b,
            m,
            n,
            k: kk,
            alpha,
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
            ab: GemmType::F64,
        };
        // SAFETY: each operand holds `batch` strides of its stored extent.
        unsafe { dev.gemm(&g) }.unwrap();
        let want = naive::gemm(&g, &a, &b, &c0);
        assert_close64(
            &down64(dev, &gc),
            &want,
            F64_TOL,
            &format!("f64 gemm case {case}"),
        );
    }
}

/// One batch of the refit on `be` against the naive sums, with and without
/// the bias column and the subtracted target.
fn check_normal_equations<B: Backend>(be: &B) {
    let (rows, m, d) = (29, 40, 12);
    let h = uniform(rows * m, 27);
    let (y, y_sub) = (uniform(rows * d, 28), uniform(rows * d, 29));
    let keep = [1, 2, 5, 8, 13, 21, 34, 39];
    let (gh, gy, gs) = (
        be.upload(&h).unwrap(),
        be.upload(&y).unwrap(),
        be.upload(&y_sub).unwrap(),
    );
    for ones in [false, true] {
        for sub in [false, true] {
            let got = be
                .normal_equations(&gh, &keep, ones, &gy, sub.then_some(&gs), rows, m, d)
                .unwrap();
            let ys = f64s(&y_sub);
            let (g, c, rr) = naive::normal_equations(
                &f64s(&h),
                &keep,
                ones,
                &f64s(&y),
                sub.then_some(ys.as_slice()),
                rows,
                m,
                d,
            );
            let what = format!("{} ones={ones} sub={sub}", be.name());
            assert_eq!(
                (got.width, got.d),
                (keep.len() + ones as usize, d),
                "{what}"
            );
            assert_close64(&got.g, &g, F64_TOL, &format!("{what}: G"));
            assert_close64(&got.c, &c, F64_TOL, &format!("{what}: C"));
            assert_close64(&[got.rr], &[rr], F64_TOL, &format!("{what}: rr"));
        }
    }
    assert!(
        be.normal_equations(&gh, &[40], false, &gy, None, rows, m, d)
            .is_err(),
        "a kept channel past m is refused"
    );
}

fn check_backend_normal_equations<D: Device>(be: &CudaBackend<D>) {
    check_normal_equations(be);
}

#[test]
fn cpu_normal_equations() {
    check_normal_equations(&CpuBackend::new());
}
