//! Statistics over self-generated traces (METHODS.md §11): which traces
//! of a traces file are scored (`--select`), which of their tokens count
//! (`--tokens`), and their cut to `--max-seq-len`.
use crate::io::text::hex;
use crate::io::traces::{read_traces, tokenizer_digest, TraceRecord};
use crate::model::config::ModelConfig;
use crate::prune::calibrate::Sequence;
use crate::prune::stats::TraceSource;
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Which traces are scored.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Selection {
    /// Every trace.
    #[default]
    All,
    /// Traces whose gold answer is known and matched.
    Correct,
    /// Traces whose generated length lies between the P1-th and P2-th
    /// percentiles (linear interpolation) of all generated lengths.
    LengthBand(f64, f64),
    /// The traces of the prompts with the lowest pass rate over their samples.
    Hardest,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::All => f.write_str("all"),
            Selection::Correct => f.write_str("correct"),
            Selection::LengthBand(a, b) => write!(f, "length-band {a},{b}"),
            Selection::Hardest => f.write_str("hardest"),
        }
    }
}

impl FromStr for Selection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let band = s
            .strip_prefix("length-band")
            .map(|r| r.trim_start_matches([' ', '=', ':']));
        match (s, band) {
            ("all", _) => Ok(Selection::All),
            ("correct", _) => Ok(Selection::Correct),
            ("hardest", _) => Ok(Selection::Hardest),
            (_, Some(r)) => {
                let bad = || {
                    Error::Invalid(format!(
                        "--select {s:?}: length-band needs two percentiles P1,P2 with 0 ≤ P1 ≤ P2 ≤ 100"
                    ))
                };
                let (a, b) = r.split_once(',').ok_or_else(bad)?;
                let a: f64 = a.trim().parse().map_err(|_| bad())?;
                let b: f64 = b.trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&a) || !(a..=100.0).contains(&b) {
                    return Err(bad());
                }
                Ok(Selection::LengthBand(a, b))
            }
            _ => Err(Error::Invalid(format!(
                "unknown selection {s:?} (valid: all, correct, length-band P1,P2, hardest)"
            ))),
        }
    }
}

/// Which positions of a trace count (METHODS.md §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TokenRule {
    /// Every position, prompt included.
    #[default]
    All,
    /// Only generated positions (RESP): the prompt is context.
    Generated,
}

impl fmt::Display for TokenRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRule::All => "all",
            TokenRule::Generated => "generated",
        })
    }
}

/// The traces `sel` keeps, in file order (possibly none).
pub fn select(records: &[TraceRecord], sel: Selection) -> Vec<&TraceRecord> {
    match sel {
        Selection::All => records.iter().collect(),
        Selection::Correct => records.iter().filter(|r| r.correct == Some(true)).collect(),
        Selection::LengthBand(p1, p2) => {
            let mut lens: Vec<usize> = records.iter().map(|r| r.generated_tokens).collect();
            lens.sort_unstable();
            let (lo, hi) = (percentile(&lens, p1), percentile(&lens, p2));
            records
                .iter()
                .filter(|r| (lo..=hi).contains(&(r.generated_tokens as f64)))
                .collect()
        }
        Selection::Hardest => {
            // prompt → (correct, graded samples)
            let mut rate: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
            for r in records {
                if let Some(c) = r.correct {
                    let e = rate.entry(r.prompt_index).or_default();
                    e.0 += c as usize;
                    e.1 += 1;
                }
            }
            let frac = |&(c, n): &(usize, usize)| c as f64 / n as f64;
            let Some(min) = rate.values().map(frac).reduce(f64::min) else {
                return Vec::new();
            };
            records
                .iter()
                .filter(|r| rate.get(&r.prompt_index).map(frac) == Some(min))
                .collect()
        }
    }
}

/// The p-th percentile of ascending `sorted` (linear interpolation between
/// closest ranks, as numpy's default); 0 for none.
fn percentile(sorted: &[usize], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let x = p / 100.0 * last as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    let at = |i: usize| sorted.get(i.min(last)).copied().unwrap_or(0) as f64;
    at(lo) + (at(hi) - at(lo)) * (x - lo as f64)
}

/// The scored sequences of a traces file, and what they were.
#[derive(Clone, Debug)]
pub struct TraceSequences {
    /// One per selected trace: prompt_ids ++ generated_ids, cut to
    /// `--max-seq-len`, counted from the prompt's end with `generated`.
    pub seqs: Vec<Sequence>,
    pub source: TraceSource,
    /// Traces in the file.
    pub total: usize,
    /// Selected traces longer than `--max-seq-len`, cut to it.
    pub truncated: usize,
}

/// Reads the traces at `path` (which must come from the tokenizer of the
/// model at `model_dir`), selects them and makes each a sequence. Errs,
/// naming the file, on another tokenizer's traces, a token id outside the
/// model's vocabulary, a selection that keeps none, and `max_seq_len` < 2.
pub fn trace_sequences(
    path: &Path,
    model_dir: &Path,
    sel: Selection,
    rule: TokenRule,
    max_seq_len: Option<usize>,
) -> Result<TraceSequences> {
    if let Some(t) = max_seq_len.filter(|&t| t < 2) {
        return Err(Error::Invalid(format!(
            "--max-seq-len {t}: a scored sequence needs at least 2 tokens"
        )));
    }
    let records = read_traces(path)?;
    let ours = tokenizer_digest(model_dir)?;
    if let Some(r) = records.first().filter(|r| r.tokenizer_digest != ours) {
        return Err(Error::format(
            path,
            format!(
                "the traces were written with another tokenizer (tokenizer.json sha256 {}, this model's {ours}): generate them with this model's tokenizer",
                r.tokenizer_digest
            ),
        ));
    }
    // The tokenizer's digest matched, yet a crafted or damaged file can
    // still hold ids the model has no embedding row for.
    let vocab = ModelConfig::load(&model_dir.join("config.json"))?.vocab;
    if let Some((r, id)) = records.iter().find_map(|r| {
        let outside = r
            .prompt_ids
            .iter()
            .chain(&r.generated_ids)
            .find(|&&id| id as usize >= vocab);
        outside.map(|&id| (r, id))
    }) {
        return Err(Error::format(
            path,
            format!(
                "the trace of prompt {} (sample {}) holds token id {id}, outside the model's vocabulary of {vocab}",
                r.prompt_index, r.sample
            ),
        ));
    }
    let chosen = select(&records, sel);
    if chosen.is_empty() {
        let why = match sel {
            Selection::Correct | Selection::Hardest if records.iter().all(|r| r.gold.is_none()) => {
                " (no trace has a gold answer)"
            }
            _ => "",
        };
        return Err(Error::format(
            path,
            format!(
                "--select {sel} keeps none of its {} traces{why}",
                records.len()
            ),
        ));
    }
    let mut truncated = 0;
    let seqs = chosen
        .iter()
        .map(|r| {
            let mut ids = [r.prompt_ids.as_slice(), &r.generated_ids].concat();
            if let Some(t) = max_seq_len.filter(|&t| ids.len() > t) {
                ids.truncate(t);
                truncated += 1;
            }
            let counted_from = match rule {
                TokenRule::All => 0,
                TokenRule::Generated => r.prompt_ids.len(),
            };
            Sequence { ids, counted_from }
        })
        .collect();
    Ok(TraceSequences {
        seqs,
        source: TraceSource {
            digest: crate::io::file_sha256(path, "a traces file")?,
            selection: sel.to_string(),
            tokens: rule.to_string(),
        },
        total: records.len(),
        truncated,
    })
}

/// sha256 over the sequences, each as its length and `counted_from` (u64
/// little-endian) and its ids (u32 little-endian): the `calib_digest` of
/// statistics over sequences.
pub fn sequences_digest(seqs: &[Sequence]) -> String {
    let mut h = Sha256::new();
    for s in seqs {
        h.update((s.ids.len() as u64).to_le_bytes());
        h.update((s.counted_from as u64).to_le_bytes());
        h.update(bytemuck::cast_slice::<u32, u8>(&s.ids));
    }
    hex(&h.finalize())
}
