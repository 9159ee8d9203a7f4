//! `rku-engine import`: a GGUF file to an HF model directory.
use crate::cli::args::ImportArgs;
use crate::cli::check_output;
use anyhow::Result;
use rku_engine::io::import::{import_gguf, ImportOptions};
use rku_engine::io::output::MODEL_DIR;
use rku_engine::model::config::ModelConfig;
use std::time::Instant;

pub fn run(a: &ImportArgs) -> Result<()> {
    let t = Instant::now();
    check_output([a.gguf.as_path()], &a.out, MODEL_DIR, a.force)?;
    let opts = ImportOptions {
        dtype: a.dtype,
        force: a.force,
        blocks: !a.no_blocks,
        // What every command would refuse on loading the output is
        // refused here, naming the GGUF, before anything is written.
        check_config: ModelConfig::check,
    };
    let r = import_gguf(&a.gguf, &a.out, &opts)?;
    for note in &r.notes {
        println!("note: {note}");
    }
    println!(
        "imported {} ({} as {}, {} layers, {} tensors, {:.1}M parameters) into {} in {:.1}s",
        a.gguf.display(),
        r.architecture,
        r.hf_architecture,
        r.n_layers,
        r.n_tensors,
        r.n_params as f64 / 1e6,
        r.out_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
