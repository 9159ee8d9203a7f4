//! Launches of kernels/cast.cu.
use super::{Launch, Stored};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// cast.cu `cast_<S>_to_<T>`: elementwise dtype conversion of `src.len()`
/// values (round to nearest even when narrowing).
pub fn cast<D: Device, S: Stored, T: Stored>(
    dev: &D,
    src: &DevBuf<D, S>,
    dst: &DevBuf<D, T>,
) -> Result<()> {
    let n = src.len();
    Launch::new(dev)
        .buf(src, n, "cast src")
        .buf(dst, n, "cast dst")
        .i64(n)
        .run(
            &format!("cast_{}_to_{}", S::NAME, T::NAME),
            LaunchCfg::elementwise(n),
        )
}

/// cast.cu `diff_f32_to_f64`: `dst = a − b` (or `a` without `b`) over
/// the first `n` values, each operand widened to f64 before the subtraction.
pub fn diff_f64<D: Device>(
    dev: &D,
    a: &DevBuf<D, f32>,
    b: Option<&DevBuf<D, f32>>,
    dst: &DevBuf<D, f64>,
    n: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(a, n, "diff a")
        .buf(b.unwrap_or(a), n, "diff b")
        .buf(dst, n, "diff dst")
        .i64(n)
        .int(usize::from(b.is_some()), "sub")
        .run_if(n > 0, "diff_f32_to_f64", LaunchCfg::elementwise(n))
}
