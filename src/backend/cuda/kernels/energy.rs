//! Launches of kernels/energy.cu: the energy objective `J = scale·Σ_r ½‖z_r‖²`.
use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// energy.cu `energy_fwd_f32`: `part[r] = scale·½‖z_r‖²`, z `[rows, d]`;
/// one block per row.
pub fn energy_fwd<D: Device>(
    dev: &D,
    z: &DevBuf<D, f32>,
    part: &DevBuf<D, f32>,
    rows: usize,
    d: usize,
    scale: f32,
) -> Result<()> {
    Launch::new(dev)
        .buf(z, rows * d, "energy z")
        .buf(part, rows, "energy part")
        .int(d, "d")
        .f32(scale)
        .run_if(rows > 0, "energy_fwd_f32", LaunchCfg::linear(rows, 256))
}

/// energy.cu `energy_bwd_f32`: `dz = scale·z` over `z.len()` elements.
pub fn energy_bwd<D: Device>(
    dev: &D,
    z: &DevBuf<D, f32>,
    dz: &DevBuf<D, f32>,
    scale: f32,
) -> Result<()> {
    let n = z.len();
    Launch::new(dev)
        .buf(z, n, "energy z")
        .buf(dz, n, "energy dz")
        .i64(n)
        .f32(scale)
        .run("energy_bwd_f32", LaunchCfg::elementwise(n))
}
