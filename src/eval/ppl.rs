//! Token perplexity over non-overlapping windows (METHODS.md section 8).
use crate::backend::Backend;
use crate::io::text::windows;
use crate::model::forward::{
    check_ids, forward, layer_forward, nll, nll_of_final, Keep, RopeTables,
};
use crate::model::layer_major::{chunks, HostBuf, LayerMajor};
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

/// How [`perplexity`] cuts the text into windows and runs them.
#[derive(Clone, Copy, Debug)]
pub struct PplWindows {
    /// Tokens per window, T ≥ 2.
    pub seq_len: usize,
    /// At most this many windows (default: every whole window).
    pub max_windows: Option<usize>,
    /// Windows per forward batch.
    pub batch: usize,
    /// With `Some(bos)`, each window is `[BOS] + seq_len − 1` text tokens
    /// (the windows of METHODS.md §2; BOS predicts the first text token).
    pub bos: Option<u32>,
    /// Run layer-major (`model::layer_major`): the same result, with each
    /// streamed layer uploaded once per chunk of batches.
    pub layer_major: Option<LayerMajor>,
}

/// Whole windows of `per` text tokens in `n_ids` tokens, at most `max_windows`.
fn window_count(n_ids: usize, per: usize, max_windows: Option<usize>) -> usize {
    let n = n_ids / per;
    max_windows.map_or(n, |k| n.min(k))
}

/// exp(mean NLL) over the windows `spec` cuts from `ids`; each window is
/// scored independently, its first token unpredicted.
pub fn perplexity<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    spec: &PplWindows,
) -> Result<PplResult> {
    let t = spec.seq_len;
    if t < 2 {
        return Err(Error::Invalid("--seq-len must be at least 2".into()));
    }
    let with_bos;
    let (ids, n_windows) = match spec.bos {
        Some(b) => {
            let n = window_count(ids.len(), t - 1, spec.max_windows).max(1);
            with_bos = windows(ids, n, t, Some(b))?;
            (&with_bos[..], n)
        }
        None => (ids, window_count(ids.len(), t, spec.max_windows)),
    };
    if n_windows == 0 {
        return Err(Error::Invalid(format!(
            "the text has {} tokens, fewer than one window of {t}",
            ids.len()
        )));
    }
    let batches: Vec<&[u32]> = ids[..n_windows * t].chunks(spec.batch.max(1) * t).collect();
    let sums = match spec.layer_major {
        None => {
            let progress = Progress::new(n_windows as u64, "perplexity");
            let sums = batches
                .iter()
                .map(|b| {
                    let r = nll(
                        be,
                        model,
                        b,
                        Geometry {
                            seqs: b.len() / t,
                            t,
                        },
                    );
                    progress.inc((b.len() / t) as u64);
                    r
                })
                .collect::<Result<Vec<_>>>()?;
            progress.finish();
            sums
        }
        Some(lm) => nll_layer_major(be, model, &batches, t, lm)?,
    };
    let (total, count) = sums
        .iter()
        .fold((0f64, 0usize), |(s, n), &(bs, bn)| (s + bs, n + bn));
    let mean = total / count as f64;
    if !mean.is_finite() {
        return Err(Error::Invalid(format!(
            "the mean NLL over {n_windows} windows is {mean}: the model's logits are not finite \
             (check its weights and config)"
        )));
    }
    Ok(PplResult {
        ppl: mean.exp(),
        nll: mean,
        windows: n_windows,
        seq_len: t,
        tokens: count,
        bos: spec.bos.is_some(),
    })
}

/// Σ NLL and count of each of `batches` (windows of `t` tokens), in order,
/// layer-major: a chunk of batches (as many as `lm.host_memory` holds, one
/// `[rows, d]` residual each) advances one layer at a time, each batch's
/// x_l waiting on the host; then each batch's final norm and NLL. The
/// operations are `nll`'s on the same values, so with f32 residuals the
/// sums equal it bit for bit.
fn nll_layer_major<B: Backend>(
    be: &B,
    model: &Model<B>,
    batches: &[&[u32]],
    t: usize,
    lm: LayerMajor,
) -> Result<Vec<(f64, usize)>> {
    let c = &model.cfg;
    let budget = lm
        .host_memory
        .resolve("--host-memory", || be.available_memory())?;
    let row_bytes = c.hidden as u64 * lm.residual.bytes();
    let chunks = chunks(batches, |b| b.len() as u64 * row_bytes, budget)?;
    crate::progress::println(&format!(
        "layer-major: {} chunk(s) of batches (host {:.1} MiB, {} residuals); {} layer uploads \
         per chunk when streamed",
        chunks.len(),
        budget as f64 / (1 << 20) as f64,
        lm.residual.name(),
        c.layers
    ));
    let progress = Progress::new((chunks.len() * c.layers) as u64, "perplexity (layer steps)");
    let rope = RopeTables::new(be, model, t)?;
    let mut sums = Vec::with_capacity(batches.len());
    for chunk in chunks {
        let mut xs = chunk
            .iter()
            .map(|b| {
                check_ids(b, c.vocab)?;
                HostBuf::store(be, &model.embed_tokens(be, b)?, lm.residual)
            })
            .collect::<Result<Vec<_>>>()?;
        model.for_each_layer(be, 0..c.layers, |_, lw| {
            for (b, x) in chunk.iter().zip(xs.iter_mut()) {
                let geo = Geometry {
                    seqs: b.len() / t,
                    t,
                };
                let y = layer_forward(be, model, lw, None, &rope, &x.load(be)?, geo)?;
                *x = HostBuf::store(be, &y, lm.residual)?;
            }
            progress.inc(1);
            Ok(())
        })?;
        for (b, x) in chunk.iter().zip(&xs) {
            let geo = Geometry {
                seqs: b.len() / t,
                t,
            };
            let (z, _) = be.rmsnorm_fwd(
                &x.load(be)?,
                &model.norm,
                geo.rows(),
                c.hidden,
                c.rms_eps as f32,
            )?;
            sums.push(nll_of_final(be, model, &z, b, geo)?);
        }
    }
    progress.finish();
    Ok(sums)
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
            model.lm_head(be)?,
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
