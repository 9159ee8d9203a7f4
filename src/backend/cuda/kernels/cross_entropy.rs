//! Launches of kernels/cross_entropy.cu: the two passes of the chunked
//! cross-entropy (`Backend::cross_entropy` on the CUDA backend), one block
//! per row of a logits chunk `[rows, vc]`.
use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// cross_entropy.cu `ce_stats_f32`: folds the logits chunk `[rows, vc]` of
/// vocabulary entries `[v0, v0+vc)` into the running max `m`, sum `s` and
/// target logit `tgt` of each row.
#[allow(clippy::too_many_arguments)]
pub fn ce_stats<D: Device>(
    dev: &D,
    logits: &DevBuf<D, f32>,
    targets: &DevBuf<D, u32>,
    m: &DevBuf<D, f32>,
    s: &DevBuf<D, f32>,
    tgt: &DevBuf<D, f32>,
    rows: usize,
    vc: usize,
    v0: usize,
) -> Result<()> {
    Launch::new(dev)
        .buf(logits, rows * vc, "ce logits")
        .buf(targets, rows, "ce targets")
        .buf(m, rows, "ce m")
        .buf(s, rows, "ce s")
        .buf(tgt, rows, "ce tgt")
        .int(vc, "vocab chunk")
        .int(v0, "vocab offset")
        .run_if(rows > 0, "ce_stats_f32", LaunchCfg::linear(rows, 256))
}

/// cross_entropy.cu `ce_grad_f32`: turns the logits chunk into
/// `scale·(softmax − onehot)` in place, given the final `m` and `s`.
#[allow(clippy::too_many_arguments)]
pub fn ce_grad<D: Device>(
    dev: &D,
    logits: &DevBuf<D, f32>,
    targets: &DevBuf<D, u32>,
    m: &DevBuf<D, f32>,
    s: &DevBuf<D, f32>,
    rows: usize,
    vc: usize,
    v0: usize,
    scale: f32,
) -> Result<()> {
    Launch::new(dev)
        .buf(logits, rows * vc, "ce logits")
        .buf(targets, rows, "ce targets")
        .buf(m, rows, "ce m")
        .buf(s, rows, "ce s")
        .int(vc, "vocab chunk")
        .int(v0, "vocab offset")
        .f32(scale)
        .run_if(rows > 0, "ce_grad_f32", LaunchCfg::linear(rows, 256))
}
