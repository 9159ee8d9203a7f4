//! Launches of kernels/add.cu.
use half::bf16;

use super::{Float, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// add.cu `add_<T>`: `x[..n] += y[..n]`.
pub fn add<D: Device, T: Float>(
    dev: &D,
    x: &DevBuf<D, T>,
    y: &DevBuf<D, T>,
    n: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(x, n, "add x")
        .buf(y, n, "add y")
        .i64(n)
        .run(&format!("add_{}", T::NAME), LaunchCfg::elementwise(n))
}

/// add.cu `add_bias_f32`: `y[r, j] += bias[j]`, y `[rows, out]`.
pub fn add_bias<D: Device>(
    dev: &D,
    y: &DevBuf<D, f32>,
    bias: &DevBuf<D, bf16>,
    rows: usize,
    out: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(y, rows * out, "add_bias y")
        .buf(bias, out, "add_bias bias")
        .int(rows, "rows")
        .int(out, "out")
        .run("add_bias_f32", LaunchCfg::elementwise(rows * out))
}

/// add.cu `zero_rows_f32`: zeroes every row `r` of `x` `[keep.len(), width]`
/// with `!keep[r]`; launches nothing when every row is kept.
pub fn zero_rows<D: Device>(
    dev: &D,
    x: &DevBuf<D, f32>,
    width: usize,
    keep: &[bool],
) -> Result<()> {
    let rows: Vec<u32> = (0..keep.len() as u32)
        .zip(keep)
        .filter(|(_, &k)| !k)
        .map(|(r, _)| r)
        .collect();
    let n = rows.len() * width;
    Launch::new(dev)
        .buf(x, keep.len() * width, "zero_rows x")
        .indices(&rows, keep.len(), "zero_rows row")
        .int(width, "width")
        .i64(n)
        .run_if(n > 0, "zero_rows_f32", LaunchCfg::elementwise(n))
}
