//! GGUF v2/v3 reader over a memory map.
//!
//! Layout (all little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
//! n_kv × (key: string, type: u32, value)
//! n_tensors × (name: string, n_dims u32, dims u64 × n_dims, type u32, offset u64)
//! padding to `general.alignment` (default 32)
//! tensor data: tensor i starts at data_start + offset_i
//! ```
//!
//! A string is a u64 byte length then UTF-8 bytes; an array is an element
//! type u32, a count u64, then the elements. `dims[0]` is the fastest-varying
//! (contiguous) dimension, so a GGUF shape is the reverse of the numpy/HF one.
//! Every length and offset is checked against the file size before use: a
//! malformed file is an `Error::Format`, never a panic. No indexing or
//! slicing on the file's bytes: every access is a `get` with a named error
//! (the lint below enforces it).
#![deny(clippy::indexing_slicing)]
use crate::quant::GgmlType;
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// A metadata value (GGUF value types 0–12).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a signed integer, if it is an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// The value as a float; an f32 is widened through its shortest decimal
    /// form, so 1e-5 stored as f32 reads back as 1e-5, not 9.99999974e-6.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => format!("{v}").parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's header entry, validated: its data lies inside the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is contiguous. The HF/numpy shape is the reverse.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte length of the data.
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// The numpy/HF shape (reversed GGUF dims).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed header and a map of the whole file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset where tensor data begins.
    pub data_start: usize,
}

impl GgufFile {
    /// Maps and parses `path`, validating every length and offset.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::io::open_regular(path, "a GGUF file")?;
        // SAFETY: the map is read-only; a file changed underneath by another
        // process is outside what this program can guard against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, metadata, tensors, alignment, data_start) =
            parse(&mmap).map_err(|msg| Error::format(path, msg))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (bounds were checked at open; a
    /// `TensorInfo` of another file is refused).
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8]> {
        t.offset
            .checked_add(t.n_bytes)
            .and_then(|end| self.mmap.get(t.offset..end))
            .ok_or_else(|| {
                Error::format(
                    &self.path,
                    format!("tensor {}: data lies outside this file", t.name),
                )
            })
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>, u64, usize);

/// The metadata and tensor infos of the GGUF file `buf`, validated as
/// [`GgufFile::open`] does (every tensor's data lies inside `buf`); the
/// message of an error is what `open` reports after the file's name. For
/// the fuzz targets (fuzz/) and callers holding the bytes already.
pub fn parse_header(
    buf: &[u8],
) -> std::result::Result<(BTreeMap<String, Value>, Vec<TensorInfo>), String> {
    parse(buf).map(|(_, metadata, tensors, _, _)| (metadata, tensors))
}

fn parse(buf: &[u8]) -> std::result::Result<Parsed, String> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c
        .take(4)
        .map_err(|_| "file too short for a GGUF header".to_string())?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:02x?}, not a GGUF file"));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2, 3)"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // Each KV takes at least 8 (key len) + 4 (type) + 1 bytes, each tensor
    // info at least 8 + 4 + 4 + 8: refuse counts the file cannot hold.
    c.check_count(n_kv, 13, "metadata entries")?;
    c.check_count(n_tensors, 24, "tensor infos")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let value = c
            .value(ty, 0)
            .map_err(|e| format!("metadata key {key:?}: {e}"))?;
        if let Some(f) = value.as_f64().filter(|f| !f.is_finite()) {
            return Err(format!("metadata key {key:?} is {f}, not a finite number"));
        }
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key {key:?} appears twice"));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment {v:?} is not a power of two")),
        },
    };

    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        rel: u64,
    }
    let mut raw = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if dims.contains(&0) {
            return Err(format!("tensor {name}: a zero dimension in {dims:?}"));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor {name} appears twice"));
        }
        let ty_id = c.u32()?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| format!("tensor {name}: unknown ggml type id {ty_id}"))?;
        let rel = c.u64()?;
        raw.push(Raw {
            name,
            dims,
            ty,
            rel,
        });
    }

    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
    if data_start > buf.len() as u64 {
        return Err(format!(
            "truncated: tensor data would start at byte {data_start}, file has {}",
            buf.len()
        ));
    }
    let mut tensors = Vec::with_capacity(raw.len());
    for r in raw {
        let n_elements = r
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor {}: dimensions {:?} overflow", r.name, r.dims))?;
        let first = r.dims.first().copied().unwrap_or(0);
        if first % r.ty.block_len as u64 != 0 {
            return Err(format!(
                "tensor {}: first dimension {first} is not a multiple of the {} block length {}",
                r.name, r.ty, r.ty.block_len
            ));
        }
        if r.rel % alignment != 0 {
            return Err(format!(
                "tensor {}: data offset {} is not aligned to {alignment}",
                r.name, r.rel
            ));
        }
        let n_bytes = (n_elements / r.ty.block_len as u64)
            .checked_mul(r.ty.block_bytes as u64)
            .ok_or_else(|| format!("tensor {}: byte size overflows", r.name))?;
        let end = data_start
            .checked_add(r.rel)
            .and_then(|o| o.checked_add(n_bytes));
        match end {
            Some(end) if end <= buf.len() as u64 => {}
            _ => {
                return Err(format!(
                    "tensor {}: data [{} + {}, {} bytes) lies past the end of the file ({} bytes); truncated?",
                    r.name,
                    data_start,
                    r.rel,
                    n_bytes,
                    buf.len()
                ))
            }
        }
        tensors.push(TensorInfo {
            name: r.name,
            dims: r.dims,
            ty: r.ty,
            offset: (data_start + r.rel) as usize,
            n_bytes: n_bytes as usize,
        });
    }
    Ok((version, metadata, tensors, alignment, data_start as usize))
}

/// A bounds-checked little-endian reader over the header bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Deepest array nesting accepted (arrays of arrays of ...).
const MAX_NESTING: u32 = 8;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n));
        let Some(s) = end.and_then(|end| self.buf.get(self.pos..end)) else {
            return Err(format!(
                "truncated header: need {n} bytes at offset {}, only {} left in the file",
                self.pos,
                self.buf.len().saturating_sub(self.pos)
            ));
        };
        self.pos += s.len();
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        Ok(self
            .take(N as u64)?
            .try_into()
            .expect("take returned N bytes"))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// Fails if `count` items of at least `min_size` bytes cannot fit in the
    /// rest of the file (guards allocations sized by a corrupt count).
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &str,
    ) -> std::result::Result<(), String> {
        let left = self.buf.len().saturating_sub(self.pos) as u64;
        if count.saturating_mul(min_size) > left {
            return Err(format!(
                "truncated or corrupt header: it claims {count} {what} at offset {}, more than the {left} bytes left in the file can hold",
                self.pos
            ));
        }
        Ok(())
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let len = self.u64()?;
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("string at offset {at} is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: u32) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array()?)),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err("arrays nested too deep".into());
                }
                let elem_ty = self.u32()?;
                let count = self.u64()?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("unknown array element type {t}")),
                };
                self.check_count(count, min_size, "array elements")?;
                let items = (0..count)
                    .map(|_| self.value(elem_ty, depth + 1))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => return Err(format!("unknown value type {t}")),
        })
    }
}
