//! The least-squares refit (METHODS.md §9) against the independent PyTorch
//! reference of scripts/make_refit_fixtures.py (tests/fixtures/refit/), and
//! its refusals.
//!
//! Tolerances. The solve alone (`solve_layer` on the reference's own G and
//! C, both in f64) must agree to 1e-9 relative: only the order of f64
//! operations differs. End to end, the engine's f32 forward differs from
//! PyTorch's by float32 rounding (about 1e-6 relative in h); the damped
//! solve amplifies input errors by at most cond(G + λI), and the check
//! below prints the worst error it saw.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::NormalEquations;
use rku_engine::io::text::Tokenizer;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::CalibSource;
use rku_engine::prune::calibrate::Sequence;
use rku_engine::prune::refit::{refit, refit_sequences, solve_layer, RefitSpec, RefitTarget};
use rku_engine::prune::EnergyAt;
use std::collections::HashMap;
use std::path::Path;

const DAMP: f64 = 0.01;

/// `rku-engine prune --model MODEL --sparsity 0.3 ARGS… --out OUT`.
fn prune(model: &Path, args: &[&str], out: &Path) -> std::process::Command {
    let mut c = bin();
    c.args(["prune", "--model"])
        .arg(model)
        .args(["--sparsity", "0.3"])
        .args(args)
        .arg("--out")
        .arg(out);
    c
}

struct Fixture {
    model: Model<CpuBackend>,
    be: CpuBackend,
    refs: HashMap<String, RefTensor>,
    ids: Vec<u32>,
    t: usize,
    kept: Vec<Vec<usize>>,
}

fn load(name: &str) -> Fixture {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture(name)).unwrap();
    let refs = load_reference(&fixture(&format!("refit/{name}.safetensors")));
    let ids_t = &refs["ids"];
    let t = ids_t.shape[1];
    let ids = ids_t.data.iter().map(|&v| v as u32).collect();
    let kept = (0..model.cfg.layers)
        .map(|l| {
            refs[&format!("kept.{l}")]
                .data
                .iter()
                .map(|&v| v as usize)
                .collect()
        })
        .collect();
    Fixture {
        model,
        be,
        refs,
        ids,
        t,
        kept,
    }
}

const CASES: [(&str, RefitTarget, bool); 4] = [
    ("layer", RefitTarget::Layer, false),
    ("layer-bias", RefitTarget::Layer, true),
    ("residual", RefitTarget::Residual, false),
    ("residual-bias", RefitTarget::Residual, true),
];

/// The engine's whole refit against the reference, every case and layer;
/// returns the worst relative error of the refitted columns.
fn check_against_reference(name: &str) -> f64 {
    let f = load(name);
    let mut worst = 0f64;
    for (case, target, bias) in CASES {
        let spec = RefitSpec {
            target,
            bias,
            damp: DAMP,
        };
        // Batches of 4 windows: the 6 reference windows take two passes.
        let (layers, _) = refit(&f.be, &f.model, &f.kept, &f.ids, f.t, 4, spec).unwrap();
        for (l, got) in layers.iter().enumerate() {
            let key = |what: &str| format!("{case}.{what}.{l}");
            let what = format!("{name} {case} layer {l}");
            let want_refitted = f.refs[&key("refitted")].data[0] == 1.0;
            assert_eq!(got.refitted, want_refitted, "{what}: refitted");
            let w = got.w_down.iter().map(|&v| v as f64).collect::<Vec<_>>();
            let e = max_rel_err(&w, &f.refs[&key("w_down")].data);
            worst = worst.max(e);
            assert!(e <= 1e-5, "{what}: down_proj differs by {e:e} relative");
            if bias {
                let b: Vec<f64> = got
                    .bias
                    .as_ref()
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let e = max_rel_err(&b, &f.refs[&key("bias")].data);
                assert!(e <= 1e-5, "{what}: bias differs by {e:e} relative");
            } else {
                assert!(got.bias.is_none());
            }
            let err = &f.refs[&key("err")].data;
            let e = max_rel_err(&[got.err_zeroed, got.err_refit], err);
            assert!(
                e <= 1e-5,
                "{what}: reconstruction errors {got:?} vs {err:?}"
            );
            // The refit never raises a layer's calibration reconstruction error.
            assert!(got.err_refit <= got.err_zeroed, "{what}: error raised");
        }
    }
    println!("{name}: worst refitted-column error {worst:.3e} relative");
    worst
}

#[test]
fn refit_matches_pytorch_tiny_llama3() {
    check_against_reference("tiny-llama3");
}

#[test]
fn refit_matches_pytorch_tiny_qwen2() {
    check_against_reference("tiny-qwen2");
}

/// `solve_layer` on the reference's own normal equations gives the
/// reference's solution (the damped Cholesky solve, in f64, alone).
#[test]
fn solve_matches_pytorch_on_the_same_normal_equations() {
    for name in ["tiny-llama3", "tiny-qwen2"] {
        let f = load(name);
        let d = f.model.cfg.hidden;
        for (case, _, bias) in CASES {
            for (l, keep) in f.kept.iter().enumerate() {
                let key = |what: &str| format!("{case}.{what}.{l}");
                let m = f.model.cfg.ffn_widths[l];
                let w_down = f
                    .model
                    .files
                    .get(&format!("model.layers.{l}.mlp.down_proj.weight"), &[d, m])
                    .unwrap()
                    .to_f32()
                    .unwrap();
                let eqs = NormalEquations {
                    width: keep.len() + bias as usize,
                    d,
                    g: f.refs[&key("g")].data.clone(),
                    c: f.refs[&key("c")].data.clone(),
                    rr: f.refs[&key("rr")].data[0],
                };
                let got = solve_layer(l, &eqs, &w_down, m, keep, DAMP).unwrap();
                let w: Vec<f64> = got.w_down.iter().map(|&v| v as f64).collect();
                // The engine's solution is stored as f32: 2⁻²⁴ relative.
                let e = max_rel_err(&w, &f.refs[&key("w_down")].data);
                assert!(e <= 1e-7, "{name} {case} layer {l}: {e:e}");
                let err = &f.refs[&key("err")].data;
                let e = max_rel_err(&[got.err_zeroed, got.err_refit], err);
                assert!(e <= 1e-9, "{name} {case} layer {l}: errors {e:e}");
            }
        }
    }
}

/// With every channel kept, the `layer` target's solution is W_d itself,
/// up to the damping: X = (G + λI)⁻¹·G·W_dᵀ = W_dᵀ − λ(G + λI)⁻¹W_dᵀ. W_d
/// is also the zeroed solution X₀, with error 0, so wherever the damped X
/// is worse the layer keeps W_d exactly (`refitted` false); either way the
/// result is W_d to within the damping's pull and f32 rounding.
#[test]
fn all_channels_kept_returns_w_down() {
    let f = load("tiny-llama3");
    let (d, layers) = (f.model.cfg.hidden, f.model.cfg.layers);
    let all: Vec<Vec<usize>> = (0..layers)
        .map(|l| (0..f.model.cfg.ffn_widths[l]).collect())
        .collect();
    for damp in [1e-2, 1e-8] {
        let spec = RefitSpec {
            target: RefitTarget::Layer,
            bias: false,
            damp,
        };
        let (out, _) = refit(&f.be, &f.model, &all, &f.ids, f.t, 6, spec).unwrap();
        for (l, r) in out.iter().enumerate() {
            let m = f.model.cfg.ffn_widths[l];
            let w_down = f
                .model
                .files
                .get(&format!("model.layers.{l}.mlp.down_proj.weight"), &[d, m])
                .unwrap()
                .to_f32()
                .unwrap();
            let want: Vec<f64> = w_down.iter().map(|&v| v as f64).collect();
            let got: Vec<f64> = r.w_down.iter().map(|&v| v as f64).collect();
            let e = max_rel_err(&got, &want);
            println!(
                "damp {damp:e}, layer {l}: |W' − W_d| = {e:.3e} of max|W_d| (refitted: {})",
                r.refitted
            );
            assert!(e <= 1e-5, "damp {damp:e} layer {l}: {e:e}");
            assert!(r.err_refit <= r.err_zeroed);
        }
    }
}

/// The solve runs on all of the rayon pool's threads (faer): it must give
/// the same bits every run and on one thread as on all, or a refitted
/// export would depend on the machine (and `prune --backend cuda-emu` would
/// no longer write `--backend cpu`'s bytes). 600 kept channels are past
/// faer's 128-column Cholesky blocks, whose trailing updates are the
/// products it splits across threads.
#[test]
fn the_threaded_solve_is_deterministic() {
    let (k, d, m) = (600, 96, 700);
    let eqs = common::synthetic_normal_equations(k, d, 7);
    let w_down = common::values(d * m, -1.0, 1.0, 9);
    let keep: Vec<usize> = (0..k).map(|i| i + i / 6).collect();
    let solve = || solve_layer(0, &eqs, &w_down, m, &keep, 0.01).unwrap();
    let first = solve();
    assert!(first.refitted && first.err_refit < first.err_zeroed);
    let again = solve();
    assert_eq!(first.w_down, again.w_down);
    assert_eq!(
        (first.err_zeroed, first.err_refit),
        (again.err_zeroed, again.err_refit)
    );
    faer::set_global_parallelism(faer::Par::Seq);
    let one_thread = solve();
    faer::set_global_parallelism(faer::Par::rayon(0));
    assert_eq!(first.w_down, one_thread.w_down);
}

/// A Gram matrix that is zero (dead channels: no calibration signal) stays
/// singular after damping, since λ scales with its diagonal: a named error.
#[test]
fn singular_gram_is_an_error_naming_the_layer() {
    let (d, m, keep) = (3, 4, vec![0, 2]);
    let eqs = NormalEquations::zeros(keep.len(), d);
    let err = solve_layer(5, &eqs, &[0.5; 12], m, &keep, 0.01)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 5") && err.contains("singular"), "{err}");
}

#[test]
fn bad_refit_flags_are_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    let text = calib_text(tmp.path(), 40);
    let calib = text.to_str().unwrap();
    let out = tmp.path().join("never-written");
    for damp in ["0", "-1", "nan", "inf", "x"] {
        let damp = format!("--refit-damp={damp}");
        let err = run_err(&mut prune(
            &model,
            &["--calib", calib, "--refit", &damp],
            &out,
        ));
        assert!(err.contains("--refit-damp"), "{damp}: {err}");
    }
    // --refit-bias without --refit.
    let err = run_err(&mut prune(
        &model,
        &["--calib", calib, "--refit-bias"],
        &out,
    ));
    assert!(err.contains("--refit"), "{err}");
    assert!(!out.exists());
}

/// `prune --stats S --refit` has no text to refit on unless --refit-calib
/// names one; and a model that already has a down_proj bias is refused.
#[test]
fn refit_needs_text_and_a_bias_free_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    let text = calib_text(tmp.path(), 40);
    let stats = tmp.path().join("s.safetensors");
    let calib = ["--samples", "4", "--seq-len", "16"];
    run_ok(
        bin()
            .args(["score", "--model"])
            .arg(&model)
            .arg("--calib")
            .arg(&text)
            .args(calib)
            .arg("--out")
            .arg(&stats),
    );
    let out = tmp.path().join("p");
    let flap_stats = ["--method", "flap", "--stats", stats.to_str().unwrap()];
    let err = run_err(&mut prune(
        &model,
        &[&flap_stats[..], &["--refit"]].concat(),
        &out,
    ));
    assert!(err.contains("--refit-calib"), "{err}");
    assert!(!out.exists());
    // FLAP without a refit writes a down_proj bias; refitting that model is refused.
    run_ok(&mut prune(&model, &flap_stats, &out));
    let again = tmp.path().join("q");
    let refit_text = [&["--calib", text.to_str().unwrap(), "--refit"], &calib[..]].concat();
    let err = run_err(&mut prune(&out, &refit_text, &again));
    assert!(err.contains("down_proj bias"), "{err}");
    assert!(!again.exists());
}

/// A refitted export: the refitted columns (and bias) are what the model
/// directory holds, pruning.json records the refit, and a FLAP refit gets
/// no bias compensation on top.
#[test]
fn prune_refit_exports_the_refitted_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    let text = calib_text(tmp.path(), 40);
    let out = tmp.path().join("p");
    let args = [
        "--calib",
        text.to_str().unwrap(),
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--batch",
        "3",
        "--method",
        "flap",
        "--refit",
        "residual",
        "--refit-bias",
        "--refit-damp",
        "0.05",
    ];
    run_ok(&mut prune(&model, &args, &out));
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pruning.json")).unwrap()).unwrap();
    let r = &rec["refit"];
    assert_eq!(r["target"], "residual");
    assert_eq!(r["bias"], true);
    assert_eq!(r["damp"], 0.05);
    assert_eq!(r["calibration"]["samples"], 4);
    assert_eq!(r["layers"].as_array().unwrap().len(), 3);
    assert_eq!(rec["flap_bias_compensation"], false);
    // The same refit through the library, on the same windows and mask.
    let be = CpuBackend::new();
    let dense = Model::load(&be, &model).unwrap();
    let source = CalibSource {
        path: text.clone(),
        field: None,
        samples: 4,
        seq_len: 16,
        bos: Some(false),
        batch: 3,
        energy_at: EnergyAt::FinalNorm,
        activation_memory: Default::default(),
        layer_major: None,
    };
    let (ids, digest) = source
        .windows(&dense, &Tokenizer::load(&model).unwrap())
        .unwrap();
    assert_eq!(r["calibration"]["digest"], digest);
    let kept: Vec<Vec<usize>> = serde_json::from_value(rec["kept"].clone()).unwrap();
    let spec = RefitSpec {
        target: RefitTarget::Residual,
        bias: true,
        damp: 0.05,
    };
    let (want, _) = refit(&be, &dense, &kept, &ids, 16, 3, spec).unwrap();
    let pruned = Model::load(&be, &out).unwrap();
    let d = pruned.cfg.hidden;
    for (l, want) in want.iter().enumerate() {
        let k = kept[l].len();
        let tensor = |leaf: &str, shape: &[usize]| {
            let name = format!("model.layers.{l}.mlp.down_proj.{leaf}");
            pruned.files.get(&name, shape).unwrap().to_f32().unwrap()
        };
        // An f32 model is written as computed, bit for bit.
        assert_eq!(
            tensor("weight", &[d, k]),
            want.w_down,
            "layer {l}: down_proj"
        );
        assert_eq!(
            &tensor("bias", &[d]),
            want.bias.as_ref().unwrap(),
            "layer {l}: bias"
        );
    }
    // `--layer-major`: scoring and the refit with their streams on the
    // host write the same weights, byte for byte.
    let lm_out = tmp.path().join("p-layer-major");
    let lm_args: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--layer-major", "--host-memory", "1G"])
        .collect();
    let o = prune(&model, &lm_args, &lm_out).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && log.contains("refit: layer-major"),
        "{log}"
    );
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        weights(&lm_out) == weights(&out),
        "layer-major refit wrote other weights"
    );
}

/// The traces reference of scripts/make_refit_trace_fixtures.py: its
/// sequences (counted from their prompt's end), kept channels and values.
fn trace_reference() -> (Vec<Sequence>, Vec<Vec<usize>>, HashMap<String, RefTensor>) {
    let r = load_reference(&fixture("refit/tiny-llama3-traces.safetensors"));
    let seqs = (0..)
        .map_while(|i| {
            let ids = r.get(&format!("seq.{i}.ids"))?;
            Some(Sequence {
                ids: ids.data.iter().map(|&x| x as u32).collect(),
                counted_from: r[&format!("seq.{i}.prompt")].data[0] as usize,
            })
        })
        .collect();
    let kept = (0..)
        .map_while(|l| r.get(&format!("kept.{l}")))
        .map(|k| k.data.iter().map(|&v| v as usize).collect())
        .collect();
    (seqs, kept, r)
}

/// The refit over traces with `--tokens generated` (prompt rows context
/// only, sequences of their own lengths, one with no generated token)
/// against PyTorch, every case and layer, one sequence per pass and
/// equal lengths sharing one.
#[test]
fn refit_on_generated_tokens_matches_pytorch() {
    let (seqs, kept, r) = trace_reference();
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let mut worst = 0f64;
    for batch in [1, 4] {
        for (case, target, bias) in CASES {
            let spec = RefitSpec {
                target,
                bias,
                damp: DAMP,
            };
            let (layers, _) =
                refit_sequences(&be, &model, &kept, &seqs, batch, spec, None).unwrap();
            for (l, got) in layers.iter().enumerate() {
                let key = |what: &str| format!("{case}.{what}.{l}");
                let what = format!("batch {batch} {case} layer {l}");
                assert_eq!(
                    got.refitted,
                    r[&key("refitted")].data[0] == 1.0,
                    "{what}: refitted"
                );
                let w: Vec<f64> = got.w_down.iter().map(|&v| v as f64).collect();
                let e = max_rel_err(&w, &r[&key("w_down")].data);
                worst = worst.max(e);
                assert!(e <= 1e-4, "{what}: down_proj differs by {e:e} relative");
                if bias {
                    let b: Vec<f64> = got
                        .bias
                        .as_ref()
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    let e = max_rel_err(&b, &r[&key("bias")].data);
                    assert!(e <= 1e-4, "{what}: bias differs by {e:e} relative");
                }
                let e = max_rel_err(&[got.err_zeroed, got.err_refit], &r[&key("err")].data);
                assert!(e <= 1e-4, "{what}: reconstruction errors differ by {e:e}");
            }
        }
    }
    println!("worst refitted-column error {worst:.3e} relative");
}

/// `got` = `want` bit for bit (an f32 model is written as computed).
fn bit_equal(got: &[f32], want: &[f32], l: usize) {
    assert_eq!(got.len(), want.len(), "layer {l}");
    let differ = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != b.to_bits());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(
        differ.count(),
        0,
        "layer {l}: values differ, by up to {worst:e}"
    );
}

/// Ids of the tiny fixtures' vocabulary, seeded.
fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut next = xorshift(seed);
    (0..n).map(|_| (next() % 200) as u32 + 1).collect()
}

/// `prune --refit-traces` over traces of equal length counting every
/// token is the refit over the same ids as windows, bit for bit; with
/// `--tokens generated` it is `refit_sequences` counting from each
/// prompt's end; pruning.json names the traces file, selection and rule.
#[test]
fn prune_refit_traces_equals_the_library_refit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    let digest = rku_engine::io::traces::tokenizer_digest(&model).unwrap();
    let be = CpuBackend::new();
    let dense = Model::load(&be, &model).unwrap();
    let d = dense.cfg.hidden;
    // Equal lengths: 5 traces of 4 + 12 tokens.
    let equal: Vec<(Vec<u32>, Vec<u32>)> = (0..5)
        .map(|i| {
            let s = ids(16, 11 + i);
            (s[..4].to_vec(), s[4..].to_vec())
        })
        .collect();
    let traces = tmp.path().join("t.jsonl");
    write_trace_file(&traces, &digest, &equal);
    let tr = traces.to_str().unwrap();
    let exported = |out: &Path, l: usize, leaf: &str, shape: &[usize]| {
        let pruned = Model::load(&be, out).unwrap();
        let name = format!("model.layers.{l}.mlp.down_proj.{leaf}");
        pruned.files.get(&name, shape).unwrap().to_f32().unwrap()
    };
    let record = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("pruning.json")).unwrap()).unwrap()
    };
    let out = tmp.path().join("all");
    run_ok(&mut prune(
        &model,
        &[
            "--traces",
            tr,
            "--refit",
            "--refit-traces",
            tr,
            "--batch",
            "2",
        ],
        &out,
    ));
    let rec = record(&out);
    let cal = &rec["refit"]["calibration"];
    assert_eq!(cal["traces"]["digest"], file_sha256(&traces));
    assert_eq!(cal["traces"]["selection"], "all");
    assert_eq!(cal["traces"]["tokens"], "all");
    assert_eq!(cal["samples"], 5);
    assert_eq!(cal["seq_len"], 16);
    assert_eq!(cal["tokens"], 80);
    let kept: Vec<Vec<usize>> = serde_json::from_value(rec["kept"].clone()).unwrap();
    let windows: Vec<u32> = equal
        .iter()
        .flat_map(|(p, g)| [&p[..], g].concat())
        .collect();
    let spec = RefitSpec {
        target: RefitTarget::Layer,
        bias: false,
        damp: DAMP,
    };
    let (want, _) = refit(&be, &dense, &kept, &windows, 16, 2, spec).unwrap();
    for (l, want) in want.iter().enumerate() {
        let k = kept[l].len();
        bit_equal(&exported(&out, l, "weight", &[d, k]), &want.w_down, l);
    }

    // Generated tokens only, lengths of their own, a residual refit with a bias.
    let varied: Vec<(Vec<u32>, Vec<u32>)> = [(3, 9), (5, 4), (2, 10), (4, 6)]
        .iter()
        .enumerate()
        .map(|(i, &(p, g))| {
            let s = ids(p + g, 31 + i as u64);
            (s[..p].to_vec(), s[p..].to_vec())
        })
        .collect();
    let traces2 = tmp.path().join("v.jsonl");
    write_trace_file(&traces2, &digest, &varied);
    let text = calib_text(tmp.path(), 40);
    let out = tmp.path().join("gen");
    let args = [
        "--calib",
        text.to_str().unwrap(),
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--refit",
        "residual",
        "--refit-bias",
        "--refit-traces",
        traces2.to_str().unwrap(),
        "--tokens",
        "generated",
        "--max-seq-len",
        "10",
    ];
    run_ok(&mut prune(&model, &args, &out));
    let rec = record(&out);
    let cal = &rec["refit"]["calibration"];
    assert_eq!(cal["traces"]["digest"], file_sha256(&traces2));
    assert_eq!(cal["traces"]["tokens"], "generated");
    // Cut to 10 tokens: 7 + 4 + 8 + 6 generated tokens count.
    assert_eq!(cal["tokens"], 25);
    assert_eq!(cal["seq_len"], 10);
    let kept: Vec<Vec<usize>> = serde_json::from_value(rec["kept"].clone()).unwrap();
    let seqs: Vec<Sequence> = varied
        .iter()
        .map(|(p, g)| {
            let mut ids = [&p[..], g].concat();
            ids.truncate(10);
            Sequence {
                ids,
                counted_from: p.len(),
            }
        })
        .collect();
    let spec = RefitSpec {
        target: RefitTarget::Residual,
        bias: true,
        damp: DAMP,
    };
    // The CLIs default --batch 4: the three sequences of 10 tokens share a pass.
    let (want, _) = refit_sequences(&be, &dense, &kept, &seqs, 4, spec, None).unwrap();
    for (l, want) in want.iter().enumerate() {
        let k = kept[l].len();
        bit_equal(&exported(&out, l, "weight", &[d, k]), &want.w_down, l);
        bit_equal(
            &exported(&out, l, "bias", &[d]),
            want.bias.as_ref().unwrap(),
            l,
        );
    }
}

/// `--refit-traces` refuses, before scoring or writing anything:
/// `--refit-calib` too, a selection that keeps no trace, traces of
/// another tokenizer, and trace flags with no traces file to apply to.
#[test]
fn refit_traces_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama3");
    let digest = rku_engine::io::traces::tokenizer_digest(&model).unwrap();
    let text = calib_text(tmp.path(), 40);
    let calib = text.to_str().unwrap();
    let one = vec![(ids(4, 3), ids(8, 5))];
    let traces = tmp.path().join("t.jsonl");
    write_trace_file(&traces, &digest, &one);
    let other = tmp.path().join("other.jsonl");
    write_trace_file(&other, &"0".repeat(64), &one);
    let (tr, ot) = (traces.to_str().unwrap(), other.to_str().unwrap());
    let out = tmp.path().join("never-written");
    let base = [
        "--calib",
        calib,
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--refit",
    ];
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--refit-traces", tr, "--refit-calib", calib],
            &["--refit-calib"],
        ),
        (
            &["--refit-traces", tr, "--select", "correct"],
            &["t.jsonl", "keeps none", "gold"],
        ),
        (
            &["--refit-traces", ot],
            &["other.jsonl", "another tokenizer"],
        ),
        (&["--tokens", "generated"], &["--tokens", "--refit-traces"]),
        (
            &["--refit-traces", tr, "--max-seq-len", "1"],
            &["--max-seq-len 1"],
        ),
    ];
    for (extra, words) in cases {
        let err = run_err(&mut prune(&model, &[&base[..], extra].concat(), &out));
        for w in words {
            assert!(err.contains(w), "{extra:?}: {err}");
        }
        assert!(
            !err.contains("tokens/s"),
            "{extra:?}: scored before refusing: {err}"
        );
    }
    // --refit-traces without --refit.
    let err = run_err(&mut prune(
        &model,
        &["--calib", calib, "--refit-traces", tr],
        &out,
    ));
    assert!(err.contains("--refit"), "{err}");
    assert!(!out.exists());
}

/// Gemma 3 (tiny-gemma3): the `layer` target runs through the model's
/// post-FFN norms (x' advances by norm(W'·h_K)); keeping every channel
/// returns W_d, pruning never raises a layer's reconstruction error; the
/// `residual` target, whose y is a norm's output there, is refused by name.
#[test]
fn refit_on_gemma3() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-gemma3")).unwrap();
    let r = load_reference(&fixture("tiny-gemma3").join("reference.safetensors"));
    let (d, layers, t) = (model.cfg.hidden, model.cfg.layers, 16);
    let ids = ids(6 * t, 7);
    let spec = |target| RefitSpec {
        target,
        bias: false,
        damp: DAMP,
    };
    let all: Vec<Vec<usize>> = (0..layers)
        .map(|l| (0..model.cfg.ffn_widths[l]).collect())
        .collect();
    let (out, _) = refit(&be, &model, &all, &ids, t, 4, spec(RefitTarget::Layer)).unwrap();
    for (l, got) in out.iter().enumerate() {
        let m = model.cfg.ffn_widths[l];
        let name = format!("model.layers.{l}.mlp.down_proj.weight");
        let w_down = model.files.get(&name, &[d, m]).unwrap().to_f32().unwrap();
        let want: Vec<f64> = w_down.iter().map(|&v| v as f64).collect();
        let got: Vec<f64> = got.w_down.iter().map(|&v| v as f64).collect();
        let e = max_rel_err(&got, &want);
        assert!(e <= 1e-5, "layer {l}: |W' − W_d| = {e:e}");
    }
    let kept: Vec<Vec<usize>> = (0..layers)
        .map(|l| {
            r[&format!("keep.{l}")]
                .data
                .iter()
                .map(|&v| v as usize)
                .collect()
        })
        .collect();
    let (out, _) = refit(&be, &model, &kept, &ids, t, 4, spec(RefitTarget::Layer)).unwrap();
    for (l, got) in out.iter().enumerate() {
        println!(
            "layer {l}: error {:.4e} zeroed, {:.4e} refitted",
            got.err_zeroed, got.err_refit
        );
        assert!(
            got.err_refit <= got.err_zeroed && got.err_zeroed > 0.0,
            "layer {l}"
        );
    }
    assert!(out
        .iter()
        .any(|l| l.refitted && l.err_refit < 0.9 * l.err_zeroed));
    let e = refit(&be, &model, &kept, &ids, t, 4, spec(RefitTarget::Residual))
        .expect_err("residual refused")
        .to_string();
    assert!(
        e.contains("residual") && e.contains("Gemma3ForCausalLM"),
        "{e}"
    );
}

/// With fewer than twice as many calibration rows as kept channels the
/// refit says that it tends to fit the calibration set (4 windows of 16
/// tokens for about 45 kept channels); with enough rows it says nothing.
#[test]
fn refit_notes_too_few_rows_for_its_unknowns() {
    let tmp = tempfile::tempdir().unwrap();
    let text = calib_text(tmp.path(), 40);
    for (samples, noted) in [("4", true), ("8", false)] {
        let out = tmp.path().join(format!("p{samples}"));
        let args = [
            "--calib",
            text.to_str().unwrap(),
            "--samples",
            samples,
            "--seq-len",
            "16",
            "--refit",
        ];
        let o = prune(&fixture("tiny-llama3"), &args, &out)
            .output()
            .unwrap();
        assert!(o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            err.contains("note: the refit fits"),
            noted,
            "{samples}: {err}"
        );
    }
}
