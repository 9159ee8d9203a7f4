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
//!
//! Layer-major (`refit --layer-major`): the streams wait on the host, so
//! the device holds one pass's stream (uploaded from the host) and that
//! pass's layer buffers at a time; the activations are recomputed after the
//! solve instead of held, so no pass's x' + Attn and h outlive it.
use super::{
    check_size, finish, layer_acts, layer_forward, load_weights, rope_tables, Dims, Id,
    LayerMajorPlan, Plan, Sim,
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
    /// The residual streams on the host between layers (`--layer-major`).
    pub layer_major: bool,
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
    match spec.layer_major {
        false => resident_streams(&mut s, cfg, spec, &batches),
        true => host_streams(&mut s, cfg, spec, &batches),
    }
    s.free_all(&rope);
    let objective = match (spec.residual, spec.bias) {
        (false, false) => "refit layer",
        (false, true) => "refit layer+bias",
        (true, false) => "refit residual",
        (true, true) => "refit residual+bias",
    };
    let run = (spec.t, spec.samples, vec![objective], spec.stream);
    let streams = 1 + usize::from(spec.residual);
    Ok(Plan {
        layer_major: spec.layer_major.then(|| LayerMajorPlan {
            batches: batches.len(),
            host_bytes: (streams * spec.samples * spec.t * d * 4) as u64,
            uploads: cfg.layers,
        }),
        ..finish(s, cfg, run, weight_bytes)
    })
}

/// `refit_sequences` without `layer_major`: every pass's streams stay on
/// the device, and each pass's x' + Attn and h from the equations are held
/// until x' advances.
fn resident_streams(s: &mut Sim, cfg: &ModelConfig, spec: &RefitPlanSpec, batches: &[Dims]) {
    let d = cfg.hidden;
    let embed = |s: &mut Sim, g: &Dims, name| s.embed(g.rows, d, name);
    let mut pruned: Vec<Id> = batches
        .iter()
        .map(|g| embed(s, g, "pruned residual x'"))
        .collect();
    let mut dense: Vec<Id> = match spec.residual {
        true => batches
            .iter()
            .map(|g| embed(s, g, "dense residual x"))
            .collect(),
        false => Vec::new(),
    };
    s.each_layer(0..cfg.layers, |s, l| {
        let (m, k) = (cfg.ffn_widths[l], spec.kept[l]);
        let mut held = Vec::with_capacity(batches.len());
        for (i, g) in batches.iter().enumerate() {
            let super::Acts(acts) = layer_acts(s, g, m);
            let y = match spec.residual {
                true => layer_forward(s, g, m, "dense residual x", false).0,
                false => s.linear("target W_d h", g.rows * m, g.rows, d),
            };
            normal_equations(s, g, k, spec.bias, d);
            match spec.residual {
                true => s.free(std::mem::replace(&mut dense[i], y)),
                false => s.free(y),
            }
            // x' + Attn and h stay for advancing x'; the rest is dropped.
            let (mid, h) = (acts[6], acts[10]);
            let rest: Vec<Id> = acts.into_iter().filter(|&a| a != mid && a != h).collect();
            s.free_all(&rest);
            held.push((mid, h));
        }
        let refitted = refitted_weights(s, cfg, spec.bias, m);
        for (i, (mid, h)) in held.into_iter().enumerate() {
            let y = refitted_output(s, cfg, batches[i].rows, m);
            s.free(std::mem::replace(&mut pruned[i], mid));
            s.free_all(&[y, h]);
        }
        s.free_all(&refitted);
    });
    s.free_all(&pruned);
    s.free_all(&dense);
}

/// `refit_sequences` with `layer_major`: each stream is uploaded from the
/// host when a pass needs it and goes back after; the activations are
/// recomputed from x' after the solve.
fn host_streams(s: &mut Sim, cfg: &ModelConfig, spec: &RefitPlanSpec, batches: &[Dims]) {
    let d = cfg.hidden;
    let streams = 1 + usize::from(spec.residual);
    for g in (0..streams).flat_map(|_| batches) {
        let x = s.embed(g.rows, d, "residual x (one pass)");
        s.free(x); // to the host
    }
    let load =
        |s: &mut Sim, g: &Dims| s.alloc("residual x (one pass, from the host)", F32, &[g.rows, d]);
    s.each_layer(0..cfg.layers, |s, l| {
        let (m, k) = (cfg.ffn_widths[l], spec.kept[l]);
        for g in batches {
            let x = load(s, g);
            let super::Acts(acts) = layer_acts(s, g, m);
            s.free(x);
            let y = match spec.residual {
                true => {
                    let x = load(s, g);
                    let y = layer_forward(s, g, m, "dense residual x", false).0;
                    s.free(x);
                    y
                }
                false => s.linear("target W_d h", g.rows * m, g.rows, d),
            };
            normal_equations(s, g, k, spec.bias, d);
            s.free(y); // the dense stream's next value goes to the host
            s.free_all(&acts);
        }
        let refitted = refitted_weights(s, cfg, spec.bias, m);
        for g in batches {
            let x = load(s, g);
            let super::Acts(acts) = layer_acts(s, g, m);
            s.free(x);
            let (mid, h) = (acts[6], acts[10]);
            let rest: Vec<Id> = acts.into_iter().filter(|&a| a != mid && a != h).collect();
            s.free_all(&rest);
            let y = refitted_output(s, cfg, g.rows, m);
            s.free(mid); // x'_{l+1} = mid + y, to the host
            s.free_all(&[y, h]);
        }
        s.free_all(&refitted);
    });
}

/// `CudaBackend::normal_equations` of one pass, keeping `k` channels.
fn normal_equations(s: &mut Sim, g: &Dims, k: usize, bias: bool, d: usize) {
    let kk = k + usize::from(bias);
    let hk = s.alloc("refit: h_K in f64", F64, &[g.rows, kk]);
    let idx = s.alloc("kept channel indices", U32, &[k]);
    s.free(idx);
    let r = s.alloc("refit: target in f64", F64, &[g.rows, d]);
    let gram = s.alloc("refit: G", F64, &[kk, kk]);
    let cross = s.alloc("refit: C", F64, &[kk, d]);
    let rr = s.alloc("refit: row energies", F64, &[g.rows]);
    s.free_all(&[hk, r, gram, cross, rr]);
}

/// The refitted down_proj (full width, zero at removed channels) and bias.
fn refitted_weights(s: &mut Sim, cfg: &ModelConfig, bias: bool, m: usize) -> Vec<Id> {
    let d = cfg.hidden;
    let mut w = vec![s.alloc("refitted down_proj", BF16, &[d, m])];
    if bias {
        w.push(s.alloc("refitted down_proj bias", BF16, &[d]));
    }
    w
}

/// The refitted FFN output of one pass (Gemma 3: through its post-FFN norm).
fn refitted_output(s: &mut Sim, cfg: &ModelConfig, rows: usize, m: usize) -> Id {
    let d = cfg.hidden;
    let y = s.linear("refitted FFN output", rows * m, rows, d);
    if !cfg.sandwich_norms {
        return y;
    }
    let yn = s.alloc("refitted FFN output, normalised", F32, &[rows, d]);
    let rstd = s.alloc("rstd (post-FFN norm)", F32, &[rows]);
    s.free_all(&[y, rstd]);
    yn
}
