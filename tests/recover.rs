//! LoRA distillation recovery (METHODS.md §10) against the independent
//! PyTorch reference of scripts/make_lora_fixtures.py (tests/fixtures/lora/).
//!
//! Tolerances. The reference runs in float64; the engine in f32, so
//! gradients agree to float32 rounding amplified through three layers
//! (1e-4 relative to each tensor's scale, the issue's bound). AdamW and
//! clipping are elementwise f32 in both: 1e-6.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::{AdamwStep, Backend};
use rku_engine::model::forward::{forward_with, logits, Geometry, Keep};
use rku_engine::model::lora::{Adapters, Proj};
use rku_engine::model::Model;
use rku_engine::prune::calibrate::Sequence;
use rku_engine::recover::export::export_recovered;
use rku_engine::recover::step::{
    clip_factor, init_adapters, loss_and_grads, loss_sum_and_grads, step_loss_and_grads,
    RecoverLoss,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The fixture's adapters, their scale s = α / r, ids and geometry.
fn fixture_adapters(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    refs: &HashMap<String, RefTensor>,
) -> (Adapters<CpuBackend>, f32, Vec<u32>, Geometry) {
    let rank = refs["rank"].data[0] as usize;
    let scale = (refs["alpha"].data[0] / rank as f64) as f32;
    let ad = Adapters::build(be, &model.cfg, rank, |l, p, _, _| {
        Ok((
            f32s(&refs[&format!("lora_a.{l}.{}", p.name())].data),
            f32s(&refs[&format!("lora_b.{l}.{}", p.name())].data),
        ))
    })
    .unwrap();
    let ids_t = &refs["ids"];
    let geo = Geometry {
        seqs: ids_t.shape[0],
        t: ids_t.shape[1],
    };
    let ids = ids_t.data.iter().map(|&v| v as u32).collect();
    (ad, scale, ids, geo)
}

/// Loss and every adapter gradient of `loss` equal autograd's (the student
/// is the fixture model with the fixture's adapters, the teacher the same
/// model without them).
fn check_grads(name: &str, loss: RecoverLoss) {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture(name)).unwrap();
    let refs = load_reference(&fixture(&format!("lora/{name}.safetensors")));
    let (ad, scale, ids, geo) = fixture_adapters(&be, &model, &refs);
    let mut grads = ad.zeros_like(&be).unwrap();
    let got = loss_and_grads(
        &be,
        &model,
        Some(&model),
        (&ad, scale),
        &mut grads,
        &ids,
        geo,
        loss,
        u64::MAX, // every layer's activations kept
    )
    .unwrap();
    let key = loss.name();
    let want = refs[&format!("{key}.loss")].data[0];
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "{name} {key} loss {got} vs {want}"
    );
    let mut worst = 0f64;
    for (l, row) in grads.layers.iter().enumerate() {
        for (p, g) in Proj::ALL.iter().zip(row) {
            for (which, buf) in [("a", &g.a), ("b", &g.b)] {
                let want = &refs[&format!("{key}.grad_{which}.{l}.{}", p.name())].data;
                let got = f64s(&be.download(buf).unwrap());
                assert!(want.iter().any(|&v| v != 0.0));
                let err = max_rel_err(&got, want);
                worst = worst.max(err);
                assert!(
                    err < 1e-4,
                    "{name} {key} ∂{which} layer {l} {}: {err:e}",
                    p.name()
                );
            }
        }
    }
    println!("{name} {key}: loss {got} (torch {want}), worst gradient error {worst:e}");
}

#[test]
fn kd_gradients_match_autograd_llama3() {
    check_grads("tiny-llama3", RecoverLoss::Kd);
}

#[test]
fn kd_gradients_match_autograd_qwen2() {
    check_grads("tiny-qwen2", RecoverLoss::Kd);
}

/// Gemma 3: the adapters' gradients flow through the post-attention and
/// post-FFN norms, GeGLU and the local/global attention.
#[test]
fn kd_and_ce_gradients_match_autograd_gemma3() {
    check_grads("tiny-gemma3", RecoverLoss::Kd);
    check_grads("tiny-gemma3", RecoverLoss::Ce);
}

#[test]
fn ce_gradients_match_autograd() {
    check_grads("tiny-llama3", RecoverLoss::Ce);
    check_grads("tiny-qwen2", RecoverLoss::Ce);
}

#[test]
fn adamw_steps_match_torch() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let h = &refs["adamw.hyper"].data;
    let mut p = be.upload(&f32s(&refs["adamw.p0"].data)).unwrap();
    let n = refs["adamw.p0"].data.len();
    let (mut m, mut v) = (be.zeros(n).unwrap(), be.zeros(n).unwrap());
    for t in 1..=3u64 {
        let g = be
            .upload(&f32s(&refs[&format!("adamw.g.{t}")].data))
            .unwrap();
        let step = AdamwStep {
            lr: h[0],
            beta1: h[1],
            beta2: h[2],
            eps: h[3],
            weight_decay: h[4],
            step: t,
            grad_scale: 1.0,
        };
        be.adamw(&mut p, &g, &mut m, &mut v, n, step).unwrap();
        for (what, buf) in [("p", &p), ("m", &m), ("v", &v)] {
            let want = &refs[&format!("adamw.{what}.{t}")].data;
            let err = max_rel_err(&f64s(&be.download(buf).unwrap()), want);
            assert!(err < 1e-6, "AdamW step {t} {what}: {err:e}");
        }
    }
}

#[test]
fn clipping_matches_clip_grad_norm() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let grads: Vec<Vec<f32>> = (0..3)
        .map(|j| f32s(&refs[&format!("clip.g.{j}")].data))
        .collect();
    let sq: f64 = grads
        .iter()
        .map(|g| be.sum_squares(&be.upload(g).unwrap(), g.len()).unwrap())
        .sum();
    let norm = sq.sqrt();
    let want_norm = refs["clip.norm"].data[0];
    assert!(
        ((norm - want_norm) / want_norm).abs() < 1e-6,
        "{norm} vs {want_norm}"
    );
    let factor = clip_factor(norm, Some(1.0));
    assert!(factor < 1.0);
    for (j, g) in grads.iter().enumerate() {
        let got: Vec<f64> = g.iter().map(|&x| (x * factor) as f64).collect();
        let err = max_rel_err(&got, &refs[&format!("clip.out.{j}")].data);
        assert!(err < 1e-6, "clipped gradient {j}: {err:e}");
    }
    assert_eq!(clip_factor(norm, None), 1.0);
    assert_eq!(clip_factor(0.5, Some(1.0)), 1.0);
}

#[test]
fn kl_div_matches_torch() {
    let be = CpuBackend::new();
    let refs = load_reference(&fixture("lora/optim.safetensors"));
    let (rows, d) = (refs["kl.z"].shape[0], refs["kl.z"].shape[1]);
    let vocab = refs["kl.w"].shape[0];
    let up = |k: &str| be.upload(&f32s(&refs[k].data)).unwrap();
    let weight = |k: &str| be.upload_weight(&f32s(&refs[k].data)).unwrap();
    let counted: Vec<bool> = refs["kl.counted"].data.iter().map(|&c| c != 0.0).collect();
    let count = counted.iter().filter(|&&c| c).count();
    let (w, wt) = (weight("kl.w"), weight("kl.w_t"));
    let (sum, n, dz) = be
        .kl_div(
            &up("kl.z"),
            &w,
            &up("kl.z_t"),
            &wt,
            &counted,
            rows,
            d,
            vocab,
            1.0 / count as f32,
            true,
        )
        .unwrap();
    assert_eq!(n, count);
    let want = refs["kl.sum"].data[0];
    assert!(((sum - want) / want).abs() < 1e-5, "Σ KL {sum} vs {want}");
    let err = max_rel_err(
        &f64s(&be.download(&dz.unwrap()).unwrap()),
        &refs["kl.dz"].data,
    );
    assert!(err < 1e-5, "dz: {err:e}");
}

/// Deterministic adapters for `model` (A and B both nonzero, so merging
/// changes every adapted matrix).
fn seeded_adapters(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    rank: usize,
) -> Adapters<CpuBackend> {
    let mut seed = 7u64;
    Adapters::build(be, &model.cfg, rank, |_, _, inp, out| {
        seed += 1;
        Ok((
            values(rank * inp, -0.3, 0.3, seed),
            values(out * rank, -0.05, 0.05, seed + 1000),
        ))
    })
    .unwrap()
}

/// The recovered export of the committed uniform-width export (the
/// student), with seeded adapters of rank 4 merged at scale 2.
fn recovered_export(dir: &std::path::Path) -> (Model<CpuBackend>, Adapters<CpuBackend>) {
    let be = CpuBackend::new();
    let student = Model::load(&be, &fixture("exports/llama3-uniform")).unwrap();
    let ad = seeded_adapters(&be, &student, 4);
    export_recovered(&be, &student, &ad, 2.0, &serde_json::json!({}), dir, false).unwrap();
    (student, ad)
}

/// Merging the adapters changes nothing: the exported model's logits equal
/// the adapter forward's on the student (1e-5 of the logits' scale).
#[test]
fn merged_export_equals_the_adapter_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recovered");
    let (student, ad) = recovered_export(&out);
    let be = CpuBackend::new();
    let merged = Model::load(&be, &out).unwrap();
    let refs = load_reference(&fixture("tiny-llama3/reference.safetensors"));
    let ids_t = &refs["input_ids"];
    let geo = Geometry {
        seqs: ids_t.shape[0],
        t: ids_t.shape[1],
    };
    let ids: Vec<u32> = ids_t.data.iter().map(|&x| x as u32).collect();
    let fwd = forward_with(&be, &student, Some((&ad, 2.0)), &ids, geo, Keep::OUTPUT).unwrap();
    let c = &student.cfg;
    let head = be
        .linear(
            &fwd.z,
            student.lm_head(&be).unwrap(),
            None,
            geo.rows(),
            c.hidden,
            c.vocab,
        )
        .unwrap();
    let want = f64s(&be.download(&head).unwrap());
    let got = f64s(&logits(&be, &merged, &ids, geo).unwrap());
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-5, "merged vs adapter logits: {err:e}");
    let dense = f64s(&logits(&be, &student, &ids, geo).unwrap());
    assert!(
        max_rel_err(&dense, &want) > 1e-3,
        "the adapters change nothing"
    );
}

/// The recovered uniform-width export loads in stock transformers and gives
/// the engine's logits: its files are committed under
/// tests/fixtures/exports/llama3-uniform-recovered (written by this test
/// with RKU_WRITE_EXPORT_FIXTURES=1) with transformers' logits on them
/// (scripts/check_exports_transformers.py).
#[test]
fn stock_transformers_loads_a_recovered_export() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("recovered");
    recovered_export(&out);
    let committed = fixture("exports/llama3-uniform-recovered");
    if std::env::var_os("RKU_WRITE_EXPORT_FIXTURES").is_some() {
        std::fs::create_dir_all(&committed).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(out.join(f), committed.join(f)).unwrap();
        }
    }
    for f in ["model.safetensors", "config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(committed.join(f)).unwrap(),
            "{f} differs from the committed export"
        );
    }
    let r = load_reference(&committed.join("transformers_logits.safetensors"));
    let ids_t = &r["input_ids"];
    let geo = Geometry {
        seqs: ids_t.shape[0],
        t: ids_t.shape[1],
    };
    let ids: Vec<u32> = ids_t.data.iter().map(|&x| x as u32).collect();
    let be = CpuBackend::new();
    let model = Model::load(&be, &out).unwrap();
    let got = f64s(&logits(&be, &model, &ids, geo).unwrap());
    let err = max_rel_err(&got, &r["logits"].data);
    assert!(err < 1e-5, "engine vs transformers logits: {err:e}");
}

/// A pruned tiny-llama3 (30%, compact) and calibration text in `dir`.
fn pruned_student(dir: &Path) -> (PathBuf, PathBuf) {
    let text = calib_text(dir, 400);
    let out = dir.join("p30");
    run_ok(
        bin()
            .args(["prune", "--model"])
            .arg(fixture("tiny-llama3"))
            .arg("--calib")
            .arg(&text)
            .args([
                "--samples",
                "8",
                "--seq-len",
                "16",
                "--sparsity",
                "0.3",
                "--out",
            ])
            .arg(&out),
    );
    (out, text)
}

/// `rku-engine recover` of `student` from tiny-llama3 on `text`, 3 windows
/// of 16 tokens a step, then `extra` and `--out out`.
fn recover_cmd(student: &Path, text: &Path, extra: &[&str], out: &Path) -> std::process::Command {
    recover_from(&fixture("tiny-llama3"), student, text, extra, out)
}

/// `recover_cmd` with another teacher.
fn recover_from(
    teacher: &Path,
    student: &Path,
    text: &Path,
    extra: &[&str],
    out: &Path,
) -> std::process::Command {
    let mut c = bin();
    c.args(["recover", "--model"])
        .arg(student)
        .arg("--teacher")
        .arg(teacher)
        .arg("--data")
        .arg(text)
        .args(["--batch", "3", "--seq-len", "16"])
        .args(extra)
        .arg("--out")
        .arg(out);
    c
}

/// The recovery record's per-step losses.
fn losses(dir: &Path) -> Vec<f64> {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("pruning.json")).unwrap()).unwrap();
    r["recovery"]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// The recovery record says whether the training windows started with BOS
/// (`--bos`), and keeps the pruning's calibration record, which says it too.
#[test]
fn recovery_record_says_whether_windows_start_with_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, text) = pruned_student(tmp.path());
    for (extra, bos) in [(&[][..], false), (&["--bos"][..], true)] {
        let out = tmp.path().join(format!("bos-{bos}"));
        let args = [&["--steps", "1"], extra].concat();
        run_ok(&mut recover_cmd(&student, &text, &args, &out));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("pruning.json")).unwrap()).unwrap();
        assert_eq!(r["recovery"]["data"]["bos"], bos, "{extra:?}");
        assert_eq!(r["calibration"]["bos"], false, "tiny-llama3's default");
    }
}

/// An interrupted run resumed from its checkpoint equals the uninterrupted
/// run bit for bit (the merged weights and every step's loss).
#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, text) = pruned_student(tmp.path());
    let whole = tmp.path().join("whole");
    run_ok(&mut recover_cmd(&student, &text, &["--steps", "6"], &whole));
    let ckpt = tmp.path().join("ck.safetensors");
    let ck = ckpt.to_str().unwrap();
    let first = tmp.path().join("first");
    let args = ["--steps", "3", "--save-every", "2", "--checkpoint", ck];
    run_ok(&mut recover_cmd(&student, &text, &args, &first));
    let resumed = tmp.path().join("resumed");
    let args = ["--steps", "6", "--resume", "--checkpoint", ck];
    run_ok(&mut recover_cmd(&student, &text, &args, &resumed));
    assert_eq!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(resumed.join("model.safetensors")).unwrap(),
        "the resumed run's weights differ"
    );
    assert_eq!(losses(&whole), losses(&resumed));
    assert_eq!(losses(&whole)[..3], losses(&first)[..]);
    assert_ne!(
        std::fs::read(whole.join("model.safetensors")).unwrap(),
        std::fs::read(student.join("model.safetensors")).unwrap(),
        "recovery changed nothing"
    );
    // A checkpoint of other settings is refused by name.
    let other = tmp.path().join("other");
    let args = [
        "--steps",
        "6",
        "--resume",
        "--checkpoint",
        ck,
        "--lora-rank",
        "4",
    ];
    let err = run_err(&mut recover_cmd(&student, &text, &args, &other));
    assert!(
        err.contains("ck.safetensors") && err.contains("rank"),
        "{err}"
    );
    assert!(!other.exists());
    // Recorded losses no run gives: a negative one, and ones whose sum
    // (the summary's mean) leaves f64.
    for (name, first, needle) in [
        ("negative", -5.0, "no KL or cross-entropy is negative"),
        ("huge", 1e308, "sum past"),
    ] {
        let bad = tmp.path().join(format!("{name}.safetensors"));
        with_losses(&ckpt, &bad, |l| l.iter_mut().for_each(|x| *x = first));
        let args = [
            "--steps",
            "6",
            "--resume",
            "--checkpoint",
            bad.to_str().unwrap(),
        ];
        let err = run_err(&mut recover_cmd(&student, &text, &args, &other));
        assert!(err.contains(name) && err.contains(needle), "{err}");
        assert!(!other.exists());
    }
}

/// Copies checkpoint `from` to `to` with its recorded losses edited by
/// `edit` (the safetensors header rewritten, the tensors unchanged).
fn with_losses(from: &Path, to: &Path, edit: impl Fn(&mut Vec<f64>)) {
    let bytes = std::fs::read(from).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &mut header["__metadata__"];
    let mut losses: Vec<f64> = serde_json::from_str(meta["losses"].as_str().unwrap()).unwrap();
    edit(&mut losses);
    meta["losses"] = serde_json::to_string(&losses).unwrap().into();
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(to, out).unwrap();
}

/// Each bad input is a clear error, and nothing is written.
#[test]
fn bad_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, text) = pruned_student(tmp.path());
    let out = tmp.path().join("out");
    let refuse = |extra: &[&str], needle: &str| {
        let err = run_err(&mut recover_cmd(&student, &text, extra, &out));
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    };
    refuse(&["--lora-rank", "0"], "--lora-rank");
    refuse(&["--lora-rank", "40"], "rank 40");
    refuse(&["--steps", "0"], "--steps");
    refuse(&["--lora-alpha=-1"], "--lora-alpha");
    refuse(&["--max-grad-norm=-1"], "--max-grad-norm");
    refuse(&["--max-grad-norm", "nan"], "--max-grad-norm");
    // A teacher of another family.
    let err = run_err(&mut recover_from(
        &fixture("tiny-qwen2"),
        &student,
        &text,
        &[],
        &out,
    ));
    assert!(err.contains("tiny-qwen2"), "{err}");
    // kd without a teacher.
    let err = run_err(
        bin()
            .args(["recover", "--model"])
            .arg(&student)
            .arg("--data")
            .arg(&text)
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("--teacher"), "{err}");
    // A loss that becomes non-finite: `overflowing_updates_are_never_saved`.
    // A checkpoint path that is an input, or another kind of file.
    let text_s = text.to_str().unwrap().to_string();
    let before = std::fs::read(&text).unwrap();
    for extra in [
        vec!["--checkpoint", text_s.as_str(), "--force"],
        vec!["--checkpoint", text_s.as_str(), "--resume"],
    ] {
        let err = run_err(&mut recover_cmd(&student, &text, &extra, &out));
        assert!(err.contains("calib.txt"), "{extra:?}: {err}");
        assert!(!out.exists());
    }
    assert_eq!(
        std::fs::read(&text).unwrap(),
        before,
        "an input was touched"
    );
    // A checkpoint that is a link (to an input, or to nothing).
    for (name, target) in [
        ("to-text", text.clone()),
        ("dangling", tmp.path().join("none")),
    ] {
        let link = tmp.path().join(name);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for extra in [&[][..], &["--resume"][..], &["--force"][..]] {
            let args = [&["--checkpoint", link.to_str().unwrap()][..], extra].concat();
            let err = run_err(&mut recover_cmd(&student, &text, &args, &out));
            assert!(err.contains("symbolic link") && err.contains(name), "{err}");
            assert!(!out.exists());
        }
    }
    // A checkpoint inside the output directory, or the directory itself.
    for inside in [out.join("ck.safetensors"), out.clone()] {
        let args = ["--checkpoint", inside.to_str().unwrap()];
        let err = run_err(&mut recover_cmd(&student, &text, &args, &out));
        assert!(err.contains("lies inside --out"), "{err}");
        assert!(!out.exists());
    }
    // An existing output without --force.
    std::fs::create_dir(&out).unwrap();
    let err = run_err(&mut recover_cmd(&student, &text, &["--steps", "1"], &out));
    assert!(err.contains("out"), "{err}");
    std::fs::remove_dir(&out).unwrap();
    // A padded export.
    let padded = tmp.path().join("padded");
    run_ok(
        bin()
            .args(["prune", "--model"])
            .arg(fixture("tiny-llama3"))
            .arg("--calib")
            .arg(&text)
            .args(["--samples", "8", "--seq-len", "16", "--sparsity", "0.3"])
            .args(["--export", "padded", "--out"])
            .arg(&padded),
    );
    let err = run_err(&mut recover_cmd(&padded, &text, &[], &out));
    assert!(err.contains("padded"), "{err}");
    assert!(!out.exists());
}

/// With `--stream` (layers uploaded as each pass reaches them, for the
/// student and the teacher) the recovered model is the same, bit for bit.
#[test]
fn streamed_recovery_equals_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, text) = pruned_student(tmp.path());
    let (resident, streamed) = (tmp.path().join("resident"), tmp.path().join("streamed"));
    run_ok(&mut recover_cmd(
        &student,
        &text,
        &["--steps", "3"],
        &resident,
    ));
    let args = ["--steps", "3", "--stream"];
    run_ok(&mut recover_cmd(&student, &text, &args, &streamed));
    assert_eq!(
        std::fs::read(resident.join("model.safetensors")).unwrap(),
        std::fs::read(streamed.join("model.safetensors")).unwrap()
    );
    assert_eq!(losses(&resident), losses(&streamed));
}

/// The traces step reference of scripts/make_lora_trace_fixtures.py: its
/// adapters and scale, and its sequences counted from their prompt's end.
fn trace_step_reference(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
) -> (
    Adapters<CpuBackend>,
    f32,
    Vec<Sequence>,
    HashMap<String, RefTensor>,
) {
    let refs = load_reference(&fixture("lora/tiny-llama3-traces.safetensors"));
    let rank = refs["rank"].data[0] as usize;
    let scale = (refs["alpha"].data[0] / rank as f64) as f32;
    let ad = Adapters::build(be, &model.cfg, rank, |l, p, _, _| {
        Ok((
            f32s(&refs[&format!("lora_a.{l}.{}", p.name())].data),
            f32s(&refs[&format!("lora_b.{l}.{}", p.name())].data),
        ))
    })
    .unwrap();
    let seqs = (0..3)
        .map(|i| Sequence {
            ids: refs[&format!("seq.{i}.ids")]
                .data
                .iter()
                .map(|&v| v as u32)
                .collect(),
            counted_from: refs[&format!("seq.{i}.prompt")].data[0] as usize,
        })
        .collect();
    (ad, scale, seqs, refs)
}

/// Every adapter gradient of `grads` against `want(which, layer, proj)`.
fn worst_grad_err(
    be: &CpuBackend,
    grads: &Adapters<CpuBackend>,
    want: impl Fn(&str, usize, Proj) -> Vec<f64>,
    tol: f64,
) -> f64 {
    let mut worst = 0f64;
    for (l, row) in grads.layers.iter().enumerate() {
        for (&p, g) in Proj::ALL.iter().zip(row) {
            for (which, buf) in [("a", &g.a), ("b", &g.b)] {
                let want = want(which, l, p);
                let err = max_rel_err(&f64s(&be.download(buf).unwrap()), &want);
                assert!(err < tol, "∂{which} layer {l} {}: {err:e}", p.name());
                worst = worst.max(err);
            }
        }
    }
    worst
}

/// One step over three traces of their own lengths with `--tokens
/// generated` (only predictions of generated tokens count; two traces of
/// equal length share a pass): loss and adapter gradients = autograd's.
#[test]
fn trace_step_matches_autograd() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let (ad, scale, seqs, refs) = trace_step_reference(&be, &model);
    let batch: Vec<&Sequence> = seqs.iter().collect();
    for loss in [RecoverLoss::Kd, RecoverLoss::Ce] {
        let key = loss.name();
        let mut grads = ad.zeros_like(&be).unwrap();
        let got = step_loss_and_grads(
            &be,
            &model,
            Some(&model),
            (&ad, scale),
            &mut grads,
            &batch,
            loss,
            0, // every layer recomputed
        )
        .unwrap();
        let want = refs[&format!("{key}.loss")].data[0];
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{key} loss {got} vs {want}"
        );
        let worst = worst_grad_err(
            &be,
            &grads,
            |w, l, p| {
                refs[&format!("{key}.grad_{w}.{l}.{}", p.name())]
                    .data
                    .clone()
            },
            1e-4,
        );
        println!("{key}: loss {got} (torch {want}), worst gradient error {worst:e}");
    }
}

/// A step over 3 traces of different lengths equals the three done one at
/// a time, their gradients added and normalised by the step's count.
#[test]
fn trace_step_equals_one_trace_at_a_time() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let (ad, scale, mut seqs, _) = trace_step_reference(&be, &model);
    seqs[2].ids.truncate(7); // three lengths: 9, 6, 7
    let batch: Vec<&Sequence> = seqs.iter().collect();
    let count: usize = seqs.iter().map(Sequence::predicted).sum();
    for loss in [RecoverLoss::Kd, RecoverLoss::Ce] {
        let mut step = ad.zeros_like(&be).unwrap();
        let got = step_loss_and_grads(
            &be,
            &model,
            Some(&model),
            (&ad, scale),
            &mut step,
            &batch,
            loss,
            u64::MAX,
        )
        .unwrap();
        let mut alone = ad.zeros_like(&be).unwrap();
        let mut sum = 0.0;
        for s in &seqs {
            let geo = Geometry {
                seqs: 1,
                t: s.ids.len(),
            };
            let (part, n) = loss_sum_and_grads(
                &be,
                &model,
                Some(&model),
                (&ad, scale),
                &mut alone,
                &s.ids,
                geo,
                Some(&[s.counted_from]),
                loss,
                1.0 / count as f32,
                0,
            )
            .unwrap();
            assert_eq!(n, s.predicted());
            sum += part;
        }
        let want = sum / count as f64;
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
        for (i, ((g1, _), (g2, _))) in step.tensors().zip(alone.tensors()).enumerate() {
            let (g1, g2) = (be.download(g1).unwrap(), be.download(g2).unwrap());
            let err = max_rel_err(&f64s(&g1), &f64s(&g2));
            assert!(err < 1e-6, "{} tensor {i}: {err:e}", loss.name());
        }
    }
}

/// `recover --traces`: step 1's loss is the library's step over the first
/// --batch traces in file order; the record names the traces; a resume
/// with other traces settings is refused by name; bad traces are refused
/// before training.
#[test]
fn recover_on_traces_and_its_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, _) = pruned_student(tmp.path());
    let digest = rku_engine::io::traces::tokenizer_digest(&student).unwrap();
    let mut next = xorshift(77);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| (next() % 200) as u32 + 1).collect() };
    let shapes = [(3, 9), (5, 4), (2, 6), (4, 8), (3, 5)];
    let traces: Vec<(Vec<u32>, Vec<u32>)> = shapes.iter().map(|&(p, g)| (ids(p), ids(g))).collect();
    let file = tmp.path().join("t.jsonl");
    write_trace_file(&file, &digest, &traces);
    let tr = file.to_str().unwrap();
    let ckpt = tmp.path().join("ck.safetensors");
    let ck = ckpt.to_str().unwrap();
    let cmd = |extra: &[&str], out: &Path| {
        let mut c = bin();
        c.args(["recover", "--model"])
            .arg(&student)
            .arg("--teacher")
            .arg(fixture("tiny-llama3"))
            .args(["--batch", "3"])
            .args(extra)
            .arg("--out")
            .arg(out);
        c
    };
    let out = tmp.path().join("r");
    let args = [
        "--traces",
        tr,
        "--tokens",
        "generated",
        "--steps",
        "2",
        "--checkpoint",
        ck,
    ];
    run_ok(&mut cmd(&args, &out));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pruning.json")).unwrap()).unwrap();
    let data = &rec["recovery"]["data"];
    assert_eq!(data["traces"]["digest"], file_sha256(&file));
    assert_eq!(data["traces"]["selection"], "all");
    assert_eq!(data["traces"]["tokens"], "generated");
    assert_eq!(data["windows"], 5);
    // Steps 1 and 2 take traces 0, 1, 2 and 3, 4, 0: 12 + 9 + 8 and 12 + 8 + 12 tokens.
    assert_eq!(data["tokens_seen"], 61);
    // Step 1 runs with the fresh adapters (B = 0): the library's step.
    let be = CpuBackend::new();
    let model = Model::load(&be, &student).unwrap();
    let teacher = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let ad = init_adapters(&be, &model.cfg, 8, 0).unwrap();
    let mut grads = ad.zeros_like(&be).unwrap();
    let seqs: Vec<Sequence> = traces
        .iter()
        .map(|(p, g)| Sequence {
            ids: [&p[..], g].concat(),
            counted_from: p.len(),
        })
        .collect();
    let first: Vec<&Sequence> = seqs[..3].iter().collect();
    let want = step_loss_and_grads(
        &be,
        &model,
        Some(&teacher),
        (&ad, 2.0),
        &mut grads,
        &first,
        RecoverLoss::Kd,
        0,
    )
    .unwrap();
    assert_eq!(losses(&out)[0], want);

    // Resuming with other traces settings is refused, naming them.
    for (extra, name) in [
        (&["--tokens", "all"][..], "traces_tokens"),
        (
            &["--tokens", "generated", "--select", "length-band 0,50"][..],
            "traces_selection",
        ),
        (
            &["--tokens", "generated", "--max-seq-len", "8"][..],
            "traces_max_seq_len",
        ),
    ] {
        let other = tmp.path().join("other");
        let args = [
            &[
                "--traces",
                tr,
                "--steps",
                "3",
                "--resume",
                "--checkpoint",
                ck,
            ][..],
            extra,
        ]
        .concat();
        let err = run_err(&mut cmd(&args, &other));
        assert!(
            err.contains("ck.safetensors") && err.contains(name),
            "{extra:?}: {err}"
        );
        assert!(!other.exists());
    }

    // Bad traces, before training.
    let foreign = tmp.path().join("foreign.jsonl");
    write_trace_file(&foreign, &"0".repeat(64), &traces);
    let never = tmp.path().join("never");
    let text = calib_text(tmp.path(), 40);
    let cases: [(Vec<&str>, &[&str]); 4] = [
        (
            vec!["--traces", tr, "--data", text.to_str().unwrap()],
            &["--data"],
        ),
        (
            vec!["--traces", foreign.to_str().unwrap()],
            &["foreign.jsonl", "another tokenizer"],
        ),
        (
            vec!["--traces", tr, "--select", "correct"],
            &["t.jsonl", "keeps none"],
        ),
        (
            vec!["--traces", tr, "--select", "length-band 0,10"],
            &["t.jsonl", "fewer than one batch"],
        ),
    ];
    for (extra, words) in cases {
        let err = run_err(&mut cmd(&extra, &never));
        for w in words {
            assert!(err.contains(w), "{extra:?}: {err}");
        }
        assert!(
            !err.contains("step 1"),
            "{extra:?}: trained before refusing: {err}"
        );
    }
    assert!(!never.exists());
}

/// A checkpoint's F32 tensors by name, and its metadata.
type CheckpointValues = (Vec<(String, Vec<f32>)>, Option<HashMap<String, String>>);

/// Every F32 value of a checkpoint, by tensor name, and its metadata.
fn checkpoint_values(path: &Path) -> CheckpointValues {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, meta.metadata().clone())
}

/// An update that overflows (a huge --lr) stops the run before anything
/// non-finite is saved: the checkpoint the error names holds finite
/// adapters, or, when the first step overflows, none is written. A crafted
/// checkpoint with a negative AdamW second moment is refused on resume.
#[test]
fn overflowing_updates_are_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let (student, text) = pruned_student(tmp.path());
    let out = tmp.path().join("out");
    let run = |lr: &str, ck: &Path| {
        let args = [
            "--steps",
            "3",
            "--lr",
            lr,
            "--warmup",
            "0",
            "--max-grad-norm",
            "0",
            "--save-every",
            "1",
            "--checkpoint",
            ck.to_str().unwrap(),
        ];
        run_err(&mut recover_cmd(&student, &text, &args, &out))
    };
    // f32's largest lr: the first update's adapters are ±inf or NaN.
    let first = tmp.path().join("first.safetensors");
    let err = run("3e38", &first);
    assert!(
        err.contains("step 1") && err.contains("not finite"),
        "{err}"
    );
    assert!(err.contains("before any checkpoint"), "{err}");
    assert!(!first.exists() && !out.exists());
    // Finite after one step, non-finite later: the named checkpoint is finite.
    let later = tmp.path().join("later.safetensors");
    let err = run("1e30", &later);
    assert!(
        err.contains("stopped") && err.contains("later.safetensors"),
        "{err}"
    );
    let (values, _) = checkpoint_values(&later);
    for (name, v) in &values {
        assert!(v.iter().all(|x| x.is_finite()), "{name} in {err}");
    }
    // A negative second moment (finite, so only its sign is wrong).
    let crafted = tmp.path().join("crafted.safetensors");
    let good = tmp.path().join("good.safetensors");
    let args = ["--steps", "1", "--checkpoint", good.to_str().unwrap()];
    run_ok(&mut recover_cmd(
        &student,
        &text,
        &args,
        &tmp.path().join("one"),
    ));
    let (values, meta_good) = checkpoint_values(&good);
    let bytes: Vec<(String, Vec<u8>, usize)> = values
        .iter()
        .map(|(name, v)| {
            let v: Vec<f32> = match name.starts_with("v.") {
                true => v.iter().map(|_| -1.0).collect(),
                false => v.clone(),
            };
            (name.clone(), bytemuck::cast_slice(&v).to_vec(), v.len())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, b, len)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, meta_good, &crafted).unwrap();
    let args = [
        "--steps",
        "2",
        "--resume",
        "--checkpoint",
        crafted.to_str().unwrap(),
    ];
    let err = run_err(&mut recover_cmd(&student, &text, &args, &out));
    assert!(
        err.contains("crafted.safetensors") && err.contains("negative"),
        "{err}"
    );
    assert!(!out.exists());
}
