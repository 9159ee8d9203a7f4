//! Writes a model's tensors as safetensors: one `model.safetensors`, or, when
//! the total is above the shard limit, HF-style shards
//! `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`
//! (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// HF's default shard size.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4_000_000_000;

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    F16,
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

impl std::str::FromStr for OutDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutDtype::F32),
            "f16" | "float16" => Ok(OutDtype::F16),
            "bf16" | "bfloat16" => Ok(OutDtype::BF16),
            _ => Err(Error::Invalid(format!(
                "dtype {s:?}: expected f32, f16 or bf16"
            ))),
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

impl View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `tensors` into `dir` (which must exist), sharded when their total
/// size exceeds `max_shard_bytes`. Shards are filled in the given order; a
/// tensor larger than the limit gets a shard of its own.
pub fn write_model(dir: &Path, tensors: &[OutTensor], max_shard_bytes: u64) -> Result<()> {
    for t in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if t.data.len() != want {
            return Err(Error::tensor(
                &t.name,
                format!(
                    "shape {:?} needs {want} bytes, got {}",
                    t.shape,
                    t.data.len()
                ),
            ));
        }
    }
    let total: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let mut shards: Vec<&[OutTensor]> = Vec::new();
    let (mut start, mut size) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let n = t.data.len() as u64;
        if i > start && size + n > max_shard_bytes {
            shards.push(&tensors[start..i]);
            (start, size) = (i, 0);
        }
        size += n;
    }
    shards.push(&tensors[start..]);

    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        return write_file(&dir.join("model.safetensors"), tensors, meta);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_file(&dir.join(&file), shard, meta.clone())?;
        for t in *shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("JSON of strings and numbers");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

fn write_file(
    path: &Path,
    tensors: &[OutTensor],
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    safetensors::tensor::serialize_to_file(tensors.iter().map(|t| (t.name.as_str(), t)), meta, path)
        .map_err(|e| Error::format(path, format!("writing safetensors: {e}")))
}
