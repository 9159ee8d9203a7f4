//! `rku-engine stats merge`: sum statistics of disjoint calibration shards.
use crate::cli::args::MergeArgs;
use crate::cli::refuse_existing;
use anyhow::Result;
use rku_engine::prune;

pub fn merge(a: &MergeArgs) -> Result<()> {
    refuse_existing(&a.out, a.force)?;
    let merged = prune::merge(&a.files)?;
    merged.save(&a.out)?;
    println!(
        "merged {} files: {} sequences, {} tokens -> {}",
        a.files.len(),
        merged.meta.samples,
        merged.meta.tokens,
        a.out.display()
    );
    Ok(())
}
