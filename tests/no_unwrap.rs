//! The library and the binary never `unwrap()` and never `todo!()`: a
//! failure on data read from a file must be an error naming the file, and
//! the `expect("…")`s that remain state an invariant of the engine's own
//! making (each with its reason). Test modules (`#[cfg(test)]` onward) are
//! exempt.
use std::path::{Path, PathBuf};

const FORBIDDEN: [&str; 4] = [
    ".unwrap()",
    "todo!(",
    "unimplemented!(",
    ".unwrap_unchecked(",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `file:line: code` for every forbidden call before the file's first
/// `#[cfg(test)]`, comments skipped.
fn offences(name: &str, src: &str) -> Vec<String> {
    src.lines()
        .enumerate()
        .take_while(|(_, l)| !l.trim_start().starts_with("#[cfg(test)]"))
        .filter_map(|(i, l)| {
            let code = l.split("//").next().unwrap_or("");
            FORBIDDEN
                .iter()
                .any(|f| code.contains(f))
                .then(|| format!("{name}:{}: {}", i + 1, l.trim()))
        })
        .collect()
}

#[test]
fn no_unwrap_outside_tests() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "src/ not found where expected");
    let bad: Vec<String> = files
        .iter()
        .flat_map(|f| {
            offences(
                &f.display().to_string(),
                &std::fs::read_to_string(f).unwrap(),
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "forbidden outside tests:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scan_sees_code_and_skips_comments_and_tests() {
    let src = "let a = f().unwrap();\n// x.unwrap() in a comment\nlet b = g()?; // h.unwrap()\n#[cfg(test)]\nmod t { fn x() { y().unwrap(); } }";
    let found = offences("f.rs", src);
    assert_eq!(found, vec!["f.rs:1: let a = f().unwrap();".to_string()]);
    assert_eq!(offences("g.rs", "todo!(\"later\")").len(), 1);
}

/// The parsers of the engine's binary inputs (GGUF, safetensors with its
/// shard index, statistics files) deny clippy's `indexing_slicing`, so
/// `cargo clippy -D warnings` (part of the test command) refuses any
/// positional index or slice into what they read.
#[test]
fn binary_parsers_deny_indexing() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "src/io/gguf.rs",
        "src/io/safetensors_io.rs",
        "src/prune/stats.rs",
    ] {
        let src = std::fs::read_to_string(root.join(file)).unwrap();
        let head: Vec<&str> = src
            .lines()
            .skip_while(|l| l.starts_with("//!") || l.is_empty())
            .take(1)
            .collect();
        assert_eq!(
            head,
            ["#![deny(clippy::indexing_slicing)]"],
            "{file}: the lint must follow the module docs"
        );
    }
}
