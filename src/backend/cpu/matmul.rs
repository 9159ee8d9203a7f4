//! Matrix products on the CPU, all row-major f32: the `gemm` crate
//! (AVX-512 kernels with its `x86-v4` feature) for real matrices, and a
//! streaming kernel for products with only a few rows (decoding steps).
use super::blocks::PackedBlocks;
use super::mem::written_by;
use super::simd::{self, Isa};
use crate::backend::MatMul;
use crate::quant::BLOCK_LEN;
use gemm::Parallelism;
use rayon::prelude::*;

/// How many threads a product may use; 1 inside already-parallel loops.
pub fn parallelism(threads: usize) -> Parallelism {
    if threads <= 1 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    }
}

/// A strided matrix view: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a read-only view; whoever passes it to `gemm_into` vouches that
// it is valid, and threads may read the same matrix at once.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// Row-major matrix with `cols` columns.
    pub fn rows(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The view of columns `lo..` (a method, so that closures capture the
    /// whole Sync view rather than its raw-pointer field).
    ///
    /// # Safety
    /// Column `lo` must lie inside the viewed matrix.
    pub unsafe fn cols_from(self, lo: usize) -> Self {
        Mat {
            ptr: self.ptr.offset(lo as isize * self.cs),
            ..self
        }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// `dst[m,n] (row stride dst_rs) = beta·lhs[m,k]·rhs[k,n] (+ dst if accumulate)`.
///
/// # Safety
/// The views must cover `m×k` and `k×n` valid elements, `dst` must cover
/// `m` rows of `n` elements at stride `dst_rs`, and `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        1.0,
        beta,
        false,
        false,
        false,
        par,
    );
}

/// Column blocks of `gemm_fresh`'s own split start at multiples of this.
const COL_ALIGN: usize = 16;

/// `lhs[m,k]·rhs[k,n]` into a fresh row-major `[m, n]` buffer, on up to
/// `threads` threads. When k ≥ n, each thread runs a single-threaded gemm
/// over its own block of the n columns (its own packing, no synchronisation
/// between threads), which measured 2–37% faster here than gemm's own
/// threading on such shapes (down_proj 1536→576 at 512 rows: 297 against
/// 216 GFLOP/s, medians of 5) and not faster when k < n, where gemm's
/// threading is kept (the lm_head 576→49152: 227 against 259).
fn gemm_fresh(m: usize, n: usize, k: usize, lhs: Mat, rhs: Mat, threads: usize) -> Vec<f32> {
    // SAFETY (both branches): the callers' views cover m×k and k×n values;
    // gemm writes all m×n values of the fresh buffer, the column blocks
    // disjoint parts of it.
    unsafe {
        written_by(m * n, |dst| {
            if threads > 1 && k >= n && n >= 2 * COL_ALIGN {
                let per = n.div_ceil(threads).next_multiple_of(COL_ALIGN);
                let dst = dst as usize; // Send, unlike the pointer
                (0..n.div_ceil(per)).into_par_iter().for_each(|b| {
                    let (lo, hi) = (b * per, ((b + 1) * per).min(n));
                    let rhs = rhs.cols_from(lo);
                    let dst = (dst as *mut f32).add(lo);
                    gemm_into(
                        m,
                        hi - lo,
                        k,
                        dst,
                        n,
                        lhs,
                        rhs,
                        1.0,
                        false,
                        Parallelism::None,
                    )
                });
            } else {
                gemm_into(m, n, k, dst, n, lhs, rhs, 1.0, false, parallelism(threads))
            }
        })
    }
}

/// `y[rows,out] = x[rows,inp] · W[out,inp]ᵀ`.
pub fn matmul_wt(
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    threads: usize,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * inp);
    assert_eq!(w.len(), out * inp);
    gemm_fresh(
        rows,
        out,
        inp,
        Mat::rows(x, inp),
        Mat::rows_t(w, inp),
        threads,
    )
}

/// `dx[rows,inp] = dy[rows,out] · W[out,inp]`.
pub fn matmul_w(
    dy: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    threads: usize,
) -> Vec<f32> {
    assert_eq!(dy.len(), rows * out);
    assert_eq!(w.len(), out * inp);
    gemm_fresh(
        rows,
        inp,
        out,
        Mat::rows(dy, out),
        Mat::rows(w, inp),
        threads,
    )
}

/// `Backend::matmul` on host buffers: `c = alpha·op(a)·op(b) + beta·c`
/// (row-major; shapes as `MatMul` says, checked by the caller).
pub fn matmul_f32(a: &[f32], b: &[f32], c: &mut [f32], mm: MatMul, threads: usize) {
    let lhs = if mm.trans_a {
        Mat::rows_t(a, mm.m)
    } else {
        Mat::rows(a, mm.k)
    };
    let rhs = if mm.trans_b {
        Mat::rows_t(b, mm.k)
    } else {
        Mat::rows(b, mm.n)
    };
    // SAFETY: the caller checked a, b and c against the shape (`MatMul::check`);
    // c is borrowed mutably, so it aliases neither input.
    unsafe {
        // gemm's convention is dst = alpha·dst + beta·lhs·rhs.
        gemm::gemm(
            mm.m,
            mm.n,
            mm.k,
            c.as_mut_ptr(),
            1,
            mm.n as isize,
            mm.beta != 0.0,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            mm.beta,
            mm.alpha,
            false,
            false,
            false,
            parallelism(threads),
        )
    }
}

/// Up to this many rows, `y = x·Wᵀ` takes the skinny path (`matvec_wt`):
/// a decoding step is memory-bound on reading W, which gemm would first
/// pack; streaming W once with every x row dotted against each block of W
/// rows while it is in L1 reads each weight exactly once. Measured here at
/// 6 rows: 157 against 238 µs (576→1536), 147 against 389 µs (1536→576);
/// the skinny path stays ahead up to about 12 rows, but tests/cpu_ops.rs
/// runs 7 rows as its gemm case.
pub const SKINNY_ROWS: usize = 6;

/// Bytes of W per parallel task of `matvec_many`: big enough that a task
/// costs far more than scheduling it, small enough to balance two threads.
const MATVEC_TASK_BYTES: usize = 96 * 1024;

/// `y[rows,out] = x[rows,inp] · W[out,inp]ᵀ` for a few rows (`matvec_many`
/// with one weight).
pub fn matvec_wt(
    x: &[f32],
    w: FewRowWeight<'_>,
    rows: usize,
    inp: usize,
    out: usize,
    threads: usize,
) -> Vec<f32> {
    let [y] = matvec_many(x, [(w, out)], rows, inp, threads);
    y
}

/// A W `[out, inp]` as the few-row products read it.
#[derive(Clone, Copy)]
pub enum FewRowWeight<'a> {
    F32(&'a [f32]),
    /// ggml blocks that dequantise to W (`blocks`); `inp` a multiple of 32.
    Blocks(&'a PackedBlocks),
}

impl FewRowWeight<'_> {
    /// Bytes read per row of W.
    fn row_bytes(&self, inp: usize) -> usize {
        match self {
            Self::F32(_) => 4 * inp,
            Self::Blocks(b) => inp / BLOCK_LEN * b.block_bytes(),
        }
    }
}

/// `y_i[rows,out_i] = x[rows,inp] · W_i[out_i,inp]ᵀ` for each `(W_i, out_i)`
/// of `ws`, for a few rows. Each W is read once (f32 W four of its rows at
/// a time, `simd::dot4`; block W one row at a time, `PackedBlocks::rows_dot`),
/// by tasks over contiguous row ranges; the tasks of all the products share
/// one parallel pass, so that products too small to keep every core busy
/// alone (a layer's k and v) run together.
pub fn matvec_many<const N: usize>(
    x: &[f32],
    ws: [(FewRowWeight<'_>, usize); N],
    rows: usize,
    inp: usize,
    threads: usize,
) -> [Vec<f32>; N] {
    assert_eq!(x.len(), rows * inp);
    for (w, out) in ws {
        match w {
            FewRowWeight::F32(w) => assert_eq!(w.len(), out * inp),
            FewRowWeight::Blocks(b) => assert_eq!(b.n_blocks() * BLOCK_LEN, out * inp),
        }
    }
    let isa = Isa::get();
    // yt_i is y_iᵀ, [out_i, rows]: each task owns a contiguous range of one.
    let mut yts: [Vec<f32>; N] = ws.map(|(_, out)| vec![0f32; out * rows]);
    let mut tasks: Vec<(FewRowWeight, usize, &mut [f32])> = Vec::new();
    for ((w, _), yt) in ws.into_iter().zip(yts.iter_mut()) {
        // Output rows of W per task, a multiple of the 4-row block.
        let per = (MATVEC_TASK_BYTES / w.row_bytes(inp).max(1))
            .max(1)
            .next_multiple_of(4);
        for (ti, yc) in yt.chunks_mut(per * rows).enumerate() {
            tasks.push((w, ti * per, yc));
        }
    }
    let task = |(w, o0, yc): (FewRowWeight, usize, &mut [f32])| {
        let w = match w {
            FewRowWeight::F32(w) => w,
            FewRowWeight::Blocks(b) => return b.rows_dot(isa, x, rows, inp, o0, yc),
        };
        let n_o = yc.len() / rows;
        let mut o = 0;
        while o + 4 <= n_o {
            let wb = &w[(o0 + o) * inp..(o0 + o + 4) * inp];
            for r in 0..rows {
                let d = simd::dot4(isa, &x[r * inp..(r + 1) * inp], wb, inp);
                for (j, v) in d.into_iter().enumerate() {
                    yc[(o + j) * rows + r] = v;
                }
            }
            o += 4;
        }
        for o in o..n_o {
            let wr = &w[(o0 + o) * inp..(o0 + o + 1) * inp];
            for r in 0..rows {
                yc[o * rows + r] = simd::dot(isa, &x[r * inp..(r + 1) * inp], wr);
            }
        }
    };
    if threads <= 1 || tasks.len() <= 1 {
        tasks.into_iter().for_each(task);
    } else {
        tasks.into_par_iter().for_each(task);
    }
    if rows == 1 {
        return yts;
    }
    yts.map(|yt| {
        let out = yt.len() / rows;
        let mut y = vec![0f32; rows * out];
        for (o, col) in yt.chunks(rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * out + o] = v;
            }
        }
        y
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_split_by_columns_match_a_plain_loop() {
        let mut s = 11u64;
        let mut rnd = |n: usize| {
            s += 1;
            super::super::test_values(n, -1.0, 1.0, s)
        };
        // inp ≥ out splits y = x·Wᵀ by columns, out ≥ inp splits dx = dy·W;
        // three threads leave a ragged last block.
        for (rows, inp, out) in [(37, 131, 50), (9, 20, 70), (5, 33, 33)] {
            let (x, w, dy) = (rnd(rows * inp), rnd(out * inp), rnd(rows * out));
            for threads in [1, 2, 3] {
                let y = matmul_wt(&x, &w, rows, inp, out, threads);
                let dx = matmul_w(&dy, &w, rows, inp, out, threads);
                for r in 0..rows {
                    for o in 0..out {
                        let want: f64 = (0..inp)
                            .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                            .sum();
                        let got = y[r * out + o] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "y");
                    }
                    for i in 0..inp {
                        let want: f64 = (0..out)
                            .map(|o| dy[r * out + o] as f64 * w[o * inp + i] as f64)
                            .sum();
                        let got = dx[r * inp + i] as f64;
                        assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "dx");
                    }
                }
            }
        }
    }

    #[test]
    fn matvec_matches_a_plain_loop() {
        let mut s = 7u64;
        let mut rnd = |n: usize| {
            s += 1;
            super::super::test_values(n, -1.0, 1.0, s)
        };
        // Widths around the vector and block sizes, and a W big enough to
        // be split into several parallel tasks with a ragged last one.
        for (inp, out) in [
            (1, 1),
            (17, 3),
            (33, 9),
            (131, 37),
            (577, 203),
            (1000, 7001),
        ] {
            for rows in 1..=SKINNY_ROWS {
                let (x, w) = (rnd(rows * inp), rnd(out * inp));
                // A second product sharing the pass gives what it gives alone.
                let w2 = rnd(5 * inp);
                let (fw, fw2) = (FewRowWeight::F32(&w), FewRowWeight::F32(&w2));
                let [_, y2] = matvec_many(&x, [(fw, out), (fw2, 5)], rows, inp, 2);
                assert_eq!(y2, matvec_wt(&x, fw2, rows, inp, 5, 1));
                for threads in [1, 2] {
                    let y = matvec_wt(&x, fw, rows, inp, out, threads);
                    for r in 0..rows {
                        for o in 0..out {
                            let want: f64 = (0..inp)
                                .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                                .sum();
                            let got = y[r * out + o] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{rows}x{inp}x{out} t{threads} [{r},{o}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Block weights split into several parallel tasks (a ragged last one,
    /// each from its own row offset) give what their f32 values give.
    #[test]
    fn block_matvec_across_tasks_matches_f32() {
        use crate::quant::BlockKind;
        let (inp, out) = (1024, 701); // 768-byte Q4_1 rows: 128 per task, 6 tasks
        for kind in [BlockKind::Q4_1, BlockKind::Q8_0] {
            let (packed, w) = super::super::blocks::random_packed(kind, out, inp, 5);
            for rows in 1..=super::super::blocks::BLOCK_ROWS {
                let x = super::super::test_values(rows * inp, -1.0, 1.0, rows as u64);
                let want = matvec_wt(&x, FewRowWeight::F32(&w), rows, inp, out, 1);
                // Σ|x·w| per output: the scale of the summation-order error.
                let (ax, aw): (Vec<f32>, Vec<f32>) = (
                    x.iter().map(|v| v.abs()).collect(),
                    w.iter().map(|v| v.abs()).collect(),
                );
                let scale = matvec_wt(&ax, FewRowWeight::F32(&aw), rows, inp, out, 1);
                for threads in [1, 2] {
                    let got = matvec_wt(&x, FewRowWeight::Blocks(&packed), rows, inp, out, threads);
                    for ((g, v), s) in got.iter().zip(&want).zip(&scale) {
                        assert!(
                            (g - v).abs() <= 1e-5 * s,
                            "{kind:?} {rows} rows: {g} vs {v} (scale {s})"
                        );
                    }
                }
            }
        }
    }
}
