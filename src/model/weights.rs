//! Model weights as the backend holds them, loaded from a memory-mapped
//! HF model directory one tensor at a time (f32 conversion happens per
//! tensor, so the host never holds two copies of the model).
use super::config::ModelConfig;
use crate::backend::{Backend, WeightSource};
use crate::io::ggml_blocks::BlockFile;
use crate::io::safetensors_io::{SafeModel, TensorRef};
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
    pub q_norm: Option<W>, // [hd], Qwen3's per-head RMSNorm of q (cfg.qk_norm)
    pub k_norm: Option<W>, // [hd], the same of k
    pub ffn_norm: W,       // [d]
    /// Gemma 3's norms of the attention and FFN outputs (cfg.sandwich_norms), `[d]` each.
    pub post_attn_norm: Option<W>,
    pub post_ffn_norm: Option<W>,
    pub w_gate: W,         // [m, d]
    pub w_up: W,           // [m, d]
    pub w_down: W,         // [d, m]
    pub b_down: Option<W>, // [d], present after FLAP bias compensation
    /// FFN width m of this layer.
    pub ffn: usize,
    /// The layer's index (its window and RoPE base: `ModelConfig::is_local`).
    pub index: usize,
}

/// Where a model's decoder-layer weights live on the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Every layer uploaded once by `Model::load_with`.
    #[default]
    Resident,
    /// Layers uploaded from the mapped files each time a pass reaches them
    /// (`--stream`): at most two layers on the device (the one computing and
    /// the next one uploading). The final norm, and the output projection
    /// once loaded (`Model::lm_head`), stay resident.
    Streamed,
}

/// How `Model::load_with` loads a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    pub residency: Residency,
    /// Also hand the backend the ggml blocks of the matrices that have them
    /// (`ggml_blocks.safetensors`, written by a GGUF import), each checked
    /// to dequantise to its f32 tensor: for decoding, which the CPU backend
    /// then runs from the blocks. Off, or on a backend that does not use
    /// blocks (`Backend::uses_ggml_blocks`), the file is not read.
    pub ggml_blocks: bool,
}

impl From<Residency> for LoadOptions {
    fn from(residency: Residency) -> Self {
        Self {
            residency,
            ggml_blocks: false,
        }
    }
}

/// The decoder layers, as `Residency` says.
enum LayerStore<W> {
    Resident(Vec<LayerWeights<W>>),
    /// Nothing held: shapes were checked at load, values are read (and
    /// checked for NaN/inf) at each upload.
    Streamed,
}

/// A tensor of the mapped files is what backends upload weights from.
impl WeightSource for TensorRef<'_> {
    fn numel(&self) -> usize {
        TensorRef::numel(self)
    }
    fn to_f32(&self) -> Result<Vec<f32>> {
        TensorRef::to_f32(self)
    }
    fn write_bf16(&self, dst: &mut [u8]) -> Result<()> {
        TensorRef::write_bf16(self, dst)
    }
}

/// HF names of the two `[vocab, d]` matrices.
const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// A loaded model: config, the mapped files and the backend-resident weights.
///
/// The `[vocab, d]` matrices are not loaded with the rest: a lookup reads
/// only its rows from the mapped file (`embed_tokens`), and the output
/// projection is loaded on its first use (`lm_head`). Energy scoring and
/// the refit, which never form logits, so never hold either matrix (on
/// Gemma 3 270M the embedding is 63% of the parameters).
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub dir: PathBuf,
    pub files: SafeModel,
    pub norm: B::Weight, // [d]
    /// The output projection `[vocab, d]` (the embedding when tied), once
    /// `lm_head` has loaded it.
    head: std::sync::OnceLock<B::Weight>,
    layers: LayerStore<B::Weight>,
    /// The blocks file, when `LoadOptions::ggml_blocks` found one (streamed
    /// layers read it at each upload).
    blocks: Option<BlockFile>,
    /// Streamed layer uploads so far (`for_each_layer`).
    layer_uploads: std::sync::atomic::AtomicUsize,
}

/// HF tensor name of a layer's parameter.
pub fn layer_tensor(l: usize, leaf: &str) -> String {
    format!("model.layers.{l}.{leaf}")
}

/// How a tensor reaches the backend: `upload_weight`, or the in-flight
/// `upload_weight_async` that streaming overlaps with compute.
#[derive(Clone, Copy)]
enum Upload {
    Now,
    InFlight,
}

/// Where a model's tensors are read from: the safetensors, and the blocks
/// file when the load uses one.
#[derive(Clone, Copy)]
struct Sources<'a> {
    files: &'a SafeModel,
    blocks: Option<&'a BlockFile>,
}

/// A change of a tensor's values at load.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Adjust {
    None,
    /// Gemma 3's norm weights scale by (1 + w): the backend is handed
    /// (1 + w)·f, computed in f32 (as transformers' `1.0 + weight.float()`),
    /// so that its RMSNorm (· w) computes Gemma's. f is 1 except on the
    /// q norm, which carries `query_pre_attn_scalar`'s score scale (below).
    UnitOffset(f32),
}

/// The adjustment of Gemma's norm weights (none on other families).
fn norm_adjust(cfg: &ModelConfig) -> Adjust {
    if cfg.sandwich_norms {
        Adjust::UnitOffset(1.0)
    } else {
        Adjust::None
    }
}

/// The q norm's: Gemma scales scores by s^−½ (s = `query_pre_attn_scalar`)
/// where attention divides by √head_dim; the q norm's output (hence, RoPE
/// being linear, q) is multiplied by √(head_dim / s).
fn q_norm_adjust(cfg: &ModelConfig) -> Adjust {
    match (norm_adjust(cfg), cfg.query_pre_attn_scalar) {
        (Adjust::UnitOffset(_), Some(s)) => {
            Adjust::UnitOffset((cfg.head_dim as f64 / s).sqrt() as f32)
        }
        (a, _) => a,
    }
}

fn load<B: Backend>(
    b: &B,
    src: Sources<'_>,
    name: &str,
    shape: &[usize],
    how: Upload,
) -> Result<B::Weight> {
    load_adjusted(b, src, name, shape, how, Adjust::None)
}

fn load_adjusted<B: Backend>(
    b: &B,
    src: Sources<'_>,
    name: &str,
    shape: &[usize],
    how: Upload,
    adjust: Adjust,
) -> Result<B::Weight> {
    let t = src.files.get(name, shape)?;
    let in_flight = matches!(how, Upload::InFlight);
    if let Adjust::UnitOffset(f) = adjust {
        let values: Vec<f32> = t.to_f32()?.iter().map(|&w| (1.0 + w) * f).collect();
        src.files.release_tensor(name);
        return if in_flight {
            b.upload_weight_async(&values)
        } else {
            b.upload_weight(&values)
        };
    }
    let blocks = match (src.blocks, shape) {
        (Some(f), &[rows, cols]) => f.get(name, rows, cols)?.map(|bm| (f, bm)),
        _ => None,
    };
    let w = match blocks {
        Some((f, bm)) => {
            let values = t.to_f32()?;
            f.check(name, &bm, &values)?;
            b.upload_weight_blocks(&values, &bm, in_flight)
        }
        None => b.upload_weight_source(&t, in_flight),
    };
    src.files.release_tensor(name);
    w
}

fn load_opt<B: Backend>(
    b: &B,
    src: Sources<'_>,
    name: &str,
    shape: &[usize],
    how: Upload,
    adjust: Adjust,
) -> Result<Option<B::Weight>> {
    if src.files.contains(name) {
        load_adjusted(b, src, name, shape, how, adjust).map(Some)
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

/// Refuses files whose layers disagree with `num_hidden_layers` (a layer
/// the config does not count would be silently skipped, and an export
/// would write a config and tensors that disagree), and warns about the
/// tensors the engine does not read.
fn check_tensor_names(files: &SafeModel, cfg: &ModelConfig, dir: &Path) -> Result<()> {
    let mut known: std::collections::HashSet<String> =
        ["model.embed_tokens.weight", "model.norm.weight"]
            .map(String::from)
            .into();
    if !cfg.tie_embeddings {
        known.insert("lm_head.weight".into());
    }
    for l in 0..cfg.layers {
        known.extend(
            layer_tensors(cfg, l)
                .into_iter()
                .filter(|(_, _, need, _)| *need != Need::Absent)
                .map(|(leaf, _, _, _)| layer_tensor(l, leaf)),
        );
        for p in ["gate_proj", "up_proj"] {
            known.insert(layer_tensor(l, &format!("mlp.{p}.bias")));
        }
    }
    let mut unused = Vec::new();
    for name in files.names() {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(l) = layer.filter(|&l| l >= cfg.layers) {
            return Err(Error::format(
                dir.join("config.json"),
                format!(
                    "num_hidden_layers is {} but the weights hold layer {l} ({name})",
                    cfg.layers
                ),
            ));
        }
        if !known.contains(name) {
            unused.push(name);
        }
    }
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).copied().collect();
        eprintln!(
            "warning: {} tensor(s) in {} are not used by the engine: {}{}",
            unused.len(),
            dir.display(),
            shown.join(", "),
            if unused.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Whether a layer tensor must be in the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Required,
    /// Loaded (and used) when present.
    Optional,
    /// Not part of this architecture: never read (a Qwen3 `q_norm` in a
    /// Qwen2 model's files is reported unused, as transformers ignores it).
    Absent,
}

/// The tensors of layer `l`: (leaf name, shape, need, adjustment), in
/// the order of `LayerWeights`' fields.
fn layer_tensors(cfg: &ModelConfig, l: usize) -> [(&'static str, Vec<usize>, Need, Adjust); 17] {
    let (d, m, hd) = (cfg.hidden, cfg.ffn_widths[l], cfg.head_dim);
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    let (req, opt) = (Need::Required, Need::Optional);
    // q/k/v biases are Qwen2's; transformers' LLaMA, Qwen3, Mistral and
    // Gemma 3 (without `attention_bias`, refused) ignore any in the files.
    let bias = if cfg.qkv_bias { req } else { Need::Absent };
    let qk_norm = if cfg.qk_norm { req } else { Need::Absent };
    let (norm, none) = (norm_adjust(cfg), Adjust::None);
    // LLaMA's `post_attention_layernorm` is the FFN's input norm; Gemma's
    // normalises the attention output, its FFN input norm being
    // `pre_feedforward_layernorm`.
    let (ffn_norm, post_attn, post_ffn) = if cfg.sandwich_norms {
        (
            "pre_feedforward_layernorm.weight",
            ("post_attention_layernorm.weight", req),
            req,
        )
    } else {
        (
            "post_attention_layernorm.weight",
            ("pre_feedforward_layernorm.weight", Need::Absent),
            Need::Absent,
        )
    };
    [
        ("input_layernorm.weight", vec![d], req, norm),
        ("self_attn.q_proj.weight", vec![q, d], req, none),
        ("self_attn.q_proj.bias", vec![q], bias, none),
        ("self_attn.k_proj.weight", vec![kv, d], req, none),
        ("self_attn.k_proj.bias", vec![kv], bias, none),
        ("self_attn.v_proj.weight", vec![kv, d], req, none),
        ("self_attn.v_proj.bias", vec![kv], bias, none),
        ("self_attn.o_proj.weight", vec![d, q], req, none),
        (
            "self_attn.q_norm.weight",
            vec![hd],
            qk_norm,
            q_norm_adjust(cfg),
        ),
        ("self_attn.k_norm.weight", vec![hd], qk_norm, norm),
        (ffn_norm, vec![d], req, norm),
        (post_attn.0, vec![d], post_attn.1, norm),
        ("post_feedforward_layernorm.weight", vec![d], post_ffn, norm),
        ("mlp.gate_proj.weight", vec![m, d], req, none),
        ("mlp.up_proj.weight", vec![m, d], req, none),
        ("mlp.down_proj.weight", vec![d, m], req, none),
        ("mlp.down_proj.bias", vec![d], opt, none),
    ]
}

/// Uploads layer `l` (all of `layer_tensors`, optional ones when present).
fn load_layer<B: Backend>(
    b: &B,
    src: Sources<'_>,
    cfg: &ModelConfig,
    l: usize,
    how: Upload,
) -> Result<LayerWeights<B::Weight>> {
    let mut loaded = Vec::with_capacity(17);
    for (leaf, shape, need, adjust) in layer_tensors(cfg, l) {
        let name = layer_tensor(l, leaf);
        loaded.push(match need {
            Need::Required => Some(load_adjusted(b, src, &name, &shape, how, adjust)?),
            Need::Optional => load_opt(b, src, &name, &shape, how, adjust)?,
            Need::Absent => None,
        });
    }
    // The order of `layer_tensors`.
    let Ok(
        [attn_norm, wq, bq, wk, bk, wv, bv, wo, q_norm, k_norm, ffn_norm, post_attn_norm, post_ffn_norm, w_gate, w_up, w_down, b_down],
    ) = <[Option<B::Weight>; 17]>::try_from(loaded)
    else {
        unreachable!("layer_tensors lists 17 tensors")
    };
    let req = |w: Option<B::Weight>| w.expect("required tensors are loaded or err");
    Ok(LayerWeights {
        attn_norm: req(attn_norm),
        wq: req(wq),
        bq,
        wk: req(wk),
        bk,
        wv: req(wv),
        bv,
        wo: req(wo),
        q_norm,
        k_norm,
        ffn_norm: req(ffn_norm),
        post_attn_norm,
        post_ffn_norm,
        w_gate: req(w_gate),
        w_up: req(w_up),
        w_down: req(w_down),
        b_down,
        ffn: cfg.ffn_widths[l],
        index: l,
    })
}

/// Checks that every tensor of layer `l` a streamed run will read is
/// present with its shape, without reading the values.
fn check_layer(files: &SafeModel, cfg: &ModelConfig, l: usize) -> Result<()> {
    for (leaf, shape, need, _) in layer_tensors(cfg, l) {
        let name = layer_tensor(l, leaf);
        if need == Need::Required || (need == Need::Optional && files.contains(&name)) {
            files.get(&name, &shape)?;
        }
    }
    Ok(())
}

impl<B: Backend> Model<B> {
    /// Loads `dir` (config.json + safetensors) onto `backend`, every layer resident.
    pub fn load(backend: &B, dir: &Path) -> Result<Self> {
        Self::load_with(backend, dir, Residency::Resident)
    }

    /// Loads `dir` onto `backend` as `opts` says (a `Residency` alone: no blocks).
    pub fn load_with(backend: &B, dir: &Path, opts: impl Into<LoadOptions>) -> Result<Self> {
        let opts = opts.into();
        let cfg = ModelConfig::load(&dir.join("config.json"))?;
        let files = SafeModel::open_dir(dir)?;
        check_tensor_names(&files, &cfg, dir)?;
        let blocks = if opts.ggml_blocks && backend.uses_ggml_blocks() {
            BlockFile::open(dir)?
        } else {
            None
        };
        let src = Sources {
            files: &files,
            blocks: blocks.as_ref(),
        };
        let (d, v) = (cfg.hidden, cfg.vocab);
        let now = Upload::Now;
        // Shapes only: the values are read at each lookup and by `lm_head`.
        files.get(EMBED, &[v, d])?;
        if !cfg.tie_embeddings {
            files.get(LM_HEAD, &[v, d])?;
        }
        let norm = load_adjusted(
            backend,
            src,
            "model.norm.weight",
            &[d],
            now,
            norm_adjust(&cfg),
        )?;
        check_no_gate_up_bias(&files, &cfg)?;
        let layers = match opts.residency {
            Residency::Resident => LayerStore::Resident(
                (0..cfg.layers)
                    .map(|l| load_layer(backend, src, &cfg, l, now))
                    .collect::<Result<_>>()?,
            ),
            Residency::Streamed => {
                (0..cfg.layers).try_for_each(|l| check_layer(&files, &cfg, l))?;
                LayerStore::Streamed
            }
        };
        Ok(Self {
            cfg,
            dir: dir.to_path_buf(),
            files,
            norm,
            head: std::sync::OnceLock::new(),
            layers,
            blocks,
            layer_uploads: Default::default(),
        })
    }

    /// Whether the backend was given ggml blocks (`LoadOptions::ggml_blocks`
    /// and the directory has a blocks file).
    pub fn has_ggml_blocks(&self) -> bool {
        self.blocks.is_some()
    }

    /// How the decoder layers are kept.
    pub fn residency(&self) -> Residency {
        match self.layers {
            LayerStore::Resident(_) => Residency::Resident,
            LayerStore::Streamed => Residency::Streamed,
        }
    }

    /// Layers uploaded so far by [`Self::for_each_layer`] (0 when resident).
    pub fn layer_uploads(&self) -> usize {
        self.layer_uploads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The output projection `[vocab, d]` (the embedding when tied), loaded
    /// onto `be` (the backend the model was loaded on) at the first call,
    /// with its ggml blocks when the load uses them.
    pub fn lm_head(&self, be: &B) -> Result<&B::Weight> {
        if let Some(w) = self.head.get() {
            return Ok(w);
        }
        let name = if self.cfg.tie_embeddings {
            EMBED
        } else {
            LM_HEAD
        };
        let src = Sources {
            files: &self.files,
            blocks: self.blocks.as_ref(),
        };
        let shape = [self.cfg.vocab, self.cfg.hidden];
        let w = load(be, src, name, &shape, Upload::Now)?;
        Ok(self.head.get_or_init(|| w))
    }

    /// The embeddings of `ids` times `cfg.embed_scale`, `[ids.len(), d]`.
    ///
    /// From the loaded head when it is the tied embedding; otherwise only
    /// the rows of `ids` are read from the mapped file and handed to the
    /// backend as a `[ids.len(), d]` table, which it stores as it would the
    /// whole one (bf16 on the GPU), so both ways give the same values.
    pub fn embed_tokens(&self, be: &B, ids: &[u32]) -> Result<B::Buf> {
        let (d, scale) = (self.cfg.hidden, self.cfg.embed_scale);
        if let (true, Some(table)) = (self.cfg.tie_embeddings, self.head.get()) {
            return be.embedding(ids, table, d, scale);
        }
        let rows = self
            .files
            .get(EMBED, &[self.cfg.vocab, d])?
            .gather_rows(ids)?;
        self.files.release_tensor(EMBED);
        let table = be.upload_weight(&rows)?; // [ids.len(), d]
        let local: Vec<u32> = (0..ids.len() as u32).collect();
        be.embedding(&local, &table, d, scale)
    }

    /// Runs `f(l, weights of l)` for every layer `l` of `order`, in order.
    ///
    /// A resident model lends its weights. A streamed one uploads layer
    /// `order[i]` from the mapped files and, before `f` runs on it, issues
    /// the upload of `order[i+1]` (`Backend::upload_weight_async`), so on a
    /// GPU the copy of the next layer runs during the compute of this one;
    /// each layer is dropped when `f` returns: at most two layers live.
    /// `be` must be the backend the model was loaded on.
    pub fn for_each_layer(
        &self,
        be: &B,
        order: impl IntoIterator<Item = usize>,
        mut f: impl FnMut(usize, &LayerWeights<B::Weight>) -> Result<()>,
    ) -> Result<()> {
        if let LayerStore::Resident(layers) = &self.layers {
            return order.into_iter().try_for_each(|l| f(l, &layers[l]));
        }
        let src = Sources {
            files: &self.files,
            blocks: self.blocks.as_ref(),
        };
        let upload = |l: usize| {
            self.layer_uploads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            load_layer(be, src, &self.cfg, l, Upload::InFlight)
        };
        let mut order = order.into_iter();
        let Some(first) = order.next() else {
            return Ok(());
        };
        let mut next = Some((first, upload(first)?));
        while let Some((l, weights)) = next.take() {
            be.weights_fence()?; // `l`'s copy is complete; nothing later is waited for
            next = order
                .next()
                .map(|n| Ok::<_, Error>((n, upload(n)?)))
                .transpose()?;
            if let Err(e) = f(l, &weights) {
                be.weights_fence()?; // no buffer is freed under an in-flight copy
                return Err(e);
            }
        }
        Ok(())
    }
}
