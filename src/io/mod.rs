//! Bytes in and out, and nothing about methods or backends: the GGUF
//! reader and importer, the tokenizer rebuild, safetensors reading (mmap)
//! and writing, the ggml blocks file, text reading, and every output's writing (`output`).
pub mod ggml_blocks;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod output;
pub mod safetensors_io;
pub mod safetensors_out;
pub mod text;
pub mod traces;
