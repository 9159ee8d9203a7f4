//! The losses over the vocabulary on the CPU (cross-entropy, and the
//! distillation KL), in row chunks so that only `[CHUNK, vocab]` logits
//! exist at a time.
use super::matmul::{matmul_w, matmul_wt};
use rayon::prelude::*;

/// Rows of logits materialised at once.
const CHUNK: usize = 64;

/// For each row r with `targets[r] != u32::MAX`:
/// `nll_r = logsumexp(z_r·Wᵀ) − (z_r·Wᵀ)[target]`. Returns `(Σ nll, count, dz)`,
/// `dz_r = scale·(softmax(z_r·Wᵀ) − onehot(target))·W`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    z: &[f32],
    w: &[f32],
    targets: &[u32],
    d: usize,
    vocab: usize,
    scale: f32,
    want_grad: bool,
    threads: usize,
) -> (f64, usize, Option<Vec<f32>>) {
    let rows = targets.len();
    let mut total = 0f64;
    let mut count = 0usize;
    let mut dz = if want_grad {
        Some(vec![0f32; rows * d])
    } else {
        None
    };
    for r0 in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - r0);
        let mut logits = matmul_wt(&z[r0 * d..(r0 + n) * d], w, n, d, vocab, threads);
        let per_row: Vec<(f64, bool)> = logits
            .par_chunks_mut(vocab)
            .zip(&targets[r0..r0 + n])
            .map(|(row, &tg)| {
                if tg == u32::MAX {
                    row.fill(0.0);
                    return (0.0, false);
                }
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
                let lse = max as f64 + sum.ln();
                let nll = lse - row[tg as usize] as f64;
                if want_grad {
                    for x in row.iter_mut() {
                        *x = (((*x as f64) - lse).exp() as f32) * scale;
                    }
                    row[tg as usize] -= scale;
                }
                (nll, true)
            })
            .collect();
        for (nll, used) in per_row {
            if used {
                total += nll;
                count += 1;
            }
        }
        if let Some(dz) = dz.as_mut() {
            let g = matmul_w(&logits, w, n, d, vocab, threads);
            dz[r0 * d..(r0 + n) * d].copy_from_slice(&g);
        }
    }
    (total, count, dz)
}

/// `log Σ_v exp(row_v)`, accumulated in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    max as f64
        + row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln()
}

/// For each row r with `counted[r]`, with student logits `l = z_r·Wᵀ` and
/// teacher logits `lt = zt_r·Wtᵀ`: `KL_r = Σ_v p_t(v)·(log p_t(v) − log p_s(v))`.
/// Returns `(Σ KL_r, count, dz)`, `dz_r = scale·(p_s − p_t)·W` (0 for rows
/// not counted).
#[allow(clippy::too_many_arguments)]
pub fn kl_div(
    z: &[f32],
    w: &[f32],
    z_teacher: &[f32],
    w_teacher: &[f32],
    counted: &[bool],
    d: usize,
    vocab: usize,
    scale: f32,
    want_grad: bool,
    threads: usize,
) -> (f64, usize, Option<Vec<f32>>) {
    let rows = counted.len();
    let mut total = 0f64;
    let mut count = 0usize;
    let mut dz = want_grad.then(|| vec![0f32; rows * d]);
    for r0 in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - r0);
        let mut logits = matmul_wt(&z[r0 * d..(r0 + n) * d], w, n, d, vocab, threads);
        let teacher = matmul_wt(
            &z_teacher[r0 * d..(r0 + n) * d],
            w_teacher,
            n,
            d,
            vocab,
            threads,
        );
        let per_row: Vec<Option<f64>> = logits
            .par_chunks_mut(vocab)
            .zip(teacher.par_chunks(vocab))
            .zip(&counted[r0..r0 + n])
            .map(|((row, row_t), &used)| {
                if !used {
                    row.fill(0.0);
                    return None;
                }
                let (lse, lse_t) = (log_sum_exp(row), log_sum_exp(row_t));
                let mut kl = 0f64;
                for (x, &xt) in row.iter_mut().zip(row_t) {
                    let log_ps = *x as f64 - lse;
                    let log_pt = xt as f64 - lse_t;
                    let pt = log_pt.exp();
                    kl += pt * (log_pt - log_ps);
                    if want_grad {
                        *x = ((log_ps.exp() - pt) as f32) * scale;
                    }
                }
                Some(kl)
            })
            .collect();
        for kl in per_row.into_iter().flatten() {
            total += kl;
            count += 1;
        }
        if let Some(dz) = dz.as_mut() {
            let g = matmul_w(&logits, w, n, d, vocab, threads);
            dz[r0 * d..(r0 + n) * d].copy_from_slice(&g);
        }
    }
    (total, count, dz)
}
