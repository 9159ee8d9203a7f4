//! Device memory plan of a refit (METHODS.md §9) on the CUDA backend: the
//! allocation sequence of `prune::refit::refit` replayed on the same
//! counter as a scoring run (see the parent module), to the byte.
//!
//! Held for the whole refit: the pruned residual stream x' of every window
//! (and for `residual` the dense stream x), N·T·d·4 bytes each. Per layer:
//! x' + Attn and h of every window (N·T·(d + m)·4), one batch's layer
//! activations, and while one batch's normal equations are formed, h_K and
//! the target in f64 (rows·(k' + d)·8) with G and C (k'·(k' + d)·8); after
//! the solve, the refitted down_proj as a bf16 weight.
use super::{
    check_size, finish, layer_acts, layer_forward, load_weights, rope_tables, Dims, Plan, Sim,
};
use super::{BF16, F32, F64, U32};
use crate::model::ModelConfig;
use crate::{Error, Result};

/// What is planned: a refit over `samples` windows of `t` tokens, `batch`
/// windows per pass, keeping `kept[l]` channels of layer l.
#[derive(Clone, Debug)]
pub struct RefitPlanSpec {
    pub t: usize,
    pub samples: usize,
    pub batch: usize,
    /// Target `residual` (a dense stream too) rather than `layer`.
    pub residual: bool,
    /// The bias column (k' = k + 1).
    pub bias: bool,
    /// Kept channels per layer; every channel is the upper bound.
    pub kept: Vec<usize>,
    /// Two layers' weights on the device instead of all of them.
    pub stream: bool,
}

/// The plan of `spec`'s refit on `cfg`.
pub fn plan_refit(cfg: &ModelConfig, spec: &RefitPlanSpec) -> Result<Plan> {
    if spec.t < 2 || spec.samples == 0 || spec.batch == 0 || spec.kept.len() != cfg.layers {
        return Err(Error::Invalid(format!(
            "plan: a refit needs T ≥ 2, windows, a batch and one kept width per layer \
             (T = {}, {} windows, batch {}, {} widths for {} layers)",
            spec.t,
            spec.samples,
            spec.batch,
            spec.kept.len(),
            cfg.layers
        )));
    }
    check_size(cfg, spec.samples, spec.t)?;
    if let Some((l, &k)) = (spec.kept.iter().enumerate()).find(|&(l, &k)| k > cfg.ffn_widths[l]) {
        return Err(Error::Invalid(format!(
            "plan: layer {l} keeps {k} of {} channels",
            cfg.ffn_widths[l]
        )));
    }
    // G and C of the widest layer, in u128 (the kept widths are at most the
    // layer widths, which `check_size` bounded).
    let widest = spec.kept.iter().max().copied().unwrap_or(0) as u128 + 1;
    if 8 * widest * (widest + cfg.hidden as u128) >= 1 << 62 {
        return Err(Error::Invalid(
            "plan: the refit's normal equations would need more than 2^62 bytes".into(),
        ));
    }
    let batches: Vec<Dims> = (0..spec.samples)
        .step_by(spec.batch)
        .map(|s0| Dims::new(cfg, spec.batch.min(spec.samples - s0), spec.t))
        .collect();
    let d = cfg.hidden;
    let mut s = Sim::default();
    let weight_bytes = load_weights(&mut s, cfg, spec.stream, false);

    s.begin("refit");
    let rope = rope_tables(&mut s, cfg.two_rope_bases(), spec.t, cfg.head_dim);
    let embed = |s: &mut Sim, g: &Dims, name| s.embed(g.rows, d, name);
    let mut pruned: Vec<usize> = batches
        .iter()
        .map(|g| embed(&mut s, g, "pruned residual x'"))
        .collect();
    let mut dense: Vec<usize> = match spec.residual {
        true => batches
            .iter()
            .map(|g| embed(&mut s, g, "dense residual x"))
            .collect(),
        false => Vec::new(),
    };
    s.each_layer(0..cfg.layers, |s, l| {
        let (m, k) = (cfg.ffn_widths[l], spec.kept[l]);
        let kk = k + usize::from(spec.bias);
        let mut held = Vec::with_capacity(batches.len());
        for (i, g) in batches.iter().enumerate() {
            let super::Acts(acts) = layer_acts(s, g, m);
            let y = match spec.residual {
                true => layer_forward(s, g, m, "dense residual x", false).0,
                false => s.linear("target W_d h", g.rows * m, g.rows, d),
            };
            // `CudaBackend::normal_equations`.
            let hk = s.alloc("refit: h_K in f64", F64, &[g.rows, kk]);
            let idx = s.alloc("kept channel indices", U32, &[k]);
            s.free(idx);
            let r = s.alloc("refit: target in f64", F64, &[g.rows, d]);
            let gram = s.alloc("refit: G", F64, &[kk, kk]);
            let cross = s.alloc("refit: C", F64, &[kk, d]);
            let rr = s.alloc("refit: row energies", F64, &[g.rows]);
            s.free_all(&[hk, r, gram, cross, rr]);
            match spec.residual {
                true => s.free(std::mem::replace(&mut dense[i], y)),
                false => s.free(y),
            }
            // x' + Attn and h stay for advancing x'; the rest is dropped.
            let (mid, h) = (acts[6], acts[10]);
            let rest: Vec<usize> = acts.into_iter().filter(|&a| a != mid && a != h).collect();
            s.free_all(&rest);
            held.push((mid, h));
        }
        // The refitted down_proj (full width, zero at removed channels).
        let w = s.alloc("refitted down_proj", BF16, &[d, m]);
        let b = spec
            .bias
            .then(|| s.alloc("refitted down_proj bias", BF16, &[d]));
        for (i, (mid, h)) in held.into_iter().enumerate() {
            let rows = batches[i].rows;
            let mut y = s.linear("refitted FFN output", rows * m, rows, d);
            if cfg.sandwich_norms {
                // Gemma 3's post-FFN norm of it.
                let yn = s.alloc("refitted FFN output, normalised", F32, &[rows, d]);
                let rstd = s.alloc("rstd (post-FFN norm)", F32, &[rows]);
                s.free_all(&[y, rstd]);
                y = yn;
            }
            s.free(std::mem::replace(&mut pruned[i], mid));
            s.free_all(&[y, h]);
        }
        s.free(w);
        if let Some(b) = b {
            s.free(b);
        }
    });
    s.free_all(&pruned);
    s.free_all(&dense);
    s.free_all(&rope);
    let objective = match (spec.residual, spec.bias) {
        (false, false) => "refit layer",
        (false, true) => "refit layer+bias",
        (true, false) => "refit residual",
        (true, true) => "refit residual+bias",
    };
    let run = (spec.t, spec.samples, vec![objective], spec.stream);
    Ok(finish(s, cfg, run, weight_bytes))
}
