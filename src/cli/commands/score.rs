//! `rku-engine score`: the statistics pass over calibration windows and/or
//! self-generated traces.
use crate::cli::args::{BackendKind, CalibArgs, ScoreArgs};
use crate::cli::{check_output, load_model};
use anyhow::{bail, Result};
use rku_engine::backend::cuda::{CudaBackend, Device, EmuDevice, GpuDevice};
use rku_engine::backend::Backend;
use rku_engine::io::text::{bos_words, token_digest, Tokenizer};
use rku_engine::model::weights::Residency;
use rku_engine::model::Model;
use rku_engine::prune::calibrate::{
    collect_sequence_stats, collect_stats, sequence_digest, CalibSource, Sequence,
};
use rku_engine::prune::shard::ShardSpec;
use rku_engine::prune::stats::STATS_FILE;
use rku_engine::prune::traces::{sequences_digest, trace_sequences, TokenRule};
use rku_engine::prune::Stats;
use rku_engine::prune::{Norms, ShardRecord, TraceSource};
use std::time::Instant;

pub fn run<B: Backend>(be: &B, a: &ScoreArgs) -> Result<()> {
    let shard = prepare(a)?;
    let source = calib_source(&a.calib)?;
    let model = load_model(be, &a.model, &a.common, None)?;
    let stats = run_scoring(be, &model, source.as_ref(), &a.calib, shard)?;
    stats.save_with(&a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// `score --devices K,…`: one share per device in this process, summed
/// ([`run_devices`]), on the CUDA backend or its emulation.
pub fn run_multi(a: &ScoreArgs, kind: BackendKind) -> Result<()> {
    let ordinals = a.devices.as_deref().unwrap_or_default();
    if let Some(k) = ordinals
        .iter()
        .enumerate()
        .find_map(|(i, k)| ordinals[..i].contains(k).then_some(k))
    {
        bail!("--devices lists device {k} twice");
    }
    let shard = prepare(a)?;
    let stats = match kind {
        BackendKind::Cuda => {
            eprintln!("backend: cuda, devices {ordinals:?}");
            run_devices(a, ordinals, GpuDevice::new, shard)?
        }
        BackendKind::CudaEmu => {
            eprintln!("backend: cuda-emu, {} emulated devices", ordinals.len());
            run_devices(a, ordinals, |_| Ok(EmuDevice::new()), shard)?
        }
        _ => bail!("--devices needs --backend cuda (or cuda-emu): the cpu backend is one device"),
    };
    stats.save_with(&a.out, a.force)?;
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Checks the flags and the output path, and says which shard this process
/// scores (`--shard`, else the scheduler's environment, else none).
fn prepare(a: &ScoreArgs) -> Result<Option<ShardSpec>> {
    let inputs = [
        Some(&a.model),
        a.calib.calib.as_ref(),
        a.calib.traces.as_ref(),
    ];
    check_output(
        inputs.into_iter().flatten().map(|p| p.as_path()),
        &a.out,
        STATS_FILE,
        a.force,
    )?;
    let flags = a.calib.trace_flags();
    if a.calib.traces.is_none() && !flags.is_empty() {
        bail!(
            "{} apply to traces: they need --traces FILE",
            flags.join(", ")
        );
    }
    let shard = match a.shard {
        Some(s) => Some((s, "--shard")),
        None => ShardSpec::from_env(|k| std::env::var(k).ok())?,
    };
    match shard {
        Some((s, from)) => eprintln!("shard {s} (from {from})"),
        None => eprintln!("shard: none (the whole calibration set)"),
    }
    Ok(shard.map(|(s, _)| s))
}

/// The calibration windows the flags describe (METHODS.md §2), if any:
/// `None` when only --traces is given. Errs without either, and on
/// `--tokens generated` with windows and traces scored together (windows
/// have no generated positions).
pub fn calib_source(c: &CalibArgs) -> Result<Option<CalibSource>> {
    match (&c.calib, &c.traces) {
        (None, None) => {
            bail!("calibration needed: pass --calib FILE and/or --traces FILE (or --stats)")
        }
        (Some(_), Some(_)) if c.tokens == Some(TokenRule::Generated) => bail!(
            "--tokens generated counts only the generated positions of traces; \
             calibration windows (--calib) have none: drop --calib or use --tokens all"
        ),
        (Some(path), _) => Ok(Some(c.windows.source(path.clone()))),
        (None, Some(_)) => Ok(None),
    }
}

/// The sequences one statistics pass scores, with the digest that pass
/// records.
pub struct CalibSet {
    seqs: SetSeqs,
    digest: String,
}

enum SetSeqs {
    /// Windows alone: `[N, T]` ids, scored as they always have been.
    Windows { ids: Vec<u32>, source: CalibSource },
    /// Traces (after any windows, every window token counted); `bos`:
    /// whether those windows start with BOS.
    Sequences {
        seqs: Vec<Sequence>,
        traces: TraceSource,
        bos: bool,
    },
}

impl CalibSet {
    /// Number of sequences.
    fn len(&self) -> usize {
        match &self.seqs {
            SetSeqs::Windows { ids, source } => ids.len() / source.seq_len,
            SetSeqs::Sequences { seqs, .. } => seqs.len(),
        }
    }

    /// sha256 of each sequence's token ids, in order (what one pass records).
    fn sequence_digests(&self) -> Vec<[u8; 32]> {
        match &self.seqs {
            SetSeqs::Windows { ids, source } => ids
                .chunks_exact(source.seq_len)
                .map(sequence_digest)
                .collect(),
            SetSeqs::Sequences { seqs, .. } => {
                seqs.iter().map(|s| sequence_digest(&s.ids)).collect()
            }
        }
    }

    /// Token positions scored (padding never is).
    fn positions(&self) -> usize {
        match &self.seqs {
            SetSeqs::Windows { ids, .. } => ids.len(),
            SetSeqs::Sequences { seqs, .. } => seqs.iter().map(|s| s.ids.len()).sum(),
        }
    }

    /// The normalisers of one pass over the whole set (METHODS.md §3).
    fn norms(&self) -> Norms {
        match &self.seqs {
            SetSeqs::Windows { ids, source } => Norms {
                energy: ids.len() as u64,
                ce: (ids.len() / source.seq_len * (source.seq_len - 1)) as u64,
            },
            SetSeqs::Sequences { seqs, .. } => Norms {
                energy: seqs.iter().map(Sequence::counted).sum::<usize>() as u64,
                ce: seqs.iter().map(Sequence::predicted).sum::<usize>() as u64,
            },
        }
    }

    /// The sequences j with `pick(j)`, in order, and their digest.
    fn share(&self, pick: impl Fn(usize) -> bool) -> CalibSet {
        match &self.seqs {
            SetSeqs::Windows { ids, source } => {
                let ids: Vec<u32> = ids
                    .chunks_exact(source.seq_len)
                    .enumerate()
                    .filter(|(j, _)| pick(*j))
                    .flat_map(|(_, w)| w.iter().copied())
                    .collect();
                CalibSet {
                    digest: token_digest(&ids),
                    seqs: SetSeqs::Windows {
                        ids,
                        source: source.clone(),
                    },
                }
            }
            SetSeqs::Sequences { seqs, traces, bos } => {
                let seqs: Vec<Sequence> = seqs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| pick(*j))
                    .map(|(_, s)| s.clone())
                    .collect();
                CalibSet {
                    digest: sequences_digest(&seqs),
                    seqs: SetSeqs::Sequences {
                        seqs,
                        traces: traces.clone(),
                        bos: *bos,
                    },
                }
            }
        }
    }

    /// The statistics pass over these sequences on `model`, normalised by
    /// `norms` (`None`: this set's own counts).
    fn score<B: Backend>(
        &self,
        be: &B,
        model: &Model<B>,
        c: &CalibArgs,
        norms: Option<Norms>,
    ) -> Result<Stats> {
        let objectives = c.objective.objectives();
        Ok(match &self.seqs {
            SetSeqs::Windows { ids, source } => {
                let mut spec = source.spec(objectives, source.bos_for(&model.cfg));
                spec.samples = self.len();
                spec.norms = norms;
                collect_stats(be, model, ids, spec, self.digest.clone())?
            }
            SetSeqs::Sequences { seqs, traces, bos } => {
                let mut spec = c.windows.source(Default::default()).spec(objectives, *bos);
                spec.norms = norms;
                let digest = self.digest.clone();
                collect_sequence_stats(be, model, seqs, spec, digest, Some(traces.clone()))?
            }
        })
    }
}

/// Windows the calibration text and/or reads the traces (METHODS.md §2,
/// §11): windows alone stay windows; with traces, the windows (every token
/// counted) come first, then the selected traces.
pub fn calibration_set<B: Backend>(
    model: &Model<B>,
    source: Option<&CalibSource>,
    c: &CalibArgs,
) -> Result<CalibSet> {
    let tok = Tokenizer::load(&model.dir)?;
    let windows = match source {
        Some(source) => {
            let (ids, digest) = source.windows(model, &tok)?;
            eprintln!(
                "calibration: {} sequences x {} tokens from {} ({}; digest {}…)",
                source.samples,
                source.seq_len,
                source.path.display(),
                bos_words(source.bos_for(&model.cfg)),
                &digest[..12]
            );
            Some((ids, digest, source))
        }
        None => None,
    };
    Ok(match (windows, &c.traces) {
        (Some((ids, digest, source)), None) => CalibSet {
            seqs: SetSeqs::Windows {
                ids,
                source: source.clone(),
            },
            digest,
        },
        (windows, Some(path)) => {
            let (sel, rule) = (c.select.unwrap_or_default(), c.tokens.unwrap_or_default());
            let tr = trace_sequences(path, &model.dir, sel, rule, c.max_seq_len)?;
            eprintln!(
                "traces: {} of {} selected ({sel}) from {}, counting {rule} tokens (file digest {}…)",
                tr.seqs.len(),
                tr.total,
                path.display(),
                &tr.source.digest[..12]
            );
            if let Some(t) = c.max_seq_len {
                eprintln!("--max-seq-len {t}: {} traces truncated", tr.truncated);
            }
            let bos = windows
                .as_ref()
                .is_some_and(|(_, _, source)| source.bos_for(&model.cfg));
            let mut seqs: Vec<Sequence> = match windows {
                Some((ids, _, source)) => ids
                    .chunks_exact(source.seq_len)
                    .map(|w| Sequence {
                        ids: w.to_vec(),
                        counted_from: 0,
                    })
                    .collect(),
                None => Vec::new(),
            };
            seqs.extend(tr.seqs);
            CalibSet {
                digest: sequences_digest(&seqs),
                seqs: SetSeqs::Sequences {
                    seqs,
                    traces: tr.source,
                    bos,
                },
            }
        }
        (None, None) => bail!("calibration needed: pass --calib FILE and/or --traces FILE"),
    })
}

/// This process's sequences of `set`: all of it, or with a `shard` its
/// share, then normalised as the whole set (METHODS.md §4), with the
/// shard's record.
fn process_share(
    set: CalibSet,
    shard: Option<ShardSpec>,
) -> Result<(CalibSet, Option<Norms>, Option<ShardRecord>)> {
    match shard {
        None => Ok((set, None, None)),
        Some(s) => {
            let share = set.share(|j| s.holds(j));
            let record = shard_record(s, set.len(), set.digest.clone(), share.len())?;
            Ok((share, Some(set.norms()), Some(record)))
        }
    }
}

/// Reads the calibration sequences and runs the statistics pass on
/// `model` (with a `shard`, only its share, see [`process_share`]).
pub fn run_scoring<B: Backend>(
    be: &B,
    model: &Model<B>,
    source: Option<&CalibSource>,
    c: &CalibArgs,
    shard: Option<ShardSpec>,
) -> Result<Stats> {
    let (set, norms, record) = process_share(calibration_set(model, source, c)?, shard)?;
    let t = Instant::now();
    let mut stats = set.score(be, model, c, norms)?;
    stats.meta.shard = record;
    report_speed(&stats, set.positions(), t);
    if model.residency() == Residency::Streamed {
        eprintln!("streamed layer uploads: {}", model.layer_uploads());
    }
    Ok(stats)
}

/// `score --devices`: this process's sequences split over the devices
/// `ordinals` (`open` makes each one), scored in parallel, one thread and
/// one copy of the model per device, and summed in f64 in device order.
/// Device k scores the sequences at positions p ≡ k (mod devices) of the
/// process's share, normalised as the whole share, so the sum is one pass
/// over the share up to f64 summation order.
pub fn run_devices<D: Device + 'static>(
    a: &ScoreArgs,
    ordinals: &[usize],
    open: impl Fn(usize) -> rku_engine::Result<D>,
    shard: Option<ShardSpec>,
) -> Result<Stats> {
    let source = calib_source(&a.calib)?;
    let backends = ordinals
        .iter()
        .map(|&k| Ok(CudaBackend::new(open(k)?)))
        .collect::<rku_engine::Result<Vec<_>>>()?;
    let models = backends
        .iter()
        .map(|be| load_model(be, &a.model, &a.common, None))
        .collect::<Result<Vec<_>>>()?;
    let first = models
        .first()
        .ok_or_else(|| anyhow::anyhow!("--devices lists no device"))?;
    let (set, norms, record) =
        process_share(calibration_set(first, source.as_ref(), &a.calib)?, shard)?;
    let n = ordinals.len();
    if set.len() < n {
        bail!(
            "{} sequences cannot be spread over {n} devices (--devices); list at most {}",
            set.len(),
            set.len()
        );
    }
    let norms = norms.unwrap_or_else(|| set.norms());
    let t = Instant::now();
    let parts: Vec<Result<Stats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = backends
            .iter()
            .zip(&models)
            .enumerate()
            .map(|(k, (be, model))| {
                let part = set.share(|p| p % n == k);
                scope.spawn(move || part.score(be, model, &a.calib, Some(norms)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a device's scoring thread panicked"))
            })
            .collect()
    });
    let mut parts = parts.into_iter();
    let mut stats = parts
        .next()
        .ok_or_else(|| anyhow::anyhow!("no device scored"))??;
    for part in parts {
        stats.add(&part?)?;
    }
    // One pass over the share: its digest, its sequences in their order.
    stats.meta.calib_digest = set.digest.clone();
    stats.meta.window_digests = set.sequence_digests();
    stats.meta.norms = norms;
    stats.meta.shard = record;
    report_speed(&stats, set.positions(), t);
    Ok(stats)
}

/// Prints the scoring speed.
fn report_speed(stats: &Stats, positions: usize, t: Instant) {
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scored {positions} tokens ({} counted, {}) in {secs:.1}s: {:.0} tokens/s",
        stats.meta.tokens,
        stats.meta.objectives,
        positions as f64 / secs
    );
}

/// The record of shard `s` of a set of `set_samples` sequences whose one
/// pass would record `set_digest`; says which sequences it holds, and errs
/// when it or any other shard of the set would hold none (a set of more
/// shards than sequences, which `stats merge` could never complete).
fn shard_record(
    s: ShardSpec,
    set_samples: usize,
    set_digest: String,
    held: usize,
) -> Result<ShardRecord> {
    if held == 0 || s.count > set_samples {
        bail!(
            "shard {s}: {} shards of a calibration set of only {set_samples} sequences \
             would leave some empty (use at most {set_samples} shards)",
            s.count
        );
    }
    let first: Vec<String> = (s.index..set_samples)
        .step_by(s.count)
        .take(6)
        .map(|j| j.to_string())
        .collect();
    let more = if held > first.len() { ", …" } else { "" };
    eprintln!(
        "shard {s}: sequences {}{more} ({held} of {set_samples}), normalised as the whole set",
        first.join(", ")
    );
    Ok(ShardRecord {
        index: s.index,
        count: s.count,
        set_samples,
        set_digest,
    })
}
