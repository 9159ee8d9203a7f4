//! Progressive pruning (`prune --progressive`, METHODS.md §11) on the tiny
//! LLaMA-3 fixture: one step is `prune` over the same traces, bit for bit;
//! the steps' kept channels compose into channels of the original, and each
//! export computes what the dense model computes with the other channels
//! zeroed; a rerun skips complete steps and resumes traces; bad schedules,
//! conflicting flags and changed settings are refused by name.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::model::forward::logits;
use rku_engine::model::{Geometry, Model, ModelConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Two shots, then five problems (one without an answer).
const PROBLEMS: &str = r#####"{"question": "Shot one: 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
{"question": "Shot two: 10 - 3?", "answer": 7}
{"question": "A farmer has 3 cows and buys 4 more. How many cows?", "answer": "3 + 4 = 7\n#### 7"}
{"question": "What is 1,000 + 250?", "answer": "#### 1,250"}
{"question": "Numbers: 2024 minus 2000?", "answer": "24"}
{"question": "Tell me a number."}
{"question": "Half of 10?", "answer": null}
"#####;

const MODEL: &str = "tiny-llama3";
/// FFN channels of the fixture: 3 layers of 64.
const CHANNELS: usize = 192;

struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    prompts: PathBuf,
}

fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let prompts = root.join("prompts.jsonl");
    std::fs::write(&prompts, PROBLEMS).unwrap();
    World {
        _tmp: tmp,
        root,
        prompts,
    }
}

/// The decoding flags every run here uses (as `traces` spells them, and
/// as `prune --progressive` does).
const DECODE: [&str; 4] = ["--shots", "2", "--max-new-tokens", "8"];

impl World {
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `prune --progressive <schedule> ... --out <out>` plus `extra`.
    fn progressive(&self, schedule: &str, out: &str, extra: &[&str]) -> Command {
        let mut c = bin();
        c.args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture(MODEL))
            .args(["--progressive", schedule, "--trace-prompts"])
            .arg(&self.prompts)
            .args(DECODE)
            .args(["--tokens", "generated", "--trace-batch", "3"])
            .args(extra)
            .arg("--out")
            .arg(self.p(out));
        c
    }
}

fn pruning(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("pruning.json")).unwrap()).unwrap()
}

fn kept(dir: &Path) -> Vec<Vec<usize>> {
    serde_json::from_value(pruning(dir)["kept"].clone()).unwrap()
}

fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(std::fs::read(path).unwrap());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn one_step_is_prune_over_the_same_traces() {
    let w = world();
    run_ok(
        bin()
            .args(["traces", "--backend", "cpu", "--model"])
            .arg(fixture(MODEL))
            .arg("--prompts")
            .arg(&w.prompts)
            .args(DECODE)
            .arg("--out")
            .arg(w.p("t.jsonl")),
    );
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture(MODEL))
            .arg("--traces")
            .arg(w.p("t.jsonl"))
            .args(["--tokens", "generated", "--sparsity", "0.3", "--out"])
            .arg(w.p("plain")),
    );
    let out = run_ok(&mut w.progressive("0.3", "prog", &[]));
    assert!(out.contains("step 1: sparsity 0.3"), "{out}");
    let step = w.p("prog/step-1-s0.3");
    assert_eq!(
        std::fs::read(w.p("prog/step-1-traces.jsonl")).unwrap(),
        std::fs::read(w.p("t.jsonl")).unwrap(),
        "the step's traces are `traces`'s"
    );
    assert_eq!(
        std::fs::read(step.join("model.safetensors")).unwrap(),
        std::fs::read(w.p("plain/model.safetensors")).unwrap(),
        "the step's model is `prune --traces`'s"
    );
    assert_eq!(kept(&step), kept(&w.p("plain")));
    let (a, b) = (pruning(&step), pruning(&w.p("plain")));
    for k in [
        "sparsity",
        "calibration",
        "source_model_digest",
        "layer_widths",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
    let p = &a["progressive"];
    assert_eq!(
        (p["step"].as_u64(), p["steps"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(p["schedule"], serde_json::json!([0.3]));
    assert_eq!(
        p["traces"]["digest"].as_str().unwrap(),
        sha256(&w.p("t.jsonl"))
    );
    assert_eq!(p["pruned_model"]["digest"], a["source_model_digest"]);
}

/// A copy of the dense fixture with every FFN channel not in `kept`
/// zeroed (its down_proj column).
fn zeroed_dense(kept: &[Vec<usize>], out: &Path) {
    use safetensors::tensor::TensorView;
    use safetensors::SafeTensors;
    let src = fixture(MODEL);
    std::fs::create_dir(out).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let mut data = t.data().to_vec();
        let layer =
            (0..kept.len()).find(|l| name == format!("model.layers.{l}.mlp.down_proj.weight"));
        if let Some(l) = layer {
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let m = t.shape()[1];
            for row in data.chunks_exact_mut(4 * m) {
                for c in (0..m).filter(|c| !kept[l].contains(c)) {
                    row[4 * c..4 * c + 4].copy_from_slice(&0f32.to_le_bytes());
                }
            }
        }
        owned.push((name, t.dtype(), t.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
}

fn logits_of(dir: &Path) -> Vec<f64> {
    let be = CpuBackend::new();
    let model = Model::load(&be, dir).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 384).collect();
    let geo = Geometry { seqs: 2, t: 12 };
    logits(&be, &model, &ids, geo)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

/// Runs a three-step schedule with `allocation` and checks every step
/// against the original: kept sets nested, sizes, widths and logits.
fn check_composition(allocation: &str, kept_per_step: impl Fn(f64) -> Option<Vec<usize>>) {
    let w = world();
    let schedule = [0.2, 0.45, 0.6];
    run_ok(&mut w.progressive(
        "0.2,0.45,0.6",
        "prog",
        &["--allocation", allocation, "--method", "rku"],
    ));
    let mut before: Vec<Vec<usize>> = vec![(0..64).collect(); 3];
    let mut prev_dir = fixture(MODEL);
    for (i, s) in schedule.into_iter().enumerate() {
        let dir = w.p(&format!("prog/step-{}-s{s}", i + 1));
        let k = kept(&dir);
        let sizes: Vec<usize> = k.iter().map(Vec::len).collect();
        let total: usize = sizes.iter().sum();
        let exact = CHANNELS - (s * CHANNELS as f64).round_ties_even() as usize;
        match kept_per_step(s) {
            Some(want) => assert_eq!(sizes, want, "step {}", i + 1),
            None => assert_eq!(total, exact, "step {}", i + 1),
        }
        // Within the rounding of one count per layer either way.
        assert!(
            total.abs_diff(exact) <= 3,
            "step {}: {total} vs {exact}",
            i + 1
        );
        for (l, (layer, prev)) in k.iter().zip(&before).enumerate() {
            assert!(layer.windows(2).all(|p| p[0] < p[1]), "layer {l} sorted");
            assert!(
                layer.iter().all(|c| prev.contains(c)),
                "layer {l} ⊆ the step before"
            );
        }
        let cfg = ModelConfig::load(&dir.join("config.json")).unwrap();
        assert_eq!(cfg.ffn_widths, sizes);
        let rec = pruning(&dir);
        assert_eq!(rec["source_layer_widths"], serde_json::json!([64, 64, 64]));
        assert_eq!(rec["sparsity"].as_f64(), Some(s));
        let p = &rec["progressive"];
        assert_eq!(p["step"].as_u64(), Some(i as u64 + 1));
        assert_eq!(
            p["pruned_model"]["path"].as_str().unwrap(),
            prev_dir.display().to_string()
        );
        assert_eq!(
            p["traces"]["digest"].as_str().unwrap(),
            sha256(&w.p(&format!("prog/step-{}-traces.jsonl", i + 1)))
        );
        // The export computes what the dense model does without the
        // other channels.
        let zeroed = w.p(&format!("zeroed-{}", i + 1));
        zeroed_dense(&k, &zeroed);
        let err = max_rel_err(&logits_of(&dir), &logits_of(&zeroed));
        assert!(err < 1e-5, "step {}: logits differ by {err:.2e}", i + 1);
        before = k;
        prev_dir = dir;
    }
}

#[test]
fn global_steps_compose_into_channels_of_the_original() {
    // Global: R − round(s·R) of the original 192 channels, exactly.
    check_composition("global", |_| None);
}

#[test]
fn uniform_steps_keep_the_originals_share_of_every_layer() {
    // Uniform: every layer keeps 64 − round(s·64) of its original 64.
    check_composition("uniform", |s| {
        Some(vec![64 - (s * 64.0).round_ties_even() as usize; 3])
    });
}

/// (modified time, bytes) of every file under `dir`.
fn files(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            let m = std::fs::metadata(&p).unwrap().modified().unwrap();
            out.push((p.clone(), m, std::fs::read(&p).unwrap()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn a_rerun_skips_complete_steps_and_resumes_traces() {
    let w = world();
    let out = run_ok(&mut w.progressive("0.2,0.4", "prog", &[]));
    assert!(!out.contains("skipped"), "{out}");
    let (s1, s2) = (w.p("prog/step-1-s0.2"), w.p("prog/step-2-s0.4"));
    let t2 = w.p("prog/step-2-traces.jsonl");
    let first = files(&s1);
    let traces1 = files(&w.p("prog"))
        .into_iter()
        .find(|f| f.0.ends_with("step-1-traces.jsonl"));
    let model2 = std::fs::read(s2.join("model.safetensors")).unwrap();
    let (kept2, traces2) = (kept(&s2), std::fs::read(&t2).unwrap());

    // Nothing to do: every step skipped.
    let out = run_ok(&mut w.progressive("0.2,0.4", "prog", &[]));
    assert_eq!(out.matches("skipped").count(), 2, "{out}");

    // The last step removed: step 1 is not recomputed, step 2 comes back
    // the same from its complete traces.
    std::fs::remove_dir_all(&s2).unwrap();
    let out = run_ok(&mut w.progressive("0.2,0.4", "prog", &[]));
    assert!(
        out.contains("step 1: sparsity 0.2") && out.contains("skipped"),
        "{out}"
    );
    assert_eq!(files(&s1), first, "step 1 untouched");
    let again = files(&w.p("prog"))
        .into_iter()
        .find(|f| f.0.ends_with("step-1-traces.jsonl"));
    assert_eq!(again, traces1, "step 1's traces untouched");
    assert_eq!(std::fs::read(s2.join("model.safetensors")).unwrap(), model2);
    assert_eq!(kept(&s2), kept2);

    // Interrupted while generating step 2's traces: the file is resumed.
    std::fs::remove_dir_all(&s2).unwrap();
    let text = String::from_utf8(traces2.clone()).unwrap();
    std::fs::write(&t2, text.lines().next().unwrap().to_string() + "\n").unwrap();
    let o = w.progressive("0.2,0.4", "prog", &[]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming, 1 traces already there"), "{err}");
    assert_eq!(
        std::fs::read(&t2).unwrap(),
        traces2,
        "resumed = uninterrupted"
    );
    assert_eq!(std::fs::read(s2.join("model.safetensors")).unwrap(), model2);
    assert_eq!(files(&s1), first);

    // A longer schedule with the same start adds a step.
    let out = run_ok(&mut w.progressive("0.2,0.4,0.5", "prog", &[]));
    assert_eq!(out.matches("skipped").count(), 2, "{out}");
    assert!(w.p("prog/step-3-s0.5/pruning.json").exists());
    assert_eq!(std::fs::read(s2.join("model.safetensors")).unwrap(), model2);
}

#[test]
fn bad_schedules_and_conflicting_flags_are_refused() {
    let w = world();
    for (schedule, says) in [
        ("0.3,0.2", "strictly increasing"),
        ("0.2,0.2", "strictly increasing"),
        ("0.2,1", "strictly between 0 and 1"),
        ("0.2,1.5", "strictly between 0 and 1"),
        ("0,0.2", "strictly between 0 and 1"),
        ("-0.1", "strictly between 0 and 1"),
        ("1e-300,0.2", "within 0.000001 of 0 or 1"),
        ("0.1,abc", "not a number"),
    ] {
        let e = run_err(&mut w.progressive(schedule, "bad", &[]));
        assert!(
            e.contains("--progressive") && e.contains(says),
            "{schedule}: {e}"
        );
    }
    for (extra, says) in [
        (&["--sparsity", "0.2"][..], "--sparsity"),
        (&["--traces", "prompts.jsonl"][..], "--traces"),
        (&["--stats", "prompts.jsonl"][..], "--stats"),
        (&["--calib", "prompts.jsonl"][..], "--calib"),
        (&["--export", "padded"][..], "--export padded"),
    ] {
        let extra: Vec<String> = extra
            .iter()
            .map(|a| match *a {
                "prompts.jsonl" => w.prompts.display().to_string(),
                a => a.to_string(),
            })
            .collect();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let e = run_err(&mut w.progressive("0.2", "bad", &extra));
        assert!(e.contains(says), "{extra:?}: {e}");
    }
    // No prompts: refused by name.
    let e = run_err(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture(MODEL))
            .args(["--progressive", "0.2", "--out"])
            .arg(w.p("bad")),
    );
    assert!(e.contains("--trace-prompts"), "{e}");
    // Decoding flags without --progressive.
    let e = run_err(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture(MODEL))
            .args(["--sparsity", "0.2", "--max-new-tokens", "4", "--stats"])
            .arg(&w.prompts)
            .arg("--out")
            .arg(w.p("bad")),
    );
    assert!(e.contains("--progressive"), "{e}");
    assert!(!w.p("bad").exists(), "nothing written");
}

#[test]
fn changed_settings_are_refused_by_name_or_recomputed_with_force() {
    let w = world();
    run_ok(&mut w.progressive("0.2,0.4", "prog", &[]));
    let s1 = w.p("prog/step-1-s0.2");
    let before = files(&w.p("prog"));
    for (extra, says) in [
        (&["--limit", "4"][..], "--limit (was null, now 4)"),
        (&["--method", "agf"][..], "--method"),
        (&["--select", "correct"][..], "--select"),
        (&["--min-keep", "2"][..], "--min-keep"),
    ] {
        let e = run_err(&mut w.progressive("0.2,0.4", "prog", extra));
        assert!(
            e.contains(&s1.display().to_string()) && e.contains(says) && e.contains("--force"),
            "{extra:?}: {e}"
        );
        assert_eq!(files(&w.p("prog")), before, "{extra:?}: nothing changed");
    }
    // Another second step: the first is kept, the second refused.
    let e = run_err(&mut w.progressive("0.2,0.3", "prog", &[]));
    assert!(
        e.contains("step-2-s0.4") && e.contains("another schedule"),
        "{e}"
    );
    assert_eq!(files(&w.p("prog")), before);
    // With --force: recomputed from the step that changed.
    let out = run_ok(&mut w.progressive("0.2,0.4", "prog", &["--method", "agf", "--force"]));
    assert!(!out.contains("skipped"), "{out}");
    for dir in [&s1, &w.p("prog/step-2-s0.4")] {
        let rec = pruning(dir);
        assert_eq!(rec["method"], "agf");
        assert_eq!(rec["progressive"]["settings"]["method"], "agf");
    }
    let out = run_ok(&mut w.progressive("0.2,0.3", "prog", &["--method", "agf", "--force"]));
    assert_eq!(out.matches("skipped").count(), 1, "{out}");
    assert!(
        !w.p("prog/step-2-s0.4").exists(),
        "the other schedule's step is removed"
    );
    assert!(w.p("prog/step-2-s0.3/pruning.json").exists());
}

/// A finished step whose pruning.json was edited to keep a channel past
/// the dense model's width (and no longer records the widths that would
/// catch it) is refused by name before anything runs, not composed into
/// the next step.
#[test]
fn a_step_keeping_channels_past_the_dense_width_is_refused() {
    let w = world();
    run_ok(&mut w.progressive("0.2,0.4", "prog", &[]));
    let s1 = w.p("prog/step-1-s0.2");
    let mut rec = pruning(&s1);
    rec.as_object_mut().unwrap().remove("source_layer_widths");
    let last = rec["kept"][0].as_array().unwrap().len() - 1;
    rec["kept"][0][last] = 1000.into();
    std::fs::write(s1.join("pruning.json"), rec.to_string()).unwrap();
    let before = files(&w.p("prog"));
    let e = run_err(&mut w.progressive("0.2,0.4,0.5", "prog", &[]));
    assert!(
        e.contains("step-1-s0.2") && e.contains("do not fit the dense model"),
        "{e}"
    );
    assert_eq!(files(&w.p("prog")), before, "nothing changed");
    assert!(!w.p("prog/step-3-s0.5").exists());
}

/// `allocate_from` (METHODS.md §11): relative to the model's own widths it
/// is `allocate`; relative to wider originals the counts are the
/// original's share, the floors the original's.
#[test]
fn allocation_relative_to_the_original() {
    use rku_engine::prune::{allocate, allocate_from, Allocation};
    let scores: Vec<Vec<f64>> = [30usize, 41, 17]
        .iter()
        .enumerate()
        .map(|(l, &m)| {
            values(m, -1.0, 1.0, 7 + l as u64)
                .into_iter()
                .map(f64::from)
                .collect()
        })
        .collect();
    let widths: Vec<usize> = scores.iter().map(Vec::len).collect();
    for alloc in [Allocation::Global, Allocation::Uniform] {
        for (s, min_keep, align) in [(0.3, None, 1), (0.5, Some(2), 1), (0.4, None, 4)] {
            assert_eq!(
                allocate_from(&scores, &widths, alloc, s, min_keep, align).unwrap(),
                allocate(&scores, alloc, s, min_keep, align).unwrap(),
                "{alloc} {s}"
            );
        }
    }
    // The scored layers are what is left of layers of 40, 60 and 20.
    let original = [40usize, 60, 20];
    let global = allocate_from(&scores, &original, Allocation::Global, 0.45, None, 1).unwrap();
    let total: usize = global.iter().map(Vec::len).sum();
    assert_eq!(total, 120 - 54);
    let uniform = allocate_from(&scores, &original, Allocation::Uniform, 0.45, None, 1).unwrap();
    let sizes: Vec<usize> = uniform.iter().map(Vec::len).collect();
    assert_eq!(sizes, [22, 33, 11]);
    // Above what is left: nothing more to drop in that layer.
    let light = allocate_from(&scores, &original, Allocation::Uniform, 0.1, None, 1).unwrap();
    let sizes: Vec<usize> = light.iter().map(Vec::len).collect();
    assert_eq!(sizes, [30, 41, 17]);
    // The floors are the original's: 5% of 60 is 3.
    let deep = allocate_from(&scores, &original, Allocation::Global, 0.9, None, 1).unwrap();
    assert!(
        deep.iter().zip([2, 3, 1]).all(|(k, f)| k.len() >= f),
        "{deep:?}"
    );
    assert!(allocate_from(&scores, &[20, 60, 20], Allocation::Global, 0.3, None, 1).is_err());
}
