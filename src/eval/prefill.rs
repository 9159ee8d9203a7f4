//! Prefill speed of a dense and a pruned model (METHODS.md section 8): one
//! forward pass with logits over a T-token prompt at batch 1, both models
//! timed alternately after warm-up so machine noise hits them alike.
use crate::backend::Backend;
use crate::model::forward::{logits_on, synthetic_ids, Geometry};
use crate::model::Model;
use crate::progress::Progress;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Timing summary of one model, seconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
}

impl Timing {
    /// Median (the mean of the two middle values for an even count), min
    /// and max of `xs` (not empty).
    pub(crate) fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        Self {
            median_s: (xs[(n - 1) / 2] + xs[n / 2]) / 2.0,
            min_s: xs[0],
            max_s: xs[n - 1],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PrefillResult {
    pub seq_len: usize,
    pub repeats: usize,
    pub dense: Timing,
    pub pruned: Timing,
    /// dense median / pruned median.
    pub speedup: f64,
}

/// One timed forward pass: `seconds` until the device has finished it,
/// `queued_s` until the host had issued its last launch. On the CUDA
/// backend the difference is the device catching up with the queue; a
/// pass whose `queued_s` is most of `seconds` is bound by the host (or by
/// a synchronous copy inside the pass, which makes the host wait). On the
/// CPU backend the two are equal up to the final call.
pub(crate) struct PassTime {
    pub seconds: f64,
    pub queued_s: f64,
}

/// One forward pass over `ids` (`geo`) with the logits of every position,
/// as a prefill computes them, timed ([`PassTime`]).
pub(crate) fn timed_forward<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    geo: Geometry,
) -> Result<PassTime> {
    let start = Instant::now();
    let logits = logits_on(be, model, ids, geo)?;
    let queued_s = start.elapsed().as_secs_f64();
    // The CUDA backend returns with the pass still queued on the device.
    be.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    drop(logits);
    Ok(PassTime { seconds, queued_s })
}

/// Times `repeats` prefills of each model over the same pseudo-random
/// `seq_len`-token prompt, alternating dense and pruned, after one warm-up each.
pub fn bench_prefill<B: Backend>(
    be: &B,
    dense: &Model<B>,
    pruned: &Model<B>,
    seq_len: usize,
    repeats: usize,
) -> Result<PrefillResult> {
    if repeats == 0 || seq_len == 0 {
        return Err(Error::Invalid(
            "--repeats and --seq-len must be at least 1".into(),
        ));
    }
    if dense.cfg.vocab != pruned.cfg.vocab || dense.cfg.hidden != pruned.cfg.hidden {
        return Err(Error::Invalid(format!(
            "{} and {} are not the same model family (vocabulary or hidden size differ)",
            dense.dir.display(),
            pruned.dir.display()
        )));
    }
    let ids = synthetic_ids(seq_len, dense.cfg.vocab);
    let geo = Geometry {
        seqs: 1,
        t: seq_len,
    };
    let prefill_once = |model| timed_forward(be, model, &ids, geo).map(|p| p.seconds);
    prefill_once(dense)?;
    prefill_once(pruned)?;
    let (mut d, mut p) = (Vec::new(), Vec::new());
    let progress = Progress::new(repeats as u64, "prefill");
    for _ in 0..repeats {
        d.push(prefill_once(dense)?);
        p.push(prefill_once(pruned)?);
        progress.inc(1);
    }
    progress.finish();
    let (dense_t, pruned_t) = (Timing::of(d), Timing::of(p));
    Ok(PrefillResult {
        seq_len,
        repeats,
        speedup: dense_t.median_s / pruned_t.median_s,
        dense: dense_t,
        pruned: pruned_t,
    })
}
