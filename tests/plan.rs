//! The memory plan (src/plan.rs) against the allocator: a scoring batch run
//! through `CudaBackend<EmuDevice>` reaches the high-water mark the plan
//! predicts, to the byte, and the 7–8B configurations fit their budgets.
mod common;
use std::path::Path;

use common::*;
use rku_engine::backend::cuda::{CudaBackend, Device, EmuDevice};
use rku_engine::model::keep::{layer_acts_bytes, MemoryBudget};
use rku_engine::model::layer_major::{LayerMajor, ResidualDtype};
use rku_engine::model::weights::Residency;
use rku_engine::model::{Geometry, Model, ModelConfig};
use rku_engine::plan::{plan, PlanSpec};
use rku_engine::prune::calibrate::{collect_stats, CalibSpec};
use rku_engine::prune::layer_major::host_bytes_per_row;
use rku_engine::prune::stats::{EnergyAt, Objectives};

const GIB: f64 = (1u64 << 30) as f64;

/// Loads `dir` on the emulated device, scores one batch of `seqs`×`t`
/// tokens and compares the high-water mark with the plan's peak.
fn check_peak(dir: &Path, t: usize, seqs: usize, objectives: Objectives, residency: Residency) {
    check_peak_kept(dir, t, seqs, objectives, residency, 0);
}

/// [`check_peak`] with an activation-memory budget of `budget` bytes.
fn check_peak_kept(
    dir: &Path,
    t: usize,
    seqs: usize,
    objectives: Objectives,
    residency: Residency,
    budget: u64,
) {
    let be = CudaBackend::new(EmuDevice::new());
    let model = Model::load_with(&be, dir, residency).unwrap();
    let vocab = model.cfg.vocab as u32;
    let windows: Vec<u32> = (0..(seqs * t) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let spec = CalibSpec {
        samples: seqs,
        seq_len: t,
        batch: seqs,
        objectives,
        energy_at: EnergyAt::FinalNorm,
        norms: None,
        activation_memory: MemoryBudget::Bytes(budget),
        layer_major: None,
        bos: false,
    };
    collect_stats(&be, &model, &windows, spec, String::new()).unwrap();
    let measured = be.device().mem_stats().high_water;
    let stream = residency == Residency::Streamed;
    let spec = PlanSpec {
        activation_memory: budget,
        ..PlanSpec::new(t, seqs, objectives, stream)
    };
    let p = plan(&model.cfg, &spec).unwrap();
    println!("{p}");
    println!(
        "{} ({residency:?}): planned peak {} B, measured high water {measured} B",
        dir.display(),
        p.peak_bytes,
    );
    assert_eq!(
        p.peak_bytes,
        measured,
        "{} ({residency:?}, T={t}, {seqs} sequences, {objectives}): plan vs measured high water",
        dir.display()
    );
}

const BOTH: Objectives = Objectives {
    energy: true,
    ce: true,
};
const ENERGY: Objectives = Objectives {
    energy: true,
    ce: false,
};

#[test]
fn plan_matches_high_water_tiny_qwen2() {
    check_peak(&fixture("tiny-qwen2"), 24, 2, BOTH, Residency::Resident);
    check_peak(&fixture("tiny-qwen2"), 16, 1, ENERGY, Residency::Resident);
    check_peak(&fixture("tiny-qwen2"), 24, 2, BOTH, Residency::Streamed);
}

/// Qwen3 keeps q and k before their norms and the norms' rstd per head.
#[test]
fn plan_matches_high_water_tiny_qwen3() {
    check_peak(&fixture("tiny-qwen3"), 24, 2, BOTH, Residency::Resident);
    check_peak(&fixture("tiny-qwen3"), 16, 1, ENERGY, Residency::Streamed);
}

/// Gemma 3: the post-attention norm's input and rstd kept per layer, the
/// post-FFN norm's buffers in the forward and, with y recomputed, the backward.
#[test]
fn plan_matches_high_water_tiny_gemma3() {
    check_peak(&fixture("tiny-gemma3"), 24, 2, BOTH, Residency::Resident);
    check_peak(&fixture("tiny-gemma3"), 16, 1, ENERGY, Residency::Streamed);
}

/// The activation-memory budget: the top half of the layers' activations
/// kept (the others recomputed), then every layer's, resident and streamed,
/// with the kept layers consumed by the first of two backward passes (a
/// budget of 0 is every other test of this file).
#[test]
fn plan_matches_high_water_with_kept_activations() {
    for name in ["tiny-qwen2", "tiny-qwen3", "tiny-gemma3"] {
        let dir = fixture(name);
        let cfg = ModelConfig::load(&dir.join("config.json")).unwrap();
        let geo = Geometry { seqs: 2, t: 24 };
        // The top half of the layers (rounded up), then all of them.
        let half_layers = cfg.layers.div_ceil(2);
        let half: u64 = (cfg.layers - half_layers..cfg.layers)
            .map(|l| layer_acts_bytes(&cfg, l, geo, false))
            .sum();
        for budget in [half, u64::MAX] {
            let p = plan(
                &cfg,
                &PlanSpec {
                    activation_memory: budget,
                    ..PlanSpec::new(24, 2, BOTH, false)
                },
            )
            .unwrap();
            let kept = p.activations.expect("a scoring plan says what it keeps");
            let want = if budget == half {
                half_layers
            } else {
                cfg.layers
            };
            assert_eq!(kept.layers, want, "{name}: layers kept within {budget} B");
            check_peak_kept(&dir, 24, 2, BOTH, Residency::Resident, budget);
            check_peak_kept(&dir, 24, 2, ENERGY, Residency::Streamed, budget);
        }
    }
}

/// Layer-major scoring (`prune::layer_major`): two batches in one chunk,
/// resident and streamed, both objectives.
#[test]
fn plan_matches_high_water_layer_major() {
    for name in ["tiny-llama3", "tiny-qwen3", "tiny-gemma3"] {
        for residency in [Residency::Resident, Residency::Streamed] {
            let dir = fixture(name);
            let be = CudaBackend::new(EmuDevice::new());
            let model = Model::load_with(&be, &dir, residency).unwrap();
            let (t, batch) = (16, 2);
            let windows: Vec<u32> = (0..(2 * batch * t) as u32)
                .map(|i| (i * 7919 + 13) % model.cfg.vocab as u32)
                .collect();
            let spec = CalibSpec {
                samples: 2 * batch,
                seq_len: t,
                batch,
                objectives: BOTH,
                energy_at: EnergyAt::FinalNorm,
                norms: None,
                activation_memory: MemoryBudget::Bytes(0),
                layer_major: Some(LayerMajor {
                    host_memory: MemoryBudget::Bytes(u64::MAX),
                    residual: ResidualDtype::F32,
                }),
                bos: false,
            };
            collect_stats(&be, &model, &windows, spec, String::new()).unwrap();
            let measured = be.device().mem_stats().high_water;
            let stream = residency == Residency::Streamed;
            let plan_spec = PlanSpec {
                layer_major: Some(2),
                ..PlanSpec::new(t, batch, BOTH, stream)
            };
            let p = plan(&model.cfg, &plan_spec).unwrap();
            println!("{p}");
            let lm = p.layer_major.expect("a layer-major plan");
            assert_eq!(lm.uploads, 3 * model.cfg.layers);
            if stream {
                assert_eq!(model.layer_uploads(), lm.uploads, "{name}: uploads");
            }
            assert_eq!(
                p.peak_bytes, measured,
                "{name} ({residency:?}) layer-major: plan vs measured"
            );
        }
    }
}

#[test]
fn plan_matches_high_water_tiny_llama3() {
    check_peak(&fixture("tiny-llama3"), 24, 2, BOTH, Residency::Resident);
    check_peak(&fixture("tiny-llama3"), 16, 1, ENERGY, Residency::Resident);
    check_peak(&fixture("tiny-llama3"), 24, 2, BOTH, Residency::Streamed);
}

/// The real model, resident and streamed, at T = 4 (the plan's agreement
/// does not depend on T, and the emulated device, which runs a block's
/// CUDA threads as fibers on one OS thread, pays for every token on each
/// of the 30 layers): 269498176 B resident, 71252800 B streamed.
#[test]
fn plan_matches_high_water_smollm2() {
    let Some(dir) = asset("models/smollm2") else {
        return;
    };
    check_peak(&dir, 4, 1, ENERGY, Residency::Resident);
    check_peak(&dir, 4, 1, ENERGY, Residency::Streamed);
}

fn config(name: &str) -> ModelConfig {
    ModelConfig::load(&fixture(&format!("configs/{name}.json"))).unwrap()
}

/// Resident and streamed peaks at T = 2048, one sequence, energy objective.
fn big_plan(name: &str) -> (f64, f64) {
    let cfg = config(name);
    let resident = plan(&cfg, &PlanSpec::new(2048, 1, ENERGY, false)).unwrap();
    let streamed = plan(&cfg, &PlanSpec::new(2048, 1, ENERGY, true)).unwrap();
    println!("{resident}\n\n{streamed}\n");
    println!("json: {}", serde_json::to_string(&resident).unwrap());
    (
        resident.peak_bytes as f64 / GIB,
        streamed.peak_bytes as f64 / GIB,
    )
}

#[test]
fn qwen25_7b_fits_24_gib_resident_8_gib_streamed() {
    let cfg = config("qwen2.5-7b");
    assert_eq!(
        (cfg.hidden, cfg.ffn_widths[0], cfg.layers),
        (3584, 18944, 28)
    );
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (28, 4, 128));
    let (resident, streamed) = big_plan("qwen2.5-7b");
    println!("Qwen2.5-7B T=2048: resident {resident:.2} GiB, streamed {streamed:.2} GiB");
    assert!(resident <= 24.0, "{resident} GiB");
    assert!(streamed <= 8.0, "{streamed} GiB");
}

#[test]
fn llama3_8b_fits_24_gib_resident_8_gib_streamed() {
    let cfg = config("llama-3-8b");
    assert_eq!(
        (cfg.hidden, cfg.ffn_widths[0], cfg.layers),
        (4096, 14336, 32)
    );
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (32, 8, 128));
    let (resident, streamed) = big_plan("llama-3-8b");
    println!("Llama-3-8B T=2048: resident {resident:.2} GiB, streamed {streamed:.2} GiB");
    assert!(resident <= 24.0, "{resident} GiB");
    assert!(streamed <= 8.0, "{streamed} GiB");
}

/// The refit's plan (src/plan/refit.rs) against the allocator: a refit of
/// `samples` windows through `CudaBackend<EmuDevice>` reaches the peak the
/// plan predicts, to the byte; with `layer_major`, the streams on the host.
fn check_refit_peak(
    dir: &Path,
    residual: bool,
    bias: bool,
    residency: Residency,
    layer_major: bool,
) {
    use rku_engine::plan::{plan_refit, RefitPlanSpec};
    use rku_engine::prune::refit::{refit_sequences, RefitSpec, RefitTarget, RefitWindows};
    let be = CudaBackend::new(EmuDevice::new());
    let model = Model::load_with(&be, dir, residency).unwrap();
    // Two passes per layer, the second one partial.
    let (t, samples, batch) = (12, 3, 2);
    let vocab = model.cfg.vocab as u32;
    let windows: Vec<u32> = (0..(samples * t) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let kept: Vec<Vec<usize>> = (model.cfg.ffn_widths.iter().enumerate())
        .map(|(l, &m)| (0..m).filter(|c| (c + l) % 3 != 0).collect())
        .collect();
    let target = match residual {
        true => RefitTarget::Residual,
        false => RefitTarget::Layer,
    };
    let spec = RefitSpec {
        target,
        bias,
        damp: 0.01,
    };
    let w = RefitWindows::windows(&windows, t, batch, Default::default(), String::new(), false);
    let host = layer_major.then_some(LayerMajor {
        host_memory: MemoryBudget::Bytes(u64::MAX),
        residual: ResidualDtype::F32,
    });
    refit_sequences(&be, &model, &kept, &w.seqs, batch, spec, host).unwrap();
    let measured = be.device().mem_stats().high_water;
    let p = plan_refit(
        &model.cfg,
        &RefitPlanSpec {
            t,
            samples,
            batch,
            residual,
            bias,
            kept: kept.iter().map(Vec::len).collect(),
            stream: residency == Residency::Streamed,
            layer_major,
        },
    )
    .unwrap();
    println!("{p}");
    assert_eq!(
        p.peak_bytes,
        measured,
        "{} refit ({target:?}, bias {bias}, {residency:?}, layer-major {layer_major}): \
         plan vs measured high water",
        dir.display()
    );
    if layer_major {
        let lm = p.layer_major.expect("a layer-major refit plan");
        let streams = 1 + usize::from(residual);
        let d = model.cfg.hidden;
        assert_eq!(lm.host_bytes, (streams * samples * t * d * 4) as u64);
        assert_eq!((lm.batches, lm.uploads), (2, model.cfg.layers));
        assert_eq!(
            model.layer_uploads(),
            match residency {
                Residency::Streamed => model.cfg.layers,
                _ => 0,
            }
        );
    }
}

/// Both targets, with and without the bias column, resident and streamed,
/// spread over the two fixtures (the emulated device is slow).
#[test]
fn refit_plan_matches_high_water() {
    check_refit_peak(
        &fixture("tiny-qwen2"),
        false,
        false,
        Residency::Resident,
        false,
    );
    check_refit_peak(
        &fixture("tiny-qwen2"),
        true,
        true,
        Residency::Streamed,
        false,
    );
    check_refit_peak(
        &fixture("tiny-llama3"),
        true,
        false,
        Residency::Resident,
        false,
    );
    check_refit_peak(
        &fixture("tiny-llama3"),
        false,
        true,
        Residency::Streamed,
        false,
    );
}

/// The same with the residual streams on the host (`--layer-major`): both
/// targets, resident and streamed, and Gemma 3's post-FFN norm.
#[test]
fn layer_major_refit_plan_matches_high_water() {
    check_refit_peak(
        &fixture("tiny-qwen2"),
        false,
        true,
        Residency::Streamed,
        true,
    );
    check_refit_peak(
        &fixture("tiny-qwen2"),
        true,
        false,
        Residency::Resident,
        true,
    );
    check_refit_peak(
        &fixture("tiny-llama3"),
        true,
        true,
        Residency::Streamed,
        true,
    );
    check_refit_peak(
        &fixture("tiny-gemma3"),
        false,
        false,
        Residency::Streamed,
        true,
    );
}

/// Layer-major streamed scoring of N=128 sequences of T=2048 with 64 GiB of
/// host memory (f32 residuals): Llama-3-70B and Llama-3.1-405B within
/// 24 GiB on the device and the host budget, their figures printed.
#[test]
fn layer_major_plans_for_70b_and_405b() {
    for name in ["llama-3-70b", "llama-3.1-405b"] {
        let cfg = config(name);
        let host: u64 = 64 << 30;
        let per_batch = 2048 * host_bytes_per_row(&cfg, ResidualDtype::F32);
        let batches = ((host / per_batch) as usize).min(128);
        assert!(batches >= 1, "{name}: one sequence does not fit 64 GiB");
        let spec = PlanSpec {
            layer_major: Some(batches),
            ..PlanSpec::new(2048, 1, ENERGY, true)
        };
        let p = plan(&cfg, &spec).unwrap();
        let lm = p.layer_major.expect("a layer-major plan");
        let chunks = 128usize.div_ceil(batches);
        println!("{p}");
        println!(
            "{name}: N=128, T=2048, layer-major streamed: device {:.2} GiB, host {:.2} GiB per chunk \
             of {batches} sequences, {chunks} chunks, {} layer uploads",
            p.peak_bytes as f64 / GIB,
            lm.host_bytes as f64 / GIB,
            chunks * lm.uploads
        );
        assert!(lm.host_bytes <= host, "{name}: host {} B", lm.host_bytes);
        assert!(
            p.peak_bytes as f64 / GIB <= 24.0,
            "{name}: {} B",
            p.peak_bytes
        );
    }
}

/// `plan --refit --layer-major` prints the host streams and the plan as
/// JSON, equal to `plan_refit`'s; a `--host-memory` below the streams is
/// refused, naming it.
#[test]
fn plan_cli_refit_layer_major() {
    use rku_engine::plan::{plan_refit, RefitPlanSpec};
    let model = fixture("tiny-llama3");
    let cfg = ModelConfig::load(&model.join("config.json")).unwrap();
    let args = [
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--refit",
        "residual",
        "--refit-samples",
        "5",
        "--stream",
        "--layer-major",
    ];
    let out = run_ok(
        bin()
            .arg("plan")
            .arg("--model")
            .arg(&model)
            .args(args)
            .arg("--json"),
    );
    assert!(out.contains("layer-major"), "{out}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let want = plan_refit(
        &cfg,
        &RefitPlanSpec {
            t: 16,
            samples: 5,
            batch: 2,
            residual: true,
            bias: false,
            kept: cfg.ffn_widths.clone(),
            stream: true,
            layer_major: true,
        },
    )
    .unwrap();
    assert_eq!(json["peak_bytes"], want.peak_bytes);
    let lm = want.layer_major.unwrap();
    // Two streams (x' and x) of 5 windows × 16 rows, f32.
    assert_eq!(lm.host_bytes, (2 * 5 * 16 * cfg.hidden * 4) as u64);
    assert_eq!(json["layer_major"]["host_bytes"], lm.host_bytes);
    assert_eq!(json["layer_major"]["batches"], 3);
    let small = (lm.host_bytes - 1).to_string();
    let err = run_err(
        bin()
            .arg("plan")
            .arg("--model")
            .arg(&model)
            .args(args)
            .args(["--host-memory", &small]),
    );
    assert!(
        err.contains("--host-memory") && err.contains("residual streams"),
        "{err}"
    );
}

/// Output into a pipe whose reader has gone (`rku-engine plan … | head -1`)
/// ends the process by SIGPIPE, as other command-line tools end, rather
/// than a panic from `println!`.
#[cfg(unix)]
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // closed before the first line is written
    let out = bin()
        .args(["plan", "--config"])
        .arg(fixture("configs/llama-3-70b.json"))
        .args(["--refit", "--refit-samples", "128", "--stream"])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
}

/// A Llama-3-70B refit over N=128 windows of T=2048, weights streamed:
/// with the streams on the host (`--layer-major`) it fits a 24 GiB card
/// (G and C of the widest layer in f64 are most of it); with the streams on
/// the device it does not.
#[test]
fn layer_major_refit_plan_for_70b() {
    use rku_engine::plan::{plan_refit, RefitPlanSpec};
    let cfg = config("llama-3-70b");
    for residual in [false, true] {
        let run = |layer_major| {
            let spec = RefitPlanSpec {
                t: 2048,
                samples: 128,
                batch: 1,
                residual,
                bias: false,
                kept: cfg.ffn_widths.clone(),
                stream: true,
                layer_major,
            };
            plan_refit(&cfg, &spec).unwrap()
        };
        let (on_device, on_host) = (run(false), run(true));
        let gib = |p: &rku_engine::plan::Plan| p.peak_bytes as f64 / GIB;
        let host = on_host.layer_major.unwrap().host_bytes as f64 / GIB;
        println!(
            "Llama-3-70B refit (residual target: {residual}), N=128, T=2048, streamed: \
             streams on the device {:.2} GiB; layer-major {:.2} GiB on the device, {host:.2} GiB on the host",
            gib(&on_device),
            gib(&on_host)
        );
        assert!(gib(&on_host) <= 24.0, "{}", gib(&on_host));
        assert!(gib(&on_device) > 24.0, "{}", gib(&on_device));
    }
}

/// `plan --layer-major --host-memory` with a batch whose bytes pass 2^64
/// once wrapped to 0 and divided by it (a panic): now the plan's
/// "more than 2^62 bytes" error.
#[test]
fn a_batch_past_the_address_space_is_refused_not_divided_by() {
    let e = run_err(
        bin()
            .args(["plan", "--config"])
            .arg(fixture("configs/llama-3.1-405b.json"))
            .args(["--seq-len", "1048576", "--batch", "16777216"])
            .args(["--layer-major", "--host-memory", "0"]),
    );
    assert!(e.contains("more than 2^62 bytes"), "{e}");
}
