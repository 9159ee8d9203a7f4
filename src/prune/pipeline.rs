//! From statistics to pruned model directories: score, allocate, compact
//! and export one model per sparsity (METHODS.md sections 5–7).
use crate::backend::Backend;
use crate::model::weights::layer_tensor;
use crate::model::Model;
use crate::model::ModelConfig;
use crate::prune::calibrate::model_digest;
use crate::prune::compact::flap_bias;
use crate::prune::export::{export_pruned, ExportSpec};
use crate::prune::job::PruneJob;
use crate::prune::refit::{refit_sequences, RefitWindows};
use crate::prune::{allocate_from, scores, ColumnNorms, Method, Stats};
use crate::{Error, Result};
use serde::Serialize;
use std::path::PathBuf;

/// What a pruning produced.
#[derive(Clone, Debug, Serialize)]
pub struct PruneOutcome {
    pub out: PathBuf,
    pub method: String,
    pub sparsity: f64,
    /// Kept width of every layer.
    pub widths: Vec<usize>,
    pub params_before: u64,
    pub params_after: u64,
}

/// Refuses statistics that were not computed on this model.
pub fn check_stats_match<B: Backend>(model: &Model<B>, stats: &Stats) -> Result<()> {
    if stats.meta.model_digest != model_digest(model)? {
        return Err(Error::Invalid(format!(
            "the statistics were computed on another model (digest {}…), not {}",
            stats.meta.model_digest.chars().take(12).collect::<String>(),
            model.dir.display()
        )));
    }
    if stats.widths() != model.cfg.ffn_widths {
        return Err(Error::Invalid(format!(
            "statistics layer widths {:?} differ from the model's {:?}",
            stats.widths(),
            model.cfg.ffn_widths
        )));
    }
    Ok(())
}

/// Kept channels of every layer for `job` (no files written).
pub fn kept_channels(
    stats: &Stats,
    norms: &[ColumnNorms],
    job: &PruneJob,
) -> Result<Vec<Vec<usize>>> {
    let widths = stats.widths();
    kept_channels_from(stats, norms, job, &widths)
}

/// [`kept_channels`] of a model pruned from one of widths `reference`:
/// `job`'s sparsity and floors are the reference's ([`allocate_from`]).
pub fn kept_channels_from(
    stats: &Stats,
    norms: &[ColumnNorms],
    job: &PruneJob,
    reference: &[usize],
) -> Result<Vec<Vec<usize>>> {
    let s = scores(job.method, stats, norms)?;
    allocate_from(
        &s,
        reference,
        job.allocation,
        job.sparsity.get(),
        job.min_keep,
        job.align,
    )
}

/// The model being pruned is itself a pruning of an original model
/// (progressive pruning, METHODS.md §11). Sparsity, floors, channel
/// numbers, parameter counts and the source named in pruning.json are
/// then the original's.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The original model's directory and digest ([`model_digest`]).
    pub dir: PathBuf,
    pub digest: String,
    /// Its configuration (widths and parameter count).
    pub cfg: ModelConfig,
    /// The channels of the model being pruned, in the original numbering:
    /// per layer, ascending, one per current channel.
    pub kept: Vec<Vec<usize>>,
    /// Fields added to pruning.json (each replaces one of the same name).
    pub record: serde_json::Map<String, serde_json::Value>,
}

impl Origin {
    /// The original itself: every channel kept, nothing to add.
    pub fn identity(dir: PathBuf, digest: String, cfg: ModelConfig) -> Self {
        let kept = cfg.ffn_widths.iter().map(|&m| (0..m).collect()).collect();
        Self {
            dir,
            digest,
            cfg,
            kept,
            record: Default::default(),
        }
    }

    /// The original numbering of `local`, kept channels of the model being
    /// pruned: kept_orig[l][i] = self.kept[l][local[l][i]].
    pub fn compose(&self, local: &[Vec<usize>]) -> Result<Vec<Vec<usize>>> {
        if local.len() != self.kept.len() {
            return Err(Error::Invalid(format!(
                "{} kept lists for {} layers",
                local.len(),
                self.kept.len()
            )));
        }
        self.kept
            .iter()
            .zip(local)
            .enumerate()
            .map(|(l, (orig, k))| {
                k.iter()
                    .map(|&c| {
                        orig.get(c).copied().ok_or_else(|| {
                            Error::Invalid(format!(
                                "layer {l}: channel {c} of a layer of {} channels",
                                orig.len()
                            ))
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// Scores, allocates, refits (with `job.refit`, over `refit_windows`),
/// compacts (on `be`, the model's backend) and exports one pruned model.
pub fn prune_model<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &Stats,
    norms: &[ColumnNorms],
    job: &PruneJob,
    refit_windows: Option<&RefitWindows>,
) -> Result<PruneOutcome> {
    prune_model_from(be, model, stats, norms, job, refit_windows, None)
}

/// [`prune_model`] of a model pruned from `origin` (when given): the kept
/// channels are allocated relative to the original's widths
/// ([`kept_channels_from`]) and pruning.json records them in the
/// original's numbering, with the original as its source and parameter
/// count before, plus `origin.record`. The outcome's widths are the
/// export's; its parameter counts are the original's and the export's.
pub fn prune_model_from<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &Stats,
    norms: &[ColumnNorms],
    job: &PruneJob,
    refit_windows: Option<&RefitWindows>,
    origin: Option<&Origin>,
) -> Result<PruneOutcome> {
    check_stats_match(model, stats)?;
    let cfg = &model.cfg;
    let reference = origin.map_or(&cfg.ffn_widths, |o| &o.cfg.ffn_widths);
    if let Some(o) = origin {
        let widths: Vec<usize> = o.kept.iter().map(Vec::len).collect();
        if widths != cfg.ffn_widths || reference.len() != cfg.layers {
            return Err(Error::Invalid(format!(
                "{} has widths {:?}, not the {widths:?} channels its origin {} keeps",
                model.dir.display(),
                cfg.ffn_widths,
                o.dir.display()
            )));
        }
    }
    let kept = kept_channels_from(stats, norms, job, reference)?;
    let d = cfg.hidden;
    let refitted = match (job.refit, refit_windows) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::Invalid(
                "a refit needs calibration windows or traces (--refit-calib, --calib or --refit-traces)".into(),
            ))
        }
        (Some(spec), Some(w)) => {
            let (layers, timing) =
                refit_sequences(be, model, &kept, &w.seqs, w.batch, spec, w.layer_major)?;
            let what = match &w.traces {
                None => format!("{} windows of {}", w.seqs.len(), w.seq_len()),
                Some(t) => format!(
                    "{} traces, {} {} tokens counted",
                    w.seqs.len(),
                    w.counted(),
                    t.tokens
                ),
            };
            crate::progress::println(&format!(
                "refit ({what}): layer passes {:.1} s, normal equations {:.1} s, solves {:.1} s",
                timing.passes_s,
                timing.products_s,
                timing.solves_s
            ));
            Some((spec, w, layers, timing))
        }
    };
    // FLAP's bias compensation is not applied on top of a refit (METHODS.md §9).
    let bias = if let Some((spec, _, layers, _)) = &refitted {
        spec.bias.then(|| {
            layers
                .iter()
                .map(|r| r.bias.clone().unwrap_or_default())
                .collect()
        })
    } else if job.method == Method::Flap {
        let n = stats.meta.tokens as f64;
        let mut out = Vec::with_capacity(cfg.layers);
        for (l, k) in kept.iter().enumerate() {
            let m = cfg.ffn_widths[l];
            let w = model
                .files
                .get(&layer_tensor(l, "mlp.down_proj.weight"), &[d, m])?
                .to_f32()?;
            let mean: Vec<f64> = stats.layers[l].s1.iter().map(|s| s / n).collect();
            let b = flap_bias(&w, d, m, k, &mean);
            // Finite statistics can still give a bias past f32 (s1 crafted
            // or from another model): refuse rather than export ±inf.
            if let Some((i, v)) = b.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                let largest = mean.iter().fold(0f64, |a, x| a.max(x.abs()));
                return Err(Error::Invalid(format!(
                    "FLAP's bias compensation of layer {l} is {v} at row {i}: the statistics' \
                     channel means (s1 / tokens, up to {largest:e} in magnitude) are too large \
                     for any activation of this model; were the statistics altered?"
                )));
            }
            out.push(b);
        }
        Some(out)
    } else {
        None
    };
    let widths: Vec<usize> = kept.iter().map(Vec::len).collect();
    let mut after = cfg.clone();
    after.ffn_widths = widths.clone();
    let bias_params = if bias.is_some() {
        (cfg.layers * d) as u64
    } else {
        0
    };
    let params_before = origin.map_or(cfg, |o| &o.cfg).param_count();
    let params_after = after.param_count() + bias_params;
    let channels: usize = reference.iter().sum();
    let kept_total: usize = widths.iter().sum();
    let kept_record = match origin {
        Some(o) => o.compose(&kept)?,
        None => kept.clone(),
    };
    let (source_dir, source_digest) = match origin {
        Some(o) => (&o.dir, &o.digest),
        None => (&model.dir, &stats.meta.model_digest),
    };
    let mut record = serde_json::json!({
        "method": job.method.name(),
        "sparsity": job.sparsity.get(),
        "ffn_channels_removed_fraction": 1.0 - kept_total as f64 / channels as f64,
        "params_removed_fraction": 1.0 - params_after as f64 / params_before as f64,
        "allocation": job.allocation.to_string(),
        "min_keep": job.min_keep,
        "align": job.align,
        "objective": job.method.needs().map(|o| o.name()),
        "energy_at": stats.meta.energy_at.to_string(),
        "calibration": {
            "digest": stats.meta.calib_digest,
            "samples": stats.meta.samples,
            "seq_len": stats.meta.seq_len,
            "tokens": stats.meta.tokens,
            "bos": stats.meta.bos,
        },
        "source_model": source_dir.display().to_string(),
        "source_model_digest": source_digest,
        "export": job.layout.name(),
        "flap_bias_compensation": bias.is_some() && refitted.is_none(),
        "refit": refitted.as_ref().map(|(spec, w, layers, timing)| serde_json::json!({
            "target": spec.target,
            "bias": spec.bias,
            "damp": spec.damp,
            "calibration": w.record(),
            "time_s": timing,
            "layers": layers,
        })),
        "params_before": params_before,
        "params_after": params_after,
        "layer_widths": widths,
        "source_layer_widths": reference,
        "kept": kept_record,
        "engine": "rku-engine",
        "engine_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(o), Some(obj)) = (origin, record.as_object_mut()) {
        obj.extend(o.record.clone());
    }
    let down_weights: Option<Vec<Vec<f32>>> = refitted
        .as_ref()
        .map(|(_, _, layers, _)| layers.iter().map(|r| r.w_down.clone()).collect());
    let spec = ExportSpec {
        kept: &kept,
        layout: job.layout,
        down_weights: down_weights.as_deref(),
        down_bias: bias.as_deref(),
        record,
    };
    let out = export_pruned(
        be,
        &model.dir,
        &model.files,
        cfg,
        &spec,
        &job.out,
        job.force,
    )?;
    Ok(PruneOutcome {
        out,
        method: job.method.name().to_string(),
        sparsity: job.sparsity.get(),
        widths,
        params_before,
        params_after,
    })
}
