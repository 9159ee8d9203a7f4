//! Imports a LLaMA, Qwen2 or Qwen3 GGUF as an HF model directory: dequantised
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
}

#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// `general.architecture`: `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
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
    rms_eps: f64,
    tied: bool,
}

fn hparams(g: &GgufFile, arch: &str) -> Result<Hparams> {
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
    })
}

/// How one GGUF tensor becomes one HF tensor.
struct Plan {
    hf_name: String,
    /// Expected HF shape.
    shape: Vec<usize>,
    /// Heads to un-permute the rows over (LLaMA Q and K).
    unpermute_heads: Option<usize>,
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
    let plan = |gg: String, hf: String, shape: Vec<usize>, heads: Option<usize>| {
        (
            gg,
            Plan {
                hf_name: hf,
                shape,
                unpermute_heads: heads,
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
        if arch == "qwen3" {
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
        add(
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            vec![d],
            None,
        );
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
/// un-permuted where the plan says so.
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
    Ok(dtype.encode(&w))
}

/// The blocks of a Q4_1 or Q8_0 matrix whose rows are whole blocks, in HF
/// row order; `None` for any other tensor.
fn blocks_of<'g>(g: &'g GgufFile, t: &TensorInfo, plan: &Plan) -> Option<BlockTensor<'g>> {
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

fn config_json(g: &GgufFile, arch: &str, h: &Hparams, dtype: OutDtype) -> serde_json::Value {
    let (class, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
        _ => ("Qwen2ForCausalLM", "qwen2"),
    };
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
    if arch == "llama" {
        c["attention_bias"] = false.into();
        c["mlp_bias"] = false.into();
    }
    if arch == "qwen3" {
        c["attention_bias"] = false.into();
        c["use_sliding_window"] = false.into();
    }
    c
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
    if !["llama", "qwen2", "qwen3"].contains(&arch.as_str()) {
        return Err(Error::Unsupported(format!(
            "{}: architecture {arch:?}; supported: llama, qwen2, qwen3",
            src.display()
        )));
    }
    let h = hparams(&g, &arch)?;
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
                    "shape {:?} (HF order), expected {:?} from the metadata",
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
    json_file("config.json", &config_json(&g, &arch, &h, opts.dtype))?;
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
        architecture: arch,
        n_layers: h.layers,
        n_tensors: specs.len(),
        n_params,
    })
}
