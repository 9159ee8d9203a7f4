//! `rku-engine score`: the statistics pass over calibration windows.
use crate::cli::args::{CalibArgs, ScoreArgs};
use crate::cli::{check_output, load_model};
use anyhow::{Context, Result};
use rku_engine::backend::Backend;
use rku_engine::io::text::Tokenizer;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{collect_stats, CalibSource};
use rku_engine::prune::stats::STATS_FILE;
use rku_engine::prune::Stats;
use std::time::Instant;

pub fn run<B: Backend>(be: &B, a: &ScoreArgs) -> Result<()> {
    let inputs = [Some(&a.model), a.calib.calib.as_ref()];
    check_output(
        inputs.into_iter().flatten().map(|p| p.as_path()),
        &a.out,
        STATS_FILE,
        a.force,
    )?;
    let source = calib_source(&a.calib)?;
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = run_scoring(be, &model, &source, &a.calib)?;
    stats.save_with(&a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The calibration windows the flags describe (METHODS.md §2).
pub fn calib_source(c: &CalibArgs) -> Result<CalibSource> {
    let path = c
        .calib
        .clone()
        .context("calibration text needed: pass --calib FILE (or --stats)")?;
    Ok(c.windows.source(path))
}

/// Windows the calibration text and runs the statistics pass on `model`.
pub fn run_scoring<B: Backend>(
    be: &B,
    model: &Model<B>,
    source: &CalibSource,
    c: &CalibArgs,
) -> Result<Stats> {
    let tok = Tokenizer::load(&model.dir)?;
    let (ids, digest) = source.windows(model, &tok)?;
    eprintln!(
        "calibration: {} sequences x {} tokens from {} (digest {}…)",
        source.samples,
        source.seq_len,
        source.path.display(),
        &digest[..12]
    );
    let spec = source.spec(c.objective.objectives());
    let t = Instant::now();
    let stats = collect_stats(be, model, &ids, spec, digest)?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scored {} tokens ({}) in {secs:.1}s: {:.0} tokens/s",
        ids.len(),
        spec.objectives,
        ids.len() as f64 / secs
    );
    Ok(stats)
}
