//! The generated hostile suite (issue #13): a few hundred damaged inputs
//! made from the tiny fixtures, one class per test. Each case runs the
//! binary once and checks that it
//!
//! - exits with an error: a non-zero status, not 101 (a panic) and not a
//!   signal (an abort), and "panicked" nowhere in its stderr;
//! - names what it refuses: the damaged file, or the flag;
//! - changes nothing outside `--out`: the whole scratch tree (inputs,
//!   victims of links, earlier outputs) is hashed before and after, and the
//!   refused `--out` does not exist afterwards unless it did before.
//!
//! Every test prints how many cases it ran (`-- --nocapture` shows them)
//! and asserts a floor, so that a generator that quietly stops producing
//! cases fails.
#![cfg(unix)]
mod common;

use common::{bin, calib_text, fixture, run_ok};
use rku_engine::io::gguf::GgufFile;
use serde_json::{json, Value};
use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---- the harness -------------------------------------------------------------

/// A scratch tree whose every file is hashed around each case.
struct Scratch {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    class: &'static str,
    cases: usize,
    failures: Vec<String>,
}

/// Everything under `root` (links not followed; file contents hashed).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                let to = std::fs::read_link(&p).unwrap();
                out.insert(rel, format!("link {}", to.display()));
            } else if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                let mut h = DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(rel, format!("file {:x}", h.finish()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

impl Scratch {
    fn new(class: &'static str) -> Scratch {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        Scratch {
            _tmp: tmp,
            root,
            class,
            cases: 0,
            failures: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// A copy of the fixture directory `src` at `rel`.
    fn copy_dir(&self, src: &Path, rel: &str) -> PathBuf {
        let d = self.path(rel);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
            }
        }
        d
    }

    /// Runs one case: `cmd` must be refused as the module doc says, its
    /// stderr naming every one of `names`; `out` (if any) is the only path
    /// the run could have written. A failure is recorded, and reported with
    /// every other one by [`Scratch::done`].
    fn refused(&mut self, what: &str, cmd: &mut Command, out: Option<&Path>, names: &[&str]) {
        self.cases += 1;
        if let Err(why) = self.check(cmd, out, names) {
            self.failures.push(format!("{}: {what}: {why}", self.class));
        }
    }

    fn check(&self, cmd: &mut Command, out: Option<&Path>, names: &[&str]) -> Result<(), String> {
        let out_before = out.map(|o| std::fs::symlink_metadata(o).is_ok());
        let before = snapshot(&self.root);
        let o = cmd.output().unwrap();
        let after = snapshot(&self.root);
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            return Err(format!("accepted (exit 0)\n{err}"));
        }
        // No exit code: killed by a signal (an abort); 101: a panic.
        if o.status.code().is_none_or(|c| c == 101) || err.contains("panicked") {
            return Err(format!("crashed ({:?})\n{err}", o.status));
        }
        for n in names {
            if !err.contains(n) {
                return Err(format!("{n:?} not named in\n{err}"));
            }
        }
        if before != after {
            let changed: Vec<_> = before
                .iter()
                .filter(|(k, v)| after.get(*k) != Some(v))
                .map(|(k, _)| format!("changed {}", k.display()))
                .chain(
                    after
                        .keys()
                        .filter(|k| !before.contains_key(*k))
                        .map(|k| format!("added {}", k.display())),
                )
                .collect();
            return Err(format!("refused, yet {changed:?}\n{err}"));
        }
        if let (Some(o), Some(false)) = (out, out_before) {
            if std::fs::symlink_metadata(o).is_ok() {
                return Err(format!("{} exists", o.display()));
            }
        }
        Ok(())
    }

    /// Prints the number of cases run; fails with every failed case, or
    /// when fewer than `floor` ran.
    fn done(self, floor: usize) {
        println!("hostile {}: {} cases", self.class, self.cases);
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed:\n\n{}",
            self.failures.len(),
            self.cases,
            self.failures.join("\n\n")
        );
        assert!(
            self.cases >= floor,
            "{}: only {} cases (at least {floor} expected)",
            self.class,
            self.cases
        );
    }
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// `n` offsets spread over `[lo, hi)`, first and last included.
fn spread(lo: usize, hi: usize, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).map(|i| lo + (hi - 1 - lo) * i / (n - 1)).collect();
    v.dedup();
    v
}

// ---- safetensors headers ------------------------------------------------------

/// The JSON header and the data of a safetensors file.
fn st_split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A safetensors file of `header` (padded to 8 bytes) and `data`.
fn st_join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

fn st_edit(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut h, data) = st_split(bytes);
    edit(&mut h);
    st_join(&h, &data)
}

// ---- GGUF header fields ---------------------------------------------------------

/// Byte offsets of the fields of a GGUF header.
#[derive(Default)]
struct GgufFields {
    n_tensors: usize,
    n_kv: usize,
    /// (offset of the key length, offset of the value type) per entry.
    kv: Vec<(usize, usize)>,
    /// (n_dims, first dim, type, data offset) offsets per tensor info.
    tensors: Vec<(usize, usize, usize, usize)>,
}

fn gguf_fields(b: &[u8]) -> GgufFields {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    fn skip_value(b: &[u8], p: usize, ty: u32) -> usize {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => p + 1,
            2 | 3 => p + 2,
            4..=6 => p + 4,
            10..=12 => p + 8,
            8 => p + 8 + u64_at(p),
            9 => {
                let (et, n) = (u32_at(p), u64_at(p + 4));
                (0..n).fold(p + 12, |q, _| skip_value(b, q, et))
            }
            t => panic!("type {t}"),
        }
    }
    let mut f = GgufFields {
        n_tensors: 8,
        n_kv: 16,
        ..Default::default()
    };
    let (nt, nkv) = (u64_at(8), u64_at(16));
    let mut p = 24;
    for _ in 0..nkv {
        let key_at = p;
        p += 8 + u64_at(p);
        f.kv.push((key_at, p));
        let ty = u32_at(p);
        p = skip_value(b, p + 4, ty);
    }
    for _ in 0..nt {
        p += 8 + u64_at(p);
        let nd = u32_at(p) as usize;
        let rec = (p, p + 4, p + 4 + 8 * nd, p + 8 + 8 * nd);
        f.tensors.push(rec);
        p = rec.3 + 8;
    }
    f
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn gguf_files() {
    let mut s = Scratch::new("gguf");
    for fx in ["gguf/tiny_llama.gguf", "gguf/tiny_qwen2.gguf"] {
        let good = std::fs::read(fixture(fx)).unwrap();
        let g = GgufFile::open(&fixture(fx)).unwrap();
        let data_end = g
            .tensors
            .iter()
            .map(|t| t.offset + t.n_bytes)
            .max()
            .unwrap();
        let f = gguf_fields(&good);
        let tag = fx.trim_start_matches("gguf/").trim_end_matches(".gguf");
        let run = |s: &mut Scratch, what: String, bytes: Vec<u8>| {
            let file = s.write(&format!("{tag}.gguf"), &bytes);
            let out = s.path("out");
            let mut cmd = bin();
            cmd.arg("import").arg(&file).arg("--out").arg(&out);
            s.refused(
                &format!("{tag} {what}"),
                &mut cmd,
                Some(&out),
                &[&shown(&file)],
            );
        };
        // Truncated anywhere before the end of the last tensor's data.
        for at in spread(0, g.data_start, 16)
            .into_iter()
            .chain(spread(g.data_start, data_end, 8))
        {
            run(&mut s, format!("truncated at {at}"), good[..at].to_vec());
        }
        // Header fields set to hostile values.
        let mut edits: Vec<(String, usize, Vec<u8>)> = vec![
            ("bad magic".into(), 0, b"GGUX".to_vec()),
            ("version 1".into(), 4, 1u32.to_le_bytes().to_vec()),
            ("version 4".into(), 4, 4u32.to_le_bytes().to_vec()),
            ("version max".into(), 4, u32::MAX.to_le_bytes().to_vec()),
        ];
        for (field, at) in [("n_tensors", f.n_tensors), ("n_kv", f.n_kv)] {
            for v in [u64::MAX, 1 << 40, 1 << 20] {
                edits.push((format!("{field} {v}"), at, v.to_le_bytes().to_vec()));
            }
        }
        let n_kv = f.kv.len();
        for k in [0, n_kv / 2, n_kv - 1] {
            let (key_at, ty_at) = f.kv[k];
            edits.push((
                format!("kv {k} key length max"),
                key_at,
                u64::MAX.to_le_bytes().to_vec(),
            ));
            edits.push((
                format!("kv {k} type 13"),
                ty_at,
                13u32.to_le_bytes().to_vec(),
            ));
        }
        let n_t = f.tensors.len();
        for t in [0, n_t / 2, n_t - 1] {
            let (nd, d0, ty, off) = f.tensors[t];
            let name = &g.tensors[t].name;
            for (what, at, v) in [
                ("0 dims", nd, 0u32.to_le_bytes().to_vec()),
                ("9 dims", nd, 9u32.to_le_bytes().to_vec()),
                ("zero dim", d0, 0u64.to_le_bytes().to_vec()),
                ("dim 2^62", d0, (1u64 << 62).to_le_bytes().to_vec()),
                ("type 99", ty, 99u32.to_le_bytes().to_vec()),
                ("offset max", off, u64::MAX.to_le_bytes().to_vec()),
                (
                    "offset misaligned",
                    off,
                    (g.tensors[t].offset - g.data_start + 1)
                        .to_le_bytes()
                        .to_vec(),
                ),
            ] {
                edits.push((format!("tensor {name} {what}"), at, v));
            }
        }
        for (what, at, v) in edits {
            let mut b = good.clone();
            put(&mut b, at, &v);
            run(&mut s, what, b);
        }
        // A directory where the file should be.
        let dir = s.path(&format!("{tag}-dir.gguf"));
        std::fs::create_dir(&dir).unwrap();
        let out = s.path("out");
        s.refused(
            "a directory",
            bin().arg("import").arg(&dir).arg("--out").arg(&out),
            Some(&out),
            &[&shown(&dir), "directory"],
        );
        std::fs::remove_dir(&dir).unwrap();
    }
    s.done(100);
}

// ---- model directories, shard indexes and weights ---------------------------------

/// `score` on the model directory `model` (a fresh output each time).
fn score(s: &Scratch, model: &Path, calib: &Path) -> (Command, PathBuf) {
    let out = s.path("out.safetensors");
    let mut c = bin();
    c.args(["score", "--backend", "cpu", "--model"])
        .arg(model)
        .arg("--calib")
        .arg(calib)
        .args(["--samples", "2", "--seq-len", "16", "--out"])
        .arg(&out);
    (c, out)
}

/// tiny-llama3's tensors split over two shards with an index, in `dir`.
fn shard(dir: &Path) {
    use rku_engine::io::safetensors_io::SafeModel;
    use safetensors::tensor::{Dtype, TensorView};
    let src = fixture("tiny-llama3");
    let model = SafeModel::open_dir(&src).unwrap();
    let mut shards: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    let mut map = serde_json::Map::new();
    for name in model.names() {
        let t = model.get_any(name).unwrap();
        assert_eq!(t.dtype.size(), 4, "the fixture is f32");
        let k = usize::from(name.contains("layers.1.") || name.contains("layers.2."));
        let view = TensorView::new(Dtype::F32, t.shape.to_vec(), t.bytes).unwrap();
        shards[k].push((name.to_string(), view));
        map.insert(
            name.into(),
            json!(format!("model-0000{}-of-00002.safetensors", k + 1)),
        );
    }
    for (k, views) in shards.into_iter().enumerate() {
        let path = dir.join(format!("model-0000{}-of-00002.safetensors", k + 1));
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
}

#[test]
fn model_directories() {
    let mut s = Scratch::new("model-dir");
    let calib = calib_text(&s.root, 200);
    // Shard indexes.
    let m = s.copy_dir(&fixture("tiny-llama3"), "sharded");
    shard(&m);
    let (mut ok, out) = score(&s, &m, &calib);
    run_ok(&mut ok);
    std::fs::remove_file(&out).unwrap();
    let index_path = m.join("model.safetensors.index.json");
    let index_good = std::fs::read(&index_path).unwrap();
    let index: Value = serde_json::from_slice(&index_good).unwrap();
    let shard1 = "model-00001-of-00002.safetensors";
    let shard2 = "model-00002-of-00002.safetensors";
    let set = |k: &str, v: Value| {
        let mut i = index.clone();
        i["weight_map"][k] = v;
        i
    };
    let mut edits: Vec<(String, Value, String)> = Vec::new();
    for bad in [
        json!("../model-00001-of-00002.safetensors"),
        json!("/etc/passwd"),
        json!("sub/model-00001-of-00002.safetensors"),
        json!(""),
        json!("."),
        json!(5),
        json!(null),
        json!(["model-00001-of-00002.safetensors"]),
    ] {
        edits.push((
            format!("shard name {bad}"),
            set("model.norm.weight", bad),
            "model.norm.weight".into(),
        ));
    }
    edits.push((
        "tensor listed in the other shard".into(),
        set("model.layers.0.mlp.up_proj.weight", json!(shard2)),
        "model.layers.0.mlp.up_proj.weight".into(),
    ));
    edits.push((
        "a shard that does not exist".into(),
        set(
            "model.norm.weight",
            json!("model-00003-of-00002.safetensors"),
        ),
        "sharded/model-00003-of-00002.safetensors".into(),
    ));
    edits.push((
        "a tensor no shard holds".into(),
        set("model.layers.9.mlp.up_proj.weight", json!(shard1)),
        "model.layers.9.mlp.up_proj.weight".into(),
    ));
    let mut removed = index.clone();
    removed["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    edits.push((
        "a tensor missing from the map".into(),
        removed,
        "model.norm.weight".into(),
    ));
    for (what, v) in [
        ("no weight_map", json!({"metadata": {}})),
        ("weight_map a list", json!({"weight_map": []})),
        ("weight_map empty", json!({"weight_map": {}})),
        ("an array", json!([])),
    ] {
        edits.push((what.into(), v, "weight_map".into()));
    }
    for (what, v, needle) in edits {
        std::fs::write(&index_path, v.to_string()).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        // The index, or the missing shard it names.
        let file = match needle.starts_with("sharded/") {
            true => needle.clone(),
            false => shown(&index_path),
        };
        s.refused(&what, &mut c, Some(&out), &[&file, &needle]);
    }
    for at in spread(0, index_good.len(), 8) {
        std::fs::write(&index_path, &index_good[..at]).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        s.refused(
            &format!("index truncated at {at}"),
            &mut c,
            Some(&out),
            &[&shown(&index_path)],
        );
    }
    std::fs::write(&index_path, &index_good).unwrap();
    // A shard file missing, or a directory.
    let shard2_path = m.join(shard2);
    let shard2_good = std::fs::read(&shard2_path).unwrap();
    std::fs::remove_file(&shard2_path).unwrap();
    let (mut c, out) = score(&s, &m, &calib);
    s.refused(
        "a missing shard",
        &mut c,
        Some(&out),
        &[&shown(&shard2_path)],
    );
    std::fs::create_dir(&shard2_path).unwrap();
    let (mut c, out) = score(&s, &m, &calib);
    s.refused(
        "a shard that is a directory",
        &mut c,
        Some(&out),
        &[&shown(&shard2_path), "directory"],
    );
    std::fs::remove_dir(&shard2_path).unwrap();
    std::fs::write(&shard2_path, &shard2_good).unwrap();

    // One weights file, damaged.
    let m = s.copy_dir(&fixture("tiny-llama3"), "single");
    let weights = m.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    let (header, data) = st_split(&good);
    let header_len = good.len() - data.len();
    let mut damaged: Vec<(String, Vec<u8>, String)> = Vec::new();
    for at in spread(0, good.len(), 14) {
        damaged.push((
            format!("truncated at {at}"),
            good[..at].to_vec(),
            String::new(),
        ));
    }
    for v in [u64::MAX, 1 << 40, 0, (header_len - 7) as u64] {
        let mut b = good.clone();
        put(&mut b, 0, &v.to_le_bytes());
        damaged.push((format!("header length {v}"), b, String::new()));
    }
    let mut b = good.clone();
    b[8] = b'[';
    damaged.push(("header not an object".into(), b, String::new()));
    let norm = "model.norm.weight";
    let edit = |f: &dyn Fn(&mut Value)| st_edit(&good, |h| f(h));
    for (what, b) in [
        ("dtype I64", edit(&|h| h[norm]["dtype"] = json!("I64"))),
        ("dtype F64", edit(&|h| h[norm]["dtype"] = json!("F64"))),
        ("dtype unknown", edit(&|h| h[norm]["dtype"] = json!("F9"))),
        ("shape too wide", edit(&|h| h[norm]["shape"] = json!([49]))),
        (
            "shape too narrow",
            edit(&|h| h[norm]["shape"] = json!([47])),
        ),
        (
            "shape overflowing",
            edit(&|h| h[norm]["shape"] = json!([1u64 << 62, 1u64 << 62])),
        ),
        (
            "offsets past the end",
            edit(&|h| h[norm]["data_offsets"] = json!([0, 1u64 << 40])),
        ),
        (
            "offsets reversed",
            edit(&|h| h[norm]["data_offsets"] = json!([8, 0])),
        ),
        (
            "tensor removed",
            edit(&|h| {
                h.as_object_mut().unwrap().remove(norm);
            }),
        ),
    ] {
        damaged.push((what.into(), b, String::new()));
    }
    // Names the tensor whose shape and dtype disagree with its offsets (the
    // safetensors crate's TensorInvalidInfo names none).
    for (what, b) in [
        (
            "I64 names the tensor",
            edit(&|h| h[norm]["dtype"] = json!("I64")),
        ),
        (
            "shape names the tensor",
            edit(&|h| h[norm]["shape"] = json!([47])),
        ),
    ] {
        damaged.push((what.into(), b, norm.into()));
    }
    // Values: NaN and infinity in a weight are refused by tensor and file.
    let at = header_len + header[norm]["data_offsets"][0].as_u64().unwrap() as usize;
    for (what, v) in [("NaN", f32::NAN), ("inf", f32::INFINITY)] {
        let mut b = good.clone();
        put(&mut b, at + 4, &v.to_le_bytes());
        damaged.push((format!("{what} in {norm}"), b, norm.into()));
    }
    for (what, b, needle) in damaged {
        std::fs::write(&weights, &b).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        let mut names = vec![shown(&weights)];
        if !needle.is_empty() {
            names.push(needle);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        s.refused(&what, &mut c, Some(&out), &names);
    }
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    let (mut c, out) = score(&s, &m, &calib);
    s.refused(
        "weights a directory",
        &mut c,
        Some(&out),
        &[&shown(&weights), "directory"],
    );
    std::fs::remove_dir(&weights).unwrap();
    std::fs::write(&weights, &good).unwrap();

    // Tokenizers.
    let tok = m.join("tokenizer.json");
    let tok_good = std::fs::read(&tok).unwrap();
    let mut empty: Value = serde_json::from_slice(&tok_good).unwrap();
    empty["model"]["vocab"] = json!({});
    empty["model"]["merges"] = json!([]);
    let mut dropout: Value = serde_json::from_slice(&tok_good).unwrap();
    dropout["model"]["dropout"] = json!(0.5);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty vocabulary",
            empty.to_string().into_bytes(),
            "empty vocabulary",
        ),
        (
            "BPE dropout (random tokenization)",
            dropout.to_string().into_bytes(),
            "dropout",
        ),
        (
            "truncated tokenizer",
            tok_good[..tok_good.len() / 2].to_vec(),
            "",
        ),
        ("tokenizer not JSON", b"\x00\x01garbage".to_vec(), ""),
    ];
    for (what, b, needle) in cases {
        std::fs::write(&tok, b).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        s.refused(what, &mut c, Some(&out), &[&shown(&tok), needle]);
    }
    std::fs::write(&tok, &tok_good).unwrap();

    // What is not a model directory at all.
    let empty_dir = s.path("empty-model");
    std::fs::create_dir(&empty_dir).unwrap();
    for (what, p) in [
        ("an empty directory", empty_dir.clone()),
        ("a file", calib.clone()),
        ("nothing", s.path("no-such-model")),
    ] {
        let (mut c, out) = score(&s, &p, &calib);
        s.refused(what, &mut c, Some(&out), &[&shown(&p)]);
    }
    s.done(60);
}

// ---- configs ----------------------------------------------------------------

#[test]
fn configs() {
    let mut s = Scratch::new("config");
    let calib = calib_text(&s.root, 200);
    let m = s.copy_dir(&fixture("tiny-llama3"), "model");
    let cfg_path = m.join("config.json");
    let good_text = std::fs::read(&cfg_path).unwrap();
    let good: Value = serde_json::from_slice(&good_text).unwrap();
    let (mut ok, out) = score(&s, &m, &calib);
    run_ok(&mut ok);
    std::fs::remove_file(&out).unwrap();
    let mut cases: Vec<(String, Value, &str)> = Vec::new();
    let mut set = |key: &'static str, v: Value| {
        let mut c = good.clone();
        c[key] = v.clone();
        cases.push((format!("{key} = {v}"), c, key));
    };
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    ] {
        for v in [
            json!(0),
            json!(-1),
            json!(1u64 << 40),
            json!(1.5),
            json!("48"),
            json!(null),
        ] {
            set(key, v);
        }
    }
    for v in [json!(0), json!(1u64 << 40), json!("x"), json!(5)] {
        set("num_key_value_heads", v);
    }
    for v in [json!(0), json!(7), json!(1u64 << 40), json!("x")] {
        set("head_dim", v);
    }
    for key in ["rms_norm_eps", "rope_theta"] {
        for v in [
            json!(0),
            json!(-1e-5),
            json!(false),
            json!("1e-5"),
            json!([1]),
        ] {
            set(key, v);
        }
    }
    set("max_position_embeddings", json!(0));
    set("max_position_embeddings", json!("256"));
    set("tie_word_embeddings", json!("true"));
    set("bos_token_id", json!(1u64 << 40));
    set("eos_token_id", json!(-5));
    set("eos_token_id", json!([0, "x"]));
    set("hidden_act", json!("gelu"));
    set("architectures", json!(["GPT2LMHeadModel"]));
    set("layer_intermediate_sizes", json!([64, 64]));
    set("layer_intermediate_sizes", json!([64, 64, 0]));
    set("rope_scaling", json!("llama3"));
    set("rope_scaling", json!({"rope_type": "yarn", "factor": 4.0}));
    set(
        "rope_scaling",
        json!({"rope_type": "llama3", "factor": -1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    );
    set("num_local_experts", json!(8));
    for (what, cfg, key) in cases {
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        // What the message names of the field (head counts are refused
        // together, per-layer widths as intermediate_size).
        let named = match key {
            "num_attention_heads" | "num_key_value_heads" => "heads",
            "architectures" => "architecture",
            "layer_intermediate_sizes" => "intermediate_size",
            k => k,
        };
        s.refused(&what, &mut c, Some(&out), &[&shown(&cfg_path), named]);
    }
    let text_len = String::from_utf8_lossy(&good_text).trim_end().len();
    for at in spread(0, text_len, 6) {
        std::fs::write(&cfg_path, &good_text[..at]).unwrap();
        let (mut c, out) = score(&s, &m, &calib);
        s.refused(
            &format!("truncated at {at}"),
            &mut c,
            Some(&out),
            &[&shown(&cfg_path)],
        );
    }
    s.done(65);
}

// ---- statistics files ------------------------------------------------------------

#[test]
fn stats_files() {
    let mut s = Scratch::new("stats");
    let calib = calib_text(&s.root, 200);
    let m = s.copy_dir(&fixture("tiny-llama3"), "model");
    let (mut c, good_path) = score(&s, &m, &calib);
    run_ok(&mut c);
    let good = std::fs::read(&good_path).unwrap();
    let (header, data) = st_split(&good);
    let prune = |s: &Scratch, stats: &Path| {
        let out = s.path("pruned");
        let mut c = bin();
        c.args(["prune", "--backend", "cpu", "--model"])
            .arg(&m)
            .arg("--stats")
            .arg(stats)
            .args(["--sparsity", "0.5", "--out"])
            .arg(&out);
        (c, out)
    };
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    let meta = |key: &'static str, v: &str| st_edit(&good, |h| h["__metadata__"][key] = json!(v));
    for (key, values) in [
        (
            "num_layers",
            &[
                "0",
                "2",
                "4",
                "1099511627776",
                "18446744073709551615",
                "-1",
                "x",
            ][..],
        ),
        ("samples", &["0", "3", "1099511627776", "x"][..]),
        ("seq_len", &["0", "1", "17", "99999999999"][..]),
        ("tokens", &["0", "31", "18446744073709551615"][..]),
        ("objectives", &["", "x", "energy,energy,ce,x"][..]),
        ("energy_at", &["x"][..]),
        ("format", &["safetensors"][..]),
        ("format_version", &["1", "4", ""][..]),
        ("predicted", &["0", "1", "x", "18446744073709551615"][..]),
        ("energy_norm", &["0", "1", "x", "18446744073709551615"][..]),
        ("ce_norm", &["0", "1", "x"][..]),
        ("shard", &["0/2", "3/2", "x"][..]),
        ("shard_samples", &["4"][..]),
        ("tensors_sha256", &["0", ""][..]),
        ("model_digest", &["", "0123456789abcdef"][..]),
        ("bos", &["x", "TRUE", ""][..]),
    ] {
        for v in values {
            cases.push((format!("{key} = {v:?}"), meta(key, v), key));
        }
    }
    for key in [
        "samples",
        "num_layers",
        "format",
        "tensors_sha256",
        "model_digest",
        "predicted",
        "energy_norm",
    ] {
        let b = st_edit(&good, |h| {
            h["__metadata__"].as_object_mut().unwrap().remove(key);
        });
        cases.push((format!("no {key}"), b, key));
    }
    let b = st_edit(&good, |h| {
        h.as_object_mut().unwrap().remove("__metadata__");
    });
    cases.push(("no metadata".into(), b, ""));
    // Damaged data: the checksum.
    for at in spread(0, data.len(), 8) {
        let mut b = good.clone();
        b[good.len() - data.len() + at] ^= 0x10;
        cases.push((format!("bit flipped at data byte {at}"), b, "checksum"));
    }
    for at in spread(0, good.len(), 10) {
        cases.push((format!("truncated at {at}"), good[..at].to_vec(), ""));
    }
    // A tensor renamed or retyped (checksum re-computed, so that the
    // shape and name checks are what refuses).
    let names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let resign = |h: &mut Value| {
        let bytes = st_join(h, &data);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t = st.tensors();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        let sum = rku_engine::prune::stats::tensors_checksum(
            t.iter().map(|(n, v)| (n.as_str(), v.data())),
        );
        h["__metadata__"]["tensors_sha256"] = json!(sum);
    };
    for (what, f) in [
        (
            "a tensor renamed",
            Box::new(|h: &mut Value| {
                let o = h.as_object_mut().unwrap();
                let v = o.remove(&names[1]).unwrap();
                o.insert("layers.7.s1".into(), v);
            }) as Box<dyn Fn(&mut Value)>,
        ),
        (
            "a tensor as F32",
            Box::new(|h: &mut Value| {
                let shape = h[&names[1]]["shape"][0].as_u64().unwrap();
                h[&names[1]]["dtype"] = json!("F32");
                h[&names[1]]["shape"] = json!([shape * 2]);
            }),
        ),
    ] {
        let mut h = header.clone();
        f(&mut h);
        resign(&mut h);
        cases.push((what.into(), st_join(&h, &data), ""));
    }
    let bad = s.path("bad.safetensors");
    for (what, b, key) in cases {
        std::fs::write(&bad, &b).unwrap();
        let (mut c, out) = prune(&s, &bad);
        let _ = key;
        s.refused(&what, &mut c, Some(&out), &[&shown(&bad)]);
    }
    // Merging: a damaged file among good ones names the damaged one.
    std::fs::write(&bad, meta("num_layers", "1099511627776")).unwrap();
    let out = s.path("merged.safetensors");
    let mut c = bin();
    c.args(["stats", "merge"])
        .arg(&good_path)
        .arg(&bad)
        .arg("--out")
        .arg(&out);
    s.refused(
        "merge with a damaged file",
        &mut c,
        Some(&out),
        &[&shown(&bad)],
    );
    let mut c = bin();
    c.args(["stats", "merge"])
        .arg(&good_path)
        .arg(&good_path)
        .arg("--out")
        .arg(&out);
    s.refused(
        "merge of a file with itself",
        &mut c,
        Some(&out),
        &[&shown(&good_path)],
    );
    s.done(55);
}

// ---- pruning.json ------------------------------------------------------------------

#[test]
fn pruning_records() {
    let mut s = Scratch::new("pruning.json");
    let calib = calib_text(&s.root, 200);
    let m = s.copy_dir(&fixture("tiny-llama3"), "model");
    let (mut c, stats) = score(&s, &m, &calib);
    run_ok(&mut c);
    let a = s.path("a");
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(&m)
            .arg("--stats")
            .arg(&stats)
            .args(["--sparsity", "0.5", "--out"])
            .arg(&a),
    );
    let rec_path = a.join("pruning.json");
    let good: Value = serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    let widths: Vec<u64> = good["source_layer_widths"]
        .as_array()
        .expect("pruning.json records the source widths")
        .iter()
        .map(|w| w.as_u64().unwrap())
        .collect();
    let b = s.path("b.json");
    let mut cases: Vec<(String, Value)> = Vec::new();
    let mut edit = |what: &str, f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        cases.push((what.into(), v));
    };
    let last = |v: &mut Value, l: usize| -> usize { v["kept"][l].as_array().unwrap().len() - 1 };
    for l in 0..widths.len() {
        let m = widths[l];
        edit(&format!("layer {l}: index = width"), &|v| {
            let i = last(v, l);
            v["kept"][l][i] = json!(m);
        });
        edit(&format!("layer {l}: index 2^40"), &|v| {
            let i = last(v, l);
            v["kept"][l][i] = json!(1u64 << 40);
        });
        edit(&format!("layer {l}: duplicate"), &|v| {
            v["kept"][l][1] = v["kept"][l][0].clone()
        });
        edit(&format!("layer {l}: descending"), &|v| {
            v["kept"][l].as_array_mut().unwrap().reverse()
        });
        edit(&format!("layer {l}: negative"), &|v| {
            v["kept"][l][0] = json!(-1)
        });
        edit(&format!("layer {l}: a float"), &|v| {
            v["kept"][l][0] = json!(0.5)
        });
        edit(&format!("layer {l}: empty"), &|v| v["kept"][l] = json!([]));
        edit(&format!("layer {l}: one dropped"), &|v| {
            v["kept"][l].as_array_mut().unwrap().pop();
        });
    }
    edit("a layer fewer", &|v| {
        v["kept"].as_array_mut().unwrap().pop();
    });
    edit("kept missing", &|v| {
        v.as_object_mut().unwrap().remove("kept");
    });
    edit("kept an object", &|v| v["kept"] = json!({}));
    edit("layer_widths short", &|v| {
        v["layer_widths"].as_array_mut().unwrap().pop();
    });
    edit("source widths short", &|v| {
        v["source_layer_widths"].as_array_mut().unwrap().pop();
    });
    edit("source widths text", &|v| {
        v["source_layer_widths"] = json!("64")
    });
    edit("another source model", &|v| {
        v["source_model_digest"] = json!("0123456789abcdef")
    });
    for (what, v) in cases {
        std::fs::write(&b, v.to_string()).unwrap();
        let mut c = bin();
        c.arg("iou").arg(&a).arg(&b);
        s.refused(&what, &mut c, None, &[&shown(&b)]);
    }
    for (what, text) in [
        ("not JSON", "{\"kept\": [[0, 1"),
        ("empty", ""),
        ("a list", "[]"),
    ] {
        std::fs::write(&b, text).unwrap();
        let mut c = bin();
        c.arg("iou").arg(&a).arg(&b);
        s.refused(what, &mut c, None, &[&shown(&b)]);
    }
    let mut c = bin();
    c.arg("iou").arg(&a).arg(&m);
    s.refused(
        "a model that was not pruned",
        &mut c,
        None,
        &[&shown(&m), "pruning.json"],
    );
    s.done(30);
}

// ---- jsonl data ----------------------------------------------------------------------

#[test]
fn jsonl_data() {
    let mut s = Scratch::new("jsonl");
    let m = s.copy_dir(&fixture("tiny-llama3"), "model");
    let data = s.path("data.jsonl");
    let mc = |s: &Scratch| {
        let out = s.path("mc-out.jsonl");
        let mut c = bin();
        c.args(["eval", "mc", "--backend", "cpu", "--model"])
            .arg(&m)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out);
        (c, out)
    };
    let gen = |s: &Scratch, shots: Option<&Path>| {
        let out = s.path("gen-out.jsonl");
        let mut c = bin();
        c.args(["eval", "gen", "--backend", "cpu", "--model"])
            .arg(&m)
            .args(["--max-new-tokens", "2", "--limit", "2", "--data"]);
        match shots {
            Some(f) => c
                .arg(s.path("gen-good.jsonl"))
                .arg("--shots-file")
                .arg(f)
                .args(["--shots", "1"]),
            None => c.arg(&data).args(["--shots", "0"]),
        };
        c.arg("--out").arg(&out);
        (c, out)
    };
    let good_mc = r#"{"query": "The train leaves at", "choices": ["noon", "late"], "gold": 1}"#;
    let good_gen = r#####"{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}"#####;
    s.write("gen-good.jsonl", format!("{good_gen}\n"));
    let (mut c, out) = mc(&s);
    std::fs::write(&data, format!("{good_mc}\n")).unwrap();
    run_ok(&mut c);
    std::fs::remove_file(&out).unwrap();
    let mc_rows = [
        ("empty file", ""),
        ("blank lines only", "\n\n  \n"),
        ("truncated", r#"{"query": "The train", "choi"#),
        ("a list", "[1, 2]"),
        ("a number", "7"),
        ("not JSON", "query: the train"),
        ("no query", r#"{"choices": ["a", "b"], "gold": 0}"#),
        (
            "query a number",
            r#"{"query": 5, "choices": ["a", "b"], "gold": 0}"#,
        ),
        ("no choices", r#"{"query": "q", "gold": 0}"#),
        (
            "choices a string",
            r#"{"query": "q", "choices": "ab", "gold": 0}"#,
        ),
        (
            "a choice a number",
            r#"{"query": "q", "choices": ["a", 1], "gold": 0}"#,
        ),
        (
            "one choice",
            r#"{"query": "q", "choices": ["a"], "gold": 0}"#,
        ),
        ("no gold", r#"{"query": "q", "choices": ["a", "b"]}"#),
        (
            "gold past the choices",
            r#"{"query": "q", "choices": ["a", "b"], "gold": 2}"#,
        ),
        (
            "gold negative",
            r#"{"query": "q", "choices": ["a", "b"], "gold": -1}"#,
        ),
        (
            "gold a float",
            r#"{"query": "q", "choices": ["a", "b"], "gold": 0.5}"#,
        ),
        (
            "gold a bool",
            r#"{"query": "q", "choices": ["a", "b"], "gold": true}"#,
        ),
        (
            "gold text of no choice",
            r#"{"query": "q", "choices": ["a", "b"], "gold": "c"}"#,
        ),
        (
            "gold \"1\" ambiguous",
            r#"{"query": "q", "choices": ["1", "2"], "label": "1"}"#,
        ),
        (
            "gold null",
            r#"{"query": "q", "choices": ["a", "b"], "gold": null}"#,
        ),
    ];
    for (what, row) in mc_rows {
        for (where_, text) in [
            ("first", format!("{row}\n")),
            ("second", format!("{good_mc}\n{row}\n")),
        ] {
            if where_ == "second" && row.trim().is_empty() {
                continue; // blank lines after a good one are no error
            }
            std::fs::write(&data, text).unwrap();
            let (mut c, out) = mc(&s);
            s.refused(
                &format!("mc: {what} ({where_} line)"),
                &mut c,
                Some(&out),
                &[&shown(&data)],
            );
        }
    }
    std::fs::write(&data, b"\xff\xfe{\"query\": 1}\n").unwrap();
    let (mut c, out) = mc(&s);
    s.refused("mc: not UTF-8", &mut c, Some(&out), &[&shown(&data)]);
    let gen_rows = [
        ("empty file", ""),
        ("truncated", r#"{"question": "What is"#),
        ("no question", r#####"{"answer": "#### 4"}"#####),
        (
            "question a number",
            r#####"{"question": 4, "answer": "#### 4"}"#####,
        ),
        ("no answer", r#"{"question": "q"}"#),
        ("answer a list", r#"{"question": "q", "answer": [4]}"#),
        (
            "answer without a number",
            r#####"{"question": "q", "answer": "#### four"}"#####,
        ),
        (
            "answer NaN",
            r#####"{"question": "q", "answer": "#### NaN"}"#####,
        ),
        ("a list", "[]"),
    ];
    for (what, row) in gen_rows {
        std::fs::write(&data, format!("{row}\n")).unwrap();
        let (mut c, out) = gen(&s, None);
        s.refused(
            &format!("gen: {what}"),
            &mut c,
            Some(&out),
            &[&shown(&data)],
        );
        if !row.is_empty() {
            let (mut c, out) = gen(&s, Some(&data));
            s.refused(
                &format!("gen shots: {what}"),
                &mut c,
                Some(&out),
                &[&shown(&data)],
            );
        }
    }
    // Calibration jsonl read through --field.
    let calib = s.path("calib.jsonl");
    for (what, text) in [
        ("no such field", "{\"text\": \"hello there\"}\n"),
        ("field a number", "{\"0\": 5}\n"),
        ("truncated", "{\"0\": \"hello"),
        ("a list", "[\"hello\"]\n"),
    ] {
        std::fs::write(&calib, text).unwrap();
        let out = s.path("stats.safetensors");
        let mut c = bin();
        c.args(["score", "--backend", "cpu", "--model"])
            .arg(&m)
            .arg("--calib")
            .arg(&calib)
            .args(["--field", "0", "--samples", "2", "--seq-len", "16", "--out"])
            .arg(&out);
        s.refused(
            &format!("calib: {what}"),
            &mut c,
            Some(&out),
            &[&shown(&calib)],
        );
    }
    s.done(50);
}

// ---- output paths ----------------------------------------------------------------------

#[test]
fn output_paths() {
    let mut s = Scratch::new("outputs");
    let calib = calib_text(&s.root, 200);
    let m = s.copy_dir(&fixture("tiny-llama3"), "model");
    let gguf = s.path("tiny.gguf");
    std::fs::copy(fixture("gguf/tiny_llama.gguf"), &gguf).unwrap();
    let mc_data = s.write(
        "mc.jsonl",
        "{\"query\": \"The train\", \"choices\": [\"noon\", \"late\"], \"gold\": 1}\n",
    );
    let (mut c, stats) = score(&s, &m, &calib);
    run_ok(&mut c);
    let victim = s.write("victim.txt", "precious");
    let victim_dir = s.path("victim-dir");
    std::fs::create_dir(&victim_dir).unwrap();
    s.write("victim-dir/keep.txt", "precious too");
    let foreign = s.write("work/foreign.txt", "mine");
    let foreign_dir = s.path("work/foreign-dir");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    s.write("work/foreign-dir/notes.txt", "mine");
    type MakeCommand<'a> = Box<dyn Fn(&Path, bool) -> Command + 'a>;
    let commands: Vec<(&str, MakeCommand)> = vec![
        (
            "score",
            Box::new(|out: &Path, force| {
                let mut c = bin();
                c.args(["score", "--backend", "cpu", "--model"])
                    .arg(&m)
                    .arg("--calib")
                    .arg(&calib)
                    .args(["--samples", "2", "--seq-len", "16", "--out"])
                    .arg(out);
                if force {
                    c.arg("--force");
                }
                c
            }),
        ),
        (
            "prune",
            Box::new(|out: &Path, force| {
                let mut c = bin();
                c.args(["prune", "--backend", "cpu", "--model"])
                    .arg(&m)
                    .arg("--stats")
                    .arg(&stats)
                    .args(["--sparsity", "0.5", "--out"])
                    .arg(out);
                if force {
                    c.arg("--force");
                }
                c
            }),
        ),
        (
            "import",
            Box::new(|out: &Path, force| {
                let mut c = bin();
                c.arg("import").arg(&gguf).arg("--out").arg(out);
                if force {
                    c.arg("--force");
                }
                c
            }),
        ),
        (
            "eval mc",
            Box::new(|out: &Path, force| {
                let mut c = bin();
                c.args(["eval", "mc", "--backend", "cpu", "--model"])
                    .arg(&m)
                    .arg("--data")
                    .arg(&mc_data)
                    .arg("--out")
                    .arg(out);
                if force {
                    c.arg("--force");
                }
                c
            }),
        ),
    ];
    let link = s.path("work/link");
    symlink(&victim, &link).unwrap();
    let dir_link = s.path("work/dir-link");
    symlink(&victim_dir, &dir_link).unwrap();
    let dangling = s.path("work/dangling");
    symlink(s.path("nowhere"), &dangling).unwrap();
    let under_file = calib.join("out");
    let root = s.root.clone();
    let weights = m.join("model.safetensors");
    for (name, cmd) in &commands {
        // (what, out, force, what the message must name besides the path)
        let cases: Vec<(&str, &Path, bool, &str)> = vec![
            ("an existing file", &foreign, false, "--force"),
            ("an existing directory", &foreign_dir, false, "--force"),
            ("a foreign file, forced", &foreign, true, "--force"),
            ("a foreign directory, forced", &foreign_dir, true, "--force"),
            ("a link to a file", &link, false, "--force"),
            ("a link to a directory", &dir_link, false, "--force"),
            ("a dangling link", &dangling, false, "--force"),
            ("the calibration text, forced", &calib, true, "--force"),
            ("the model directory, forced", &m, true, "--force"),
            ("the weights, forced", &weights, true, "--force"),
            ("the scratch root, forced", &root, true, "--force"),
            ("under a file", &under_file, false, ""),
        ];
        for (what, out, force, needle) in cases {
            let mut c = cmd(out, force);
            let shown_out = shown(out);
            let names: Vec<&str> = [shown_out.as_str(), needle]
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect();
            s.refused(&format!("{name}: {what}"), &mut c, Some(out), &names);
        }
    }
    s.done(45);
}
