//! What a report is made from (`ReportSpec`), checked before anything
//! loads, the cells it consists of, and the fingerprint of its inputs that
//! keys every cell (`cells::Fingerprint`).
use super::cells::{Calibration, Cell, Fingerprint, Metric, Variant};
use crate::eval::gen::GenArgs;
use crate::eval::mc::McArgs;
use crate::model::weights::LoadOptions;
use crate::model::ModelConfig;
use crate::prune::calibrate::CalibSource;
use crate::prune::refit::RefitSpec;
use crate::prune::traces::{Selection, TokenRule};
use crate::prune::{Method, Objective, Objectives, Sparsity};
use crate::recover::RecoverSpec;
use crate::{Error, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Perplexity evaluation.
#[derive(Clone, Debug)]
pub struct PplSpec {
    pub text: PathBuf,
    pub field: Option<String>,
    pub seq_len: usize,
    pub max_windows: Option<usize>,
    /// Windows per forward pass (speed only).
    pub batch: usize,
    /// Each window `[BOS] + seq_len − 1` text tokens (METHODS.md §8);
    /// `None`: the model's default (`Arch::bos_by_default`).
    pub bos: Option<bool>,
}

impl PplSpec {
    /// Whether the windows of `cfg`'s model start with BOS.
    pub fn bos_for(&self, cfg: &ModelConfig) -> bool {
        self.bos.unwrap_or(cfg.arch.bos_by_default())
    }
}

/// The traces of a traces file, as statistics over them (METHODS.md §11)
/// or trace perplexity (§8) read them.
#[derive(Clone, Debug)]
pub struct TracesSpec {
    pub path: PathBuf,
    pub select: Selection,
    pub tokens: TokenRule,
    /// Longer traces are cut to this many tokens.
    pub max_seq_len: Option<usize>,
}

/// Prefill timing of every pruned model against the dense one.
#[derive(Clone, Copy, Debug)]
pub struct PrefillSpec {
    pub seq_len: usize,
    pub repeats: usize,
}

/// Everything a report is made from.
#[derive(Clone, Debug)]
pub struct ReportSpec {
    pub model: PathBuf,
    pub calib: CalibSource,
    /// Also calibrate every method on these traces: a second statistics
    /// pass, and every mask (and its model) once per calibration.
    pub traces: Option<TracesSpec>,
    pub methods: Vec<Method>,
    pub sparsities: Vec<Sparsity>,
    pub min_keep: Option<usize>,
    pub align: usize,
    pub ppl: Option<PplSpec>,
    /// Trace perplexity of every model on these traces.
    pub trace_ppl: Option<TracesSpec>,
    /// Generative evaluation; its `out` is set per model (records/).
    pub gen: Option<GenArgs>,
    /// Multiple choice; its `out` is set per model (records/).
    pub mc: Option<McArgs>,
    pub prefill: Option<PrefillSpec>,
    /// Also export and evaluate every mask refitted (METHODS.md §9) over
    /// the data of its calibration (the windows, or the traces).
    pub refit: Option<RefitSpec>,
    /// Also recover every model (as cut, and refitted with `refit`) by
    /// LoRA distillation from the dense model (METHODS.md §10) on the
    /// data of its calibration (the windows, or the traces).
    pub recover: Option<RecoverSpec>,
    pub out: PathBuf,
    /// Keep every pruned model under models/ (else each is removed once evaluated).
    pub keep_models: bool,
    /// Recompute cells whose inputs changed instead of refusing.
    pub force: bool,
    /// How every model (dense and pruned) is loaded: `--stream`, and ggml
    /// blocks for decoding where a model directory has them.
    pub load: LoadOptions,
}

impl ReportSpec {
    /// Argument errors, before anything is loaded.
    pub(super) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.methods.is_empty() {
            return bad("at least one method is needed".into());
        }
        Sparsity::check_distinct(&self.sparsities)?;
        for (i, m) in self.methods.iter().enumerate() {
            if self.methods[..i].contains(m) {
                return bad(format!("method {m} is listed twice"));
            }
        }
        let limits = [
            self.gen.as_ref().and_then(|g| g.limit),
            self.mc.as_ref().and_then(|m| m.limit),
        ];
        if limits.contains(&Some(0)) {
            return bad("--limit must be at least 1".into());
        }
        if let Some(p) = self.prefill {
            if p.seq_len == 0 || p.repeats == 0 {
                return bad("--prefill-seq-len and --prefill-repeats must be at least 1".into());
            }
        }
        if self.align == 0 {
            return bad("--align must be at least 1".into());
        }
        if let Some(r) = &self.recover {
            r.check()?;
            // The recovery trains on the calibration windows (or traces,
            // checked when they are read): at least one batch of them.
            if r.batch > self.calib.samples {
                return bad(format!(
                    "--recover-batch {} is more than the {} calibration windows (--samples) it trains on",
                    r.batch, self.calib.samples
                ));
            }
        }
        Ok(())
    }

    /// The evaluations requested, in column order.
    pub(super) fn metrics(&self) -> Vec<Metric> {
        [
            (Metric::Ppl, self.ppl.is_some()),
            (Metric::TracePpl, self.trace_ppl.is_some()),
            (Metric::Gen, self.gen.is_some()),
            (Metric::Mc, self.mc.is_some()),
            (Metric::Prefill, self.prefill.is_some()),
        ]
        .into_iter()
        .filter_map(|(m, on)| on.then_some(m))
        .collect()
    }

    /// Every cell of the report, in the order they are computed.
    pub(super) fn plan(&self) -> Vec<Cell> {
        let metrics = self.metrics();
        let mut cells: Vec<Cell> = self.calibrations().into_iter().map(Cell::Stats).collect();
        cells.extend(
            metrics
                .iter()
                .filter(|&&m| m != Metric::Prefill)
                .map(|&m| Cell::Dense(m)),
        );
        for &sparsity in &self.sparsities {
            for &method in &self.methods {
                for variant in self.variants() {
                    cells.push(Cell::Prune {
                        method,
                        sparsity,
                        variant,
                    });
                    cells.extend(metrics.iter().map(|&metric| Cell::Pruned {
                        method,
                        sparsity,
                        variant,
                        metric,
                    }));
                }
            }
        }
        cells
    }

    /// The calibrations the masks are made from: the text, and the traces
    /// when given.
    pub(super) fn calibrations(&self) -> Vec<Calibration> {
        match self.traces {
            Some(_) => vec![Calibration::Text, Calibration::Traces],
            None => vec![Calibration::Text],
        }
    }

    /// The models of a method at a sparsity: its mask from every
    /// calibration, as cut, refitted with `refit`, and each of those
    /// recovered with `recover`.
    pub(super) fn variants(&self) -> Vec<Variant> {
        let refits: &[bool] = match self.refit {
            Some(_) => &[false, true],
            None => &[false],
        };
        let recovers: &[bool] = match self.recover {
            Some(_) => &[false, true],
            None => &[false],
        };
        let calibs = self.calibrations();
        calibs
            .iter()
            .flat_map(|&calib| {
                refits.iter().flat_map(move |&refit| {
                    recovers.iter().map(move |&recover| Variant {
                        calib,
                        refit,
                        recover,
                    })
                })
            })
            .collect()
    }

    /// The objectives the methods' scores need (energy when none does:
    /// the forward-only methods read s1 and s2, which every pass fills).
    pub(super) fn objectives(&self) -> Objectives {
        let needs = |o| self.methods.iter().any(|m| m.needs() == Some(o));
        let o = Objectives {
            energy: needs(Objective::Energy),
            ce: needs(Objective::Ce),
        };
        if !o.is_empty() {
            o
        } else {
            Objectives {
                energy: true,
                ce: false,
            }
        }
    }
}

fn file_digest(path: &Path) -> Result<String> {
    crate::io::file_sha256(path, "an input file")
}

/// The report's inputs (see `cells::Fingerprint`).
pub(super) fn fingerprint(
    backend: &str,
    model_digest: &str,
    calib_digest: &str,
    spec: &ReportSpec,
) -> Result<Fingerprint> {
    let c = &spec.calib;
    let mut v = json!({
        "engine_version": env!("CARGO_PKG_VERSION"),
        "backend": backend,
        "model": {"path": spec.model.display().to_string(), "digest": model_digest},
        "calib": {
            "path": c.path.display().to_string(), "field": c.field, "digest": calib_digest,
            "samples": c.samples, "seq_len": c.seq_len,
            "bos": c.bos_for(&ModelConfig::load(&spec.model.join("config.json"))?),
            "energy_at": c.energy_at.to_string(),
        },
        "prune": {"min_keep": spec.min_keep, "align": spec.align},
    });
    let traces = |t: &TracesSpec| -> Result<serde_json::Value> {
        Ok(json!({
            "path": t.path.display().to_string(), "digest": file_digest(&t.path)?,
            "selection": t.select.to_string(), "tokens": t.tokens.to_string(),
            "max_seq_len": t.max_seq_len,
        }))
    };
    if let Some(t) = &spec.traces {
        v["traces"] = traces(t)?;
    }
    if let Some(t) = &spec.trace_ppl {
        v["trace_ppl"] = traces(t)?;
    }
    if let Some(p) = &spec.ppl {
        v["ppl"] = json!({
            "path": p.text.display().to_string(), "field": p.field, "digest": file_digest(&p.text)?,
            "seq_len": p.seq_len, "max_windows": p.max_windows,
            "bos": p.bos_for(&ModelConfig::load(&spec.model.join("config.json"))?),
        });
    }
    if let Some(g) = &spec.gen {
        let shots_digest = g.shots_file.as_deref().map(file_digest).transpose()?;
        v["gen"] = json!({
            "path": g.data.display().to_string(), "digest": file_digest(&g.data)?,
            "shots": g.shots, "shots_file_digest": shots_digest, "format": g.format,
            "max_new_tokens": g.max_new_tokens, "limit": g.limit, "stop": g.stop,
        });
    }
    if let Some(m) = &spec.mc {
        v["mc"] = json!({
            "path": m.data.display().to_string(), "digest": file_digest(&m.data)?, "limit": m.limit,
        });
    }
    if let Some(r) = spec.refit {
        v["refit"] = json!({"target": r.target, "bias": r.bias, "damp": r.damp});
    }
    if let Some(r) = &spec.recover {
        v["recover"] = json!({
            "steps": r.steps, "batch": r.batch, "rank": r.rank, "alpha": r.alpha, "lr": r.lr,
            "warmup": r.warmup, "max_grad_norm": r.max_grad_norm, "loss": r.loss.name(),
            "seed": r.seed,
        });
    }
    if let Some(p) = spec.prefill {
        v["prefill"] = json!({"seq_len": p.seq_len, "repeats": p.repeats});
    }
    Ok(Fingerprint(v))
}
