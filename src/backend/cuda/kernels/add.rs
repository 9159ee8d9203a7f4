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
