//! Cross-entropy over the vocabulary on the CPU, in row chunks so that only
//! `[CHUNK, vocab]` logits exist at a time.
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
