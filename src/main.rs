//! The `rku-engine` command line: each subcommand is a thin function over the library.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rku_engine::backend::cpu::CpuBackend;
use rku_engine::backend::cuda::{has_kernels, CudaBackend, EmuDevice, GpuDevice};
use rku_engine::backend::Backend;
use rku_engine::eval::gen::{evaluate_gen, GenArgs, PromptFormat};
use rku_engine::eval::iou::read_kept;
use rku_engine::eval::mc::{evaluate_mc, McArgs};
use rku_engine::eval::ppl::perplexity;
use rku_engine::eval::prefill::bench_prefill;
use rku_engine::io::export::ExportLayout;
use rku_engine::io::import::{import_gguf, ImportOptions};
use rku_engine::io::text::{read_text, Tokenizer};
use rku_engine::io::text::{token_digest, windows};
use rku_engine::model::decode::{argmax, Decoder};
use rku_engine::model::forward::{forward, synthetic_ids, Geometry};
use rku_engine::model::weights::{LoadOptions, Residency};
use rku_engine::model::{Model, ModelConfig};
use rku_engine::plan::{plan, PlanSpec};
use rku_engine::prune::calibrate::{collect_stats, down_column_norms, CalibSpec};
use rku_engine::prune::pipeline::{output_dir, prune_model, PruneJob};
use rku_engine::prune::{merge, Allocation, EnergyAt, Method, Objectives, Stats};
use rku_engine::report::{run_report, CalibSource, PplSpec, PrefillSpec, ReportSpec};
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
    /// Convert a GGUF (LLaMA or Qwen2) into an HF model directory.
    Import(ImportArgs),
    /// Compute per-channel statistics on calibration text (one pass serves every method).
    Score(ScoreArgs),
    /// Score (or read statistics), allocate, compact and export pruned models.
    Prune(PruneArgs),
    /// Work with statistics files.
    #[command(subcommand)]
    Stats(StatsCmd),
    /// Overlap (IoU) of the kept channels of two pruned models.
    Iou(IouArgs),
    /// Device memory of a scoring run: every resident buffer and the peak.
    Plan(PlanArgs),
    /// Evaluate a model.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// One statistics pass, every method × sparsity pruned and evaluated (and
    /// the dense model): report.json, report.md (tables), SVG plots. Resumable.
    Report(Box<ReportArgs>),
}

#[derive(Subcommand)]
enum StatsCmd {
    /// Sum statistics files computed on disjoint calibration shards of one model.
    Merge(MergeArgs),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Token perplexity over non-overlapping windows of held-out text.
    Ppl(PplArgs),
    /// GSM8K-style reasoning accuracy: greedy decoding with a KV cache, exact match.
    Gen(GenCliArgs),
    /// Multiple choice by log-likelihood (acc and acc_norm, lm-eval conventions).
    Mc(McCliArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Forward-pass throughput (tokens/s and GFLOP/s, logits included).
    Forward(BenchForwardArgs),
    /// Scoring throughput: forward + energy backward + statistics (tokens/s).
    Score(BenchScoreArgs),
    /// Greedy decoding throughput with the KV cache, batch 1 (tokens/s).
    Decode(BenchDecodeArgs),
    /// Prefill time of a dense and a pruned model, timed alternately; the speedup.
    Prefill(BenchPrefillArgs),
}

/// Which device computes.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    /// The CUDA backend when kernels were built and a driver answers, else the CPU.
    Auto,
    /// Multithreaded f32 on the CPU.
    Cpu,
    /// The CUDA kernels on the GPU (cuBLAS for matrix products, bf16 weights).
    Cuda,
    /// The same CUDA kernels and launch code executed on the CPU by the
    /// emulated device (slow: for checking, on tiny models).
    CudaEmu,
}

#[derive(Args)]
struct Common {
    /// Compute device.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    backend: BackendKind,
    /// Upload the decoder layers one at a time from the memory-mapped files
    /// as each pass reaches them (two layers resident; on a GPU the next
    /// layer's upload overlaps the current layer's compute) instead of all at
    /// load: for models larger than the device. `rku-engine plan --stream`
    /// shows the peak. Slow for generation, which passes every layer per token.
    #[arg(long)]
    stream: bool,
}

/// The weights decoding reads.
#[derive(Args)]
struct DecodeWeightArgs {
    /// Decode from the f32 weights even when the model directory has
    /// ggml_blocks.safetensors (written by `import` from a GGUF's Q4_1/Q8_0
    /// matrices). By default the CPU backend's decoding steps read those
    /// blocks, which dequantise to exactly the f32 weights (checked at load)
    /// in 4-6x fewer bytes.
    #[arg(long)]
    no_ggml_blocks: bool,
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

/// Calibration input (METHODS.md section 2).
#[derive(Args)]
struct CalibArgs {
    /// Calibration text: plain text, or .jsonl read through --field.
    #[arg(long)]
    calib: Option<PathBuf>,
    #[command(flatten)]
    windows: WindowArgs,
    /// Objectives to run: energy (rku, agf, rku-fisher), ce (taylor) or both.
    #[arg(long, default_value = "both", value_parser = ["energy", "ce", "both"])]
    objective: String,
}

/// How the calibration text becomes scored windows (METHODS.md section 2).
#[derive(Args)]
struct WindowArgs {
    /// jsonl field of the calibration text (e.g. `0` for the evals passages); default `text`.
    #[arg(long)]
    field: Option<String>,
    /// N: calibration sequences.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// T: tokens per calibration sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Prefix each calibration window with the BOS token.
    #[arg(long)]
    bos: bool,
    /// Calibration sequences per forward/backward batch (memory vs speed; results do not change).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Where the energy objective reads the model: final-norm (z) or pre-norm (x_L).
    #[arg(long, default_value = "final-norm")]
    energy_at: String,
}

#[derive(Args)]
struct ScoreArgs {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    calib: CalibArgs,
    /// Output statistics file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct PruneArgs {
    /// HF model directory to prune.
    #[arg(long)]
    model: PathBuf,
    /// Statistics files from `score` (summed when several); instead of --calib.
    #[arg(long, num_args = 1.., conflicts_with = "calib")]
    stats: Vec<PathBuf>,
    #[command(flatten)]
    calib: CalibArgs,
    /// Scoring method: rku, agf, wanda-struct, flap, taylor, rku-fisher.
    #[arg(long, default_value = "rku")]
    method: String,
    /// Fractions of FFN channels to remove, comma-separated (one model each).
    #[arg(long, value_delimiter = ',', required = true)]
    sparsity: Vec<f64>,
    /// uniform or global; default: the method's own (METHODS.md section 5).
    #[arg(long)]
    allocation: Option<String>,
    /// Channels every layer keeps at least (default 5% of its width, at least 1).
    #[arg(long)]
    min_keep: Option<usize>,
    /// Round every layer's kept width to a multiple of this.
    #[arg(long, default_value_t = 1)]
    align: usize,
    /// compact (smaller layers) or padded (zero-padded to the widest, loads in stock transformers).
    #[arg(long, default_value = "compact")]
    export: String,
    /// Output directory; with several sparsities, one subdirectory `<method>-s<sparsity>` each.
    #[arg(long)]
    out: PathBuf,
    /// Replace existing outputs.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ImportArgs {
    /// The GGUF file (v2/v3; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K tensors).
    gguf: PathBuf,
    /// Output model directory (model.safetensors, config.json, tokenizer files).
    #[arg(long)]
    out: PathBuf,
    /// dtype of the written weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Do not also write ggml_blocks.safetensors, the Q4_1/Q8_0 matrices'
    /// own blocks (f32 output only), which decoding reads instead of the
    /// f32 values it equals: 4-6x fewer bytes per token.
    #[arg(long)]
    no_blocks: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// Statistics files to sum.
    #[arg(required = true, num_args = 2..)]
    files: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct IouArgs {
    /// A pruned model directory (or its pruning.json).
    a: PathBuf,
    /// Another pruned model directory (or its pruning.json).
    b: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PlanArgs {
    /// HF model directory (its config.json is read).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    model: Option<PathBuf>,
    /// A config.json alone (e.g. a 7B model's, without its weights).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Objectives scored: energy, ce or both.
    #[arg(long, default_value = "energy", value_parser = ["energy", "ce", "both"])]
    objective: String,
    /// Weights streamed one layer at a time (about two layers resident).
    #[arg(long)]
    stream: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = "Example (SmolLM2, short evaluations):\n  \
rku-engine report --model assets/models/smollm2 --calib assets/text/wikipedia.jsonl --field 0 \\\n    \
--samples 32 --seq-len 128 --ppl-text assets/text/owt.jsonl --ppl-field 0 --ppl-max-windows 50 \\\n    \
--gen-data gsm.jsonl --mc-data mc.jsonl --limit 20 --out reports/smollm2\n\n\
Every finished cell (statistics, a pruning, one metric of one model) is saved under OUT/cells/; \
rerunning the same command skips them. Changed inputs (model, calibration, evaluation files \
or settings) that would make finished cells inconsistent are refused unless --force, which \
recomputes exactly those cells.")]
struct ReportArgs {
    /// HF model directory of the dense model.
    #[arg(long)]
    model: PathBuf,
    /// Calibration text: plain text, or .jsonl read through --field.
    #[arg(long)]
    calib: PathBuf,
    #[command(flatten)]
    windows: WindowArgs,
    /// Methods, comma-separated (rku, agf, wanda-struct, flap, taylor, rku-fisher), each
    /// with its own allocation; the statistics pass runs the objectives they need.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rku,agf,wanda-struct,flap,taylor"
    )]
    methods: Vec<String>,
    /// Fractions of FFN channels to remove, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.4,0.5")]
    sparsity: Vec<f64>,
    /// Channels every layer keeps at least (default 5% of its width, at least 1).
    #[arg(long)]
    min_keep: Option<usize>,
    /// Round every layer's kept width to a multiple of this.
    #[arg(long, default_value_t = 1)]
    align: usize,
    /// Held-out text for perplexity (plain, or .jsonl through --ppl-field); omitted: no ppl column.
    #[arg(long)]
    ppl_text: Option<PathBuf>,
    /// jsonl field of --ppl-text; default `text`.
    #[arg(long)]
    ppl_field: Option<String>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 128)]
    ppl_seq_len: usize,
    /// Score at most this many perplexity windows.
    #[arg(long)]
    ppl_max_windows: Option<usize>,
    /// GSM8K-style problems (jsonl, as `eval gen`); omitted: no gen column.
    #[arg(long)]
    gen_data: Option<PathBuf>,
    /// Few-shot examples per gen prompt (the first rows of --gen-data, not evaluated).
    #[arg(long, default_value_t = 8)]
    gen_shots: usize,
    /// Prompt gen with the model's chat template instead of plain "Question: ... Answer:".
    #[arg(long)]
    gen_chat: bool,
    /// Most tokens generated per problem.
    #[arg(long, default_value_t = 256)]
    gen_max_new_tokens: usize,
    /// Problems decoded together.
    #[arg(long, default_value_t = 8)]
    gen_batch: usize,
    /// Multiple-choice items (jsonl, as `eval mc`); omitted: no mc column.
    #[arg(long)]
    mc_data: Option<PathBuf>,
    /// (context, choice) sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    mc_batch: usize,
    /// Evaluate at most this many gen problems and mc items (the first ones).
    #[arg(long)]
    limit: Option<usize>,
    /// Prompt tokens of the prefill timing (each pruned model against the dense one).
    #[arg(long, default_value_t = 512)]
    prefill_seq_len: usize,
    /// Timed prefills of each model, after one warm-up each; the median is reported.
    #[arg(long, default_value_t = 3)]
    prefill_repeats: usize,
    /// Skip the prefill timing (no speedup column).
    #[arg(long)]
    no_prefill: bool,
    /// Output directory; rerunning into it resumes.
    #[arg(long)]
    out: PathBuf,
    /// Keep every pruned model under OUT/models/ (by default each is removed once evaluated).
    #[arg(long)]
    keep_models: bool,
    /// Recompute the finished cells whose inputs changed, instead of refusing.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchScoreArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences scored after one warm-up sequence.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct GenCliArgs {
    #[arg(long)]
    model: PathBuf,
    /// Problems: jsonl with question/answer ("... #### N") or a numeric answer field.
    #[arg(long)]
    data: PathBuf,
    /// Few-shot examples per prompt (held out from --data unless --shots-file).
    #[arg(long, default_value_t = 8)]
    shots: usize,
    /// Take the shots from this jsonl instead of the first rows of --data.
    #[arg(long)]
    shots_file: Option<PathBuf>,
    /// Prompt with the model's chat template (tokenizer_config.json) instead of plain "Question: ... Answer:".
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Evaluate at most this many problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Problems decoded together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Label of the task in the results (e.g. GSM-symbolic).
    #[arg(long)]
    task: Option<String>,
    /// Per-problem jsonl (prompt, generation, extracted, gold, correct).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct McCliArgs {
    #[arg(long)]
    model: PathBuf,
    /// Items: jsonl with question/context, choices, gold index.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    limit: Option<usize>,
    /// (context, choice) sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long)]
    task: Option<String>,
    /// Per-item jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchPrefillArgs {
    /// The dense model directory.
    #[arg(long)]
    model: PathBuf,
    /// The pruned model directory.
    #[arg(long)]
    pruned: PathBuf,
    /// Prompt tokens.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Timed prefills of each model after one warm-up each.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BenchDecodeArgs {
    #[arg(long)]
    model: PathBuf,
    /// Prompt tokens (prefilled, not timed).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decoding steps timed.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Sequences decoded together (the same prompt each); tokens/s counts all.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    common: Common,
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

/// `auto` resolved: cuda when the binary has kernels and a GPU answers.
fn resolve_backend(kind: BackendKind) -> BackendKind {
    match kind {
        BackendKind::Auto if has_kernels() => match GpuDevice::new(0) {
            Ok(_) => BackendKind::Cuda,
            Err(e) => {
                eprintln!("backend auto: no usable GPU ({e}); using the cpu");
                BackendKind::Cpu
            }
        },
        BackendKind::Auto => BackendKind::Cpu,
        k => k,
    }
}

/// Runs `$body` with `$be` bound to the chosen backend (monomorphised per backend).
macro_rules! with_backend {
    ($kind:expr, |$be:ident| $body:expr) => {{
        match resolve_backend($kind) {
            BackendKind::Cuda => {
                let $be = CudaBackend::new(GpuDevice::new(0)?);
                eprintln!("backend: cuda");
                $body
            }
            BackendKind::CudaEmu => {
                let $be = CudaBackend::new(EmuDevice::new());
                eprintln!("backend: cuda-emu (CUDA kernels emulated on the CPU)");
                $body
            }
            _ => {
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
        Cmd::Import(a) => import(&a),
        Cmd::Score(a) => with_backend!(a.common.backend, |be| score(&be, &a)),
        Cmd::Prune(a) => with_backend!(a.common.backend, |be| prune(&be, &a)),
        Cmd::Stats(StatsCmd::Merge(a)) => stats_merge(&a),
        Cmd::Iou(a) => iou(&a),
        Cmd::Plan(a) => memory_plan(&a),
        Cmd::Report(a) => with_backend!(a.common.backend, |be| report(&be, &a)),
        Cmd::Bench(BenchCmd::Prefill(a)) => {
            with_backend!(a.common.backend, |be| prefill(&be, &a))
        }
        Cmd::Bench(BenchCmd::Decode(a)) => {
            with_backend!(a.common.backend, |be| bench_decode(&be, &a))
        }
        Cmd::Bench(BenchCmd::Score(a)) => {
            with_backend!(a.common.backend, |be| bench_score(&be, &a))
        }
        Cmd::Eval(EvalCmd::Gen(a)) => with_backend!(a.common.backend, |be| eval_gen(&be, &a)),
        Cmd::Eval(EvalCmd::Mc(a)) => with_backend!(a.common.backend, |be| eval_mc(&be, &a)),
        Cmd::Eval(EvalCmd::Ppl(a)) => with_backend!(a.common.backend, |be| eval_ppl(&be, &a)),
        Cmd::Bench(BenchCmd::Forward(a)) => {
            with_backend!(a.common.backend, |be| bench_forward(&be, &a))
        }
    }
}

/// Where `--stream` puts the layers; with `decode` (not `--no-ggml-blocks`)
/// the ggml blocks are loaded too.
fn load_options(common: &Common, decode: Option<&DecodeWeightArgs>) -> LoadOptions {
    LoadOptions {
        residency: if common.stream {
            Residency::Streamed
        } else {
            Residency::Resident
        },
        ggml_blocks: decode.is_some_and(|d| !d.no_ggml_blocks),
    }
}

fn load_model<B: Backend>(be: &B, dir: &std::path::Path, common: &Common) -> Result<Model<B>> {
    load_model_with(be, dir, common, None)
}

/// `load_model` for a command that decodes (`decode`: its weight flags).
fn load_model_with<B: Backend>(
    be: &B,
    dir: &std::path::Path,
    common: &Common,
    decode: Option<&DecodeWeightArgs>,
) -> Result<Model<B>> {
    let t = Instant::now();
    let m = Model::load_with(be, dir, load_options(common, decode))
        .with_context(|| format!("loading model {}", dir.display()))?;
    eprintln!(
        "model: {} ({:?}, {} layers, {:.1}M parameters) loaded in {:.1}s{}",
        dir.display(),
        m.cfg.arch,
        m.cfg.layers,
        m.cfg.param_count() as f64 / 1e6,
        t.elapsed().as_secs_f64(),
        match (common.stream, m.has_ggml_blocks()) {
            (false, false) => "",
            (true, false) => " (layers streamed)",
            (false, true) => " (with its ggml blocks)",
            (true, true) => " (layers streamed, with their ggml blocks)",
        }
    );
    Ok(m)
}

fn eval_ppl<B: Backend>(be: &B, a: &PplArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common)?;
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
    let model = load_model(be, &a.model, &a.common)?;
    let c = &model.cfg;
    let geo = Geometry {
        seqs: a.batch,
        t: a.seq_len,
    };
    let ids = synthetic_ids(geo.rows(), c.vocab);
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

/// `energy`, `ce` or `both`.
fn parse_objectives(s: &str) -> Result<Objectives> {
    Ok(match s {
        "both" => Objectives {
            energy: true,
            ce: true,
        },
        o => o.parse()?,
    })
}

fn memory_plan(a: &PlanArgs) -> Result<()> {
    let path = match (&a.model, &a.config) {
        (Some(dir), _) => dir.join("config.json"),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("pass --model DIR or --config config.json"),
    };
    let cfg = ModelConfig::load(&path)?;
    let spec = PlanSpec::new(
        a.seq_len,
        a.batch,
        parse_objectives(&a.objective)?,
        a.stream,
    );
    let p = plan(&cfg, &spec)?;
    println!("{p}");
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}

fn calib_spec(c: &CalibArgs) -> Result<CalibSpec> {
    let objectives = parse_objectives(&c.objective)?;
    Ok(CalibSpec {
        samples: c.windows.samples,
        seq_len: c.windows.seq_len,
        batch: c.windows.batch,
        objectives,
        energy_at: c.windows.energy_at.parse::<EnergyAt>()?,
    })
}

/// Reads, tokenizes and windows the calibration text; returns (ids, digest).
fn calib_windows<B: Backend>(model: &Model<B>, c: &CalibArgs) -> Result<(Vec<u32>, String)> {
    let path = c
        .calib
        .as_ref()
        .context("calibration text needed: pass --calib FILE (or --stats)")?;
    let tok = Tokenizer::load(&model.dir)?;
    let text = read_text(path, c.windows.field.as_deref())?;
    let ids = tok.encode(&text)?;
    let bos = if c.windows.bos {
        Some(
            model
                .cfg
                .bos_token_id
                .context("--bos given but config.json has no bos_token_id")?,
        )
    } else {
        None
    };
    let windows = windows(&ids, c.windows.samples, c.windows.seq_len, bos)?;
    let digest = token_digest(&windows);
    eprintln!(
        "calibration: {} sequences x {} tokens from {} (digest {}…)",
        c.windows.samples,
        c.windows.seq_len,
        path.display(),
        &digest[..12]
    );
    Ok((windows, digest))
}

fn run_scoring<B: Backend>(be: &B, model: &Model<B>, c: &CalibArgs) -> Result<Stats> {
    let spec = calib_spec(c)?;
    let (ids, digest) = calib_windows(model, c)?;
    let t = Instant::now();
    let stats = collect_stats(be, model, &ids, spec, digest)?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scored {} tokens ({}) in {secs:.1}s: {:.0} tokens/s",
        ids.len(),
        spec.objectives,
        ids.len() as f64 / secs
    );
    Ok(stats)
}

fn score<B: Backend>(be: &B, a: &ScoreArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!(
            "{} already exists (pass --force to replace it)",
            a.out.display()
        );
    }
    let model = load_model(be, &a.model, &a.common)?;
    let stats = run_scoring(be, &model, &a.calib)?;
    stats.save(&a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

fn prune<B: Backend>(be: &B, a: &PruneArgs) -> Result<()> {
    let method: Method = a.method.parse()?;
    let allocation = match &a.allocation {
        Some(s) => s.parse::<Allocation>()?,
        None => method.default_allocation(),
    };
    let layout: ExportLayout = a.export.parse()?;
    for &s in &a.sparsity {
        if !(s > 0.0 && s < 1.0) {
            bail!("sparsity must be strictly between 0 and 1, got {s}");
        }
    }
    let several = a.sparsity.len() > 1;
    let outs: Vec<PathBuf> = a
        .sparsity
        .iter()
        .map(|&s| output_dir(&a.out, method, s, several))
        .collect();
    if !a.force {
        if let Some(o) = outs.iter().find(|o| o.exists()) {
            bail!(
                "{} already exists (pass --force to replace it)",
                o.display()
            );
        }
    }
    let model = load_model(be, &a.model, &a.common)?;
    let stats = match a.stats.as_slice() {
        [] => run_scoring(be, &model, &a.calib)?,
        [one] => Stats::load(one)?,
        many => merge(many)?,
    };
    let norms = down_column_norms(&model)?;
    for (&sparsity, out) in a.sparsity.iter().zip(outs) {
        let job = PruneJob {
            method,
            allocation,
            sparsity,
            min_keep: a.min_keep,
            align: a.align,
            layout,
            out,
            force: a.force,
        };
        let r = prune_model(be, &model, &stats, &norms, &job)?;
        println!(
            "{} at sparsity {}: {} -> {} parameters ({:.1}% removed), widths {}..{}, wrote {}",
            r.method,
            r.sparsity,
            r.params_before,
            r.params_after,
            100.0 * (1.0 - r.params_after as f64 / r.params_before as f64),
            r.widths.iter().min().unwrap_or(&0),
            r.widths.iter().max().unwrap_or(&0),
            r.out.display()
        );
    }
    Ok(())
}

fn stats_merge(a: &MergeArgs) -> Result<()> {
    if a.out.exists() && !a.force {
        bail!(
            "{} already exists (pass --force to replace it)",
            a.out.display()
        );
    }
    let merged = merge(&a.files)?;
    merged.save(&a.out)?;
    println!(
        "merged {} files: {} sequences, {} tokens -> {}",
        a.files.len(),
        merged.meta.samples,
        merged.meta.tokens,
        a.out.display()
    );
    Ok(())
}

fn iou(a: &IouArgs) -> Result<()> {
    let r = rku_engine::eval::iou::iou(&read_kept(&a.a)?, &read_kept(&a.b)?)?;
    for (l, v) in r.per_layer.iter().enumerate() {
        println!("layer {l:>3}: {v:.4}");
    }
    println!("mean IoU {:.4}", r.mean);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn bench_score<B: Backend>(be: &B, a: &BenchScoreArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common)?;
    let t = a.seq_len;
    let ids = synthetic_ids((a.samples + 1) * t, model.cfg.vocab);
    let spec = |n| CalibSpec {
        samples: n,
        seq_len: t,
        batch: 1,
        objectives: Objectives {
            energy: true,
            ce: false,
        },
        energy_at: EnergyAt::FinalNorm,
    };
    collect_stats(be, &model, &ids[..t], spec(1), String::new())?; // warm-up
    let start = Instant::now();
    collect_stats(be, &model, &ids[t..], spec(a.samples), String::new())?;
    let secs = start.elapsed().as_secs_f64();
    let tokens = (a.samples * t) as f64;
    println!(
        "score (energy, forward + backward + statistics): {} x {t} tokens in {secs:.2}s: {:.0} tokens/s",
        a.samples,
        tokens / secs
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"seq_len": t, "samples": a.samples, "seconds": secs,
                "tokens_per_s": tokens / secs, "backend": be.name()})
        );
    }
    Ok(())
}

fn import(a: &ImportArgs) -> Result<()> {
    let t = Instant::now();
    let opts = ImportOptions {
        dtype: a.dtype.parse()?,
        force: a.force,
        blocks: !a.no_blocks,
    };
    let r = import_gguf(&a.gguf, &a.out, &opts)?;
    println!(
        "imported {} ({}, {} layers, {} tensors, {:.1}M parameters) into {} in {:.1}s",
        a.gguf.display(),
        r.architecture,
        r.n_layers,
        r.n_tensors,
        r.n_params as f64 / 1e6,
        r.out_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn eval_gen<B: Backend>(be: &B, a: &GenCliArgs) -> Result<()> {
    let model = load_model_with(be, &a.model, &a.common, Some(&a.decode_weights))?;
    let tok = Tokenizer::load(&a.model)?;
    let mut args = GenArgs::new(a.data.clone());
    args.task = a.task.clone();
    args.shots = a.shots;
    args.shots_file = a.shots_file.clone();
    args.format = if a.chat {
        PromptFormat::Chat
    } else {
        PromptFormat::Plain
    };
    args.limit = a.limit;
    args.batch = a.batch;
    args.max_new_tokens = a.max_new_tokens;
    args.out = a.out.clone();
    let (r, _) = evaluate_gen(be, &model, &tok, &args)?;
    println!(
        "{}: accuracy {:.4} ({}/{}), {}-shot {:?}; decode {:.1} tokens/s, prefill {:.0} tokens/s",
        r.task,
        r.accuracy,
        r.correct,
        r.n,
        r.shots,
        r.format,
        r.decode_tokens_per_s,
        r.prefill_tokens_per_s
    );
    if let Some(o) = &a.out {
        println!("per-problem outputs: {}", o.display());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn eval_mc<B: Backend>(be: &B, a: &McCliArgs) -> Result<()> {
    let model = load_model(be, &a.model, &a.common)?;
    let tok = Tokenizer::load(&a.model)?;
    let mut args = McArgs::new(a.data.clone());
    args.task = a.task.clone();
    args.limit = a.limit;
    args.batch = a.batch;
    args.out = a.out.clone();
    let (r, _) = evaluate_mc(be, &model, &tok, &args)?;
    println!(
        "{}: acc {:.4}, acc_norm {:.4} over {} items ({:.1}s)",
        r.task, r.acc, r.acc_norm, r.n, r.seconds
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn bench_decode<B: Backend>(be: &B, a: &BenchDecodeArgs) -> Result<()> {
    if a.prompt_len == 0 || a.new_tokens == 0 || a.batch == 0 {
        bail!("--prompt-len, --new-tokens and --batch must be at least 1");
    }
    let model = load_model_with(be, &a.model, &a.common, Some(&a.decode_weights))?;
    let prompt = synthetic_ids(a.prompt_len, model.cfg.vocab);
    let mut dec = Decoder::new(be, &model, a.batch, a.prompt_len + a.new_tokens)?;
    let vocab = model.cfg.vocab;
    let next_ids = |logits: &[f32]| -> Vec<u32> { logits.chunks(vocab).map(argmax).collect() };
    let mut next = next_ids(&dec.extend(&vec![prompt; a.batch])?);
    let start = Instant::now();
    for _ in 0..a.new_tokens {
        next = next_ids(&dec.step(&next)?);
    }
    let secs = start.elapsed().as_secs_f64();
    let tps = (a.batch * a.new_tokens) as f64 / secs;
    println!(
        "decode: {} tokens after a {}-token prompt, batch {}: {secs:.2}s, {tps:.1} tokens/s",
        a.new_tokens, a.prompt_len, a.batch
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                "batch": a.batch, "seconds": secs, "tokens_per_s": tps, "backend": be.name()})
        );
    }
    Ok(())
}

fn prefill<B: Backend>(be: &B, a: &BenchPrefillArgs) -> Result<()> {
    let dense = load_model(be, &a.model, &a.common)?;
    let pruned = load_model(be, &a.pruned, &a.common)?;
    let r = bench_prefill(be, &dense, &pruned, a.seq_len, a.repeats)?;
    println!(
        "prefill, {} tokens, batch 1, median of {}: dense {:.4}s (min {:.4}, max {:.4}), pruned {:.4}s (min {:.4}, max {:.4}): {:.2}x speedup",
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

fn report<B: Backend>(be: &B, a: &ReportArgs) -> Result<()> {
    let methods = a
        .methods
        .iter()
        .map(|m| m.parse::<Method>())
        .collect::<Result<Vec<_>, _>>()?;
    let gen = a.gen_data.as_ref().map(|d| {
        let mut g = GenArgs::new(d.clone());
        g.shots = a.gen_shots;
        g.format = if a.gen_chat {
            PromptFormat::Chat
        } else {
            PromptFormat::Plain
        };
        g.max_new_tokens = a.gen_max_new_tokens;
        g.batch = a.gen_batch;
        g.limit = a.limit;
        g
    });
    let mc = a.mc_data.as_ref().map(|d| {
        let mut m = McArgs::new(d.clone());
        m.batch = a.mc_batch;
        m.limit = a.limit;
        m
    });
    let spec = ReportSpec {
        model: a.model.clone(),
        calib: CalibSource {
            path: a.calib.clone(),
            field: a.windows.field.clone(),
            samples: a.windows.samples,
            seq_len: a.windows.seq_len,
            bos: a.windows.bos,
            batch: a.windows.batch,
            energy_at: a.windows.energy_at.parse()?,
        },
        methods,
        sparsities: a.sparsity.clone(),
        min_keep: a.min_keep,
        align: a.align,
        ppl: a.ppl_text.as_ref().map(|t| PplSpec {
            text: t.clone(),
            field: a.ppl_field.clone(),
            seq_len: a.ppl_seq_len,
            max_windows: a.ppl_max_windows,
            batch: 8, // `eval ppl`'s default; the batch does not change the result
        }),
        gen,
        mc,
        prefill: (!a.no_prefill).then_some(PrefillSpec {
            seq_len: a.prefill_seq_len,
            repeats: a.prefill_repeats,
        }),
        out: a.out.clone(),
        keep_models: a.keep_models,
        force: a.force,
        load: load_options(&a.common, Some(&a.decode_weights)),
    };
    let r = run_report(be, &spec)?;
    println!(
        "report: {} cells computed, {} skipped (already done), {} remaining; wrote {}, report.json and {} plots",
        r.run.computed,
        r.run.skipped,
        r.run.remaining,
        a.out.join("report.md").display(),
        r.plots.len()
    );
    Ok(())
}
