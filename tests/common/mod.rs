//! Shared helpers of the integration tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub mod gguf_writer;
pub mod naive;
pub mod ops;

/// Path of a committed fixture.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The script that makes `assets/<rel>` (what a missing-asset message names).
pub fn asset_script(rel: &str) -> &'static str {
    match rel.split('/').next().unwrap_or("") {
        "eval" => "python3 scripts/make-eval-data.py",
        "models" => "bash scripts/fetch-assets.sh --import path/to/rku-engine",
        "llm_gemma" => "bash scripts/fetch-assets.sh --gemma",
        _ => "bash scripts/fetch-assets.sh",
    }
}

/// Path under the fetched assets. When absent: a panic under CI (the
/// environment variable `CI` set: scripts/test.sh makes every asset, so a
/// missing one is a broken script, not a reason to pass), otherwise `None`
/// with a printed reason, and the caller skips. Either way the message names
/// the file and the script that makes it.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(rel);
    if p.exists() {
        return Some(p);
    }
    let why = format!(
        "{} not present (made by `{}`)",
        p.display(),
        asset_script(rel)
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI is set and {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// A temporary directory for outputs of hundreds of MB (a real model's
/// f32 import): under cargo's per-target scratch directory, on the disk
/// that holds the build, rather than `/tmp`, which may be a small tmpfs.
pub fn large_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap_or_else(|e| panic!("{}: {e}", env!("CARGO_TARGET_TMPDIR")))
}

/// A reference tensor as f64 with its shape.
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Loads every tensor of a safetensors file as f64 (from f32, f64, i32, i64).
pub fn load_reference(path: &Path) -> HashMap<String, RefTensor> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = HashMap::new();
    for (name, v) in st.tensors() {
        let b = v.data();
        let data: Vec<f64> = match v.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(
            name,
            RefTensor {
                shape: v.shape().to_vec(),
                data,
            },
        );
    }
    out
}

/// Largest |got − want| / max(|want|) over a vector (relative to its scale).
pub fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
        / scale
}

/// The `rku-engine` binary of this build.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_rku-engine"))
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd`, which must fail with an error and no panic; returns its stderr.
pub fn run_err(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    failed_without_panic(cmd, &out)
}

/// The stderr of `cmd`'s finished run `out`, which must have failed with
/// an error and no panic.
pub fn failed_without_panic(cmd: &std::process::Command, out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{cmd:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    err
}

/// The tests' one seeded generator: xorshift64 (`seed` nonzero), used
/// directly for fuzz damage and through `values` for test data.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    assert_ne!(seed, 0, "xorshift needs a nonzero seed");
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// `n` seeded values uniform in `[lo, hi)` (24 random bits each).
pub fn values(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut next = xorshift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..n)
        .map(|_| lo + (hi - lo) * ((next() >> 40) as f32 / (1u64 << 24) as f32))
        .collect()
}

/// Made-up normal equations of one refit layer (METHODS.md §9) with `k`
/// kept channels and outputs of width `d`: G = (A + Aᵀ)/2 + k·I with A
/// uniform in [-1, 1), positive definite by diagonal dominance, and C
/// uniform in [-1, 1).
pub fn synthetic_normal_equations(
    k: usize,
    d: usize,
    seed: u64,
) -> rku_engine::backend::NormalEquations {
    let a = values(k * k, -1.0, 1.0, seed);
    let mut g = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            let diag = if i == j { k as f64 } else { 0.0 };
            g[i * k + j] = 0.5 * (a[i * k + j] as f64 + a[j * k + i] as f64) + diag;
        }
    }
    let c = values(k * d, -1.0, 1.0, seed + 1);
    rku_engine::backend::NormalEquations {
        width: k,
        d,
        g,
        c: c.into_iter().map(f64::from).collect(),
        rr: 1e6,
    }
}

/// A plain calibration text of `lines` numbered lines in `dir`.
pub fn calib_text(dir: &Path, lines: usize) -> PathBuf {
    let path = dir.join("calib.txt");
    let text: String = (0..lines)
        .map(|i| {
            format!(
                "Line {i}: the quick brown fox jumps over {} lazy dogs.\n",
                i * 7
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes a traces file (METHODS.md §11) for the tokenizer with sha256
/// `digest`: one greedy trace per `(prompt_ids, generated_ids)`, prompt i
/// sample 0, with no gold answer.
pub fn write_trace_file(path: &Path, digest: &str, traces: &[(Vec<u32>, Vec<u32>)]) {
    use rku_engine::eval::traces::{SamplingRecord, TraceFinish, TraceRecord};
    let lines: Vec<String> = traces
        .iter()
        .enumerate()
        .map(|(i, (prompt, generated))| {
            let r = TraceRecord {
                prompt_index: i,
                sample: 0,
                question: format!("q{i}"),
                prompt_ids: prompt.clone(),
                generated_ids: generated.clone(),
                text: "x".into(),
                prompt_tokens: prompt.len(),
                generated_tokens: generated.len(),
                finish: TraceFinish::Length,
                answer: None,
                gold: None,
                correct: None,
                tokenizer_digest: digest.into(),
                sampling: SamplingRecord {
                    temperature: None,
                    top_p: None,
                    seed: None,
                },
            };
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// sha256 of the file at `path`, lowercase hex.
pub fn file_sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `n` token ids below `vocab`: position i gives (7919·i + seed) mod vocab.
pub fn stride_ids(n: usize, vocab: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 7919 + seed) % vocab as u32)
        .collect()
}

/// Every statistic (s1, s2, f2, k1, tk) of `a` equals `b`'s, bit for bit.
pub fn assert_stats_equal(a: &rku_engine::prune::Stats, b: &rku_engine::prune::Stats, what: &str) {
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        for (name, u, v) in [
            ("s1", &x.s1, &y.s1),
            ("s2", &x.s2, &y.s2),
            ("f2", &x.f2, &y.f2),
            ("k1", &x.k1, &y.k1),
            ("tk", &x.tk, &y.tk),
        ] {
            assert!(u == v, "{what}: layer {l} {name} differs");
        }
    }
}

/// A statistics pass over `seqs` windows of `t` tokens, batches of 2, both
/// objectives, every layer recomputed, sequence-major, no BOS.
pub fn calib_spec(seqs: usize, t: usize) -> rku_engine::prune::calibrate::CalibSpec {
    use rku_engine::prune::stats::{EnergyAt, Objectives};
    rku_engine::prune::calibrate::CalibSpec {
        samples: seqs,
        seq_len: t,
        batch: 2,
        objectives: Objectives {
            energy: true,
            ce: true,
        },
        energy_at: EnergyAt::FinalNorm,
        norms: None,
        activation_memory: rku_engine::model::keep::MemoryBudget::Bytes(0),
        layer_major: None,
        bos: false,
    }
}
