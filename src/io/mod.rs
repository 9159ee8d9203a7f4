//! Everything that touches files: GGUF and safetensors readers, the model
//! importer, tokenizer, text reading, statistics files and export writers.
pub mod atomic;
pub mod dequant;
pub mod export;
pub mod ggml_blocks;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod safetensors_io;
pub mod safetensors_out;
pub mod text;
