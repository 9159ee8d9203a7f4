//! A minimal GGUF v3 writer for crafted files: the metadata and tensors of
//! an existing GGUF, edited (tests/hostile_gguf.rs, tests/gguf.rs).
use rku_engine::io::gguf::{GgufFile, Value};
use std::path::{Path, PathBuf};

/// A minimal GGUF v3 writer for crafted headers.
#[derive(Default)]
pub struct Gguf {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Gguf {
    pub fn kv_f32(mut self, key: &str, v: f32) -> Self {
        self.kv.push((key.into(), 6, v.to_le_bytes().to_vec()));
        self
    }
    /// The metadata and tensors of an existing GGUF (a crafted file's base).
    pub fn from_file(path: &Path) -> Self {
        let g = GgufFile::open(path).unwrap();
        let kv = g
            .metadata
            .iter()
            .map(|(k, v)| {
                let mut b = Vec::new();
                let ty = encode(v, &mut b);
                (k.clone(), ty, b)
            })
            .collect();
        let tensors = g
            .tensors
            .iter()
            .map(|t| {
                let data = g.tensor_data(t).unwrap().to_vec();
                (t.name.clone(), t.dims.clone(), t.ty.id, data)
            })
            .collect();
        Self { kv, tensors }
    }
    /// Without metadata `key`.
    pub fn without(mut self, key: &str) -> Self {
        self.kv.retain(|(k, _, _)| k != key);
        self
    }
    /// Without tensor `name`.
    pub fn without_tensor(mut self, name: &str) -> Self {
        self.tensors.retain(|t| t.0 != name);
        self
    }
    /// With metadata `key` set to `v` (replaced where present).
    pub fn with(self, key: &str, v: Value) -> Self {
        let mut g = self.without(key);
        let mut b = Vec::new();
        let ty = encode(&v, &mut b);
        g.kv.push((key.into(), ty, b));
        g
    }
    pub fn kv_str(mut self, key: &str, v: &str) -> Self {
        let mut b = (v.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(v.as_bytes());
        self.kv.push((key.into(), 8, b));
        self
    }
    /// An F32 tensor of `dims` (ggml order), zero-filled.
    pub fn tensor(mut self, name: &str, dims: &[u64]) -> Self {
        let n: u64 = dims.iter().product();
        self.tensors
            .push((name.into(), dims.to_vec(), 0, vec![0u8; 4 * n as usize]));
        self
    }
    pub fn bytes(&self) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend_from_slice(&(x.len() as u64).to_le_bytes());
            b.extend_from_slice(x.as_bytes());
        };
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            s(&mut b, k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter()
                .for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(32) * 32, 0);
        }
        b
    }
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

/// Appends the GGUF encoding of `v` to `b`; returns its value type.
pub fn encode(v: &Value, b: &mut Vec<u8>) -> u32 {
    let (ty, bytes): (u32, Vec<u8>) = match v {
        Value::U8(x) => (0, x.to_le_bytes().to_vec()),
        Value::I8(x) => (1, x.to_le_bytes().to_vec()),
        Value::U16(x) => (2, x.to_le_bytes().to_vec()),
        Value::I16(x) => (3, x.to_le_bytes().to_vec()),
        Value::U32(x) => (4, x.to_le_bytes().to_vec()),
        Value::I32(x) => (5, x.to_le_bytes().to_vec()),
        Value::F32(x) => (6, x.to_le_bytes().to_vec()),
        Value::Bool(x) => (7, vec![*x as u8]),
        Value::String(x) => {
            let mut s = (x.len() as u64).to_le_bytes().to_vec();
            s.extend_from_slice(x.as_bytes());
            (8, s)
        }
        Value::Array(items) => {
            let mut body = Vec::new();
            let types: Vec<u32> = items.iter().map(|i| encode(i, &mut body)).collect();
            let elem = types.first().copied().unwrap_or(4);
            let mut s = elem.to_le_bytes().to_vec();
            s.extend_from_slice(&(items.len() as u64).to_le_bytes());
            s.extend_from_slice(&body);
            (9, s)
        }
        Value::U64(x) => (10, x.to_le_bytes().to_vec()),
        Value::I64(x) => (11, x.to_le_bytes().to_vec()),
        Value::F64(x) => (12, x.to_le_bytes().to_vec()),
    };
    b.extend_from_slice(&bytes);
    ty
}
