//! `rku-engine prune`: statistics (computed or read), then one pruned model
//! per sparsity; with `--progressive`, the steps of a progressive pruning
//! (commands/progressive.rs).
use crate::cli::args::PruneArgs;
use crate::cli::commands::score::{calib_source, run_scoring};
use crate::cli::{check_output, load_model};
use anyhow::{bail, Context, Result};
use rku_engine::backend::Backend;
use rku_engine::io::output::MODEL_DIR;
use rku_engine::io::text::Tokenizer;
use rku_engine::prune::calibrate::down_column_norms;
use rku_engine::prune::job::output_dirs;
use rku_engine::prune::pipeline::{check_stats_match, prune_model};
use rku_engine::prune::refit::RefitWindows;
use rku_engine::prune::traces::{sequences_digest, trace_sequences};
use rku_engine::prune::{merge, PruneJob, Stats};

pub fn run<B: Backend>(be: &B, a: &PruneArgs) -> Result<()> {
    if let Some(schedule) = &a.progressive {
        return super::progressive::run(be, a, schedule);
    }
    let Some(sparsities) = a.sparsity.as_ref().map(|s| &s.0) else {
        bail!("--sparsity (or --progressive) is needed");
    };
    let outs = output_dirs(&a.out, a.method, sparsities);
    let inputs: Vec<&std::path::Path> = [&a.model]
        .into_iter()
        .chain(&a.calib.calib)
        .chain(&a.calib.traces)
        .chain(&a.refit_calib)
        .chain(&a.refit_traces)
        .chain(&a.stats)
        .map(|p| p.as_path())
        .collect();
    for o in &outs {
        check_output(inputs.iter().copied(), o, MODEL_DIR, a.force)?;
    }
    let flags = a.calib.trace_flags();
    if a.calib.traces.is_none() && a.refit_traces.is_none() && !flags.is_empty() {
        bail!(
            "{} apply to traces: they need --traces FILE or --refit-traces FILE",
            flags.join(", ")
        );
    }
    // The refit's calibration: --refit-traces, or the windows of
    // --refit-calib, else of the scoring text.
    let refit = a.refit.spec();
    let refit_text = match (refit, &a.refit_traces) {
        (None, _) | (Some(_), Some(_)) => None,
        (Some(_), None) => match a.refit_calib.as_ref().or(a.calib.calib.as_ref()) {
            Some(path) => Some(a.calib.windows.source(path.clone())),
            None => bail!(
                "--refit needs calibration text or traces: --refit-calib FILE (or --calib), \
                 or --refit-traces FILE"
            ),
        },
    };
    // Read and selected before any scoring: a bad file fails at once.
    let refit_traces = match (refit, &a.refit_traces) {
        (Some(_), Some(path)) => {
            let (sel, rule) = (
                a.calib.select.unwrap_or_default(),
                a.calib.tokens.unwrap_or_default(),
            );
            let tr = trace_sequences(path, &a.model, sel, rule, a.calib.max_seq_len)?;
            eprintln!(
                "refit traces: {} of {} selected ({sel}) from {}, counting {rule} tokens (file digest {}…)",
                tr.seqs.len(),
                tr.total,
                path.display(),
                &tr.source.digest[..12]
            );
            if let Some(t) = a.calib.max_seq_len {
                eprintln!("--max-seq-len {t}: {} refit traces truncated", tr.truncated);
            }
            Some(RefitWindows {
                digest: sequences_digest(&tr.seqs),
                seqs: tr.seqs,
                batch: a.calib.windows.batch,
                source: path.clone(),
                traces: Some(tr.source),
                bos: false,
                layer_major: a.calib.windows.layer_major.get(),
            })
        }
        _ => None,
    };
    let scoring = a.stats.is_empty();
    let source = match scoring {
        true => calib_source(&a.calib)?,
        false => None,
    };
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = match (scoring, a.stats.as_slice()) {
        (true, _) => run_scoring(be, &model, source.as_ref(), &a.calib, None)?,
        (false, [one]) => Stats::load(one)?,
        (false, many) => merge(many, false)?,
    };
    if !scoring {
        // Statistics read from files: a mismatch names them.
        check_stats_match(&model, &stats).with_context(|| {
            let files: Vec<String> = a.stats.iter().map(|p| p.display().to_string()).collect();
            format!("--stats {}", files.join(", "))
        })?;
    }
    let norms = down_column_norms(&model)?;
    let refit_windows = match (refit_traces, &refit_text) {
        (Some(traces), _) => Some(traces),
        (None, Some(source)) => {
            let (ids, digest) = source.windows(&model, &Tokenizer::load(&model.dir)?)?;
            Some(RefitWindows {
                layer_major: source.layer_major,
                ..RefitWindows::windows(
                    &ids,
                    source.seq_len,
                    source.batch,
                    source.path.clone(),
                    digest,
                    source.bos_for(&model.cfg),
                )
            })
        }
        (None, None) => None,
    };
    for (&sparsity, out) in sparsities.iter().zip(outs) {
        let job = PruneJob {
            method: a.method,
            allocation: a.allocation.unwrap_or(a.method.default_allocation()),
            sparsity,
            min_keep: a.min_keep,
            align: a.align,
            layout: a.export,
            out,
            force: a.force,
            refit,
        };
        let r = prune_model(be, &model, &stats, &norms, &job, refit_windows.as_ref())?;
        println!(
            "{} at sparsity {}: {} -> {} parameters ({:.1}% removed), widths {}..{}, wrote {}",
            r.method,
            r.sparsity,
            r.params_before,
            r.params_after,
            100.0 * (1.0 - r.params_after as f64 / r.params_before as f64),
            r.widths.iter().min().unwrap_or(&0),
            r.widths.iter().max().unwrap_or(&0),
            r.out.display()
        );
    }
    Ok(())
}
