//! Writes a model's tensors as safetensors: one `model.safetensors`, or, when
//! the total is above the shard limit, HF-style shards
//! `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`
//! (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).
//!
//! A file is `u64 header length | JSON header (safetensors' own `Metadata`,
//! space-padded to 8 bytes) | tensor bytes`. `write_model_with` streams the
//! tensor bytes from a callback, so a caller never holds more than one
//! tensor in memory; `write_model` is the in-memory convenience.
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo, TensorView};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// HF's default shard size.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_000_000_000;

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutDtype {
    #[value(name = "f32")]
    F32,
    #[value(name = "f16")]
    F16,
    #[value(name = "bf16")]
    BF16,
}

impl OutDtype {
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::BF16 => 2,
        }
    }
    /// The name `config.json` uses (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::F16 => "float16",
            OutDtype::BF16 => "bfloat16",
        }
    }
    fn safetensors(self) -> Dtype {
        match self {
            OutDtype::F32 => Dtype::F32,
            OutDtype::F16 => Dtype::F16,
            OutDtype::BF16 => Dtype::BF16,
        }
    }
    /// Whether the finite `v` rounds to infinity in this dtype.
    pub fn overflows(self, v: f32) -> bool {
        match self {
            OutDtype::F32 => false,
            OutDtype::F16 => f16::from_f32(v).is_infinite(),
            OutDtype::BF16 => bf16::from_f32(v).is_infinite(),
        }
    }

    /// Little-endian bytes of `values` in this dtype (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        fn par<const N: usize>(values: &[f32], f: impl Fn(f32) -> [u8; N] + Sync) -> Vec<u8> {
            let mut out = vec![0u8; values.len() * N];
            out.par_chunks_mut(N << 16)
                .zip(values.par_chunks(1 << 16))
                .for_each(|(dst, src)| {
                    for (d, &v) in dst.chunks_exact_mut(N).zip(src) {
                        d.copy_from_slice(&f(v));
                    }
                });
            out
        }
        match self {
            OutDtype::F32 => par(values, f32::to_le_bytes),
            OutDtype::F16 => par(values, |v| f16::from_f32(v).to_le_bytes()),
            OutDtype::BF16 => par(values, |v| bf16::from_f32(v).to_le_bytes()),
        }
    }
}

/// One tensor to write: HF name, dtype, numpy shape, little-endian bytes.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    pub dtype: OutDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OutTensor {
    /// A tensor from f32 values, converted to `dtype`.
    pub fn from_f32(
        name: impl Into<String>,
        dtype: OutDtype,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            data: dtype.encode(values),
        }
    }
}

/// Name, dtype and shape of a tensor whose bytes are streamed.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: OutDtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn n_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Writes `tensors` into `dir` (which must exist), sharded when their total
/// size exceeds `max_shard_bytes`.
pub fn write_model(dir: &Path, tensors: &[OutTensor], max_shard_bytes: u64) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    for (t, s) in tensors.iter().zip(&specs) {
        if t.data.len() != s.n_bytes() {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "shape {:?} needs {} bytes, got {}",
                    t.shape,
                    s.n_bytes(),
                    t.data.len()
                ),
            ));
        }
    }
    write_model_with(dir, &specs, max_shard_bytes, |i| {
        Ok(Cow::Borrowed(&tensors[i].data))
    })
}

/// Writes the tensors described by `specs` into `dir` (which must exist);
/// `bytes(i)` produces (or lends) the little-endian data of `specs[i]`
/// when it is written, exactly once per tensor. Shards are filled in `specs` order; a
/// tensor larger than the limit gets a shard of its own. Within a file,
/// tensors are laid out as the safetensors crate does (wider dtypes first,
/// then by name) so every tensor is aligned to its element size.
pub fn write_model_with<'a>(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    mut bytes: impl FnMut(usize) -> Result<Cow<'a, [u8]>>,
) -> Result<()> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let n = s.n_bytes() as u64;
        let current = shards.last_mut().expect("never empty");
        if !current.is_empty() && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("never empty").push(i);
        size += n;
    }
    if shards.len() == 1 {
        return write_file(
            &dir.join("model.safetensors"),
            specs,
            &shards[0],
            &mut bytes,
        );
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        write_file(&dir.join(&file), specs, shard, &mut bytes)?;
        for &i in shard {
            weight_map.insert(specs[i].name.clone(), file.clone().into());
        }
    }
    let total: u64 = specs.iter().map(|s| s.n_bytes() as u64).sum();
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("JSON of strings and numbers");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// One safetensors file holding `specs[i]` for `i` in `members`.
fn write_file<'a>(
    path: &Path,
    specs: &[TensorSpec],
    members: &[usize],
    bytes: &mut impl FnMut(usize) -> Result<Cow<'a, [u8]>>,
) -> Result<()> {
    let mut order = members.to_vec();
    order.sort_by(|&a, &b| {
        let (a, b) = (&specs[a], &specs[b]);
        b.dtype
            .size()
            .cmp(&a.dtype.size())
            .then(a.name.cmp(&b.name))
    });
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for &i in &order {
        let s = &specs[i];
        let info = TensorInfo {
            dtype: s.dtype.safetensors(),
            shape: s.shape.clone(),
            data_offsets: (offset, offset + s.n_bytes()),
        };
        offset += s.n_bytes();
        infos.push((s.name.clone(), info));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut header = Metadata::new(Some(meta), infos)
        .and_then(|m| Ok(serde_json::to_vec(&m)?))
        .map_err(|e| Error::format(path, format!("safetensors header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for &i in &order {
        let data = bytes(i)?;
        if data.len() != specs[i].n_bytes() {
            return Err(Error::tensor(
                &specs[i].name,
                format!(
                    "shape {:?} needs {} bytes, got {}",
                    specs[i].shape,
                    specs[i].n_bytes(),
                    data.len()
                ),
            ));
        }
        w.write_all(&data).map_err(io)?;
    }
    w.flush().map_err(io)
}

/// The safetensors bytes of `views` with `metadata` as `__metadata__`, its
/// keys sorted. (The safetensors crate serialises metadata from a HashMap,
/// whose order changes from run to run: equal inputs would give files that
/// differ in their bytes.)
pub fn serialize_sorted<'a>(
    views: Vec<(String, TensorView<'a>)>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bad = |e: String| Error::Invalid(format!("safetensors serialisation: {e}"));
    let plain = safetensors::serialize(views, None).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(plain[..8].try_into().expect("8 bytes")) as usize;
    let tensors: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&plain[8..8 + n]).map_err(|e| bad(e.to_string()))?;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    header.extend(tensors);
    let mut json = serde_json::to_vec(&header).map_err(|e| bad(e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + plain.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&plain[8 + n..]);
    Ok(out)
}
