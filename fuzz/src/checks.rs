//! What each fuzz target does with one input, shared by the AFL targets
//! (fuzz/fuzz_targets/) and the corpus replay test (tests/fuzz_corpus.rs):
//! parse the bytes; an error is fine, a panic is a bug, and what a parser
//! accepts must keep its promises (every tensor's bytes inside the input).
use rku_engine::io::safetensors_io::{header_entries, TensorRef};
use std::path::Path;

/// The GGUF header parser: accepted tensors lie inside the input.
pub fn gguf(data: &[u8]) {
    if let Ok((_, tensors)) = rku_engine::io::gguf::parse_header(data) {
        for t in &tensors {
            let end = t.offset.checked_add(t.n_bytes).expect("offset + size fits");
            assert!(end <= data.len(), "tensor {} past the end", t.name);
            let _ = t.shape();
        }
    }
}

/// The safetensors header reader of model weights; accepted tensors are
/// converted to f32 and to bf16 staging bytes (refusing non-finite
/// values, never panicking).
pub fn safetensors(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    if let Ok(entries) = header_entries(data, path) {
        for e in &entries {
            let bytes = data.get(e.start..e.end).expect("range inside the input");
            let t = TensorRef {
                name: &e.name,
                file: path,
                dtype: e.dtype,
                shape: &e.shape,
                bytes,
            };
            assert_eq!(t.numel() * e.dtype.size(), bytes.len(), "{}", e.name);
            let _ = t.to_f32();
            let mut staging = vec![0u8; 2 * t.numel()];
            let _ = t.write_bf16(&mut staging);
        }
    }
}

/// The statistics file reader.
pub fn stats(data: &[u8]) {
    let _ = rku_engine::prune::Stats::from_bytes(data, Path::new("fuzz.stats"));
}
