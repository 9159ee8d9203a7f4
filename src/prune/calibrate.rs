//! The statistics pass (METHODS.md sections 2–4): forward over calibration
//! windows keeping the residual stream, then one activation-only backward
//! pass per objective, accumulating per-channel sums in f64.
use crate::backend::Backend;
use crate::backend::ChannelPartial;
use crate::io::safetensors_io::SafeModel;
use crate::io::text::{hex, read_text, token_digest, windows, Tokenizer};
use crate::model::backward::backward_channel_stats_counted;
use crate::model::forward::{forward, synthetic_ids, Keep};
use crate::model::keep::{describe, kept_layers, MemoryBudget};
use crate::model::layer_major::LayerMajor;
use crate::model::{Geometry, Model, ModelConfig};
use crate::progress::Progress;
use crate::prune::stats::{EnergyAt, Norms, Objective, Objectives, Stats, StatsMeta, TraceSource};
use crate::prune::ColumnNorms;
use crate::{Error, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What the statistics pass runs over.
#[derive(Clone, Copy, Debug)]
pub struct CalibSpec {
    /// N sequences.
    pub samples: usize,
    /// T tokens each.
    pub seq_len: usize,
    /// Sequences per forward/backward batch (memory vs speed; results do not depend on it).
    pub batch: usize,
    pub objectives: Objectives,
    pub energy_at: EnergyAt,
    /// The objectives' normalisers: `None` for this set's own counts, a
    /// shard's whole set's otherwise (so shards sum to one pass, §4).
    pub norms: Option<Norms>,
    /// Bytes the forward pass may keep of the top layers' activations for
    /// the backward pass (`model::keep`; speed and memory only, the
    /// statistics do not change).
    pub activation_memory: MemoryBudget,
    /// Score layer-major (`prune::layer_major`) instead of sequence-major.
    pub layer_major: Option<LayerMajor>,
    /// Whether the calibration windows start with BOS (METHODS.md §2):
    /// recorded in the statistics (the ids already hold it).
    pub bos: bool,
}

/// Calibration input (METHODS.md section 2).
#[derive(Clone, Debug)]
pub struct CalibSource {
    pub path: PathBuf,
    /// jsonl field; `None` for `text`.
    pub field: Option<String>,
    /// N sequences.
    pub samples: usize,
    /// T tokens each.
    pub seq_len: usize,
    /// Prefix each window with the BOS token; `None`: the model's default
    /// (`Arch::bos_by_default`).
    pub bos: Option<bool>,
    /// Sequences per batch (speed and memory only; not an input of any cell).
    pub batch: usize,
    pub energy_at: EnergyAt,
    /// `--activation-memory` (speed and memory only; not an input of any cell).
    pub activation_memory: MemoryBudget,
    /// `--layer-major` (speed and memory only; not an input of any cell).
    pub layer_major: Option<LayerMajor>,
}

impl CalibSource {
    /// The statistics pass over these windows, running `objectives`;
    /// `bos`: whether the windows start with BOS ([`Self::bos_for`]; false
    /// for traces, scored as recorded).
    pub fn spec(&self, objectives: Objectives, bos: bool) -> CalibSpec {
        CalibSpec {
            samples: self.samples,
            seq_len: self.seq_len,
            batch: self.batch,
            objectives,
            energy_at: self.energy_at,
            norms: None,
            activation_memory: self.activation_memory,
            layer_major: self.layer_major,
            bos,
        }
    }

    /// Whether the windows of `cfg`'s model start with BOS.
    pub fn bos_for(&self, cfg: &ModelConfig) -> bool {
        self.bos.unwrap_or(cfg.arch.bos_by_default())
    }

    /// The calibration windows, `[N, T]` ids (each preceded by BOS when
    /// [`Self::bos_for`]), and the sha256 of their token ids.
    pub fn windows<B: Backend>(
        &self,
        model: &Model<B>,
        tok: &Tokenizer,
    ) -> Result<(Vec<u32>, String)> {
        let ids = tok.encode(&read_text(&self.path, self.field.as_deref())?)?;
        let bos = bos_id(&model.cfg, self.bos_for(&model.cfg))?;
        let w = windows(&ids, self.samples, self.seq_len, bos)?;
        let digest = token_digest(&w);
        Ok((w, digest))
    }
}

/// The BOS id when `bos`; an error naming the file when the config has none.
pub fn bos_id(cfg: &ModelConfig, bos: bool) -> Result<Option<u32>> {
    match bos {
        true => cfg.bos_token_id.map(Some).ok_or_else(|| {
            Error::Invalid(format!(
                "BOS requested (--bos, the default on {}) but config.json has no bos_token_id",
                cfg.arch.hf_name()
            ))
        }),
        false => Ok(None),
    }
}

/// Identifies a model by its config and, for every tensor, name, dtype,
/// shape and 8 bytes at each of 32 evenly spaced offsets: cheap on a 15 GB
/// model (it touches a few pages per tensor), and different for any two
/// models one would confuse.
pub fn model_digest<B: Backend>(model: &Model<B>) -> Result<String> {
    files_digest(&model.cfg, &model.files)
}

/// [`model_digest`] of the model directory `dir`, read without loading
/// its weights (the files are memory-mapped, a few pages read per tensor).
pub fn dir_digest(dir: &Path) -> Result<String> {
    let cfg = ModelConfig::load(&dir.join("config.json"))?;
    files_digest(&cfg, &SafeModel::open_dir(dir)?)
}

/// [`model_digest`] of a configuration and its tensors.
pub fn files_digest(cfg: &ModelConfig, files: &SafeModel) -> Result<String> {
    let mut h = Sha256::new();
    let cfg = serde_json::to_string(&cfg.raw).expect("config serialises");
    h.update(cfg.as_bytes());
    for name in files.names() {
        let t = files.get_any(name)?;
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        const SAMPLES: usize = 32;
        let step = (t.bytes.len() / SAMPLES).max(1);
        for off in (0..t.bytes.len()).step_by(step).take(SAMPLES) {
            h.update(&t.bytes[off..(off + 8).min(t.bytes.len())]);
        }
    }
    files.release_pages();
    Ok(hex(&h.finalize()))
}

/// ‖w_c‖₁ and ‖w_c‖₂² of every column c of every layer's down_proj `[d, m]`.
pub fn down_column_norms<B: Backend>(model: &Model<B>) -> Result<Vec<ColumnNorms>> {
    let d = model.cfg.hidden;
    (0..model.cfg.layers)
        .map(|l| {
            let m = model.cfg.ffn_widths[l];
            let name = crate::model::weights::layer_tensor(l, "mlp.down_proj.weight");
            let w = model.files.get(&name, &[d, m])?.to_f32()?;
            let mut n = ColumnNorms {
                l1: vec![0.0; m],
                l2sq: vec![0.0; m],
            };
            for row in w.chunks_exact(m) {
                for (c, &x) in row.iter().enumerate() {
                    n.l1[c] += (x as f64).abs();
                    n.l2sq[c] += x as f64 * x as f64;
                }
            }
            Ok(n)
        })
        .collect()
}

/// sha256 of one sequence's token ids (little-endian u32): the per-window
/// digest a statistics file records.
pub fn sequence_digest(ids: &[u32]) -> [u8; 32] {
    Sha256::digest(bytemuck::cast_slice::<u32, u8>(ids)).into()
}

/// Runs the statistics pass over `windows` (`[N, T]` token ids).
pub fn collect_stats<B: Backend>(
    be: &B,
    model: &Model<B>,
    windows: &[u32],
    spec: CalibSpec,
    calib_digest: String,
) -> Result<Stats> {
    let (n_seq, t) = (spec.samples, spec.seq_len);
    if windows.len() != n_seq * t || t < 2 || n_seq == 0 {
        return Err(Error::Invalid(format!(
            "calibration needs {n_seq} windows of {t} ≥ 2 tokens, got {} ids",
            windows.len()
        )));
    }
    let meta = StatsMeta {
        model_digest: model_digest(model)?,
        calib_digest,
        samples: n_seq,
        seq_len: t,
        tokens: (n_seq * t) as u64,
        objectives: spec.objectives,
        energy_at: spec.energy_at,
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        window_digests: windows.chunks_exact(t).map(sequence_digest).collect(),
        traces: None,
        predicted: (n_seq * (t - 1)) as u64,
        norms: spec.norms.unwrap_or(Norms {
            energy: (n_seq * t) as u64,
            ce: (n_seq * (t - 1)) as u64,
        }),
        shard: None,
        bos: spec.bos,
    };
    // Normalisers over the whole calibration set, so that batches add up.
    let energy_scale = 1.0 / meta.norms.energy as f32;
    let ce_scale = 1.0 / meta.norms.ce as f32;
    let mut stats = Stats::zeros(meta, &model.cfg.ffn_widths);
    let batches = windows
        .chunks(spec.batch.max(1) * t)
        .map(|ids| Batch {
            ids: ids.to_vec(),
            geo: Geometry {
                seqs: ids.len() / t,
                t,
            },
            mask: None,
        })
        .collect::<Vec<_>>();
    score_batches(
        be,
        model,
        &mut stats,
        &batches,
        spec,
        (energy_scale, ce_scale),
    )?;
    stats.check_shapes()?;
    Ok(stats)
}

/// One batch of a statistics pass: `[seqs, t]` token ids and, when not
/// every row counts (METHODS.md §11), the rows that do.
#[derive(Debug)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub geo: Geometry,
    pub mask: Option<Vec<bool>>,
}

/// Scores `batches` into `stats`, sequence-major (each batch through every
/// layer, forward then backward) or, with `spec.layer_major`, layer-major
/// (`prune::layer_major`). `scales` = (energy, ce) normalisers over the
/// whole calibration set.
fn score_batches<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &mut Stats,
    batches: &[Batch],
    spec: CalibSpec,
    scales: (f32, f32),
) -> Result<()> {
    // The ce objective forms logits: the output projection is loaded before
    // the first batch, so that every batch (and `plan`) sees the same
    // memory, and the activation budget's `auto` counts it as taken.
    if spec.objectives.ce {
        model.lm_head(be)?;
    }
    if let Some(lm) = spec.layer_major {
        return super::layer_major::score_chunks(be, model, stats, batches, spec, scales, lm);
    }
    let budget = ActsBudget::new(be, model, spec)?;
    if let Some(b) = batches.first() {
        budget.log(b.geo);
    }
    let seqs: usize = batches.iter().map(|b| b.geo.seqs).sum();
    let progress = Progress::new(seqs as u64, "scoring");
    for b in batches {
        let acts_layers = budget.layers(b.geo);
        score_batch(be, model, stats, b, spec, scales, acts_layers)?;
        progress.inc(b.geo.seqs as u64);
    }
    progress.finish();
    Ok(())
}

/// The activation-memory budget of a statistics pass (`model::keep`).
struct ActsBudget<'a> {
    cfg: &'a ModelConfig,
    bytes: u64,
}

impl<'a> ActsBudget<'a> {
    /// `spec`'s budget, `auto` resolved against the backend's available memory.
    fn new<B: Backend>(be: &B, model: &'a Model<B>, spec: CalibSpec) -> Result<Self> {
        let bytes = spec
            .activation_memory
            .resolve("--activation-memory", || be.available_memory())?;
        Ok(ActsBudget {
            cfg: &model.cfg,
            bytes,
        })
    }

    /// Layers whose activations the forward pass keeps at `geo`.
    fn layers(&self, geo: Geometry) -> usize {
        kept_layers(self.cfg, geo, false, self.bytes).0
    }

    /// Prints what the budget keeps at `geo`.
    fn log(&self, geo: Geometry) {
        let kept = kept_layers(self.cfg, geo, false, self.bytes);
        crate::progress::println(&describe(self.cfg.layers, geo, self.bytes, kept));
    }
}

/// One backward pass of a statistics pass: its objective, where the energy
/// reads the model, and the objective's normaliser.
pub(crate) type Pass = (Objective, EnergyAt, f32);

/// The backward passes a statistics pass runs, in order: each objective of
/// `spec` with its normaliser (`scales` = (energy, ce)) and where the
/// energy reads the model.
pub(crate) fn passes(spec: CalibSpec, (energy_scale, ce_scale): (f32, f32)) -> Vec<Pass> {
    let mut passes = Vec::new();
    if spec.objectives.energy {
        passes.push((Objective::Energy, spec.energy_at, energy_scale));
    }
    if spec.objectives.ce {
        // The energy position is not read by the ce objective.
        passes.push((Objective::Ce, EnergyAt::FinalNorm, ce_scale));
    }
    passes
}

/// Adds one layer's partial sums of one backward pass into `stats`: s1, s2
/// from the first pass, f2 and k1 from the energy pass, tk from the ce pass.
pub(crate) fn accumulate(
    stats: &mut Stats,
    objective: Objective,
    first: bool,
    l: usize,
    p: &ChannelPartial,
) {
    let s = &mut stats.layers[l];
    if first {
        add(&mut s.s1, &p.s1);
        add(&mut s.s2, &p.s2);
    }
    match objective {
        Objective::Energy => {
            add(&mut s.f2, &p.f2);
            add(&mut s.k1, &p.k1);
        }
        Objective::Ce => {
            // tk = Σ_sequences |Σ_{t in sequence} h·g|
            let m = s.tk.len();
            for seq in p.hg_seq.chunks_exact(m) {
                s.tk.iter_mut().zip(seq).for_each(|(a, b)| *a += b.abs());
            }
        }
    }
}

/// One batch of a sequence-major statistics pass: the forward pass over
/// `b` (keeping the top `acts_layers` layers' activations), then the
/// backward pass of each objective of `spec` ([`passes`]), its per-channel
/// sums added into `stats` ([`accumulate`]). The first backward pass reads
/// the kept activations; a second one recomputes every layer.
fn score_batch<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &mut Stats,
    b: &Batch,
    spec: CalibSpec,
    scales: (f32, f32),
    acts_layers: usize,
) -> Result<()> {
    let mut fwd = forward(be, model, &b.ids, b.geo, Keep::acts(acts_layers))?;
    for (i, (objective, at, scale)) in passes(spec, scales).into_iter().enumerate() {
        backward_channel_stats_counted(
            be,
            model,
            &mut fwd,
            &b.ids,
            b.geo,
            objective,
            at,
            scale,
            b.mask.as_deref(),
            |l, p| {
                accumulate(stats, objective, i == 0, l, &p);
                Ok(())
            },
        )?;
    }
    Ok(())
}

pub use crate::io::traces::Sequence;

/// Runs the statistics pass over sequences of any lengths, each counting
/// its tokens from `counted_from` (METHODS.md §11). No padding is ever
/// scored: only sequences of equal length share a batch (up to
/// `spec.batch`); `spec.samples` and `spec.seq_len` are not read. The
/// normalisers are over all sequences (energy: 1/Σ counted; ce: 1/Σ
/// predicted), so the statistics do not depend on the batching. A batch
/// in which every token counts runs exactly as [`collect_stats`] does.
/// The metadata: samples = sequences, seq_len = the longest, tokens =
/// counted tokens, `traces` as given.
pub fn collect_sequence_stats<B: Backend>(
    be: &B,
    model: &Model<B>,
    seqs: &[Sequence],
    spec: CalibSpec,
    calib_digest: String,
    traces: Option<TraceSource>,
) -> Result<Stats> {
    if let Some((i, s)) = seqs.iter().enumerate().find(|(_, s)| s.ids.len() < 2) {
        return Err(Error::Invalid(format!(
            "sequence {i} has {} tokens; every scored sequence needs at least 2",
            s.ids.len()
        )));
    }
    let counted: usize = seqs.iter().map(Sequence::counted).sum();
    let predicted: usize = seqs.iter().map(Sequence::predicted).sum();
    if counted == 0 || (spec.objectives.ce && predicted == 0) {
        return Err(Error::Invalid(format!(
            "no counted tokens in {} sequences ({counted} counted, {predicted} predicted)",
            seqs.len()
        )));
    }
    let meta = StatsMeta {
        model_digest: model_digest(model)?,
        calib_digest,
        samples: seqs.len(),
        seq_len: seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0),
        tokens: counted as u64,
        objectives: spec.objectives,
        energy_at: spec.energy_at,
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        window_digests: seqs.iter().map(|s| sequence_digest(&s.ids)).collect(),
        traces,
        predicted: predicted as u64,
        norms: spec.norms.unwrap_or(Norms {
            energy: counted as u64,
            ce: predicted as u64,
        }),
        shard: None,
        bos: spec.bos,
    };
    let energy_scale = 1.0 / meta.norms.energy as f32;
    let ce_scale = 1.0 / meta.norms.ce.max(1) as f32;
    let mut stats = Stats::zeros(meta, &model.cfg.ffn_widths);
    // Equal lengths together, in their order of first appearance.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].ids.len());
    let mut batches = Vec::new();
    for same in order.chunk_by(|&a, &b| seqs[a].ids.len() == seqs[b].ids.len()) {
        for batch in same.chunks(spec.batch.max(1)) {
            let t = seqs[batch[0]].ids.len();
            let ids: Vec<u32> = batch.iter().flat_map(|&i| seqs[i].ids.clone()).collect();
            let mask: Option<Vec<bool>> = match batch.iter().all(|&i| seqs[i].counted_from == 0) {
                true => None,
                false => Some(
                    batch
                        .iter()
                        .flat_map(|&i| (0..t).map(move |p| p >= seqs[i].counted_from))
                        .collect(),
                ),
            };
            batches.push(Batch {
                ids,
                geo: Geometry {
                    seqs: batch.len(),
                    t,
                },
                mask,
            });
        }
    }
    score_batches(
        be,
        model,
        &mut stats,
        &batches,
        spec,
        (energy_scale, ce_scale),
    )?;
    stats.check_shapes()?;
    Ok(stats)
}

/// `bench score`: the statistics pass of the energy objective.
#[derive(Clone, Debug, Serialize)]
pub struct ScoreBench {
    pub seq_len: usize,
    pub samples: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub backend: String,
}

/// Times the energy statistics pass (forward, backward, statistics) over
/// `samples` sequences of `seq_len` tokens, one at a time, after a warm-up one.
pub fn bench_score<B: Backend>(
    be: &B,
    model: &Model<B>,
    seq_len: usize,
    samples: usize,
    activation_memory: MemoryBudget,
) -> Result<ScoreBench> {
    if seq_len < 2 || samples == 0 {
        return Err(Error::Invalid(
            "--seq-len must be at least 2 and --samples at least 1".into(),
        ));
    }
    let ids = synthetic_ids((samples + 1) * seq_len, model.cfg.vocab);
    let spec = |n| CalibSpec {
        samples: n,
        seq_len,
        batch: 1,
        objectives: Objectives {
            energy: true,
            ce: false,
        },
        energy_at: EnergyAt::FinalNorm,
        norms: None,
        activation_memory,
        layer_major: None,
        bos: false,
    };
    collect_stats(be, model, &ids[..seq_len], spec(1), String::new())?;
    let start = Instant::now();
    collect_stats(be, model, &ids[seq_len..], spec(samples), String::new())?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(ScoreBench {
        seq_len,
        samples,
        seconds,
        tokens_per_s: (samples * seq_len) as f64 / seconds,
        backend: be.name().into(),
    })
}

fn add(acc: &mut [f64], x: &[f64]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}
