//! Recovery of a pruned model by LoRA distillation from the dense model
//! (`recover`, METHODS.md section 10): the training loop, its checkpoints
//! and the merged export.
pub mod checkpoint;
pub mod export;
pub mod step;

use crate::backend::Backend;
use crate::io::traces::Sequence;
use crate::model::forward::Geometry;
use crate::model::keep::{describe, kept_layers, MemoryBudget};
use crate::model::Model;
use crate::progress::{self, Progress};
use crate::prune::stats::TraceSource;
use crate::{Error, Result};
use checkpoint::TrainState;
use std::path::{Path, PathBuf};
use std::time::Instant;
use step::{
    clip_and_update, init_adapters, loss_and_grads, lr_at, step_loss_and_grads, RecoverLoss,
};

/// The recovery's settings (METHODS.md section 10).
#[derive(Clone, Debug)]
pub struct RecoverSpec {
    pub steps: u64,
    /// Sequences per step.
    pub batch: usize,
    pub rank: usize,
    /// α; the adapters' scale is α / r.
    pub alpha: f64,
    pub lr: f64,
    pub warmup: u64,
    /// Global-norm clipping; `None`: none.
    pub max_grad_norm: Option<f64>,
    pub loss: RecoverLoss,
    pub seed: u64,
    /// Checkpoint every this many steps (and after the last).
    pub save_every: u64,
    /// The student's kept activations (`model::keep`; speed and memory only).
    pub activation_memory: MemoryBudget,
}

impl Default for RecoverSpec {
    /// METHODS.md section 10's defaults (150 steps of 8 sequences, r 8,
    /// α 16, lr 2e-4, 10 warm-up steps, clipping at 1.0, kd, seed 0).
    fn default() -> Self {
        Self {
            steps: 150,
            batch: 8,
            rank: 8,
            alpha: 16.0,
            lr: 2e-4,
            warmup: 10,
            max_grad_norm: Some(step::MAX_GRAD_NORM),
            loss: RecoverLoss::Kd,
            seed: 0,
            save_every: 25,
            activation_memory: MemoryBudget::Auto,
        }
    }
}

impl RecoverSpec {
    /// The adapters' scale s = α / r.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// Refuses settings no run could use.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.batch == 0 || self.save_every == 0 {
            return bad("--batch and --save-every must be at least 1".into());
        }
        if self.rank == 0 {
            return bad("--lora-rank must be at least 1".into());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("--lora-alpha {} must be positive", self.alpha));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be positive", self.lr));
        }
        if let Some(c) = self.max_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("--max-grad-norm {c} must be positive"));
            }
        }
        Ok(())
    }
}

/// The training data: windows of the text (every one of `seq_len`
/// tokens, all counted) or selected traces (each of its own length,
/// counted from `counted_from`), used in order: step s takes sequences
/// `(s−1)·batch + j` mod n, j < batch, in file order (METHODS.md §10).
pub struct RecoverData {
    pub seqs: Vec<Sequence>,
    pub source: PathBuf,
    /// sha256 of the window ids (windows) or `sequences_digest` (traces).
    pub digest: String,
    /// The traces file's digest, selection and token rule, and
    /// `--max-seq-len`; `None` for windows.
    pub traces: Option<(TraceSource, Option<usize>)>,
    /// Whether each window starts with BOS (METHODS.md §2); false for traces.
    pub bos: bool,
}

impl RecoverData {
    /// `[n, seq_len]` windows cut from the text at `source`; `bos`:
    /// whether each starts with BOS (the ids hold it).
    pub fn windows(
        ids: &[u32],
        seq_len: usize,
        source: PathBuf,
        digest: String,
        bos: bool,
    ) -> Self {
        Self {
            seqs: ids
                .chunks(seq_len.max(1))
                .map(|w| Sequence {
                    ids: w.to_vec(),
                    counted_from: 0,
                })
                .collect(),
            source,
            digest,
            traces: None,
            bos,
        }
    }

    /// Sequences (windows or traces).
    pub fn windows_count(&self) -> usize {
        self.seqs.len()
    }

    /// The longest sequence (every window's length).
    pub fn seq_len(&self) -> usize {
        self.seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0)
    }

    /// The sequences of step `s` (1-based): `batch` in file order, wrapping.
    pub fn batch(&self, s: u64, batch: usize) -> Vec<&Sequence> {
        let n = self.seqs.len() as u64;
        (0..batch as u64)
            .map(|j| &self.seqs[(((s - 1) * batch as u64 + j) % n) as usize])
            .collect()
    }

    /// Tokens of the steps `1..=steps` (every position, context included).
    pub fn tokens_seen(&self, steps: u64, batch: usize) -> usize {
        (1..=steps)
            .map(|s| {
                self.batch(s, batch)
                    .iter()
                    .map(|q| q.ids.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

/// The settings a checkpoint must share with the run resuming it. The step
/// count is not one of them: the learning rate does not depend on it, so a
/// run resumed with more steps continues the same training (a longer run,
/// or a curve of checkpoints exported along the way).
pub fn checkpoint_settings(
    spec: &RecoverSpec,
    data: &RecoverData,
    student_digest: &str,
    teacher_digest: Option<&str>,
) -> serde_json::Value {
    let mut settings = serde_json::json!({
        "student_digest": student_digest,
        "teacher_digest": teacher_digest,
        "data_digest": data.digest,
        "seq_len": data.seq_len(),
        "batch": spec.batch,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "lr": spec.lr,
        "warmup": spec.warmup,
        "max_grad_norm": spec.max_grad_norm,
        "loss": spec.loss.name(),
        "seed": spec.seed,
    });
    // Only with traces: a windows checkpoint keeps the settings it had.
    if let Some((t, max_seq_len)) = &data.traces {
        settings["traces_digest"] = t.digest.clone().into();
        settings["traces_selection"] = t.selection.clone().into();
        settings["traces_tokens"] = t.tokens.clone().into();
        settings["traces_max_seq_len"] = serde_json::json!(max_seq_len);
    }
    settings
}

/// Where the training data and the teacher came from, for the record.
pub struct RecordSources<'a> {
    pub data_field: Option<&'a str>,
    pub teacher: Option<&'a Path>,
    pub teacher_digest: Option<&'a str>,
    pub student_digest: &'a str,
    pub backend: &'a str,
}

/// `pruning` (the student's pruning.json) with the `recovery` record of a
/// finished run (METHODS.md §10); an earlier recovery moves to its
/// `previous`.
pub fn recovery_record(
    pruning: &serde_json::Value,
    spec: &RecoverSpec,
    data: &RecoverData,
    src: &RecordSources,
    state: &TrainState<impl Backend>,
    resumed_from: Option<u64>,
    train_s: f64,
) -> serde_json::Value {
    let mut record = pruning.clone();
    let previous = record.get("recovery").cloned();
    record["recovery"] = serde_json::json!({
        "method": "lora",
        "loss": spec.loss.name(),
        "steps": spec.steps,
        "batch": spec.batch,
        "seq_len": data.seq_len(),
        "rank": spec.rank,
        "alpha": spec.alpha,
        "lr": spec.lr,
        "warmup": spec.warmup,
        "max_grad_norm": spec.max_grad_norm,
        "seed": spec.seed,
        "adapted": crate::model::lora::Proj::ALL.map(|p| p.name()),
        "teacher": src.teacher.map(|p| p.display().to_string()),
        "teacher_digest": src.teacher_digest,
        "student_digest": src.student_digest,
        "data": {
            "source": data.source.display().to_string(),
            "field": src.data_field,
            "digest": data.digest,
            "windows": data.windows_count(),
            "bos": data.bos,
            "tokens_seen": data.tokens_seen(spec.steps, spec.batch),
            "traces": data.traces.as_ref().map(|(t, max_seq_len)| serde_json::json!({
                "digest": t.digest,
                "selection": t.selection,
                "tokens": t.tokens,
                "max_seq_len": max_seq_len,
                "counted": data.seqs.iter().map(Sequence::predicted).sum::<usize>(),
            })),
        },
        "losses": state.losses,
        "resumed_from_step": resumed_from,
        "train_s": train_s,
        "backend": src.backend,
        "previous": previous,
    });
    record
}

/// Checks that `teacher` can teach `student`: the same architecture,
/// vocabulary, layer count and attention shapes (only FFN widths differ).
pub fn check_teacher<B: Backend>(student: &Model<B>, teacher: &Model<B>) -> Result<()> {
    let (s, t) = (&student.cfg, &teacher.cfg);
    let pairs = [
        ("vocab_size", s.vocab, t.vocab),
        ("num_hidden_layers", s.layers, t.layers),
        ("hidden_size", s.hidden, t.hidden),
        ("num_attention_heads", s.heads, t.heads),
        ("num_key_value_heads", s.kv_heads, t.kv_heads),
        ("head_dim", s.head_dim, t.head_dim),
    ];
    if s.arch != t.arch {
        return Err(Error::Invalid(format!(
            "teacher {} is a {:?} model, the student {} a {:?}",
            teacher.dir.display(),
            t.arch,
            student.dir.display(),
            s.arch
        )));
    }
    for (what, a, b) in pairs {
        if a != b {
            return Err(Error::Invalid(format!(
                "teacher {} has {what} {b}, the student {} has {a}: not the same model family",
                teacher.dir.display(),
                student.dir.display()
            )));
        }
    }
    Ok(())
}

/// Trains adapters on `student` (from `resume`'s state when given, else
/// fresh from the seed) for the remaining steps of `spec`, saving to
/// `ckpt` every `save_every` steps and after the last. Calls
/// `on_step(step, loss, grad_norm)` after each step. A non-finite loss,
/// gradient or updated adapter stops the run, before anything non-finite
/// is saved, with an error naming the last good checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend>(
    be: &B,
    student: &Model<B>,
    teacher: Option<&Model<B>>,
    spec: &RecoverSpec,
    data: &RecoverData,
    settings: &serde_json::Value,
    ckpt: &Path,
    resume: Option<TrainState<B>>,
) -> Result<TrainState<B>> {
    spec.check()?;
    if data.seqs.len() < spec.batch.max(1) {
        return Err(Error::Invalid(format!(
            "{}: {} training sequences, fewer than one batch of {}",
            data.source.display(),
            data.seqs.len(),
            spec.batch
        )));
    }
    let mut state = match resume {
        Some(s) => s,
        None => {
            let adapters = init_adapters(be, &student.cfg, spec.rank, spec.seed)?;
            let (m, v) = (adapters.zeros_like(be)?, adapters.zeros_like(be)?);
            TrainState {
                step: 0,
                adapters,
                m,
                v,
                losses: Vec::new(),
            }
        }
    };
    let scale = spec.scale();
    let acts_budget = acts_budget(be, student, spec, data.seqs[0].ids.len())?;
    let mut grads = state.adapters.zeros_like(be)?;
    let left = spec.steps.saturating_sub(state.step);
    let bar = Progress::new(left, "recover");
    let start = Instant::now();
    let mut last_saved = state.step;
    while state.step < spec.steps {
        let s = state.step + 1;
        grads.zero(be)?;
        let seqs = data.batch(s, spec.batch);
        let loss = step_loss_and_grads(
            be,
            student,
            teacher,
            (&state.adapters, scale),
            &mut grads,
            &seqs,
            spec.loss,
            acts_budget,
        )?;
        let stop = |what: String| {
            Error::Invalid(match last_saved {
                0 => format!("step {s}: {what}; stopped before any checkpoint was saved"),
                _ => format!(
                    "step {s}: {what}; stopped. The last good checkpoint is {} (step {last_saved})",
                    ckpt.display()
                ),
            })
        };
        if !loss.is_finite() {
            return Err(stop(format!("the loss is {loss}")));
        }
        let lr = lr_at(spec.lr, spec.warmup, s);
        let (m, v) = (&mut state.m, &mut state.v);
        let norm = clip_and_update(
            be,
            &mut state.adapters,
            &grads,
            (m, v),
            lr,
            spec.max_grad_norm,
            s,
        )
        .map_err(|e| stop(e.to_string()))?;
        // A finite gradient can still overflow the update (a huge --lr):
        // the adapters and the second moment are checked before they can
        // be saved.
        for (what, set) in [("adapters", &state.adapters), ("AdamW's v", &state.v)] {
            if !set.sum_squares(be)?.is_finite() {
                return Err(stop(format!(
                    "the updated {what} are not finite (lr {lr:e})"
                )));
            }
        }
        state.step = s;
        state.losses.push(loss);
        bar.inc(1);
        let done = state.step - (spec.steps - left);
        if s % 10 == 0 || s == spec.steps {
            let per = start.elapsed().as_secs_f64() / done as f64;
            progress::println(&format!(
                "step {s}/{}: loss {loss:.4}, |g| {norm:.3}, lr {lr:.2e} ({per:.2} s/step, ~{:.0} s left)",
                spec.steps,
                per * (spec.steps - s) as f64
            ));
        }
        if s % spec.save_every == 0 || s == spec.steps {
            checkpoint::save(be, &state, settings, ckpt)?;
            last_saved = s;
        }
    }
    bar.finish();
    Ok(state)
}

/// `spec`'s activation-memory budget in bytes (`auto` resolved against the
/// backend), printing what it keeps for a batch of sequences of `t` tokens.
fn acts_budget<B: Backend>(
    be: &B,
    student: &Model<B>,
    spec: &RecoverSpec,
    t: usize,
) -> Result<u64> {
    let bytes = spec
        .activation_memory
        .resolve("--activation-memory", || be.available_memory())?;
    let geo = Geometry {
        seqs: spec.batch,
        t,
    };
    let kept = kept_layers(&student.cfg, geo, true, bytes);
    progress::println(&describe(student.cfg.layers, geo, bytes, kept));
    Ok(bytes)
}

/// What `bench recover` measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecoverBench {
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub steps: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// Times `steps` LoRA-KD training steps (METHODS.md section 10: loss and
/// adapter gradients, clipping, AdamW) of `batch` × `seq_len` synthetic
/// tokens after one warm-up step, the model being its own teacher (the
/// teacher's forward runs without the adapters, as in a real run).
pub fn bench_recover<B: Backend>(
    be: &B,
    model: &Model<B>,
    batch: usize,
    seq_len: usize,
    steps: usize,
    rank: usize,
    activation_memory: MemoryBudget,
) -> Result<RecoverBench> {
    let spec = RecoverSpec {
        rank,
        alpha: 2.0 * rank as f64,
        batch,
        activation_memory,
        ..RecoverSpec::default()
    };
    let geo = Geometry {
        seqs: batch,
        t: seq_len,
    };
    let ids = crate::model::forward::synthetic_ids(geo.rows(), model.cfg.vocab);
    let acts_budget = acts_budget(be, model, &spec, seq_len)?;
    let mut adapters = init_adapters(be, &model.cfg, rank, 0)?;
    let mut grads = adapters.zeros_like(be)?;
    let (mut m, mut v) = (adapters.zeros_like(be)?, adapters.zeros_like(be)?);
    let mut one = |t: u64| -> Result<()> {
        grads.zero(be)?;
        let scale = spec.scale();
        loss_and_grads(
            be,
            model,
            Some(model),
            (&adapters, scale),
            &mut grads,
            &ids,
            geo,
            RecoverLoss::Kd,
            acts_budget,
        )?;
        clip_and_update(
            be,
            &mut adapters,
            &grads,
            (&mut m, &mut v),
            spec.lr,
            spec.max_grad_norm,
            t,
        )?;
        Ok(())
    };
    one(1)?;
    let start = Instant::now();
    for t in 0..steps as u64 {
        one(t + 2)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(RecoverBench {
        batch,
        seq_len,
        rank,
        steps,
        seconds,
        tokens_per_s: (steps * geo.rows()) as f64 / seconds,
    })
}
