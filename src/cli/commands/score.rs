//! `rku-engine score`: the statistics pass over calibration windows and/or
//! self-generated traces.
use crate::cli::args::{CalibArgs, ScoreArgs};
use crate::cli::{check_output, load_model};
use anyhow::{bail, Result};
use rku_engine::backend::Backend;
use rku_engine::io::text::token_digest;
use rku_engine::io::text::Tokenizer;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{collect_sequence_stats, collect_stats, CalibSource, Sequence};
use rku_engine::prune::shard::ShardSpec;
use rku_engine::prune::stats::STATS_FILE;
use rku_engine::prune::traces::{sequences_digest, trace_sequences, TokenRule};
use rku_engine::prune::Stats;
use rku_engine::prune::{Norms, ShardRecord};
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
    let shard = match a.shard {
        Some(s) => Some((s, "--shard")),
        None => ShardSpec::from_env(|k| std::env::var(k).ok())?,
    };
    match shard {
        Some((s, from)) => eprintln!("shard {s} (from {from})"),
        None => eprintln!("shard: none (the whole calibration set)"),
    }
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = run_scoring(be, &model, source.as_ref(), &a.calib, shard.map(|(s, _)| s))?;
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
/// are scored together, their counts adding up (METHODS.md §11). With a
/// `shard`, only its share of the sequences is scored, normalised as the
/// whole set (METHODS.md §4).
pub fn run_scoring<B: Backend>(
    be: &B,
    model: &Model<B>,
    source: Option<&CalibSource>,
    c: &CalibArgs,
    shard: Option<ShardSpec>,
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
                "calibration: {} sequences x {} tokens from {} (digest {}…)",
                source.samples,
                source.seq_len,
                source.path.display(),
                &digest[..12]
            );
            Some((ids, digest, source))
        }
        None => None,
    };
    let t = Instant::now();
    let mut set: Option<ShardRecord> = None;
    let (mut stats, scored) = match (windows, &c.traces) {
        (Some((ids, digest, source)), None) => {
            let mut spec = source.spec(c.objective.objectives());
            let (ids, digest) = match shard {
                None => (ids, digest),
                Some(s) => {
                    let windows: Vec<&[u32]> = ids.chunks_exact(source.seq_len).collect();
                    let share: Vec<u32> = s.share(&windows).concat();
                    spec.norms = Some(Norms {
                        energy: (source.samples * source.seq_len) as u64,
                        ce: (source.samples * (source.seq_len - 1)) as u64,
                    });
                    spec.samples = share.len() / source.seq_len;
                    set = Some(shard_record(s, source.samples, digest, spec.samples)?);
                    let share_digest = token_digest(&share);
                    (share, share_digest)
                }
            };
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
            let mut digest = sequences_digest(&seqs);
            let mut spec = spec;
            if let Some(s) = shard {
                spec.norms = Some(Norms {
                    energy: seqs.iter().map(Sequence::counted).sum::<usize>() as u64,
                    ce: seqs.iter().map(Sequence::predicted).sum::<usize>() as u64,
                });
                let share = s.share(&seqs);
                set = Some(shard_record(s, seqs.len(), digest, share.len())?);
                digest = sequences_digest(&share);
                seqs = share;
            }
            let stats = collect_sequence_stats(be, model, &seqs, spec, digest, Some(tr.source))?;
            let n = seqs.iter().map(|s| s.ids.len()).sum();
            (stats, n)
        }
        (None, None) => bail!("calibration needed: pass --calib FILE and/or --traces FILE"),
    };
    stats.meta.shard = set;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scored {scored} tokens ({} counted, {}) in {secs:.1}s: {:.0} tokens/s",
        stats.meta.tokens,
        stats.meta.objectives,
        scored as f64 / secs
    );
    Ok(stats)
}

/// The record of shard `s` of a set of `set_samples` sequences whose one
/// pass would record `set_digest`; says which sequences it holds, and errs
/// when it holds none.
fn shard_record(
    s: ShardSpec,
    set_samples: usize,
    set_digest: String,
    held: usize,
) -> Result<ShardRecord> {
    if held == 0 {
        bail!(
            "shard {s} holds no sequence: the calibration set has only {set_samples} \
             (use at most {set_samples} shards)"
        );
    }
    let first: Vec<String> = (s.index..set_samples)
        .step_by(s.count)
        .take(6)
        .map(|j| j.to_string())
        .collect();
    let more = if held > first.len() { ", …" } else { "" };
    eprintln!(
        "shard {s}: sequences {}{more} ({held} of {set_samples}), normalised as the whole set",
        first.join(", ")
    );
    Ok(ShardRecord {
        index: s.index,
        count: s.count,
        set_samples,
        set_digest,
    })
}
