//! The statistics pass (METHODS.md sections 2–4): forward over calibration
//! windows keeping the residual stream, then one activation-only backward
//! pass per objective, accumulating per-channel sums in f64.
use crate::backend::Backend;
use crate::io::text::hex;
use crate::model::backward::{backward_channel_stats, Objective as PassObjective};
use crate::model::forward::forward;
use crate::model::{Geometry, Model};
use crate::progress::Progress;
use crate::prune::stats::{EnergyAt, Objectives, Stats, StatsMeta};
use crate::prune::ColumnNorms;
use crate::{Error, Result};
use sha2::{Digest, Sha256};

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
}

/// Identifies a model by its config and, for every tensor, name, dtype,
/// shape and a strided sample of its bytes: cheap on a 15 GB model, and
/// different for any two models one would confuse.
pub fn model_digest<B: Backend>(model: &Model<B>) -> String {
    let mut h = Sha256::new();
    let cfg = serde_json::to_string(&model.cfg.raw).expect("config serialises");
    h.update(cfg.as_bytes());
    for name in model.files.names() {
        let t = model.files.get_any(name).expect("listed tensors exist");
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        for chunk in t.bytes.chunks(4096) {
            h.update(&chunk[..chunk.len().min(8)]);
        }
    }
    hex(&h.finalize())
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
        model_digest: model_digest(model),
        calib_digest,
        samples: n_seq,
        seq_len: t,
        tokens: (n_seq * t) as u64,
        objectives: spec.objectives,
        energy_at: spec.energy_at,
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let mut stats = Stats::zeros(meta, &model.cfg.ffn_widths);
    // Normalisers over the whole calibration set, so that batches add up.
    let energy_scale = 1.0 / (n_seq * t) as f32;
    let ce_scale = 1.0 / (n_seq * (t - 1)) as f32;
    let progress = Progress::new(n_seq as u64, "scoring");
    let mut s0 = 0;
    while s0 < n_seq {
        let seqs = spec.batch.max(1).min(n_seq - s0);
        let ids = &windows[s0 * t..(s0 + seqs) * t];
        let geo = Geometry { seqs, t };
        let fwd = forward(be, model, ids, geo, true)?;
        if spec.objectives.energy {
            let obj = PassObjective::Energy {
                pre_norm: spec.energy_at == EnergyAt::PreNorm,
            };
            backward_channel_stats(be, model, &fwd, ids, geo, obj, energy_scale, |l, p| {
                let s = &mut stats.layers[l];
                add(&mut s.s1, &p.s1);
                add(&mut s.s2, &p.s2);
                add(&mut s.f2, &p.f2);
                add(&mut s.k1, &p.k1);
                Ok(())
            })?;
        }
        if spec.objectives.ce {
            let first = !spec.objectives.energy;
            backward_channel_stats(
                be,
                model,
                &fwd,
                ids,
                geo,
                PassObjective::Ce,
                ce_scale,
                |l, p| {
                    let s = &mut stats.layers[l];
                    if first {
                        add(&mut s.s1, &p.s1);
                        add(&mut s.s2, &p.s2);
                    }
                    // tk = Σ_sequences |Σ_{t in sequence} h·g|
                    let m = s.tk.len();
                    for seq in p.hg_seq.chunks_exact(m) {
                        s.tk.iter_mut().zip(seq).for_each(|(a, b)| *a += b.abs());
                    }
                    Ok(())
                },
            )?;
        }
        s0 += seqs;
        progress.inc(seqs as u64);
    }
    progress.finish();
    Ok(stats)
}

fn add(acc: &mut [f64], x: &[f64]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += b);
}
