//! Token perplexity over non-overlapping windows (METHODS.md section 8).
use crate::backend::Backend;
use crate::io::text::windows;
use crate::model::forward::{forward, nll, Keep};
use crate::model::{Geometry, Model};
use crate::progress::Progress;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PplResult {
    pub ppl: f64,
    /// Mean next-token NLL (nats).
    pub nll: f64,
    pub windows: usize,
    pub seq_len: usize,
    /// Predicted tokens (windows·(seq_len−1)).
    pub tokens: usize,
    /// Whether each window started with BOS (METHODS.md §8).
    #[serde(default)]
    pub bos: bool,
}

/// [`perplexity`] with each window `[BOS] + seq_len − 1` text tokens when
/// `bos` is given (the windows of METHODS.md §2; BOS predicts the first
/// text token), else `perplexity` itself.
pub fn perplexity_bos<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    batch: usize,
    bos: Option<u32>,
) -> Result<PplResult> {
    let Some(b) = bos else {
        return perplexity(be, model, ids, seq_len, max_windows, batch);
    };
    if seq_len < 2 {
        return Err(Error::Invalid("--seq-len must be at least 2".into()));
    }
    let n = window_count(ids.len(), seq_len - 1, max_windows);
    let w = windows(ids, n.max(1), seq_len, Some(b))?;
    let r = perplexity(be, model, &w, seq_len, None, batch)?;
    Ok(PplResult { bos: true, ..r })
}

/// Whole windows of `per` text tokens in `n_ids` tokens, at most `max_windows`.
fn window_count(n_ids: usize, per: usize, max_windows: Option<usize>) -> usize {
    let n = n_ids / per;
    max_windows.map_or(n, |k| n.min(k))
}

/// exp(mean NLL) over the first `max_windows` (default all) windows of
/// `seq_len` tokens of `ids`; each window is scored independently, its
/// first token unpredicted. Windows are batched `batch` at a time.
pub fn perplexity<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    seq_len: usize,
    max_windows: Option<usize>,
    batch: usize,
) -> Result<PplResult> {
    if seq_len < 2 {
        return Err(Error::Invalid("--seq-len must be at least 2".into()));
    }
    let windows = window_count(ids.len(), seq_len, max_windows);
    if windows == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seq_len}",
            ids.len()
        )));
    }
    let mut total = 0f64;
    let mut count = 0usize;
    let progress = Progress::new(windows as u64, "perplexity");
    let mut w = 0;
    while w < windows {
        let n = batch.max(1).min(windows - w);
        let chunk = &ids[w * seq_len..(w + n) * seq_len];
        let (s, c) = nll(
            be,
            model,
            chunk,
            Geometry {
                seqs: n,
                t: seq_len,
            },
        )?;
        total += s;
        count += c;
        w += n;
        progress.inc(n as u64);
    }
    progress.finish();
    let mean = total / count as f64;
    if !mean.is_finite() {
        return Err(Error::Invalid(format!(
            "the mean NLL over {windows} windows is {mean}: the model's logits are not finite \
             (check its weights and config)"
        )));
    }
    Ok(PplResult {
        ppl: mean.exp(),
        nll: mean,
        windows,
        seq_len,
        tokens: count,
        bos: false,
    })
}

/// Trace perplexity (METHODS.md sections 8 and 11): exp(mean NLL) over the
/// positions of each sequence whose next token counts (target index ≥
/// `counted_from`: with `--tokens generated`, the generated tokens only,
/// the prompt being context). Each sequence is one forward pass of its own
/// length. `windows` in the result is the number of sequences and
/// `seq_len` the longest.
pub fn trace_perplexity<B: Backend>(
    be: &B,
    model: &Model<B>,
    seqs: &[crate::io::traces::Sequence],
) -> Result<PplResult> {
    let c = &model.cfg;
    let (mut total, mut count) = (0f64, 0usize);
    let progress = Progress::new(seqs.len() as u64, "trace perplexity");
    for s in seqs {
        let t = s.ids.len();
        let first = s.counted_from.max(1); // index of the first counted target
        if t <= first {
            progress.inc(1);
            continue; // nothing of this sequence is predicted
        }
        let geo = Geometry { seqs: 1, t };
        let out = forward(be, model, &s.ids, geo, Keep::OUTPUT)?;
        // targets[i] = ids[i+1] when i+1 ≥ first, else not predicted
        let targets: Vec<u32> = (0..t)
            .map(|i| match s.ids.get(i + 1) {
                Some(&id) if i + 1 >= first => id,
                _ => u32::MAX,
            })
            .collect();
        let (sum, n, _) = be.cross_entropy(
            &out.z,
            model.lm_head(),
            &targets,
            t,
            c.hidden,
            c.vocab,
            1.0,
            false,
        )?;
        total += sum;
        count += n;
        progress.inc(1);
    }
    progress.finish();
    if count == 0 {
        return Err(Error::Invalid(
            "the traces have no counted token to predict".into(),
        ));
    }
    let mean = total / count as f64;
    if !mean.is_finite() {
        return Err(Error::Invalid(format!(
            "the mean NLL over {} traces is {mean}: the model's logits are not finite",
            seqs.len()
        )));
    }
    Ok(PplResult {
        ppl: mean.exp(),
        nll: mean,
        windows: seqs.len(),
        seq_len: seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0),
        tokens: count,
        bos: false,
    })
}
