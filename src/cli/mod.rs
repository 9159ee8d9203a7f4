//! The command line: parse (`args`), choose the backend, and hand each
//! command to its thin function in `commands/`, which calls the library.
pub mod args;
mod commands;

use anyhow::{Context, Result};
use args::{BackendKind, BenchCmd, Cli, Cmd, Common, DecodeWeightArgs, EvalCmd, StatsCmd};
use rku_engine::backend::cuda::{has_kernels, GpuDevice};
use rku_engine::backend::Backend;
use rku_engine::io::output::{self, Kind};
use rku_engine::model::weights::{LoadOptions, Residency};
use rku_engine::model::Model;
use std::path::Path;
use std::time::Instant;

/// Runs `$body` with `$be` bound to the backend `$kind` resolves to
/// (monomorphised per backend).
macro_rules! with_backend {
    ($kind:expr, |$be:ident| $body:expr) => {{
        use rku_engine::backend::cpu::CpuBackend;
        use rku_engine::backend::cuda::{CudaBackend, EmuDevice, GpuDevice};
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

/// Runs one parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    use commands::*;
    match cli.cmd {
        Cmd::Import(a) => import::run(&a),
        Cmd::Score(a) if a.devices.is_some() => {
            score::run_multi(&a, resolve_backend(a.common.backend))
        }
        Cmd::Score(a) => with_backend!(a.common.backend, |be| score::run(&be, &a)),
        Cmd::Prune(a) => with_backend!(a.common.backend, |be| prune::run(&be, &a)),
        Cmd::Stats(StatsCmd::Merge(a)) => stats::merge(&a),
        Cmd::Iou(a) => iou::run(&a),
        Cmd::Plan(a) => plan::run(&a),
        Cmd::Report(a) => with_backend!(a.common.backend, |be| report::run(&be, &a)),
        Cmd::Recover(a) => with_backend!(a.common.backend, |be| recover::run(&be, &a)),
        Cmd::Traces(a) => with_backend!(a.common.backend, |be| traces::run(&be, &a)),
        Cmd::Eval(EvalCmd::Ppl(a)) => with_backend!(a.common.backend, |be| eval::ppl(&be, &a)),
        Cmd::Eval(EvalCmd::Gen(a)) => with_backend!(a.common.backend, |be| eval::gen(&be, &a)),
        Cmd::Eval(EvalCmd::Mc(a)) => with_backend!(a.common.backend, |be| eval::mc(&be, &a)),
        Cmd::Eval(EvalCmd::Paired(a)) => eval::paired(&a),
        Cmd::Bench(BenchCmd::Forward(a)) => {
            with_backend!(a.common.backend, |be| bench::forward(&be, &a))
        }
        Cmd::Bench(BenchCmd::Score(a)) => {
            with_backend!(a.common.backend, |be| bench::score(&be, &a))
        }
        Cmd::Bench(BenchCmd::Decode(a)) => {
            with_backend!(a.common.backend, |be| bench::decode(&be, &a))
        }
        Cmd::Bench(BenchCmd::Recover(a)) => {
            with_backend!(a.common.backend, |be| bench::recover(&be, &a))
        }
        Cmd::Bench(BenchCmd::Prefill(a)) => {
            with_backend!(a.common.backend, |be| bench::prefill(&be, &a))
        }
    }
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

/// Loads the model in `dir` and says what was loaded; `decode`: the weight
/// flags of a command that decodes.
fn load_model<B: Backend>(
    be: &B,
    dir: &Path,
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

/// Registers the paths a command reads, then refuses at once, before
/// anything loads, an output `out` of `kind` the run could not write
/// (DESIGN.md §10): an existing one without `force`; with it, an input of
/// the run or anything but an earlier output of `kind`.
fn check_output<'a>(
    inputs: impl IntoIterator<Item = &'a Path>,
    out: &Path,
    kind: Kind,
    force: bool,
) -> Result<()> {
    for p in inputs {
        output::protect(p);
    }
    Ok(output::check(out, kind, force)?)
}
