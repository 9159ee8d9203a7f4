//! Model weights as the backend holds them, loaded from a memory-mapped
//! HF model directory one tensor at a time (f32 conversion happens per
//! tensor, so the host never holds two copies of the model).
use super::config::ModelConfig;
use crate::backend::Backend;
use crate::io::safetensors_io::SafeModel;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// One decoder layer. Shapes: d = hidden, q = heads·hd, kv = kv_heads·hd, m = FFN width.
pub struct LayerWeights<W> {
    pub attn_norm: W,      // [d]
    pub wq: W,             // [q, d]
    pub bq: Option<W>,     // [q]
    pub wk: W,             // [kv, d]
    pub bk: Option<W>,     // [kv]
    pub wv: W,             // [kv, d]
    pub bv: Option<W>,     // [kv]
    pub wo: W,             // [d, q]
    pub ffn_norm: W,       // [d]
    pub w_gate: W,         // [m, d]
    pub w_up: W,           // [m, d]
    pub w_down: W,         // [d, m]
    pub b_down: Option<W>, // [d], present after FLAP bias compensation
    /// FFN width m of this layer.
    pub ffn: usize,
}

/// A loaded model: config, the mapped files and the backend-resident weights.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    pub files: SafeModel,
    pub embed: B::Weight,       // [vocab, d]
    pub norm: B::Weight,        // [d]
    lm_head: Option<B::Weight>, // [vocab, d]; None when tied to `embed`
    pub layers: Vec<LayerWeights<B::Weight>>,
}

/// HF tensor name of a layer's parameter.
pub fn layer_tensor(l: usize, leaf: &str) -> String {
    format!("model.layers.{l}.{leaf}")
}

fn load<B: Backend>(b: &B, files: &SafeModel, name: &str, shape: &[usize]) -> Result<B::Weight> {
    let data = files.get(name, shape)?.to_f32()?;
    b.upload_weight(&data)
}

fn load_opt<B: Backend>(
    b: &B,
    files: &SafeModel,
    name: &str,
    shape: &[usize],
) -> Result<Option<B::Weight>> {
    if files.contains(name) {
        load(b, files, name, shape).map(Some)
    } else {
        Ok(None)
    }
}

/// LLaMA's `mlp_bias` also gives gate and up projections a bias. The
/// engine's exports write them as zeros (only down_proj carries FLAP's
/// compensation); a model whose gate/up biases are nonzero is refused.
fn check_no_gate_up_bias(files: &SafeModel, cfg: &ModelConfig) -> Result<()> {
    for l in 0..cfg.layers {
        for p in ["gate_proj", "up_proj"] {
            let name = layer_tensor(l, &format!("mlp.{p}.bias"));
            if files.contains(&name) && files.get_any(&name)?.to_f32()?.iter().any(|&x| x != 0.0) {
                return Err(Error::Unsupported(format!(
                    "{name} is nonzero: gate/up projection biases are not supported"
                )));
            }
        }
    }
    Ok(())
}

impl<B: Backend> Model<B> {
    /// Loads `dir` (config.json + safetensors) onto `backend`.
    pub fn load(backend: &B, dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::load(&dir.join("config.json"))?;
        let files = SafeModel::open_dir(dir)?;
        let (d, v) = (cfg.hidden, cfg.vocab);
        let embed = load(backend, &files, "model.embed_tokens.weight", &[v, d])?;
        let norm = load(backend, &files, "model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(load(backend, &files, "lm_head.weight", &[v, d])?)
        };
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        check_no_gate_up_bias(&files, &cfg)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let m = cfg.ffn_widths[l];
            let n = |leaf: &str| layer_tensor(l, leaf);
            let bias = |leaf: &str, len: usize| -> Result<Option<B::Weight>> {
                if cfg.qkv_bias {
                    load(backend, &files, &n(leaf), &[len]).map(Some)
                } else {
                    load_opt(backend, &files, &n(leaf), &[len])
                }
            };
            layers.push(LayerWeights {
                attn_norm: load(backend, &files, &n("input_layernorm.weight"), &[d])?,
                wq: load(backend, &files, &n("self_attn.q_proj.weight"), &[q, d])?,
                bq: bias("self_attn.q_proj.bias", q)?,
                wk: load(backend, &files, &n("self_attn.k_proj.weight"), &[kv, d])?,
                bk: bias("self_attn.k_proj.bias", kv)?,
                wv: load(backend, &files, &n("self_attn.v_proj.weight"), &[kv, d])?,
                bv: bias("self_attn.v_proj.bias", kv)?,
                wo: load(backend, &files, &n("self_attn.o_proj.weight"), &[d, q])?,
                ffn_norm: load(backend, &files, &n("post_attention_layernorm.weight"), &[d])?,
                w_gate: load(backend, &files, &n("mlp.gate_proj.weight"), &[m, d])?,
                w_up: load(backend, &files, &n("mlp.up_proj.weight"), &[m, d])?,
                w_down: load(backend, &files, &n("mlp.down_proj.weight"), &[d, m])?,
                b_down: load_opt(backend, &files, &n("mlp.down_proj.bias"), &[d])?,
                ffn: m,
            });
        }
        Ok(Self {
            cfg,
            dir: dir.to_path_buf(),
            files,
            embed,
            norm,
            lm_head,
            layers,
        })
    }

    /// The output projection `[vocab, d]` (the embedding when tied).
    pub fn lm_head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
