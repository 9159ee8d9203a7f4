//! Launches of kernels/rmsnorm.cu: one block per row of `[rows, d]`.
use half::bf16;

use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// rmsnorm.cu `rmsnorm_fwd_f32`: `y = x·rstd·w`, `rstd = 1/sqrt(mean(x²) + eps)`
/// per row, `rstd [rows]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd<D: Device>(
    dev: &D,
    x: &DevBuf<D, f32>,
    w: &DevBuf<D, bf16>,
    y: &DevBuf<D, f32>,
    rstd: &DevBuf<D, f32>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    Launch::new(dev)
        .buf(x, rows * d, "rmsnorm x")
        .buf(w, d, "rmsnorm w")
        .buf(y, rows * d, "rmsnorm y")
        .buf(rstd, rows, "rmsnorm rstd")
        .int(d, "d")
        .f32(eps)
        .run_if(rows > 0, "rmsnorm_fwd_f32", LaunchCfg::linear(rows, 256))
}

/// rmsnorm.cu `rmsnorm_bwd_f32`: `dx = rstd·(w⊙dy) − x·rstd³·mean(x⊙w⊙dy)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd<D: Device>(
    dev: &D,
    dy: &DevBuf<D, f32>,
    x: &DevBuf<D, f32>,
    w: &DevBuf<D, bf16>,
    rstd: &DevBuf<D, f32>,
    dx: &DevBuf<D, f32>,
    rows: usize,
    d: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(dy, rows * d, "rmsnorm dy")
        .buf(x, rows * d, "rmsnorm x")
        .buf(w, d, "rmsnorm w")
        .buf(rstd, rows, "rmsnorm rstd")
        .buf(dx, rows * d, "rmsnorm dx")
        .int(d, "d")
        .run_if(rows > 0, "rmsnorm_bwd_f32", LaunchCfg::linear(rows, 256))
}
