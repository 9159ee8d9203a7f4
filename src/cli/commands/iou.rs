//! `rku-engine iou`: overlap of the kept channels of two pruned models.
use crate::cli::args::IouArgs;
use anyhow::Result;
use rku_engine::eval::iou::{iou, read_kept};

pub fn run(a: &IouArgs) -> Result<()> {
    let r = iou(&read_kept(&a.a)?, &read_kept(&a.b)?)?;
    for (l, v) in r.per_layer.iter().enumerate() {
        println!("layer {l:>3}: {v:.4}");
    }
    println!("mean IoU {:.4}", r.mean);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
