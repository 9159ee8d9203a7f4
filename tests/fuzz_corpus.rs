//! Replays the committed fuzz corpus (fuzz/corpus/<target>/*) through the
//! three fuzzed parsers: every input must parse or be refused with an
//! error, never panic. The AFL targets run the same checks
//! (fuzz/src/checks.rs); scripts/fuzz.sh runs them and grows the corpus.
#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no corpus", dir.display());
    let mut failed = Vec::new();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    println!("fuzz corpus {target}: {} inputs replayed", files.len());
    assert!(failed.is_empty(), "{target}: panicked on {failed:?}");
}

#[test]
fn gguf_corpus() {
    replay("gguf", checks::gguf);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", checks::safetensors);
}

#[test]
fn stats_corpus() {
    replay("stats", checks::stats);
}

/// The seeds are what they claim: each parser accepts its fixtures, so
/// the fuzzer starts from inputs that reach past the first check.
#[test]
fn seeds_parse() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let read = |rel: &str| std::fs::read(corpus.join(rel)).unwrap();
    let (_, tensors) = rku_engine::io::gguf::parse_header(&read("gguf/small.gguf")).unwrap();
    assert_eq!(tensors.len(), 2);
    let st = rku_engine::io::safetensors_io::header_entries(
        &read("safetensors/mixed.safetensors"),
        Path::new("mixed"),
    )
    .unwrap();
    assert_eq!(st.len(), 3);
    rku_engine::prune::Stats::from_bytes(&read("stats/tiny-llama3.safetensors"), Path::new("s"))
        .unwrap();
}
