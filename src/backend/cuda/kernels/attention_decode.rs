//! Launches of kernels/attention_decode.cu: attention of new queries
//! against a KV cache (`Backend::attention_cached` on the CUDA backend).
use super::attention::{attn_check, ATTN_TILE, ATTN_WARPS};
use super::{bad, int, Launch};
use crate::backend::cuda::buf::DevBuf;
use crate::backend::cuda::device::{Device, LaunchCfg};
use crate::backend::{check_cache_window, AttnShape, CacheShape};
use crate::Result;

/// Blocks `decode_split` aims the decode grid at (about 4 per SM on a
/// 132-SM H100), and the shortest split it makes: each split costs its
/// partials (hd floats per query and head) written and read back.
const DECODE_BLOCKS: usize = 512;
const DECODE_MIN_SPLIT: usize = 64;

/// Keys per split of attention_decode.cu for `attention_cached`: one split
/// when the (sequence, kv head, 4 query rows) blocks already fill the GPU
/// (prefill chunks, large batches), else as many as bring the grid to about
/// `DECODE_BLOCKS` (one sequence of Qwen2.5-7B: 8 blocks per split), each a
/// multiple of 32 keys and at least `DECODE_MIN_SPLIT`.
pub fn decode_split(sh: CacheShape, pos: &[usize]) -> usize {
    decode_split_window(sh, pos, None)
}

/// Positions from the first key of sequence s's first new query
/// (`max(0, pos[s]+1−W)`, 0 without a window) to its last, pos[s]+n: what
/// attention_decode.cu cuts into splits.
fn span(p: usize, n: usize, window: Option<usize>) -> usize {
    p + n - window.map_or(0, |w| (p + 1).saturating_sub(w))
}

/// [`decode_split`] under a sliding window: the keys a call reads are the
/// longest span of a sequence, at most n + W − 1.
pub fn decode_split_window(sh: CacheShape, pos: &[usize], window: Option<usize>) -> usize {
    let longest = pos
        .iter()
        .map(|&p| span(p, sh.n, window))
        .max()
        .unwrap_or(0);
    let group = sh.heads / sh.kv_heads.max(1);
    let blocks = (group * sh.n).div_ceil(ATTN_WARPS as usize) * sh.kv_heads * sh.seqs;
    let splits = DECODE_BLOCKS.div_ceil(blocks.max(1));
    longest
        .div_ceil(splits)
        .next_multiple_of(ATTN_TILE)
        .max(DECODE_MIN_SPLIT)
}

/// attention_decode.cu: `kv_append_f32` writes the new rows `k`, `v`
/// `[seqs·n, KV·hd]` into the caches `[seqs, cap, KV·hd]` at `pos`,
/// `attention_decode_f32` attends each new query of `q [seqs·n, H·hd]` to
/// its sequence's cache in splits of `split` keys and, when there is more
/// than one split, `attention_decode_combine_f32` merges them into
/// `out [seqs·n, H·hd]` (the contract of `Backend::attention_cached`).
/// With a sliding window the caches are rings (the contract of
/// `Backend::attention_cached`).
#[allow(clippy::too_many_arguments)]
pub fn attention_cached<D: Device>(
    dev: &D,
    q: &DevBuf<D, f32>,
    k: &DevBuf<D, f32>,
    v: &DevBuf<D, f32>,
    k_cache: &DevBuf<D, f32>,
    v_cache: &DevBuf<D, f32>,
    pos: &[usize],
    out: &DevBuf<D, f32>,
    sh: CacheShape,
    split: usize,
    window: Option<usize>,
) -> Result<()> {
    // Every cache row the kernels touch is a slot mod cap; the new rows
    // overwrite no key a query reads (pos[s] + n ≤ cap, or a ring of at
    // least n + W − 1 slots).
    check_cache_window(pos, sh, window)?;
    attn_check(
        dev,
        AttnShape {
            seqs: sh.seqs,
            t: sh.n,
            heads: sh.heads,
            kv_heads: sh.kv_heads,
            head_dim: sh.head_dim,
        },
    )?;
    if split == 0 || !split.is_multiple_of(ATTN_TILE) {
        return Err(bad(
            dev,
            format!("attention_cached: split {split} is not a positive multiple of {ATTN_TILE}"),
        ));
    }
    let (rows, hd) = (sh.seqs * sh.n, sh.head_dim);
    let (qd, kvd) = (sh.heads * hd, sh.kv_heads * hd);
    let cache = sh.seqs * sh.cap * kvd;
    let positions = pos
        .iter()
        .map(|&p| int(dev, p + sh.n, "cache position").map(|_| p as i32))
        .collect::<Result<Vec<i32>>>()?;
    // 0 is no window; a window past every position is none either.
    let longest = pos.iter().max().map_or(0, |p| p + sh.n);
    let win = window.map_or(0, |w| w.min(longest.max(1)));
    let pos_dev = DevBuf::upload(dev, &positions)?;
    let splits = pos
        .iter()
        .map(|&p| span(p, sh.n, window))
        .max()
        .unwrap_or(0)
        .div_ceil(split);
    // With one split the kernel's normalised partial is the output itself.
    let (part, lse) = if splits == 1 {
        (None, DevBuf::<D, f32>::alloc(dev, rows * sh.heads)?)
    } else {
        (
            Some(DevBuf::<D, f32>::alloc(dev, rows * sh.heads * splits * hd)?),
            DevBuf::<D, f32>::alloc(dev, rows * sh.heads * splits)?,
        )
    };
    let o_part = part.as_ref().unwrap_or(out);

    // All three launches are checked before any runs.
    let append = Launch::new(dev)
        .buf(k, rows * kvd, "attention_cached k")
        .buf(v, rows * kvd, "attention_cached v")
        .buf(k_cache, cache, "attention_cached k_cache")
        .buf(v_cache, cache, "attention_cached v_cache")
        .buf(&pos_dev, sh.seqs, "cache positions")
        .int(sh.n, "n")
        .int(sh.cap, "cap")
        .int(kvd, "kv width")
        .checked()?;
    let decode = Launch::new(dev)
        .buf(q, rows * qd, "attention_cached q")
        .buf(k_cache, cache, "attention_cached k_cache")
        .buf(v_cache, cache, "attention_cached v_cache")
        .buf(&pos_dev, sh.seqs, "cache positions")
        .buf(
            o_part,
            rows * sh.heads * splits * hd,
            "decode partials (out)",
        )
        .buf(&lse, rows * sh.heads * splits, "decode lse")
        .int(sh.n, "n")
        .int(sh.cap, "cap")
        .int(sh.heads, "heads")
        .int(sh.kv_heads, "kv_heads")
        .int(hd, "head_dim")
        .int(split, "split")
        .int(win, "window")
        .checked()?;
    let combine = match &part {
        Some(part) => Some(
            Launch::new(dev)
                .buf(part, rows * sh.heads * splits * hd, "decode partials")
                .buf(&lse, rows * sh.heads * splits, "decode lse")
                .buf(&pos_dev, sh.seqs, "cache positions")
                .buf(out, rows * qd, "attention_cached out")
                .int(sh.n, "n")
                .int(sh.heads, "heads")
                .int(hd, "head_dim")
                .int(splits, "splits")
                .int(split, "split")
                .int(win, "window")
                .checked()?,
        ),
        None => None,
    };
    if rows == 0 {
        return Ok(());
    }
    append.run("kv_append_f32", LaunchCfg::linear(rows, 128))?;
    // Grid (query tiles × splits, kv heads, sequences): a block takes
    // ATTN_WARPS query rows of one kv head's group against one split.
    let tiles = (sh.heads / sh.kv_heads * sh.n).div_ceil(ATTN_WARPS as usize);
    let cfg = LaunchCfg {
        grid: [
            int(dev, tiles * splits, "decode blocks")? as u32,
            sh.kv_heads as u32,
            sh.seqs as u32,
        ],
        block: [32, ATTN_WARPS, 1],
        // K and V tiles (rows padded to hd+1) and each warp's query row.
        shmem: ((2 * ATTN_TILE * (hd + 1) + ATTN_WARPS as usize * hd) * 4) as u32,
    };
    decode.run("attention_decode_f32", cfg)?;
    if let Some(combine) = combine {
        // One block per (query row, head), a thread per element of hd.
        let cfg = LaunchCfg {
            grid: [int(dev, rows, "rows")? as u32, sh.heads as u32, 1],
            block: [hd.next_multiple_of(32) as u32, 1, 1],
            shmem: 0,
        };
        combine.run("attention_decode_combine_f32", cfg)?;
    }
    dev.synchronize() // `pos_dev` and the partials are freed on return
}
