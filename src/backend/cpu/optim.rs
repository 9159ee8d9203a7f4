//! The optimiser's elementwise ops on the CPU: the gradient's squared
//! norm and the AdamW update (METHODS.md section 10).
use crate::backend::AdamwStep;
use rayon::prelude::*;

/// `Σ x²`, accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// One AdamW update in place, in torch.optim.AdamW's order of operations
/// (`AdamwStep`), every value in f32.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamwStep) {
    let (step_size, bc2_sqrt) = s.corrections();
    let decay = 1.0 - s.lr * s.weight_decay;
    let (one_b1, one_b2) = (1.0 - s.beta1, 1.0 - s.beta2);
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * s.grad_scale;
            *p *= decay;
            *m += one_b1 * (g - *m);
            *v = *v * s.beta2 + one_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + s.eps;
            *p -= step_size * (*m / denom);
        });
}
