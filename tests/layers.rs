//! The import order of the crate's rooms (docs/DESIGN.md §3): a module may
//! use only modules of a lower layer, never one of its own layer (siblings)
//! or of a higher one. Every `crate::<room>` path in src/ (and every
//! `rku_engine::<room>` path in the binary's cli/) is checked.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Rooms by layer, lowest first. `error` and `progress` are used everywhere.
const LAYERS: &[&[&str]] = &[
    &["error", "progress"],
    &["quant"],
    &["io", "backend"],
    &["model"],
    &["prune", "eval", "plan"],
    &["recover", "progressive"],
    &["report"],
    &["cli"],
];

/// Imports allowed against the order, each with its reason. None today.
const EXCEPTIONS: &[(&str, &str, &str)] = &[];

fn layer_of(room: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&room))
}

/// The room a source file belongs to: its first folder under src/, or its
/// file stem for a top-level file (`main.rs` is the cli's).
fn room_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    match first.strip_suffix(".rs") {
        Some("main") => "cli".into(),
        Some(stem) => stem.into(),
        None => first.into_owned(),
    }
}

/// Rooms named by `crate::<room>` or `rku_engine::<room>` paths in `src`
/// (comments skipped), with the line of each.
fn imports(src: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for prefix in ["crate::", "rku_engine::"] {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let before = rest[..at].chars().last();
                rest = &rest[at + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // e.g. `my_crate::`
                }
                let room: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !room.is_empty() {
                    out.push((i + 1, room));
                }
            }
        }
    }
    out
}

/// Every violation in the file `rel` (relative to src/) with text `src`.
fn violations(rel: &Path, src: &str) -> Vec<String> {
    let from = room_of(rel);
    let Some(from_layer) = layer_of(&from) else {
        return vec![format!(
            "{}: room `{from}` is not in the layer table of tests/layers.rs",
            rel.display()
        )];
    };
    let mut out = Vec::new();
    for (line, to) in imports(src) {
        // Re-exports at the crate root (`crate::Error`, `crate::Result`).
        let to = match to.as_str() {
            "Error" | "Result" => "error".to_string(),
            _ => to,
        };
        if to == from || EXCEPTIONS.iter().any(|e| e.0 == from && e.1 == to) {
            continue;
        }
        match layer_of(&to) {
            Some(l) if l < from_layer => {}
            Some(l) => out.push(format!(
                "src/{}:{line}: `{from}` (layer {from_layer}) uses `{to}` (layer {l}){}",
                rel.display(),
                if l == from_layer {
                    ", a sibling"
                } else {
                    ", a higher layer"
                }
            )),
            None => out.push(format!(
                "src/{}:{line}: `{to}` is not a room in the layer table",
                rel.display()
            )),
        }
    }
    out
}

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

#[test]
fn every_import_goes_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    let mut rooms = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if rel == Path::new("lib.rs") {
            continue; // declares the rooms
        }
        rooms.insert(room_of(rel));
        bad.extend(violations(rel, &std::fs::read_to_string(f).unwrap()));
    }
    assert!(
        rooms.len() >= 10,
        "found only {rooms:?}: is src/ where the test looks?"
    );
    assert!(
        bad.is_empty(),
        "imports against the layer order:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_catches_upward_and_sibling_imports() {
    let io = Path::new("io/export.rs");
    let up = "use crate::prune::compact::gather_rows;\nuse crate::model::config::Arch;";
    let found = violations(io, up);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("src/io/export.rs:1") && found[0].contains("higher"));
    let sibling =
        "    let q = crate::backend::cpu::CpuBackend::new(); // crate::model in a comment";
    let found = violations(io, sibling);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("sibling"));
    let fine = "use crate::quant::BlockKind;\nuse crate::{Error, Result};\nuse crate::io::text;";
    assert!(violations(io, fine).is_empty());
    let cli = "use rku_engine::report::run_report;\nuse crate::cli::args::Cli;";
    assert!(violations(Path::new("main.rs"), cli).is_empty());
    assert_eq!(violations(Path::new("nowhere.rs"), "").len(), 1);
}
