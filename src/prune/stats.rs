//! Sufficient statistics of the calibration pass (METHODS.md §4) and their
//! file format.
//!
//! For every layer l and channel c (h = FFN channel activation, g = ∂J/∂h,
//! sums over the n = N·T calibration tokens t):
//!
//! | field | definition                            | objective |
//! |-------|---------------------------------------|-----------|
//! | `s1`  | Σ_t h                                 | any       |
//! | `s2`  | Σ_t h²                                | any       |
//! | `f2`  | Σ_t g²                                | energy    |
//! | `k1`  | Σ_t \|h·g\|                           | energy    |
//! | `tk`  | Σ_sequences \|Σ_{t in sequence} h·g\| | ce        |
//!
//! Every vector of layer l has length m_l; the vectors of an objective that
//! was not run are empty, and `StatsMeta::objectives` says which ran.
//! Statistics are additive: [`Stats::add`] sums two partial passes and
//! [`merge`] sums files scored on disjoint calibration shards.
//!
//! # File format
//!
//! A safetensors file. Tensors, all F64 of shape `[m_l]`:
//! `layers.{l}.s1`, `layers.{l}.s2` for every layer, `layers.{l}.f2` and
//! `layers.{l}.k1` only with the energy objective, `layers.{l}.tk` only with
//! the ce objective. No other tensors. The `__metadata__` strings:
//!
//! | key              | value                                         |
//! |------------------|-----------------------------------------------|
//! | `format`         | `rku-stats`                                   |
//! | `format_version` | `3` (`2` is read too, see below)              |
//! | `model_digest`   | digest of the model the stats were scored on  |
//! | `calib_digest`   | sha256 of the calibration token ids           |
//! | `samples`        | N, number of calibration sequences            |
//! | `seq_len`        | T                                             |
//! | `tokens`         | n = N·T                                       |
//! | `num_layers`     | L                                             |
//! | `objectives`     | `energy`, `ce` or `energy,ce`                 |
//! | `energy_at`      | `final-norm` or `pre-norm`                    |
//! | `engine_version` | version of the engine that wrote the numbers  |
//! | `energy_norm`    | n_E, what the energy objective was divided by |
//! | `ce_norm`        | n_C, what the ce objective was divided by     |
//! | `predicted`      | next-token predictions these sequences hold   |
//! | `bos`            | `true` when every calibration window started with BOS (METHODS.md §2), else `false` |
//!
//! The normalisers (METHODS.md §3, §4): a single pass divides by its own
//! counts (energy_norm = tokens, ce_norm = predicted); a shard (below)
//! by the whole set's, so that shards sum to the single pass. g = ∂J/∂h
//! scales as 1/n, so f2 scales as 1/n², k1 as 1/n and tk as 1/n_C:
//! [`merge`] rescales each file to the merged counts with these keys.
//! Version 2 files lack the three keys; they are read as a single pass
//! over windows (predicted = samples·(seq_len − 1)), and a version 2 file
//! over traces with the ce objective is refused (its predicted count is
//! unknown).
//! A file without `bos` (written before the key existed) is read as
//! windows without BOS.
//!
//! A shard of a calibration set (`score --shard i/n`, METHODS.md §4) adds
//! three keys, all or none:
//!
//! | key                | value                                              |
//! |--------------------|----------------------------------------------------|
//! | `shard`            | `i/n`: sequences j of the whole set with j mod n = i |
//! | `shard_samples`    | the whole set's number of sequences                |
//! | `shard_set_digest` | the whole set's `calib_digest` (what one pass records) |
//!
//! Statistics over traces (METHODS.md §11) add three keys, all or none:
//!
//! | key                | value                                           |
//! |--------------------|-------------------------------------------------|
//! | `traces_digest`    | sha256 of the traces file's bytes               |
//! | `traces_selection` | `all`, `correct`, `length-band P1,P2`, `hardest`|
//! | `traces_tokens`    | `all` or `generated` (the counted positions)    |
//!
//! and then `samples` is the number of sequences (calibration windows
//! included), `seq_len` the longest and `tokens` the counted tokens
//! (1 ≤ tokens ≤ samples × seq_len); without them, tokens = samples × seq_len.
//!
//! Why one long file: the statistics, their file format and its reader
//! and merger share every invariant (shapes, finiteness, checksum, window
//! digests), checked in one place; the end holds the unit tests.
//!
//! No indexing or slicing by position (clippy's `indexing_slicing`): a
//! crafted statistics file is an error, never a panic.
#![deny(clippy::indexing_slicing)]
use crate::io::output::{self, Kind};
use crate::io::safetensors_out::serialize_sorted;
use crate::io::text::bos_words;
pub use crate::model::objective::{EnergyAt, Objective, Objectives};
use crate::prune::shard::ShardSpec;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const FORMAT: &str = "rku-stats";
/// A statistics file as an output: recognised by its `format` (DESIGN.md §10).
pub const STATS_FILE: Kind = Kind::Safetensors(FORMAT);
/// 2: adds the window digests and the tensor checksum; 3: the normalisers
/// and the shard keys.
const FORMAT_VERSION: &str = "3";
/// The tensor of per-window digests: `[N, 32]` u8, sha256 of each
/// calibration window's token ids (little-endian u32), in scoring order.
const WINDOWS_TENSOR: &str = "windows.sha256";

/// What the statistics were computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsMeta {
    pub model_digest: String,
    /// sha256 of the calibration token ids; for a merged file, see [`merge`].
    pub calib_digest: String,
    /// N, the number of calibration sequences.
    pub samples: usize,
    /// T, tokens per sequence.
    pub seq_len: usize,
    /// n = N·T, the number of tokens summed over.
    pub tokens: u64,
    pub objectives: Objectives,
    pub energy_at: EnergyAt,
    pub engine_version: String,
    /// sha256 of every calibration window's token ids, one per sequence:
    /// what lets `merge` refuse shards that share a window.
    pub window_digests: Vec<[u8; 32]>,
    /// The traces the sequences came from, if any (METHODS.md §11): then
    /// `seq_len` is the longest sequence and `tokens` the counted ones.
    pub traces: Option<TraceSource>,
    /// Next-token predictions in these sequences (the ce objective's count).
    pub predicted: u64,
    /// What the objectives were divided by (see the module doc).
    pub norms: Norms,
    /// Which share of a calibration set these statistics cover, if a share.
    pub shard: Option<ShardRecord>,
    /// Whether each calibration window started with BOS (`--bos`,
    /// METHODS.md §2); traces are scored as recorded (false).
    pub bos: bool,
}

/// The normalisers of the two objectives: J_E = (1/energy) Σ ½‖z‖²,
/// J_C = (1/ce) Σ −log p (METHODS.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Norms {
    pub energy: u64,
    pub ce: u64,
}

/// A share of a calibration set: sequences j with j mod count = index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRecord {
    pub index: usize,
    pub count: usize,
    /// The whole set's number of sequences.
    pub set_samples: usize,
    /// The whole set's calibration digest (what one pass over it records).
    pub set_digest: String,
}

/// What statistics over traces were computed from (METHODS.md §11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSource {
    /// sha256 of the traces file's bytes (for a merged file, see [`merge`]).
    pub digest: String,
    /// The selection: `all`, `correct`, `length-band P1,P2` or `hardest`.
    pub selection: String,
    /// The counted positions: `all` or `generated`.
    pub tokens: String,
}

/// The statistics of one layer; every non-empty vector has length m_l.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LayerStats {
    pub s1: Vec<f64>,
    pub s2: Vec<f64>,
    /// Empty unless the energy objective ran.
    pub f2: Vec<f64>,
    /// Empty unless the energy objective ran.
    pub k1: Vec<f64>,
    /// Empty unless the ce objective ran.
    pub tk: Vec<f64>,
}

/// The five statistic names, in file order.
const FIELDS: [&str; 5] = ["s1", "s2", "f2", "k1", "tk"];

impl LayerStats {
    /// Zeroed statistics of a layer of width `m` for the given objectives.
    pub fn zeros(m: usize, objectives: Objectives) -> Self {
        let sized = |on: bool| if on { vec![0.0; m] } else { Vec::new() };
        LayerStats {
            s1: vec![0.0; m],
            s2: vec![0.0; m],
            f2: sized(objectives.energy),
            k1: sized(objectives.energy),
            tk: sized(objectives.ce),
        }
    }

    /// m_l, the layer's FFN width.
    pub fn width(&self) -> usize {
        self.s1.len()
    }

    fn field(&self, name: &str) -> &Vec<f64> {
        match name {
            "s1" => &self.s1,
            "s2" => &self.s2,
            "f2" => &self.f2,
            "k1" => &self.k1,
            _ => &self.tk,
        }
    }

    fn field_mut(&mut self, name: &str) -> &mut Vec<f64> {
        match name {
            "s1" => &mut self.s1,
            "s2" => &mut self.s2,
            "f2" => &mut self.f2,
            "k1" => &mut self.k1,
            _ => &mut self.tk,
        }
    }
}

/// Whether statistic `name` exists under `objectives`.
fn field_present(name: &str, objectives: Objectives) -> bool {
    match name {
        "s1" | "s2" => true,
        "f2" | "k1" => objectives.energy,
        _ => objectives.ce,
    }
}

/// Statistics of a whole model: `layers[l]` for l in 0..L.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub meta: StatsMeta,
    pub layers: Vec<LayerStats>,
}

impl Stats {
    /// Zeroed statistics for layers of the given widths.
    pub fn zeros(meta: StatsMeta, widths: &[usize]) -> Self {
        let layers = widths
            .iter()
            .map(|&m| LayerStats::zeros(m, meta.objectives))
            .collect();
        Stats { meta, layers }
    }

    /// m_l of every layer.
    pub fn widths(&self) -> Vec<usize> {
        self.layers.iter().map(LayerStats::width).collect()
    }

    /// Checks that every vector has the length its objective implies:
    /// s1, s2 of length m_l ≥ 1; f2, k1 of length m_l iff energy ran, else
    /// empty; tk of length m_l iff ce ran, else empty; and that every value
    /// is finite (so nothing non-finite is ever saved, summed or scored).
    pub fn check_shapes(&self) -> Result<()> {
        if self.meta.objectives.is_empty() {
            return Err(Error::Invalid(
                "stats record no objective (need energy and/or ce)".into(),
            ));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let m = layer.width();
            if m == 0 {
                return Err(Error::tensor(format!("layers.{l}.s1"), "layer has width 0"));
            }
            for name in FIELDS {
                let want = if field_present(name, self.meta.objectives) {
                    m
                } else {
                    0
                };
                let values = layer.field(name);
                let got = values.len();
                if let Some(c) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::tensor(
                        format!("layers.{l}.{name}"),
                        format!(
                            "channel {c} is {} (the pass overflowed, or the file is damaged)",
                            values.get(c).copied().unwrap_or(f64::NAN)
                        ),
                    ));
                }
                if got != want {
                    return Err(Error::tensor(
                        format!("layers.{l}.{name}"),
                        format!(
                            "length {got}, expected {want} (width {m}, objectives {})",
                            self.meta.objectives
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds `other` into `self`: every statistic, `samples`, `tokens` and
    /// `predicted` are summed; `calib_digest`, `engine_version` and the
    /// normalisers of `self` are kept (use it to sum the partial sums of one
    /// pass, which share its normalisers; [`merge`] sums files).
    /// Refuses inconsistent shapes and statistics of another model, sequence
    /// length, objective set, energy position or layer widths.
    pub fn add(&mut self, other: &Stats) -> Result<()> {
        self.check_shapes()?;
        other.check_shapes()?;
        check_compatible(&self.meta, &self.widths(), &other.meta, &other.widths())
            .map_err(Error::Invalid)?;
        let overflow = || Error::Invalid("the summed sequence or token counts exceed 2^64".into());
        let samples = (self.meta.samples)
            .checked_add(other.meta.samples)
            .ok_or_else(overflow)?;
        let tokens = (self.meta.tokens)
            .checked_add(other.meta.tokens)
            .ok_or_else(overflow)?;
        let predicted = (self.meta.predicted)
            .checked_add(other.meta.predicted)
            .ok_or_else(overflow)?;
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            for name in FIELDS {
                for (x, y) in a.field_mut(name).iter_mut().zip(b.field(name)) {
                    *x += y;
                }
            }
        }
        (self.meta.samples, self.meta.tokens, self.meta.predicted) = (samples, tokens, predicted);
        self.meta.seq_len = self.meta.seq_len.max(other.meta.seq_len);
        self.meta
            .window_digests
            .extend_from_slice(&other.meta.window_digests);
        Ok(())
    }

    /// Takes into `self` the statistics of the objectives `other` ran and
    /// `self` did not: `other` must be a pass over the same sequences of
    /// the same model (every metadata field but the objectives equal), and
    /// since s1 and s2 come from the same forward pass whatever the
    /// objective, they must equal `self`'s bit for bit, which proves it.
    /// What lets a report add Taylor (ce) to statistics scored for RKU
    /// (energy) by running the ce objective only, keeping what was there.
    pub fn add_objectives(&mut self, other: Stats) -> Result<()> {
        self.check_shapes()?;
        other.check_shapes()?;
        let (have, adds) = (self.meta.objectives, other.meta.objectives);
        if adds.without(have) != adds {
            return Err(Error::Invalid(format!(
                "statistics for {have} cannot take another pass's {adds}: an objective would be counted twice"
            )));
        }
        let same_source = StatsMeta {
            objectives: have,
            ..other.meta.clone()
        } == self.meta;
        if !same_source || self.widths() != other.widths() {
            return Err(Error::Invalid(
                "the added objective's pass ran over other sequences, another model or other settings"
                    .into(),
            ));
        }
        for (l, (a, b)) in self.layers.iter().zip(&other.layers).enumerate() {
            if a.s1 != b.s1 || a.s2 != b.s2 {
                return Err(Error::Invalid(format!(
                    "layer {l}: the new pass's activation statistics (s1, s2) differ from the stored ones \
                     (computed by another build or backend?): score both objectives again"
                )));
            }
        }
        for (a, b) in self.layers.iter_mut().zip(other.layers) {
            if adds.energy {
                (a.f2, a.k1) = (b.f2, b.k1);
            }
            if adds.ce {
                a.tk = b.tk;
            }
        }
        self.meta.objectives = have.union(adds);
        Ok(())
    }

    /// Rescales the gradient statistics from this file's normalisers to
    /// `energy` and `ce` (g = ∂J/∂h scales as 1/n: f2 by (n_E/energy)², k1
    /// by n_E/energy, tk by n_C/ce); the normalisers become those.
    fn rescale(&mut self, energy: u64, ce: u64) {
        let fe = self.meta.norms.energy as f64 / energy as f64;
        let fc = match ce {
            0 => 1.0,
            _ => self.meta.norms.ce as f64 / ce as f64,
        };
        if fe != 1.0 || fc != 1.0 {
            for l in &mut self.layers {
                l.f2.iter_mut().for_each(|x| *x *= fe * fe);
                l.k1.iter_mut().for_each(|x| *x *= fe);
                l.tk.iter_mut().for_each(|x| *x *= fc);
            }
        }
        self.meta.norms = Norms { energy, ce };
    }

    /// Writes the statistics to `path` (a temporary file renamed into
    /// place), replacing only an earlier statistics file or an empty one
    /// there: [`Stats::save_with`] with `force`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.save_with(path, true)
    }

    /// Writes the statistics to `path` as an output of a command
    /// (DESIGN.md §10): without `force` nothing at `path` is replaced; with
    /// it, only an earlier statistics file or an empty one, never an input
    /// of the run. Writes the window digests and a checksum of every
    /// tensor's bytes; refuses misshapen or non-finite statistics
    /// (`check_shapes`).
    pub fn save_with(&self, path: &Path, force: bool) -> Result<()> {
        self.check_shapes()?;
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| {
                FIELDS
                    .iter()
                    .filter(|name| field_present(name, self.meta.objectives))
                    .map(move |name| {
                        let v = layer.field(name);
                        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        (format!("layers.{l}.{name}"), data, v.len())
                    })
            })
            .collect();
        let windows: Vec<u8> = self.meta.window_digests.concat();
        let mut views = bytes
            .iter()
            .map(|(name, data, m)| {
                TensorView::new(Dtype::F64, vec![*m], data)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::tensor(name, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let n_windows = self.meta.window_digests.len();
        views.push((
            WINDOWS_TENSOR.to_string(),
            TensorView::new(Dtype::U8, vec![n_windows, 32], &windows)
                .map_err(|e| Error::tensor(WINDOWS_TENSOR, e.to_string()))?,
        ));
        let checksum = tensors_checksum(views.iter().map(|(n, v)| (n.as_str(), v.data())));
        let meta = &self.meta;
        let trace_keys = meta.traces.iter().flat_map(|t| {
            [
                ("traces_digest", t.digest.clone()),
                ("traces_selection", t.selection.clone()),
                ("traces_tokens", t.tokens.clone()),
            ]
        });
        let shard_keys = meta.shard.iter().flat_map(|s| {
            [
                ("shard", format!("{}/{}", s.index, s.count)),
                ("shard_samples", s.set_samples.to_string()),
                ("shard_set_digest", s.set_digest.clone()),
            ]
        });
        let header: BTreeMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("model_digest", meta.model_digest.clone()),
            ("calib_digest", meta.calib_digest.clone()),
            ("samples", meta.samples.to_string()),
            ("seq_len", meta.seq_len.to_string()),
            ("tokens", meta.tokens.to_string()),
            ("num_layers", self.layers.len().to_string()),
            ("objectives", meta.objectives.to_string()),
            ("energy_at", meta.energy_at.to_string()),
            ("engine_version", meta.engine_version.clone()),
            ("predicted", meta.predicted.to_string()),
            ("energy_norm", meta.norms.energy.to_string()),
            ("ce_norm", meta.norms.ce.to_string()),
            ("bos", meta.bos.to_string()),
            ("tensors_sha256", checksum),
        ]
        .into_iter()
        .chain(trace_keys)
        .chain(shard_keys)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let file = serialize_sorted(views, &header)?;
        output::write_file(path, STATS_FILE, force, &file)
    }

    /// Reads a stats file written by [`Stats::save`]. Every error names the
    /// file: not safetensors, not a stats file, a missing, unexpected or
    /// misshapen tensor, or a NaN, infinite or negative value (s2, f2, k1
    /// and tk are sums of non-negative terms).
    pub fn load(path: &Path) -> Result<Stats> {
        let buf = crate::io::read_regular(path, "a statistics file")?;
        Self::from_bytes(&buf, path)
    }

    /// [`Stats::load`] of a file's bytes; `path` names it in errors.
    pub fn from_bytes(buf: &[u8], path: &Path) -> Result<Stats> {
        let bad = |msg: String| Error::format(path, msg);
        let st = SafeTensors::deserialize(buf).map_err(|e| {
            bad(format!(
                "not a safetensors file: {}",
                crate::io::safetensors_io::header_error(buf, &e)
            ))
        })?;
        let (_, header) = SafeTensors::read_metadata(buf)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let empty = HashMap::new();
        let kv = header.metadata().as_ref().unwrap_or(&empty);
        let get = |key: &str| {
            kv.get(key)
                .map(String::as_str)
                .ok_or_else(|| bad(format!("not an rku stats file: no metadata key {key:?}")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!(
                "not an rku stats file (format {:?})",
                get("format")?
            )));
        }
        let version = get("format_version")?;
        if version != FORMAT_VERSION && version != "2" {
            return Err(bad(format!(
                "stats format version {version} is not supported (expected 2 or {FORMAT_VERSION})"
            )));
        }
        let checksum = tensors_checksum(
            st.tensors()
                .into_iter()
                .map(|(n, v)| (n, v.data()))
                .collect::<Vec<_>>()
                .iter()
                .map(|(n, d)| (n.as_str(), *d)),
        );
        if get("tensors_sha256")? != checksum {
            return Err(bad(
                "the tensors do not match the file's checksum (tensors_sha256): the file is damaged"
                    .into(),
            ));
        }
        let windows = st
            .tensor(WINDOWS_TENSOR)
            .map_err(|_| bad(format!("missing tensor {WINDOWS_TENSOR}")))?;
        if windows.dtype() != Dtype::U8
            || windows.shape().len() != 2
            || windows.shape().get(1) != Some(&32)
        {
            return Err(bad(format!(
                "tensor {WINDOWS_TENSOR} is {:?} {:?}, expected U8 [N, 32]",
                windows.dtype(),
                windows.shape()
            )));
        }
        let window_digests: Vec<[u8; 32]> = windows
            .data()
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32-byte chunk"))
            .collect();
        let num = |key: &str| -> Result<u64> {
            get(key)?
                .parse::<u64>()
                .map_err(|_| bad(format!("metadata {key:?} is not a number")))
        };
        let meta = StatsMeta {
            model_digest: get("model_digest")?.to_string(),
            calib_digest: get("calib_digest")?.to_string(),
            samples: num("samples")? as usize,
            seq_len: num("seq_len")? as usize,
            tokens: num("tokens")?,
            objectives: get("objectives")?
                .parse()
                .map_err(|e: Error| bad(format!("metadata \"objectives\": {e}")))?,
            energy_at: get("energy_at")?
                .parse()
                .map_err(|e: Error| bad(format!("metadata \"energy_at\": {e}")))?,
            engine_version: get("engine_version")?.to_string(),
            // Absent in files written before the key: windows without BOS.
            bos: match kv.get("bos").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => {
                    return Err(bad(format!(
                        "metadata \"bos\" is {v:?} (valid: true, false)"
                    )))
                }
            },
            window_digests,
            traces: {
                let keys = ["traces_digest", "traces_selection", "traces_tokens"];
                match keys.map(|k| kv.get(k)) {
                    [Some(digest), Some(selection), Some(tokens)] => {
                        if tokens != "all" && tokens != "generated" {
                            return Err(bad(format!(
                                "metadata \"traces_tokens\" is {tokens:?} (valid: all, generated)"
                            )));
                        }
                        Some(TraceSource {
                            digest: digest.clone(),
                            selection: selection.clone(),
                            tokens: tokens.clone(),
                        })
                    }
                    [None, None, None] => None,
                    _ => {
                        return Err(bad(format!(
                            "metadata has some of {} but not all",
                            keys.join(", ")
                        )))
                    }
                }
            },
            // Read below, once the counts are known to be consistent.
            predicted: 0,
            norms: Norms { energy: 0, ce: 0 },
            shard: None,
        };
        if meta.window_digests.len() != meta.samples {
            return Err(bad(format!(
                "{} window digests for {} samples",
                meta.window_digests.len(),
                meta.samples
            )));
        }
        // Windows: tokens = samples × seq_len (windows of seq_len ≥ 2
        // tokens); traces: sequences of at most seq_len ≥ 2 tokens, of which
        // 1 ≤ tokens are counted. A header that says otherwise would rescale
        // every statistic.
        let most = (meta.samples as u64).checked_mul(meta.seq_len as u64);
        if meta.traces.is_some() {
            if meta.seq_len < 2 || meta.samples == 0 || meta.tokens == 0 || most < Some(meta.tokens)
            {
                return Err(bad(format!(
                    "metadata says {} counted tokens in {} trace sequences of at most {} tokens (need seq_len ≥ 2 and 1 ≤ tokens ≤ samples × seq_len)",
                    meta.tokens, meta.samples, meta.seq_len
                )));
            }
        } else if meta.seq_len < 2 || most != Some(meta.tokens) {
            return Err(bad(format!(
                "metadata says {} tokens in {} windows of {} tokens (need seq_len ≥ 2 and tokens = samples × seq_len)",
                meta.tokens, meta.samples, meta.seq_len
            )));
        }
        let mut meta = meta;
        read_norms_and_shard(&mut meta, version, &num, kv).map_err(bad)?;
        let num_layers = num("num_layers")?;
        // Bounded by the tensors present (each layer has several) before
        // anything is sized by it.
        let n_tensors = st.names().len() as u64;
        if num_layers == 0 || num_layers > n_tensors {
            return Err(bad(format!(
                "num_layers {num_layers} is out of range (1 to the {n_tensors} tensors in the file)"
            )));
        }
        let num_layers = num_layers as usize;

        let mut expected = std::collections::HashSet::from([WINDOWS_TENSOR.to_string()]);
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let mut layer = LayerStats::default();
            for name in FIELDS.iter().filter(|n| field_present(n, meta.objectives)) {
                let key = format!("layers.{l}.{name}");
                let t = st.tensor(&key).map_err(|_| {
                    bad(format!(
                        "missing tensor {key} (objectives {})",
                        meta.objectives
                    ))
                })?;
                if t.dtype() != Dtype::F64 || t.shape().len() != 1 {
                    return Err(bad(format!(
                        "tensor {key} is {:?} {:?}, expected F64 [m]",
                        t.dtype(),
                        t.shape()
                    )));
                }
                let v: Vec<f64> = t
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                    .collect();
                let m = if *name == "s1" {
                    v.len()
                } else {
                    layer.s1.len()
                };
                if v.len() != m || v.is_empty() {
                    return Err(bad(format!(
                        "tensor {key} has shape [{}], expected [{m}] like layers.{l}.s1",
                        v.len()
                    )));
                }
                let nonneg = *name != "s1";
                if let Some((c, x)) = v
                    .iter()
                    .enumerate()
                    .find(|(_, x)| !x.is_finite() || (nonneg && **x < 0.0))
                {
                    let what = if x.is_nan() {
                        "NaN".to_string()
                    } else if x.is_infinite() {
                        "infinity".to_string()
                    } else {
                        format!("negative value {x}")
                    };
                    return Err(bad(format!("{what} in {key} (channel {c})")));
                }
                *layer.field_mut(name) = v;
                expected.insert(key);
            }
            layers.push(layer);
        }
        if let Some(extra) = st.names().into_iter().find(|n| !expected.contains(*n)) {
            return Err(bad(format!(
                "unexpected tensor {extra} (num_layers {num_layers}, objectives {})",
                meta.objectives
            )));
        }
        Ok(Stats { meta, layers })
    }
}

/// Fills `predicted`, `norms` and `shard` of `meta` (whose counts are
/// already checked) from the header `kv`, or says why they are
/// inconsistent. A header that lies here would rescale every statistic.
fn read_norms_and_shard(
    meta: &mut StatsMeta,
    version: &str,
    num: &dyn Fn(&str) -> Result<u64>,
    kv: &HashMap<String, String>,
) -> std::result::Result<(), String> {
    let windows_predicted = (meta.samples as u64) * (meta.seq_len as u64 - 1);
    if version == "2" {
        if meta.traces.is_some() && meta.objectives.ce {
            return Err(
                "format version 2 statistics over traces with the ce objective do not \
                        record their predicted positions: score them again"
                    .into(),
            );
        }
        meta.predicted = windows_predicted;
        meta.norms = Norms {
            energy: meta.tokens,
            ce: windows_predicted,
        };
        return Ok(());
    }
    let num = |k: &str| num(k).map_err(|e| e.to_string());
    meta.predicted = num("predicted")?;
    meta.norms = Norms {
        energy: num("energy_norm")?,
        ce: num("ce_norm")?,
    };
    let (predicted, norms) = (meta.predicted, meta.norms);
    let predicted_ok = match meta.traces {
        None => predicted == windows_predicted,
        Some(_) => predicted <= windows_predicted && (predicted > 0 || !meta.objectives.ce),
    };
    if !predicted_ok {
        return Err(format!(
            "metadata \"predicted\" is {predicted} for {} sequences of at most {} tokens",
            meta.samples, meta.seq_len
        ));
    }
    let keys = ["shard", "shard_samples", "shard_set_digest"];
    meta.shard = match keys.map(|k| kv.get(k)) {
        [None, None, None] => None,
        [Some(shard), Some(_), Some(digest)] => {
            let spec: ShardSpec = shard
                .parse()
                .map_err(|e| format!("metadata \"shard\": {e}"))?;
            let set_samples = num("shard_samples")? as usize;
            // Shard i of n holds the set's sequences j ≡ i (mod n), so the
            // set's size fixes how many this file must hold; that also
            // bounds the set by what the file holds.
            if set_samples < spec.count || spec.held_of(set_samples) != meta.samples {
                return Err(format!(
                    "metadata \"shard_samples\" {set_samples}: shard {spec} of such a set holds {} sequences (and a set needs at least one sequence a shard), this file {}",
                    spec.held_of(set_samples),
                    meta.samples
                ));
            }
            Some(ShardRecord {
                index: spec.index,
                count: spec.count,
                set_samples,
                set_digest: digest.clone(),
            })
        }
        _ => {
            return Err(format!(
                "metadata has some of {} but not all",
                keys.join(", ")
            ))
        }
    };
    // One pass divides by its own counts; a shard by its whole set's, which
    // are at least its own.
    let own = norms.energy == meta.tokens && norms.ce == predicted;
    let shard_ok = meta.shard.is_some() && norms.energy >= meta.tokens && norms.ce >= predicted;
    if !(own || shard_ok) || norms.energy == 0 || (meta.objectives.ce && norms.ce == 0) {
        return Err(format!(
            "normalisers energy_norm {} and ce_norm {} do not fit {} counted tokens and {predicted} predictions{}",
            norms.energy,
            norms.ce,
            meta.tokens,
            if meta.shard.is_some() { " of a shard" } else { "" }
        ));
    }
    Ok(())
}

/// Why `b` cannot be summed into `a`, if it cannot.
fn check_compatible(
    a: &StatsMeta,
    a_widths: &[usize],
    b: &StatsMeta,
    b_widths: &[usize],
) -> std::result::Result<(), String> {
    if a.model_digest != b.model_digest {
        return Err(format!(
            "different models (model digest {} vs {})",
            a.model_digest, b.model_digest
        ));
    }
    match (&a.traces, &b.traces) {
        (None, None) => {}
        (Some(x), Some(y)) => {
            if x.tokens != y.tokens {
                return Err(format!(
                    "different token rules (--tokens {} vs {})",
                    x.tokens, y.tokens
                ));
            }
            if x.selection != y.selection {
                return Err(format!(
                    "different trace selections (--select {} vs {})",
                    x.selection, y.selection
                ));
            }
        }
        (x, _) => {
            let which = |t: bool| {
                if t {
                    "traces"
                } else {
                    "calibration windows only"
                }
            };
            return Err(format!(
                "one is scored on {}, the other on {}",
                which(x.is_some()),
                which(x.is_none())
            ));
        }
    }
    // Trace sequences have their own lengths; windows must agree.
    if a.traces.is_none() && a.seq_len != b.seq_len {
        return Err(format!(
            "different sequence lengths ({} vs {})",
            a.seq_len, b.seq_len
        ));
    }
    if a.objectives != b.objectives {
        return Err(format!(
            "different objectives ({} vs {})",
            a.objectives, b.objectives
        ));
    }
    if a.energy_at != b.energy_at {
        return Err(format!(
            "different --energy-at ({} vs {})",
            a.energy_at, b.energy_at
        ));
    }
    if a.bos != b.bos {
        return Err(format!(
            "different --bos (windows {} vs {})",
            bos_words(a.bos),
            bos_words(b.bos)
        ));
    }
    if a_widths != b_widths {
        return Err(format!(
            "different layer widths ({} layers {:?} vs {} layers {:?})",
            a_widths.len(),
            a_widths,
            b_widths.len(),
            b_widths
        ));
    }
    Ok(())
}

/// Sums stats files scored on disjoint calibration shards of one model.
///
/// Refuses fewer than two files, two files with the same `calib_digest`
/// (the same shard twice, or a file merged with itself), two files that
/// share a calibration window (overlapping shards), and files that
/// differ in model digest, sequence length, objectives, energy position,
/// BOS or layer widths. Each file's gradient statistics are rescaled from its
/// normalisers to the merged counts (n_E = Σ tokens, n_C = Σ predicted;
/// f2 by (energy_norm/n_E)², k1 by energy_norm/n_E, tk by ce_norm/n_C), so
/// files each scored on their own merge to one pass over their union, and
/// shards scored with their whole set's normalisers sum unscaled. The
/// result has `samples`, `tokens` and `predicted` summed,
/// `calib_digest` = lowercase hex sha256 of the input calib digests sorted
/// ascending and joined with `"\n"` (so it does not depend on the order the
/// files are given in), `engine_version` of the first file, no shard
/// record. Statistics over traces merge only with statistics
/// over traces of the same selection and token rule (any lengths; the
/// result's `seq_len` is the longest, its traces digest that of the one
/// traces file or, for several, the sha256 of their sorted digests joined
/// as `calib_digest`'s are).
///
/// With `expect_complete`, the files must be every shard of one set, each
/// once ([`check_complete`]); the result is then what one pass over the
/// set records: its `calib_digest` and its window digests in set order.
pub fn merge(files: &[PathBuf], expect_complete: bool) -> Result<Stats> {
    if files.len() < 2 && !expect_complete {
        return Err(Error::Invalid(format!(
            "stats merge needs at least two files, got {}",
            files.len()
        )));
    }
    let mut all: Vec<Stats> = Vec::with_capacity(files.len());
    let mut digests: Vec<(String, &Path)> = Vec::with_capacity(files.len());
    let mut windows: HashMap<[u8; 32], (&Path, usize)> = HashMap::new();
    let mut trace_digests: Vec<String> = Vec::new();
    for path in files {
        let s = Stats::load(path)?;
        if let Some((_, first)) = digests.iter().find(|(d, _)| *d == s.meta.calib_digest) {
            return Err(Error::Invalid(format!(
                "{} and {} have the same calibration digest {}: the same shard would be counted twice",
                first.display(),
                path.display(),
                s.meta.calib_digest
            )));
        }
        digests.push((s.meta.calib_digest.clone(), path));
        trace_digests.extend(s.meta.traces.as_ref().map(|t| t.digest.clone()));
        for (w, d) in s.meta.window_digests.iter().enumerate() {
            if let Some((first, w0)) = windows.insert(*d, (path, w)) {
                return Err(Error::Invalid(format!(
                    "window {w0} of {} and window {w} of {} are the same calibration window: \
                     overlapping shards would count it twice",
                    first.display(),
                    path.display()
                )));
            }
        }
        if let Some(first) = all.first() {
            check_compatible(&first.meta, &first.widths(), &s.meta, &s.widths()).map_err(
                |why| {
                    Error::Invalid(format!(
                        "cannot merge {} into {}: {why}",
                        path.display(),
                        files.first().map_or(path, |p| p).display()
                    ))
                },
            )?;
        }
        all.push(s);
    }
    let set = match expect_complete {
        true => Some(check_complete(&all, files)?),
        false => None,
    };
    // Where each file's window digests start once concatenated in file order.
    let offsets: Vec<usize> = all
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.meta.samples;
            Some(start)
        })
        .collect();
    let total = |count: fn(&Stats) -> u64, what: &str| {
        all.iter()
            .try_fold(0u64, |sum, s| sum.checked_add(count(s)))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the {what} of {} add up to more than 2^64: not one calibration set",
                    files
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    };
    let n_e = total(|s| s.meta.tokens, "token counts")?;
    let n_c = total(|s| s.meta.predicted, "predicted-position counts")?;
    let mut iter = all.into_iter();
    let mut merged = iter
        .next()
        .ok_or_else(|| Error::Invalid("no files".into()))?;
    merged.rescale(n_e, n_c);
    for mut s in iter {
        s.rescale(n_e, n_c);
        merged.add(&s)?;
    }
    merged.meta.norms = Norms {
        energy: n_e,
        ce: n_c,
    };
    merged.meta.shard = None;
    let mut sorted: Vec<&str> = digests.iter().map(|(d, _)| d.as_str()).collect();
    sorted.sort_unstable();
    merged.meta.calib_digest = sha256_hex(sorted.join("\n").as_bytes());
    if let Some(t) = merged.meta.traces.as_mut() {
        // Distinct traces files: their digests combined as calib_digest's are.
        trace_digests.sort_unstable();
        trace_digests.dedup();
        if trace_digests.len() > 1 {
            t.digest = sha256_hex(trace_digests.join("\n").as_bytes());
        }
    }
    if let Some((set_digest, order)) = set {
        merged.meta.calib_digest = set_digest;
        let concatenated = &merged.meta.window_digests;
        merged.meta.window_digests = order
            .iter()
            .map(|&(f, k)| {
                offsets
                    .get(f)
                    .and_then(|o| concatenated.get(o + k))
                    .copied()
                    .ok_or_else(|| {
                        Error::Invalid(format!("window {k} of {} is missing", name_of(files, f)))
                    })
            })
            .collect::<Result<_>>()?;
    }
    Ok(merged)
}

/// The name of file `f` of `files` for a message.
fn name_of(files: &[PathBuf], f: usize) -> String {
    files
        .get(f)
        .map_or_else(String::new, |p| p.display().to_string())
}

/// Checks that `shards` (read from `files`) are every shard of one
/// calibration set, each once: all carry a shard record with the same
/// shard count, set size and set digest, no index twice, none missing, and
/// their sequences add up to the set. Returns the set digest and, for
/// every sequence of the set in order, (file, window within that file).
fn check_complete(shards: &[Stats], files: &[PathBuf]) -> Result<(String, Vec<(usize, usize)>)> {
    let name = |f: usize| name_of(files, f);
    let mut first: Option<(&ShardRecord, usize)> = None;
    let mut by_index: BTreeMap<usize, usize> = BTreeMap::new();
    for (f, s) in shards.iter().enumerate() {
        let r = s.meta.shard.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{} is not a shard (scored without --shard): --expect-complete merges shards only",
                name(f)
            ))
        })?;
        match first {
            None => first = Some((r, f)),
            Some((r0, f0)) => {
                if (r.count, r.set_samples, &r.set_digest)
                    != (r0.count, r0.set_samples, &r0.set_digest)
                {
                    return Err(Error::Invalid(format!(
                        "{} is shard {}/{} of a set of {} sequences (digest {}…) but {} is shard {}/{} of a set of {} (digest {}…): not shards of one set",
                        name(f), r.index, r.count, r.set_samples, r.set_digest.get(..12).unwrap_or(""),
                        name(f0), r0.index, r0.count, r0.set_samples, r0.set_digest.get(..12).unwrap_or("")
                    )));
                }
            }
        }
        if let Some(g) = by_index.insert(r.index, f) {
            return Err(Error::Invalid(format!(
                "shard {}/{} is given twice: {} and {}",
                r.index,
                r.count,
                name(g),
                name(f)
            )));
        }
    }
    let (r, _) = first.ok_or_else(|| Error::Invalid("no shards given".into()))?;
    let (n, total) = (r.count, r.set_samples);
    // n comes from a header: name the first few missing shards without
    // walking all n.
    let missing_count = n - by_index.len();
    if missing_count > 0 {
        let missing: Vec<String> = (0..n)
            .filter(|i| !by_index.contains_key(i))
            .take(8)
            .map(|i| {
                let held = ShardSpec::new(i, n).map_or(0, |s| s.held_of(total));
                let shown: Vec<String> = (i..total)
                    .step_by(n)
                    .take(8)
                    .map(|j| j.to_string())
                    .collect();
                let more = if held > 8 { ", …" } else { "" };
                format!(
                    "shard {i}/{n} (sequences {}{more}; {held} in all)",
                    shown.join(", ")
                )
            })
            .collect();
        let more = match missing_count - missing.len() {
            0 => String::new(),
            k => format!("; and {k} more shards"),
        };
        return Err(Error::Invalid(format!(
            "incomplete set: missing {}{more}",
            missing.join("; ")
        )));
    }
    let mut order = Vec::with_capacity(total);
    for j in 0..total {
        let (i, k) = (j % n, j / n);
        let f = by_index.get(&i).copied().unwrap_or(0);
        let samples = shards.get(f).map_or(0, |s| s.meta.samples);
        if k >= samples {
            return Err(Error::Invalid(format!(
                "{} (shard {i}/{n}) holds {samples} sequences; sequence {j} of the set of {total} should be its {}th",
                name(f),
                k + 1
            )));
        }
        order.push((f, k));
    }
    let held: usize = shards.iter().map(|s| s.meta.samples).sum();
    if held != total {
        return Err(Error::Invalid(format!(
            "the shards hold {held} sequences, their set {total}"
        )));
    }
    Ok((r.set_digest.clone(), order))
}

/// sha256 over every tensor, in name order, of its name and its bytes: the
/// `tensors_sha256` a stats file records and `Stats::load` verifies.
pub fn tensors_checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut sorted: Vec<(&str, &[u8])> = tensors.collect();
    sorted.sort_unstable_by_key(|(n, _)| *n);
    let mut h = Sha256::new();
    for (name, data) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex sha256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_statistics_are_refused_by_tensor_name_and_never_saved() {
        let meta = StatsMeta {
            model_digest: "m".into(),
            calib_digest: "c".into(),
            samples: 1,
            seq_len: 4,
            tokens: 4,
            objectives: Objectives {
                energy: true,
                ce: false,
            },
            energy_at: EnergyAt::FinalNorm,
            engine_version: "test".into(),
            window_digests: vec![[0; 32]],
            traces: None,
            predicted: 3,
            norms: Norms { energy: 4, ce: 3 },
            shard: None,
            bos: false,
        };
        let mut stats = Stats::zeros(meta, &[3, 2]);
        stats.check_shapes().unwrap();
        stats.layers[1].k1[1] = f64::NAN;
        let e = stats.check_shapes().unwrap_err().to_string();
        assert!(
            e.contains("layers.1.k1") && e.contains("channel 1 is NaN"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        assert!(stats.save(&path).is_err());
        assert!(!path.exists());
        stats.layers[1].k1[1] = f64::INFINITY;
        assert!(stats.check_shapes().is_err());
    }
}
