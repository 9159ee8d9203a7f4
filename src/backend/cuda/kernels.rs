//! Launch code for every kernel in kernels/*.cu, shared by both devices:
//! shape checks, launch configuration and arguments in the kernel's order.
//! Each function names the .cu file and entry point it launches.
use half::{bf16, f16};

use super::buf::{DevBuf, Elem};
use super::device::{Args, Device, LaunchCfg};
use crate::backend::{check_cache_call, AttnShape, CacheShape};
use crate::{Error, Result};

fn bad<D: Device>(dev: &D, msg: String) -> Error {
    Error::Backend {
        backend: dev.backend_name(),
        msg,
    }
}

/// Errs unless buffer `what` holds at least `len` elements.
fn need<D: Device, T: Elem>(dev: &D, b: &DevBuf<D, T>, len: usize, what: &str) -> Result<()> {
    if b.len() < len {
        return Err(bad(
            dev,
            format!("{what}: {} elements, need {len}", b.len()),
        ));
    }
    Ok(())
}

fn int<D: Device>(dev: &D, v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| bad(dev, format!("{what} = {v} does not fit in i32")))
}

fn launch<D: Device>(dev: &D, name: &str, cfg: LaunchCfg, mut args: Args) -> Result<()> {
    let mut params = args.params();
    // SAFETY: every caller below passes the kernel's parameters in order, with
    // buffers checked (`need`) against the extents the kernel touches.
    unsafe { dev.launch(name, cfg, &mut params) }
}

/// Kernels with an f32 and a bf16 variant.
pub trait Float: Elem {}
impl Float for f32 {}
impl Float for bf16 {}

/// swiglu.cu `swiglu_fwd_<T>`: `h = silu(a) ⊙ b` over `a.len()` elements.
pub fn swiglu_fwd<D: Device, T: Float>(
    dev: &D,
    a: &DevBuf<D, T>,
    b: &DevBuf<D, T>,
    h: &DevBuf<D, T>,
) -> Result<()> {
    let n = a.len();
    need(dev, b, n, "swiglu b")?;
    need(dev, h, n, "swiglu h")?;
    let args = Args::new()
        .ptr(a.addr(dev))
        .ptr(b.addr(dev))
        .ptr(h.addr(dev))
        .i64(n as i64);
    launch(
        dev,
        &format!("swiglu_fwd_{}", T::NAME),
        LaunchCfg::elementwise(n),
        args,
    )
}

/// swiglu.cu `swiglu_bwd_<T>`: `(da, db)` from `dh`.
pub fn swiglu_bwd<D: Device, T: Float>(
    dev: &D,
    dh: &DevBuf<D, T>,
    a: &DevBuf<D, T>,
    b: &DevBuf<D, T>,
    da: &DevBuf<D, T>,
    db: &DevBuf<D, T>,
) -> Result<()> {
    let n = dh.len();
    for (buf, what) in [(a, "a"), (b, "b"), (da, "da"), (db, "db")] {
        need(dev, buf, n, what)?;
    }
    let args = Args::new()
        .ptr(dh.addr(dev))
        .ptr(a.addr(dev))
        .ptr(b.addr(dev))
        .ptr(da.addr(dev))
        .ptr(db.addr(dev))
        .i64(n as i64);
    launch(
        dev,
        &format!("swiglu_bwd_{}", T::NAME),
        LaunchCfg::elementwise(n),
        args,
    )
}

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
    need(dev, h, seqs * t * m, "channel_stats h")?;
    need(dev, g, seqs * t * m, "channel_stats g")?;
    need(dev, part, 5 * seqs * m, "channel_stats part")?;
    let cfg = LaunchCfg {
        grid: [m.div_ceil(32).max(1) as u32, seqs.max(1) as u32, 1],
        block: [32, STAT_ROWS, 1],
        shmem: 0,
    };
    let args = Args::new()
        .ptr(h.addr(dev))
        .ptr(g.addr(dev))
        .ptr(part.addr(dev))
        .i32(int(dev, seqs, "seqs")?)
        .i32(int(dev, t, "t")?)
        .i32(int(dev, m, "m")?);
    launch(dev, &format!("channel_stats_{}", T::NAME), cfg, args)
}

/// Storage dtypes the casts convert between.
pub trait Stored: Elem {}
impl Stored for f32 {}
impl Stored for bf16 {}
impl Stored for f16 {}

/// Words the compaction moves (compact.cu names its kernels by word width):
/// u16 for bf16 and f16, u32 for f32.
pub trait Word: Elem {}
impl Word for u16 {}
impl Word for u32 {}

fn upload_keep<D: Device>(dev: &D, keep: &[u32], m: usize) -> Result<DevBuf<D, u32>> {
    if let Some(&c) = keep.iter().find(|&&c| c as usize >= m) {
        return Err(bad(
            dev,
            format!("compact: kept channel {c} out of range (m = {m})"),
        ));
    }
    DevBuf::upload(dev, keep)
}

/// compact.cu `compact_rows_<W>`: `dst[i, :] = src[keep[i], :]`, src `[m, d]`, dst `[keep.len(), d]`.
pub fn compact_rows<D: Device, W: Word>(
    dev: &D,
    src: &DevBuf<D, W>,
    keep: &[u32],
    dst: &DevBuf<D, W>,
    m: usize,
    d: usize,
) -> Result<()> {
    need(dev, src, m * d, "compact src")?;
    need(dev, dst, keep.len() * d, "compact dst")?;
    if keep.is_empty() {
        return Ok(());
    }
    let idx = upload_keep(dev, keep, m)?;
    let args = Args::new()
        .ptr(src.addr(dev))
        .ptr(idx.addr(dev))
        .ptr(dst.addr(dev))
        .i32(int(dev, d, "d")?);
    launch(
        dev,
        &format!("compact_rows_{}", W::NAME),
        LaunchCfg::linear(keep.len(), 256),
        args,
    )?;
    dev.synchronize() // `idx` is freed on return
}

/// compact.cu `compact_cols_<W>`: `dst[r, j] = src[r, keep[j]]`, src `[rows, m]`, dst `[rows, keep.len()]`.
pub fn compact_cols<D: Device, W: Word>(
    dev: &D,
    src: &DevBuf<D, W>,
    keep: &[u32],
    dst: &DevBuf<D, W>,
    rows: usize,
    m: usize,
) -> Result<()> {
    need(dev, src, rows * m, "compact src")?;
    need(dev, dst, rows * keep.len(), "compact dst")?;
    if keep.is_empty() || rows == 0 {
        return Ok(());
    }
    let idx = upload_keep(dev, keep, m)?;
    let args = Args::new()
        .ptr(src.addr(dev))
        .ptr(idx.addr(dev))
        .ptr(dst.addr(dev))
        .i32(int(dev, rows, "rows")?)
        .i32(int(dev, m, "m")?)
        .i32(int(dev, keep.len(), "k")?);
    let cfg = LaunchCfg::elementwise(rows * keep.len());
    launch(dev, &format!("compact_cols_{}", W::NAME), cfg, args)?;
    dev.synchronize() // `idx` is freed on return
}

/// rmsnorm.cu `rmsnorm_fwd_f32`: `y = x·rstd·w`, `rstd [rows]`.
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
    need(dev, x, rows * d, "rmsnorm x")?;
    need(dev, w, d, "rmsnorm w")?;
    need(dev, y, rows * d, "rmsnorm y")?;
    need(dev, rstd, rows, "rmsnorm rstd")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(x.addr(dev))
        .ptr(w.addr(dev))
        .ptr(y.addr(dev))
        .ptr(rstd.addr(dev))
        .i32(int(dev, d, "d")?)
        .f32(eps);
    launch(dev, "rmsnorm_fwd_f32", LaunchCfg::linear(rows, 256), args)
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
    need(dev, dy, rows * d, "rmsnorm dy")?;
    need(dev, x, rows * d, "rmsnorm x")?;
    need(dev, w, d, "rmsnorm w")?;
    need(dev, rstd, rows, "rmsnorm rstd")?;
    need(dev, dx, rows * d, "rmsnorm dx")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(dy.addr(dev))
        .ptr(x.addr(dev))
        .ptr(w.addr(dev))
        .ptr(rstd.addr(dev))
        .ptr(dx.addr(dev))
        .i32(int(dev, d, "d")?);
    launch(dev, "rmsnorm_bwd_f32", LaunchCfg::linear(rows, 256), args)
}

/// embedding.cu `embedding_bf16`: `out[r, :] = table[ids[r], :]`, table `[vocab, d]`.
pub fn embedding<D: Device>(
    dev: &D,
    ids: &[u32],
    table: &DevBuf<D, bf16>,
    out: &DevBuf<D, f32>,
    d: usize,
) -> Result<()> {
    let vocab = table.len() / d.max(1);
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(bad(
            dev,
            format!("embedding: token id {id} out of range (vocab {vocab})"),
        ));
    }
    need(dev, out, ids.len() * d, "embedding out")?;
    if ids.is_empty() {
        return Ok(());
    }
    let idx = DevBuf::upload(dev, ids)?;
    let args = Args::new()
        .ptr(idx.addr(dev))
        .ptr(table.addr(dev))
        .ptr(out.addr(dev))
        .i32(int(dev, d, "d")?);
    launch(
        dev,
        "embedding_bf16",
        LaunchCfg::linear(ids.len(), 256),
        args,
    )?;
    dev.synchronize() // `idx` is freed on return
}

/// cast.cu `cast_<S>_to_<T>`: elementwise dtype conversion (RNE when narrowing).
pub fn cast<D: Device, S: Stored, T: Stored>(
    dev: &D,
    src: &DevBuf<D, S>,
    dst: &DevBuf<D, T>,
) -> Result<()> {
    let n = src.len();
    need(dev, dst, n, "cast dst")?;
    let args = Args::new()
        .ptr(src.addr(dev))
        .ptr(dst.addr(dev))
        .i64(n as i64);
    launch(
        dev,
        &format!("cast_{}_to_{}", S::NAME, T::NAME),
        LaunchCfg::elementwise(n),
        args,
    )
}

/// energy.cu `energy_fwd_f32`: `part[r] = scale·½‖z_r‖²`.
pub fn energy_fwd<D: Device>(
    dev: &D,
    z: &DevBuf<D, f32>,
    part: &DevBuf<D, f32>,
    rows: usize,
    d: usize,
    scale: f32,
) -> Result<()> {
    need(dev, z, rows * d, "energy z")?;
    need(dev, part, rows, "energy part")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(z.addr(dev))
        .ptr(part.addr(dev))
        .i32(int(dev, d, "d")?)
        .f32(scale);
    launch(dev, "energy_fwd_f32", LaunchCfg::linear(rows, 256), args)
}

/// energy.cu `energy_bwd_f32`: `dz = scale·z` over `z.len()` elements.
pub fn energy_bwd<D: Device>(
    dev: &D,
    z: &DevBuf<D, f32>,
    dz: &DevBuf<D, f32>,
    scale: f32,
) -> Result<()> {
    let n = z.len();
    need(dev, dz, n, "energy dz")?;
    let args = Args::new()
        .ptr(z.addr(dev))
        .ptr(dz.addr(dev))
        .i64(n as i64)
        .f32(scale);
    launch(dev, "energy_bwd_f32", LaunchCfg::elementwise(n), args)
}

/// add.cu `add_<T>`: `x[..n] += y[..n]`.
pub fn add<D: Device, T: Float>(
    dev: &D,
    x: &DevBuf<D, T>,
    y: &DevBuf<D, T>,
    n: usize,
) -> Result<()> {
    need(dev, x, n, "add x")?;
    need(dev, y, n, "add y")?;
    let args = Args::new().ptr(x.addr(dev)).ptr(y.addr(dev)).i64(n as i64);
    launch(
        dev,
        &format!("add_{}", T::NAME),
        LaunchCfg::elementwise(n),
        args,
    )
}

/// add.cu `add_bias_f32`: `y[r, j] += bias[j]`, y `[rows, out]`.
pub fn add_bias<D: Device>(
    dev: &D,
    y: &DevBuf<D, f32>,
    bias: &DevBuf<D, bf16>,
    rows: usize,
    out: usize,
) -> Result<()> {
    need(dev, y, rows * out, "add_bias y")?;
    need(dev, bias, out, "add_bias bias")?;
    let args = Args::new()
        .ptr(y.addr(dev))
        .ptr(bias.addr(dev))
        .i32(int(dev, rows, "rows")?)
        .i32(int(dev, out, "out")?);
    launch(
        dev,
        "add_bias_f32",
        LaunchCfg::elementwise(rows * out),
        args,
    )
}

/// rope.cu `rope_f32`: rotary embedding in place over x `[rows, heads·hd]`,
/// cos/sin `[t, hd/2]`; `inverse` rotates by −θ.
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
    need(dev, x, rows * heads * hd, "rope x")?;
    need(dev, cos, t * hd / 2, "rope cos")?;
    need(dev, sin, t * hd / 2, "rope sin")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(x.addr(dev))
        .ptr(cos.addr(dev))
        .ptr(sin.addr(dev))
        .i32(int(dev, t, "t")?)
        .i32(int(dev, heads, "heads")?)
        .i32(int(dev, hd, "head_dim")?)
        .f32(if inverse { -1.0 } else { 1.0 });
    launch(dev, "rope_f32", LaunchCfg::linear(rows, 128), args)
}

/// Warps per block and rows per tile of attention.cu (`kAttnWarps`, `kTile`)
/// and of attention_decode.cu (`kDecWarps`, `kDecTile`).
const ATTN_WARPS: u32 = 4;
const ATTN_TILE: usize = 32;

fn attn_check<D: Device>(dev: &D, s: AttnShape) -> Result<()> {
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

fn attn_dims<D: Device>(dev: &D, args: Args, s: AttnShape) -> Result<Args> {
    Ok(args
        .i32(int(dev, s.t, "t")?)
        .i32(int(dev, s.heads, "heads")?)
        .i32(int(dev, s.kv_heads, "kv_heads")?)
        .i32(int(dev, s.head_dim, "head_dim")?))
}

/// attention.cu `attention_fwd_f32`: causal GQA attention, `out [rows, H·hd]`,
/// `lse [seqs, H, t]`.
pub fn attention_fwd<D: Device>(
    dev: &D,
    q: &DevBuf<D, f32>,
    k: &DevBuf<D, f32>,
    v: &DevBuf<D, f32>,
    out: &DevBuf<D, f32>,
    lse: &DevBuf<D, f32>,
    s: AttnShape,
) -> Result<()> {
    attn_check(dev, s)?;
    let (rows, hd) = (s.seqs * s.t, s.head_dim);
    need(dev, q, rows * s.heads * hd, "attention q")?;
    need(dev, k, rows * s.kv_heads * hd, "attention k")?;
    need(dev, v, rows * s.kv_heads * hd, "attention v")?;
    need(dev, out, rows * s.heads * hd, "attention out")?;
    need(dev, lse, rows * s.heads, "attention lse")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(q.addr(dev))
        .ptr(k.addr(dev))
        .ptr(v.addr(dev))
        .ptr(out.addr(dev))
        .ptr(lse.addr(dev));
    let shmem = 2 * ATTN_TILE * (hd + 1) + ATTN_WARPS as usize * hd;
    launch(
        dev,
        "attention_fwd_f32",
        attn_cfg(s, s.heads, shmem),
        attn_dims(dev, args, s)?,
    )
}

/// attention.cu `attention_bwd_dq_f32` then `attention_bwd_dkv_f32`: `(dq, dk, dv)`.
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
) -> Result<()> {
    attn_check(dev, s)?;
    let (rows, hd) = (s.seqs * s.t, s.head_dim);
    for (b, what) in [(dout, "dout"), (q, "q"), (out, "out"), (dq, "dq")] {
        need(dev, b, rows * s.heads * hd, what)?;
    }
    for (b, what) in [(k, "k"), (v, "v"), (dk, "dk"), (dv, "dv")] {
        need(dev, b, rows * s.kv_heads * hd, what)?;
    }
    need(dev, lse, rows * s.heads, "attention lse")?;
    if rows == 0 {
        return Ok(());
    }
    let delta = DevBuf::<D, f32>::alloc(dev, rows * s.heads)?;
    let args = Args::new()
        .ptr(dout.addr(dev))
        .ptr(q.addr(dev))
        .ptr(k.addr(dev))
        .ptr(v.addr(dev))
        .ptr(out.addr(dev))
        .ptr(lse.addr(dev))
        .ptr(delta.addr(dev))
        .ptr(dq.addr(dev));
    let shmem = 2 * ATTN_TILE * (hd + 1) + 2 * ATTN_WARPS as usize * hd;
    launch(
        dev,
        "attention_bwd_dq_f32",
        attn_cfg(s, s.heads, shmem),
        attn_dims(dev, args, s)?,
    )?;
    let args = Args::new()
        .ptr(dout.addr(dev))
        .ptr(q.addr(dev))
        .ptr(k.addr(dev))
        .ptr(v.addr(dev))
        .ptr(lse.addr(dev))
        .ptr(delta.addr(dev))
        .ptr(dk.addr(dev))
        .ptr(dv.addr(dev));
    let shmem = 2 * ATTN_TILE * (hd + 1) + 2 * ATTN_WARPS as usize * hd + 2 * ATTN_TILE;
    launch(
        dev,
        "attention_bwd_dkv_f32",
        attn_cfg(s, s.kv_heads, shmem),
        attn_dims(dev, args, s)?,
    )?;
    dev.synchronize() // `delta` is freed on return
}

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
    let longest = pos.iter().max().map_or(0, |p| p + sh.n);
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
) -> Result<()> {
    // pos[s] + n ≤ cap bounds every cache row the kernels touch.
    check_cache_call(pos, sh)?;
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
    need(dev, q, rows * qd, "attention_cached q")?;
    need(dev, k, rows * kvd, "attention_cached k")?;
    need(dev, v, rows * kvd, "attention_cached v")?;
    need(
        dev,
        k_cache,
        sh.seqs * sh.cap * kvd,
        "attention_cached k_cache",
    )?;
    need(
        dev,
        v_cache,
        sh.seqs * sh.cap * kvd,
        "attention_cached v_cache",
    )?;
    need(dev, out, rows * qd, "attention_cached out")?;
    if rows == 0 {
        return Ok(());
    }
    let positions = pos
        .iter()
        .map(|&p| int(dev, p, "cache position"))
        .collect::<Result<Vec<i32>>>()?;
    let pos_dev = DevBuf::upload(dev, &positions)?;
    let (n, cap) = (int(dev, sh.n, "n")?, int(dev, sh.cap, "cap")?);
    let (heads, hd_i) = (int(dev, sh.heads, "heads")?, int(dev, hd, "head_dim")?);
    let args = Args::new()
        .ptr(k.addr(dev))
        .ptr(v.addr(dev))
        .ptr(k_cache.addr(dev))
        .ptr(v_cache.addr(dev))
        .ptr(pos_dev.addr(dev))
        .i32(n)
        .i32(cap)
        .i32(int(dev, kvd, "kv width")?);
    launch(dev, "kv_append_f32", LaunchCfg::linear(rows, 128), args)?;

    let splits = pos.iter().max().map_or(0, |p| p + sh.n).div_ceil(split);
    let tiles = (sh.heads / sh.kv_heads * sh.n).div_ceil(ATTN_WARPS as usize);
    let cfg = LaunchCfg {
        grid: [
            int(dev, tiles * splits, "decode blocks")? as u32,
            sh.kv_heads as u32,
            sh.seqs as u32,
        ],
        block: [32, ATTN_WARPS, 1],
        shmem: ((2 * ATTN_TILE * (hd + 1) + ATTN_WARPS as usize * hd) * 4) as u32,
    };
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
    let args = Args::new()
        .ptr(q.addr(dev))
        .ptr(k_cache.addr(dev))
        .ptr(v_cache.addr(dev))
        .ptr(pos_dev.addr(dev))
        .ptr(o_part.addr(dev))
        .ptr(lse.addr(dev))
        .i32(n)
        .i32(cap)
        .i32(heads)
        .i32(int(dev, sh.kv_heads, "kv_heads")?)
        .i32(hd_i)
        .i32(int(dev, split, "split")?);
    launch(dev, "attention_decode_f32", cfg, args)?;
    if let Some(part) = &part {
        let args = Args::new()
            .ptr(part.addr(dev))
            .ptr(lse.addr(dev))
            .ptr(pos_dev.addr(dev))
            .ptr(out.addr(dev))
            .i32(n)
            .i32(heads)
            .i32(hd_i)
            .i32(int(dev, splits, "splits")?)
            .i32(int(dev, split, "split")?);
        let cfg = LaunchCfg {
            grid: [int(dev, rows, "rows")? as u32, sh.heads as u32, 1],
            block: [hd.next_multiple_of(32) as u32, 1, 1],
            shmem: 0,
        };
        launch(dev, "attention_decode_combine_f32", cfg, args)?;
    }
    dev.synchronize() // `pos_dev` and the partials are freed on return
}

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
    need(dev, logits, rows * vc, "ce logits")?;
    for (b, what) in [(m, "ce m"), (s, "ce s"), (tgt, "ce tgt")] {
        need(dev, b, rows, what)?;
    }
    need(dev, targets, rows, "ce targets")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(logits.addr(dev))
        .ptr(targets.addr(dev))
        .ptr(m.addr(dev))
        .ptr(s.addr(dev))
        .ptr(tgt.addr(dev))
        .i32(int(dev, vc, "vocab chunk")?)
        .i32(int(dev, v0, "vocab offset")?);
    launch(dev, "ce_stats_f32", LaunchCfg::linear(rows, 256), args)
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
    need(dev, logits, rows * vc, "ce logits")?;
    need(dev, m, rows, "ce m")?;
    need(dev, s, rows, "ce s")?;
    need(dev, targets, rows, "ce targets")?;
    if rows == 0 {
        return Ok(());
    }
    let args = Args::new()
        .ptr(logits.addr(dev))
        .ptr(targets.addr(dev))
        .ptr(m.addr(dev))
        .ptr(s.addr(dev))
        .i32(int(dev, vc, "vocab chunk")?)
        .i32(int(dev, v0, "vocab offset")?)
        .f32(scale);
    launch(dev, "ce_grad_f32", LaunchCfg::linear(rows, 256), args)
}
