//! `config.json` of a LLaMA-family or Qwen2 model, as the runtime needs it.
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Architectures the runtime executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (LLaMA-2/3, SmolLM, TinyLlama): no attention biases.
    Llama,
    /// `Qwen2ForCausalLM`: q/k/v projections carry a bias.
    Qwen2,
}

impl Arch {
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// LLaMA-3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// FFN width of each layer (m_l); all equal unless the model was pruned non-uniformly.
    pub ffn_widths: Vec<usize>,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub max_positions: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The parsed JSON, kept so an export can copy every field it does not change.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::format(path, format!("missing or non-integer field `{key}`")))
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(raw, path)
    }

    /// Parses a config value; `path` is only used in error messages.
    pub fn from_json(raw: Value, path: &Path) -> Result<Self> {
        let arch_name = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| raw.get("model_type").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_string();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM)",
                    path.display()
                )))
            }
        };
        let hidden = get_usize(&raw, "hidden_size", path)?;
        let layers = get_usize(&raw, "num_hidden_layers", path)?;
        let heads = get_usize(&raw, "num_attention_heads", path)?;
        let kv_heads = raw
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(heads);
        let head_dim = raw
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden / heads.max(1));
        let vocab = get_usize(&raw, "vocab_size", path)?;
        let ffn = get_usize(&raw, "intermediate_size", path)?;
        let ffn_widths = match raw.get("layer_intermediate_sizes") {
            Some(Value::Array(a)) => {
                let w: Vec<usize> = a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect();
                if w.len() != layers {
                    return Err(Error::format(
                        path,
                        format!(
                            "layer_intermediate_sizes has {} entries for {layers} layers",
                            w.len()
                        ),
                    ));
                }
                w
            }
            _ => vec![ffn; layers],
        };
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || !head_dim.is_multiple_of(2)
        {
            return Err(Error::format(
                path,
                format!(
                    "inconsistent heads: {heads} heads, {kv_heads} kv heads, head_dim {head_dim}"
                ),
            ));
        }
        // transformers ≥ 5 writes `rope_parameters` (with rope_theta inside);
        // older versions `rope_scaling` next to a top-level `rope_theta`.
        let rope_params = raw
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| raw.get("rope_scaling"));
        let rope_scaling = match rope_params {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("<none>");
                let f = |k: &str| rs.get(k).and_then(Value::as_f64);
                match kind {
                    "llama3" => Some(Llama3RopeScaling {
                        factor: f("factor").unwrap_or(8.0),
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    }),
                    "default" | "<none>" => None,
                    other => {
                        return Err(Error::Unsupported(format!(
                            "{}: rope_scaling type `{other}` (supported: llama3)",
                            path.display()
                        )))
                    }
                }
            }
        };
        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama => raw
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        Ok(Self {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            ffn_widths,
            rope_theta: raw
                .get("rope_theta")
                .or_else(|| rope_params.and_then(|p| p.get("rope_theta")))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
            rope_scaling,
            rms_eps: raw
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            tie_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias,
            max_positions: raw
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            bos_token_id: ids(raw.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(raw.get("eos_token_id")),
            raw,
        })
    }

    /// Width of the query projection output (heads · head_dim).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the key/value projection outputs (kv_heads · head_dim).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Inverse RoPE frequencies `[head_dim/2]`: θ^(−2i/head_dim), with the
    /// LLaMA-3 scaling applied when configured (as transformers'
    /// `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    None => f,
                    Some(s) => {
                        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect()
    }

    /// Parameters of the model: embeddings, attention, FFN, norms, lm_head.
    pub fn param_count(&self) -> u64 {
        let d = self.hidden as u64;
        let attn = d * self.q_dim() as u64 * 2 + d * self.kv_dim() as u64 * 2;
        let bias = if self.qkv_bias {
            (self.q_dim() + 2 * self.kv_dim()) as u64
        } else {
            0
        };
        let ffn: u64 = self.ffn_widths.iter().map(|&m| 3 * d * m as u64).sum();
        let emb = self.vocab as u64 * d;
        let head = if self.tie_embeddings { 0 } else { emb };
        emb + head + self.layers as u64 * (attn + bias + 2 * d) + ffn + d
    }
}
