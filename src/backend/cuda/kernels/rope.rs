//! Launches of kernels/rope.cu.
use super::{bad, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// rope.cu `rope_f32`: rotary embedding in place over x `[rows, heads·hd]`
/// (rows = seqs·t, position = row mod t), cos/sin `[t, hd/2]`; `inverse`
/// rotates by −θ. One block per row.
#[allow(clippy::too_many_arguments)]
pub fn rope<D: Device>(
    dev: &D,
    x: &DevBuf<D, f32>,
    cos: &DevBuf<D, f32>,
    sin: &DevBuf<D, f32>,
    rows: usize,
    t: usize,
    heads: usize,
    hd: usize,
    inverse: bool,
) -> Result<()> {
    if !hd.is_multiple_of(2) || t == 0 || !rows.is_multiple_of(t) {
        return Err(bad(
            dev,
            format!("rope: head_dim {hd} must be even, rows {rows} a multiple of t {t}"),
        ));
    }
    Launch::new(dev)
        .buf(x, rows * heads * hd, "rope x")
        .buf(cos, t * hd / 2, "rope cos")
        .buf(sin, t * hd / 2, "rope sin")
        .int(t, "t")
        .int(heads, "heads")
        .int(hd, "head_dim")
        .f32(if inverse { -1.0 } else { 1.0 })
        .run_if(rows > 0, "rope_f32", LaunchCfg::linear(rows, 128))
}
