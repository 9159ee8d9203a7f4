//! The layer-major statistics pass (src/prune/layer_major.rs): the same
//! statistics as the sequence-major pass, bit for bit, for every family,
//! windows and masked traces, on the CPU and the emulated device; each
//! streamed layer uploaded once per pass per chunk (counted); bf16
//! residuals close but rounded; the CLI's flags. Layer-major perplexity
//! (src/eval/ppl.rs): the same NLL bit for bit, uploads counted.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{CudaBackend, EmuDevice};
use rku_engine::backend::Backend;
use rku_engine::eval::ppl::{perplexity, PplResult, PplWindows};
use rku_engine::model::keep::MemoryBudget;
use rku_engine::model::layer_major::{LayerMajor, ResidualDtype};
use rku_engine::model::weights::Residency;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{collect_sequence_stats, collect_stats, CalibSpec, Sequence};

fn spec(seqs: usize, t: usize, layer_major: Option<LayerMajor>) -> CalibSpec {
    CalibSpec {
        layer_major,
        ..calib_spec(seqs, t)
    }
}

fn layer_major(host_bytes: u64, residual: ResidualDtype) -> Option<LayerMajor> {
    Some(LayerMajor {
        host_memory: MemoryBudget::Bytes(host_bytes),
        residual,
    })
}

/// Host bytes of `rows` batch rows of a chunk (x_0..x_L and a gradient, f32).
fn host_bytes<B: Backend>(model: &Model<B>, rows: usize) -> u64 {
    ((model.cfg.layers + 2) * model.cfg.hidden * 4 * rows) as u64
}

/// Windows: one chunk of everything, and chunks of one batch each.
#[test]
fn layer_major_equals_sequence_major_cpu() {
    for name in [
        "tiny-llama3",
        "tiny-qwen2",
        "tiny-qwen3",
        "tiny-mistral",
        "tiny-gemma3",
    ] {
        let be = CpuBackend::new();
        let model = Model::load(&be, &fixture(name)).unwrap();
        let (seqs, t) = (5, 12);
        let windows = stride_ids(seqs * t, model.cfg.vocab, 3);
        let run = |lm| collect_stats(&be, &model, &windows, spec(seqs, t, lm), String::new());
        let want = run(None).unwrap();
        for host in [u64::MAX, host_bytes(&model, 2 * t)] {
            let got = run(layer_major(host, ResidualDtype::F32)).unwrap();
            assert_stats_equal(&got, &want, &format!("{name}, host budget {host} B"));
        }
    }
}

/// Traces of several lengths counted from their prompts' ends.
#[test]
fn layer_major_equals_sequence_major_on_masked_traces() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-gemma3")).unwrap();
    let seqs: Vec<Sequence> = [(9, 4), (6, 2), (9, 5), (7, 3), (6, 1)]
        .iter()
        .enumerate()
        .map(|(i, &(len, from))| Sequence {
            ids: stride_ids(len, model.cfg.vocab, 5 + i as u32),
            counted_from: from,
        })
        .collect();
    let run = |lm| collect_sequence_stats(&be, &model, &seqs, spec(0, 0, lm), "c".into(), None);
    let want = run(None).unwrap();
    for host in [u64::MAX, host_bytes(&model, 18)] {
        let got = run(layer_major(host, ResidualDtype::F32)).unwrap();
        assert_stats_equal(&got, &want, &format!("traces, host budget {host} B"));
    }
}

/// Streamed on the emulated device: the same statistics, and the layer
/// uploads counted: (1 + objectives) × L per chunk layer-major, per batch
/// sequence-major.
#[test]
fn layer_major_uploads_each_layer_once_per_pass_per_chunk() {
    for name in ["tiny-qwen3", "tiny-gemma3"] {
        let (seqs, t) = (6, 10);
        let run = |lm| {
            let be = CudaBackend::new(EmuDevice::new());
            let model = Model::load_with(&be, &fixture(name), Residency::Streamed).unwrap();
            let windows = stride_ids(seqs * t, model.cfg.vocab, 9);
            let st = collect_stats(&be, &model, &windows, spec(seqs, t, lm), String::new());
            (st.unwrap(), model.layer_uploads(), model.cfg.layers)
        };
        let (want, seq_uploads, layers) = run(None);
        let passes = 3; // forward, energy backward, ce backward
        assert_eq!(
            seq_uploads,
            3 * passes * layers,
            "{name}: 3 batches sequence-major"
        );
        let (one, uploads, _) = run(layer_major(u64::MAX, ResidualDtype::F32));
        assert_stats_equal(&one, &want, &format!("{name} on cuda-emu, one chunk"));
        assert_eq!(uploads, passes * layers, "{name}: one chunk");
        // Two batches (4 sequences of 10 tokens) per chunk: chunks of 2 and 1 batches.
        let cfg = rku_engine::model::ModelConfig::load(&fixture(name).join("config.json")).unwrap();
        let two = ((cfg.layers + 2) * cfg.hidden * 4 * 4 * t) as u64;
        let (chunked, uploads, _) = run(layer_major(two, ResidualDtype::F32));
        assert_stats_equal(&chunked, &want, &format!("{name} on cuda-emu, two chunks"));
        assert_eq!(uploads, 2 * passes * layers, "{name}: two chunks");
    }
}

/// bf16 residuals round the stored stream: close to f32, not equal.
#[test]
fn bf16_residuals_are_close_but_rounded() {
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let (seqs, t) = (4, 12);
    let windows = stride_ids(seqs * t, model.cfg.vocab, 1);
    let run = |lm| collect_stats(&be, &model, &windows, spec(seqs, t, lm), String::new()).unwrap();
    let exact = run(None);
    let rounded = run(layer_major(u64::MAX, ResidualDtype::Bf16));
    let mut worst = 0f64;
    for (x, y) in exact.layers.iter().zip(&rounded.layers) {
        worst = worst.max(max_rel_err(&y.s1, &x.s1));
    }
    println!("bf16 residuals: worst s1 error {worst:.2e} of the layer's largest");
    assert!(worst > 0.0, "bf16 residuals changed nothing");
    assert!(worst < 2e-2, "bf16 residuals: s1 off by {worst:.2e}");
}

/// `score --layer-major` prints its chunks and writes the sequence-major
/// file; the chunk flags need --layer-major.
#[test]
fn score_layer_major_cli() {
    let dir = tempfile::tempdir().unwrap();
    let text = calib_text(dir.path(), 40);
    let model = fixture("tiny-llama3");
    let score = |extra: &[&str], out: &str| {
        let mut cmd = bin();
        cmd.args(["score", "--model"])
            .arg(&model)
            .arg("--calib")
            .arg(&text)
            .args(["--samples", "4", "--seq-len", "8", "--batch", "2"])
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out));
        cmd
    };
    // Exactly one batch (2 × 8 rows) per chunk: 2 chunks.
    let cfg = rku_engine::model::ModelConfig::load(&model.join("config.json")).unwrap();
    let one_batch = ((cfg.layers + 2) * cfg.hidden * 4 * 16).to_string();
    let out = score(
        &["--layer-major", "--host-memory", &one_batch],
        "lm.safetensors",
    )
    .output()
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("layer-major: 2 chunk(s)"), "{log}");
    run_ok(&mut score(&[], "seq.safetensors"));
    let a = std::fs::read(dir.path().join("lm.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("seq.safetensors")).unwrap();
    assert!(
        a == b,
        "layer-major and sequence-major statistics files differ"
    );
    let err = run_err(&mut score(
        &["--layer-major", "--host-memory", "1K"],
        "bad.safetensors",
    ));
    assert!(
        err.contains("too small") && err.contains(&one_batch),
        "{err}"
    );
    assert!(!dir.path().join("bad.safetensors").exists());
    let err = run_err(&mut score(&["--host-memory", "1G"], "bad.safetensors"));
    assert!(err.contains("--layer-major"), "{err}");
    let err = run_err(&mut score(
        &["--layer-major", "--residual-dtype", "f16"],
        "bad.safetensors",
    ));
    assert!(err.contains("f16"), "{err}");
}

/// 7 windows of 10 tokens in batches of 2 (4 batches), with or without BOS.
fn ppl<B: Backend>(
    be: &B,
    model: &Model<B>,
    bos: Option<u32>,
    lm: Option<LayerMajor>,
) -> PplResult {
    let t = 10;
    let ids = stride_ids(7 * t, model.cfg.vocab, 4);
    let windows = PplWindows {
        seq_len: t,
        max_windows: Some(7),
        batch: 2,
        bos,
        layer_major: lm,
    };
    perplexity(be, model, &ids, &windows).unwrap()
}

fn assert_ppl_equal(got: &PplResult, want: &PplResult, what: &str) {
    assert_eq!(
        (got.nll.to_bits(), got.tokens, got.windows),
        (want.nll.to_bits(), want.tokens, want.windows),
        "{what}: layer-major NLL {} vs sequence-major {}",
        got.nll,
        want.nll
    );
}

/// Host bytes of one batch of perplexity windows (2 × 10 rows of x_l, f32).
fn ppl_batch_bytes(cfg: &rku_engine::model::ModelConfig) -> u64 {
    (cfg.hidden * 4 * 2 * 10) as u64
}

/// Perplexity layer-major equals sequence-major bit for bit, in one chunk
/// and in chunks of one batch, with and without BOS, on the CPU; streamed on
/// the emulated device each layer is uploaded once per chunk.
#[test]
fn perplexity_layer_major_equals_sequence_major() {
    for name in ["tiny-llama3", "tiny-qwen3", "tiny-gemma3"] {
        let be = CpuBackend::new();
        let model = Model::load(&be, &fixture(name)).unwrap();
        let one_batch = ppl_batch_bytes(&model.cfg);
        for bos in [None, Some(1)] {
            let want = ppl(&be, &model, bos, None);
            for host in [u64::MAX, one_batch] {
                let got = ppl(&be, &model, bos, layer_major(host, ResidualDtype::F32));
                assert_ppl_equal(&got, &want, &format!("{name}, BOS {bos:?}, host {host} B"));
            }
        }
        let run = |lm| {
            let be = CudaBackend::new(EmuDevice::new());
            let model = Model::load_with(&be, &fixture(name), Residency::Streamed).unwrap();
            let r = ppl(&be, &model, None, lm);
            (r, model.layer_uploads())
        };
        let layers = model.cfg.layers;
        let (want, uploads) = run(None);
        assert_eq!(uploads, 4 * layers, "{name}: 4 batches sequence-major");
        let (one, uploads) = run(layer_major(u64::MAX, ResidualDtype::F32));
        assert_ppl_equal(&one, &want, &format!("{name} on cuda-emu, one chunk"));
        assert_eq!(uploads, layers, "{name}: one chunk");
        let (two, uploads) = run(layer_major(2 * one_batch, ResidualDtype::F32));
        assert_ppl_equal(&two, &want, &format!("{name} on cuda-emu, two chunks"));
        assert_eq!(uploads, 2 * layers, "{name}: two chunks of two batches");
    }
}

/// `eval ppl --layer-major` prints its chunks and the sequence-major
/// result; a budget below one batch, and --traces, are refused.
#[test]
fn eval_ppl_layer_major_cli() {
    let dir = tempfile::tempdir().unwrap();
    let text = calib_text(dir.path(), 40);
    let model = fixture("tiny-llama3");
    let cfg = rku_engine::model::ModelConfig::load(&model.join("config.json")).unwrap();
    let eval = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["eval", "ppl", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&text)
            .args([
                "--seq-len",
                "10",
                "--max-windows",
                "7",
                "--batch",
                "2",
                "--json",
            ])
            .args(extra);
        cmd
    };
    let one_batch = ppl_batch_bytes(&cfg).to_string();
    let out = eval(&["--layer-major", "--host-memory", &one_batch])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("layer-major: 4 chunk(s)"), "{log}");
    let last = |s: &str| s.lines().last().unwrap_or_default().to_string();
    let layer_major = last(&String::from_utf8_lossy(&out.stdout));
    let sequence_major = last(&run_ok(&mut eval(&[])));
    assert_eq!(layer_major, sequence_major);
    let err = run_err(&mut eval(&["--layer-major", "--host-memory", "1K"]));
    assert!(
        err.contains("too small") && err.contains(&one_batch),
        "{err}"
    );
    let traces = dir.path().join("t.jsonl");
    std::fs::write(&traces, "").unwrap();
    let err = run_err(
        bin()
            .args(["eval", "ppl", "--model"])
            .arg(&model)
            .arg("--traces")
            .arg(&traces)
            .arg("--layer-major"),
    );
    assert!(err.contains("--layer-major"), "{err}");
}

/// The refit with its residual streams on the host (`--layer-major`)
/// equals the device-resident refit bit for bit: both targets, with a
/// bias, over windows and over masked sequences of several lengths, on the
/// CPU and streamed on the emulated device (where a streamed layer is still
/// uploaded once for the whole refit).
#[test]
fn refit_layer_major_equals_the_resident_refit() {
    use rku_engine::prune::refit::{refit_sequences, RefitLayer, RefitSpec, RefitTarget};
    fn same(got: &[RefitLayer], want: &[RefitLayer], what: &str) {
        for (l, (a, b)) in got.iter().zip(want).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&a.w_down),
                bits(&b.w_down),
                "{what}: layer {l} down_proj"
            );
            assert_eq!(
                a.bias.as_deref().map(bits),
                b.bias.as_deref().map(bits),
                "{what}: layer {l} bias"
            );
            assert_eq!(
                (a.err_zeroed.to_bits(), a.err_refit.to_bits(), a.refitted),
                (b.err_zeroed.to_bits(), b.err_refit.to_bits(), b.refitted),
                "{what}: layer {l} errors"
            );
        }
        assert_eq!(got.len(), want.len());
    }
    let name = "tiny-llama3";
    let cfg = rku_engine::model::ModelConfig::load(&fixture(name).join("config.json")).unwrap();
    // Every third channel removed in every layer.
    let kept: Vec<Vec<usize>> = cfg
        .ffn_widths
        .iter()
        .map(|&m| (0..m).filter(|c| c % 3 != 1).collect())
        .collect();
    let windows: Vec<Sequence> = (0..5)
        .map(|i| Sequence {
            ids: stride_ids(12, cfg.vocab, 20 + i),
            counted_from: 0,
        })
        .collect();
    let masked: Vec<Sequence> = [(9, 4), (6, 2), (9, 5), (7, 3)]
        .iter()
        .enumerate()
        .map(|(i, &(len, from))| Sequence {
            ids: stride_ids(len, cfg.vocab, 30 + i as u32),
            counted_from: from,
        })
        .collect();
    let host = layer_major(u64::MAX, ResidualDtype::F32);
    for target in [RefitTarget::Layer, RefitTarget::Residual] {
        let spec = RefitSpec {
            target,
            bias: true,
            damp: 0.01,
        };
        for (seqs, kind) in [(&windows, "windows"), (&masked, "masked sequences")] {
            let be = CpuBackend::new();
            let model = Model::load(&be, &fixture(name)).unwrap();
            let run = |lm| {
                refit_sequences(&be, &model, &kept, seqs, 2, spec, lm)
                    .unwrap()
                    .0
            };
            let what = format!("{target:?}, {kind}, cpu");
            same(&run(host), &run(None), &what);
            let emu = |lm| {
                let be = CudaBackend::new(EmuDevice::new());
                let model = Model::load_with(&be, &fixture(name), Residency::Streamed).unwrap();
                let r = refit_sequences(&be, &model, &kept, seqs, 2, spec, lm)
                    .unwrap()
                    .0;
                (r, model.layer_uploads())
            };
            let (want, uploads) = emu(None);
            let (got, lm_uploads) = emu(host);
            same(&got, &want, &format!("{target:?}, {kind}, cuda-emu"));
            assert_eq!(
                (uploads, lm_uploads),
                (cfg.layers, cfg.layers),
                "{kind}: uploads"
            );
        }
    }
    // Streams that do not fit the host budget are refused, naming it.
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture(name)).unwrap();
    let spec = RefitSpec {
        target: RefitTarget::Layer,
        bias: false,
        damp: 0.01,
    };
    let small = layer_major(1000, ResidualDtype::F32);
    let e = match refit_sequences(&be, &model, &kept, &windows, 2, spec, small) {
        Ok(_) => panic!("the refit ran past its host budget"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("--host-memory 1000 B is too small"), "{e}");
}
