//! Harness of the op tests (tests/cpu_ops.rs, tests/kernels_emu_*.rs):
//! llm.c's tolerance rule, seeded inputs, and for the kernel tests the
//! device helpers (uploads, NaN-poisoned outputs, the GPU when one answers)
//! and the macros that run one check on every device.
#![allow(unused_macros, unused_imports)]
use half::bf16;
use rku_engine::backend::cuda::{DevBuf, Device, GpuDevice};
use std::sync::OnceLock;

/// (atol, rtol) of an f32 result, and of a result rounded through bf16.
pub const F32_TOL: (f32, f32) = (1e-5, 1e-4);
pub const BF16_TOL: (f32, f32) = (1e-2, 1e-2);

/// |got − want| ≤ atol + rtol·|want| for every element.
pub fn assert_close(got: &[f32], want: &[f32], (atol, rtol): (f32, f32), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// `assert_close` in f64.
pub fn assert_close64(got: &[f64], want: &[f64], (atol, rtol): (f64, f64), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Bit-for-bit equality (NaN equals the same NaN).
pub fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g}, want {w}");
    }
}

/// `n` seeded values uniform in [-1, 1).
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    super::values(n, -1.0, 1.0, seed)
}

/// `n` seeded indices uniform in [0, bound).
pub fn indices(n: usize, bound: usize, seed: u64) -> Vec<usize> {
    super::values(n, 0.0, bound as f32, seed)
        .iter()
        .map(|&v| (v as usize).min(bound - 1))
        .collect()
}

pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// An output buffer filled with NaN, so an element no kernel writes fails.
pub fn poisoned<D: Device>(dev: &D, n: usize) -> DevBuf<D, f32> {
    DevBuf::upload(dev, &vec![f32::NAN; n]).unwrap()
}

pub fn poisoned_bf16<D: Device>(dev: &D, n: usize) -> DevBuf<D, bf16> {
    DevBuf::upload(dev, &vec![bf16::NAN; n]).unwrap()
}

pub fn up<D: Device>(dev: &D, v: &[f32]) -> DevBuf<D, f32> {
    DevBuf::upload(dev, v).unwrap()
}

pub fn up_bf16<D: Device>(dev: &D, v: &[f32]) -> DevBuf<D, bf16> {
    DevBuf::upload(dev, &to_bf16(v)).unwrap()
}

pub fn down<D: Device>(dev: &D, b: &DevBuf<D, f32>) -> Vec<f32> {
    b.download(dev).unwrap()
}

pub fn down_bf16<D: Device>(dev: &D, b: &DevBuf<D, bf16>) -> Vec<f32> {
    b.download(dev)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// The GPU, when this binary has kernels and a driver answers.
pub fn gpu() -> Option<&'static GpuDevice> {
    static GPU: OnceLock<Option<GpuDevice>> = OnceLock::new();
    GPU.get_or_init(|| match GpuDevice::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("GPU tests skipped: {e}");
            None
        }
    })
    .as_ref()
}

/// `#[test] fn $name` running `$check` on the emulated device, then on the GPU if present.
macro_rules! on_devices {
    ($($name:ident => $check:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            $check(&::rku_engine::backend::cuda::EmuDevice::new());
            match $crate::common::ops::gpu() {
                Some(g) => $check(g),
                None => eprintln!("{}: GPU run skipped (no GPU device)", stringify!($name)),
            }
        }
    )*};
}
pub(crate) use on_devices;

/// `#[test] fn $name` running `$check` on a `CudaBackend` over each device
/// (cross-entropy vocabulary chunks of 7, so small vocabularies take several).
macro_rules! on_backends {
    ($($name:ident => $check:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            use ::rku_engine::backend::cuda::{CudaBackend, EmuDevice, GpuDevice};
            $check(&CudaBackend::new(EmuDevice::new()).with_ce_chunk(7));
            match $crate::common::ops::gpu() {
                Some(_) => $check(&CudaBackend::new(GpuDevice::new(0).unwrap()).with_ce_chunk(7)),
                None => eprintln!("{}: GPU run skipped (no GPU device)", stringify!($name)),
            }
        }
    )*};
}
pub(crate) use on_backends;
