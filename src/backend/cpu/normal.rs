//! The refit's normal equations on the host (`Backend::normal_equations`,
//! METHODS.md section 9): the kept columns of h and the target widened to
//! f64, then two f64 products (`gemm` crate).
use super::matmul::parallelism;
use crate::backend::NormalEquations;
use crate::{Error, Result};
use rayon::prelude::*;

/// `G = h_Kᵀ h_K`, `C = h_Kᵀ r`, `‖r‖²` with `r = y − y_sub` (see
/// `Backend::normal_equations`). h `[rows, m]`, y and y_sub `[rows, d]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn normal_equations(
    h: &[f32],
    keep: &[usize],
    ones: bool,
    y: &[f32],
    y_sub: Option<&[f32]>,
    rows: usize,
    m: usize,
    d: usize,
    threads: usize,
) -> Result<NormalEquations> {
    let short = |what: &str, len: usize, need: usize| {
        Error::Invalid(format!(
            "normal_equations: {what} has {len} values, the shape needs {need}"
        ))
    };
    if h.len() < rows * m {
        return Err(short("h", h.len(), rows * m));
    }
    if let Some(r) = [Some(y), y_sub]
        .into_iter()
        .flatten()
        .find(|r| r.len() < rows * d)
    {
        return Err(short("the target", r.len(), rows * d));
    }
    if let Some(&c) = keep.iter().find(|&&c| c >= m) {
        return Err(Error::Invalid(format!(
            "normal_equations: kept channel {c} out of range (< {m})"
        )));
    }
    let k = keep.len() + usize::from(ones);
    // h_K [rows, k] and r [rows, d] in f64.
    let mut hk = vec![0f64; rows * k];
    hk.par_chunks_mut(k.max(1))
        .zip(h.par_chunks(m.max(1)))
        .for_each(|(dst, src)| {
            for (o, &c) in dst.iter_mut().zip(keep) {
                *o = src[c] as f64;
            }
            if ones {
                dst[k - 1] = 1.0;
            }
        });
    let mut r: Vec<f64> = y[..rows * d].iter().map(|&v| v as f64).collect();
    if let Some(s) = y_sub {
        r.iter_mut().zip(s).for_each(|(a, &b)| *a -= b as f64);
    }
    let rr = r.iter().map(|v| v * v).sum();
    let mut out = NormalEquations::zeros(k, d);
    if rows == 0 || k == 0 {
        out.rr = rr;
        return Ok(out);
    }
    let par = parallelism(threads);
    // dst[i, j] = Σ_t lhs[i, t]·rhs[t, j] with lhs = h_Kᵀ (element (i, t) at
    // hk[t·k + i]) and rhs = h_K or r, all row-major.
    // SAFETY: every view lies inside its buffer: lhs and rhs have `rows`
    // rows of k (or d) values, dst k rows of k (or d).
    unsafe {
        for (dst, rhs, n) in [(&mut out.g, &hk, k), (&mut out.c, &r, d)] {
            gemm::gemm(
                k,
                n,
                rows,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                hk.as_ptr(),
                k as isize,
                1,
                rhs.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
    out.rr = rr;
    Ok(out)
}
