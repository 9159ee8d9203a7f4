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
