//! `rku-engine traces`: the model's answers to prompts as jsonl records.
use crate::cli::args::TracesArgs;
use crate::cli::load_model;
use anyhow::Result;
use rku_engine::backend::Backend;
use rku_engine::eval::gen::PromptFormat;
use rku_engine::eval::traces::{self, check_out, run_traces, sampling_mode};
use rku_engine::io::output;
use rku_engine::io::text::Tokenizer;

pub fn run<B: Backend>(be: &B, a: &TracesArgs) -> Result<()> {
    // Every refusal before the model loads.
    let sampling = sampling_mode(a.samples_per_prompt, a.temperature, a.top_p, a.seed)?;
    for p in [Some(&a.model), Some(&a.prompts), a.shots_file.as_ref()]
        .into_iter()
        .flatten()
    {
        output::protect(p);
    }
    check_out(&a.out, a.force)?;
    let model = load_model(be, &a.model, &a.common, Some(&a.decode_weights))?;
    let tok = Tokenizer::load(&a.model)?;
    let mut args = traces::TracesArgs::new(a.prompts.clone(), a.out.clone());
    args.shots = a.shots;
    args.shots_file = a.shots_file.clone();
    args.format = PromptFormat::from_chat_flag(a.chat);
    args.samples = a.samples_per_prompt;
    args.sampling = sampling;
    args.max_new_tokens = a.max_new_tokens;
    args.limit = a.limit;
    args.batch = a.batch;
    args.force = a.force;
    let (r, _) = run_traces(be, &model, &tok, &args)?;
    println!(
        "traces: {} written, {} in {} ({} prompts, {} per prompt, {}); decode {:.1} tokens/s, prefill {:.0} tokens/s",
        r.written,
        r.total,
        r.out.display(),
        r.prompts,
        r.samples_per_prompt,
        r.sampling,
        r.decode_tokens_per_s,
        r.prefill_tokens_per_s
    );
    if let Some(acc) = r.accuracy {
        println!(
            "accuracy {acc:.4} ({}/{} traces in the file with a gold answer)",
            r.correct, r.with_gold
        );
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
