//! Matrix products on the CPU through the `gemm` crate (AVX-512 kernels
//! with its `x86-v4` feature), all row-major f32.
use gemm::Parallelism;

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

impl Mat {
    /// Row-major matrix with `cols` columns.
    pub fn rows(data: &[f32], cols: usize) -> Self {
        Mat {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
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
    let mut y = vec![0f32; rows * out];
    // SAFETY: shapes asserted above; y is a fresh buffer.
    unsafe {
        gemm_into(
            rows,
            out,
            inp,
            y.as_mut_ptr(),
            out,
            Mat::rows(x, inp),
            Mat::rows_t(w, inp),
            1.0,
            false,
            parallelism(threads),
        )
    };
    y
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
    let mut dx = vec![0f32; rows * inp];
    // SAFETY: shapes asserted above; dx is a fresh buffer.
    unsafe {
        gemm_into(
            rows,
            inp,
            out,
            dx.as_mut_ptr(),
            inp,
            Mat::rows(dy, out),
            Mat::rows(w, inp),
            1.0,
            false,
            parallelism(threads),
        )
    };
    dx
}
