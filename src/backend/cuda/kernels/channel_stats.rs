//! Launches of kernels/channel_stats.cu.
use super::{Float, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::Result;

/// Rows per block of channel_stats.cu (its `kStatRows`).
const STAT_ROWS: u32 = 8;

/// channel_stats.cu `channel_stats_<T>`: `part [5][seqs][m]` = per-sequence
/// s1, s2, f2, k1, Σh·g of `h`, `g` `[seqs·t, m]`.
pub fn channel_stats<D: Device, T: Float>(
    dev: &D,
    h: &DevBuf<D, T>,
    g: &DevBuf<D, T>,
    part: &DevBuf<D, f32>,
    seqs: usize,
    t: usize,
    m: usize,
) -> Result<()> {
    // Blocks of 32 channels × STAT_ROWS rows; one grid row per sequence.
    let cfg = LaunchCfg {
        grid: [m.div_ceil(32).max(1) as u32, seqs.max(1) as u32, 1],
        block: [32, STAT_ROWS, 1],
        shmem: 0,
    };
    Launch::new(dev)
        .buf(h, seqs * t * m, "channel_stats h")
        .buf(g, seqs * t * m, "channel_stats g")
        .buf(part, 5 * seqs * m, "channel_stats part")
        .int(seqs, "seqs")
        .int(t, "t")
        .int(m, "m")
        .run(&format!("channel_stats_{}", T::NAME), cfg)
}
