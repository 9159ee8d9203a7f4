//! `rku-engine prune --progressive`: the steps of a progressive pruning
//! (METHODS.md §11), each generating traces with the previous step's model,
//! scoring it over them and pruning it further (`rku_engine::progressive`).
use crate::cli::args::PruneArgs;
use crate::cli::load_options;
use anyhow::{bail, Result};
use rku_engine::backend::Backend;
use rku_engine::eval::gen::PromptFormat;
use rku_engine::eval::traces::{sampling_mode, TracesArgs};
use rku_engine::progressive::{run_progressive, ProgressiveSpec, Schedule};
use rku_engine::prune::ExportLayout;

pub fn run<B: Backend>(be: &B, a: &PruneArgs, schedule: &Schedule) -> Result<()> {
    // Every refusal before anything loads (clap refused the conflicting flags).
    if a.export == ExportLayout::Padded {
        bail!(
            "--progressive exports compact models (each step prunes the previous one, whose \
             padded channels are not channels of the original): drop --export padded"
        );
    }
    let t = &a.trace_gen;
    let Some(prompts) = &t.trace_prompts else {
        bail!("--progressive needs --trace-prompts FILE, the prompts each step's model answers");
    };
    let sampling = sampling_mode(t.samples_per_prompt, t.temperature, t.top_p, t.seed)?;
    let mut traces = TracesArgs::new(prompts.clone(), a.out.clone());
    traces.shots = t.shots;
    traces.shots_file = t.shots_file.clone();
    traces.format = PromptFormat::from_chat_flag(t.chat);
    traces.samples = t.samples_per_prompt;
    traces.sampling = sampling;
    traces.max_new_tokens = t.max_new_tokens;
    traces.limit = t.limit;
    traces.batch = t.trace_batch;
    let c = &a.calib;
    let mut load = load_options(&a.common, None);
    load.ggml_blocks = !t.no_ggml_blocks;
    let spec = ProgressiveSpec {
        schedule: schedule.clone(),
        method: a.method,
        allocation: a.allocation.unwrap_or(a.method.default_allocation()),
        min_keep: a.min_keep,
        align: a.align,
        score: c
            .windows
            .source(Default::default())
            .spec(c.objective.objectives(), false),
        selection: c.select.unwrap_or_default(),
        tokens: c.tokens.unwrap_or_default(),
        max_seq_len: c.max_seq_len,
        traces,
        load,
        out: a.out.clone(),
        force: a.force,
    };
    let r = run_progressive(be, &a.model, &spec)?;
    for s in &r.steps {
        println!(
            "step {}: sparsity {}: {} of {} channels kept ({:.1}% removed), {}{}",
            s.step,
            s.sparsity,
            s.kept_channels,
            s.channels,
            100.0 * (1.0 - s.kept_channels as f64 / s.channels as f64),
            s.model.display(),
            if s.skipped {
                " (complete before, skipped)".to_string()
            } else {
                format!(
                    " ({} traces generated, {:.1} tokens/s, {:.1}s)",
                    s.traces_written, s.decode_tokens_per_s, s.seconds
                )
            }
        );
    }
    println!(
        "progressive pruning {} done in {:.1}s: {}",
        r.schedule
            .iter()
            .map(f64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        r.seconds,
        r.out.display()
    );
    Ok(())
}
