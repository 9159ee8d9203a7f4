//! Writes the recovered model (METHODS.md section 10): the student's
//! directory with every adapted projection merged, `W' = W + s·B·A` in
//! f32 and cast to the tensor's dtype, `pruning.json` with a `recovery`
//! record, the tokenizer files, and the ggml blocks of the matrices the
//! merge left unchanged (the embedding and an untied lm_head). Atomic:
//! an `OutputDir` is committed only when everything is written.
use crate::backend::{Backend, MatMul};
use crate::io::ggml_blocks::{self, BlockFile, BlockTensor};
use crate::io::output::{write_json, OutputDir, MODEL_DIR};
use crate::io::safetensors_out::{write_model, OutDtype, OutTensor, DEFAULT_MAX_SHARD_BYTES};
use crate::model::lora::{Adapters, Proj};
use crate::model::Model;
use crate::prune::export::{out_dtype, COPIED_FILES};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The merged weight `W + s·B·A` of projection `p` of layer `l`, as f32
/// `[out, inp]`, computed on the backend.
pub fn merged_weight<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapters: &Adapters<B>,
    scale: f32,
    l: usize,
    p: Proj,
) -> Result<Vec<f32>> {
    let ll = adapters.layer(l, scale)?;
    let ad = ll
        .adapters
        .get(p as usize)
        .ok_or_else(|| Error::Invalid(format!("no adapter for layer {l} {}", p.name())))?;
    let w = model
        .files
        .get(&p.weight_tensor(l), &[ad.out, ad.inp])?
        .to_f32()?;
    let mut merged = be.upload(&w)?;
    // W'[out, inp] = 1·W + s·B[out, r]·A[r, inp]
    let mm = MatMul {
        m: ad.out,
        n: ad.inp,
        k: adapters.rank,
        trans_a: false,
        trans_b: false,
        alpha: scale,
        beta: 1.0,
    };
    be.matmul(&ad.b, &ad.a, &mut merged, mm)?;
    be.download(&merged)
}

/// Writes `model` with `adapters` (scale `s = α / r`) merged to `out`;
/// `pruning` is the pruning.json to write (the student's, with the
/// recovery record added).
pub fn export_recovered<B: Backend>(
    be: &B,
    model: &Model<B>,
    adapters: &Adapters<B>,
    scale: f32,
    pruning: &serde_json::Value,
    out: &Path,
    force: bool,
) -> Result<PathBuf> {
    let merged_names: HashMap<String, (usize, Proj)> = (0..model.cfg.layers)
        .flat_map(|l| Proj::ALL.map(|p| (p.weight_tensor(l), (l, p))))
        .collect();
    let dir = OutputDir::create(out, MODEL_DIR, force)?;
    let files = &model.files;
    let mut tensors = Vec::new();
    for name in files.names() {
        let t = files.get_any(name)?;
        let dtype: OutDtype = out_dtype(t.dtype);
        let data = match merged_names.get(name) {
            None => t.bytes.to_vec(),
            Some(&(l, p)) => {
                let w = merged_weight(be, model, adapters, scale, l, p)?;
                if let Some(bad) = w.iter().find(|&&v| !v.is_finite() || dtype.overflows(v)) {
                    return Err(Error::Invalid(format!(
                        "{name}: the merged value {bad} does not fit {dtype:?}"
                    )));
                }
                dtype.encode(&w)
            }
        };
        tensors.push(OutTensor {
            name: name.to_string(),
            dtype,
            shape: t.shape.to_vec(),
            data,
        });
    }
    write_model(dir.path(), &tensors, DEFAULT_MAX_SHARD_BYTES)?;
    drop(tensors);
    if let Some(src) = BlockFile::open(&model.dir)? {
        let mut kept = Vec::new();
        for (name, _, [rows, cols]) in src.matrices() {
            if merged_names.contains_key(name) {
                continue; // merged: its blocks no longer dequantise to it
            }
            if let Some(m) = src.get(name, rows, cols)? {
                kept.push(BlockTensor {
                    name: name.to_string(),
                    kind: m.kind,
                    rows,
                    cols,
                    data: m.data.into(),
                });
            }
        }
        if !kept.is_empty() {
            ggml_blocks::write(dir.path(), &kept)?;
        }
    }
    write_json(&dir.path().join("config.json"), &model.cfg.raw)?;
    write_json(&dir.path().join("pruning.json"), pruning)?;
    for f in COPIED_FILES {
        let src = model.dir.join(f);
        if src.exists() {
            let dst = dir.path().join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    dir.commit()
}
