//! Writes a pruned model directory (METHODS.md section 7): safetensors in
//! the input dtype with HF names (sharded above 4 GB), config.json,
//! pruning.json and the tokenizer files, atomically; and the ggml blocks
//! of the matrices the compaction keeps whole (`ggml_blocks`).
use crate::backend::Backend;
use crate::io::ggml_blocks::{self, BlockFile, BlockTensor};
use crate::io::output::{write_json, OutputDir, MODEL_DIR};
use crate::io::safetensors_io::{FloatType, SafeModel};
use crate::io::safetensors_out::{write_model, OutDtype, OutTensor, DEFAULT_MAX_SHARD_BYTES};
use crate::model::config::{Arch, ModelConfig};
use crate::model::weights::layer_tensor;
use crate::prune::compact::{pad_cols, pad_rows};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// How per-layer widths are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportLayout {
    /// Physically smaller layers; a non-uniform model lists `layer_intermediate_sizes`.
    Compact,
    /// Every layer zero-padded to the widest kept width so stock transformers loads it.
    Padded,
}

impl ExportLayout {
    /// The name on the command line and in `pruning.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Compact => "compact",
            Self::Padded => "padded",
        }
    }
}

/// Files copied unchanged from the source model directory when present.
pub const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

pub fn out_dtype(t: FloatType) -> OutDtype {
    match t {
        FloatType::F32 => OutDtype::F32,
        FloatType::F16 => OutDtype::F16,
        FloatType::BF16 => OutDtype::BF16,
    }
}

/// What to write: kept channel indices per layer (ascending), the layout,
/// refitted down_proj columns (`[d, |K|]` each, METHODS.md section 9) if
/// any, a per-layer down_proj bias (`[d]` each: FLAP's compensation or the
/// refit's) if any, and pruning.json.
pub struct ExportSpec<'a> {
    pub kept: &'a [Vec<usize>],
    pub layout: ExportLayout,
    pub down_weights: Option<&'a [Vec<f32>]>,
    pub down_bias: Option<&'a [Vec<f32>]>,
    pub record: serde_json::Value,
}

/// The config.json of the pruned model.
pub fn pruned_config(
    cfg: &ModelConfig,
    widths: &[usize],
    layout: ExportLayout,
    bias: bool,
) -> serde_json::Value {
    let mut v = cfg.raw.clone();
    let obj = v.as_object_mut().expect("config.json is an object");
    let widest = widths.iter().copied().max().unwrap_or(0);
    obj.insert("intermediate_size".into(), widest.into());
    obj.remove("layer_intermediate_sizes");
    if layout == ExportLayout::Compact && widths.iter().any(|&w| w != widest) {
        obj.insert("layer_intermediate_sizes".into(), widths.to_vec().into());
    }
    if bias && cfg.arch == Arch::Llama {
        // LLaMA's `mlp_bias` gives gate, up and down a bias; gate/up get zeros.
        obj.insert("mlp_bias".into(), true.into());
    }
    v
}

/// Writes the pruned copy of `files`/`cfg` (from `src_dir`) to `out`,
/// gathering the kept channels on `be`.
pub fn export_pruned<B: Backend>(
    be: &B,
    src_dir: &Path,
    files: &SafeModel,
    cfg: &ModelConfig,
    spec: &ExportSpec,
    out: &Path,
    force: bool,
) -> Result<PathBuf> {
    let kept = spec.kept;
    let lists = [
        spec.down_weights.map(<[_]>::len),
        spec.down_bias.map(<[_]>::len),
    ];
    if kept.len() != cfg.layers || lists.iter().flatten().any(|&n| n != cfg.layers) {
        return Err(Error::Invalid(format!(
            "{} kept lists for {} layers",
            kept.len(),
            cfg.layers
        )));
    }
    for (l, k) in kept.iter().enumerate() {
        if k.is_empty() || k.windows(2).any(|w| w[0] >= w[1]) || k[k.len() - 1] >= cfg.ffn_widths[l]
        {
            return Err(Error::Invalid(format!(
                "layer {l}: kept channels must be ascending, non-empty and < {}",
                cfg.ffn_widths[l]
            )));
        }
    }
    let widths: Vec<usize> = kept.iter().map(Vec::len).collect();
    let widest = widths.iter().copied().max().unwrap_or(0);
    let dir = OutputDir::create(out, MODEL_DIR, force)?;
    let d = cfg.hidden;
    let main_dtype = out_dtype(files.main_dtype());
    let mut tensors = Vec::new();
    for name in files.names() {
        let t = files.get_any(name)?;
        let elem = t.dtype.size();
        let dtype = out_dtype(t.dtype);
        let (shape, data) = match ffn_tensor(cfg, name) {
            None => (t.shape.to_vec(), t.bytes.to_vec()),
            Some((l, "down_proj")) => {
                let m = cfg.ffn_widths[l];
                let g = match spec.down_weights {
                    Some(w) if w[l].iter().any(|&v| dtype.overflows(v)) => {
                        return Err(Error::Invalid(format!(
                            "{name}: a refitted value overflows {dtype:?}; refit with a larger \
                             --refit-damp, or export from an f32 model"
                        )))
                    }
                    Some(w) if w[l].len() == d * widths[l] => dtype.encode(&w[l]),
                    Some(w) => {
                        return Err(Error::Invalid(format!(
                            "layer {l}: {} refitted down_proj values for [{d}, {}]",
                            w[l].len(),
                            widths[l]
                        )))
                    }
                    None => be.gather_cols(t.bytes, elem, m, &kept[l])?,
                };
                match spec.layout {
                    ExportLayout::Compact => (vec![d, widths[l]], g),
                    ExportLayout::Padded => {
                        (vec![d, widest], pad_cols(&g, elem, widths[l], widest))
                    }
                }
            }
            Some((l, _)) => {
                let g = be.gather_rows(t.bytes, elem, d, &kept[l])?;
                match spec.layout {
                    ExportLayout::Compact => (vec![widths[l], d], g),
                    ExportLayout::Padded => (vec![widest, d], pad_rows(g, elem, d, widest)),
                }
            }
        };
        tensors.push(OutTensor {
            name: name.to_string(),
            dtype,
            shape,
            data,
        });
    }
    if let Some(bias) = spec.down_bias {
        for (l, b) in bias.iter().enumerate() {
            let name = layer_tensor(l, "mlp.down_proj.bias");
            let mut b = b.clone();
            if files.contains(&name) {
                let old = files.get(&name, &[d])?.to_f32()?;
                b.iter_mut().zip(old).for_each(|(x, o)| *x += o);
                tensors.retain(|t| t.name != name);
            }
            tensors.push(OutTensor::from_f32(name, main_dtype, vec![d], &b));
            if cfg.arch == Arch::Llama {
                let w = if spec.layout == ExportLayout::Padded {
                    widest
                } else {
                    widths[l]
                };
                for p in ["gate_proj", "up_proj"] {
                    let name = layer_tensor(l, &format!("mlp.{p}.bias"));
                    if !files.contains(&name) {
                        tensors.push(OutTensor::from_f32(
                            name,
                            main_dtype,
                            vec![w],
                            &vec![0.0; w],
                        ));
                    }
                }
            }
        }
    }
    write_model(dir.path(), &tensors, DEFAULT_MAX_SHARD_BYTES)?;
    if let Some(src_blocks) = BlockFile::open(src_dir)? {
        let blocks = pruned_blocks(be, &src_blocks, files, cfg, spec, widest)?;
        if !blocks.is_empty() {
            ggml_blocks::write(dir.path(), &blocks)?;
        }
    }
    let config = pruned_config(cfg, &widths, spec.layout, spec.down_bias.is_some());
    write_json(&dir.path().join("config.json"), &config)?;
    write_json(&dir.path().join("pruning.json"), &spec.record)?;
    for f in COPIED_FILES {
        let src = src_dir.join(f);
        if src.exists() {
            let dst = dir.path().join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
        }
    }
    dir.commit()
}

/// `(layer, projection)` when `name` is an FFN weight matrix.
fn ffn_tensor(cfg: &ModelConfig, name: &str) -> Option<(usize, &'static str)> {
    (0..cfg.layers).find_map(|l| {
        ["gate_proj", "up_proj", "down_proj"]
            .into_iter()
            .find_map(|p| (layer_tensor(l, &format!("mlp.{p}.weight")) == name).then_some((l, p)))
    })
}

/// The source's ggml blocks that survive the compaction: every matrix
/// outside the FFN as it is, gate and up with their kept rows gathered
/// like the values (a row is whole blocks; padded rows are zero bytes,
/// which dequantise to the zeros padded into the values). down_proj loses
/// columns, which cuts through its blocks: it has none. Blocks of another
/// shape than the model's tensor, or of a tensor the model lacks, are an
/// error naming the file; loading checks the values as for any blocks file.
fn pruned_blocks<'a, B: Backend>(
    be: &B,
    src: &'a BlockFile,
    files: &SafeModel,
    cfg: &ModelConfig,
    spec: &ExportSpec,
    widest: usize,
) -> Result<Vec<BlockTensor<'a>>> {
    let mut out = Vec::new();
    for (name, _, _) in src.matrices() {
        let shape = if files.contains(name) {
            files.get_any(name)?.shape.to_vec()
        } else {
            vec![]
        };
        let &[rows, cols] = &shape[..] else {
            return Err(Error::format(
                src.path(),
                format!("blocks of {name}, which the model has no matrix of"),
            ));
        };
        let Some(m) = src.get(name, rows, cols)? else {
            continue;
        };
        let (rows, data) = match ffn_tensor(cfg, name) {
            None => (m.rows, m.data.into()),
            Some((_, "down_proj")) => continue,
            Some((l, _)) => {
                // A row is whole blocks of an even byte count (Q4_1: 20,
                // Q8_0: 34), gathered as 2-byte words.
                if !m.row_bytes().is_multiple_of(2) {
                    return Err(Error::format(
                        src.path(),
                        format!("{name}: rows of {} bytes, not 2-byte words", m.row_bytes()),
                    ));
                }
                let g = be.gather_rows(m.data, 2, m.row_bytes() / 2, &spec.kept[l])?;
                match spec.layout {
                    ExportLayout::Compact => (spec.kept[l].len(), g.into()),
                    ExportLayout::Padded => (widest, pad_rows(g, 1, m.row_bytes(), widest).into()),
                }
            }
        };
        out.push(BlockTensor {
            name: name.to_string(),
            kind: m.kind,
            rows,
            cols: m.cols,
            data,
        });
    }
    Ok(out)
}
