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
    let k = s.scalars();
    p.par_iter_mut()
        .zip(g.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let g = g * k.grad_scale;
            *p *= k.decay;
            *m += k.one_minus_beta1 * (g - *m);
            *v = *v * k.beta2 + k.one_minus_beta2 * g * g;
            let denom = v.sqrt() / k.bc2_sqrt + k.eps;
            *p -= k.step_size * (*m / denom);
        });
}
