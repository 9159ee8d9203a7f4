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
        .chain(&a.stats)
        .map(|p| p.as_path())
        .collect();
    for o in &outs {
        check_output(inputs.iter().copied(), o, MODEL_DIR, a.force)?;
    }
    // The refit's windows: --refit-calib, else the scoring text.
    let refit = a.refit.spec();
    let refit_text = match (refit, a.refit_calib.as_ref().or(a.calib.calib.as_ref())) {
        (Some(_), Some(path)) => Some(a.calib.windows.source(path.clone())),
        (Some(_), None) => bail!("--refit needs calibration text: --refit-calib FILE (or --calib)"),
        (None, _) => None,
    };
    let scoring = a.stats.is_empty();
    let source = match scoring {
        true => calib_source(&a.calib)?,
        false => None,
    };
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = match (scoring, a.stats.as_slice()) {
        (true, _) => run_scoring(be, &model, source.as_ref(), &a.calib)?,
        (false, [one]) => Stats::load(one)?,
        (false, many) => merge(many)?,
    };
    if !scoring {
        // Statistics read from files: a mismatch names them.
        check_stats_match(&model, &stats).with_context(|| {
            let files: Vec<String> = a.stats.iter().map(|p| p.display().to_string()).collect();
            format!("--stats {}", files.join(", "))
        })?;
    }
    let norms = down_column_norms(&model)?;
    let refit_windows = match (&refit, &refit_text) {
        (Some(_), Some(source)) => {
            let (ids, digest) = source.windows(&model, &Tokenizer::load(&model.dir)?)?;
            Some(RefitWindows {
                ids,
                seq_len: source.seq_len,
                batch: source.batch,
                source: source.path.clone(),
                digest,
            })
        }
        _ => None,
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
