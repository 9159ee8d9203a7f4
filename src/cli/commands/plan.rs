//! `rku-engine plan`: the device memory of a scoring run or a refit, from a config.
use crate::cli::args::PlanArgs;
use anyhow::{bail, Result};
use rku_engine::model::layer_major::ResidualDtype;
use rku_engine::model::ModelConfig;
use rku_engine::plan::{plan, plan_refit, PlanSpec, RefitPlanSpec};
use rku_engine::prune::layer_major::host_bytes_per_row;
use rku_engine::prune::refit::RefitTarget;

pub fn run(a: &PlanArgs) -> Result<()> {
    let path = match (&a.model, &a.config) {
        (Some(dir), _) => dir.join("config.json"),
        (None, Some(c)) => c.clone(),
        (None, None) => bail!("pass --model DIR or --config config.json"),
    };
    let cfg = ModelConfig::load(&path)?;
    let p = match a.refit {
        None => {
            let batches = a.samples.div_ceil(a.batch);
            // Host bytes of one batch's residual stream and gradient (f32).
            let row_bytes = host_bytes_per_row(&cfg, ResidualDtype::F32);
            let batch_bytes = (a.batch as u64)
                .checked_mul(a.seq_len as u64)
                .and_then(|rows| rows.checked_mul(row_bytes))
                .filter(|&b| b < 1 << 62)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "plan: one batch of {} sequences of {} tokens on this model would need more than 2^62 bytes",
                        a.batch,
                        a.seq_len
                    )
                })?;
            let per_chunk = match a.host_memory {
                Some(h) if h < batch_bytes => bail!(
                    "--host-memory {h} B is too small: one batch's residual stream and gradient take {batch_bytes} B"
                ),
                Some(h) => ((h / batch_bytes) as usize).min(batches),
                None => batches,
            };
            let spec = PlanSpec {
                activation_memory: a.activation_memory,
                layer_major: a.layer_major.then_some(per_chunk),
                ..PlanSpec::new(a.seq_len, a.batch, a.objective.objectives(), a.stream)
            };
            let p = plan(&cfg, &spec)?;
            if let Some(lm) = p.layer_major {
                let chunks = batches.div_ceil(per_chunk);
                println!(
                    "layer-major over {} sequences: {chunks} chunk(s), {} layer uploads in all when streamed",
                    a.samples,
                    chunks * lm.uploads
                );
            }
            p
        }
        Some(target) => {
            let p = plan_refit(
                &cfg,
                &RefitPlanSpec {
                    t: a.seq_len,
                    samples: a.refit_samples,
                    batch: a.batch,
                    residual: target == RefitTarget::Residual,
                    bias: a.refit_bias,
                    kept: cfg.ffn_widths.clone(),
                    stream: a.stream,
                    layer_major: a.layer_major,
                },
            )?;
            if let (Some(lm), Some(h)) = (p.layer_major, a.host_memory) {
                if h < lm.host_bytes {
                    bail!(
                        "--host-memory {h} B is too small for the refit's residual streams: {} B",
                        lm.host_bytes
                    );
                }
            }
            p
        }
    };
    println!("{p}");
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}
