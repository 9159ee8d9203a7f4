//! `rku-engine iou`: overlap of the kept channels of two pruned models.
use crate::cli::args::IouArgs;
use anyhow::{Context, Result};
use rku_engine::eval::iou::{iou_of, read_pruning};

pub fn run(a: &IouArgs) -> Result<()> {
    let r = iou_of(&read_pruning(&a.a)?, &read_pruning(&a.b)?)
        .with_context(|| format!("iou of {} and {}", a.a.display(), a.b.display()))?;
    for (l, v) in r.per_layer.iter().enumerate() {
        println!("layer {l:>3}: {v:.4}");
    }
    println!("mean IoU {:.4}", r.mean);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
