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
use std::str::FromStr;

use half::bf16;

use super::calibrate::{accumulate, passes, Batch, CalibSpec, Pass};
use super::stats::Stats;
use crate::backend::Backend;
use crate::model::backward::{layer_backward, objective_grad};
use crate::model::forward::{layer_forward, RopeTables};
use crate::model::keep::MemoryBudget;
use crate::model::{Model, ModelConfig};
use crate::progress::{self, Progress};
use crate::{Error, Result};

/// How the host holds the chunk's residual stream and gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResidualDtype {
    /// Exact: the statistics equal the sequence-major pass's.
    #[default]
    F32,
    /// Half the host memory; every stored value rounded to bf16 (nearest even).
    Bf16,
}

impl FromStr for ResidualDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(ResidualDtype::F32),
            "bf16" => Ok(ResidualDtype::Bf16),
            _ => Err(Error::Invalid(format!(
                "residual dtype {s:?}: expected f32 or bf16"
            ))),
        }
    }
}

impl ResidualDtype {
    fn name(self) -> &'static str {
        match self {
            ResidualDtype::F32 => "f32",
            ResidualDtype::Bf16 => "bf16",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            ResidualDtype::F32 => 4,
            ResidualDtype::Bf16 => 2,
        }
    }
}

/// `--layer-major` with its host-memory budget and residual dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerMajor {
    /// Host memory for a chunk's residual stream and gradients (`auto`:
    /// half of the available memory); sets the chunk size.
    pub host_memory: MemoryBudget,
    pub residual: ResidualDtype,
}

/// A host copy of one batch's `[rows, d]` buffer.
enum HostBuf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl HostBuf {
    fn store<B: Backend>(be: &B, x: &B::Buf, dtype: ResidualDtype) -> Result<Self> {
        let v = be.download(x)?;
        Ok(match dtype {
            ResidualDtype::F32 => HostBuf::F32(v),
            ResidualDtype::Bf16 => HostBuf::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        })
    }

    fn load<B: Backend>(&self, be: &B) -> Result<B::Buf> {
        match self {
            HostBuf::F32(v) => be.upload(v),
            HostBuf::Bf16(v) => be.upload(&v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()),
        }
    }
}

/// Host bytes a chunk holds per batch row: x_0..x_L and one gradient, `d`
/// values each.
pub fn host_bytes_per_row(cfg: &ModelConfig, dtype: ResidualDtype) -> u64 {
    (cfg.layers as u64 + 2) * cfg.hidden as u64 * dtype.bytes()
}

/// Groups `batches` (in order) into chunks whose host copies fit in
/// `budget` bytes; refuses a budget smaller than the largest batch, naming
/// the minimum.
fn chunks(batches: &[Batch], row_bytes: u64, budget: u64) -> Result<Vec<&[Batch]>> {
    let need = batches
        .iter()
        .map(|b| b.geo.rows() as u64 * row_bytes)
        .max();
    if let Some(need) = need.filter(|&n| n > budget) {
        return Err(Error::Invalid(format!(
            "--host-memory {budget} B is too small: one batch's residual stream and gradient \
             take {need} B (at least {:.1} MiB; or use a smaller --batch)",
            need as f64 / (1 << 20) as f64
        )));
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0u64;
    for (i, b) in batches.iter().enumerate() {
        let bytes = b.geo.rows() as u64 * row_bytes;
        if i > start && used + bytes > budget {
            out.push(&batches[start..i]);
            start = i;
            used = 0;
        }
        used += bytes;
    }
    if start < batches.len() {
        out.push(&batches[start..]);
    }
    Ok(out)
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
    let chunks = chunks(batches, row_bytes, budget)?;
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
                let x = be.embedding(&b.ids, &model.embed, c.hidden, c.embed_scale)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Geometry;

    fn batch(seqs: usize, t: usize) -> Batch {
        Batch {
            ids: vec![0; seqs * t],
            geo: Geometry { seqs, t },
            mask: None,
        }
    }

    #[test]
    fn chunks_fill_the_budget_in_order() {
        let b = [batch(2, 4), batch(2, 4), batch(1, 4), batch(3, 4)];
        // 8 rows × 10 bytes = 80 per 2-sequence batch.
        let sizes = |budget| {
            chunks(&b, 10, budget)
                .unwrap()
                .iter()
                .map(|c| seqs_of(c))
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(1000), vec![8]);
        assert_eq!(sizes(200), vec![5, 3]);
        assert_eq!(sizes(120), vec![2, 3, 3]);
        // The 3-sequence batch takes 120 B: a smaller budget is refused.
        let e = chunks(&b, 10, 119).unwrap_err().to_string();
        assert!(e.contains("120 B"), "{e}");
        assert!(chunks(&[], 10, 100).unwrap().is_empty());
    }

    #[test]
    fn residual_dtypes_parse() {
        assert_eq!("f32".parse::<ResidualDtype>().unwrap(), ResidualDtype::F32);
        assert_eq!(
            "bf16".parse::<ResidualDtype>().unwrap(),
            ResidualDtype::Bf16
        );
        assert!("f16".parse::<ResidualDtype>().is_err());
    }
}
