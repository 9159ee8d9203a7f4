//! Criterion benchmarks of the evaluations on the real model (SmolLM2-135M,
//! CPU backend): `eval gen` on a few GSM-symbolic problems (plain 2-shot and
//! chat 0-shot) and `eval mc` on a few items of each BIG-bench task. Each
//! prints its accuracy summary and (gen) the first generation on its first
//! run, so a run doubles as a smoke check of what the model answers.
//!
//!     cargo bench --bench eval
//!
//! Needs assets/models/smollm2 (`scripts/fetch-assets.sh --import BIN`) and
//! assets/eval (`scripts/make-eval-data.py`); without them each benchmark is
//! skipped with that message, except under CI (`CI` set), where a missing
//! asset is an error (tests/common `asset`). `cargo test --all-targets` runs
//! each benchmark once (criterion's test mode, about a minute on 2 cores),
//! which is why the sizes are small. Decode throughput alone is `rku-engine bench decode` and prefill
//! `rku-engine bench prefill`: not repeated here.
#[path = "../tests/common/mod.rs"]
mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::eval::gen::{evaluate_gen, GenArgs, PromptFormat};
use rku_engine::eval::mc::{evaluate_mc, McArgs};
use rku_engine::io::text::Tokenizer;
use rku_engine::model::Model;
use std::time::Duration;

/// GSM-symbolic problems per run, and the decoding budget of each.
const GEN_PROBLEMS: usize = 4;
const GEN_NEW_TOKENS: usize = 48;
/// BIG-bench items per task and run.
const MC_ITEMS: usize = 8;
const MC_TASKS: [&str; 3] = ["physical_intuition", "strategyqa", "winowhy"];

fn eval_benches(c: &mut Criterion) {
    let (Some(dir), Some(data)) = (common::asset("models/smollm2"), common::asset("eval")) else {
        return;
    };
    let be = CpuBackend::new();
    let model = Model::load(&be, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();

    let mut g = c.benchmark_group("eval/smollm2");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));

    for (name, format, shots) in [
        ("gen-plain-2shot", PromptFormat::Plain, 2),
        ("gen-chat-0shot", PromptFormat::Chat, 0),
    ] {
        let args = GenArgs {
            format,
            shots,
            limit: Some(GEN_PROBLEMS),
            batch: GEN_PROBLEMS,
            max_new_tokens: GEN_NEW_TOKENS,
            task: Some("GSM-symbolic".into()),
            ..GenArgs::new(data.join("gsm_symbolic.jsonl"))
        };
        let mut printed = false;
        g.bench_function(name, |it| {
            it.iter(|| {
                let (res, recs) = evaluate_gen(&be, &model, &tok, &args).unwrap();
                if !std::mem::replace(&mut printed, true) {
                    println!("{name}: {}", serde_json::to_string(&res).unwrap());
                    println!(
                        "{name}: {:?} -> {:?} (gold {})",
                        recs[0].generation, recs[0].extracted, recs[0].gold
                    );
                }
            })
        });
    }

    for task in MC_TASKS {
        let args = McArgs {
            limit: Some(MC_ITEMS),
            ..McArgs::new(data.join(format!("bigbench_{task}.jsonl")))
        };
        let mut printed = false;
        g.bench_function(format!("mc-{task}"), |it| {
            it.iter(|| {
                let (res, _) = evaluate_mc(&be, &model, &tok, &args).unwrap();
                if !std::mem::replace(&mut printed, true) {
                    println!("mc-{task}: {}", serde_json::to_string(&res).unwrap());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, eval_benches);
criterion_main!(benches);
