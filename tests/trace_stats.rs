//! Statistics over traces (METHODS.md §11): the generated-only statistics
//! against a PyTorch reference (scripts/make_trace_fixtures.py), batching
//! that never changes them, and the bad inputs of `score --traces`.
mod common;
use common::*;
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::traces::{tokenizer_digest, SamplingRecord, TraceFinish, TraceRecord};
use rku_engine::model::keep::MemoryBudget;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{collect_sequence_stats, CalibSpec, Sequence};
use rku_engine::prune::stats::{EnergyAt, Objectives, Stats, TraceSource};
use std::path::Path;

const BOTH: Objectives = Objectives {
    energy: true,
    ce: true,
};

fn spec(batch: usize) -> CalibSpec {
    CalibSpec {
        samples: 0,
        seq_len: 0,
        batch,
        objectives: BOTH,
        energy_at: EnergyAt::FinalNorm,
        norms: None,
        activation_memory: MemoryBudget::Auto,
        layer_major: None,
        bos: false,
    }
}

fn source(tokens: &str) -> Option<TraceSource> {
    Some(TraceSource {
        digest: "d".into(),
        selection: "all".into(),
        tokens: tokens.into(),
    })
}

/// The reference's sequences, counted from their prompt's end.
fn reference_seqs() -> (Vec<Sequence>, std::collections::HashMap<String, RefTensor>) {
    let r = load_reference(&fixture("tiny-llama3/traces_reference.safetensors"));
    let seqs = (0..3)
        .map(|i| Sequence {
            ids: r[&format!("seq.{i}.ids")]
                .data
                .iter()
                .map(|&x| x as u32)
                .collect(),
            counted_from: r[&format!("seq.{i}.prompt")].data[0] as usize,
        })
        .collect();
    (seqs, r)
}

#[test]
fn generated_only_statistics_match_pytorch() {
    let (seqs, r) = reference_seqs();
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let st = collect_sequence_stats(&be, &model, &seqs, spec(1), "c".into(), source("generated"))
        .unwrap();
    assert_eq!(st.meta.samples, 3);
    assert_eq!(st.meta.seq_len, 13);
    let counted: usize = seqs.iter().map(|s| s.ids.len() - s.counted_from).sum();
    assert_eq!(st.meta.tokens, counted as u64);
    for (l, layer) in st.layers.iter().enumerate() {
        for (name, got, obj) in [
            ("s1", &layer.s1, "energy"),
            ("s2", &layer.s2, "energy"),
            ("f2", &layer.f2, "energy"),
            ("k1", &layer.k1, "energy"),
            ("tk", &layer.tk, "ce"),
        ] {
            let want = &r[&format!("{obj}.{l}.{name}")].data;
            let err = max_rel_err(got, want);
            assert!(err < 1e-4, "layer {l} {name}: relative error {err}");
        }
    }
}

#[test]
fn batches_of_1_3_8_give_the_same_statistics() {
    let (mut seqs, _) = reference_seqs();
    // Equal lengths to share batches; one sequence counted whole.
    let extra: Vec<Sequence> = seqs
        .iter()
        .map(|s| Sequence {
            ids: s.ids.iter().rev().copied().collect(),
            counted_from: s.counted_from / 2,
        })
        .collect();
    seqs.extend(extra);
    seqs[4].counted_from = 0;
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let run = |b| {
        collect_sequence_stats(&be, &model, &seqs, spec(b), "c".into(), source("generated"))
            .unwrap()
    };
    let one = run(1);
    for b in [3, 8] {
        let other = run(b);
        assert_eq!(other.meta, one.meta);
        for (l, (x, y)) in one.layers.iter().zip(&other.layers).enumerate() {
            for (name, want, got) in [
                ("s1", &x.s1, &y.s1),
                ("s2", &x.s2, &y.s2),
                ("f2", &x.f2, &y.f2),
                ("k1", &x.k1, &y.k1),
                ("tk", &x.tk, &y.tk),
            ] {
                let err = max_rel_err(got, want);
                // tk = |Σ_t h·g| cancels: f32 rounding of products of other
                // row counts shows at ~1e-6 of its largest channel.
                let tol = if name == "tk" { 1e-5 } else { 1e-6 };
                assert!(err < tol, "batch {b} layer {l} {name}: {err}");
            }
        }
    }
}

/// A traces file for the tiny-llama3 tokenizer (or `digest`): one trace
/// per (prompt, sample), `gen[i]` generated tokens, correct when `ok[i]`.
fn write_traces(path: &Path, digest: &str, gen: &[usize], ok: &[Option<bool>]) {
    let lines: Vec<String> = gen
        .iter()
        .zip(ok)
        .enumerate()
        .map(|(i, (&g, &ok))| {
            let r = TraceRecord {
                prompt_index: i / 2,
                sample: i % 2,
                question: format!("q{i}"),
                prompt_ids: (0..4).map(|t| (7 * i + t) as u32 % 50 + 1).collect(),
                generated_ids: (0..g).map(|t| (3 * i + 5 * t) as u32 % 50 + 1).collect(),
                text: "x".into(),
                prompt_tokens: 4,
                generated_tokens: g,
                finish: TraceFinish::Length,
                answer: ok.map(|c| if c { "1" } else { "2" }.to_string()),
                gold: ok.map(|_| "1".to_string()),
                correct: ok,
                tokenizer_digest: digest.into(),
                sampling: SamplingRecord {
                    temperature: Some(0.7),
                    top_p: Some(0.9),
                    seed: Some(1),
                },
            };
            serde_json::to_string(&r).unwrap()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn score(args: &[&str]) -> std::process::Command {
    let mut c = bin();
    c.args(["score", "--model"])
        .arg(fixture("tiny-llama3"))
        .args(["--backend", "cpu"])
        .args(args);
    c
}

#[test]
fn score_over_traces_and_its_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let digest = tokenizer_digest(&fixture("tiny-llama3")).unwrap();
    let gen = [3, 8, 5, 0, 6, 9];
    let ok = [
        Some(true),
        Some(false),
        Some(false),
        Some(false),
        None,
        None,
    ];
    write_traces(Path::new(&p("t.jsonl")), &digest, &gen, &ok);

    // Generated tokens only, cut to 10 tokens: 4 prompt + at most 6 counted.
    let out = score(&[
        "--traces",
        &p("t.jsonl"),
        "--tokens",
        "generated",
        "--max-seq-len",
        "10",
        "--batch",
        "3",
        "--out",
        &p("g.safetensors"),
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("--max-seq-len 10: 2 traces truncated"),
        "{err}"
    );
    let st = Stats::load(Path::new(&p("g.safetensors"))).unwrap();
    let want: usize = gen.iter().map(|&g| g.min(6)).sum();
    assert_eq!((st.meta.samples, st.meta.seq_len), (6, 10));
    assert_eq!(st.meta.tokens, want as u64);
    let t = st.meta.traces.clone().unwrap();
    assert_eq!(
        (t.selection.as_str(), t.tokens.as_str()),
        ("all", "generated")
    );

    // Selections, all tokens, and windows + traces together.
    run_ok(&mut score(&[
        "--traces",
        &p("t.jsonl"),
        "--select",
        "length-band 20,80",
        "--out",
        &p("band.safetensors"),
    ]));
    let band = Stats::load(Path::new(&p("band.safetensors"))).unwrap();
    assert_eq!(band.meta.samples, 4); // lengths 3, 5, 6, 8 of 0, 3, 5, 6, 8, 9
    run_ok(&mut score(&[
        "--traces",
        &p("t.jsonl"),
        "--select",
        "hardest",
        "--out",
        &p("hard.safetensors"),
    ]));
    let hard = Stats::load(Path::new(&p("hard.safetensors"))).unwrap();
    assert_eq!(hard.meta.samples, 2); // prompt 1: 0 of 2 correct
                                      // Summing statistics of different token rules is refused.
    let e = st.clone().add(&band).unwrap_err().to_string();
    assert!(e.contains("different token rules"), "{e}");

    // Bad inputs, each a clear error.
    let e = run_err(&mut score(&[
        "--traces",
        &p("t.jsonl"),
        "--calib",
        &p("t.jsonl"),
        "--tokens",
        "generated",
        "--out",
        &p("x.safetensors"),
    ]));
    assert!(
        e.contains("--tokens generated") && e.contains("--calib"),
        "{e}"
    );
    let other = "ab".repeat(32);
    write_traces(Path::new(&p("other.jsonl")), &other, &gen, &ok);
    let e = run_err(&mut score(&[
        "--traces",
        &p("other.jsonl"),
        "--out",
        &p("x.safetensors"),
    ]));
    assert!(
        e.contains("other.jsonl") && e.contains("another tokenizer"),
        "{e}"
    );
    let none = [None; 6];
    write_traces(Path::new(&p("nogold.jsonl")), &digest, &gen, &none);
    for sel in ["correct", "hardest"] {
        let e = run_err(&mut score(&[
            "--traces",
            &p("nogold.jsonl"),
            "--select",
            sel,
            "--out",
            &p("x.safetensors"),
        ]));
        assert!(
            e.contains("nogold.jsonl") && e.contains("keeps none") && e.contains("gold"),
            "{e}"
        );
    }
    for bad in ["length-band 80,20", "length-band 5", "easiest"] {
        let e = run_err(&mut score(&[
            "--traces",
            &p("t.jsonl"),
            "--select",
            bad,
            "--out",
            &p("x.safetensors"),
        ]));
        assert!(e.contains("--select") || e.contains("selection"), "{e}");
    }
    let e = run_err(&mut score(&[
        "--traces",
        &p("t.jsonl"),
        "--max-seq-len",
        "1",
        "--out",
        &p("x.safetensors"),
    ]));
    assert!(e.contains("--max-seq-len 1"), "{e}");
    assert!(!Path::new(&p("x.safetensors")).exists());
}

/// Trace perplexity with `--tokens generated` (METHODS.md §8, §11): its mean
/// NLL is PyTorch's mean cross-entropy over the positions whose target is
/// generated (the fixture's `ce.J`); with every token counted it is the
/// plain next-token NLL of each sequence, which differs.
#[test]
fn trace_perplexity_matches_pytorch() {
    use rku_engine::eval::ppl::trace_perplexity;
    let (seqs, r) = reference_seqs();
    let be = CpuBackend::new();
    let model = Model::load(&be, &fixture("tiny-llama3")).unwrap();
    let got = trace_perplexity(&be, &model, &seqs).unwrap();
    let want = r["ce.J"].data[0];
    assert!(
        ((got.nll - want) / want).abs() < 1e-5,
        "mean NLL {} vs {want}",
        got.nll
    );
    let predicted: usize = seqs.iter().map(Sequence::predicted).sum();
    assert_eq!(got.tokens, predicted);
    assert_eq!((got.windows, got.seq_len), (3, 13));
    let all: Vec<Sequence> = seqs
        .iter()
        .map(|s| Sequence {
            counted_from: 0,
            ..s.clone()
        })
        .collect();
    let whole = trace_perplexity(&be, &model, &all).unwrap();
    assert_eq!(
        whole.tokens,
        all.iter().map(|s| s.ids.len() - 1).sum::<usize>()
    );
    assert_ne!(whole.nll, got.nll);
}

/// Windows and traces together add their counts; `--select correct` keeps
/// the graded-correct traces; `prune --traces` and `eval ppl --traces` run
/// end to end on the same file.
#[test]
fn traces_with_windows_prune_and_trace_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let digest = tokenizer_digest(&fixture("tiny-llama3")).unwrap();
    let gen = [3, 8, 5, 0, 6, 9];
    let ok = [Some(true), Some(false), Some(true), None, None, None];
    write_traces(Path::new(&p("t.jsonl")), &digest, &gen, &ok);
    let text = calib_text(dir.path(), 200);
    let windows = [
        "--calib",
        text.to_str().unwrap(),
        "--samples",
        "2",
        "--seq-len",
        "8",
    ];
    let load = |n: &str| Stats::load(Path::new(&p(n))).unwrap().meta;
    run_ok(&mut score(&[
        "--traces",
        &p("t.jsonl"),
        "--out",
        &p("a.safetensors"),
    ]));
    run_ok(&mut score(
        &[&windows[..], &["--out", &p("b.safetensors")]].concat(),
    ));
    let (traces, c_out) = (p("t.jsonl"), p("c.safetensors"));
    let both = [&windows[..], &["--traces", &traces, "--out", &c_out]].concat();
    run_ok(&mut score(&both));
    let (a, b, c) = (
        load("a.safetensors"),
        load("b.safetensors"),
        load("c.safetensors"),
    );
    assert_eq!(c.tokens, a.tokens + b.tokens);
    assert_eq!(c.samples, a.samples + b.samples);
    let correct = [
        "--traces",
        &p("t.jsonl"),
        "--select",
        "correct",
        "--out",
        &p("k.safetensors"),
    ];
    run_ok(&mut score(&correct));
    assert_eq!(load("k.safetensors").samples, 2);

    let pruned = dir.path().join("pruned");
    run_ok(
        bin()
            .args(["prune", "--backend", "cpu", "--model"])
            .arg(fixture("tiny-llama3"))
            .args(["--traces", &p("t.jsonl"), "--tokens", "generated"])
            .args(["--method", "rku", "--sparsity", "0.3", "--out"])
            .arg(&pruned),
    );
    assert!(pruned.join("pruning.json").exists());
    let out = run_ok(
        bin()
            .args(["eval", "ppl", "--backend", "cpu", "--model"])
            .arg(&pruned)
            .args(["--traces", &p("t.jsonl"), "--tokens", "generated", "--json"]),
    );
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let predicted: usize = gen.iter().sum();
    assert_eq!(r["tokens"].as_u64().unwrap() as usize, predicted);
    assert!(r["ppl"].as_f64().unwrap().is_finite());
}

/// A traces file with the model's tokenizer digest can still hold ids the
/// model has no row for, or nothing to predict: each is an error naming
/// the file, before any pass.
#[test]
fn traces_outside_the_vocabulary_or_with_nothing_to_predict_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let model = fixture("tiny-llama3");
    let digest = tokenizer_digest(&model).unwrap();
    let vocab = rku_engine::model::config::ModelConfig::load(&model.join("config.json"))
        .unwrap()
        .vocab;
    write_traces(&p("t.jsonl"), &digest, &[3, 5], &[None, None]);
    let text = std::fs::read_to_string(p("t.jsonl")).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[1]["generated_ids"][2] = vocab.into();
    let oov: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    std::fs::write(p("oov.jsonl"), oov.join("\n") + "\n").unwrap();
    let ppl = |traces: &Path| {
        let mut c = bin();
        c.args(["eval", "ppl", "--model"])
            .arg(&model)
            .arg("--traces")
            .arg(traces)
            .args(["--tokens", "generated", "--backend", "cpu"]);
        c
    };
    let out = p("x.safetensors");
    for mut cmd in [
        ppl(&p("oov.jsonl")),
        score(&[
            "--traces",
            p("oov.jsonl").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]),
    ] {
        let e = run_err(&mut cmd);
        assert!(
            e.contains("oov.jsonl")
                && e.contains(&format!("token id {vocab}, outside the model's vocabulary")),
            "{e}"
        );
    }
    write_traces(&p("empty.jsonl"), &digest, &[0, 0], &[None, None]);
    let e = run_err(&mut ppl(&p("empty.jsonl")));
    assert!(
        e.contains("empty.jsonl") && e.contains("has a token to predict"),
        "{e}"
    );
    assert!(!out.exists());
}
