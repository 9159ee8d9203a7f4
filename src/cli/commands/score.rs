//! `rku-engine score`: the statistics pass over calibration windows and/or
//! self-generated traces.
use crate::cli::args::{CalibArgs, ScoreArgs};
use crate::cli::{check_output, load_model};
use anyhow::{bail, Result};
use rku_engine::backend::Backend;
use rku_engine::io::text::Tokenizer;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{collect_sequence_stats, collect_stats, CalibSource, Sequence};
use rku_engine::prune::stats::STATS_FILE;
use rku_engine::prune::traces::{sequences_digest, trace_sequences, TokenRule};
use rku_engine::prune::Stats;
use std::time::Instant;

pub fn run<B: Backend>(be: &B, a: &ScoreArgs) -> Result<()> {
    let inputs = [
        Some(&a.model),
        a.calib.calib.as_ref(),
        a.calib.traces.as_ref(),
    ];
    check_output(
        inputs.into_iter().flatten().map(|p| p.as_path()),
        &a.out,
        STATS_FILE,
        a.force,
    )?;
    let flags = a.calib.trace_flags();
    if a.calib.traces.is_none() && !flags.is_empty() {
        bail!(
            "{} apply to traces: they need --traces FILE",
            flags.join(", ")
        );
    }
    let source = calib_source(&a.calib)?;
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = run_scoring(be, &model, source.as_ref(), &a.calib)?;
    stats.save_with(&a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The calibration windows the flags describe (METHODS.md §2), if any:
/// `None` when only --traces is given. Errs without either, and on
/// `--tokens generated` with windows and traces scored together (windows
/// have no generated positions).
pub fn calib_source(c: &CalibArgs) -> Result<Option<CalibSource>> {
    match (&c.calib, &c.traces) {
        (None, None) => {
            bail!("calibration needed: pass --calib FILE and/or --traces FILE (or --stats)")
        }
        (Some(_), Some(_)) if c.tokens == Some(TokenRule::Generated) => bail!(
            "--tokens generated counts only the generated positions of traces; \
             calibration windows (--calib) have none: drop --calib or use --tokens all"
        ),
        (Some(path), _) => Ok(Some(c.windows.source(path.clone()))),
        (None, Some(_)) => Ok(None),
    }
}

/// Windows the calibration text and/or reads the traces, and runs the
/// statistics pass on `model`. Windows alone run as they always have;
/// with traces, the windows (every token counted) and the selected traces
/// are scored together, their counts adding up (METHODS.md §11).
pub fn run_scoring<B: Backend>(
    be: &B,
    model: &Model<B>,
    source: Option<&CalibSource>,
    c: &CalibArgs,
) -> Result<Stats> {
    let spec = c
        .windows
        .source(Default::default())
        .spec(c.objective.objectives());
    let tok = Tokenizer::load(&model.dir)?;
    let windows = match source {
        Some(source) => {
            let (ids, digest) = source.windows(model, &tok)?;
            eprintln!(
                "calibration: {} sequences x {} tokens from {} ({}; digest {}…)",
                source.samples,
                source.seq_len,
                source.path.display(),
                if source.bos_for(&model.cfg) {
                    "each after BOS"
                } else {
                    "without BOS"
                },
                &digest[..12]
            );
            Some((ids, digest, source))
        }
        None => None,
    };
    let t = Instant::now();
    let (stats, scored) = match (windows, &c.traces) {
        (Some((ids, digest, source)), None) => {
            let spec = source.spec(c.objective.objectives());
            (collect_stats(be, model, &ids, spec, digest)?, ids.len())
        }
        (windows, Some(path)) => {
            let (sel, rule) = (c.select.unwrap_or_default(), c.tokens.unwrap_or_default());
            let tr = trace_sequences(path, &model.dir, sel, rule, c.max_seq_len)?;
            eprintln!(
                "traces: {} of {} selected ({sel}) from {}, counting {rule} tokens (file digest {}…)",
                tr.seqs.len(),
                tr.total,
                path.display(),
                &tr.source.digest[..12]
            );
            if let Some(t) = c.max_seq_len {
                eprintln!("--max-seq-len {t}: {} traces truncated", tr.truncated);
            }
            let mut seqs: Vec<Sequence> = match windows {
                Some((ids, _, source)) => ids
                    .chunks_exact(source.seq_len)
                    .map(|w| Sequence {
                        ids: w.to_vec(),
                        counted_from: 0,
                    })
                    .collect(),
                None => Vec::new(),
            };
            seqs.extend(tr.seqs);
            let digest = sequences_digest(&seqs);
            let stats = collect_sequence_stats(be, model, &seqs, spec, digest, Some(tr.source))?;
            let n = seqs.iter().map(|s| s.ids.len()).sum();
            (stats, n)
        }
        (None, None) => bail!("calibration needed: pass --calib FILE and/or --traces FILE"),
    };
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scored {scored} tokens ({} counted, {}) in {secs:.1}s: {:.0} tokens/s",
        stats.meta.tokens,
        stats.meta.objectives,
        scored as f64 / secs
    );
    Ok(stats)
}
