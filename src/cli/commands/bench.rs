//! `rku-engine bench forward|score|decode|prefill`: throughput on synthetic ids.
use crate::cli::args::{
    BenchDecodeArgs, BenchForwardArgs, BenchPrefillArgs, BenchRecoverArgs, BenchScoreArgs,
};
use crate::cli::load_model;
use anyhow::Result;
use rku_engine::backend::Backend;
use rku_engine::eval::prefill::bench_prefill;
use rku_engine::eval::throughput::{bench_decode, bench_forward};
use rku_engine::prune::calibrate::bench_score;
use rku_engine::recover::bench_recover;

pub fn forward<B: Backend>(be: &B, a: &BenchForwardArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common, None)?;
    let r = bench_forward(be, &model, a.seq_len, a.batch, a.repeats)?;
    println!(
        "forward: {} x {} tokens, median of {} {:.4}s (min {:.4}s, max {:.4}s): {:.0} tokens/s, {:.1} GFLOP/s; every launch issued after {:.4}s (median)",
        r.batch,
        r.seq_len,
        r.repeats,
        r.timing.median_s,
        r.timing.min_s,
        r.timing.max_s,
        r.tokens_per_s,
        r.gflops,
        r.queued.median_s
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn score<B: Backend>(be: &B, a: &BenchScoreArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common, None)?;
    let r = bench_score(be, &model, a.seq_len, a.samples, a.activation_memory)?;
    println!(
        "score (energy, forward + backward + statistics): {} x {} tokens in {:.2}s: {:.0} tokens/s",
        r.samples, r.seq_len, r.seconds, r.tokens_per_s
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn recover<B: Backend>(be: &B, a: &BenchRecoverArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common, None)?;
    let r = bench_recover(
        be,
        &model,
        a.batch,
        a.seq_len,
        a.steps,
        a.lora_rank,
        a.activation_memory,
    )?;
    println!(
        "recover (LoRA-KD rank {}, batch {} x {} tokens): {} steps in {:.2}s: {:.0} tokens/s",
        r.rank, r.batch, r.seq_len, r.steps, r.seconds, r.tokens_per_s
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn decode<B: Backend>(be: &B, a: &BenchDecodeArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common, Some(&a.decode_weights))?;
    let r = bench_decode(be, &model, a.prompt_len, a.new_tokens, a.batch)?;
    println!(
        "decode: {} tokens after a {}-token prompt, batch {}: {:.2}s, {:.1} tokens/s",
        r.new_tokens, r.prompt_len, r.batch, r.seconds, r.tokens_per_s
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

pub fn prefill<B: Backend>(be: &B, a: &BenchPrefillArgs) -> Result<()> {
    let dense = load_model(be, &a.model, &a.common, None)?;
    let pruned = load_model(be, &a.pruned, &a.common, None)?;
    let r = bench_prefill(be, &dense, &pruned, a.seq_len, a.repeats)?;
    println!(
        "prefill, {} tokens, batch 1, {} timed runs each: dense median {:.4}s (min {:.4}, max {:.4}), pruned median {:.4}s (min {:.4}, max {:.4}): {:.2}x speedup",
        r.seq_len,
        r.repeats,
        r.dense.median_s,
        r.dense.min_s,
        r.dense.max_s,
        r.pruned.median_s,
        r.pruned.min_s,
        r.pruned.max_s,
        r.speedup
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
