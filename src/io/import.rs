//! Imports a LLaMA, Qwen2, Qwen3 or Gemma 3 GGUF as an HF model directory: dequantised
//! `model.safetensors` with HF tensor names, `config.json`, `tokenizer.json`
//! and `tokenizer_config.json`, written atomically; with f32 output also the
//! Q4_1/Q8_0 matrices' own blocks (`ggml_blocks`), for faster decoding.
//!
//! GGUF shapes are reversed relative to HF (`dims[0]` is the contiguous
//! one), so a GGUF `[cols, rows]` matrix is the HF `[rows, cols]` matrix
//! with the same bytes. LLaMA GGUFs store the rows of `attn_q`/`attn_k`
//! permuted for llama.cpp's rotary layout: within each head of `hd` rows,
//! GGUF row `2i + j` (i < hd/2, j < 2) is HF row `j·hd/2 + i`, i.e.
//! `w.reshape(n, hd/2, 2, cols).swapaxes(1, 2)` with n = heads for Q and
//! KV heads for K. Qwen2 and Qwen3 GGUFs are stored unpermuted; Qwen3's
//! have no q/k/v biases and a per-head q/k norm (`attn_q_norm`,
//! `attn_k_norm`, `[head_dim]`).
//!
//! Gemma 3 (`gemma3`, the text model: `Gemma3ForCausalLM`): Q/K unpermuted,
//! q/k norms as Qwen3, and four norms per layer (`attn_norm`,
//! `post_attention_norm`, `ffn_norm`, `post_ffw_norm`: HF `input_layernorm`,
//! `post_attention_layernorm`, `pre_feedforward_layernorm`,
//! `post_feedforward_layernorm`). Gemma's RMSNorm scales by `1 + w`;
//! llama.cpp's converter stores `1 + w` so that its plain RMSNorm applies,
//! and this importer stores it back as `w`, subtracting 1 in f32 from every
//! `*norm.weight` (as transformers' GGUF loader does, bit for bit). What
//! the file does not say comes from what llama.cpp and transformers both
//! assume for gemma3 (see [`GemmaHparams`]).
//!
//! Mistral: llama.cpp converts `MistralForCausalLM` as `llama` (LLaMA's
//! tensors and Q/K permutation) and records no sliding window; see
//! [`mistral_window`] for when the import says Mistral.
use crate::io::ggml_blocks::{self, BlockTensor};
use crate::io::gguf::{GgufFile, TensorInfo, Value};
use crate::io::gguf_tokenizer::{tokenizer_config_json, tokenizer_json};
use crate::io::output::{self, OutputDir, MODEL_DIR};
use crate::io::safetensors_out::{write_model_with, OutDtype, TensorSpec, DEFAULT_MAX_SHARD_BYTES};
use crate::quant::dequant::dequantize;
use crate::quant::{BlockKind, BLOCK_LEN};
use crate::{Error, Result};
use rayon::prelude::*;
use serde_json::json;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// dtype of the written tensors.
    pub dtype: OutDtype,
    /// Replace an existing output directory (one an earlier run wrote;
    /// DESIGN.md §10).
    pub force: bool,
    /// With f32 output, also write the blocks of the Q4_1 and Q8_0
    /// matrices (`ggml_blocks::BLOCKS_FILE`).
    pub blocks: bool,
    /// The config loader's checks (`model::config`, a layer above io),
    /// run on the config.json the import would write before anything is
    /// written; the path is the GGUF's, for the error.
    pub check_config: fn(&serde_json::Value, &Path) -> Result<()>,
}

#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// `general.architecture`: `llama`, `qwen2`, `qwen3` or `gemma3`.
    pub architecture: String,
    /// The written config's `architectures[0]` (`MistralForCausalLM` for
    /// a `llama` file that is Mistral, [`mistral_window`]).
    pub hf_architecture: &'static str,
    /// What the file did not say and how the import settled it, for the
    /// import log (one line each).
    pub notes: Vec<String>,
    pub n_layers: usize,
    pub n_tensors: usize,
    pub n_params: u64,
}

/// Model hyper-parameters read from `{arch}.*` metadata.
struct Hparams {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    rope_theta: f64,
    /// Linear RoPE scaling: the factor and the metadata key it came from.
    rope_linear: Option<(f64, String)>,
    rms_eps: f64,
    tied: bool,
    /// Gemma 3's attention layout; `None` for the other architectures.
    gemma: Option<GemmaHparams>,
    /// A `llama` file written as `MistralForCausalLM`: its sliding window
    /// (`None`: no window stated, written as null). `None` otherwise.
    mistral: Option<Option<usize>>,
}

/// Gemma 3's sliding-window layout. A gemma3 GGUF states the window
/// (`attention.sliding_window`) and one rope base (`rope.freq_base`, the
/// global layers'); the rest is fixed by the architecture, and llama.cpp
/// (`llama-model.cpp`, LLM_ARCH_GEMMA3) and transformers' GGUF loader
/// (`Gemma3TextConfig` defaults) assume the same values:
struct GemmaHparams {
    sliding_window: usize,
    /// Rope base of the sliding-window layers: 10000 (llama.cpp's
    /// `rope_freq_base_train_swa`, transformers' `sliding_attention`
    /// default).
    rope_local_base: f64,
    /// Every `swa_pattern`-th layer (1-based) is global, the others slide:
    /// 6 (llama.cpp's `set_swa_pattern(6)`, transformers'
    /// `_sliding_window_pattern`).
    swa_pattern: usize,
    /// Queries are scaled by `query_pre_attn_scalar^-1/2`: head_dim, except
    /// hidden / heads for the 62-layer (27B) model (llama.cpp's
    /// `f_attention_scale`; transformers' default 256 = head_dim of every
    /// Gemma 3 but the 27B).
    query_pre_attn_scalar: usize,
}

const GEMMA_ROPE_LOCAL_BASE: f64 = 10_000.0;
const GEMMA_SWA_PATTERN: usize = 6;

fn hparams(g: &GgufFile, arch: &str, notes: &mut Vec<String>) -> Result<Hparams> {
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<Option<usize>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                Error::format(
                    g.path(),
                    format!("metadata {} = {v:?} is not an unsigned integer", key(k)),
                )
            }),
        }
    };
    let need = |k: &str| -> Result<usize> {
        int(k)?.ok_or_else(|| Error::format(g.path(), format!("metadata {} is missing", key(k))))
    };
    let float = |k: &str| -> Result<Option<f64>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                Error::format(
                    g.path(),
                    format!("metadata {} = {v:?} is not a number", key(k)),
                )
            }),
        }
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let key_length = int("attention.key_length")?;
    // Without key_length, head_dim is hidden / heads (Qwen3 states it).
    if hidden == 0 || heads == 0 || (key_length.is_none() && hidden % heads != 0) {
        return Err(Error::format(
            g.path(),
            format!("{heads} heads do not divide hidden size {hidden}"),
        ));
    }
    if arch == "gemma3" && key_length.is_none() {
        return Err(Error::format(
            g.path(),
            format!("metadata {} is missing", key("attention.key_length")),
        ));
    }
    let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = key_length.unwrap_or(hidden / heads);
    if kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::format(
            g.path(),
            format!(
                "{heads} heads, {kv_heads} KV heads, head_dim {head_dim}: not a valid GQA shape"
            ),
        ));
    }
    // Rotating fewer dimensions than a head has (partial rotary) is not
    // implemented: running such a file would compute another model.
    if let Some(n) = int("rope.dimension_count")?.filter(|&n| n != head_dim) {
        return Err(Error::Unsupported(format!(
            "{}: metadata {} = {n}: RoPE on {n} of head_dim {head_dim} dimensions \
             (partial rotary) is not implemented",
            g.path().display(),
            key("rope.dimension_count")
        )));
    }
    // On gemma3 the factor scales the global layers only (transformers'
    // `rope_parameters.full_attention`; Gemma 3 4B and up state 8).
    let rope_linear = rope_linear(g, arch)?;
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::format(g.path(), "missing tensor token_embd.weight"))?;
    // Each layer has at least 9 tensors: refuse a block count the file
    // cannot back before sizing anything by it.
    let layers = need("block_count")?;
    if layers.saturating_mul(9) > g.tensors.len() {
        return Err(Error::format(
            g.path(),
            format!(
                "{} = {layers}, but the file has only {} tensors",
                key("block_count"),
                g.tensors.len()
            ),
        ));
    }
    let gemma = match arch {
        "gemma3" => Some(gemma_hparams(g, layers, hidden, heads, head_dim)?),
        _ => None,
    };
    let mistral = match arch {
        "llama" => mistral_window(g, notes)?,
        _ => None,
    };
    Ok(Hparams {
        layers,
        hidden,
        ffn: need("feed_forward_length")?,
        heads,
        kv_heads,
        head_dim,
        vocab: embd.dims.get(1).copied().unwrap_or(0) as usize,
        context: need("context_length")?,
        rope_theta: float("rope.freq_base")?.unwrap_or(10_000.0),
        rope_linear,
        rms_eps: float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            Error::format(
                g.path(),
                format!(
                    "metadata {} is missing",
                    key("attention.layer_norm_rms_epsilon")
                ),
            )
        })?,
        tied: g.tensor("output.weight").is_none(),
        gemma,
        mistral,
    })
}

/// The file's RoPE scaling as llama.cpp reads it (`llama-model.cpp`,
/// `llm_load_hparams`): the type defaults to linear, the factor is
/// `rope.scaling.factor` (else the older `rope.scale_linear`), and a factor
/// of 0, or none, is no scaling. Linear scaling comes back as (factor, the
/// key it was read from); "none" stating a factor other than 1 contradicts
/// itself, and every other type (yarn, longrope, ...) changes attention in
/// ways the engine does not implement: both are refused by key.
fn rope_linear(g: &GgufFile, arch: &str) -> Result<Option<(f64, String)>> {
    let type_key = format!("{arch}.rope.scaling.type");
    let kind = match g.get(&type_key) {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| {
            Error::format(
                g.path(),
                format!("metadata {type_key} = {v:?} is not a string"),
            )
        })?),
    };
    let factor = [
        format!("{arch}.rope.scaling.factor"),
        format!("{arch}.rope.scale_linear"),
    ]
    .into_iter()
    .find_map(|k| g.get(&k).map(|v| (k, v)))
    .map(|(k, v)| match v.as_f64() {
        Some(f) => Ok((f, k)),
        None => Err(Error::format(
            g.path(),
            format!("metadata {k} = {v:?} is not a number"),
        )),
    })
    .transpose()?
    .filter(|&(f, _)| f != 0.0);
    match (kind, factor) {
        (None | Some("linear"), factor) => {
            if kind.is_some() && factor.is_none() {
                return Err(Error::format(
                    g.path(),
                    format!("metadata {type_key} = \"linear\" without {arch}.rope.scaling.factor"),
                ));
            }
            Ok(factor)
        }
        (Some("none"), Some((f, k))) if f != 1.0 => Err(Error::format(
            g.path(),
            format!("metadata {type_key} = \"none\", but {k} = {f}"),
        )),
        (Some("none"), _) => Ok(None),
        (Some(other), _) => Err(Error::Unsupported(format!(
            "{}: metadata {type_key} = {other:?}: RoPE scaling other than linear is not \
             implemented",
            g.path().display()
        ))),
    }
}

/// Whether a `llama` file is written as `MistralForCausalLM`, and with
/// which window. llama.cpp's converter turns `MistralForCausalLM` into
/// `llama` and writes no window; transformers' GGUF loader reads a `llama`
/// file as Mistral only when `general.name` is exactly "mistral", and then
/// gives `MistralConfig`'s default window 4096 without reading the file.
/// Here: Mistral when the name is "mistral" or the file states a window
/// (`llama.attention.sliding_window` > 0, llama.cpp's key; 0 is none);
/// a Mistral without a stated window gets `sliding_window` null (full
/// causal attention, as llama.cpp runs the file) rather than a guess, and
/// `notes` says so. A name that only mentions Mistral stays LLaMA (as in
/// transformers; LLaMA's layer is Mistral's without a window), noted too.
fn mistral_window(g: &GgufFile, notes: &mut Vec<String>) -> Result<Option<Option<usize>>> {
    let key = "llama.attention.sliding_window";
    let window = match g.get(key) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(w) => Some(w as usize),
            None => {
                return Err(Error::format(
                    g.path(),
                    format!("metadata {key} = {v:?} is not an unsigned integer"),
                ))
            }
        },
    };
    let name = g.get("general.name").and_then(Value::as_str).unwrap_or("");
    if name != "mistral" && window.is_none() {
        if name.to_lowercase().contains("mistral") {
            notes.push(format!(
                "general.name {name:?}: written as LlamaForCausalLM, as transformers reads it \
                 (Mistral only for the name \"mistral\"); the file states no sliding window, \
                 so none applies. For a Mistral trained with one, set \"architectures\": \
                 [\"MistralForCausalLM\"] and \"sliding_window\" in config.json"
            ));
        }
        return Ok(None);
    }
    notes.push(match window {
        None => "MistralForCausalLM (general.name \"mistral\"): the file states no sliding \
                 window (llama.cpp writes none), so config.json has \"sliding_window\": null, \
                 full causal attention as llama.cpp runs it; transformers would assume \
                 MistralConfig's default 4096. Set it if the model has a window (Mistral 7B \
                 v0.1: 4096)"
            .to_string(),
        Some(w) => format!("MistralForCausalLM with sliding_window {w} from {key}"),
    });
    Ok(Some(window))
}

/// The gemma3 metadata beyond the common keys, checked: the window must be
/// stated, V heads must be as wide as K heads, and what the engine does not
/// implement (logit soft-capping; rope scaling in [`hparams`]) is refused
/// by key.
fn gemma_hparams(
    g: &GgufFile,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> Result<GemmaHparams> {
    let bad = |msg: String| Error::format(g.path(), msg);
    let value_length = g.get("gemma3.attention.value_length");
    if let Some(v) = value_length.filter(|v| v.as_u64() != Some(head_dim as u64)) {
        return Err(bad(format!(
            "metadata gemma3.attention.value_length = {v:?}, but key_length is {head_dim} \
             (Gemma 3 has one head_dim)"
        )));
    }
    let unsupported = |key: &str, v: &Value| {
        Error::Unsupported(format!(
            "{}: metadata {key} = {v:?}: not implemented for gemma3",
            g.path().display()
        ))
    };
    for key in [
        "gemma3.attn_logit_softcapping",
        "gemma3.final_logit_softcapping",
    ] {
        if let Some(v) = g.get(key) {
            return Err(unsupported(key, v));
        }
    }
    let key = "gemma3.attention.sliding_window";
    let sliding_window = match g.get(key) {
        None => return Err(bad(format!("metadata {key} is missing"))),
        Some(v) => match v.as_u64() {
            Some(w) if w > 0 => w as usize,
            _ => {
                return Err(bad(format!(
                    "metadata {key} = {v:?} is not a positive integer"
                )))
            }
        },
    };
    Ok(GemmaHparams {
        sliding_window,
        rope_local_base: GEMMA_ROPE_LOCAL_BASE,
        swa_pattern: GEMMA_SWA_PATTERN,
        query_pre_attn_scalar: if layers == 62 {
            hidden / heads
        } else {
            head_dim
        },
    })
}

/// How one GGUF tensor becomes one HF tensor.
struct Plan {
    hf_name: String,
    /// Expected HF shape.
    shape: Vec<usize>,
    /// Heads to un-permute the rows over (LLaMA Q and K).
    unpermute_heads: Option<usize>,
    /// Stored as `1 + w` (Gemma's norms): subtract 1.
    minus_one: bool,
}

/// The HF name, expected shape and row permutation of every tensor the
/// model must contain, keyed by GGUF name.
fn plans(h: &Hparams, arch: &str) -> Vec<(String, Plan)> {
    let (d, q, kv, m) = (
        h.hidden,
        h.heads * h.head_dim,
        h.kv_heads * h.head_dim,
        h.ffn,
    );
    let llama = arch == "llama";
    let gemma = arch == "gemma3";
    let plan = |gg: String, hf: String, shape: Vec<usize>, heads: Option<usize>| {
        let minus_one = gemma && gg.ends_with("norm.weight");
        (
            gg,
            Plan {
                hf_name: hf,
                shape,
                unpermute_heads: heads,
                minus_one,
            },
        )
    };
    let mut out = vec![
        plan(
            "token_embd.weight".into(),
            "model.embed_tokens.weight".into(),
            vec![h.vocab, d],
            None,
        ),
        plan(
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            vec![d],
            None,
        ),
    ];
    if !h.tied {
        out.push(plan(
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![h.vocab, d],
            None,
        ));
    }
    for l in 0..h.layers {
        let (b, p) = (format!("blk.{l}"), format!("model.layers.{l}"));
        let mut add = |gg: &str, hf: &str, shape: Vec<usize>, heads: Option<usize>| {
            out.push(plan(format!("{b}.{gg}"), format!("{p}.{hf}"), shape, heads))
        };
        add("attn_norm.weight", "input_layernorm.weight", vec![d], None);
        if gemma {
            add(
                "post_attention_norm.weight",
                "post_attention_layernorm.weight",
                vec![d],
                None,
            );
            add(
                "post_ffw_norm.weight",
                "post_feedforward_layernorm.weight",
                vec![d],
                None,
            );
        }
        add(
            "attn_q.weight",
            "self_attn.q_proj.weight",
            vec![q, d],
            llama.then_some(h.heads),
        );
        add(
            "attn_k.weight",
            "self_attn.k_proj.weight",
            vec![kv, d],
            llama.then_some(h.kv_heads),
        );
        add(
            "attn_v.weight",
            "self_attn.v_proj.weight",
            vec![kv, d],
            None,
        );
        add(
            "attn_output.weight",
            "self_attn.o_proj.weight",
            vec![d, q],
            None,
        );
        if arch == "qwen2" {
            add("attn_q.bias", "self_attn.q_proj.bias", vec![q], None);
            add("attn_k.bias", "self_attn.k_proj.bias", vec![kv], None);
            add("attn_v.bias", "self_attn.v_proj.bias", vec![kv], None);
        }
        if arch == "qwen3" || gemma {
            let hd = h.head_dim;
            add(
                "attn_q_norm.weight",
                "self_attn.q_norm.weight",
                vec![hd],
                None,
            );
            add(
                "attn_k_norm.weight",
                "self_attn.k_norm.weight",
                vec![hd],
                None,
            );
        }
        let ffn_norm = match gemma {
            true => "pre_feedforward_layernorm.weight",
            false => "post_attention_layernorm.weight",
        };
        add("ffn_norm.weight", ffn_norm, vec![d], None);
        add("ffn_gate.weight", "mlp.gate_proj.weight", vec![m, d], None);
        add("ffn_up.weight", "mlp.up_proj.weight", vec![m, d], None);
        add("ffn_down.weight", "mlp.down_proj.weight", vec![d, m], None);
    }
    out
}

/// Undoes llama.cpp's rotary row permutation of a matrix of `rows` rows of
/// `cols` elements (values, or a row's blocks; see the module doc).
fn unpermute_rows<T: Copy + Default + Send + Sync>(
    w: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Vec<T> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![T::default(); w.len()];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let (h, within) = (r / hd, r % hd);
        let (j, i) = (within / half, within % half);
        let src = h * hd + 2 * i + j;
        dst.copy_from_slice(&w[src * cols..(src + 1) * cols]);
    });
    out
}

/// The tensor's data as `dtype` bytes: dequantised, checked finite,
/// un-permuted and shifted by −1 where the plan says so.
fn convert(g: &GgufFile, t: &TensorInfo, plan: &Plan, dtype: OutDtype) -> Result<Vec<u8>> {
    let mut w = dequantize(&t.name, t.ty, g.tensor_data(t)?, t.n_elements())?;
    if let Some(bad) = w.par_iter().position_any(|v| !v.is_finite()) {
        return Err(Error::tensor(
            &t.name,
            format!(
                "{} value {} at element {bad} after dequantising {}",
                g.path().display(),
                w[bad],
                t.ty
            ),
        ));
    }
    if let Some(bad) = w.par_iter().position_any(|&v| dtype.overflows(v)) {
        return Err(Error::tensor(
            &t.name,
            format!(
                "value {} at element {bad} of {} does not fit in {} (it would become inf); \
                 import with --dtype f32",
                w[bad],
                g.path().display(),
                dtype.torch_name()
            ),
        ));
    }
    if let Some(heads) = plan.unpermute_heads {
        w = unpermute_rows(&w, plan.shape[0], plan.shape[1], heads);
    }
    if plan.minus_one {
        w.iter_mut().for_each(|v| *v -= 1.0);
    }
    Ok(dtype.encode(&w))
}

/// The blocks of a Q4_1 or Q8_0 matrix whose rows are whole blocks, in HF
/// row order; `None` for any other tensor (a shifted norm is a vector, and
/// its blocks would not be its values).
fn blocks_of<'g>(g: &'g GgufFile, t: &TensorInfo, plan: &Plan) -> Option<BlockTensor<'g>> {
    if plan.minus_one {
        return None;
    }
    let kind = BlockKind::from_ggml(t.ty)?;
    let [rows, cols] = plan.shape[..] else {
        return None;
    };
    if !cols.is_multiple_of(BLOCK_LEN) {
        return None;
    }
    let data = g.tensor_data(t).ok()?;
    let data = match plan.unpermute_heads {
        Some(heads) => {
            let row_bytes = cols / BLOCK_LEN * kind.block_bytes();
            Cow::Owned(unpermute_rows(data, rows, row_bytes, heads))
        }
        None => Cow::Borrowed(data),
    };
    Some(BlockTensor {
        name: plan.hf_name.clone(),
        kind,
        rows,
        cols,
        data,
    })
}

/// The config's `architectures[0]` and `model_type`.
fn model_class(arch: &str, h: &Hparams) -> (&'static str, &'static str) {
    match (arch, h.mistral) {
        ("gemma3", _) => ("Gemma3ForCausalLM", "gemma3_text"),
        ("llama", Some(_)) => ("MistralForCausalLM", "mistral"),
        ("llama", None) => ("LlamaForCausalLM", "llama"),
        ("qwen3", _) => ("Qwen3ForCausalLM", "qwen3"),
        _ => ("Qwen2ForCausalLM", "qwen2"),
    }
}

fn config_json(g: &GgufFile, arch: &str, h: &Hparams, dtype: OutDtype) -> serde_json::Value {
    if let Some(gemma) = &h.gemma {
        return gemma_config_json(g, h, gemma, dtype);
    }
    let (class, model_type) = model_class(arch, h);
    let id = |k: &str| g.get(k).and_then(Value::as_u64);
    let mut c = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": h.hidden,
        "intermediate_size": h.ffn,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "num_key_value_heads": h.kv_heads,
        "head_dim": h.head_dim,
        "vocab_size": h.vocab,
        "max_position_embeddings": h.context,
        "rope_theta": h.rope_theta,
        "rms_norm_eps": h.rms_eps,
        "tie_word_embeddings": h.tied,
        "hidden_act": "silu",
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype.torch_name(),
    });
    match h.mistral {
        Some(window) => c["sliding_window"] = window.into(),
        None if arch == "llama" => {
            c["attention_bias"] = false.into();
            c["mlp_bias"] = false.into();
        }
        None => {}
    }
    if arch == "qwen3" {
        c["attention_bias"] = false.into();
        c["use_sliding_window"] = false.into();
    }
    if let Some((factor, _)) = h.rope_linear {
        c["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
    }
    c
}

/// A config check's refusal `e` of the config.json made from the GGUF,
/// restated with the metadata key the refused value came from, for the
/// config keys the import fills from `{arch}.*` metadata.
fn name_metadata_key(e: Error, arch: &str, h: &Hparams) -> Error {
    let (path, msg) = match e {
        Error::Format { path, msg } => (path, msg),
        other => return other,
    };
    const SOURCES: [(&str, &str); 9] = [
        ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
        ("rope_theta", "rope.freq_base"),
        ("max_position_embeddings", "context_length"),
        ("hidden_size", "embedding_length"),
        ("intermediate_size", "feed_forward_length"),
        ("num_hidden_layers", "block_count"),
        ("num_attention_heads", "attention.head_count"),
        ("num_key_value_heads", "attention.head_count_kv"),
        ("head_dim", "attention.key_length"),
    ];
    // The config loader's messages begin with the key, some in backquotes.
    let refused = msg.trim_start_matches('`');
    let source = match &h.rope_linear {
        Some((_, k)) if refused.starts_with("rope_scaling.factor") => Some(k.clone()),
        _ => SOURCES
            .iter()
            .find(|(c, _)| refused.starts_with(c))
            .map(|(_, k)| format!("{arch}.{k}")),
    };
    const REFUSED: &str = "a config.json every loader refuses";
    let msg = match source {
        Some(k) => format!("metadata {k} gives {REFUSED}: {msg}"),
        None => format!("it gives {REFUSED}: {msg}"),
    };
    Error::format(path, msg)
}

/// Gemma 3's `config.json`: every key, in the order and form
/// `Gemma3TextConfig(...).save_pretrained()` (transformers 5) writes,
/// without `transformers_version` (no transformers wrote it).
fn gemma_config_json(
    g: &GgufFile,
    h: &Hparams,
    gemma: &GemmaHparams,
    dtype: OutDtype,
) -> serde_json::Value {
    let id = |k: &str| g.get(k).and_then(Value::as_u64);
    let layer_types: Vec<&str> = (1..=h.layers)
        .map(|l| match l % gemma.swa_pattern {
            0 => "full_attention",
            _ => "sliding_attention",
        })
        .collect();
    let rope = |theta: f64| json!({"rope_theta": theta, "rope_type": "default"});
    let global = match h.rope_linear {
        Some((factor, _)) => {
            json!({"factor": factor, "rope_theta": h.rope_theta, "rope_type": "linear"})
        }
        None => rope(h.rope_theta),
    };
    json!({
        "_sliding_window_pattern": gemma.swa_pattern,
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": null,
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "dtype": dtype.torch_name(),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "final_logit_softcapping": null,
        "head_dim": h.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": h.hidden,
        "initializer_range": 0.02,
        "intermediate_size": h.ffn,
        "layer_types": layer_types,
        "max_position_embeddings": h.context,
        "model_type": "gemma3_text",
        "num_attention_heads": h.heads,
        "num_hidden_layers": h.layers,
        "num_key_value_heads": h.kv_heads,
        "pad_token_id": id("tokenizer.ggml.padding_token_id"),
        "query_pre_attn_scalar": gemma.query_pre_attn_scalar,
        "rms_norm_eps": h.rms_eps,
        "rope_parameters": {
            "full_attention": global,
            "sliding_attention": rope(gemma.rope_local_base),
        },
        "sliding_window": gemma.sliding_window,
        "tie_word_embeddings": h.tied,
        "use_bidirectional_attention": false,
        "use_cache": true,
        "vocab_size": h.vocab,
    })
}

/// Imports the GGUF `src` into the HF model directory `out` (an output:
/// `src` is protected from it, DESIGN.md §10).
pub fn import_gguf(src: &Path, out: &Path, opts: &ImportOptions) -> Result<ImportSummary> {
    output::protect(src);
    let g = GgufFile::open(src)?;
    let arch = g
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::format(src, "metadata general.architecture is missing"))?
        .to_string();
    if !["llama", "qwen2", "qwen3", "gemma3"].contains(&arch.as_str()) {
        return Err(Error::Unsupported(format!(
            "{}: architecture {arch:?}; supported: llama, qwen2, qwen3, gemma3",
            src.display()
        )));
    }
    let mut notes = Vec::new();
    let h = hparams(&g, &arch, &mut notes)?;
    // Every token id must be a row of the embedding (fewer tokens than rows
    // is a padded embedding, and fine); the tokenizer rebuild checks the
    // special ids against the tokens, so this bounds them too.
    let key = "tokenizer.ggml.tokens";
    if let Some(n) = g.get(key).and_then(Value::as_array).map(<[Value]>::len) {
        if n > h.vocab {
            return Err(Error::format(
                src,
                format!(
                    "metadata {key} holds {n} tokens, but token_embd.weight has {} rows",
                    h.vocab
                ),
            ));
        }
    }
    let config = config_json(&g, &arch, &h, opts.dtype);
    (opts.check_config)(&config, src).map_err(|e| name_metadata_key(e, &arch, &h))?;
    let plans = plans(&h, &arch);
    for t in &g.tensors {
        if !plans.iter().any(|(name, _)| *name == t.name) {
            return Err(Error::Unsupported(format!(
                "{}: tensor {} is not part of a {arch} model this importer knows",
                src.display(),
                t.name
            )));
        }
    }
    let tokenizer = tokenizer_json(&g)?;
    let tokenizer_config = tokenizer_config_json(&g)?;

    let mut sources = Vec::with_capacity(plans.len());
    let mut specs = Vec::with_capacity(plans.len());
    for (name, plan) in &plans {
        let t = g
            .tensor(name)
            .ok_or_else(|| Error::format(src, format!("missing tensor {name}")))?;
        if t.shape() != plan.shape {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "{}: shape {:?} (HF order), expected {:?} from the metadata",
                    src.display(),
                    t.shape(),
                    plan.shape
                ),
            ));
        }
        sources.push(t);
        specs.push(TensorSpec {
            name: plan.hf_name.clone(),
            dtype: opts.dtype,
            shape: plan.shape.clone(),
        });
    }
    let n_params = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() as u64)
        .sum();

    // Tensors are dequantised one at a time as they are written.
    let dir = OutputDir::create(out, MODEL_DIR, opts.force)?;
    write_model_with(dir.path(), &specs, DEFAULT_MAX_SHARD_BYTES, |i| {
        convert(&g, sources[i], &plans[i].1, opts.dtype).map(Cow::Owned)
    })?;
    let json_file =
        |name: &str, v: &serde_json::Value| output::write_json(&dir.path().join(name), v);
    json_file("config.json", &config)?;
    json_file("tokenizer.json", &tokenizer)?;
    json_file("tokenizer_config.json", &tokenizer_config)?;
    if opts.blocks && opts.dtype == OutDtype::F32 {
        let blocks: Vec<BlockTensor> = (0..plans.len())
            .filter_map(|i| blocks_of(&g, sources[i], &plans[i].1))
            .collect();
        if !blocks.is_empty() {
            ggml_blocks::write(dir.path(), &blocks)?;
        }
    }
    let out_dir = dir.commit()?;
    Ok(ImportSummary {
        out_dir,
        hf_architecture: model_class(&arch, &h).0,
        architecture: arch,
        notes,
        n_layers: h.layers,
        n_tensors: specs.len(),
        n_params,
    })
}
