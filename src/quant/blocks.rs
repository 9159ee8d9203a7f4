//! The quantised block matrices a backend computes from: ggml's Q4_1 and
//! Q8_0 blocks, kept as they are in the GGUF (see `io::ggml_blocks` for the
//! file that holds them beside a model). A backend rebuilds each weight in
//! registers with the importer's arithmetic (`quant::dequant`), so the
//! values it multiplies by are exactly the f32 weights of `model.safetensors`.
use crate::quant::dequant::dequantize;
use crate::quant::GgmlType;
use crate::Result;

/// Values per block (both kinds).
pub const BLOCK_LEN: usize = 32;

/// The block layouts a backend may compute from (dequant.rs has the layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// f16 d, f16 m, 16 bytes of nibbles: value q·d + m.
    Q4_1,
    /// f16 d, 32 i8: value q·d.
    Q8_0,
}

impl BlockKind {
    /// The kind of a ggml type, if it is one of these.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        match ty.name {
            "Q4_1" => Some(Self::Q4_1),
            "Q8_0" => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [Self::Q4_1, Self::Q8_0]
            .into_iter()
            .find(|k| k.name() == name)
    }

    pub(crate) fn ggml(self) -> GgmlType {
        let id = match self {
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        };
        GgmlType::from_id(id).expect("Q4_1 and Q8_0 are ggml types")
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        self.ggml().block_bytes
    }
}

/// A `[rows, cols]` matrix as ggml blocks: row r is the `cols / 32` blocks
/// at `data[r · row_bytes ..]`.
#[derive(Clone, Copy, Debug)]
pub struct BlockMatrix<'a> {
    pub kind: BlockKind,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl BlockMatrix<'_> {
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / BLOCK_LEN * self.kind.block_bytes()
    }

    /// The f32 values (`name` for errors), by the importer's dequantisation.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        dequantize(name, self.kind.ggml(), self.data, self.rows * self.cols)
    }
}
