//! `rku-engine stats merge`: sum statistics of disjoint calibration shards.
use crate::cli::args::MergeArgs;
use crate::cli::check_output;
use anyhow::Result;
use rku_engine::prune;
use rku_engine::prune::stats::STATS_FILE;

pub fn merge(a: &MergeArgs) -> Result<()> {
    check_output(
        a.files.iter().map(|p| p.as_path()),
        &a.out,
        STATS_FILE,
        a.force,
    )?;
    let merged = prune::merge(&a.files, a.expect_complete)?;
    merged.save_with(&a.out, a.force)?;
    println!(
        "merged {} files: {} sequences, {} tokens -> {}",
        a.files.len(),
        merged.meta.samples,
        merged.meta.tokens,
        a.out.display()
    );
    Ok(())
}
