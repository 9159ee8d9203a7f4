//! `rku-engine report`: one statistics pass, every method × sparsity
//! pruned and evaluated (and the dense model), written up as
//! `report.json`, `report.md` and SVG plots. Resumable: every finished
//! cell is a small JSON file, and a rerun computes only what is missing.
//!
//! The output directory:
//!
//! ```text
//! fingerprint.json      the inputs (digests and settings) of the cells
//! stats.safetensors     the statistics pass, shared by every method
//! stats@traces.safetensors   with traces, the pass over the traces
//! cells/*.json          one finished cell each (see `cells`): stats,
//!                       dense.<metric>, <method>-s<sparsity>.prune (the
//!                       mask), <method>-s<sparsity>.<metric>; with traces
//!                       also stats@traces and <method>-s<sparsity>@traces.*,
//!                       the masks calibrated on the traces; with --refit
//!                       also <method>-s<sparsity>+refit.{prune,<metric>},
//!                       the same mask refitted (METHODS.md §9); with
//!                       --recover-steps also +lora and +refit+lora, each
//!                       of those recovered by LoRA-KD (METHODS.md §10)
//! models/<method>-s<sparsity>/   a pruned model while it is evaluated
//!                       (kept afterwards with --keep-models)
//! records/*.jsonl       per-problem and per-item outputs of gen and mc
//! report.json  report.md  plots/*.svg
//! ```
//!
//! A rerun whose inputs would make finished cells inconsistent (another
//! model, calibration text, evaluation file or setting) is refused, naming
//! what changed, unless `force`, which recomputes exactly those cells.
//!
//! Why one long file: the run loop and the cell bookkeeping it drives
//! belong together; the spec, cells, data, tables and plots are in their
//! own files.
pub mod cells;
pub mod data;
pub mod markdown;
pub mod plots;
pub mod spec;

use crate::backend::Backend;
use crate::eval::gen::{evaluate_gen, GenArgs, GenResult};
use crate::eval::iou::{is_kept_list, kept_fits, read_kept};
use crate::eval::mc::{evaluate_mc, McArgs, McResult};
use crate::eval::ppl::{perplexity, trace_perplexity, PplResult, PplWindows};
use crate::eval::prefill::{bench_prefill, PrefillResult, Timing};
use crate::io::output::{self, replace_owned, MODEL_DIR, REPORT_DIR};
use crate::io::text::{read_text, Tokenizer};
use crate::io::traces::Sequence;
use crate::model::Model;
use crate::progress::{println, Progress};
use crate::prune::calibrate::{
    bos_id, collect_sequence_stats, collect_stats, down_column_norms, model_digest,
};
use crate::prune::pipeline::{check_stats_match, prune_model};
use crate::prune::refit::RefitWindows;
use crate::prune::stats::TraceSource;
use crate::prune::traces::{sequences_digest, trace_sequences, TraceSequences};
use crate::prune::{ColumnNorms, ExportLayout, Method, Objectives, PruneJob, Sparsity, Stats};
use crate::recover::export::export_recovered;
use crate::recover::{checkpoint_settings, recovery_record, train, RecordSources, RecoverData};
use crate::{Error, Result};
use cells::{variant_name, Calibration, Cell, CellStore, Fingerprint, Metric, State, Variant};
use data::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use spec::fingerprint;
pub use spec::{PplSpec, PrefillSpec, ReportSpec, TracesSpec};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn to_value<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::Invalid(e.to_string()))
}

fn objectives_of(s: &str) -> Objectives {
    s.parse().unwrap_or_default()
}

/// Opens (or starts) the output directory: refuses, even with `force`,
/// one that is not a report (DESIGN.md §10: a report directory carries the
/// engine's marker; one written before markers, its fingerprint.json), and
/// finished cells whose inputs changed unless `force` (then removes them).
/// Statistics scored for fewer objectives than the methods need are not
/// stale: [`Run::all`] adds the missing objective's pass to them.
fn open_out(spec: &ReportSpec, fp: &Fingerprint, plan: &[Cell]) -> Result<CellStore> {
    let out = &spec.out;
    let fp_path = out.join("fingerprint.json");
    let is_file = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
    output::open_in_place(out, REPORT_DIR, |d| is_file(&d.join("fingerprint.json")))?;
    // A link (or file) planted at one of the report's own directories is
    // refused before any work; each is created where it is first needed.
    for sub in ["cells", "models", "records", "plots"] {
        let dir = out.join(sub);
        if std::fs::symlink_metadata(&dir).is_ok() {
            output::inner_dir(&dir)?;
        }
    }
    let old: Option<Value> = match std::fs::read_to_string(&fp_path) {
        Ok(t) => Some(
            serde_json::from_str(&t)
                .map_err(|e| Error::format(&fp_path, format!("not valid JSON: {e}")))?,
        ),
        Err(_) => None,
    };
    let store = CellStore::open(&out.join("cells"))?;
    let mut stale: Vec<String> = Vec::new();
    for c in plan {
        if store.state(&c.name(), &fp.key(c))? == State::Stale {
            stale.push(c.name());
        }
    }
    if !stale.is_empty() {
        let changes = old.as_ref().map(|o| fp.diff(o)).unwrap_or_default();
        let shown = stale.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
        let more = match stale.len() {
            n if n > 6 => format!(" and {} more", n - 6),
            _ => String::new(),
        };
        if !spec.force {
            return Err(Error::Invalid(format!(
                "{} holds results computed from other inputs{}\n{} finished cell(s) would not match them: {shown}{more}.\n\
                 Use another --out, or pass --force to recompute those cells.",
                out.display(),
                if changes.is_empty() {
                    String::new()
                } else {
                    format!(":\n  {}", changes.join("\n  "))
                },
                stale.len(),
            )));
        }
        println(&format!(
            "--force: recomputing {} cell(s) whose inputs changed: {shown}{more}",
            stale.len()
        ));
        for c in plan {
            if store.state(&c.name(), &fp.key(c))? == State::Stale {
                store.remove(&c.name())?;
            }
        }
    }
    let text = serde_json::to_string_pretty(&fp.0).map_err(|e| Error::Invalid(e.to_string()))?;
    replace_owned(&fp_path, text.as_bytes())?;
    Ok(store)
}

/// The objectives of `needed` that the finished statistics cell of `calib`
/// was not scored for (none when the cell is not finished).
fn missing_objectives(
    store: &CellStore,
    fp: &Fingerprint,
    calib: Calibration,
    needed: Objectives,
) -> Result<Objectives> {
    let cell = Cell::Stats(calib);
    let have = match store.get::<StatsInfo>(&cell.name(), &fp.key(&cell))? {
        Some((s, _)) => objectives_of(&s.objectives),
        None => needed,
    };
    Ok(needed.without(have))
}

/// A report being computed.
struct Run<'a, B: Backend> {
    be: &'a B,
    spec: &'a ReportSpec,
    fp: Fingerprint,
    store: CellStore,
    plan: Vec<Cell>,
    dense: Model<B>,
    tok: Tokenizer,
    calib_ids: Vec<u32>,
    calib_digest: String,
    /// The selected traces of `--traces` (when given) and their digest.
    traces: Option<(TraceSequences, String)>,
    /// The objectives the methods need: what a statistics pass runs.
    objectives: Objectives,
    ppl_ids: Vec<u32>,
    /// The sequences of the trace perplexity (empty without it).
    trace_ppl_seqs: Vec<Sequence>,
    /// The statistics of each calibration, loaded on its first pruning.
    stats: Vec<(Calibration, Stats)>,
    norms: Vec<ColumnNorms>,
    progress: Progress,
    computed: usize,
    skipped: usize,
    start: Instant,
}

/// A method's row label without its calibration: its name and the
/// variant's suffix (`+refit`, `+lora`, `+refit+lora`).
fn method_label(method: Method, variant: Variant) -> String {
    format!("{}{}", method.name(), variant.suffix())
}

/// A row's unique label: with traces calibration the method label is
/// tagged (`rku@traces+refit`).
fn variant_label(method: Method, variant: Variant) -> String {
    match variant.calib {
        Calibration::Text => method_label(method, variant),
        Calibration::Traces => format!("{}@traces{}", method.name(), variant.suffix()),
    }
}

/// The selected sequences of a traces file, with a line saying what they are.
fn read_traces_spec(t: &TracesSpec, model_dir: &Path, what: &str) -> Result<TraceSequences> {
    let tr = trace_sequences(&t.path, model_dir, t.select, t.tokens, t.max_seq_len)?;
    println(&format!(
        "{what}: {} of {} traces selected ({}) from {}, counting {} tokens{}",
        tr.seqs.len(),
        tr.total,
        t.select,
        t.path.display(),
        t.tokens,
        match t.max_seq_len {
            Some(m) => format!(", {} cut to {m} tokens", tr.truncated),
            None => String::new(),
        }
    ));
    Ok(tr)
}

/// Runs (or resumes) the report; returns what `report.json` holds.
pub fn run_report<B: Backend>(be: &B, spec: &ReportSpec) -> Result<Report> {
    let start = Instant::now();
    spec.check()?;
    // Nothing the report writes may replace what it reads (DESIGN.md §10).
    let gen = spec.gen.as_ref();
    let inputs = [Some(&spec.model), Some(&spec.calib.path)]
        .into_iter()
        .chain([spec.traces.as_ref().map(|t| &t.path)])
        .chain([spec.trace_ppl.as_ref().map(|t| &t.path)])
        .chain([spec.ppl.as_ref().map(|p| &p.text)])
        .chain([
            gen.map(|g| &g.data),
            gen.and_then(|g| g.shots_file.as_ref()),
        ])
        .chain([spec.mc.as_ref().map(|m| &m.data)]);
    for input in inputs.flatten() {
        output::protect(input);
    }
    let dense = Model::load_with(be, &spec.model, spec.load)?;
    println(&format!(
        "model: {} ({:?}, {} layers, {:.1}M parameters)",
        spec.model.display(),
        dense.cfg.arch,
        dense.cfg.layers,
        dense.cfg.param_count() as f64 / 1e6
    ));
    let tok = Tokenizer::load(&spec.model)?;
    let (calib_ids, calib_digest) = spec.calib.windows(&dense, &tok)?;
    let ppl_ids = match &spec.ppl {
        Some(p) => tok.encode(&read_text(&p.text, p.field.as_deref())?)?,
        None => Vec::new(),
    };
    let traces = match &spec.traces {
        Some(t) => {
            let tr = read_traces_spec(t, &spec.model, "calibration traces")?;
            let digest = sequences_digest(&tr.seqs);
            Some((tr, digest))
        }
        None => None,
    };
    let trace_ppl_seqs = match &spec.trace_ppl {
        Some(t) => read_traces_spec(t, &spec.model, "trace perplexity")?.seqs,
        None => Vec::new(),
    };
    let fp = fingerprint(be.name(), &model_digest(&dense)?, &calib_digest, spec)?;
    let plan = spec.plan();
    let store = open_out(spec, &fp, &plan)?;
    let objectives = spec.objectives();
    let mut todo = 0;
    for c in &plan {
        let adds_objective = match *c {
            Cell::Stats(calib) => !missing_objectives(&store, &fp, calib, objectives)?.is_empty(),
            _ => false,
        };
        todo += usize::from(!cell_done(&store, &fp, &spec.out, c)? || adds_objective);
    }
    println(&format!(
        "report {}: {} cells, {} already done (skipped), {todo} to compute",
        spec.out.display(),
        plan.len(),
        plan.len() - todo
    ));
    Run {
        be,
        spec,
        fp,
        store,
        dense,
        tok,
        calib_ids,
        calib_digest,
        traces,
        objectives,
        ppl_ids,
        trace_ppl_seqs,
        stats: Vec::new(),
        norms: Vec::new(),
        progress: Progress::new(todo as u64, "report"),
        computed: 0,
        skipped: plan.len() - todo,
        plan,
        start,
    }
    .all()
}

/// The statistics file of a calibration in the report directory `out`.
fn stats_file(out: &Path, calib: Calibration) -> PathBuf {
    out.join(format!("{}.safetensors", Cell::Stats(calib).name()))
}

/// Whether `c` is finished under the inputs `fp` (a statistics cell also
/// needs its file).
fn cell_done(store: &CellStore, fp: &Fingerprint, out: &Path, c: &Cell) -> Result<bool> {
    let file_there = match *c {
        Cell::Stats(calib) => stats_file(out, calib).exists(),
        _ => true,
    };
    Ok(store.state(&c.name(), &fp.key(c))? == State::Done && file_there)
}

impl<B: Backend> Run<'_, B> {
    fn done(&self, c: &Cell) -> Result<bool> {
        cell_done(&self.store, &self.fp, &self.spec.out, c)
    }

    /// Cells of the plan not done.
    fn remaining(&self) -> Result<usize> {
        let mut n = 0;
        for c in &self.plan {
            n += usize::from(!self.done(c)?);
        }
        Ok(n)
    }

    /// The value of a finished cell.
    fn value<T: DeserializeOwned>(&self, c: &Cell) -> Result<Option<T>> {
        Ok(self
            .store
            .get::<T>(&c.name(), &self.fp.key(c))?
            .map(|(v, _)| v))
    }

    /// Records a finished cell.
    fn put<T: Serialize>(&mut self, c: &Cell, started: Instant, value: &T) -> Result<()> {
        self.store.put(
            &c.name(),
            &self.fp.key(c),
            started.elapsed().as_secs_f64(),
            value,
        )?;
        self.computed += 1;
        self.progress.inc(1);
        Ok(())
    }

    fn all(mut self) -> Result<Report> {
        for calib in self.spec.calibrations() {
            if !self.done(&Cell::Stats(calib))? {
                self.score(calib)?;
            } else {
                let missing = missing_objectives(&self.store, &self.fp, calib, self.objectives)?;
                if !missing.is_empty() {
                    self.add_objectives(calib, missing)?;
                }
            }
        }
        let metrics = self.spec.metrics();
        for &m in metrics.iter().filter(|&&m| m != Metric::Prefill) {
            let c = Cell::Dense(m);
            if !self.done(&c)? {
                let t = Instant::now();
                let (v, line) = self.evaluate(&self.dense, m, "dense")?;
                println(&format!(
                    "dense: {line} ({:.1}s)",
                    t.elapsed().as_secs_f64()
                ));
                self.put(&c, t, &v)?;
            }
        }
        self.write_outputs()?;
        for &sparsity in &self.spec.sparsities {
            for &method in &self.spec.methods {
                for variant in self.spec.variants() {
                    self.model(method, sparsity, variant, &metrics)?;
                }
            }
        }
        self.progress.finish();
        if !self.spec.keep_models {
            // Only removes models/ when empty; it holds nothing when models are not kept.
            let _ = std::fs::remove_dir(self.spec.out.join("models"));
        }
        self.write_outputs()
    }

    /// The calibration digest the statistics of `calib` must carry.
    fn calib_digest(&self, calib: Calibration) -> Result<&str> {
        match (calib, &self.traces) {
            (Calibration::Text, _) => Ok(&self.calib_digest),
            (Calibration::Traces, Some((_, digest))) => Ok(digest),
            (Calibration::Traces, None) => Err(Error::Invalid(
                "a trace-calibrated cell without --traces".into(),
            )),
        }
    }

    /// The statistics pass over one calibration, for the methods' objectives.
    fn score(&mut self, calib: Calibration) -> Result<()> {
        let t = Instant::now();
        let s = self.pass(calib, self.objectives)?;
        self.keep_stats(calib, t, s)
    }

    /// Adds the objectives `missing` to the finished statistics of `calib`
    /// (a method that needs them joined the report): runs their pass only
    /// and merges it ([`Stats::add_objectives`]), so the cells built on the
    /// statistics stay valid.
    fn add_objectives(&mut self, calib: Calibration, missing: Objectives) -> Result<()> {
        let t = Instant::now();
        let mut s = self.take_stats(calib)?;
        // A file already extended by an interrupted run needs only its cell.
        let missing = missing.without(s.meta.objectives);
        if !missing.is_empty() {
            println(&format!(
                "{}: scored for {}; adding the {missing} objective the methods need",
                Cell::Stats(calib).name(),
                s.meta.objectives
            ));
            let extra = self.pass(calib, missing)?;
            s.add_objectives(extra).map_err(|e| {
                Error::Invalid(format!(
                    "{}: {e}",
                    stats_file(&self.spec.out, calib).display()
                ))
            })?;
        }
        self.keep_stats(calib, t, s)
    }

    /// One statistics pass over the sequences of `calib` for `objectives`.
    fn pass(&self, calib: Calibration, objectives: Objectives) -> Result<Stats> {
        let c = &self.spec.calib;
        let traces = matches!(calib, Calibration::Traces);
        let spec = c.spec(objectives, !traces && c.bos_for(&self.dense.cfg));
        match (calib, &self.traces) {
            (Calibration::Traces, Some((tr, digest))) => {
                let tokens: usize = tr.seqs.iter().map(|s| s.ids.len()).sum();
                println(&format!(
                    "scoring {} traces, {tokens} tokens ({objectives})",
                    tr.seqs.len(),
                ));
                let source: TraceSource = tr.source.clone();
                collect_sequence_stats(
                    self.be,
                    &self.dense,
                    &tr.seqs,
                    spec,
                    digest.clone(),
                    Some(source),
                )
            }
            _ => {
                println(&format!(
                    "scoring {} x {} calibration tokens ({objectives})",
                    c.samples, c.seq_len
                ));
                let digest = self.calib_digest(calib)?.to_string();
                collect_stats(self.be, &self.dense, &self.calib_ids, spec, digest)
            }
        }
    }

    /// Saves the statistics of `calib`, keeps them for the prune cells and
    /// finishes their cell.
    fn keep_stats(&mut self, calib: Calibration, t: Instant, s: Stats) -> Result<()> {
        s.save(&stats_file(&self.spec.out, calib))?;
        let info = StatsInfo {
            objectives: s.meta.objectives.to_string(),
            samples: s.meta.samples,
            seq_len: s.meta.seq_len,
            tokens: s.meta.tokens,
        };
        self.stats.push((calib, s));
        self.put(&Cell::Stats(calib), t, &info)
    }

    /// The statistics of `calib`: taken out of the cache, or read from the
    /// report's file (checked against the model and calibration).
    fn take_stats(&mut self, calib: Calibration) -> Result<Stats> {
        if let Some(at) = self.stats.iter().position(|(c, _)| *c == calib) {
            return Ok(self.stats.swap_remove(at).1);
        }
        let path = stats_file(&self.spec.out, calib);
        let s = Stats::load(&path)?;
        check_stats_match(&self.dense, &s)?;
        if s.meta.calib_digest != self.calib_digest(calib)? {
            return Err(Error::format(
                &path,
                format!(
                    "computed on other calibration data than cells/{}.json records; \
                     delete that cell to rescore",
                    Cell::Stats(calib).name()
                ),
            ));
        }
        Ok(s)
    }

    /// The prune cell and the metrics of one method at one sparsity (the
    /// `variant` of its mask).
    fn model(
        &mut self,
        method: Method,
        sparsity: Sparsity,
        variant: Variant,
        metrics: &[Metric],
    ) -> Result<()> {
        let name = variant_name(method, sparsity, variant);
        let models = self.spec.out.join("models");
        output::inner_dir(&models)?;
        let dir = models.join(&name);
        if !self.spec.keep_models {
            // Removed once evaluated: refuse, before any work, what this
            // tool did not write or what this run reads.
            output::check(&dir, MODEL_DIR, true)?;
        }
        let cell = |metric| Cell::Pruned {
            method,
            sparsity,
            variant,
            metric,
        };
        let mut pending = Vec::new();
        for &metric in metrics {
            if !self.done(&cell(metric))? {
                pending.push(metric);
            }
        }
        let prune = Cell::Prune {
            method,
            sparsity,
            variant,
        };
        let kept = match self.pruned(&prune)? {
            Some(p) => p.kept,
            None => {
                let t = Instant::now();
                let p = self.export(method, sparsity, variant, &dir)?;
                println(&format!(
                    "{name}: kept {} of {} FFN channels, {} -> {} parameters",
                    p.widths.iter().sum::<usize>(),
                    self.dense.cfg.ffn_widths.iter().sum::<usize>(),
                    p.params_before,
                    p.params_after
                ));
                self.put(&prune, t, &p)?;
                p.kept
            }
        };
        let on_disk = dir.join("pruning.json").exists() && read_kept(&dir)? == kept;
        if (!pending.is_empty() || self.spec.keep_models) && !on_disk {
            // The mask is recorded; the model is rebuilt from the statistics.
            if self.export(method, sparsity, variant, &dir)?.kept != kept {
                return Err(Error::Invalid(format!(
                    "pruning {name} again gave another mask than cells/{name}.prune.json \
                     records (were the statistics replaced?); pass --force after deleting that cell"
                )));
            }
        }
        if !pending.is_empty() {
            let model = Model::load_with(self.be, &dir, self.spec.load)?;
            for metric in pending {
                let t = Instant::now();
                let (v, line) = self.evaluate(&model, metric, &name)?;
                println(&format!(
                    "{name}: {line} ({:.1}s)",
                    t.elapsed().as_secs_f64()
                ));
                self.put(&cell(metric), t, &v)?;
            }
            self.write_outputs()?;
        }
        if !self.spec.keep_models {
            // Checked above; evaluating it has since made it an input.
            output::remove_own_output(&dir, MODEL_DIR)?;
        }
        Ok(())
    }

    /// Prunes the dense model into `dir` (replacing what is there), as
    /// `variant` says: refitted over the calibration windows, and recovered
    /// by LoRA distillation on them.
    fn export(
        &mut self,
        method: Method,
        sparsity: Sparsity,
        variant: Variant,
        dir: &Path,
    ) -> Result<PrunedInfo> {
        if variant.recover {
            return self.export_recovered(method, sparsity, variant, dir);
        }
        let stats = self.take_stats(variant.calib)?;
        if self.norms.is_empty() {
            self.norms = down_column_norms(&self.dense)?;
        }
        let job = PruneJob {
            method,
            allocation: method.default_allocation(),
            sparsity,
            min_keep: self.spec.min_keep,
            align: self.spec.align,
            layout: ExportLayout::Compact,
            out: dir.to_path_buf(),
            force: true,
            refit: self.spec.refit.filter(|_| variant.refit),
        };
        let c = &self.spec.calib;
        // The refit runs on the data of the mask's calibration.
        let windows = match (job.refit, variant.calib, &self.traces, &self.spec.traces) {
            (None, ..) => None,
            (Some(_), Calibration::Traces, Some((tr, digest)), Some(t)) => Some(RefitWindows {
                seqs: tr.seqs.clone(),
                batch: c.batch,
                source: t.path.clone(),
                digest: digest.clone(),
                traces: Some(tr.source.clone()),
                bos: false,
                layer_major: c.layer_major,
            }),
            (Some(_), ..) => Some(RefitWindows {
                layer_major: c.layer_major,
                ..RefitWindows::windows(
                    &self.calib_ids,
                    c.seq_len,
                    c.batch,
                    c.path.clone(),
                    self.calib_digest.clone(),
                    c.bos_for(&self.dense.cfg),
                )
            }),
        };
        let r = prune_model(
            self.be,
            &self.dense,
            &stats,
            &self.norms,
            &job,
            windows.as_ref(),
        );
        self.stats.push((variant.calib, stats));
        let r = r?;
        Ok(PrunedInfo {
            allocation: job.allocation.to_string(),
            kept: read_kept(&r.out)?,
            widths: r.widths,
            params_before: r.params_before,
            params_after: r.params_after,
        })
    }

    /// `export` of a recovered variant: the model it starts from (as cut,
    /// or refitted) is exported to `<dir>.student`, recovered from the
    /// dense model on the calibration windows (METHODS.md §10) into `dir`,
    /// and removed with its checkpoint.
    fn export_recovered(
        &mut self,
        method: Method,
        sparsity: Sparsity,
        variant: Variant,
        dir: &Path,
    ) -> Result<PrunedInfo> {
        let spec =
            self.spec.recover.clone().ok_or_else(|| {
                Error::Invalid("a recovered cell without recovery settings".into())
            })?;
        let sibling = |suffix: &str| {
            let mut name = dir.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            dir.with_file_name(name)
        };
        let (student_dir, ckpt) = (sibling(".student"), sibling(".checkpoint.safetensors"));
        let base = Variant {
            recover: false,
            ..variant
        };
        let info = self.export(method, sparsity, base, &student_dir)?;
        let student = Model::load_with(self.be, &student_dir, self.spec.load)?;
        let c = &self.spec.calib;
        // The recovery trains on the data of the mask's calibration.
        let data = match (variant.calib, &self.traces, &self.spec.traces) {
            (Calibration::Traces, Some((tr, digest)), Some(t)) => RecoverData {
                seqs: tr.seqs.clone(),
                source: t.path.clone(),
                digest: digest.clone(),
                traces: Some((tr.source.clone(), t.max_seq_len)),
                bos: false,
            },
            _ => RecoverData::windows(
                &self.calib_ids,
                c.seq_len,
                c.path.clone(),
                self.calib_digest.clone(),
                c.bos_for(&self.dense.cfg),
            ),
        };
        let student_digest = model_digest(&student)?;
        let teacher_digest = self.fp.0["model"]["digest"].as_str().map(str::to_string);
        let settings =
            checkpoint_settings(&spec, &data, &student_digest, teacher_digest.as_deref());
        if ckpt.exists() {
            // An interrupted cell starts over: its key, not the checkpoint, is the record.
            std::fs::remove_file(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
        }
        let t = Instant::now();
        let state = train(
            self.be,
            &student,
            Some(&self.dense),
            &spec,
            &data,
            &settings,
            &ckpt,
            None,
        )?;
        let pruning: Value = serde_json::from_slice(
            &std::fs::read(student_dir.join("pruning.json"))
                .map_err(|e| Error::io(&student_dir, e))?,
        )
        .map_err(|e| Error::format(student_dir.join("pruning.json"), e.to_string()))?;
        let sources = RecordSources {
            data_field: match variant.calib {
                Calibration::Text => c.field.as_deref(),
                Calibration::Traces => None,
            },
            teacher: Some(&self.spec.model),
            teacher_digest: teacher_digest.as_deref(),
            student_digest: &student_digest,
            backend: self.be.name(),
        };
        let record = recovery_record(
            &pruning,
            &spec,
            &data,
            &sources,
            &state,
            None,
            t.elapsed().as_secs_f64(),
        );
        export_recovered(
            self.be,
            &student,
            &state.adapters,
            spec.scale(),
            &record,
            dir,
            true,
        )?;
        drop(student);
        std::fs::remove_dir_all(&student_dir).map_err(|e| Error::io(&student_dir, e))?;
        std::fs::remove_file(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
        Ok(info)
    }

    /// One metric of `model`; its value and a one-line summary.
    fn evaluate(&self, model: &Model<B>, metric: Metric, name: &str) -> Result<(Value, String)> {
        let records_dir = self.spec.out.join("records");
        if matches!(metric, Metric::Gen | Metric::Mc) {
            output::inner_dir(&records_dir)?;
        }
        let records = |kind: &str| records_dir.join(format!("{name}.{kind}.jsonl"));
        let planned = "evaluations are planned only when requested";
        Ok(match metric {
            Metric::Ppl => {
                let p = self.spec.ppl.as_ref().expect(planned);
                let bos = bos_id(&model.cfg, p.bos_for(&model.cfg))?;
                let spec = PplWindows {
                    seq_len: p.seq_len,
                    max_windows: p.max_windows,
                    batch: p.batch,
                    bos,
                    layer_major: None,
                };
                let r = perplexity(self.be, model, &self.ppl_ids, &spec)?;
                (to_value(&r)?, format!("perplexity {:.3}", r.ppl))
            }
            Metric::TracePpl => {
                let r = trace_perplexity(self.be, model, &self.trace_ppl_seqs)?;
                (to_value(&r)?, format!("trace perplexity {:.3}", r.ppl))
            }
            Metric::Gen => {
                let args = GenArgs {
                    out: Some(records("gen")),
                    force: true, // the report's own records
                    ..self.spec.gen.clone().expect(planned)
                };
                let (r, _) = evaluate_gen(self.be, model, &self.tok, &args)?;
                let (lo, hi) = r.ci95();
                let line = format!(
                    "{} accuracy {:.3} ({}/{}, 95% interval {lo:.3}–{hi:.3})",
                    r.task, r.accuracy, r.correct, r.n
                );
                (to_value(&r)?, line)
            }
            Metric::Mc => {
                let args = McArgs {
                    out: Some(records("mc")),
                    force: true, // the report's own records
                    ..self.spec.mc.clone().expect(planned)
                };
                let (r, _) = evaluate_mc(self.be, model, &self.tok, &args)?;
                let line = format!(
                    "{} acc {:.3}, acc_norm {:.3} ({} items)",
                    r.task, r.acc, r.acc_norm, r.n
                );
                (to_value(&r)?, line)
            }
            Metric::Prefill => {
                let p = self.spec.prefill.expect(planned);
                let r = bench_prefill(self.be, &self.dense, model, p.seq_len, p.repeats)?;
                let line = format!(
                    "prefill {:.2}x ({} vs {} dense)",
                    r.speedup,
                    markdown::duration(r.pruned.median_s),
                    markdown::duration(r.dense.median_s)
                );
                (to_value(&r)?, line)
            }
        })
    }

    /// The evaluations of one model found done.
    fn evals(&self, cell: impl Fn(Metric) -> Cell) -> Result<Evals> {
        let wanted = |m: Metric| self.spec.metrics().contains(&m).then(|| cell(m));
        Ok(Evals {
            ppl: self.checked(wanted(Metric::Ppl))?,
            trace_ppl: self.checked(wanted(Metric::TracePpl))?,
            gen: self.checked(wanted(Metric::Gen))?,
            mc: self.checked(wanted(Metric::Mc))?,
        })
    }

    /// The value of cell `c` if it is finished, typed and checked for what
    /// no evaluation gives (a cell file is an input too: it may have been
    /// edited).
    fn checked<T: DeserializeOwned + Possible>(&self, c: Option<Cell>) -> Result<Option<T>> {
        let Some(c) = c else { return Ok(None) };
        let Some(v) = self.value::<Value>(&c)? else {
            return Ok(None);
        };
        let path = || self.store.path(&c.name());
        let t: T = serde_json::from_value(v).map_err(|e| {
            Error::format(
                path(),
                format!("an unexpected value ({e}); delete it to recompute the cell"),
            )
        })?;
        match t.impossible() {
            None => Ok(Some(t)),
            Some(why) => Err(Error::format(
                path(),
                format!("{why}, which no evaluation gives; delete it to recompute the cell"),
            )),
        }
    }

    /// A finished prune cell, checked against the dense model: as many
    /// layers, each layer's kept channels ascending, distinct and below
    /// its dense width, and the parameter counts of such a cut.
    fn pruned(&self, c: &Cell) -> Result<Option<PrunedInfo>> {
        let Some(p) = self.checked::<PrunedInfo>(Some(*c))? else {
            return Ok(None);
        };
        let cfg = &self.dense.cfg;
        if !(kept_fits(&p.kept, &cfg.ffn_widths) && p.params_before == cfg.param_count()) {
            return Err(Error::format(
                self.store.path(&c.name()),
                format!(
                    "a mask of {} layers that does not fit the dense model ({} layers, FFN widths {:?}, {} parameters); delete it to recompute the cell",
                    p.kept.len(),
                    cfg.layers,
                    cfg.ffn_widths,
                    cfg.param_count()
                ),
            ));
        }
        Ok(Some(p))
    }

    /// The report as the finished cells stand.
    fn assemble(&self) -> Result<Report> {
        let cfg = &self.dense.cfg;
        let params = cfg.param_count();
        let mut cells = Vec::new();
        let mut iou = Vec::new();
        for &sparsity in &self.spec.sparsities {
            let mut masks = Vec::new();
            for &method in &self.spec.methods {
                for variant in self.spec.variants() {
                    let prune = Cell::Prune {
                        method,
                        sparsity,
                        variant,
                    };
                    let pruned = self.pruned(&prune)?;
                    let metric = |metric| Cell::Pruned {
                        method,
                        sparsity,
                        variant,
                        metric,
                    };
                    cells.push(CellReport {
                        method: variant_label(method, variant),
                        calibration: variant.calib.name().into(),
                        sparsity: sparsity.get(),
                        size: pruned.as_ref().map(|p| Size {
                            widths: p.widths.clone(),
                            params_after: p.params_after,
                            params_removed_fraction: 1.0 - p.params_after as f64 / params as f64,
                        }),
                        evals: self.evals(metric)?,
                        prefill: match self.spec.prefill {
                            Some(_) => {
                                self.checked::<PrefillResult>(Some(metric(Metric::Prefill)))?
                            }
                            None => None,
                        },
                    });
                    // A refit or recovery keeps its mask: the IoU matrices list masks once.
                    if let (Some(p), true) = (pruned, variant == variant.mask()) {
                        masks.push((variant_label(method, variant), p.kept));
                    }
                }
            }
            let named: Vec<(String, &[Vec<usize>])> = masks
                .iter()
                .map(|(n, k)| (n.clone(), k.as_slice()))
                .collect();
            iou.push(IouMatrix::of(sparsity.get(), &named)?);
        }
        let remaining = self.remaining()?;
        Ok(Report {
            format: "rku-report".into(),
            version: 1,
            complete: remaining == 0,
            inputs: self.fp.0.clone(),
            model: ModelInfo {
                path: self.spec.model.display().to_string(),
                params,
                layers: cfg.layers,
                ffn_widths: cfg.ffn_widths.clone(),
            },
            stats: self.value::<StatsInfo>(&Cell::Stats(Calibration::Text))?,
            traces_stats: match self.spec.traces {
                Some(_) => self.value::<StatsInfo>(&Cell::Stats(Calibration::Traces))?,
                None => None,
            },
            methods: self
                .spec
                .methods
                .iter()
                .flat_map(|&m| self.spec.variants().into_iter().map(move |r| (m, r)))
                .map(|(m, variant)| MethodInfo {
                    name: variant_label(m, variant),
                    method: method_label(m, variant),
                    base: m.name().into(),
                    calibration: variant.calib.name().into(),
                    allocation: m.default_allocation().to_string(),
                })
                .collect(),
            sparsities: self.spec.sparsities.iter().map(|s| s.get()).collect(),
            metrics: self
                .spec
                .metrics()
                .iter()
                .map(|m| m.name().to_string())
                .collect(),
            dense: self.evals(Cell::Dense)?,
            cells,
            iou,
            plots: Vec::new(),
            run: RunInfo {
                computed: self.computed,
                skipped: self.skipped,
                remaining,
                seconds: self.start.elapsed().as_secs_f64(),
            },
        })
    }

    /// report.json, report.md and the plots, from the finished cells.
    fn write_outputs(&self) -> Result<Report> {
        let out = &self.spec.out;
        let mut r = self.assemble()?;
        r.plots = plots::write_plots(&r, out)?;
        let json = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
        replace_owned(&out.join("report.json"), json.as_bytes())?;
        replace_owned(&out.join("report.md"), markdown::render(&r).as_bytes())?;
        Ok(r)
    }
}

/// What no evaluation can give, checked on values read back from cells.
trait Possible {
    /// Why the value is impossible, if it is.
    fn impossible(&self) -> Option<String>;
}

impl Possible for PplResult {
    fn impossible(&self) -> Option<String> {
        // ppl = exp(mean NLL), an NLL is never negative, and a result counts
        // at least one predicted token.
        let exp_ok = (self.ppl - self.nll.exp()).abs() <= 1e-9 * self.ppl.abs();
        let ok = self.windows > 0 && self.tokens > 0 && self.nll >= 0.0 && self.ppl.is_finite();
        (!(ok && exp_ok)).then(|| {
            format!(
                "perplexity {} with mean NLL {} over {} windows, {} tokens",
                self.ppl, self.nll, self.windows, self.tokens
            )
        })
    }
}

impl Possible for PrunedInfo {
    fn impossible(&self) -> Option<String> {
        let ok = self.kept.iter().all(|k| is_kept_list(k))
            && self.widths.len() == self.kept.len()
            && self
                .widths
                .iter()
                .zip(&self.kept)
                .all(|(&w, k)| w == k.len())
            && self.params_after <= self.params_before;
        (!ok).then(|| {
            format!(
                "a mask of widths {:?} whose kept channels are not ascending, distinct and as many as the widths, or {} parameters after a cut of {}",
                self.widths, self.params_after, self.params_before
            )
        })
    }
}

impl Possible for PrefillResult {
    fn impossible(&self) -> Option<String> {
        let timing = |t: &Timing| {
            t.min_s > 0.0 && t.min_s <= t.median_s && t.median_s <= t.max_s && t.max_s.is_finite()
        };
        let ok = self.repeats > 0
            && self.seq_len > 0
            && timing(&self.dense)
            && timing(&self.pruned)
            && (self.speedup - self.dense.median_s / self.pruned.median_s).abs()
                <= 1e-9 * self.speedup.abs();
        (!ok).then(|| {
            format!(
                "prefill speedup {} from medians {} s and {} s over {} repeats",
                self.speedup, self.dense.median_s, self.pruned.median_s, self.repeats
            )
        })
    }
}

impl Possible for GenResult {
    fn impossible(&self) -> Option<String> {
        let ok = self.n > 0
            && self.correct <= self.n
            && (self.accuracy - self.correct as f64 / self.n as f64).abs() <= 1e-12;
        (!ok).then(|| {
            format!(
                "accuracy {} with {} of {} correct",
                self.accuracy, self.correct, self.n
            )
        })
    }
}

impl Possible for McResult {
    fn impossible(&self) -> Option<String> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let ok = self.n > 0 && unit(self.acc) && unit(self.acc_norm);
        (!ok).then(|| {
            format!(
                "acc {}, acc_norm {} over {} items",
                self.acc, self.acc_norm, self.n
            )
        })
    }
}
