//! Layer streaming (`Residency::Streamed`, `--stream`): the same numbers as
//! a resident model, bit for bit (same ops in the same order, only the
//! weights' lifetime differs), with fewer weights on the device.
mod common;
use std::path::Path;

use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{CudaBackend, Device, EmuDevice};
use rku_engine::backend::Backend;
use rku_engine::model::decode::{argmax, Decoder};
use rku_engine::model::forward::logits;
use rku_engine::model::keep::MemoryBudget;
use rku_engine::model::weights::Residency;
use rku_engine::model::{Geometry, Model};
use rku_engine::prune::calibrate::{collect_stats, CalibSpec};
use rku_engine::prune::stats::{EnergyAt, Objectives, Stats};

const BOTH: Objectives = Objectives {
    energy: true,
    ce: true,
};

fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Statistics of 3 sequences of 12 tokens in batches of 2 (energy and ce).
fn stats<B: Backend>(be: &B, model: &Model<B>) -> Stats {
    let spec = CalibSpec {
        samples: 3,
        seq_len: 12,
        batch: 2,
        objectives: BOTH,
        energy_at: EnergyAt::FinalNorm,
        norms: None,
        activation_memory: MemoryBudget::Auto,
        layer_major: None,
        bos: false,
    };
    let windows = ids(36, model.cfg.vocab);
    collect_stats(be, model, &windows, spec, "calib".into()).unwrap()
}

/// Greedy continuation of a 5-token prompt through the KV-cache decoder.
fn greedy<B: Backend>(be: &B, model: &Model<B>) -> Vec<u32> {
    let mut dec = Decoder::new(be, model, 1, 16).unwrap();
    let mut last = dec.extend(&[ids(5, model.cfg.vocab)]).unwrap();
    let mut out = Vec::new();
    for _ in 0..6 {
        let next = argmax(&last);
        out.push(next);
        last = dec.step(&[next]).unwrap();
    }
    out
}

fn check_cpu(dir: &Path) {
    let be = CpuBackend::new();
    let resident = Model::load_with(&be, dir, Residency::Resident).unwrap();
    let streamed = Model::load_with(&be, dir, Residency::Streamed).unwrap();
    assert_eq!(streamed.residency(), Residency::Streamed);
    let geo = Geometry { seqs: 2, t: 9 };
    let x = ids(18, resident.cfg.vocab);
    assert_eq!(
        logits(&be, &resident, &x, geo).unwrap(),
        logits(&be, &streamed, &x, geo).unwrap(),
        "{}: logits",
        dir.display()
    );
    let (a, b) = (stats(&be, &resident), stats(&be, &streamed));
    assert_eq!(a, b, "{}: statistics", dir.display());
    assert!(
        a.layers[0].k1.iter().any(|&v| v > 0.0),
        "statistics are empty"
    );
    assert_eq!(greedy(&be, &resident), greedy(&be, &streamed));
}

#[test]
fn streamed_equals_resident_cpu() {
    check_cpu(&fixture("tiny-qwen2"));
    check_cpu(&fixture("tiny-llama3"));
}

/// On the emulated device: the same statistics, with at most two layers'
/// weights on the device.
#[test]
fn streamed_equals_resident_emulated_device_with_two_layers_live() {
    let dir = fixture("tiny-qwen2");
    let run = |residency| {
        let be = CudaBackend::new(EmuDevice::new());
        let model = Model::load_with(&be, &dir, residency).unwrap();
        // The ce objective loads the output projection, which then stays.
        model.lm_head(&be).unwrap();
        let at_load = be.device().mem_stats().current;
        let s = stats(&be, &model);
        assert_eq!(
            be.device().mem_stats().current,
            at_load,
            "{residency:?}: device memory after the run differs from after the load"
        );
        (s, at_load, be.device().mem_stats().high_water)
    };
    let (s_res, load_res, peak_res) = run(Residency::Resident);
    let (s_str, load_str, peak_str) = run(Residency::Streamed);
    assert_eq!(s_res, s_str);
    let cfg = rku_engine::model::ModelConfig::load(&dir.join("config.json")).unwrap();
    assert!(cfg.layers >= 3, "the fixture needs more than two layers");
    // What the resident load holds beyond the streamed one: exactly the layers.
    let layer_bytes = (load_res - load_str) / cfg.layers;
    assert_eq!(
        load_res - load_str,
        layer_bytes * cfg.layers,
        "uniform layers"
    );
    // Never more than two layers live: the streamed peak is at least
    // (L − 2) layers below the resident one (the plan test checks it to the byte).
    assert!(
        peak_str <= peak_res - (cfg.layers - 2) * layer_bytes,
        "peaks: resident {peak_res} B, streamed {peak_str} B, one layer {layer_bytes} B"
    );
}

/// `score --stream` writes the statistics `score` writes.
#[test]
fn cli_score_stream_matches_resident() {
    let tmp = tempfile::tempdir().unwrap();
    let calib = tmp.path().join("calib.txt");
    let text: String = (0..200)
        .map(|i| format!("Sentence {i} about {} apples and pears.\n", i * 3))
        .collect();
    std::fs::write(&calib, text).unwrap();
    let score = |out: &Path, stream: bool| {
        let mut cmd = bin();
        cmd.args(["score", "--model"])
            .arg(fixture("tiny-llama3"))
            .arg("--calib")
            .arg(&calib)
            .args(["--samples", "4", "--seq-len", "16", "--objective", "both"])
            .arg("--out")
            .arg(out);
        if stream {
            cmd.arg("--stream");
        }
        run_ok(&mut cmd);
        Stats::load(out).unwrap()
    };
    let resident = score(&tmp.path().join("a.safetensors"), false);
    let streamed = score(&tmp.path().join("b.safetensors"), true);
    assert_eq!(resident, streamed);
}

/// The refit over a streamed model equals the resident one bit for bit, on
/// the CPU and on the emulated device.
#[test]
fn refit_streamed_equals_resident() {
    use rku_engine::prune::refit::{refit, RefitLayer, RefitSpec, RefitTarget};
    fn run<B: Backend>(be: &B, dir: &Path, residency: Residency) -> Vec<RefitLayer> {
        let model = Model::load_with(be, dir, residency).unwrap();
        let kept: Vec<Vec<usize>> = model
            .cfg
            .ffn_widths
            .iter()
            .map(|&m| (0..m).filter(|c| c % 4 != 0).collect())
            .collect();
        let spec = RefitSpec {
            target: RefitTarget::Residual,
            bias: true,
            damp: 0.01,
        };
        let windows = ids(3 * 12, model.cfg.vocab);
        refit(be, &model, &kept, &windows, 12, 2, spec).unwrap().0
    }
    let dir = fixture("tiny-qwen2");
    let same = |a: &[RefitLayer], b: &[RefitLayer], what: &str| {
        for (l, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.w_down, y.w_down, "{what} layer {l}: columns");
            assert_eq!(x.bias, y.bias, "{what} layer {l}: bias");
        }
    };
    let cpu = CpuBackend::new();
    same(
        &run(&cpu, &dir, Residency::Resident),
        &run(&cpu, &dir, Residency::Streamed),
        "cpu",
    );
    let emu = CudaBackend::new(EmuDevice::new());
    same(
        &run(&emu, &dir, Residency::Resident),
        &run(&emu, &dir, Residency::Streamed),
        "cuda-emu",
    );
}
