//! Launches of kernels/attention.cu: causal GQA attention over whole
//! sequences, forward and backward, grid (query tiles of `ATTN_WARPS`
//! rows, heads, sequences), one warp per query row.
use super::{bad, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::backend::AttnShape;
use crate::Result;

/// Warps per block and rows per tile of attention.cu (`kAttnWarps`, `kTile`)
/// and of attention_decode.cu (`kDecWarps`, `kDecTile`).
pub(super) const ATTN_WARPS: u32 = 4;
pub(super) const ATTN_TILE: usize = 32;

/// The shapes both attention files support.
pub(super) fn attn_check<D: Device>(dev: &D, s: AttnShape) -> Result<()> {
    // The kernels hold ceil(hd/32) ≤ 4 accumulators per lane and pad tile
    // rows to hd+1 floats (odd, so conflict-free, when hd is even).
    if !s.head_dim.is_multiple_of(2) || s.head_dim == 0 || s.head_dim > 128 {
        return Err(bad(
            dev,
            format!(
                "attention: head_dim {} must be even and at most 128",
                s.head_dim
            ),
        ));
    }
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(bad(
            dev,
            format!(
                "attention: heads {} not a multiple of kv_heads {}",
                s.heads, s.kv_heads
            ),
        ));
    }
    Ok(())
}

/// Grid (query tiles, `heads`, sequences) with `shmem_floats` of dynamic
/// shared memory.
fn attn_cfg(s: AttnShape, heads: usize, shmem_floats: usize) -> LaunchCfg {
    LaunchCfg {
        grid: [
            s.t.div_ceil(ATTN_WARPS as usize).max(1) as u32,
            heads as u32,
            s.seqs as u32,
        ],
        block: [32, ATTN_WARPS, 1],
        shmem: (shmem_floats * 4) as u32,
    }
}

/// The trailing `int t, int heads, int kv_heads, int head_dim, int window`
/// every attention.cu kernel takes; the window is passed as min(W, t), t
/// without one (attention.cu: the same as causal).
fn attn_dims<D: Device>(l: Launch<'_, D>, s: AttnShape, window: Option<usize>) -> Launch<'_, D> {
    l.int(s.t, "t")
        .int(s.heads, "heads")
        .int(s.kv_heads, "kv_heads")
        .int(s.head_dim, "head_dim")
        .int(window.map_or(s.t, |w| w.min(s.t)), "window")
}

/// Refuses a window of 0 keys.
fn window_check<D: Device>(dev: &D, window: Option<usize>) -> Result<()> {
    if window == Some(0) {
        return Err(bad(dev, "attention: a sliding window of 0 keys".into()));
    }
    Ok(())
}

/// attention.cu `attention_fwd_f32`: causal GQA attention, `out [rows, H·hd]`,
/// `lse [seqs, H, t]`; with `window` W, query i attends to keys i − W < j ≤ i
/// (`Backend::attention_fwd`), `None` is plain causal.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<D: Device>(
    dev: &D,
    q: &DevBuf<D, f32>,
    k: &DevBuf<D, f32>,
    v: &DevBuf<D, f32>,
    out: &DevBuf<D, f32>,
    lse: &DevBuf<D, f32>,
    s: AttnShape,
    window: Option<usize>,
) -> Result<()> {
    attn_check(dev, s)?;
    window_check(dev, window)?;
    let (rows, hd) = (s.seqs * s.t, s.head_dim);
    // K and V tiles (rows padded to hd+1) and each warp's query row.
    let shmem = 2 * ATTN_TILE * (hd + 1) + ATTN_WARPS as usize * hd;
    let l = Launch::new(dev)
        .buf(q, rows * s.heads * hd, "attention q")
        .buf(k, rows * s.kv_heads * hd, "attention k")
        .buf(v, rows * s.kv_heads * hd, "attention v")
        .buf(out, rows * s.heads * hd, "attention out")
        .buf(lse, rows * s.heads, "attention lse");
    attn_dims(l, s, window).run_if(rows > 0, "attention_fwd_f32", attn_cfg(s, s.heads, shmem))
}

/// attention.cu `attention_bwd_dq_f32` (which also writes `delta =
/// rowsum(dout ⊙ out)` `[rows, H]`) then `attention_bwd_dkv_f32`: `(dq, dk, dv)`
/// of [`attention_fwd`] with the same `window`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<D: Device>(
    dev: &D,
    dout: &DevBuf<D, f32>,
    q: &DevBuf<D, f32>,
    k: &DevBuf<D, f32>,
    v: &DevBuf<D, f32>,
    out: &DevBuf<D, f32>,
    lse: &DevBuf<D, f32>,
    dq: &DevBuf<D, f32>,
    dk: &DevBuf<D, f32>,
    dv: &DevBuf<D, f32>,
    s: AttnShape,
    window: Option<usize>,
) -> Result<()> {
    attn_check(dev, s)?;
    window_check(dev, window)?;
    let (rows, hd) = (s.seqs * s.t, s.head_dim);
    let (qn, kvn) = (rows * s.heads * hd, rows * s.kv_heads * hd);
    let delta = DevBuf::<D, f32>::alloc(dev, rows * s.heads)?;
    // Both launches checked before either runs.
    let dq_pass = Launch::new(dev)
        .buf(dout, qn, "dout")
        .buf(q, qn, "q")
        .buf(k, kvn, "k")
        .buf(v, kvn, "v")
        .buf(out, qn, "out")
        .buf(lse, rows * s.heads, "attention lse")
        .buf(&delta, rows * s.heads, "attention delta")
        .buf(dq, qn, "dq");
    let dq_pass = attn_dims(dq_pass, s, window).checked()?;
    let dkv_pass = Launch::new(dev)
        .buf(dout, qn, "dout")
        .buf(q, qn, "q")
        .buf(k, kvn, "k")
        .buf(v, kvn, "v")
        .buf(lse, rows * s.heads, "attention lse")
        .buf(&delta, rows * s.heads, "attention delta")
        .buf(dk, kvn, "dk")
        .buf(dv, kvn, "dv");
    let dkv_pass = attn_dims(dkv_pass, s, window).checked()?;
    if rows == 0 {
        return Ok(());
    }
    // dq pass: K and V tiles (rows padded to hd+1), each warp's q and dout
    // rows; dkv pass: Q and dout tiles, each warp's k and v rows, and the
    // tile's lse and delta.
    let shmem = 2 * ATTN_TILE * (hd + 1) + 2 * ATTN_WARPS as usize * hd;
    dq_pass.run("attention_bwd_dq_f32", attn_cfg(s, s.heads, shmem))?;
    let shmem = shmem + 2 * ATTN_TILE;
    dkv_pass.run("attention_bwd_dkv_f32", attn_cfg(s, s.kv_heads, shmem))?;
    dev.synchronize() // `delta` is freed on return
}
