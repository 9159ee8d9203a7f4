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
use rku_engine::prune::refit::{refit, solve_layer, RefitSpec, RefitTarget};
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
        bos: false,
        batch: 3,
        energy_at: EnergyAt::FinalNorm,
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
}
