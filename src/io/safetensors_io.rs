//! Memory-mapped safetensors reading: one file or an HF sharded index.
//! Tensors are never copied until a caller asks for an f32 conversion.
//! No indexing or slicing by position (clippy's `indexing_slicing`):
//! every byte range and file index goes through `get`, so a crafted file
//! is an error, never a panic.
#![deny(clippy::indexing_slicing)]
use crate::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Element types the runtime reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            _ => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }
}

struct Entry {
    file: usize,
    dtype: FloatType,
    shape: Vec<usize>,
    /// Absolute byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// A borrowed view of one tensor inside a mapped file.
pub struct TensorRef<'a> {
    pub name: &'a str,
    /// The file the tensor lies in (named in errors about its values).
    pub file: &'a Path,
    pub dtype: FloatType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl TensorRef<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Converts to f32, refusing NaN or infinite values with an error naming
    /// the tensor. Parallel: streaming converts a whole layer per pass.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        // One arm per dtype, so each conversion loop is specialised.
        let out: Vec<f32> = match self.dtype {
            FloatType::F32 => self.bytes.par_chunks_exact(4).map(decode_f32).collect(),
            FloatType::F16 => self.bytes.par_chunks_exact(2).map(decode_f16).collect(),
            FloatType::BF16 => self.bytes.par_chunks_exact(2).map(decode_bf16).collect(),
        };
        self.check_finite(&out, 0)?;
        Ok(out)
    }

    /// Rows `ids` of a 2-D tensor `[rows, cols]` as f32, `[ids.len(), cols]`,
    /// reading only those rows' bytes (an embedding lookup without loading
    /// the table). An id outside `0..rows` and a non-finite value are errors
    /// naming the tensor, like `to_f32`.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let &[rows, cols] = self.shape else {
            return Err(Error::tensor(
                self.name,
                format!("has shape {:?}, not [rows, cols]", self.shape),
            ));
        };
        let row_bytes = cols * self.dtype.size();
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            let r = id as usize;
            let bytes = (r < rows)
                .then(|| self.bytes.get(r * row_bytes..(r + 1) * row_bytes))
                .flatten()
                .ok_or_else(|| {
                    Error::tensor(
                        self.name,
                        format!("token id {id} is outside its {rows} rows"),
                    )
                })?;
            out.extend(
                bytes
                    .chunks_exact(self.dtype.size())
                    .map(|c| decode(self.dtype, c)),
            );
        }
        // One parallel check over every gathered row: a check per row was a
        // fork-join of the thread pool per token, 2,048 of them for a
        // 2,048-token pass (most of an H200 forward pass's host time).
        if let Some(i) = out.par_iter().position_first(|x| !x.is_finite()) {
            let (k, j) = (i / cols, i % cols);
            let row = ids.get(k).copied().unwrap_or_default() as usize;
            return Err(self.non_finite(out.get(i).copied().unwrap_or(f32::NAN), row * cols + j));
        }
        Ok(out)
    }

    /// Writes the values into `dst` as little-endian bf16 (2 bytes each,
    /// rounded from f32 to nearest even as `bf16::from_f32`, so a bf16
    /// tensor is copied as it is), in parallel chunks, without an f32 copy
    /// of the tensor: how a streamed layer goes from the mapped file into a
    /// GPU upload's page-locked staging buffer. NaN or infinite values are
    /// refused like `to_f32` (naming the first).
    pub fn write_bf16(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() != 2 * self.numel() {
            return Err(Error::tensor(
                self.name,
                format!("{} staging bytes for {} values", dst.len(), self.numel()),
            ));
        }
        let first_bad = match self.dtype {
            FloatType::F32 => convert_bf16::<4>(self.bytes, dst, decode_f32),
            FloatType::F16 => convert_bf16::<2>(self.bytes, dst, decode_f16),
            FloatType::BF16 => copy_bf16(self.bytes, dst),
        };
        match first_bad {
            None => Ok(()),
            Some((i, v)) => Err(self.non_finite(v, i)),
        }
    }

    /// The error of a non-finite `value` at flat index `index` of the tensor.
    fn non_finite(&self, value: f32, index: usize) -> Error {
        Error::tensor(
            self.name,
            format!(
                "non-finite value {value} at flat index {index} in {}",
                self.file.display()
            ),
        )
    }

    /// Errs on the first non-finite value of `values`, which start at flat
    /// index `offset` of the tensor.
    fn check_finite(&self, values: &[f32], offset: usize) -> Result<()> {
        match values.par_iter().position_first(|x| !x.is_finite()) {
            None => Ok(()),
            Some(i) => Err(self.non_finite(values.get(i).copied().unwrap_or(f32::NAN), offset + i)),
        }
    }
}

/// Values per parallel task of `convert_bf16`.
const CONVERT_CHUNK: usize = 1 << 16;

/// `dst` (little-endian bf16) = `src` (values of `S` bytes, read by
/// `decode`), in parallel chunks; the first non-finite value (flat index
/// and value), if any. Every value is written either way.
fn convert_bf16<const S: usize>(
    src: &[u8],
    dst: &mut [u8],
    decode: fn(&[u8]) -> f32,
) -> Option<(usize, f32)> {
    dst.par_chunks_mut(2 * CONVERT_CHUNK)
        .zip(src.par_chunks(S * CONVERT_CHUNK))
        .enumerate()
        .filter_map(|(c, (out, values))| {
            let mut first = None;
            for (i, (o, v)) in out
                .chunks_exact_mut(2)
                .zip(values.chunks_exact(S))
                .enumerate()
            {
                let x = decode(v);
                if !x.is_finite() && first.is_none() {
                    first = Some((c * CONVERT_CHUNK + i, x));
                }
                o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
            first
        })
        .min_by_key(|&(i, _)| i)
}

/// `convert_bf16` of bf16 values: a parallel copy, then a scan of the
/// exponent bits (all set: infinite or NaN), several times faster than
/// rounding each value through f32.
fn copy_bf16(src: &[u8], dst: &mut [u8]) -> Option<(usize, f32)> {
    dst.par_chunks_mut(2 * CONVERT_CHUNK)
        .zip(src.par_chunks(2 * CONVERT_CHUNK))
        .enumerate()
        .filter_map(|(c, (out, values))| {
            out.copy_from_slice(values);
            let bad = values
                .chunks_exact(2)
                .position(|v| u16::from_le_bytes(word(v)) & 0x7F80 == 0x7F80)?;
            let v = values
                .get(2 * bad..2 * bad + 2)
                .map_or(f32::NAN, decode_bf16);
            Some((c * CONVERT_CHUNK + bad, v))
        })
        .min_by_key(|&(i, _)| i)
}

/// One stored value (`dtype.size()` little-endian bytes) as f32.
fn decode(dtype: FloatType, c: &[u8]) -> f32 {
    match dtype {
        FloatType::F32 => decode_f32(c),
        FloatType::F16 => decode_f16(c),
        FloatType::BF16 => decode_bf16(c),
    }
}

fn decode_f32(c: &[u8]) -> f32 {
    f32::from_le_bytes(word(c))
}

fn decode_f16(c: &[u8]) -> f32 {
    f16::from_le_bytes(word(c)).to_f32()
}

fn decode_bf16(c: &[u8]) -> f32 {
    bf16::from_le_bytes(word(c)).to_f32()
}

/// The `N` bytes of a chunk of `chunks_exact(N)` as an array.
fn word<const N: usize>(chunk: &[u8]) -> [u8; N] {
    <[u8; N]>::try_from(chunk).unwrap_or([0; N])
}

/// Why the safetensors crate refused the file `buf`, naming the tensor
/// where the crate's own error does not (`TensorInvalidInfo`,
/// `ValidationOverflow`, `MisalignedSlice`): the first tensor whose shape
/// and dtype do not fill its `data_offsets` exactly.
pub fn header_error(buf: &[u8], e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    if matches!(
        e,
        E::TensorInvalidInfo | E::ValidationOverflow | E::MisalignedSlice
    ) {
        if let Some(why) = misfit_tensor(buf) {
            return why;
        }
    }
    format!("{e:?}")
}

fn misfit_tensor(buf: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..end)?).ok()?;
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v).ok()?;
        let (start, stop) = info.data_offsets;
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|k| k.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else {
            return Some(format!(
                "tensor {name}: shape {:?} of {:?} overflows",
                info.shape, info.dtype
            ));
        };
        if bits % 8 != 0 || stop.checked_sub(start) != Some(bits / 8) {
            return Some(format!(
                "tensor {name}: shape {:?} of {:?} needs {} bits, but data_offsets [{start}, {stop}] hold {} bytes",
                info.shape,
                info.dtype,
                bits,
                stop.saturating_sub(start)
            ));
        }
    }
    None
}

/// One tensor a safetensors file declares.
pub struct HeaderEntry {
    pub name: String,
    pub dtype: FloatType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// The tensors the safetensors file `buf` declares, each range inside
/// `buf` and filled exactly by its shape and dtype (the safetensors
/// crate's validation), each dtype one the runtime reads. `path` names the
/// file in errors.
pub fn header_entries(buf: &[u8], path: &Path) -> Result<Vec<HeaderEntry>> {
    let (n, meta) = SafeTensors::read_metadata(buf).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file: {}", header_error(buf, &e)),
        )
    })?;
    let base = 8 + n;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => FloatType::F32,
            Dtype::F16 => FloatType::F16,
            Dtype::BF16 => FloatType::BF16,
            other => {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "{}: dtype {other:?} is not supported (bf16, f16, f32)",
                        path.display()
                    ),
                ))
            }
        };
        let (start, end) = (base + info.data_offsets.0, base + info.data_offsets.1);
        if start > end || end > buf.len() {
            return Err(Error::format(
                path,
                format!("tensor {name}: data [{start}, {end}) lies outside the file"),
            ));
        }
        out.push(HeaderEntry {
            name,
            dtype,
            shape: info.shape.clone(),
            start,
            end,
        });
    }
    Ok(out)
}

/// A file index the engine itself recorded that is out of range: a bug,
/// reported as an error rather than a panic.
fn internal(i: usize) -> Error {
    Error::Invalid(format!("internal: no mapped file {i}"))
}

/// All tensors of a model directory, memory-mapped.
pub struct SafeModel {
    files: Vec<(PathBuf, Mmap)>,
    /// Each file's (length, modification time) when it was mapped.
    stamps: Vec<(u64, Option<std::time::SystemTime>)>,
    entries: HashMap<String, Entry>,
}

/// A file's length and modification time now.
fn stamp(path: &Path) -> Result<(u64, Option<std::time::SystemTime>)> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok((m.len(), m.modified().ok()))
}

impl SafeModel {
    /// Opens `dir/model.safetensors`, or the shards listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            Self::open_files(&[single])
        } else if index.exists() {
            let text = crate::io::read_regular(&index, "a shard index")?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no `weight_map` object"))?;
            if map.is_empty() {
                return Err(Error::format(&index, "the `weight_map` names no tensor"));
            }
            // Shard names are plain file names inside `dir` (a hub cache's
            // symlinked files are fine; `..`, absolute paths and
            // subdirectories are not).
            let mut shard_of = BTreeMap::new();
            for (tensor, file) in map {
                let name = file.as_str().filter(|f| {
                    let mut parts = Path::new(f).components();
                    matches!(
                        (parts.next(), parts.next()),
                        (Some(std::path::Component::Normal(_)), None)
                    )
                });
                let Some(name) = name else {
                    return Err(Error::format(
                        &index,
                        format!(
                            "tensor {tensor}: shard {file} is not a plain file name in {}",
                            dir.display()
                        ),
                    ));
                };
                shard_of.insert(tensor.as_str(), name);
            }
            let shards: Vec<&str> = shard_of
                .values()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let paths: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
            let model = Self::open_files(&paths)?;
            // Every tensor lies in the shard the index names, and every
            // tensor of a shard is listed.
            for (tensor, file) in &shard_of {
                let Some(e) = model.entries.get(*tensor) else {
                    return Err(Error::format(
                        &index,
                        format!("tensor {tensor} is listed in {file} but not found there"),
                    ));
                };
                let lies_in = shards.get(e.file).copied().unwrap_or("another file");
                if lies_in != *file {
                    return Err(Error::format(
                        &index,
                        format!("tensor {tensor} is listed in {file} but lies in {lies_in}"),
                    ));
                }
            }
            if let Some(extra) = model
                .entries
                .keys()
                .find(|t| !shard_of.contains_key(t.as_str()))
            {
                return Err(Error::format(
                    &index,
                    format!(
                        "tensor {extra} of {} is not in the weight_map",
                        (model.entries.get(extra))
                            .and_then(|e| shards.get(e.file))
                            .unwrap_or(&"a shard")
                    ),
                ));
            }
            Ok(model)
        } else {
            Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ))
        }
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files: Vec<(PathBuf, Mmap)> = Vec::new();
        let mut stamps = Vec::new();
        let mut entries = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = crate::io::open_regular(path, "a safetensors file")?;
            stamps.push(stamp(path)?);
            // SAFETY: the file is opened read-only; the engine never writes to
            // a model it reads (outputs go to a fresh directory).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            for h in header_entries(&mmap, path)? {
                let name = h.name;
                if let Some(first) = entries.get(&name) {
                    let first: &Entry = first;
                    let (earlier, _) = files.get(first.file).ok_or_else(|| internal(first.file))?;
                    return Err(Error::tensor(
                        &name,
                        format!("found in both {} and {}", earlier.display(), path.display()),
                    ));
                }
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: h.dtype,
                        shape: h.shape,
                        start: h.start,
                        end: h.end,
                    },
                );
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self {
            files,
            stamps,
            entries,
        })
    }

    /// Drops the mapped pages from this process's resident set (they stay
    /// in the page cache and fault back in on the next read). Called once
    /// the weights have been converted onto a backend, so the host does not
    /// count the model twice.
    pub fn release_pages(&self) {
        for (_, mmap) in &self.files {
            // SAFETY: the mapping is a read-only, file-backed private map;
            // MADV_DONTNEED only discards pages that the file can reproduce.
            // Failure is harmless (the pages simply stay resident).
            let _ = unsafe { mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
        }
    }

    /// Like `release_pages`, for the pages of one tensor only.
    pub fn release_tensor(&self, name: &str) {
        if let Some((e, (_, mmap))) = self
            .entries
            .get(name)
            .and_then(|e| Some((e, self.files.get(e.file)?)))
        {
            // SAFETY: as in `release_pages`.
            let _ = unsafe {
                mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    e.start,
                    e.end.saturating_sub(e.start),
                )
            };
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Errs when file `i` no longer has the length and modification time
    /// it had when mapped: reading a truncated mapping would kill the
    /// process (SIGBUS), and a rewritten one would give other weights.
    fn check_unchanged(&self, i: usize) -> Result<()> {
        let (Some((path, _)), Some(then)) = (self.files.get(i), self.stamps.get(i)) else {
            return Err(internal(i));
        };
        if stamp(path)? != *then {
            return Err(Error::format(
                path,
                "the file changed (length or modification time) while this run was reading it",
            ));
        }
        Ok(())
    }

    /// A view of `name`, checked against the expected `shape`. Every call
    /// first checks that the tensor's file has not changed since it was
    /// mapped (a streamed run reads each layer this way as it reaches it).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let (key, e) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| Error::tensor(name, format!("missing from {}", self.files_display())))?;
        self.check_unchanged(e.file)?;
        let (path, mmap) = self.files.get(e.file).ok_or_else(|| internal(e.file))?;
        if e.shape != shape {
            return Err(Error::tensor(
                name,
                format!(
                    "shape {:?} in {}, expected {shape:?}",
                    e.shape,
                    path.display()
                ),
            ));
        }
        let bytes = mmap.get(e.start..e.end).ok_or_else(|| {
            Error::tensor(
                name,
                format!(
                    "bytes [{}, {}) lie outside {}",
                    e.start,
                    e.end,
                    path.display()
                ),
            )
        })?;
        Ok(TensorRef {
            name: key,
            file: path,
            dtype: e.dtype,
            shape: &e.shape,
            bytes,
        })
    }

    /// A view of `name` whatever its shape.
    pub fn get_any(&self, name: &str) -> Result<TensorRef<'_>> {
        let shape = self
            .entries
            .get(name)
            .map(|e| e.shape.clone())
            .ok_or_else(|| Error::tensor(name, format!("missing from {}", self.files_display())))?;
        self.get(name, &shape)
    }

    /// The dtype most tensors are stored in (the model's "input dtype").
    pub fn main_dtype(&self) -> FloatType {
        let mut count: BTreeMap<usize, (FloatType, usize)> = BTreeMap::new();
        for e in self.entries.values() {
            let k = e.dtype as usize;
            count.entry(k).or_insert((e.dtype, 0)).1 += e.end - e.start;
        }
        count
            .values()
            .max_by_key(|(_, n)| *n)
            .map(|(t, _)| *t)
            .unwrap_or(FloatType::F32)
    }

    fn files_display(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `values` stored as `dtype`, little-endian.
    fn stored(values: &[f32], dtype: FloatType) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| match dtype {
                FloatType::F32 => v.to_le_bytes().to_vec(),
                FloatType::F16 => f16::from_f32(v).to_le_bytes().to_vec(),
                FloatType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    /// `write_bf16` gives `bf16::from_f32` of `to_f32`, for every dtype and
    /// over several parallel chunks; the first NaN is named by its index.
    #[test]
    fn write_bf16_equals_rounding_the_f32_values() {
        let n = 2 * CONVERT_CHUNK + 37;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.618).sin() * 3.0 + (i % 7) as f32 * 1e-3)
            .collect();
        let file = Path::new("test.safetensors");
        for dtype in [FloatType::F32, FloatType::F16, FloatType::BF16] {
            let bytes = stored(&values, dtype);
            let shape = [n];
            let t = TensorRef {
                name: "w",
                file,
                dtype,
                shape: &shape,
                bytes: &bytes,
            };
            let mut got = vec![0u8; 2 * n];
            t.write_bf16(&mut got).unwrap();
            let want: Vec<u8> = t
                .to_f32()
                .unwrap()
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect();
            assert!(
                got == want,
                "{dtype:?}: write_bf16 differs from to_f32 rounded"
            );
            assert!(
                t.write_bf16(got.get_mut(1..).unwrap()).is_err(),
                "short buffer accepted"
            );

            let mut bad = values.clone();
            let at = CONVERT_CHUNK + 5;
            bad.iter_mut()
                .skip(at)
                .step_by(CONVERT_CHUNK)
                .for_each(|v| *v = f32::NAN);
            let bytes = stored(&bad, dtype);
            let t = TensorRef { bytes: &bytes, ..t };
            let e = t.write_bf16(&mut got).unwrap_err().to_string();
            assert!(
                e.contains(&format!("flat index {at} ")) && e.contains("non-finite"),
                "{e}"
            );
        }
    }
}
