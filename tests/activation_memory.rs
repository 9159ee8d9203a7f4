//! The activation-memory budget (src/model/keep.rs, METHODS.md §4): which
//! layers it keeps, that a kept layer costs the bytes it is said to (on the
//! emulated device's allocator), and that the statistics and the adapters'
//! gradients do not depend on it, bit for bit, on the CPU and the emulated
//! device, for every family.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{CudaBackend, Device, EmuDevice};
use rku_engine::backend::Backend;
use rku_engine::model::forward::{forward, forward_with, Keep};
use rku_engine::model::keep::{kept_layers, layer_acts_bytes, MemoryBudget};
use rku_engine::model::lora::Adapters;
use rku_engine::model::{Geometry, Model};
use rku_engine::prune::calibrate::{collect_sequence_stats, collect_stats, CalibSpec, Sequence};
use rku_engine::recover::step::{loss_and_grads, RecoverLoss};

const FAMILIES: [&str; 5] = [
    "tiny-llama3",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-mistral",
    "tiny-gemma3",
];

fn spec(seqs: usize, t: usize, budget: MemoryBudget) -> CalibSpec {
    CalibSpec {
        activation_memory: budget,
        ..calib_spec(seqs, t)
    }
}

/// The budgets compared: none, the top layer's bytes (one layer kept, the
/// rest recomputed), and everything.
fn budgets<B: Backend>(model: &Model<B>, geo: Geometry) -> [MemoryBudget; 3] {
    let c = &model.cfg;
    let top = layer_acts_bytes(c, c.layers - 1, geo, false);
    [
        MemoryBudget::Bytes(0),
        MemoryBudget::Bytes(top),
        MemoryBudget::Bytes(u64::MAX),
    ]
}

#[test]
fn the_budget_keeps_the_top_layers_that_fit() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-gemma3")).unwrap();
    let c = &model.cfg;
    let geo = Geometry { seqs: 3, t: 10 };
    let bytes = |l| layer_acts_bytes(c, l, geo, false);
    let top2 = bytes(c.layers - 1) + bytes(c.layers - 2);
    assert_eq!(kept_layers(c, geo, false, 0), (0, 0));
    assert_eq!(kept_layers(c, geo, false, top2), (2, top2));
    assert_eq!(kept_layers(c, geo, false, top2 - 1).0, 1);
    assert_eq!(kept_layers(c, geo, false, u64::MAX).0, c.layers);
    // Adapters' inputs make each layer dearer.
    assert!(layer_acts_bytes(c, 0, geo, true) > bytes(0));
}

/// A kept layer holds exactly `layer_acts_bytes` on the device: the forward
/// pass keeping the top layer ends that many bytes above one keeping none,
/// with and without adapters.
#[test]
fn a_kept_layer_costs_what_the_budget_counts() {
    for name in FAMILIES {
        let be = CudaBackend::new(EmuDevice::new());
        let model = Model::load(&be, &fixture(name)).unwrap();
        let c = &model.cfg;
        let geo = Geometry { seqs: 2, t: 9 };
        let x = stride_ids(geo.rows(), c.vocab, 5);
        let ad = Adapters::build(&be, c, 2, |_, _, inp, out| {
            Ok((values(2 * inp, -0.1, 0.1, 1), values(out * 2, -0.1, 0.1, 2)))
        })
        .unwrap();
        for lora in [None, Some((&ad, 2.0))] {
            let held = |keep| {
                let out = forward_with(&be, &model, lora, &x, geo, keep).unwrap();
                let bytes = be.device().mem_stats().current;
                drop(out);
                bytes as u64
            };
            let extra = held(Keep::acts(1)) - held(Keep::RESIDUALS);
            let want = layer_acts_bytes(c, c.layers - 1, geo, lora.is_some());
            assert_eq!(extra, want, "{name} (adapters: {})", lora.is_some());
        }
    }
}

#[test]
fn statistics_do_not_depend_on_the_budget_cpu() {
    for name in FAMILIES {
        let be = CpuBackend::new();
        let model = Model::load(&be, &fixture(name)).unwrap();
        let (seqs, t) = (5, 12);
        let windows = stride_ids(seqs * t, model.cfg.vocab, 11);
        let run = |budget| {
            collect_stats(&be, &model, &windows, spec(seqs, t, budget), String::new()).unwrap()
        };
        let [none, top, all] = budgets(&model, Geometry { seqs: 2, t }).map(run);
        assert_stats_equal(&top, &none, &format!("{name}: one layer kept vs none"));
        assert_stats_equal(&all, &none, &format!("{name}: every layer kept vs none"));
    }
}

/// Traces of three lengths counted from their prompts' ends (the masked
/// path of `--tokens generated`).
#[test]
fn trace_statistics_do_not_depend_on_the_budget() {
    for name in ["tiny-llama3", "tiny-gemma3"] {
        let be = CpuBackend::new();
        let model = Model::load(&be, &fixture(name)).unwrap();
        let seqs: Vec<Sequence> = [(9, 4), (6, 2), (9, 5), (7, 3)]
            .iter()
            .enumerate()
            .map(|(i, &(len, from))| Sequence {
                ids: stride_ids(len, model.cfg.vocab, 3 + i as u32),
                counted_from: from,
            })
            .collect();
        let run = |budget| {
            let s = spec(0, 0, budget);
            collect_sequence_stats(&be, &model, &seqs, s, "c".into(), None).unwrap()
        };
        let [none, top, all] = budgets(&model, Geometry { seqs: 2, t: 9 }).map(run);
        assert_stats_equal(
            &top,
            &none,
            &format!("{name} traces: one layer kept vs none"),
        );
        assert_stats_equal(
            &all,
            &none,
            &format!("{name} traces: every layer kept vs none"),
        );
    }
}

#[test]
fn statistics_do_not_depend_on_the_budget_cuda_emu() {
    for name in ["tiny-qwen3", "tiny-gemma3"] {
        let be = CudaBackend::new(EmuDevice::new());
        let model = Model::load(&be, &fixture(name)).unwrap();
        let (seqs, t) = (2, 10);
        let windows = stride_ids(seqs * t, model.cfg.vocab, 7);
        let run = |budget| {
            collect_stats(&be, &model, &windows, spec(seqs, t, budget), String::new()).unwrap()
        };
        let [none, top, all] = budgets(&model, Geometry { seqs: 2, t }).map(run);
        assert_stats_equal(
            &top,
            &none,
            &format!("{name} on cuda-emu: one layer kept vs none"),
        );
        assert_stats_equal(
            &all,
            &none,
            &format!("{name} on cuda-emu: every layer kept vs none"),
        );
    }
}

/// The adapters' gradients (LoRA-KD) with the student's activations kept
/// equal those with every layer recomputed.
#[test]
fn adapter_gradients_do_not_depend_on_the_budget() {
    for name in ["tiny-qwen2", "tiny-gemma3"] {
        let be = CpuBackend::new();
        let model = Model::load(&be, &fixture(name)).unwrap();
        let c = &model.cfg;
        let geo = Geometry { seqs: 2, t: 8 };
        let x = stride_ids(geo.rows(), c.vocab, 9);
        let ad = Adapters::build(&be, c, 2, |l, _, inp, out| {
            let seed = l as u64;
            Ok((
                values(2 * inp, -0.2, 0.2, seed),
                values(out * 2, -0.2, 0.2, seed + 7),
            ))
        })
        .unwrap();
        let top = layer_acts_bytes(c, c.layers - 1, geo, true);
        let run = |budget| {
            let mut grads = ad.zeros_like(&be).unwrap();
            let loss = loss_and_grads(
                &be,
                &model,
                Some(&model),
                (&ad, 2.0),
                &mut grads,
                &x,
                geo,
                RecoverLoss::Kd,
                budget,
            )
            .unwrap();
            let g: Vec<Vec<f32>> = grads
                .tensors()
                .map(|(b, _)| be.download(b).unwrap())
                .collect();
            (loss, g)
        };
        let none = run(0);
        assert!(
            none.1.iter().flatten().any(|&v| v != 0.0),
            "{name}: zero gradients"
        );
        for budget in [top, u64::MAX] {
            assert!(
                run(budget) == none,
                "{name}: gradients with {budget} B kept"
            );
        }
    }
}

/// `forward` refuses kept activations without the residual stream.
#[test]
fn kept_activations_need_the_residual_stream() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let geo = Geometry { seqs: 1, t: 4 };
    let keep = Keep {
        residuals: false,
        acts_layers: 1,
    };
    let e = match forward(&be, &model, &[1, 2, 3, 4], geo, keep) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("kept activations without residuals accepted"),
    };
    assert!(e.contains("residual stream"), "{e}");
}

/// `score` prints what the budget keeps, and refuses a malformed budget
/// before reading anything.
#[test]
fn score_prints_and_checks_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let text = calib_text(dir.path(), 40);
    let model = fixture("tiny-llama3");
    let score = |budget: &str, out: &str| {
        let mut cmd = bin();
        cmd.args(["score", "--model"])
            .arg(&model)
            .arg("--calib")
            .arg(&text)
            .args(["--samples", "2", "--seq-len", "8", "--batch", "2"])
            .args(["--activation-memory", budget, "--out"])
            .arg(dir.path().join(out));
        cmd
    };
    let log = |mut cmd: std::process::Command| {
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{cmd:?} failed: {err}");
        err
    };
    let none = log(score("0", "none.safetensors"));
    assert!(none.contains("none kept, every layer recomputed"), "{none}");
    let all = log(score("auto", "all.safetensors"));
    assert!(all.contains("layers kept"), "{all}");
    let a = std::fs::read(dir.path().join("none.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("all.safetensors")).unwrap();
    assert!(a == b, "the statistics files differ with the budget");
    let err = run_err(&mut score("12X", "bad.safetensors"));
    assert!(
        err.contains("activation memory") && err.contains("12X"),
        "{err}"
    );
    assert!(!dir.path().join("bad.safetensors").exists());
}
