//! Quantised compute formats, below both `io` (which parses files into
//! them) and `backend` (which computes from them): the ggml element types
//! and their block layouts, their dequantisation to f32, and the block
//! matrices the CPU backend's decoding products read.
pub mod blocks;
pub mod dequant;
pub mod ggml_type;

pub use blocks::{BlockKind, BlockMatrix, BLOCK_LEN};
pub use ggml_type::GgmlType;
