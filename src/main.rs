//! The `rku-engine` command line: each subcommand is a thin function over the library.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::Backend;
use rku_engine::eval::ppl::perplexity;
use rku_engine::io::text::{read_text, Tokenizer};
use rku_engine::model::forward::{forward, Geometry};
use rku_engine::model::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "rku-engine",
    version,
    about = "Reasoning-aware structural pruning of LLM FFN channels (Relative Kinetic Utility)",
    long_about = "Scores every FFN channel of a LLaMA/Qwen2 model by |activation × gradient| of a \
label-free energy objective, prunes the lowest globally and exports a smaller HF model.\n\n\
Typical run:\n  rku-engine import SmolLM2.gguf --out models/smollm2\n  \
rku-engine prune --model models/smollm2 --calib wiki.jsonl --field 0 --method rku --sparsity 0.4 --out models/smollm2-rku40\n  \
rku-engine eval ppl --model models/smollm2-rku40 --text owt.jsonl --field 0"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Token perplexity over non-overlapping windows of held-out text.
    Ppl(PplArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Forward-pass throughput (tokens/s and GFLOP/s, logits included).
    Forward(BenchForwardArgs),
}

/// Which device computes.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    /// The CUDA backend when kernels were built and a driver answers, else the CPU.
    Auto,
    /// Multithreaded f32 on the CPU.
    Cpu,
}

#[derive(Args)]
struct Common {
    /// Compute device.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    backend: BackendKind,
}

/// Text input: a plain text file, or jsonl with the string field --field.
#[derive(Args)]
struct TextArgs {
    /// Plain text, or .jsonl (each row's --field, rows joined by a blank line).
    #[arg(long)]
    text: PathBuf,
    /// jsonl field to read (e.g. `0` for the evals passages); default `text`.
    #[arg(long)]
    field: Option<String>,
}

#[derive(Args)]
struct PplArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    text: TextArgs,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Score at most this many windows.
    #[arg(long)]
    max_windows: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// End the output with one JSON line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchForwardArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repeats after one warm-up pass; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

/// Runs `$body` with `$be` bound to the chosen backend.
macro_rules! with_backend {
    ($kind:expr, |$be:ident| $body:expr) => {{
        match $kind {
            BackendKind::Auto | BackendKind::Cpu => {
                let $be = CpuBackend::new();
                eprintln!("backend: cpu ({} threads)", rayon::current_num_threads());
                $body
            }
        }
    }};
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Eval(EvalCmd::Ppl(a)) => with_backend!(a.common.backend, |be| eval_ppl(&be, &a)),
        Cmd::Bench(BenchCmd::Forward(a)) => {
            with_backend!(a.common.backend, |be| bench_forward(&be, &a))
        }
    }
}

fn load_model<B: Backend>(be: &B, dir: &std::path::Path) -> Result<Model<B>> {
    let t = Instant::now();
    let m = Model::load(be, dir).with_context(|| format!("loading model {}", dir.display()))?;
    eprintln!(
        "model: {} ({:?}, {} layers, {:.1}M parameters) loaded in {:.1}s",
        dir.display(),
        m.cfg.arch,
        m.cfg.layers,
        m.cfg.param_count() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    Ok(m)
}

fn eval_ppl<B: Backend>(be: &B, a: &PplArgs) -> Result<()> {
    let model = load_model(be, &a.model)?;
    let tok = Tokenizer::load(&a.model)?;
    let text = read_text(&a.text.text, a.text.field.as_deref())?;
    let ids = tok.encode(&text)?;
    let r = perplexity(be, &model, &ids, a.seq_len, a.max_windows, a.batch)?;
    println!(
        "perplexity {:.4} (mean NLL {:.5}) over {} windows of {} tokens ({} predicted tokens)",
        r.ppl, r.nll, r.windows, r.seq_len, r.tokens
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// Multiply-add FLOPs of one forward pass over `seqs` sequences of `t`
/// tokens: 2·(linear weights incl. lm_head) per token, plus the causal
/// attention products 2·2·q_dim·(t+1)/2 per token and layer.
fn forward_flops(cfg: &rku_engine::model::ModelConfig, seqs: usize, t: usize) -> f64 {
    let d = cfg.hidden as f64;
    let lin_per_layer: Vec<f64> = cfg
        .ffn_widths
        .iter()
        .map(|&m| d * (2.0 * cfg.q_dim() as f64 + 2.0 * cfg.kv_dim() as f64) + 3.0 * d * m as f64)
        .collect();
    let lin: f64 = lin_per_layer.iter().sum::<f64>() + d * cfg.vocab as f64;
    let attn = cfg.layers as f64 * 2.0 * cfg.q_dim() as f64 * (t as f64 + 1.0);
    seqs as f64 * t as f64 * (2.0 * lin + attn)
}

fn bench_forward<B: Backend>(be: &B, a: &BenchForwardArgs) -> Result<()> {
    if a.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let model = load_model(be, &a.model)?;
    let c = &model.cfg;
    let geo = Geometry {
        seqs: a.batch,
        t: a.seq_len,
    };
    // Deterministic pseudo-random ids (a linear congruential sequence).
    let ids: Vec<u32> = (0..geo.rows() as u64)
        .map(|i| ((i * 2654435761 + 12345) % c.vocab as u64) as u32)
        .collect();
    let run_once = || -> Result<f64> {
        let t = Instant::now();
        let out = forward(be, &model, &ids, geo, false)?;
        let logits = be.linear(&out.z, model.lm_head(), None, geo.rows(), c.hidden, c.vocab)?;
        drop(logits);
        Ok(t.elapsed().as_secs_f64())
    };
    run_once()?;
    let mut times = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        times.push(run_once()?);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = geo.rows() as f64;
    let gflops = forward_flops(c, geo.seqs, geo.t) / median / 1e9;
    println!(
        "forward: {} x {} tokens, median {:.4}s (min {:.4}s, max {:.4}s): {:.0} tokens/s, {:.1} GFLOP/s",
        geo.seqs,
        geo.t,
        median,
        times[0],
        times[times.len() - 1],
        tokens / median,
        gflops
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"seq_len": geo.t, "batch": geo.seqs, "median_s": median,
                "tokens_per_s": tokens / median, "gflops": gflops, "backend": be.name()})
        );
    }
    Ok(())
}
