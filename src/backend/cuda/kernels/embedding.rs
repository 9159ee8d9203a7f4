//! Launches of kernels/embedding.cu.
use half::bf16;

use super::Launch;
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// embedding.cu `embedding_bf16`: `out[r, :] = table[ids[r], :] · scale`,
/// table `[vocab, d]`; one block per id.
pub fn embedding<D: Device>(
    dev: &D,
    ids: &[u32],
    table: &DevBuf<D, bf16>,
    out: &DevBuf<D, f32>,
    d: usize,
    scale: f32,
) -> Result<()> {
    let vocab = table.len() / d.max(1);
    Launch::new(dev)
        .indices(ids, vocab, "embedding: token id")
        .buf(table, vocab * d, "embedding table")
        .buf(out, ids.len() * d, "embedding out")
        .int(d, "d")
        .f32(scale)
        .run_if(
            !ids.is_empty(),
            "embedding_bf16",
            LaunchCfg::linear(ids.len(), 256),
        )
}
