//! The command line as clap structures: every closed set is a `ValueEnum`,
//! every count and path is checked by a value parser, so a typo or an
//! absurd value fails before anything is loaded.
//!
//! Why one long file: every flag of every command reads in one place (as
//! uv lays out its CLI): declarations, value parsers and their small
//! conversions into library values; the commands
//! themselves are in `commands/`.
use clap::{Args, Parser, Subcommand, ValueEnum};
use rku_engine::io::safetensors_out::OutDtype;
use rku_engine::model::keep::MemoryBudget;
use rku_engine::model::layer_major::{LayerMajor, ResidualDtype};
use rku_engine::progressive::Schedule;
use rku_engine::prune::calibrate::CalibSource;
use rku_engine::prune::refit::{RefitSpec, RefitTarget};
use rku_engine::prune::shard::ShardSpec;
use rku_engine::prune::traces::{Selection, TokenRule};
use rku_engine::prune::{Allocation, EnergyAt, ExportLayout, Method, Objectives, Sparsity};
use rku_engine::recover::step::RecoverLoss;
use rku_engine::recover::RecoverSpec;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rku-engine",
    version,
    about = "Reasoning-aware structural pruning of LLM FFN channels (Relative Kinetic Utility)",
    long_about = "Scores every FFN channel of a LLaMA/Qwen2/Qwen3 model by |activation × gradient| of a \
label-free energy objective, prunes the lowest globally and exports a smaller HF model.\n\n\
Typical run:\n  rku-engine import SmolLM2.gguf --out models/smollm2\n  \
rku-engine prune --model models/smollm2 --calib wiki.jsonl --field 0 --method rku --sparsity 0.4 --out models/smollm2-rku40\n  \
rku-engine eval ppl --model models/smollm2-rku40 --text owt.jsonl --field 0"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Convert a GGUF (LLaMA, Qwen2 or Qwen3) into an HF model directory.
    Import(ImportArgs),
    /// Compute per-channel statistics on calibration text (one pass serves every method).
    Score(ScoreArgs),
    /// Score (or read statistics), allocate, compact and export pruned models.
    Prune(Box<PruneArgs>),
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
    /// Recover a pruned model: LoRA adapters on every projection, trained by
    /// distillation from the dense model (or cross-entropy), merged into a
    /// new model directory. Checkpointed; an interrupted run resumes with --resume.
    Recover(Box<RecoverArgs>),
    /// Let the model answer prompts and keep its generations (traces) as
    /// jsonl records: greedy, or seeded temperature / top-p sampling with K
    /// samples per prompt. Resumable: rerun to add the missing traces.
    Traces(Box<TracesArgs>),
}

#[derive(Subcommand)]
pub enum StatsCmd {
    /// Sum statistics files computed on disjoint calibration shards of one model.
    Merge(MergeArgs),
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Token perplexity over non-overlapping windows of held-out text.
    Ppl(PplArgs),
    /// GSM8K-style reasoning accuracy: greedy decoding with a KV cache, exact match.
    Gen(GenArgs),
    /// Multiple choice by log-likelihood (acc and acc_norm, lm-eval conventions).
    Mc(McArgs),
    /// Two models' `eval gen --out` records on the same problems compared
    /// problem by problem: who solved what, McNemar's exact test, paired
    /// bootstrap intervals of the accuracy ratio and difference.
    Paired(PairedArgs),
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Forward-pass throughput (tokens/s and GFLOP/s, logits included).
    Forward(BenchForwardArgs),
    /// Scoring throughput: forward + energy backward + statistics (tokens/s).
    Score(BenchScoreArgs),
    /// Greedy decoding throughput with the KV cache (tokens/s).
    Decode(BenchDecodeArgs),
    /// Prefill time of a dense and a pruned model, timed alternately; the speedup.
    Prefill(BenchPrefillArgs),
    /// LoRA-KD training throughput (METHODS.md §10): the model as its own
    /// teacher, adapters on every projection (tokens/s).
    Recover(BenchRecoverArgs),
}

/// Which device computes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendKind {
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

/// The objectives a statistics pass runs.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ObjectiveChoice {
    /// The energy objective (rku, agf, rku-fisher).
    Energy,
    /// Next-token cross-entropy (taylor).
    Ce,
    /// Both, from one forward pass.
    Both,
}

impl ObjectiveChoice {
    pub fn objectives(self) -> Objectives {
        Objectives {
            energy: matches!(self, Self::Energy | Self::Both),
            ce: matches!(self, Self::Ce | Self::Both),
        }
    }
}

// Value parsers: bounds are sanity limits far above any real use, so that
// arithmetic on them cannot overflow and a typo fails at once.

/// A count of sequences, windows, items or repeats: 1 ..= 2^24.
pub fn count(s: &str) -> Result<usize, String> {
    bounded(s, 1, 1 << 24)
}

/// Tokens per sequence: 2 ..= 2^20 (a window of one token predicts nothing).
pub fn seq_len(s: &str) -> Result<usize, String> {
    bounded(s, 2, 1 << 20)
}

/// Tokens generated or timed: 1 ..= 2^20.
pub fn tokens(s: &str) -> Result<usize, String> {
    bounded(s, 1, 1 << 20)
}

/// A finite number > 0.
pub fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number > 0")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// A finite number ≥ 0.
pub fn non_negative_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not a finite number ≥ 0")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// A probability mass in (0, 1].
pub fn mass(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not in (0, 1]")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

fn bounded(s: &str, lo: usize, hi: usize) -> Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if v < lo || v > hi {
        return Err(format!("{v} is out of range ({lo} to {hi})"));
    }
    Ok(v)
}

/// A regular file that exists (a FIFO or device is refused here, before
/// any command would block reading it).
pub fn existing_file(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    rku_engine::io::check_regular(&p, "a file")
        .map(|()| p)
        .map_err(|e| e.to_string())
}

/// A directory that exists.
pub fn existing_dir(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!("{s} is a file, not a directory")),
        Err(e) => Err(format!("cannot read {s}: {e}")),
    }
}

/// `--sparsity 0.3,0.4,0.5`: distinct sparsities, parsed as one value so
/// that a repeat is refused before anything runs.
#[derive(Clone, Debug)]
pub struct SparsityList(pub Vec<Sparsity>);

fn sparsities(s: &str) -> Result<SparsityList, String> {
    Sparsity::parse_list(s)
        .map(SparsityList)
        .map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct Common {
    /// Compute device.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Upload the decoder layers one at a time from the memory-mapped files
    /// as each pass reaches them (two layers resident; on a GPU the next
    /// layer's upload overlaps the current layer's compute) instead of all at
    /// load: for models larger than the device. `rku-engine plan --stream`
    /// shows the peak. Slow for generation, which passes every layer per token.
    #[arg(long)]
    pub stream: bool,
}

/// The weights decoding reads.
#[derive(Args)]
pub struct DecodeWeightArgs {
    /// Decode from the f32 weights even when the model directory has
    /// ggml_blocks.safetensors (written by `import` from a GGUF's Q4_1/Q8_0
    /// matrices). By default the CPU backend's decoding steps read those
    /// blocks, which dequantise to exactly the f32 weights (checked at load)
    /// in 4-6x fewer bytes.
    #[arg(long)]
    pub no_ggml_blocks: bool,
}

/// How the calibration text becomes scored windows (METHODS.md §2).
#[derive(Args)]
pub struct WindowArgs {
    /// jsonl field of the calibration text (e.g. `0` for the evals passages); default `text`.
    #[arg(long)]
    pub field: Option<String>,
    /// N: calibration sequences.
    #[arg(long, default_value_t = 128, value_parser = count)]
    pub samples: usize,
    /// T: tokens per calibration sequence.
    #[arg(long, default_value_t = 512, value_parser = seq_len)]
    pub seq_len: usize,
    /// Prefix each calibration window with the BOS token (`--bos`,
    /// `--bos false`); default: on for Gemma 3, off for the other families.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub bos: Option<bool>,
    /// Calibration sequences per forward/backward batch (memory vs speed; results do not change).
    #[arg(long, default_value_t = 4, value_parser = count)]
    pub batch: usize,
    /// Where the energy objective reads the model: final-norm (z) or pre-norm (x_L).
    #[arg(long, value_enum, default_value_t = EnergyAt::FinalNorm)]
    pub energy_at: EnergyAt,
    /// Memory the forward pass may keep of the top layers' activations, so
    /// that the backward pass does not recompute those layers: auto (half of
    /// the available memory, the host's or the GPU's) or bytes (512M, 2G; 0
    /// recomputes every layer). Speed and memory only; results do not change.
    #[arg(long, default_value = "auto", value_parser = memory_budget, value_name = "auto|BYTES")]
    pub activation_memory: MemoryBudget,
    #[command(flatten)]
    pub layer_major: LayerMajorArgs,
}

/// `--layer-major` and its two settings.
#[derive(Args)]
pub struct LayerMajorArgs {
    /// Run layer-major: a chunk of batches advances one layer at a time,
    /// its residual stream in host memory, so that with --stream each layer
    /// is uploaded once per pass per chunk instead of once per batch.
    /// Results do not change (with --residual-dtype f32).
    #[arg(long)]
    pub layer_major: bool,
    /// With --layer-major: host memory for a chunk's residual stream: auto
    /// (half of the available memory) or bytes (512M, 8G); sets the chunk size.
    #[arg(long, default_value = "auto", value_parser = memory_budget, value_name = "auto|BYTES", requires = "layer_major")]
    pub host_memory: MemoryBudget,
    /// With --layer-major: how the host holds the chunk's residual stream:
    /// f32 (exact) or bf16 (half the memory, rounded).
    #[arg(long, default_value = "f32", value_parser = residual_dtype, value_name = "f32|bf16", requires = "layer_major")]
    pub residual_dtype: ResidualDtype,
}

impl LayerMajorArgs {
    /// The layer-major setting, when `--layer-major` is given.
    pub fn get(&self) -> Option<LayerMajor> {
        self.layer_major.then_some(LayerMajor {
            host_memory: self.host_memory,
            residual: self.residual_dtype,
        })
    }
}

impl WindowArgs {
    /// The calibration windows of the text at `path`.
    pub fn source(&self, path: PathBuf) -> CalibSource {
        CalibSource {
            path,
            field: self.field.clone(),
            samples: self.samples,
            seq_len: self.seq_len,
            bos: self.bos,
            batch: self.batch,
            energy_at: self.energy_at,
            activation_memory: self.activation_memory,
            layer_major: self.layer_major.get(),
        }
    }
}

/// Calibration input (METHODS.md §2).
#[derive(Args)]
pub struct CalibArgs {
    /// Calibration text: plain text, or .jsonl read through --field.
    #[arg(long, value_parser = existing_file)]
    pub calib: Option<PathBuf>,
    #[command(flatten)]
    pub windows: WindowArgs,
    /// Objectives to run: energy (rku, agf, rku-fisher), ce (taylor) or both.
    #[arg(long, value_enum, default_value_t = ObjectiveChoice::Both)]
    pub objective: ObjectiveChoice,
    /// Self-generated traces (from `traces`) to score, each trace one
    /// sequence, prompt and generation, never padded (METHODS.md §11);
    /// with --calib too, the windows and the traces are scored together.
    #[arg(long, group = "trace_source", value_parser = existing_file)]
    pub traces: Option<PathBuf>,
    /// With traces (--traces; prune: also --refit-traces or --progressive): which traces are
    /// used: all, correct, length-band P1,P2 or hardest.
    #[arg(long, value_parser = selection)]
    pub select: Option<Selection>,
    /// With traces (--traces; prune: also --refit-traces or --progressive): the positions that
    /// count, all or generated (the prompt is then context only).
    #[arg(long, value_enum)]
    pub tokens: Option<TokenRule>,
    /// With traces (--traces; prune: also --refit-traces or --progressive): cut longer traces to
    /// their first T tokens.
    #[arg(long, value_parser = count)]
    pub max_seq_len: Option<usize>,
}

impl CalibArgs {
    /// The trace flags given (--select, --tokens, --max-seq-len), by name.
    pub fn trace_flags(&self) -> Vec<&'static str> {
        [
            ("--select", self.select.is_some()),
            ("--tokens", self.tokens.is_some()),
            ("--max-seq-len", self.max_seq_len.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

/// `plan --activation-memory`: bytes only (`auto` needs the device).
fn budget_bytes(s: &str) -> Result<u64, String> {
    match memory_budget(s)? {
        MemoryBudget::Bytes(b) => Ok(b),
        MemoryBudget::Auto => Err(
            "plan needs the budget in bytes (auto is resolved on the device at run time)".into(),
        ),
    }
}

/// A `--residual-dtype` value.
fn residual_dtype(s: &str) -> Result<ResidualDtype, String> {
    s.parse().map_err(|e: rku_engine::Error| e.to_string())
}

/// An `--activation-memory` or `--host-memory` value.
fn memory_budget(s: &str) -> Result<MemoryBudget, String> {
    s.parse().map_err(|e: rku_engine::Error| e.to_string())
}

/// A `--select` value.
fn selection(s: &str) -> Result<Selection, String> {
    s.parse().map_err(|e: rku_engine::Error| e.to_string())
}

#[derive(Args)]
pub struct ScoreArgs {
    /// HF model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Output statistics file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output: only a statistics file an earlier run
    /// wrote (or an empty file), never an input of this run.
    #[arg(long)]
    pub force: bool,
    /// Score only shard I of N of the calibration sequences (I from 0): the
    /// sequences j with j mod N = I, normalised as the whole set so that
    /// `stats merge --expect-complete` of all N equals one pass. Without
    /// it, a Slurm array task (SLURM_ARRAY_TASK_ID/COUNT) or a torchrun rank
    /// (RANK/WORLD_SIZE) picks the shard; `--shard 0/1` scores everything.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<ShardSpec>,
    /// Score on several GPUs in this process: device k of the list takes
    /// every k-th sequence of this process's share, one thread and one copy
    /// of the model each; the partial statistics are summed in f64
    /// (`--backend cuda`, or `cuda-emu` to check it on the CPU).
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    pub devices: Option<Vec<usize>>,
    #[command(flatten)]
    pub common: Common,
}

/// The least-squares refit of the kept down_proj columns (METHODS.md §9).
#[derive(Args)]
pub struct RefitArgs {
    /// Refit the kept down_proj columns by least squares after the cut,
    /// reproducing the original FFN output (`layer`, the default) or the
    /// dense residual stream (`residual`).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "layer")]
    pub refit: Option<RefitTarget>,
    /// With --refit, also fit a down_proj bias.
    #[arg(long, requires = "refit")]
    pub refit_bias: bool,
    /// With --refit: ridge damping λ = DAMP · mean(diag G).
    #[arg(long, default_value_t = 0.01, requires = "refit", value_parser = positive_finite)]
    pub refit_damp: f64,
}

impl RefitArgs {
    /// The refit asked for, if any.
    pub fn spec(&self) -> Option<RefitSpec> {
        self.refit.map(|target| RefitSpec {
            target,
            bias: self.refit_bias,
            damp: self.refit_damp,
        })
    }
}

#[derive(Args)]
#[command(after_help = "Examples:\n  \
rku-engine prune --model assets/models/smollm2 --traces traces.jsonl --tokens generated \\\n    \
--method rku --sparsity 0.3,0.4 --out pruned\n  \
rku-engine prune --model assets/models/smollm2 --progressive 0.1,0.2,0.3,0.4 \\\n    \
--trace-prompts calib.jsonl --chat --max-new-tokens 256 --tokens generated --out progressive")]
pub struct PruneArgs {
    /// HF model directory to prune.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Statistics files from `score` (summed when several); instead of --calib or --traces.
    #[arg(long, num_args = 1.., conflicts_with_all = ["calib", "traces"], value_parser = existing_file)]
    pub stats: Vec<PathBuf>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Scoring method (METHODS.md §5).
    #[arg(long, value_enum, default_value_t = Method::Rku)]
    pub method: Method,
    /// Fractions of FFN channels to remove, comma-separated and distinct (one model each).
    #[arg(long, required_unless_present = "progressive", value_parser = sparsities)]
    pub sparsity: Option<SparsityList>,
    /// Progressive pruning (METHODS.md §11): a strictly increasing schedule
    /// s1,s2,... of sparsities in (0, 1). Step i generates traces of
    /// --trace-prompts with the model of step i-1 (the dense model first),
    /// scores that model over them and prunes it to s_i of the original
    /// channels. --out is a directory of one model (step-<i>-s<s_i>/) and
    /// one traces file (step-<i>-traces.jsonl) per step; a rerun skips
    /// complete steps of the same settings.
    #[arg(
        long,
        group = "trace_source",
        value_name = "S1,S2,...",
        allow_hyphen_values = true,
        value_parser = schedule,
        conflicts_with_all = ["sparsity", "stats", "calib", "refit", "refit_calib"],
        requires = "trace_prompts"
    )]
    pub progressive: Option<Schedule>,
    #[command(flatten)]
    pub trace_gen: ProgressiveTraceArgs,
    /// How the cut is spread over layers; default: the method's own (METHODS.md §5).
    #[arg(long, value_enum)]
    pub allocation: Option<Allocation>,
    /// Channels every layer keeps at least (default 5% of its width, at
    /// least 1; with --progressive, of the original width).
    #[arg(long, value_parser = count)]
    pub min_keep: Option<usize>,
    /// Round every layer's kept width to a multiple of this.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub align: usize,
    /// compact (smaller layers) or padded (zero-padded to the widest, loads in stock transformers).
    #[arg(long, value_enum, default_value_t = ExportLayout::Compact)]
    pub export: ExportLayout,
    /// Output directory; with several sparsities, one subdirectory
    /// `<method>-s<sparsity>` each; with --progressive, the directory of the
    /// steps (created, or resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing outputs: only model directories an earlier run
    /// wrote (or empty ones), never an input of this run. With
    /// --progressive: recompute the steps written with other settings (and
    /// those after them) instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub refit: RefitArgs,
    /// With --refit: the calibration text of the refit (default: --calib),
    /// cut by --field, --samples, --seq-len, --bos and --batch.
    #[arg(long, requires = "refit", value_parser = existing_file)]
    pub refit_calib: Option<PathBuf>,
    /// With --refit: refit on self-generated traces (from `traces`, this
    /// model's tokenizer) instead of text, each trace one sequence of its
    /// own length, never padded; --select, --tokens and --max-seq-len apply
    /// as for --traces (with --tokens generated the prompt rows are context
    /// only: they add nothing to the least-squares system). Never taken
    /// from --traces: name the file here.
    #[arg(long, requires = "refit", conflicts_with = "refit_calib", value_parser = existing_file)]
    pub refit_traces: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// With `prune --progressive`: how each step's traces are generated (as
/// `traces` does; METHODS.md §11).
#[derive(Args)]
pub struct ProgressiveTraceArgs {
    /// With --progressive: the prompts each step's model answers (jsonl with
    /// a string `question` per row and optionally an `answer`, as `traces` reads).
    #[arg(long, requires = "progressive", value_parser = existing_file)]
    pub trace_prompts: Option<PathBuf>,
    /// With --progressive: prompt with the model's chat template.
    #[arg(long, requires = "progressive")]
    pub chat: bool,
    /// With --progressive: few-shot examples per prompt (the first K rows
    /// of --trace-prompts unless --shots-file).
    #[arg(long, default_value_t = 0, requires = "progressive")]
    pub shots: usize,
    /// With --progressive: take the shots from this jsonl.
    #[arg(long, requires = "progressive", value_parser = existing_file)]
    pub shots_file: Option<PathBuf>,
    /// With --progressive: traces per prompt (K). K = 1 without --temperature is greedy.
    #[arg(long, default_value_t = 1, requires = "progressive", value_parser = count)]
    pub samples_per_prompt: usize,
    /// With --progressive: sampling temperature (0 is greedy; default 1
    /// when --samples-per-prompt > 1).
    #[arg(long, allow_hyphen_values = true, requires = "progressive", value_parser = non_negative_finite)]
    pub temperature: Option<f64>,
    /// With --progressive: nucleus sampling mass in (0, 1] (default 1).
    #[arg(long, allow_hyphen_values = true, requires = "progressive", value_parser = mass)]
    pub top_p: Option<f64>,
    /// With --progressive: seed of the sampling (default 0).
    #[arg(long, requires = "progressive")]
    pub seed: Option<u64>,
    /// With --progressive: most tokens generated per trace.
    #[arg(long, default_value_t = 512, requires = "progressive", value_parser = tokens)]
    pub max_new_tokens: usize,
    /// With --progressive: traces for at most the first N prompts (after held-out shots).
    #[arg(long, requires = "progressive", value_parser = count)]
    pub limit: Option<usize>,
    /// With --progressive: sequences decoded together (the traces do not depend on it).
    #[arg(long, default_value_t = 8, requires = "progressive", value_parser = count)]
    pub trace_batch: usize,
    /// With --progressive: decode from the f32 weights even when the model
    /// has ggml_blocks.safetensors.
    #[arg(long, requires = "progressive")]
    pub no_ggml_blocks: bool,
}

/// `--progressive 0.1,0.2,0.3`: validated before anything runs.
fn schedule(s: &str) -> Result<Schedule, String> {
    Schedule::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct ImportArgs {
    /// The GGUF file (v2/v3; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K tensors).
    #[arg(value_parser = existing_file)]
    pub gguf: PathBuf,
    /// Output model directory (model.safetensors, config.json, tokenizer files).
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_enum, default_value_t = OutDtype::F32)]
    pub dtype: OutDtype,
    /// Replace an existing output directory: only a model directory an
    /// earlier run wrote (or an empty one), never the GGUF.
    #[arg(long)]
    pub force: bool,
    /// Do not also write ggml_blocks.safetensors, the Q4_1/Q8_0 matrices'
    /// own blocks (f32 output only), which decoding reads instead of the
    /// f32 values it equals: 4-6x fewer bytes per token.
    #[arg(long)]
    pub no_blocks: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Statistics files to sum (from `score` on disjoint shards: two or
    /// more, or with --expect-complete every shard of one set).
    #[arg(required = true, num_args = 1.., value_parser = existing_file)]
    pub files: Vec<PathBuf>,
    /// The files must be every shard (`score --shard i/n`) of one
    /// calibration set, each once: a missing, repeated or foreign shard is
    /// refused by name, and the result is what one pass over the set records.
    #[arg(long)]
    pub expect_complete: bool,
    /// Output statistics file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output: only a statistics file an earlier run
    /// wrote (or an empty file), never an input of this run.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct IouArgs {
    /// A pruned model directory (or its pruning.json).
    pub a: PathBuf,
    /// Another pruned model directory (or its pruning.json).
    pub b: PathBuf,
    /// End the output with one JSON line (per-layer and mean IoU).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    /// HF model directory (its config.json is read).
    #[arg(long, conflicts_with = "config", required_unless_present = "config", value_parser = existing_dir)]
    pub model: Option<PathBuf>,
    /// A config.json alone (e.g. a 7B model's, without its weights).
    #[arg(long, value_parser = existing_file)]
    pub config: Option<PathBuf>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048, value_parser = seq_len)]
    pub seq_len: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch: usize,
    /// Objectives scored.
    #[arg(long, value_enum, default_value_t = ObjectiveChoice::Energy)]
    pub objective: ObjectiveChoice,
    /// Weights streamed one layer at a time (about two layers resident).
    #[arg(long)]
    pub stream: bool,
    /// Scoring: the activation-memory budget in bytes (512M, 2G; 0
    /// recomputes every layer): the top layers whose activations fit are
    /// kept from the forward pass to the backward pass. A run's `auto` is
    /// half the device's free memory, known only on the device.
    #[arg(long, default_value = "0", value_parser = budget_bytes, value_name = "BYTES", conflicts_with = "refit")]
    pub activation_memory: u64,
    /// Plan a layer-major run: scoring (`score --layer-major`) of --samples
    /// sequences, in chunks of as many batches as --host-memory holds (all
    /// of them without it); or with --refit, the refit with its residual
    /// streams on the host (`prune --refit --layer-major`). Prints the host
    /// memory and the layer uploads.
    #[arg(long, conflicts_with = "activation_memory")]
    pub layer_major: bool,
    /// With --layer-major (scoring): the calibration sequences.
    #[arg(long, default_value_t = 128, requires = "layer_major", value_parser = count)]
    pub samples: usize,
    /// With --layer-major: host memory for the residual streams (bytes:
    /// 512M, 8G); a refit whose streams do not fit is refused, as the run
    /// would be.
    #[arg(long, value_parser = budget_bytes, value_name = "BYTES", requires = "layer_major")]
    pub host_memory: Option<u64>,
    /// Plan a refit (METHODS.md §9) instead of scoring: over --refit-samples
    /// windows of --seq-len tokens, --batch per pass, every channel kept
    /// (the upper bound of any mask).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "layer")]
    pub refit: Option<RefitTarget>,
    /// With --refit: the bias column.
    #[arg(long, requires = "refit")]
    pub refit_bias: bool,
    /// With --refit: calibration windows held on the device.
    #[arg(long, default_value_t = 32, requires = "refit", value_parser = count)]
    pub refit_samples: usize,
    /// End the output with the plan as one JSON line.
    #[arg(long)]
    pub json: bool,
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
pub struct ReportArgs {
    /// HF model directory of the dense model.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Calibration text: plain text, or .jsonl read through --field.
    #[arg(long, value_parser = existing_file)]
    pub calib: PathBuf,
    #[command(flatten)]
    pub windows: WindowArgs,
    /// Also calibrate every method on these self-generated traces (from
    /// `traces`, with this model's tokenizer): a second statistics pass,
    /// and every mask once per calibration, side by side (rows
    /// `<method>@traces`, the calibration column).
    #[arg(long, value_parser = existing_file)]
    pub traces: Option<PathBuf>,
    /// With --traces: all, correct, length-band P1,P2 or hardest.
    #[arg(long, requires = "traces", value_parser = selection, default_value = "all")]
    pub traces_select: Selection,
    /// With --traces: the positions the statistics count: all, or
    /// generated (the prompt is context only).
    #[arg(long, value_enum, requires = "traces", default_value_t = TokenRule::All)]
    pub traces_tokens: TokenRule,
    /// With --traces: cut longer traces to this many tokens.
    #[arg(long, requires = "traces", value_parser = seq_len)]
    pub traces_max_seq_len: Option<usize>,
    /// Methods, comma-separated, each with its own allocation; the
    /// statistics pass runs the objectives they need.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rku,agf,wanda-struct,flap,taylor"
    )]
    pub methods: Vec<Method>,
    /// Fractions of FFN channels to remove, comma-separated and distinct.
    #[arg(long, default_value = "0.3,0.4,0.5", value_parser = sparsities)]
    pub sparsity: SparsityList,
    /// Channels every layer keeps at least (default 5% of its width, at least 1).
    #[arg(long, value_parser = count)]
    pub min_keep: Option<usize>,
    /// Round every layer's kept width to a multiple of this.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub align: usize,
    /// Held-out text for perplexity (plain, or .jsonl through --ppl-field); omitted: no ppl column.
    #[arg(long, value_parser = existing_file)]
    pub ppl_text: Option<PathBuf>,
    /// jsonl field of --ppl-text; default `text`.
    #[arg(long)]
    pub ppl_field: Option<String>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 128, value_parser = seq_len)]
    pub ppl_seq_len: usize,
    /// Score at most this many perplexity windows.
    #[arg(long, value_parser = count)]
    pub ppl_max_windows: Option<usize>,
    /// Start each perplexity window with the BOS token (`--ppl-bos`,
    /// `--ppl-bos false`); default: on for Gemma 3, off for the other families.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ppl_bos: Option<bool>,
    /// Traces (from `traces` with the dense model, on held-out prompts) for
    /// trace perplexity (as `eval ppl --traces`); omitted: no trace ppl column.
    #[arg(long, value_parser = existing_file)]
    pub trace_ppl: Option<PathBuf>,
    /// With --trace-ppl: all, correct, length-band P1,P2 or hardest.
    #[arg(long, requires = "trace_ppl", value_parser = selection, default_value = "all")]
    pub trace_ppl_select: Selection,
    /// With --trace-ppl: the predictions that count: generated (default:
    /// the model's own reasoning given the prompt) or all.
    #[arg(long, value_enum, requires = "trace_ppl", default_value_t = TokenRule::Generated)]
    pub trace_ppl_tokens: TokenRule,
    /// GSM8K-style problems (jsonl, as `eval gen`); omitted: no gen column.
    #[arg(long, value_parser = existing_file)]
    pub gen_data: Option<PathBuf>,
    /// Few-shot examples per gen prompt (the first rows of --gen-data, not evaluated).
    #[arg(long, default_value_t = 8)]
    pub gen_shots: usize,
    /// Prompt gen with the model's chat template instead of plain "Question: ... Answer:".
    #[arg(long)]
    pub gen_chat: bool,
    /// Most tokens generated per problem.
    #[arg(long, default_value_t = 256, value_parser = tokens)]
    pub gen_max_new_tokens: usize,
    /// Problems decoded together.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub gen_batch: usize,
    /// Multiple-choice items (jsonl, as `eval mc`); omitted: no mc column.
    #[arg(long, value_parser = existing_file)]
    pub mc_data: Option<PathBuf>,
    /// (context, choice) sequences per forward pass.
    #[arg(long, default_value_t = 16, value_parser = count)]
    pub mc_batch: usize,
    /// Evaluate at most this many gen problems and mc items (the first ones).
    #[arg(long, value_parser = count)]
    pub limit: Option<usize>,
    /// Prompt tokens of the prefill timing (each pruned model against the dense one).
    #[arg(long, default_value_t = 512, value_parser = tokens)]
    pub prefill_seq_len: usize,
    /// Timed prefills of each model, after one warm-up each; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = count)]
    pub prefill_repeats: usize,
    /// Skip the prefill timing (no speedup column).
    #[arg(long)]
    pub no_prefill: bool,
    /// Also export every mask refitted on the calibration windows, and
    /// evaluate it: rows `<method>+refit`.
    #[command(flatten)]
    pub refit: RefitArgs,
    /// Also recover every pruned model (and every refitted one) by this
    /// many steps of LoRA distillation from the dense model on the
    /// calibration windows (rank 8, α 16, lr 2e-4, 10 warm-up steps,
    /// clipping at 1.0, seed 0; METHODS.md §10): rows `<method>+lora`
    /// (and `<method>+refit+lora`).
    #[arg(long, value_parser = count)]
    pub recover_steps: Option<usize>,
    /// With --recover-steps: calibration windows per training step.
    #[arg(long, default_value_t = 8, requires = "recover_steps", value_parser = count)]
    pub recover_batch: usize,
    /// Output directory; rerunning into it resumes. An existing directory
    /// that is not a report (or holds an input) is refused, even with --force.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep every pruned model under OUT/models/ (by default each is removed once evaluated).
    #[arg(long)]
    pub keep_models: bool,
    /// Recompute the finished cells whose inputs changed, instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Text input: a plain text file, or jsonl with the string field --field.
#[derive(Args)]
pub struct TextArgs {
    /// Plain text, or .jsonl (each row's --field, rows joined by a blank line).
    #[arg(long, required_unless_present = "traces", conflicts_with = "traces", value_parser = existing_file)]
    pub text: Option<PathBuf>,
    /// jsonl field to read (e.g. `0` for the evals passages); default `text`.
    #[arg(long)]
    pub field: Option<String>,
}

#[derive(Args)]
pub struct PplArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    #[command(flatten)]
    pub text: TextArgs,
    /// Trace perplexity instead (METHODS.md §8, §11): each trace of this
    /// file (from `traces`, with this model's tokenizer) is one sequence;
    /// --seq-len, --max-windows and --batch do not apply.
    #[arg(long, value_parser = existing_file)]
    pub traces: Option<PathBuf>,
    /// With --traces: the predictions that count: all, or generated (only
    /// generated tokens are scored; the prompt is context).
    #[arg(long, value_enum, requires = "traces", default_value_t = TokenRule::All)]
    pub tokens: TokenRule,
    /// With --traces: all, correct, length-band P1,P2 or hardest.
    #[arg(long, requires = "traces", value_parser = selection, default_value = "all")]
    pub select: Selection,
    /// Tokens per window.
    #[arg(long, default_value_t = 128, value_parser = seq_len)]
    pub seq_len: usize,
    /// Start each window with the BOS token, which then holds seq_len − 1
    /// text tokens (`--bos`, `--bos false`); default: on for Gemma 3, off
    /// for the other families.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          conflicts_with = "traces")]
    pub bos: Option<bool>,
    /// Score at most this many windows.
    #[arg(long, value_parser = count)]
    pub max_windows: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub batch: usize,
    #[command(flatten)]
    pub layer_major: LayerMajorArgs,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct GenArgs {
    /// HF model directory to evaluate.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Problems: jsonl with question/answer ("... #### N") or a numeric answer field.
    #[arg(long, value_parser = existing_file)]
    pub data: PathBuf,
    /// Few-shot examples per prompt (held out from --data unless --shots-file).
    #[arg(long, default_value_t = 8)]
    pub shots: usize,
    /// Take the shots from this jsonl instead of the first rows of --data.
    #[arg(long, value_parser = existing_file)]
    pub shots_file: Option<PathBuf>,
    /// Prompt with the model's chat template (tokenizer_config.json) instead of plain "Question: ... Answer:".
    #[arg(long)]
    pub chat: bool,
    /// Most tokens generated per problem (decoding also stops at EOS and the stop strings).
    #[arg(long, default_value_t = 256, value_parser = tokens)]
    pub max_new_tokens: usize,
    /// Skip this many problems first (after held-out shots); records keep
    /// their rows' indices, so slices run apart can be joined for `eval paired`.
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Evaluate at most this many problems.
    #[arg(long, value_parser = count)]
    pub limit: Option<usize>,
    /// Problems decoded together.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub batch: usize,
    /// Label of the task in the results (e.g. GSM-symbolic).
    #[arg(long)]
    pub task: Option<String>,
    /// Per-problem jsonl (prompt, generation, extracted, gold, correct).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out: only a gen record file an earlier run
    /// wrote (or an empty file), never an input of this run.
    #[arg(long, requires = "out")]
    pub force: bool,
    /// End the output with the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
#[command(
    after_help = "Example (a pruned model against the dense one on the same 200 problems):\n  \
rku-engine eval gen --model dense --data gsm.jsonl --chat --shots 0 --limit 200 --out dense.jsonl\n  \
rku-engine eval gen --model pruned --data gsm.jsonl --chat --shots 0 --limit 200 --out pruned.jsonl\n  \
rku-engine eval paired --candidate pruned.jsonl --baseline dense.jsonl"
)]
pub struct PairedArgs {
    /// Per-problem records (`eval gen --out`) of the model under test, e.g. the pruned one.
    #[arg(long, value_parser = existing_file)]
    pub candidate: PathBuf,
    /// Per-problem records of the reference model on the same problems, e.g. the dense one.
    #[arg(long, value_parser = existing_file)]
    pub baseline: PathBuf,
    /// Bootstrap resamples of the problems.
    #[arg(long, default_value_t = 10_000, value_parser = count)]
    pub resamples: usize,
    /// Seed of the resampling (the same seed, the same intervals).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End the output with the comparison as one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct McArgs {
    /// HF model directory to evaluate.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Items: jsonl with question/context, choices, gold index.
    #[arg(long, value_parser = existing_file)]
    pub data: PathBuf,
    /// Evaluate at most this many items (the first ones).
    #[arg(long, value_parser = count)]
    pub limit: Option<usize>,
    /// (context, choice) sequences per forward pass.
    #[arg(long, default_value_t = 16, value_parser = count)]
    pub batch: usize,
    /// Label of the task in the results; default: the data file's name.
    #[arg(long)]
    pub task: Option<String>,
    /// Per-item jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out: only an mc record file an earlier run
    /// wrote (or an empty file), never an input of this run.
    #[arg(long, requires = "out")]
    pub force: bool,
    /// End the output with the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct BenchForwardArgs {
    /// HF model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512, value_parser = tokens)]
    pub seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch: usize,
    /// Timed repeats after one warm-up pass; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = count)]
    pub repeats: usize,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct BenchScoreArgs {
    /// HF model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512, value_parser = seq_len)]
    pub seq_len: usize,
    /// Sequences scored after one warm-up sequence.
    #[arg(long, default_value_t = 4, value_parser = count)]
    pub samples: usize,
    /// Memory the forward pass may keep of the top layers' activations, so
    /// that the backward pass does not recompute those layers: auto (half of
    /// the available memory, the host's or the GPU's) or bytes (512M, 2G; 0
    /// recomputes every layer). Speed and memory only; results do not change.
    #[arg(long, default_value = "auto", value_parser = memory_budget, value_name = "auto|BYTES")]
    pub activation_memory: MemoryBudget,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct BenchRecoverArgs {
    /// HF model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Sequences per step.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256, value_parser = seq_len)]
    pub seq_len: usize,
    /// Steps timed after one warm-up step.
    #[arg(long, default_value_t = 3, value_parser = count)]
    pub steps: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub lora_rank: usize,
    /// Memory the student's forward pass may keep of its top layers'
    /// activations, so that the backward pass does not recompute those
    /// layers: auto (half of the available memory, the host's or the GPU's)
    /// or bytes (512M, 2G; 0 recomputes every layer). Speed and memory only.
    #[arg(long, default_value = "auto", value_parser = memory_budget, value_name = "auto|BYTES")]
    pub activation_memory: MemoryBudget,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct BenchDecodeArgs {
    /// HF model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Prompt tokens (prefilled, not timed).
    #[arg(long, default_value_t = 32, value_parser = tokens)]
    pub prompt_len: usize,
    /// Decoding steps timed.
    #[arg(long, default_value_t = 64, value_parser = tokens)]
    pub new_tokens: usize,
    /// Sequences decoded together (the same prompt each); tokens/s counts all.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch: usize,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct BenchPrefillArgs {
    /// The dense model directory.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// The pruned model directory.
    #[arg(long, value_parser = existing_dir)]
    pub pruned: PathBuf,
    /// Prompt tokens.
    #[arg(long, default_value_t = 2048, value_parser = tokens)]
    pub seq_len: usize,
    /// Timed prefills of each model after one warm-up each (median, min and max reported).
    #[arg(long, default_value_t = 5, value_parser = count)]
    pub repeats: usize,
    /// End the output with one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

/// `traces` (METHODS.md §11).
#[derive(Args)]
#[command(after_help = "Examples:\n  \
rku-engine traces --model assets/models/smollm2 --prompts calib.jsonl --chat --out traces.jsonl\n  \
rku-engine traces --model assets/models/smollm2 --prompts calib.jsonl --chat \\\n    \
--samples-per-prompt 4 --temperature 0.7 --top-p 0.95 --seed 1 --out traces-t07.jsonl\n\n\
One jsonl record per (prompt, sample): prompt_index, sample, question, prompt_ids, generated_ids, \
text, prompt_tokens, generated_tokens, finish, answer, gold, correct, tokenizer_digest, sampling. \
Rerunning the same command into an existing --out generates only the missing traces (the file is \
rewritten atomically every 30 s and at the end); other settings are refused unless --force.")]
pub struct TracesArgs {
    /// HF model directory that answers.
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// Prompts: jsonl with a string `question` per row and optionally an
    /// `answer` (a solution ending "#### N", or a number), as `eval gen` reads.
    #[arg(long, value_parser = existing_file)]
    pub prompts: PathBuf,
    /// Prompt with the model's chat template (tokenizer_config.json) instead of plain "Question: ... Answer:".
    #[arg(long)]
    pub chat: bool,
    /// Few-shot examples per prompt: the first K rows of --prompts (which then
    /// get no traces) unless --shots-file. Shots need answers.
    #[arg(long, default_value_t = 0)]
    pub shots: usize,
    /// Take the shots from this jsonl instead of the first rows of --prompts.
    #[arg(long, value_parser = existing_file)]
    pub shots_file: Option<PathBuf>,
    /// Traces per prompt (K). K = 1 without --temperature is greedy; otherwise sampled.
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub samples_per_prompt: usize,
    /// Sampling temperature: logits / T before the softmax; 0 is greedy.
    /// Default 1 when --samples-per-prompt > 1.
    #[arg(long, allow_hyphen_values = true, value_parser = non_negative_finite)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: draw from the most probable tokens whose mass
    /// reaches P, in (0, 1]; default 1 (every token).
    #[arg(long, allow_hyphen_values = true, value_parser = mass)]
    pub top_p: Option<f64>,
    /// Seed of the sampling (default 0). Each draw depends only on (seed,
    /// prompt index, sample index, position), not on --batch.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Most tokens generated per trace (decoding also stops at EOS and the stop strings).
    #[arg(long, default_value_t = 512, value_parser = tokens)]
    pub max_new_tokens: usize,
    /// Traces for at most the first N prompts (after held-out shots).
    #[arg(long, value_parser = count)]
    pub limit: Option<usize>,
    /// Sequences decoded together (the traces do not depend on it).
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub batch: usize,
    /// Output jsonl, one record per trace. An existing traces file written
    /// with the same settings is resumed: only missing traces are generated.
    #[arg(long)]
    pub out: PathBuf,
    /// Start --out over when it cannot be resumed (a traces file of other
    /// settings, or an empty file); never replaces another kind of file or an input.
    #[arg(long)]
    pub force: bool,
    /// End the output with the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub decode_weights: DecodeWeightArgs,
    #[command(flatten)]
    pub common: Common,
}

/// `recover` (METHODS.md §10).
#[derive(Args)]
pub struct RecoverArgs {
    /// The pruned model (a compact export of `prune`).
    #[arg(long, value_parser = existing_dir)]
    pub model: PathBuf,
    /// The dense model it was pruned from (the distillation teacher; needed by --loss kd).
    #[arg(long, value_parser = existing_dir)]
    pub teacher: Option<PathBuf>,
    /// Training text: plain text, or .jsonl read through --field; cut into
    /// windows of --seq-len tokens, used in file order.
    #[arg(long, required_unless_present = "traces", value_parser = existing_file)]
    pub data: Option<PathBuf>,
    /// jsonl field of the training text; default `text`.
    #[arg(long, conflicts_with = "traces")]
    pub field: Option<String>,
    /// Self-generated traces (from `traces`, this model's tokenizer) as the
    /// training data instead of --data: each trace one sequence of its own
    /// length (never padded), --batch of them per step in file order
    /// (after --select), wrapping around.
    #[arg(long, conflicts_with = "data", value_parser = existing_file)]
    pub traces: Option<PathBuf>,
    /// With --traces: all, correct, length-band P1,P2 or hardest.
    #[arg(long, requires = "traces", value_parser = selection, default_value = "all")]
    pub select: Selection,
    /// With --traces: the predictions the loss counts: all, or generated
    /// (only those whose target token is generated; the prompt is context).
    #[arg(long, value_enum, requires = "traces", default_value_t = TokenRule::All)]
    pub tokens: TokenRule,
    /// With --traces: cut longer traces to their first T tokens.
    #[arg(long, requires = "traces", value_parser = count)]
    pub max_seq_len: Option<usize>,
    /// Training steps.
    #[arg(long, default_value_t = 150, value_parser = count)]
    pub steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub batch: usize,
    /// Tokens per window of --data.
    #[arg(long, default_value_t = 256, value_parser = seq_len, conflicts_with = "traces")]
    pub seq_len: usize,
    /// Prefix each window of --data with the BOS token (`--bos`, `--bos
    /// false`); default: on for Gemma 3, off for the other families.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL",
          conflicts_with = "traces")]
    pub bos: Option<bool>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8, value_parser = count)]
    pub lora_rank: usize,
    /// LoRA α (the adapters' scale is α / r); default 2r.
    #[arg(long, value_parser = positive_finite)]
    pub lora_alpha: Option<f64>,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4, value_parser = positive_finite)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Clip the adapters' gradient to this global norm; 0: no clipping.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// kd: KL(teacher ‖ student) of the next-token distributions; ce: next-token cross-entropy.
    #[arg(long, value_enum, default_value_t = RecoverLoss::Kd)]
    pub loss: RecoverLoss,
    /// Seed of the adapters' initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every this many steps (and after the last).
    #[arg(long, default_value_t = 25, value_parser = count)]
    pub save_every: usize,
    /// The checkpoint file, kept after the run (to go on with more steps);
    /// default `<out>.checkpoint.safetensors`, removed once the output is written.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint of an interrupted run with the same
    /// settings (or of a shorter run: --steps may grow).
    #[arg(long)]
    pub resume: bool,
    /// Output model directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output: only a model directory an earlier run
    /// wrote, never an input of this run.
    #[arg(long)]
    pub force: bool,
    /// Memory the student's forward pass may keep of its top layers'
    /// activations, so that the backward pass does not recompute those
    /// layers: auto (half of the available memory, the host's or the GPU's)
    /// or bytes (512M, 2G; 0 recomputes every layer). Speed and memory only.
    #[arg(long, default_value = "auto", value_parser = memory_budget, value_name = "auto|BYTES")]
    pub activation_memory: MemoryBudget,
    #[command(flatten)]
    pub common: Common,
}

impl RecoverArgs {
    /// The training settings.
    pub fn spec(&self) -> RecoverSpec {
        RecoverSpec {
            steps: self.steps as u64,
            batch: self.batch,
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64),
            lr: self.lr,
            warmup: self.warmup,
            max_grad_norm: (self.max_grad_norm != 0.0).then_some(self.max_grad_norm),
            loss: self.loss,
            seed: self.seed,
            save_every: self.save_every as u64,
            activation_memory: self.activation_memory,
        }
    }
}

impl ReportArgs {
    /// The recovery of every model with --recover-steps: `recover`'s defaults.
    pub fn recover_spec(&self) -> Option<RecoverSpec> {
        self.recover_steps.map(|steps| RecoverSpec {
            steps: steps as u64,
            batch: self.recover_batch,
            activation_memory: self.windows.activation_memory,
            ..RecoverSpec::default()
        })
    }
}
