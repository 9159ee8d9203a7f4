//! `rku-engine recover`: LoRA distillation of a pruned model from its
//! dense teacher, checkpointed, merged into a new model directory.
use crate::cli::args::RecoverArgs;
use crate::cli::{check_output, load_model};
use anyhow::{bail, Context, Result};
use rku_engine::backend::Backend;
use rku_engine::io::output::MODEL_DIR;
use rku_engine::io::text::{read_text, token_digest, windows, Tokenizer};
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{bos_id, model_digest};
use rku_engine::prune::traces::{sequences_digest, trace_sequences};
use rku_engine::recover::checkpoint::{self, TrainState};
use rku_engine::recover::export::export_recovered;
use rku_engine::recover::step::{init_adapters, RecoverLoss};
use rku_engine::recover::{
    check_teacher, checkpoint_settings, recovery_record, train, RecordSources, RecoverData,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where `recover --out DIR` keeps its checkpoint: `DIR.checkpoint.safetensors`.
pub fn checkpoint_path(out: &std::path::Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".checkpoint.safetensors");
    out.with_file_name(name)
}

pub fn run<B: Backend>(be: &B, a: &RecoverArgs) -> Result<()> {
    let spec = a.spec();
    spec.check()?;
    let inputs = [
        Some(&a.model),
        a.teacher.as_ref(),
        a.data.as_ref(),
        a.traces.as_ref(),
    ];
    check_output(
        inputs.into_iter().flatten().map(|p| p.as_path()),
        &a.out,
        MODEL_DIR,
        a.force,
    )?;
    let ckpt = a
        .checkpoint
        .clone()
        .unwrap_or_else(|| checkpoint_path(&a.out));
    // Refused now, not at the first save: a checkpoint path that is an
    // input, a link or another kind of file.
    rku_engine::io::output::check(&ckpt, checkpoint::CHECKPOINT_FILE, true)?;
    // The output directory is written whole, under a temporary name, at the
    // end: a checkpoint inside it would make that final step fail after
    // the whole training.
    if rku_engine::io::output::lies_within(&ckpt, &a.out)? {
        bail!(
            "--checkpoint {} lies inside --out {}, which is written whole at the end: \
             put the checkpoint beside it",
            ckpt.display(),
            a.out.display()
        );
    }
    let ckpt_meta = ckpt.symlink_metadata();
    if ckpt_meta.as_ref().is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "--checkpoint {} is a symbolic link: a checkpoint is read and replaced in place, \
             never through a link; name the file itself",
            ckpt.display()
        );
    }
    let ckpt_exists = ckpt_meta.is_ok();
    if ckpt_exists && !a.resume && !a.force {
        bail!(
            "{} holds the checkpoint of an earlier run: pass --resume to continue it, or \
             --force to start over",
            ckpt.display()
        );
    }
    if spec.loss == RecoverLoss::Kd && a.teacher.is_none() {
        bail!("--loss kd needs --teacher DIR (the dense model), or use --loss ce");
    }

    // Traces are read, checked and selected before any model is loaded.
    let traces = match &a.traces {
        Some(path) => {
            let tr = trace_sequences(path, &a.model, a.select, a.tokens, a.max_seq_len)?;
            eprintln!(
                "traces: {} of {} selected ({}) from {}, counting {} tokens (file digest {}…)",
                tr.seqs.len(),
                tr.total,
                a.select,
                path.display(),
                a.tokens,
                &tr.source.digest[..12]
            );
            if let Some(t) = a.max_seq_len {
                eprintln!("--max-seq-len {t}: {} traces truncated", tr.truncated);
            }
            if tr.seqs.len() < spec.batch {
                bail!(
                    "{}: --select {} keeps {} traces, fewer than one batch of {}",
                    path.display(),
                    a.select,
                    tr.seqs.len(),
                    spec.batch
                );
            }
            let data = RecoverData {
                digest: sequences_digest(&tr.seqs),
                seqs: tr.seqs,
                source: path.clone(),
                traces: Some((tr.source, a.max_seq_len)),
                bos: false,
            };
            // The batches repeat after n steps at most.
            let period = spec.steps.min(data.seqs.len() as u64);
            if let Some(i) =
                (1..=period).find(|&s| data.batch(s, spec.batch).iter().all(|q| q.predicted() == 0))
            {
                bail!(
                    "{}: step {i}'s {} traces predict no counted token (--tokens {}): \
                     select traces with generated tokens",
                    path.display(),
                    spec.batch,
                    a.tokens
                );
            }
            Some(data)
        }
        None => None,
    };
    let student = load_model(be, &a.model, &a.common, None)?;
    let pruning_path = a.model.join("pruning.json");
    let pruning: serde_json::Value = match std::fs::read(&pruning_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not JSON", pruning_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pruning_path.display())),
    };
    if !pruning.is_object() {
        bail!("{}: not a JSON object", pruning_path.display());
    }
    if pruning.get("export").and_then(|v| v.as_str()) == Some("padded") {
        bail!(
            "{} is a padded export: adapters would revive its zeroed channels; recover the \
             compact export (prune --export compact)",
            a.model.display()
        );
    }
    let teacher = match (&a.teacher, spec.loss) {
        (Some(dir), RecoverLoss::Kd) => {
            let t = load_model(be, dir, &a.common, None)?;
            check_teacher(&student, &t)?;
            Some(t)
        }
        _ => None,
    };
    let student_digest = model_digest(&student)?;
    let teacher_digest = teacher.as_ref().map(model_digest).transpose()?;
    if let (Some(src), Some(td)) = (
        pruning.get("source_model_digest").and_then(|v| v.as_str()),
        teacher_digest.as_deref(),
    ) {
        if src != td {
            eprintln!(
                "note: the teacher is not the model {} was pruned from (pruning.json's source digest differs)",
                a.model.display()
            );
        }
    }

    let data = match (traces, &a.data) {
        (Some(data), _) => data,
        (None, Some(path)) => text_windows(a, path, &student, spec.steps as usize * spec.batch)?,
        (None, None) => bail!("training data needed: --data FILE or --traces FILE"),
    };
    let settings = checkpoint_settings(&spec, &data, &student_digest, teacher_digest.as_deref());
    let resume: Option<TrainState<B>> = match (a.resume, ckpt_exists) {
        (true, true) => {
            let like = init_adapters(be, &student.cfg, spec.rank, spec.seed)?;
            let s = checkpoint::load(be, &like, &settings, &ckpt)?;
            if s.step > spec.steps {
                bail!(
                    "{} is at step {}, past --steps {}",
                    ckpt.display(),
                    s.step,
                    spec.steps
                );
            }
            eprintln!("resuming from {} at step {}", ckpt.display(), s.step);
            Some(s)
        }
        (true, false) => {
            eprintln!(
                "note: no checkpoint at {}; starting at step 0",
                ckpt.display()
            );
            None
        }
        (false, _) => None,
    };
    let resumed_from = resume.as_ref().map(|s| s.step);

    let t0 = Instant::now();
    let state = train(
        be,
        &student,
        teacher.as_ref(),
        &spec,
        &data,
        &settings,
        &ckpt,
        resume,
    )?;
    let train_s = t0.elapsed().as_secs_f64();
    let trained = spec.steps - resumed_from.unwrap_or(0);
    let tokens = data.tokens_seen(spec.steps, spec.batch)
        - data.tokens_seen(resumed_from.unwrap_or(0), spec.batch);
    let sources = RecordSources {
        data_field: a.field.as_deref(),
        teacher: a.teacher.as_deref(),
        teacher_digest: teacher_digest.as_deref(),
        student_digest: &student_digest,
        backend: be.name(),
    };
    let record = recovery_record(
        &pruning,
        &spec,
        &data,
        &sources,
        &state,
        resumed_from,
        train_s,
    );
    let out = export_recovered(
        be,
        &student,
        &state.adapters,
        spec.scale(),
        &record,
        &a.out,
        a.force,
    )?;
    // The default checkpoint goes once the output exists (it holds nothing
    // the output needs); one named by --checkpoint is kept, to go on later.
    let ckpt_note = match &a.checkpoint {
        Some(_) => format!("checkpoint kept at {}", ckpt.display()),
        None => {
            std::fs::remove_file(&ckpt)
                .with_context(|| format!("removing the checkpoint {}", ckpt.display()))?;
            "checkpoint removed".to_string()
        }
    };
    let last = &state.losses[state.losses.len().saturating_sub(10)..];
    println!(
        "recovered {} in {} steps ({} loss {:.4} → {:.4}, mean of the last {} {:.4}); trained {trained} steps in {train_s:.1}s ({:.0} tokens/s); wrote {} ({ckpt_note})",
        a.model.display(),
        spec.steps,
        spec.loss.name(),
        state.losses.first().copied().unwrap_or(f64::NAN),
        state.losses.last().copied().unwrap_or(f64::NAN),
        last.len(),
        last.iter().sum::<f64>() / last.len().max(1) as f64,
        tokens as f64 / train_s.max(1e-9),
        out.display(),
    );
    Ok(())
}

/// The windows of `--data` (every window of the text: the digest must not
/// depend on --steps), at least one batch of them; says how many epochs
/// the `wanted` windows take.
fn text_windows<B: Backend>(
    a: &RecoverArgs,
    path: &Path,
    student: &Model<B>,
    wanted: usize,
) -> Result<RecoverData> {
    let batch = a.batch;
    let tok = Tokenizer::load(&a.model)?;
    let ids = tok.encode(&read_text(path, a.field.as_deref())?)?;
    let bos = bos_id(
        &student.cfg,
        a.bos.unwrap_or(student.cfg.arch.bos_by_default()),
    )?;
    let per = a.seq_len - usize::from(bos.is_some());
    let n = ids.len() / per;
    if n < batch {
        bail!(
            "{}: {} tokens make {n} windows of {} tokens, fewer than one batch of {batch}",
            path.display(),
            ids.len(),
            a.seq_len,
        );
    }
    let w = windows(&ids, n, a.seq_len, bos)?;
    if n < wanted {
        eprintln!(
            "note: {} has {n} windows of {} tokens; the {wanted} of {} steps × {batch} reuse them ({:.2} epochs)",
            path.display(),
            a.seq_len,
            a.steps,
            wanted as f64 / n as f64
        );
    }
    Ok(RecoverData::windows(
        &w,
        a.seq_len,
        path.to_path_buf(),
        token_digest(&w),
        bos.is_some(),
    ))
}
