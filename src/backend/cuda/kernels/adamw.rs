//! Launches of kernels/adamw.cu: the LoRA recovery's AdamW update and the
//! gradient's sum of squares (METHODS.md §10).
use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::backend::AdamwStep;
use crate::Result;

/// Blocks of a `sum_squares` launch over `n` values (at least 1, at most
/// 1024): the length of its `part` output.
pub fn sum_squares_blocks(n: usize) -> usize {
    n.div_ceil(256).clamp(1, 1024)
}

/// adamw.cu `adamw_f32`: one AdamW update of `p[..n]` in place from `g`,
/// moments `m`, `v` updated in place, with the f32 scalars of
/// `AdamwStep::scalars`.
pub fn adamw<D: Device>(
    dev: &D,
    p: &DevBuf<D, f32>,
    g: &DevBuf<D, f32>,
    m: &DevBuf<D, f32>,
    v: &DevBuf<D, f32>,
    n: usize,
    s: AdamwStep,
) -> Result<()> {
    let k = s.scalars();
    Launch::new(dev)
        .buf(p, n, "adamw p")
        .buf(g, n, "adamw g")
        .buf(m, n, "adamw m")
        .buf(v, n, "adamw v")
        .i64(n)
        .f32(k.decay)
        .f32(k.one_minus_beta1)
        .f32(k.beta2)
        .f32(k.one_minus_beta2)
        .f32(k.eps)
        .f32(k.grad_scale)
        .f32(k.step_size)
        .f32(k.bc2_sqrt)
        .run("adamw_f32", LaunchCfg::elementwise(n))
}

/// adamw.cu `sum_squares_f32`: `part[b]` = the f64 sum of `x[i]²` over the
/// `i < n` block b visits, for the `sum_squares_blocks(n)` blocks; their
/// total is `Σ x[..n]²`.
pub fn sum_squares<D: Device>(
    dev: &D,
    x: &DevBuf<D, f32>,
    part: &DevBuf<D, f64>,
    n: usize,
) -> Result<()> {
    let blocks = sum_squares_blocks(n);
    Launch::new(dev)
        .buf(x, n, "sum_squares x")
        .buf(part, blocks, "sum_squares part")
        .i64(n)
        .run("sum_squares_f32", LaunchCfg::linear(blocks, 256))
}
