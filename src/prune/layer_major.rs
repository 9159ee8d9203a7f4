//! The layer-major statistics pass (`--layer-major`, METHODS.md §4,
//! DESIGN.md §8).
//!
//! Sequence-major, each batch runs through every layer, forward then
//! backward; with streamed weights (`--stream`) every layer is uploaded
//! (1 + objectives) times per batch. Layer-major, a chunk of batches
//! advances one layer at a time: the forward pass takes layer l over every
//! batch of the chunk before layer l + 1, and each backward pass walks the
//! layers in reverse over the chunk. Each layer is then uploaded once per
//! pass per chunk. The chunk's residual stream x_0..x_L and its gradient
//! ∂J/∂x live in host memory (f32, or bf16 with `--residual-dtype bf16`);
//! one batch's buffers are on the device at a time.
//!
//! The operations are those of the sequence-major pass on the same values
//! (`layer_forward`, `objective_grad`, `layer_backward`), and each layer's
//! partial sums are added in batch order in both, so with f32 residuals the
//! statistics are the same bit for bit (tests/layer_major.rs). Every layer
//! is recomputed in the backward pass (the activation-memory budget is a
//! sequence-major option).
use super::calibrate::{accumulate, passes, Batch, CalibSpec, Pass};
use super::stats::Stats;
use crate::backend::Backend;
use crate::model::backward::{layer_backward, objective_grad};
use crate::model::forward::{layer_forward, RopeTables};
use crate::model::layer_major::{chunks, HostBuf, LayerMajor, ResidualDtype};
use crate::model::{Model, ModelConfig};
use crate::progress::{self, Progress};
use crate::Result;

/// Host bytes a chunk holds per batch row: x_0..x_L and one gradient, `d`
/// values each.
pub fn host_bytes_per_row(cfg: &ModelConfig, dtype: ResidualDtype) -> u64 {
    (cfg.layers as u64 + 2) * cfg.hidden as u64 * dtype.bytes()
}

/// The statistics pass over `batches`, layer-major (module doc), into
/// `stats`; `scales` = (energy, ce) normalisers over the whole set.
pub fn score_chunks<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &mut Stats,
    batches: &[Batch],
    spec: CalibSpec,
    scales: (f32, f32),
    lm: LayerMajor,
) -> Result<()> {
    let budget = lm
        .host_memory
        .resolve("--host-memory", || be.available_memory())?;
    let row_bytes = host_bytes_per_row(&model.cfg, lm.residual);
    let chunks = chunks(batches, |b| b.geo.rows() as u64 * row_bytes, budget)?;
    let passes = passes(spec, scales);
    let largest = chunks.iter().map(|c| seqs_of(c)).max().unwrap_or(0);
    progress::println(&format!(
        "layer-major: {} chunk(s) of up to {largest} sequences (host {:.1} MiB of {:.1} MiB, \
         {} residuals); {} layer uploads per chunk when streamed",
        chunks.len(),
        chunks
            .iter()
            .map(|c| c.iter().map(|b| b.geo.rows() as u64).sum::<u64>() * row_bytes)
            .max()
            .unwrap_or(0) as f64
            / (1 << 20) as f64,
        budget as f64 / (1 << 20) as f64,
        lm.residual.name(),
        (1 + passes.len()) * model.cfg.layers
    ));
    let layers = model.cfg.layers as u64;
    let progress = Progress::new(
        chunks.len() as u64 * (1 + passes.len() as u64) * layers,
        "scoring (layer steps)",
    );
    for chunk in chunks {
        score_chunk(be, model, stats, chunk, &passes, lm.residual, &progress)?;
    }
    progress.finish();
    Ok(())
}

fn seqs_of(chunk: &[Batch]) -> usize {
    chunk.iter().map(|b| b.geo.seqs).sum()
}

/// One chunk: the forward pass layer by layer over its batches, then each
/// backward pass of `passes` layer by layer in reverse.
fn score_chunk<B: Backend>(
    be: &B,
    model: &Model<B>,
    stats: &mut Stats,
    chunk: &[Batch],
    passes: &[Pass],
    dtype: ResidualDtype,
    progress: &Progress,
) -> Result<()> {
    let c = &model.cfg;
    let ropes = chunk
        .iter()
        .map(|b| RopeTables::new(be, model, b.geo.t))
        .collect::<Result<Vec<_>>>()?;
    // residuals[l][b] = x_l of batch b, l = 0..=L.
    let mut residuals: Vec<Vec<HostBuf>> = Vec::with_capacity(c.layers + 1);
    residuals.push(
        chunk
            .iter()
            .map(|b| {
                crate::model::forward::check_ids(&b.ids, c.vocab)?;
                let x = model.embed_tokens(be, &b.ids)?;
                HostBuf::store(be, &x, dtype)
            })
            .collect::<Result<_>>()?,
    );
    model.for_each_layer(be, 0..c.layers, |l, lw| {
        let next = chunk
            .iter()
            .zip(&ropes)
            .zip(&residuals[l])
            .map(|((b, rope), x)| {
                let y = layer_forward(be, model, lw, None, rope, &x.load(be)?, b.geo)?;
                HostBuf::store(be, &y, dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        residuals.push(next);
        progress.inc(1);
        Ok(())
    })?;
    for (i, &(objective, at, scale)) in passes.iter().enumerate() {
        // ∂J/∂x_L of every batch, from the final norm.
        let mut grads = chunk
            .iter()
            .zip(&residuals[c.layers])
            .map(|(b, x)| {
                let x = x.load(be)?;
                let (z, rstd) =
                    be.rmsnorm_fwd(&x, &model.norm, b.geo.rows(), c.hidden, c.rms_eps as f32)?;
                let counted = b.mask.as_deref();
                let (_, dx) = objective_grad(
                    be,
                    model,
                    (&z, &rstd, &x),
                    &b.ids,
                    b.geo,
                    (objective, at, scale),
                    counted,
                )?;
                HostBuf::store(be, &dx, dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        model.for_each_layer(be, (0..c.layers).rev(), |l, lw| {
            for (((b, rope), x), g) in chunk
                .iter()
                .zip(&ropes)
                .zip(&residuals[l])
                .zip(grads.iter_mut())
            {
                let mut dx = g.load(be)?;
                let mut on = |l: usize, p| {
                    accumulate(stats, objective, i == 0, l, &p);
                    Ok(())
                };
                layer_backward(
                    be,
                    model,
                    (l, lw),
                    None,
                    rope,
                    &x.load(be)?,
                    None,
                    b.geo,
                    &mut dx,
                    b.mask.as_deref(),
                    Some(&mut on),
                    false,
                )?;
                if l > 0 {
                    *g = HostBuf::store(be, &dx, dtype)?;
                }
            }
            progress.inc(1);
            Ok(())
        })?;
    }
    Ok(())
}
