//! Launches of kernels/compact.cu, the compaction gather
//! (`Backend::gather_rows`, `gather_cols` on the CUDA backend).
use super::Launch;
use crate::backend::cuda::buf::{DevBuf, Elem};
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// Words the compaction moves (compact.cu names its kernels by word width):
/// u16 for bf16 and f16, u32 for f32.
pub trait Word: Elem {}
impl Word for u16 {}
impl Word for u32 {}

/// compact.cu `compact_rows_<W>`: `dst[i, :] = src[keep[i], :]`, src `[m, d]`,
/// dst `[keep.len(), d]`; one block per kept row.
pub fn compact_rows<D: Device, W: Word>(
    dev: &D,
    src: &DevBuf<D, W>,
    keep: &[u32],
    dst: &DevBuf<D, W>,
    m: usize,
    d: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(src, m * d, "compact src")
        .indices(keep, m, "compact: kept channel")
        .buf(dst, keep.len() * d, "compact dst")
        .int(d, "d")
        .run_if(
            !keep.is_empty(),
            &format!("compact_rows_{}", W::NAME),
            LaunchCfg::linear(keep.len(), 256),
        )
}

/// compact.cu `compact_cols_<W>`: `dst[r, j] = src[r, keep[j]]`, src
/// `[rows, m]`, dst `[rows, keep.len()]`; grid-stride over dst.
pub fn compact_cols<D: Device, W: Word>(
    dev: &D,
    src: &DevBuf<D, W>,
    keep: &[u32],
    dst: &DevBuf<D, W>,
    rows: usize,
    m: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(src, rows * m, "compact src")
        .indices(keep, m, "compact: kept channel")
        .buf(dst, rows * keep.len(), "compact dst")
        .int(rows, "rows")
        .int(m, "m")
        .int(keep.len(), "k")
        .run_if(
            !keep.is_empty() && rows > 0,
            &format!("compact_cols_{}", W::NAME),
            LaunchCfg::elementwise(rows * keep.len()),
        )
}

/// compact.cu `compact_cols_f32_to_f64`, the refit's gather: `dst[r, j] =
/// src[r, keep[j]]` widened to f64, and with `ones` a last column of ones;
/// src `[rows, m]`, dst `[rows, keep.len() + ones]`.
pub fn compact_cols_widen<D: Device>(
    dev: &D,
    src: &DevBuf<D, f32>,
    keep: &[u32],
    ones: bool,
    dst: &DevBuf<D, f64>,
    rows: usize,
    m: usize,
) -> Result<()> {
    let width = keep.len() + usize::from(ones);
    Launch::new(dev)
        .buf(src, rows * m, "compact src")
        .indices(keep, m, "compact: kept channel")
        .buf(dst, rows * width, "compact dst")
        .int(rows, "rows")
        .int(m, "m")
        .int(keep.len(), "k")
        .int(usize::from(ones), "ones")
        .run_if(
            width > 0 && rows > 0,
            "compact_cols_f32_to_f64",
            LaunchCfg::elementwise(rows * width),
        )
}
