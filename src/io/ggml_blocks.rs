//! The quantised blocks a GGUF import keeps beside the f32 weights.
//!
//! A GGUF's Q4_1 and Q8_0 matrices dequantise to f32 values that the
//! imported `model.safetensors` holds exactly. `import` also writes the
//! blocks themselves to `ggml_blocks.safetensors` (`BLOCKS_FILE`): one U8
//! tensor `[rows, cols/32 · block bytes]` per matrix, under the HF tensor
//! name, rows in HF order, the ggml type in the header's metadata. A
//! backend may then read such a matrix as its blocks, 0.625 (Q4_1) or
//! 1.0625 (Q8_0) bytes per value instead of 4, and dequantise in registers
//! with the importer's arithmetic, so the weights it multiplies by are the
//! same f32 values. The CPU backend does so in decoding steps, whose speed
//! is the speed of reading the weights. The loader checks every block
//! matrix against its f32 tensor, bit for bit, before using it.
//!
//! transformers and other tools read `model.safetensors` only; they never
//! see this file.
use crate::io::safetensors_out::serialize_sorted;
use crate::quant::{BlockKind, BlockMatrix, BLOCK_LEN};
use crate::{Error, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The file name in a model directory.
pub const BLOCKS_FILE: &str = "ggml_blocks.safetensors";
const FORMAT: &str = "rku-ggml-blocks";

/// One tensor to write: HF name, kind, `[rows, cols]` and its block bytes.
pub struct BlockTensor<'a> {
    pub name: String,
    pub kind: BlockKind,
    pub rows: usize,
    pub cols: usize,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Writes `BLOCKS_FILE` into `dir`, streaming from `tensors` (the caller
/// writes `dir` as a whole atomically: `output::OutputDir`); refuses a
/// file already there.
pub fn write(dir: &Path, tensors: &[BlockTensor<'_>]) -> Result<()> {
    let path = dir.join(BLOCKS_FILE);
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let row_bytes = t.cols / BLOCK_LEN * t.kind.block_bytes();
        meta.insert(t.name.clone(), format!("{} {}", t.kind.name(), t.cols));
        let view = TensorView::new(Dtype::U8, vec![t.rows, row_bytes], &t.data)
            .map_err(|e| Error::tensor(&t.name, format!("block bytes: {e}")))?;
        views.push((t.name.clone(), view));
    }
    let bytes = serialize_sorted(views, &meta)?;
    crate::io::output::write_new(&path, &bytes)
}

/// An opened `BLOCKS_FILE`: the mapped file and where each matrix lies.
pub struct BlockFile {
    path: PathBuf,
    mmap: Mmap,
    entries: HashMap<String, (BlockKind, usize, usize, Range<usize>)>,
}

impl BlockFile {
    /// Opens `dir/BLOCKS_FILE`; `None` when the directory has none.
    /// Every error names the file: not safetensors, not a blocks file, a
    /// tensor of another dtype, an unknown kind or a shape that does not
    /// hold whole rows of blocks.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(BLOCKS_FILE);
        let file = match crate::io::open_regular(&path, "a ggml blocks file") {
            Ok(f) => f,
            Err(Error::Io { err, .. }) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        // SAFETY: read-only private map of a file this process does not
        // write; a concurrent truncation by another process is the usual
        // mmap caveat, as for the model's own safetensors.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::format(&path, msg);
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let empty = HashMap::new();
        let meta = header.metadata().as_ref().unwrap_or(&empty);
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a {FORMAT} file (metadata format)")));
        }
        let base = mmap.as_ptr() as usize;
        let mut entries = HashMap::new();
        for (name, view) in st.tensors() {
            let described = meta.get(&name).and_then(|s| {
                let (kind, cols) = s.split_once(' ')?;
                Some((BlockKind::from_name(kind)?, cols.parse::<usize>().ok()?))
            });
            let Some((kind, cols)) = described else {
                return Err(bad(format!(
                    "tensor {name}: no \"KIND COLS\" metadata entry"
                )));
            };
            let shape = view.shape();
            let whole_rows = shape.len() == 2
                && cols.is_multiple_of(BLOCK_LEN)
                && (cols / BLOCK_LEN).checked_mul(kind.block_bytes()) == Some(shape[1]);
            if view.dtype() != Dtype::U8 || !whole_rows {
                return Err(bad(format!(
                    "tensor {name}: {:?} {shape:?} is not rows of {cols} {} values",
                    view.dtype(),
                    kind.name()
                )));
            }
            let start = view.data().as_ptr() as usize - base;
            entries.insert(
                name,
                (kind, shape[0], cols, start..start + view.data().len()),
            );
        }
        Ok(Some(Self {
            path,
            mmap,
            entries,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The matrices it has blocks for: name, kind and `[rows, cols]`, sorted by name.
    pub fn matrices(&self) -> Vec<(&str, BlockKind, [usize; 2])> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .map(|(n, e)| (n.as_str(), e.0, [e.1, e.2]))
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }

    /// The blocks of tensor `name`, if the file has them, for a `[rows, cols]`
    /// tensor; other dimensions are an error naming the file.
    pub fn get(&self, name: &str, rows: usize, cols: usize) -> Result<Option<BlockMatrix<'_>>> {
        let Some((kind, r, c, range)) = self.entries.get(name) else {
            return Ok(None);
        };
        if (*r, *c) != (rows, cols) {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor {name}: blocks of a [{r}, {c}] matrix, the model's is [{rows}, {cols}]"
                ),
            ));
        }
        Ok(Some(BlockMatrix {
            kind: *kind,
            rows,
            cols,
            data: &self.mmap[range.clone()],
        }))
    }

    /// Checks that `blocks` (tensor `name`) dequantise to `values` bit for
    /// bit, a few rows at a time (never a second copy of a whole tensor).
    pub fn check(&self, name: &str, blocks: &BlockMatrix<'_>, values: &[f32]) -> Result<()> {
        let (rows, cols) = (blocks.rows, blocks.cols);
        if values.len() != rows * cols {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor {name}: {} values for [{rows}, {cols}] blocks",
                    values.len()
                ),
            ));
        }
        let per = (CHECK_VALUES / cols.max(1)).max(1); // rows per piece
        let pieces = blocks.data.par_chunks(per * blocks.row_bytes());
        pieces
            .zip(values.par_chunks(per * cols))
            .enumerate()
            .try_for_each(|(p, (data, want))| {
                let piece = BlockMatrix {
                    rows: want.len() / cols.max(1),
                    data,
                    ..*blocks
                };
                let got = piece.dequantize(name)?;
                match got
                    .iter()
                    .zip(want)
                    .position(|(a, b)| a.to_bits() != b.to_bits())
                {
                    None => Ok(()),
                    Some(j) => Err(Error::format(
                        &self.path,
                        format!(
                            "tensor {name}: element {} dequantises to {} but model.safetensors \
                             holds {}; these blocks are not this model's (delete the file, or \
                             import again)",
                            p * per * cols + j,
                            got[j],
                            want[j]
                        ),
                    )),
                }
            })
    }
}

/// Values per piece of `BlockFile::check`.
const CHECK_VALUES: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_1 block with scale `d`, min `m` and nibbles 0, 1, ..., 15 twice.
    fn q4_1_block(d: f32, m: f32) -> Vec<u8> {
        let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
        b.extend(half::f16::from_f32(m).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (j << 4)));
        b
    }

    #[test]
    fn written_blocks_read_back_and_check_against_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = [q4_1_block(0.5, -1.0), q4_1_block(0.25, 2.0)].concat();
        let t = BlockTensor {
            name: "w".into(),
            kind: BlockKind::Q4_1,
            rows: 2,
            cols: 32,
            data: data.as_slice().into(),
        };
        write(dir.path(), &[t]).unwrap();
        let f = BlockFile::open(dir.path()).unwrap().unwrap();
        let b = f.get("w", 2, 32).unwrap().unwrap();
        assert_eq!(b.data, data.as_slice());
        let values = b.dequantize("w").unwrap();
        assert_eq!(values[1], 0.5 - 1.0);
        assert_eq!(values[32 + 17], 0.25 + 2.0);
        f.check("w", &b, &values).unwrap();
        let mut other = values.clone();
        other[40] += 1.0;
        let e = f.check("w", &b, &other).unwrap_err().to_string();
        assert!(e.contains(BLOCKS_FILE) && e.contains("element 40"), "{e}");
        assert!(f.get("absent", 2, 32).unwrap().is_none());
        let e = f.get("w", 1, 64).err().unwrap().to_string();
        assert!(e.contains("[2, 32]"), "{e}");
    }

    #[test]
    fn a_directory_without_the_file_has_no_blocks_and_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(BlockFile::open(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(BLOCKS_FILE), b"not safetensors").unwrap();
        let e = BlockFile::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains(BLOCKS_FILE) && e.contains("not a safetensors"),
            "{e}"
        );
    }
}
