//! `config.json` of a LLaMA-family, Qwen2, Qwen3, Mistral or Gemma 3 model, as the runtime needs it.
pub use crate::backend::GluAct;
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
    /// `Qwen3ForCausalLM`: no q/k/v bias; an RMSNorm over each head's query
    /// and key vector (`q_norm`, `k_norm`, weights `[head_dim]`) between
    /// the projection and RoPE; `head_dim` explicit (128 when absent, as
    /// transformers' `Qwen3Config`).
    Qwen3,
    /// `MistralForCausalLM`: LLaMA's layer (no biases) with an optional
    /// sliding attention window (`sliding_window`, [`ModelConfig::sliding_window`]).
    Mistral,
    /// `Gemma3ForCausalLM` (`gemma3_text`, the text part of Gemma 3): GeGLU
    /// (`gelu_pytorch_tanh`); four RMSNorms per layer (before and after
    /// attention, before and after the FFN) and the final norm, each
    /// scaling by (1 + w); embeddings scaled by √hidden; Qwen3's per-head
    /// q/k norm; scores scaled by `query_pre_attn_scalar`^−½; local layers
    /// (`layer_types` "sliding_attention") attend through `sliding_window`
    /// with their own RoPE base; tied embeddings.
    Gemma3,
}

impl Arch {
    /// Whether calibration and perplexity windows start with BOS unless
    /// told otherwise (`--bos`, METHODS.md §2): Gemma 3, whose perplexity
    /// without BOS is an artefact.
    pub fn bos_by_default(self) -> bool {
        self == Arch::Gemma3
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Gemma3 => "Gemma3ForCausalLM",
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// LLaMA-3's frequency-dependent scaling (`"llama3"`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Every frequency divided by `factor` (`"linear"`, position
    /// interpolation; Gemma 3 4B and larger on their global layers).
    Linear { factor: f64 },
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
    pub rope_scaling: Option<RopeScaling>,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3's `q_norm`/`k_norm`).
    pub qk_norm: bool,
    pub max_positions: usize,
    /// Mistral's sliding attention window W: the query at position i attends
    /// to the keys at positions j with i − W < j ≤ i (itself and the W − 1
    /// before it), as transformers' `sliding_window_causal_mask_function`.
    /// `None`: plain causal attention (every other family).
    pub sliding_window: Option<usize>,
    /// Which layers attend through `sliding_window` (Gemma 3's
    /// "sliding_attention" layers, which also take `rope_theta_local`);
    /// `None`: every layer (Mistral).
    pub local_layers: Option<Vec<bool>>,
    /// RoPE base of the local layers (Gemma 3's `sliding_attention` base);
    /// `rope_theta` on every other family.
    pub rope_theta_local: f64,
    /// The FFN's gate activation (`hidden_act` / `hidden_activation`).
    pub act: GluAct,
    /// Gemma 3: RMSNorms after attention and after the FFN
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`) on the
    /// branch outputs before the residual add; the pre-FFN norm is then
    /// `pre_feedforward_layernorm`, and every norm scales by (1 + w).
    pub sandwich_norms: bool,
    /// Factor on the embedding rows (Gemma 3: √hidden rounded to f32, as
    /// transformers' `Gemma3TextScaledWordEmbedding`); 1 elsewhere.
    pub embed_scale: f32,
    /// Gemma 3's `query_pre_attn_scalar`: scores are q·k / √s instead of
    /// q·k / √head_dim. `None`: √head_dim.
    pub query_pre_attn_scalar: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The parsed JSON, kept so an export can copy every field it does not change.
    pub raw: Value,
}

// Bounds on config sizes: far above any released model, low enough that
// parameter and buffer arithmetic in u64 cannot overflow.
const MAX_LAYERS: usize = 1 << 12;
const MAX_WIDTH: usize = 1 << 20;
const MAX_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 12;
const MAX_VOCAB: usize = 1 << 24;

fn check_range(path: &Path, key: &str, v: usize, max: usize) -> Result<()> {
    if v == 0 || v > max {
        return Err(Error::format(
            path,
            format!("{key} = {v} is out of range (1 to {max})"),
        ));
    }
    Ok(())
}

/// Refuses, by name, config fields that change the model's math in ways
/// the engine does not implement (rather than silently computing another
/// model).
fn refuse_unimplemented(raw: &Value, arch: Arch, path: &Path) -> Result<()> {
    let refuse = |what: String| {
        Err(Error::Unsupported(format!(
            "{}: {what} is not implemented",
            path.display()
        )))
    };
    // Gemma 3's gate activation is gelu with the tanh approximation
    // (`hidden_activation`, transformers' default when absent).
    let want = match arch {
        Arch::Gemma3 => "gelu_pytorch_tanh",
        _ => "silu",
    };
    for key in ["hidden_act", "hidden_activation"] {
        if let Some(act) = raw.get(key).filter(|v| !v.is_null()) {
            if act.as_str() != Some(want) {
                return refuse(format!("{key} {act} (only {want} on {})", arch.hf_name()));
            }
        }
    }
    for key in [
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "vision_config",
    ] {
        if raw.get(key).is_some_and(|v| !v.is_null()) {
            return refuse(format!("`{key}`"));
        }
    }
    // Only Mistral's `sliding_window` is implemented; Qwen2's
    // `use_sliding_window` (a window on some layers only) is not.
    if raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
        return refuse("use_sliding_window: true (sliding-window attention)".into());
    }
    // transformers' Qwen3 writes `layer_types`; a "sliding_attention"
    // layer there would attend through a window (when `sliding_window` is
    // set). Gemma 3's are read (`gemma3_layers`).
    if let (Some(Value::Array(types)), false) = (raw.get("layer_types"), arch == Arch::Gemma3) {
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            return refuse(format!("layer_types entry {t} (only \"full_attention\")"));
        }
        let layers = raw.get("num_hidden_layers").and_then(Value::as_u64);
        if let Some(l) = layers.filter(|&l| l != types.len() as u64) {
            return Err(Error::format(
                path,
                format!(
                    "layer_types has {} entries for num_hidden_layers {l}",
                    types.len()
                ),
            ));
        }
    }
    // Rotary embedding on part of each head (Phi, GPT-NeoX style).
    if let Some(f) = raw.get("partial_rotary_factor").filter(|v| !v.is_null()) {
        if f.as_f64() != Some(1.0) {
            return refuse(format!(
                "partial_rotary_factor {f} (rotary on part of each head)"
            ));
        }
    }
    if arch != Arch::Qwen2 && raw.get("attention_bias").and_then(Value::as_bool) == Some(true) {
        // transformers' LLaMA and Qwen3 then also have an o_proj bias, which
        // the engine does not load.
        return refuse(format!(
            "attention_bias: true on a {} model (o_proj bias)",
            arch.hf_name()
        ));
    }
    // transformers' Mistral takes one window for every layer; per-layer
    // `layer_types` (Ministral's alternation) is another model.
    if arch == Arch::Mistral && raw.get("layer_types").is_some_and(|v| !v.is_null()) {
        return refuse("`layer_types` on a Mistral model (per-layer attention types)".into());
    }
    if arch == Arch::Gemma3 {
        // Gemma 3 as an encoder (EmbeddingGemma) attends both ways.
        if raw
            .get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return refuse("use_bidirectional_attention: true".into());
        }
        if raw.get("text_config").is_some() {
            return refuse("`text_config` (the multimodal Gemma3ForConditionalGeneration)".into());
        }
    }
    Ok(())
}

/// Gemma 3's per-layer attention: which layers are local, the global
/// layers' rope parameters (checked as every family's) and the local base.
struct GemmaLayers {
    local: Vec<bool>,
    global_rope: Option<Value>,
    local_theta: f64,
}

/// Reads Gemma 3's `layer_types` and per-type `rope_parameters` as
/// transformers 5 writes them, or the older `sliding_window_pattern`,
/// `rope_theta`, `rope_local_base_freq` and `rope_scaling` (on the global
/// layers), with `Gemma3TextConfig`'s defaults (a local layer except every
/// sixth; bases 10⁴ local and 10⁶ global).
fn gemma3_layers(raw: &Value, layers: usize, path: &Path) -> Result<GemmaLayers> {
    let local = match raw.get("layer_types") {
        None | Some(Value::Null) => {
            let pattern = raw
                .get("sliding_window_pattern")
                .or_else(|| raw.get("_sliding_window_pattern"))
                .filter(|v| !v.is_null());
            let pattern = match pattern {
                None => 6,
                Some(v) => v.as_u64().filter(|&p| p >= 1).ok_or_else(|| {
                    Error::format(
                        path,
                        format!("`sliding_window_pattern` is {v}, not an integer ≥ 1"),
                    )
                })?,
            };
            (0..layers as u64).map(|i| (i + 1) % pattern != 0).collect()
        }
        Some(Value::Array(types)) if types.len() == layers => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(Error::Unsupported(format!(
                    "{}: layer_types entry {t} is not implemented \
                     (only \"sliding_attention\" and \"full_attention\")",
                    path.display()
                ))),
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(Error::format(
                path,
                format!("`layer_types` is {v}, not a list of {layers} layer types"),
            ))
        }
    };
    let num = |v: &Value, key: &str| opt(v, key, path, "a number", Value::as_f64);
    let (global_rope, local_theta) = match raw.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(p) => {
            if !p.is_object() {
                return Err(Error::format(
                    path,
                    format!("`rope_parameters` is {p}, not an object"),
                ));
            }
            let local = p.get("sliding_attention").filter(|v| !v.is_null());
            if let Some(kind) = local
                .and_then(|l| l.get("rope_type"))
                .and_then(Value::as_str)
                .filter(|&k| k != "default")
            {
                return Err(Error::Unsupported(format!(
                    "{}: rope_parameters.sliding_attention.rope_type `{kind}` is not implemented \
                     (only default)",
                    path.display()
                )));
            }
            let theta = local.map(|l| num(l, "rope_theta")).transpose()?.flatten();
            (p.get("full_attention").cloned(), theta)
        }
        None => (raw.get("rope_scaling").cloned(), None),
    };
    let local_theta = match local_theta {
        Some(t) => t,
        None => num(raw, "rope_local_base_freq")?.unwrap_or(10000.0),
    };
    Ok(GemmaLayers {
        local,
        global_rope,
        local_theta,
    })
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::format(path, format!("missing or non-integer field `{key}`")))
}

/// An optional field: absent or null is `None`; present with a value
/// `f` does not accept is refused by name (a silent default would run
/// another model than the one the file describes).
fn opt<T>(
    raw: &Value,
    key: &str,
    path: &Path,
    what: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Result<Option<T>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => f(v)
            .map(Some)
            .ok_or_else(|| Error::format(path, format!("`{key}` is {v}, not {what}"))),
    }
}

/// Token ids under `key` of the JSON object `raw` read from `path`: a
/// number or a list of numbers, each a valid u32; absent or null is none.
/// Anything else is an error naming `path`.
pub fn token_ids(raw: &Value, key: &str, path: &Path) -> Result<Vec<u32>> {
    let id = |x: &Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    Ok(opt(
        raw,
        key,
        path,
        "a token id or a list of token ids",
        |v| match v {
            Value::Array(a) => a.iter().map(id).collect(),
            v => id(v).map(|x| vec![x]),
        },
    )?
    .unwrap_or_default())
}

impl ModelConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::io::read_regular(path, "a config file")?;
        let raw: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(raw, path)
    }

    /// Refuses `raw` as [`ModelConfig::from_json`] would: for a config
    /// about to be written (the GGUF import), so that what every loader
    /// would refuse is refused before the output exists.
    pub fn check(raw: &Value, path: &Path) -> Result<()> {
        Self::from_json(raw.clone(), path).map(drop)
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
            "Qwen3ForCausalLM" | "qwen3" => Arch::Qwen3,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            "Gemma3ForCausalLM" | "gemma3_text" => Arch::Gemma3,
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, \
                     Qwen3ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM)",
                    path.display()
                )))
            }
        };
        refuse_unimplemented(&raw, arch, path)?;
        let hidden = get_usize(&raw, "hidden_size", path)?;
        let layers = get_usize(&raw, "num_hidden_layers", path)?;
        // Sizes are bounded before anything is allocated from them.
        check_range(path, "num_hidden_layers", layers, MAX_LAYERS)?;
        let heads = get_usize(&raw, "num_attention_heads", path)?;
        let int = "a non-negative integer";
        let kv_heads = opt(&raw, "num_key_value_heads", path, int, Value::as_u64)?
            .map(|x| x as usize)
            .unwrap_or(heads);
        // transformers' Qwen3Config defaults head_dim to 128, not hidden / heads.
        let head_dim = opt(&raw, "head_dim", path, int, Value::as_u64)?
            .map(|x| x as usize)
            .unwrap_or(match arch {
                Arch::Qwen3 => 128,
                Arch::Gemma3 => 256, // Gemma3TextConfig's default
                _ => hidden / heads.max(1),
            });
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
        let gemma = match arch {
            Arch::Gemma3 => Some(gemma3_layers(&raw, layers, path)?),
            _ => None,
        };
        let rope_params = match &gemma {
            // Gemma 3 keeps one set per layer type; the global one here,
            // the local one (always the default type) in `gemma3_layers`.
            Some(g) => g.global_rope.as_ref(),
            None => raw
                .get("rope_parameters")
                .filter(|v| v.is_object())
                .or_else(|| raw.get("rope_scaling")),
        };
        let rope_scaling = match rope_params {
            None | Some(Value::Null) => None,
            Some(v) if !v.is_object() => {
                return Err(Error::format(
                    path,
                    format!("`rope_scaling` is {v}, not an object"),
                ))
            }
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("<none>");
                let f = |k: &str| rs.get(k).and_then(Value::as_f64);
                match kind {
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f("factor").unwrap_or(8.0),
                        low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                        high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                        original_max_position_embeddings: f("original_max_position_embeddings")
                            .unwrap_or(8192.0),
                    }),
                    // transformers requires the factor (`_validate_linear_rope_parameters`).
                    "linear" => Some(RopeScaling::Linear {
                        factor: f("factor").ok_or_else(|| {
                            Error::format(
                                path,
                                "rope_scaling type `linear` without a numeric `factor`",
                            )
                        })?,
                    }),
                    "default" | "<none>" => None,
                    other => {
                        return Err(Error::Unsupported(format!(
                            "{}: rope_scaling type `{other}` (supported: llama3, linear)",
                            path.display()
                        )))
                    }
                }
            }
        };
        // Qwen2 has q/k/v biases; a LLaMA or Qwen3 with `attention_bias`
        // was refused above. Qwen3 normalises each head's q and k.
        let qkv_bias = arch == Arch::Qwen2;
        let qk_norm = matches!(arch, Arch::Qwen3 | Arch::Gemma3);
        let num = "a number";
        let rope_theta = match opt(&raw, "rope_theta", path, num, Value::as_f64)? {
            Some(t) => Some(t),
            None => rope_params
                .map(|p| opt(p, "rope_theta", path, num, Value::as_f64))
                .transpose()?
                .flatten(),
        }
        .unwrap_or(match arch {
            Arch::Gemma3 => 1_000_000.0, // Gemma3TextConfig's global default
            _ => 10000.0,
        });
        let rms_eps = opt(&raw, "rms_norm_eps", path, num, Value::as_f64)?;
        let tie = opt(
            &raw,
            "tie_word_embeddings",
            path,
            "a boolean",
            Value::as_bool,
        )?;
        let max_pos = opt(
            &raw,
            "max_position_embeddings",
            path,
            "a positive integer",
            |v| v.as_u64().filter(|&n| n > 0),
        )?;
        // Read for Mistral only: LLaMA, Qwen2 and Qwen3 configs carry a
        // `sliding_window` their models do not use (Qwen2's and Qwen3's
        // need `use_sliding_window`, refused above).
        let sliding_window = match arch {
            Arch::Mistral => opt(
                &raw,
                "sliding_window",
                path,
                "null or an integer ≥ 1",
                |v| v.as_u64().filter(|&w| w >= 1),
            )?
            .map(|w| w.min(usize::MAX as u64) as usize),
            Arch::Gemma3 => Some(
                opt(&raw, "sliding_window", path, "an integer ≥ 1", |v| {
                    v.as_u64().filter(|&w| w >= 1)
                })?
                .unwrap_or(4096)
                .min(usize::MAX as u64) as usize,
            ),
            Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => None,
        };
        let query_pre_attn_scalar = match arch {
            Arch::Gemma3 => {
                Some(opt(&raw, "query_pre_attn_scalar", path, num, Value::as_f64)?.unwrap_or(256.0))
            }
            _ => None,
        };
        let bos_token_id = token_ids(&raw, "bos_token_id", path)?.first().copied();
        let eos_token_ids = token_ids(&raw, "eos_token_id", path)?;
        let cfg = Self {
            arch,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            vocab,
            ffn_widths,
            rope_theta,
            rope_scaling,
            rms_eps: rms_eps.unwrap_or(1e-6),
            // Gemma3TextConfig ties by default.
            tie_embeddings: tie.unwrap_or(arch == Arch::Gemma3),
            qkv_bias,
            qk_norm,
            max_positions: max_pos.unwrap_or(4096) as usize,
            sliding_window,
            rope_theta_local: gemma.as_ref().map_or(rope_theta, |g| g.local_theta),
            local_layers: gemma.map(|g| g.local),
            act: match arch {
                Arch::Gemma3 => GluAct::GeluTanh,
                _ => GluAct::Silu,
            },
            sandwich_norms: arch == Arch::Gemma3,
            embed_scale: match arch {
                Arch::Gemma3 => (hidden as f64).sqrt() as f32,
                _ => 1.0,
            },
            query_pre_attn_scalar,
            bos_token_id,
            eos_token_ids,
            raw,
        };
        cfg.check_values(path)?;
        Ok(cfg)
    }

    /// Every size within sane bounds (so no product of them overflows) and
    /// every float finite and positive.
    fn check_values(&self, path: &Path) -> Result<()> {
        check_range(path, "hidden_size", self.hidden, MAX_WIDTH)?;
        check_range(path, "num_attention_heads", self.heads, MAX_HEADS)?;
        check_range(path, "num_key_value_heads", self.kv_heads, MAX_HEADS)?;
        check_range(path, "head_dim", self.head_dim, MAX_HEAD_DIM)?;
        check_range(path, "vocab_size", self.vocab, MAX_VOCAB)?;
        for &m in &self.ffn_widths {
            check_range(path, "intermediate_size", m, MAX_WIDTH)?;
        }
        let mut floats = vec![
            ("rope_theta", self.rope_theta),
            ("rms_norm_eps", self.rms_eps),
        ];
        if self.local_layers.is_some() {
            floats.push((
                "rope_parameters.sliding_attention.rope_theta",
                self.rope_theta_local,
            ));
        }
        if let Some(s) = self.query_pre_attn_scalar {
            floats.push(("query_pre_attn_scalar", s));
        }
        match self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => floats.push(("rope_scaling.factor", factor)),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                floats.extend([
                    ("rope_scaling.factor", factor),
                    ("rope_scaling.low_freq_factor", low_freq_factor),
                    ("rope_scaling.high_freq_factor", high_freq_factor),
                    (
                        "rope_scaling.original_max_position_embeddings",
                        original_max_position_embeddings,
                    ),
                ]);
                if high_freq_factor <= low_freq_factor {
                    return Err(Error::format(
                        path,
                        "rope_scaling.high_freq_factor must exceed low_freq_factor",
                    ));
                }
            }
        }
        for (key, v) in floats {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::format(
                    path,
                    format!("{key} = {v}: must be finite and positive"),
                ));
            }
        }
        Ok(())
    }

    /// Width of the query projection output (heads · head_dim).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of the key/value projection outputs (kv_heads · head_dim).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Whether layer `l` is local: attends through `sliding_window` with
    /// the local RoPE base (every layer of a windowed Mistral).
    pub fn is_local(&self, l: usize) -> bool {
        self.sliding_window.is_some()
            && self
                .local_layers
                .as_ref()
                .is_none_or(|v| v.get(l).copied().unwrap_or(false))
    }

    /// The attention window of layer `l` (`None`: plain causal).
    pub fn window(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_local(l))
    }

    /// Whether some layers use another RoPE base than the others (Gemma 3).
    pub fn two_rope_bases(&self) -> bool {
        self.local_layers.is_some()
    }

    /// Inverse RoPE frequencies `[head_dim/2]` of the global (`local` =
    /// false) or local layers: θ^(−2i/head_dim), with the configured scaling
    /// applied (as transformers' `_compute_llama3_parameters` and
    /// `_compute_linear_scaling_rope_parameters`; never on Gemma's local
    /// layers, whose `rope_parameters.sliding_attention` is always default).
    pub fn rope_inv_freq(&self, local: bool) -> Vec<f64> {
        let half = self.head_dim / 2;
        let theta = if local {
            self.rope_theta_local
        } else {
            self.rope_theta
        };
        let scaling = self.rope_scaling.filter(|_| !local);
        (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / self.head_dim as f64);
                match scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings: max,
                    }) => {
                        let low_wavelen = max / low_freq_factor;
                        let high_wavelen = max / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (max / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
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
        let qk_norm = if self.qk_norm {
            2 * self.head_dim as u64
        } else {
            0
        };
        let norms = if self.sandwich_norms { 4 * d } else { 2 * d };
        let ffn: u64 = self.ffn_widths.iter().map(|&m| 3 * d * m as u64).sum();
        let emb = self.vocab as u64 * d;
        let head = if self.tie_embeddings { 0 } else { emb };
        emb + head + self.layers as u64 * (attn + bias + qk_norm + norms) + ffn + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "intermediate_size": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu"
        })
    }

    fn load(edit: impl FnOnce(&mut Value)) -> Result<ModelConfig> {
        let mut v = base();
        edit(&mut v);
        ModelConfig::from_json(v, Path::new("cfg/config.json"))
    }

    #[test]
    fn a_plain_config_loads() {
        let c = load(|_| {}).unwrap();
        assert_eq!((c.layers, c.head_dim, c.ffn_widths.len()), (2, 16, 2));
        assert!(!c.qkv_bias);
    }

    #[test]
    fn sizes_out_of_range_are_refused_before_allocation() {
        for (key, v) in [
            ("num_hidden_layers", json!(1u64 << 40)),
            ("num_hidden_layers", json!(0)),
            ("vocab_size", json!(1u64 << 62)),
            ("hidden_size", json!(0)),
            ("intermediate_size", json!(1u64 << 30)),
        ] {
            let e = load(|c| c[key] = v.clone()).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("out of range"), "{key}: {e}");
            assert!(e.contains("cfg/config.json"), "{e}");
        }
    }

    #[test]
    fn non_positive_or_non_finite_floats_are_refused() {
        for (key, v) in [
            ("rms_norm_eps", json!(0.0)),
            ("rms_norm_eps", json!(-1e-5)),
            ("rope_theta", json!(0.0)),
            ("rope_theta", json!(-5.0)),
        ] {
            let e = load(|c| c[key] = v.clone()).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("finite and positive"),
                "{key}: {e}"
            );
        }
        let e = load(|c| {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 0.0});
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("rope_scaling.factor"), "{e}");
    }

    #[test]
    fn unimplemented_fields_are_refused_by_name() {
        for (key, v) in [
            ("hidden_act", json!("gelu")),
            ("use_sliding_window", json!(true)),
            ("final_logit_softcapping", json!(30.0)),
            ("num_local_experts", json!(8)),
            ("attention_bias", json!(true)),
        ] {
            let e = load(|c| c[key] = v.clone()).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("not implemented"),
                "{key}: {e}"
            );
        }
        // Present but neutral values are accepted.
        load(|c| {
            c["use_sliding_window"] = json!(false);
            c["final_logit_softcapping"] = Value::Null;
            c["attention_bias"] = json!(false);
        })
        .unwrap();
    }

    #[test]
    fn qwen3_has_qk_norm_and_its_own_head_dim_default() {
        let qwen3 = |c: &mut Value| {
            c["architectures"] = json!(["Qwen3ForCausalLM"]);
            c["model_type"] = json!("qwen3");
        };
        let c = load(|c| {
            qwen3(c);
            c["head_dim"] = json!(24);
        })
        .unwrap();
        assert_eq!((c.arch, c.qk_norm, c.qkv_bias), (Arch::Qwen3, true, false));
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (24, 96, 48));
        // transformers' Qwen3Config: head_dim 128 when absent.
        assert_eq!(load(qwen3).unwrap().head_dim, 128);
        assert!(!load(|_| {}).unwrap().qk_norm);
        // o_proj bias, a sliding-window layer: refused by name.
        for (key, v) in [
            ("attention_bias", json!(true)),
            ("use_sliding_window", json!(true)),
            (
                "layer_types",
                json!(["full_attention", "sliding_attention"]),
            ),
        ] {
            let e = load(|c| {
                qwen3(c);
                c[key] = v.clone();
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(key) && e.contains("not implemented"),
                "{key}: {e}"
            );
        }
        load(|c| {
            qwen3(c);
            c["layer_types"] = json!(["full_attention", "full_attention"]);
            c["max_window_layers"] = json!(28);
            c["sliding_window"] = Value::Null;
        })
        .unwrap();
        // One type per layer (the config has two layers).
        let e = load(|c| {
            qwen3(c);
            c["layer_types"] = json!(["full_attention"]);
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("layer_types has 1 entries for num_hidden_layers 2"),
            "{e}"
        );
    }

    #[test]
    fn partial_rotary_is_refused_and_a_factor_of_one_accepted() {
        let e = load(|c| c["partial_rotary_factor"] = json!(0.5))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("partial_rotary_factor") && e.contains("not implemented"),
            "{e}"
        );
        load(|c| c["partial_rotary_factor"] = json!(1.0)).unwrap();
    }

    fn mistral(edit: impl FnOnce(&mut Value)) -> Result<ModelConfig> {
        load(|c| {
            c["architectures"] = json!(["MistralForCausalLM"]);
            c["model_type"] = json!("mistral");
            edit(c)
        })
    }

    #[test]
    fn mistral_reads_its_sliding_window() {
        let c = mistral(|c| c["sliding_window"] = json!(6)).unwrap();
        assert_eq!(
            (c.arch, c.sliding_window, c.qkv_bias),
            (Arch::Mistral, Some(6), false)
        );
        assert_eq!(c.arch.hf_name(), "MistralForCausalLM");
        for v in [Value::Null, json!(null)] {
            assert_eq!(
                mistral(|c| c["sliding_window"] = v).unwrap().sliding_window,
                None
            );
        }
        assert_eq!(mistral(|_| {}).unwrap().sliding_window, None);
        // model_type alone names the family too.
        let c = load(|c| {
            c.as_object_mut().unwrap().remove("architectures");
            c["model_type"] = json!("mistral");
            c["sliding_window"] = json!(1);
        })
        .unwrap();
        assert_eq!((c.arch, c.sliding_window), (Arch::Mistral, Some(1)));
    }

    #[test]
    fn hostile_sliding_windows_are_refused_by_name() {
        for v in [
            json!(0),
            json!(-4),
            json!(2.5),
            json!("6"),
            json!(true),
            json!([6]),
        ] {
            let e = mistral(|c| c["sliding_window"] = v.clone())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("sliding_window") && e.contains("cfg/config.json"),
                "{v}: {e}"
            );
        }
        let e = mistral(|c| c["layer_types"] = json!(["sliding_attention", "full_attention"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer_types") && e.contains("not implemented"),
            "{e}"
        );
        // A Mistral config with `use_sliding_window: true` is refused as on the others.
        assert!(mistral(|c| c["use_sliding_window"] = json!(true)).is_err());
    }

    #[test]
    fn other_families_ignore_sliding_window() {
        // Qwen2 configs carry `sliding_window` next to `use_sliding_window: false`.
        for arch in ["LlamaForCausalLM", "Qwen2ForCausalLM"] {
            let c = load(|c| {
                c["architectures"] = json!([arch]);
                c["sliding_window"] = json!(4096);
                c["use_sliding_window"] = json!(false);
            })
            .unwrap();
            assert_eq!(c.sliding_window, None, "{arch}");
        }
    }

    fn gemma3(edit: impl FnOnce(&mut Value)) -> Result<ModelConfig> {
        let mut v = json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 100,
            "intermediate_size": 96, "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 20,
            "sliding_window": 6, "attn_logit_softcapping": null,
            "final_logit_softcapping": null, "use_bidirectional_attention": false,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_theta": 10000.0, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 100.0, "rope_type": "default"}
            },
            "tie_word_embeddings": true
        });
        edit(&mut v);
        ModelConfig::from_json(v, Path::new("cfg/config.json"))
    }

    #[test]
    fn gemma3_reads_its_layers_bases_and_scales() {
        let c = gemma3(|_| {}).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert_eq!(c.arch.hf_name(), "Gemma3ForCausalLM");
        assert!(c.qk_norm && c.sandwich_norms && c.tie_embeddings && !c.qkv_bias);
        assert_eq!(c.act, GluAct::GeluTanh);
        assert_eq!((c.head_dim, c.q_dim()), (24, 96));
        assert_eq!(c.embed_scale, 8.0);
        assert_eq!(c.query_pre_attn_scalar, Some(20.0));
        assert_eq!((c.rope_theta, c.rope_theta_local), (10000.0, 100.0));
        assert_eq!(
            (0..3).map(|l| c.window(l)).collect::<Vec<_>>(),
            [Some(6), None, Some(6)]
        );
        assert!(c.two_rope_bases());
        for (local, base) in [(true, 100f64), (false, 10000f64)] {
            let f = c.rope_inv_freq(local)[1];
            assert!((f - base.powf(-2.0 / 24.0)).abs() < 1e-15, "{local}: {f}");
        }
        // Other families: one base, every layer global (Mistral: every layer local).
        let l = load(|_| {}).unwrap();
        assert_eq!(
            (l.act, l.embed_scale, l.sandwich_norms),
            (GluAct::Silu, 1.0, false)
        );
        assert!(!l.two_rope_bases() && l.window(0).is_none());
        let m = mistral(|c| c["sliding_window"] = json!(6)).unwrap();
        assert_eq!((m.window(0), m.window(1)), (Some(6), Some(6)));
    }

    #[test]
    fn gemma3_older_config_layout_and_defaults() {
        // transformers 4.x: rope_theta, rope_local_base_freq, sliding_window_pattern.
        let c = gemma3(|c| {
            let o = c.as_object_mut().unwrap();
            o.remove("layer_types");
            o.remove("rope_parameters");
            o.insert("rope_theta".into(), json!(1e6));
            o.insert("rope_local_base_freq".into(), json!(1e4));
            o.insert("sliding_window_pattern".into(), json!(2));
            o.insert("rope_scaling".into(), Value::Null);
        })
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_theta_local), (1e6, 1e4));
        assert_eq!(c.local_layers, Some(vec![true, false, true]));
        // Gemma3TextConfig's defaults when absent.
        let c = gemma3(|c| {
            let o = c.as_object_mut().unwrap();
            for k in [
                "layer_types",
                "rope_parameters",
                "head_dim",
                "query_pre_attn_scalar",
                "sliding_window",
                "tie_word_embeddings",
                "hidden_activation",
            ] {
                o.remove(k);
            }
        })
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_theta_local), (1e6, 1e4));
        assert_eq!(c.local_layers, Some(vec![true; 3]));
        assert_eq!((c.head_dim, c.query_pre_attn_scalar), (256, Some(256.0)));
        assert_eq!((c.sliding_window, c.tie_embeddings), (Some(4096), true));
        assert_eq!(c.act, GluAct::GeluTanh);
    }

    #[test]
    fn gemma3_unimplemented_fields_are_refused_by_name() {
        for (key, v) in [
            ("attn_logit_softcapping", json!(50.0)),
            ("final_logit_softcapping", json!(30.0)),
            ("hidden_activation", json!("gelu")),
            ("hidden_act", json!("silu")),
            ("use_bidirectional_attention", json!(true)),
            (
                "layer_types",
                json!(["sliding_attention", "chunked_attention", "full_attention"]),
            ),
            ("text_config", json!({})),
            ("attention_bias", json!(true)),
        ] {
            let e = gemma3(|c| c[key] = v.clone()).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("not implemented"),
                "{key}: {e}"
            );
        }
        let e = gemma3(|c| {
            c["rope_parameters"]["full_attention"] = json!({"rope_type": "yarn", "factor": 8.0})
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`yarn`") && e.contains("supported: llama3, linear"),
            "{e}"
        );
        let e = gemma3(|c| c["rope_parameters"]["sliding_attention"]["rope_type"] = json!("yarn"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sliding_attention") && e.contains("yarn"), "{e}");
        // Malformed values: named with the file.
        for (key, v) in [
            ("layer_types", json!(["sliding_attention"])),
            ("sliding_window", json!(0)),
            ("query_pre_attn_scalar", json!("20")),
            ("query_pre_attn_scalar", json!(-1.0)),
        ] {
            let e = gemma3(|c| c[key] = v.clone()).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("cfg/config.json"),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn linear_rope_scaling_divides_every_frequency() {
        let f = |c: &ModelConfig| c.rope_inv_freq(false);
        let plain = f(&load(|_| {}).unwrap());
        for (arch, key) in [
            ("LlamaForCausalLM", "rope_scaling"),
            ("Qwen2ForCausalLM", "rope_scaling"),
            ("MistralForCausalLM", "rope_parameters"),
        ] {
            let c = load(|c| {
                c["architectures"] = json!([arch]);
                c[key] = json!({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0});
            })
            .unwrap();
            assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
            let got = f(&c);
            assert!(got.iter().zip(&plain).all(|(g, p)| *g == p / 4.0), "{arch}");
        }
        // The old key `type` is read as transformers does; a factor is required.
        let c = load(|c| c["rope_scaling"] = json!({"type": "linear", "factor": 2.0})).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        for bad in [
            json!({"rope_type": "linear"}),
            json!({"rope_type": "linear", "factor": -2.0}),
        ] {
            let e = load(|c| c["rope_scaling"] = bad.clone())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("factor") && e.contains("cfg/config.json"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn gemma3_linear_scaling_is_on_the_global_layers_only() {
        let plain = gemma3(|_| {}).unwrap();
        let linear = |c: &mut Value| {
            c["rope_parameters"]["full_attention"] =
                json!({"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0})
        };
        let c = gemma3(linear).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.rope_inv_freq(true), plain.rope_inv_freq(true));
        let (g, p) = (c.rope_inv_freq(false), plain.rope_inv_freq(false));
        assert!(g.iter().zip(&p).all(|(g, p)| *g == p / 8.0));
        // transformers 4.x layout: `rope_scaling` applies to the global layers.
        let old = gemma3(|c| {
            let o = c.as_object_mut().unwrap();
            o.remove("rope_parameters");
            o.insert("rope_theta".into(), json!(10000.0));
            o.insert("rope_local_base_freq".into(), json!(100.0));
            o.insert(
                "rope_scaling".into(),
                json!({"rope_type": "linear", "factor": 8.0}),
            );
        })
        .unwrap();
        assert_eq!(old.rope_inv_freq(false), c.rope_inv_freq(false));
        assert_eq!(old.rope_inv_freq(true), c.rope_inv_freq(true));
        // The local layers take no scaling: refused by name.
        let e = gemma3(|c| {
            c["rope_parameters"]["sliding_attention"] =
                json!({"rope_type": "linear", "factor": 8.0})
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sliding_attention") && e.contains("linear"),
            "{e}"
        );
    }
}
